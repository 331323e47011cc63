"""The tunnel client against a real agent process, all on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import io
import json
import os
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from pytest_bridge.local.ports import free_port
from pytest_bridge.transport.tunnel import (
    AuthenticationError,
    OpenFailed,
    Tunnel,
    socket_connector,
    tcp_connector,
    tcp_socket_connector,
)
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

TOKEN = "test-token-0123456789"
LOOPBACK = "127.0.0.1"


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    control_port: int
    status_port: int
    listen_ports: list[int]
    env: dict[str, str]
    logs: list[str] = field(default_factory=list)
    lanes: bool = False  # whether tunnels to this agent open lanes (the test runs once each way)

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.logs):
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; logs:\n" + "".join(self.logs))

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def lane_options(self, port: int | None = None) -> dict[str, object]:
        """Tunnel keyword arguments for lanes through ``port`` (default: the control port), if on."""
        return {"lane_connect": tcp_socket_connector(LOOPBACK, port or self.control_port)} if self.lanes else {}

    def tunnel(self, reverse_ports: dict[int, int] | None = None, token: str = TOKEN, **kw: object) -> Tunnel:
        options = {**self.lane_options(), **kw}
        return Tunnel(tcp_connector(LOOPBACK, self.control_port), token, reverse_ports or {}, **options)  # type: ignore[arg-type]


StartAgent = Callable[..., AgentProcess]


@pytest.fixture(params=["streams", "lanes"])
def start_agent(request: pytest.FixtureRequest) -> Iterator[StartAgent]:
    """Start `python -m pytest_bridge_agent` on loopback; stopped (SIGKILL if needed) at teardown.

    Every test runs twice: with tunnels carrying connections as streams of the multiplexed
    connection, and with lanes (one connection each, falling back to streams).
    """
    agents: list[AgentProcess] = []

    def start(listen_ports: list[int] | None = None, extra_env: dict[str, str] | None = None) -> AgentProcess:
        ports = listen_ports or []
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTEST_BRIDGE_TOKEN": TOKEN,
            "PYTEST_BRIDGE_CONTROL_PORT": "0",
            "PYTEST_BRIDGE_STATUS_PORT": "0",
            "PYTEST_BRIDGE_BIND_HOST": LOOPBACK,
            "PYTEST_BRIDGE_LISTEN_PORTS": ",".join(map(str, ports)),
            **(extra_env or {}),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_bridge_agent"], env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert proc.stderr is not None
        first = proc.stderr.readline().decode()
        match = re.search(r"ready control=[\d.]+:(\d+) status=[\d.]+:(\d+)", first)
        if not match:
            proc.kill()
            raise AssertionError(f"agent did not start: {first}{proc.stderr.read().decode()}")
        agent = AgentProcess(proc, int(match.group(1)), int(match.group(2)), ports, env, [first])
        agent.lanes = request.param == "lanes"
        stderr = proc.stderr

        def drain() -> None:
            for line in stderr:
                agent.logs.append(line.decode())

        threading.Thread(target=drain, daemon=True).start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(5)
        if agent.proc.stderr:
            agent.proc.stderr.close()


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object], port: int = 0
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, LOOPBACK, port)  # type: ignore[arg-type]
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_roundtrip(host: str, port: int, payload: bytes) -> bytes:
    """Send payload while reading the echo; return what came back (until EOF)."""
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 256 * 1024):
            writer.write(view[i : i + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while chunk := await reader.read(256 * 1024):
        received += chunk
    await sender
    writer.close()
    return bytes(received)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_streams_closed(tunnel: Tunnel, within: float = 5.0) -> None:
    """Until every stream finished (the last FINs may still be in flight when a client returns)."""
    async with asyncio.timeout(within):
        while tunnel.stats.streams_open:  # noqa: ASYNC110 - polls a counter, there is no event
            await asyncio.sleep(0.02)


def status(port: int, path: str = "/status") -> dict[str, object]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())  # type: ignore[no-any-return]


# ---------------------------------------------------------------- handshake


@pytest.mark.asyncio
async def test_wrong_token_is_refused(start_agent: StartAgent) -> None:
    agent = start_agent()
    with pytest.raises(AuthenticationError, match="wrong session token"):
        await agent.tunnel(token="not-the-token").start()
    agent.wait_for_log("refused: authentication failed")
    assert status(agent.status_port)["connected_clients"] == 0


@pytest.mark.asyncio
async def test_the_agent_can_be_given_only_the_tokens_hash(start_agent: StartAgent) -> None:
    """What a pod carries is the SHA-256: reading the pod spec does not let anyone connect."""
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    agent = start_agent(extra_env={"PYTEST_BRIDGE_TOKEN": "", "PYTEST_BRIDGE_TOKEN_SHA256": digest})
    tunnel = agent.tunnel()
    await tunnel.start()
    await tunnel.close()
    with pytest.raises(AuthenticationError, match="wrong session token"):
        await agent.tunnel(token=digest).start()  # the hash itself is no token


def test_the_control_port_listens_on_loopback_only(start_agent: StartAgent) -> None:
    """Port-forward reaches the pod's loopback; nobody in the cluster reaches the control port."""
    agent = start_agent(extra_env={"PYTEST_BRIDGE_BIND_HOST": "0.0.0.0"})
    assert re.search(r"ready control=127\.0\.0\.1:\d+ status=0\.0\.0\.0:", agent.logs[0]), agent.logs[0]
    body = status(agent.status_port)
    assert set(body) == {
        "connected_clients", "idle_seconds", "sessions_total", "streams_open", "streams_total",
        "bytes_to_clients", "bytes_from_clients", "idle_lanes", "listen_ports",
    }, "/status says how busy the agent is, nothing about who or what"  # fmt: skip


def test_connections_that_do_not_authenticate_are_capped(start_agent: StartAgent) -> None:
    agent = start_agent()
    silent = [socket.create_connection((LOOPBACK, agent.control_port), timeout=5) for _ in range(32)]
    try:
        time.sleep(0.5)  # the agent has accepted them; none has sent anything
        extra = socket.create_connection((LOOPBACK, agent.control_port), timeout=5)
        with extra, pytest.raises(ConnectionResetError):  # the 33rd waiting to authenticate: reset at once
            extra.recv(1)
        agent.wait_for_log("already wait to authenticate")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.asyncio
async def test_non_protocol_client_is_refused(start_agent: StartAgent) -> None:
    agent = start_agent()
    reader, writer = await asyncio.open_connection(LOOPBACK, agent.control_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # an ERROR frame, then the agent closes
    assert b"not a pytest-bridge HELLO" in answer
    writer.close()


# ---------------------------------------------------------------- reverse: cluster -> local


@pytest.mark.asyncio
async def test_reverse_echo_large_payloads(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])
    async with serve(echo_handler) as local, agent.tunnel({listen: local}) as tunnel:
        payloads = [os.urandom(12 * 1024 * 1024), os.urandom(3 * 1024 * 1024 + 17)]
        results = await asyncio.gather(*(echo_roundtrip(LOOPBACK, listen, p) for p in payloads))
        for sent, got in zip(payloads, results, strict=True):
            assert len(got) == len(sent)
            assert sha256(got) == sha256(sent)
        total = sum(map(len, payloads))
        stats = tunnel.stats
        assert stats.bytes_to_agent == total
        assert stats.bytes_from_agent == total


@pytest.mark.asyncio
async def test_half_close_reply_after_client_shutdown(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])
    reply_size = 2 * 1024 * 1024

    async def digest_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n" + b"r" * reply_size)
        await writer.drain()
        writer.close()

    async with serve(digest_then_reply) as local, agent.tunnel({listen: local}):
        request = os.urandom(1024 * 1024)
        reader, writer = await asyncio.open_connection(LOOPBACK, listen)
        writer.write(request)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    digest, body = reply.split(b"\n", 1)
    assert digest.decode() == sha256(request)
    assert len(body) == reply_size


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(20):
                    chunk = f"chunk-{i:02d};".encode() * 100
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                body = f"hello {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            digest = hashlib.sha256(body).hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(digest)))
            self.end_headers()
            self.wfile.write(digest)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.mark.asyncio
async def test_http_keepalive_and_chunked(start_agent: StartAgent, http_server: int) -> None:
    listen = free_port()
    agent = start_agent([listen])

    def client() -> list[tuple[int, bytes]]:
        conn = http.client.HTTPConnection(LOOPBACK, listen, timeout=10)
        results = []
        conn.request("GET", "/one")
        first = conn.getresponse()
        results.append((first.status, first.read()))
        sock = conn.sock
        conn.request("GET", "/chunked")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        results.append((response.status, response.read()))
        body = os.urandom(300_000)
        conn.request("POST", "/upload", body=body)
        response = conn.getresponse()
        results.append((response.status, response.read()))
        assert response.read() == b""
        assert results[-1][1].decode() == hashlib.sha256(body).hexdigest()
        conn.request("GET", "/three")
        response = conn.getresponse()
        results.append((response.status, response.read()))
        assert conn.sock is sock, "keep-alive: every request used the same connection"
        conn.close()
        return results

    async with agent.tunnel({listen: http_server}) as tunnel:
        results = await asyncio.to_thread(client)
        assert tunnel.stats.streams_total == 1
        await wait_streams_closed(tunnel)
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert results[0][1] == b"hello /one"
    assert results[1][1] == b"".join(f"chunk-{i:02d};".encode() * 100 for i in range(20))
    assert results[3][1] == b"hello /three"


@pytest.mark.asyncio
async def test_websocket_through_tunnel(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with ws_serve(echo, LOOPBACK, 0) as server:
        local = next(iter(server.sockets)).getsockname()[1]
        async with agent.tunnel({listen: local}), ws_connect(f"ws://{LOOPBACK}:{listen}/echo") as ws:
            for message in ["hello", "x" * 100_000]:
                await ws.send(message)
                assert await ws.recv() == message
            binary = os.urandom(500_000)
            await ws.send(binary)
            assert await ws.recv() == binary


@pytest.mark.asyncio
async def test_150_concurrent_connections(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])
    rng = random.Random(150)
    payloads = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(150)]
    async with serve(echo_handler) as local, agent.tunnel({listen: local}) as tunnel:
        results = await asyncio.gather(*(echo_roundtrip(LOOPBACK, listen, p) for p in payloads), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        bad = [i for i, (p, r) in enumerate(zip(payloads, results, strict=True)) if r != p]
        assert bad == []
        assert tunnel.stats.streams_total == 150
        await wait_streams_closed(tunnel)


@pytest.mark.asyncio
async def test_slow_reader_does_not_block_other_streams(start_agent: StartAgent) -> None:
    listen_slow, listen_fast = free_port(), free_port()
    agent = start_agent([listen_slow, listen_fast])
    slow_payload = os.urandom(6 * 1024 * 1024)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(slow_payload)
        await writer.drain()
        writer.close()

    async with (
        serve(source) as slow_local,
        serve(echo_handler) as fast_local,
        agent.tunnel({listen_slow: slow_local, listen_fast: fast_local}),
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, listen_slow, limit=16 * 1024)
        got = bytearray(await reader.read(16 * 1024))
        # The slow stream is now stalled end to end; the fast one must still move 16 MiB.
        started = time.monotonic()
        fast = os.urandom(16 * 1024 * 1024)
        assert await asyncio.wait_for(echo_roundtrip(LOOPBACK, listen_fast, fast), 20) == fast
        fast_seconds = time.monotonic() - started
        assert len(got) < len(slow_payload) // 2, "the slow stream was back-pressured, not buffered whole"
        while chunk := await reader.read(256 * 1024):
            got += chunk
            await asyncio.sleep(0.002)
        writer.close()
    assert sha256(bytes(got)) == sha256(slow_payload)
    assert fast_seconds < 15


# ---------------------------------------------------------------- outbound: local -> cluster


@pytest.mark.asyncio
async def test_outbound_open_stream_and_open_fail(start_agent: StartAgent) -> None:
    agent = start_agent()
    async with serve(echo_handler) as echo_port, agent.tunnel() as tunnel:
        reader, writer = await tunnel.open_stream(LOOPBACK, echo_port)
        payload = os.urandom(5 * 1024 * 1024)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        assert sha256(await reader.read_all()) == sha256(payload)
        await writer.wait_closed()

        reader, writer = await tunnel.open_stream(LOOPBACK, echo_port)
        writer.write(b"line one\nline two\n")
        assert await reader.readline() == b"line one\n"
        assert await reader.readexactly(4) == b"line"
        writer.close()

        closed = free_port()
        with pytest.raises(OpenFailed, match=rf"connect to 127\.0\.0\.1:{closed} failed: Connection refused"):
            await tunnel.open_stream(LOOPBACK, closed)
        with pytest.raises(OpenFailed, match=r"cannot resolve no-such-host\.invalid"):
            await tunnel.open_stream("no-such-host.invalid", 80)


@pytest.mark.asyncio
async def test_serve_outbound_forwards_local_listener(start_agent: StartAgent) -> None:
    agent = start_agent()
    async with serve(echo_handler) as echo_port, agent.tunnel() as tunnel:
        host, port = await tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, echo_port)
        assert host == LOOPBACK and port > 0
        payloads = [os.urandom(1024 * 1024) for _ in range(4)]
        results = await asyncio.gather(*(echo_roundtrip(host, port, p) for p in payloads))
        assert results == payloads
        # A target that refuses: the local connection is closed, not left hanging.
        _, bad_port = await tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, free_port())
        reader, writer = await asyncio.open_connection(LOOPBACK, bad_port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()


# ---------------------------------------------------------------- control requests


@pytest.mark.asyncio
async def test_get_env_hides_bridge_variables(start_agent: StartAgent) -> None:
    agent = start_agent(extra_env={"ORDERS_DB_URL": "postgres://db:5432/orders", "EMPTY": ""})
    async with agent.tunnel() as tunnel:
        env = await tunnel.get_env()
    assert env["ORDERS_DB_URL"] == "postgres://db:5432/orders"
    assert env["EMPTY"] == ""
    assert not [k for k in env if k.startswith("PYTEST_BRIDGE_")]


@pytest.mark.asyncio
async def test_fetch_files_round_trips_a_directory(start_agent: StartAgent, tmp_path: Path) -> None:
    root = tmp_path / "mount"
    (root / "sub").mkdir(parents=True)
    (root / "config.yaml").write_text("a: 1\n")
    (root / "sub" / "blob.bin").write_bytes(blob := os.urandom(300_000))
    # ConfigMap volume layout: data behind ..data, visible names are symlinks.
    (root / "..2024_01_01").mkdir()
    (root / "..2024_01_01" / "key").write_text("value")
    (root / "..data").symlink_to("..2024_01_01")
    (root / "key").symlink_to("..data/key")
    agent = start_agent()
    async with agent.tunnel() as tunnel:
        data = await tunnel.fetch_files(str(root))
        single = await tunnel.fetch_files(str(root / "config.yaml"))
        with pytest.raises(OpenFailed, match="no such file or directory in the pod"):
            await tunnel.fetch_files(str(tmp_path / "missing"))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = sorted(tar.getnames())
        assert names == ["config.yaml", "key", "sub", "sub/blob.bin"]
        member = tar.extractfile("sub/blob.bin")
        assert member is not None and member.read() == blob
        key = tar.extractfile("key")
        assert key is not None and key.read() == b"value"
    with tarfile.open(fileobj=io.BytesIO(single), mode="r:gz") as tar:
        assert tar.getnames() == ["config.yaml"]


# ---------------------------------------------------------------- agent lifecycle


@pytest.mark.asyncio
async def test_status_counts_clients(start_agent: StartAgent) -> None:
    agent = start_agent()
    assert (await asyncio.to_thread(status, agent.status_port))["connected_clients"] == 0
    assert await asyncio.to_thread(status, agent.status_port, "/healthz") == {"ok": True}
    async with agent.tunnel() as first, agent.tunnel() as second:
        assert await first.ping() < 1
        assert await second.ping() < 1
        now = await asyncio.to_thread(status, agent.status_port)
        assert now["connected_clients"] == 2
        assert now["sessions_total"] == 2
        assert now["idle_seconds"] == 0
    await asyncio.sleep(0.2)
    after = await asyncio.to_thread(status, agent.status_port)
    assert after["connected_clients"] == 0
    assert after["sessions_total"] == 2
    assert isinstance(after["idle_seconds"], float) and after["idle_seconds"] > 0


@pytest.mark.asyncio
async def test_reverse_to_a_local_app_that_is_down_is_reset(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])
    async with agent.tunnel({listen: free_port()}):
        reader, writer = await asyncio.open_connection(LOOPBACK, listen)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
    agent.wait_for_log(r"local app not reachable at 127\.0\.0\.1:\d+: Connection refused")


@pytest.mark.asyncio
async def test_listen_without_client_is_refused(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen], extra_env={"PYTEST_BRIDGE_HOLD_SECONDS": "0.2"})
    reader, writer = await asyncio.open_connection(LOOPBACK, listen)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    agent.wait_for_log("no client connected")


@pytest.mark.asyncio
async def test_agent_sigterm_exits_cleanly(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen], extra_env={"PYTEST_BRIDGE_DRAIN_SECONDS": "0.5"})
    async with serve(echo_handler) as local, agent.tunnel({listen: local}, reconnect=False) as tunnel:
        reader, writer = await asyncio.open_connection(LOOPBACK, listen)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"  # one stream left open across the signal
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.proc.wait, 10) == 0
        assert time.monotonic() - started < 5
        agent.wait_for_log("shutdown complete")
        await asyncio.wait_for(tunnel.wait_disconnected(), 5)
        writer.close()


# ---------------------------------------------------------------- transport loss


class Relay:
    """A TCP relay standing in for the port-forward; can drop or freeze its connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.thawed = asyncio.Event()
        self.thawed.set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.lane_options: dict[str, object] = {}
        self.pairs: list[list[asyncio.StreamWriter]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pair = [writer]
        self.pairs.append(pair)  # in accept order
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        pair.append(up_writer)
        self._writers += [writer, up_writer]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.thawed.wait()
                    dst.write(data)
                    await dst.drain()
                if not dst.is_closing():
                    dst.write_eof()  # half-close, as a port-forward does
            except (ConnectionError, OSError):
                dst.close()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the test is over: close below (an idle lane's agent side may never close first)
        finally:
            writer.close()
            up_writer.close()

    def drop_all(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


@pytest_asyncio.fixture
async def relay_agent(start_agent: StartAgent) -> AsyncIterator[tuple[Relay, int, int]]:
    listen = free_port()
    agent = start_agent([listen])
    relay = Relay(agent.control_port)
    async with serve(relay.handle) as relay_port:
        relay.lane_options = agent.lane_options(relay_port)
        yield relay, relay_port, listen


@pytest.mark.asyncio
async def test_reconnect_after_transport_drop(relay_agent: tuple[Relay, int, int]) -> None:
    relay, relay_port, listen = relay_agent
    async with (
        serve(echo_handler) as local,
        Tunnel(tcp_connector(LOOPBACK, relay_port), TOKEN, {listen: local}, **relay.lane_options) as tunnel,  # type: ignore[arg-type]
    ):
        assert await echo_roundtrip(LOOPBACK, listen, b"before") == b"before"
        relay.drop_all()
        await asyncio.wait_for(tunnel.wait_disconnected(), 5)
        await tunnel.wait_connected(10)
        # Reverse traffic resumes; a connection arriving mid-reconnect is held by the agent.
        assert await echo_roundtrip(LOOPBACK, listen, b"after") == b"after"
        assert tunnel.connects == 2
        if not relay.lane_options:
            assert relay.connections == 2


@pytest.mark.asyncio
async def test_a_connection_opening_when_the_tunnel_drops_waits_for_the_reconnect(
    relay_agent: tuple[Relay, int, int],
) -> None:
    """A killed port-forward must not reset connections whose stream had not opened yet."""
    relay, relay_port, _ = relay_agent
    async with (
        serve(echo_handler) as echo_port,
        Tunnel(tcp_connector(LOOPBACK, relay_port), TOKEN, {}, **relay.lane_options) as tunnel,  # type: ignore[arg-type]
    ):
        host, port = await tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, echo_port)
        assert await echo_roundtrip(host, port, b"before") == b"before"
        relay.thawed.clear()  # the OPEN of the next connection gets no answer...
        opening = asyncio.ensure_future(echo_roundtrip(host, port, b"during"))
        await asyncio.sleep(0.3)
        relay.drop_all()  # ...and then the port-forward dies
        relay.thawed.set()
        assert await asyncio.wait_for(opening, 15) == b"during"
        assert tunnel.connects == 2


@pytest.mark.asyncio
async def test_keepalive_detects_dead_transport(relay_agent: tuple[Relay, int, int]) -> None:
    relay, relay_port, _ = relay_agent
    tunnel = Tunnel(
        tcp_connector(LOOPBACK, relay_port),
        TOKEN,
        {},
        keepalive_interval=0.2,
        keepalive_timeout=1.0,
        **relay.lane_options,  # type: ignore[arg-type]
    )
    async with tunnel:
        relay.thawed.clear()  # the port-forward hangs without closing
        await asyncio.wait_for(tunnel.wait_disconnected(), 5)
        assert tunnel.last_error is not None and "keepalive timeout" in tunnel.last_error
        relay.thawed.set()
        relay.drop_all()
        await tunnel.wait_connected(10)
        assert await tunnel.ping() < 1


# ---------------------------------------------------------------- sync facade


def test_background_tunnel_sync_facade(start_agent: StartAgent) -> None:
    agent = start_agent(extra_env={"SERVICE_NAME": "orders"})

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    with socketserver.ThreadingTCPServer((LOOPBACK, 0), Echo) as echo:
        echo.daemon_threads = True
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        # The socket factory stands in for a blocking port-forward client handing out a socket.
        connect = socket_connector(lambda: socket.create_connection((LOOPBACK, agent.control_port)))
        tunnel = BackgroundTunnel(connect, TOKEN, {}, **agent.lane_options())
        tunnel.start()
        try:
            assert tunnel.connected
            assert tunnel.get_env()["SERVICE_NAME"] == "orders"
            assert tunnel.ping() < 1
            host, port = tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, echo.server_address[1])
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"sync hello")
                sock.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := sock.recv(100):
                    received += chunk
            assert received == b"sync hello"
            assert tunnel.stats.bytes_to_agent >= len(b"sync hello")
        finally:
            tunnel.stop()
            echo.shutdown()
    assert not tunnel.connected


def test_canary_burst_passes_only_when_every_connection_reaches_the_agent(start_agent: StartAgent) -> None:
    """The canary behind "the Service routes to the agent": all ``count`` fresh connections must come back.

    Dialling the agent's own listen port stands in for a Service that routes only to the agent;
    another server on the same path (the old pod, still alive) or a dead port must fail it.
    """
    listen = free_port()
    agent = start_agent(listen_ports=[listen])
    with socketserver.ThreadingTCPServer((LOOPBACK, 0), socketserver.BaseRequestHandler) as old_pod:
        old_pod.daemon_threads = True
        threading.Thread(target=old_pod.serve_forever, daemon=True).start()
        tunnel = BackgroundTunnel(
            tcp_connector(LOOPBACK, agent.control_port), TOKEN, {listen: free_port()}, **agent.lane_options()
        )
        tunnel.start()
        try:
            assert tunnel.canary(LOOPBACK, listen, timeout=5, count=16)
            assert tunnel.stats.reverse_total >= 16
            assert not tunnel.canary(LOOPBACK, old_pod.server_address[1], timeout=0.5, count=4)
            assert not tunnel.canary(LOOPBACK, free_port(), timeout=0.5, count=4)
            assert tunnel.canary(LOOPBACK, listen, timeout=5, count=1)  # and nothing stuck in between
        finally:
            tunnel.stop()
            old_pod.shutdown()


# ---------------------------------------------------------------- lanes


async def wait_idle_lanes(agent: AgentProcess, count: int, within: float = 5.0) -> None:
    """Until the agent holds ``count`` idle lanes (in + out) of the tunnel's session."""
    deadline = time.monotonic() + within
    while (idle := status(agent.status_port)["idle_lanes"]) != count:
        assert time.monotonic() < deadline, f"agent holds {idle} idle lanes, expected {count}"
        await asyncio.sleep(0.02)


def lane_frame(obj: dict[str, object]) -> bytes:
    payload = json.dumps(obj).encode()
    return bytes([0x07]) + (0).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("start_agent", ["lanes"], indirect=True)
@pytest.mark.asyncio
async def test_lanes_carry_connections_both_ways_byte_exact(start_agent: StartAgent) -> None:
    listen = free_port()
    agent = start_agent([listen])
    payloads = [os.urandom(n) for n in (1, 65_537, 3 * 1024 * 1024)]
    async with serve(echo_handler) as local, agent.tunnel({listen: local}, lanes=2) as tunnel:
        host, port = await tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, local)
        for payload in payloads:
            # 2 "in" waiting in the agent, 2 "out" waiting for us: used lanes are replaced after
            # a quiet moment (connections in a burst ride streams meanwhile).
            await wait_idle_lanes(agent, 4)
            assert sha256(await echo_roundtrip(LOOPBACK, listen, payload)) == sha256(payload)
            await wait_idle_lanes(agent, 4)
            assert sha256(await echo_roundtrip(host, port, payload)) == sha256(payload)
        assert tunnel.lanes_used == 6
        stats = tunnel.stats
        assert stats.streams_total == 6 and stats.bytes_to_agent == stats.bytes_from_agent == 2 * sum(
            map(len, payloads)
        )
        await wait_streams_closed(tunnel)
        await wait_idle_lanes(agent, 4)  # every used lane was replaced
        assert status(agent.status_port)["bytes_to_clients"] == 2 * sum(map(len, payloads))


@pytest.mark.parametrize("start_agent", ["lanes"], indirect=True)
@pytest.mark.asyncio
async def test_dead_idle_lanes_fall_back_to_streams(relay_agent: tuple[Relay, int, int]) -> None:
    """Lanes that die while idle (the transport dropped them, not the tunnel) cost nothing but a retry."""
    relay, relay_port, listen = relay_agent
    async with (
        serve(echo_handler) as local,
        Tunnel(tcp_connector(LOOPBACK, relay_port), TOKEN, {listen: local}, lanes=2, **relay.lane_options) as tunnel,  # type: ignore[arg-type]
    ):
        async with asyncio.timeout(5):
            while relay.connections < 5:  # noqa: ASYNC110 - the control connection, then 2 + 2 lanes
                await asyncio.sleep(0.02)
        for pair in relay.pairs[1:]:  # every lane, not the multiplexed connection
            for writer in pair:
                writer.transport.abort()
        for _ in range(3):
            assert await echo_roundtrip(LOOPBACK, listen, b"reverse") == b"reverse"
        host, port = await tunnel.serve_outbound(LOOPBACK, 0, LOOPBACK, local)
        for _ in range(3):
            assert await echo_roundtrip(host, port, b"outbound") == b"outbound"
        assert tunnel.connects == 1  # the multiplexed connection never noticed


@pytest.mark.parametrize("start_agent", ["lanes"], indirect=True)
@pytest.mark.asyncio
async def test_lane_with_wrong_token_or_unknown_session_is_refused(start_agent: StartAgent) -> None:
    agent = start_agent()
    async with agent.tunnel() as tunnel:
        session = tunnel.agent_info["session"]
        hello = {"protocol": "pytest-bridge", "version": 1, "token": TOKEN, "session": session, "role": "in"}
        for bad, reason in (
            ({"token": "nope"}, b"wrong session token"),
            ({"session": "session-999"}, b"no session 'session-999'"),
            ({"role": "sideways"}, b"unknown lane role"),
        ):
            reader, writer = await asyncio.open_connection(LOOPBACK, agent.control_port)
            writer.write(lane_frame({**hello, **bad}))
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer[0] == 0x03 and reason in answer  # ERROR, then closed
            writer.close()
        assert tunnel.connected


@pytest.mark.parametrize("start_agent", ["lanes"], indirect=True)
@pytest.mark.asyncio
async def test_lanes_in_use_are_capped_and_replaced_when_they_finish(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pytest_bridge.transport.tunnel.MAX_ACTIVE_LANES", 1)
    listen = free_port()
    agent = start_agent([listen])
    async with serve(echo_handler) as local, agent.tunnel({listen: local}, lanes=1) as tunnel:
        await wait_idle_lanes(agent, 2)
        reader, writer = await asyncio.open_connection(LOOPBACK, listen)  # a long-lived connection: the lane
        writer.write(b"held")
        assert await reader.readexactly(4) == b"held"
        await asyncio.sleep(0.3)  # well past the refill lull: only the cap holds the "in" lane back
        assert status(agent.status_port)["idle_lanes"] == 1  # the "out" lane; no new "in" lane
        assert await echo_roundtrip(LOOPBACK, listen, b"beside it") == b"beside it"  # as a stream
        assert tunnel.lanes_used == 1 and tunnel.lanes_active == 1
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await wait_idle_lanes(agent, 2)  # the finished lane made room: replaced
        assert tunnel.lanes_active == 0
