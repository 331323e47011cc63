"""The in-cluster agent: runs in the bridged container's place and serves the tunnel client.

- control port: token-authenticated multiplexed connections from the local tunnel client, and
  the lanes of a connected client (one plain connection per bridged connection, ``lanes.py``);
- listen ports (the Service's target ports): each accepted connection goes to the most recently
  connected client, on one of its idle lanes or else as a stream (cluster -> local);
- streams opened by the client: outbound TCP in-cluster, the container's env, files as tar.gz;
- status port: ``GET /status`` (JSON) and ``GET /healthz`` for the restore guard and readiness.

Stdlib only, asyncio; must not write anywhere but stderr (logs) and sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import socket
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .lanes import SocketServer, abort_socket, dial, open_on_lane, recv_frame, relay, send_frame
from .mux import ConnectionLost, Mux, MuxStats, MuxStream
from .pipes import abort, connection_handler, os_error_detail, pipe
from .runtime import running_code
from .wire import (
    DEFAULT_WINDOW,
    MAX_HANDSHAKE_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameType,
    ProtocolError,
    decode_json,
    encode_json_frame,
)

__all__ = ["Agent", "AgentConfig", "agent_env", "tar_path", "token_digest"]

_CODE = running_code()
log = logging.getLogger("pytest_bridge_agent")

ENV_PREFIX = "PYTEST_BRIDGE_"
LISTEN_BACKLOG = 4096  # listen(2) backlog for the service ports: connect bursts queue instead of failing
MAX_IDLE_LANES = 64  # idle "in" lanes kept per session; older ones are closed beyond this


@dataclass
class AgentConfig:
    # The clients' secret, or only its SHA-256 (hex): what the cluster stores, so that reading the
    # pod spec does not let anyone else take over the session's traffic.
    token: str = ""
    token_sha256: str = ""
    control_port: int = 47100
    status_port: int = 47101
    listen_ports: list[int] = field(default_factory=list)
    bind_host: str = "0.0.0.0"  # the service ports and the status port (the guard and the kubelet ask it)
    # The control port (tunnel and lanes) is reached only through port-forward, which connects to
    # the pod's loopback: nobody in the cluster can reach it over the network.
    control_host: str = "127.0.0.1"
    window: int = DEFAULT_WINDOW
    handshake_timeout: float = 5.0
    max_pending_handshakes: int = 32  # connections not yet authenticated; more are closed at once
    connect_timeout: float = 10.0
    open_timeout: float = 15.0
    # How long a connection arriving on a listen port waits for a client (e.g. during a reconnect)
    # before it is refused by closing it.
    hold_seconds: float = 5.0
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    stream_idle_timeout: float = 3600.0
    drain_seconds: float = 10.0
    max_window: int = 8 * 1024 * 1024  # receive windows may grow to this while drained...
    window_budget: int = 32 * 1024 * 1024  # ...by at most this much per client in total
    exit_when_idle: float = 0.0  # seconds without a client before the process exits (0: never)


def token_digest(config: AgentConfig) -> bytes:
    """The SHA-256 clients' tokens must hash to; ValueError when the config has neither form."""
    if config.token_sha256:
        digest = bytes.fromhex(config.token_sha256)
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("the token's SHA-256 must be 64 hex digits")
        return digest
    if config.token:
        return hashlib.sha256(config.token.encode()).digest()
    raise ValueError("a token (or its SHA-256) is required")


@dataclass
class _SessionLanes:
    """The lanes of one client session: idle "in" lanes, and "out" lanes waiting for a request."""

    idle_in: deque[socket.socket] = field(default_factory=deque)
    waiting_out: set[asyncio.Task[Any]] = field(default_factory=set)

    def close(self) -> None:
        while self.idle_in:
            self.idle_in.popleft().close()
        for task in self.waiting_out:
            task.cancel()


def agent_env() -> dict[str, str]:
    """The container's environment as the bridged service would see it (our own knobs removed)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def _skip_atomic_writer(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # ConfigMap/Secret/projected volumes keep their data in "..<timestamp>" dirs behind a "..data"
    # symlink; with dereference=True the visible names already carry the content.
    if any(part.startswith("..") and part != ".." for part in info.name.split("/")):
        return None
    return info


def tar_path(path: str) -> bytes:
    """tar.gz of a file or directory (symlinks followed). A directory's entries are relative."""
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", dereference=True) as tar:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                tar.add(os.path.join(path, name), arcname=name, filter=_skip_atomic_writer)
        else:
            tar.add(path, arcname=os.path.basename(path))
    return buffer.getvalue()


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._token_digest = token_digest(config)
        self._pending_handshakes = 0
        self.stats = MuxStats()
        self._sessions: list[Mux] = []
        self._session_ids = 0
        self.sessions_total = 0
        self._idle_since = time.monotonic()
        self._client_available = asyncio.Event()
        self._servers: list[SocketServer] = []
        self._lanes: dict[str, _SessionLanes] = {}
        self._status_server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self.control_address: tuple[str, int] | None = None
        self.status_address: tuple[str, int] | None = None

    # ---- lifecycle ----
    async def start(self) -> None:
        cfg = self.config
        control = await SocketServer.start(self._on_control, cfg.control_host, cfg.control_port)
        self._servers.append(control)
        self.control_address = control.address
        for port in cfg.listen_ports:
            server = await SocketServer.start(
                functools.partial(self._on_listen, port), cfg.bind_host, port, backlog=LISTEN_BACKLOG
            )
            self._servers.append(server)
        self._status_server = await asyncio.start_server(
            connection_handler(self._on_status), cfg.bind_host, cfg.status_port
        )
        self.status_address = self._status_server.sockets[0].getsockname()[:2]
        log.info(
            "ready control=%s:%d status=%s:%d listen=%s",
            *self.control_address,
            *self.status_address,
            ",".join(map(str, cfg.listen_ports)) or "-",
        )

    async def shutdown(self) -> None:
        """Stop accepting, let open streams drain (bounded), then close everything."""
        for server in self._servers:
            server.close()
        for mux in self._sessions:
            mux.send_goaway("agent shutting down")
        for lanes in self._lanes.values():
            lanes.close()
        if self._pipes:
            log.info("shutdown: draining %d open stream(s) for up to %gs", len(self._pipes), self.config.drain_seconds)
            _, pending = await asyncio.wait(set(self._pipes), timeout=self.config.drain_seconds)
            for task in pending:
                task.cancel()
            if pending:
                log.info("shutdown: aborted %d stream(s) still open", len(pending))
                await asyncio.wait(pending, timeout=2)
        if self._sessions:
            await asyncio.wait([asyncio.create_task(mux.aclose("agent shut down")) for mux in self._sessions])
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=2)
        if self._status_server is not None:
            self._status_server.close()
        log.info("shutdown complete (sessions_total=%d)", self.sessions_total)

    def _track(self, tasks: set[asyncio.Task[Any]]) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # ---- control connections and lanes ----
    async def _on_control(self, sock: socket.socket) -> None:
        self._track(self._connections)
        peer = _sock_peer(sock)
        if self._pending_handshakes >= self.config.max_pending_handshakes:
            log.warning(
                "control %s: refused: %d connections already wait to authenticate", peer, self._pending_handshakes
            )
            abort_socket(sock)
            return
        first: Frame | Exception
        self._pending_handshakes += 1
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                first = await recv_frame(sock, MAX_HANDSHAKE_PAYLOAD)
        except asyncio.CancelledError:
            abort_socket(sock)
            raise
        except (TimeoutError, asyncio.IncompleteReadError, ProtocolError, OSError) as e:
            first = e
        finally:
            self._pending_handshakes -= 1
        if isinstance(first, Frame) and first.type is FrameType.LANE:
            await self._on_lane(sock, first, peer)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
        except OSError:
            abort_socket(sock)
            return
        await connection_handler(functools.partial(self._on_session, first, peer))(reader, writer)

    async def _on_session(
        self, first: Frame | Exception, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._session_ids += 1
        name = f"session-{self._session_ids}"
        # Registered before HELLO_OK: the client opens lanes as soon as it has the answer.
        lanes = self._lanes[name] = _SessionLanes()
        try:
            try:
                hello = await self._handshake(first, reader, writer, peer, name)
            except Exception as e:
                log.info("control %s: refused: %s", peer, e)
                abort(writer)
                return
            if hello is None:
                return
            await self._run_session(name, hello, peer, reader, writer)
        finally:
            del self._lanes[name]
            lanes.close()

    async def _run_session(
        self, name: str, hello: dict[str, Any], peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        mux = Mux(
            reader,
            writer,
            is_client=False,
            peer_window=int(hello["window"]),
            window=self.config.window,
            on_open=self._on_stream,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_timeout=self.config.keepalive_timeout,
            stats=self.stats,
            name=name,
            # Local -> cluster: streams whose in-cluster peer keeps reading grow their window up
            # to 8 MiB, within a 32 MiB budget per client (bounded memory in the pod).
            max_window=self.config.max_window,
            window_budget=self.config.window_budget,
        )
        self._sessions.append(mux)
        self.sessions_total += 1
        self._client_available.set()
        log.info("%s: client %s connected (%s)", name, peer, hello.get("client", "?"))
        try:
            await mux.start()
        finally:
            self._sessions.remove(mux)
            if not self._sessions:
                self._client_available.clear()
                self._idle_since = time.monotonic()
            log.info("%s: client %s disconnected: %s", name, peer, mux.close_reason)

    def _credentials_problem(self, hello: dict[str, Any], what: str) -> str | None:
        """Why a HELLO or LANE may not proceed (None: it may)."""
        if hello.get("protocol") != "pytest-bridge":
            return f"not a pytest-bridge {what}"
        if hello.get("version") != PROTOCOL_VERSION:
            return f"protocol version mismatch: agent speaks {PROTOCOL_VERSION}, client sent {hello.get('version')}"
        token = hello.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), self._token_digest
        ):
            return "authentication failed: wrong session token"
        return None

    async def _handshake(
        self,
        first: Frame | Exception,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        name: str,
    ) -> dict[str, Any] | None:
        async def refuse(reason: str) -> None:
            log.warning("control %s: refused: %s", peer, reason)
            writer.write(encode_json_frame(FrameType.ERROR, 0, {"reason": reason}))
            # Then FIN, and read what the peer still sends until it closes: closing with unread
            # bytes would reset the connection and could destroy the ERROR before it is read.
            with contextlib.suppress(OSError, TimeoutError, asyncio.LimitOverrunError):
                async with asyncio.timeout(2):
                    await writer.drain()
                    writer.write_eof()
                    while await reader.read(65536):
                        pass
            writer.close()

        if isinstance(first, TimeoutError):
            await refuse("no HELLO within the handshake timeout")
            return None
        if isinstance(first, asyncio.IncompleteReadError):
            log.info("control %s: closed before HELLO", peer)
            writer.close()
            return None
        if isinstance(first, ProtocolError):
            await refuse(f"not a pytest-bridge HELLO: {first}")
            return None
        if isinstance(first, Exception):
            raise first
        if first.type is not FrameType.HELLO:
            await refuse(f"not a pytest-bridge HELLO: got {first.type.name} first")
            return None
        try:
            hello = decode_json(first.payload)
        except ProtocolError as e:
            await refuse(f"not a pytest-bridge HELLO: {e}")
            return None
        problem = self._credentials_problem(hello, "HELLO")
        if problem:
            await refuse(problem)
            return None
        window = hello.get("window")
        if not isinstance(window, int) or not 0 < window <= 2**31 - 1:
            await refuse(f"invalid window {window!r}")
            return None
        writer.write(
            encode_json_frame(
                FrameType.HELLO_OK,
                0,
                {
                    "version": PROTOCOL_VERSION,
                    "window": self.config.window,
                    "listen_ports": self.config.listen_ports,
                    "agent": "pytest-bridge-agent",
                    "pid": os.getpid(),
                    "session": name,
                    "lanes": True,
                    # Which code runs here: the plugin names a mismatch (a prebuilt image of
                    # another version) instead of failing later in some protocol detail.
                    "code_version": _CODE[0],
                    "code": _CODE[1],
                },
            )
        )
        await writer.drain()
        return hello

    async def _on_lane(self, sock: socket.socket, first: Frame, peer: str) -> None:
        problem: str | None
        try:
            hello = decode_json(first.payload)
        except ProtocolError as e:
            hello, problem = {}, f"malformed LANE: {e}"
        else:
            problem = self._credentials_problem(hello, "LANE")
        lanes = self._lanes.get(str(hello.get("session")))
        role = hello.get("role")
        if problem is None and lanes is None:
            problem = f"no session {hello.get('session')!r} (it ended)"
        if problem is None and role not in ("in", "out"):
            problem = f"unknown lane role {role!r}"
        if problem is not None or lanes is None:
            log.info("lane %s: refused: %s", peer, problem)
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await send_frame(sock, FrameType.ERROR, {"reason": problem}, stream_id=0)
            sock.close()
            return
        if role == "in":
            lanes.idle_in.append(sock)
            while len(lanes.idle_in) > MAX_IDLE_LANES:
                lanes.idle_in.popleft().close()
            return
        await self._serve_out_lane(sock, lanes)

    async def _serve_out_lane(self, sock: socket.socket, lanes: _SessionLanes) -> None:
        """An "out" lane: wait (idle) for the client's OPEN, dial, answer, relay."""
        task = asyncio.current_task()
        assert task is not None
        lanes.waiting_out.add(task)
        try:
            frame = await recv_frame(sock, MAX_HANDSHAKE_PAYLOAD)
            request = decode_json(frame.payload) if frame.type is FrameType.OPEN else {}
        except (asyncio.IncompleteReadError, OSError, ProtocolError, asyncio.CancelledError):
            sock.close()  # the client closed it, or its session ended while it was idle
            return
        finally:
            lanes.waiting_out.discard(task)
        host, port = request.get("host"), request.get("port")
        if (
            request.get("kind") != "tcp"
            or not isinstance(host, str)
            or not isinstance(port, int)
            or not 0 < port < 65536
        ):
            await self._answer_lane(sock, f"invalid request on an out lane: {request!r}")
            return
        target = f"{host}:{port}"
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                upstream = await dial(host, port)
        except (OSError, TimeoutError) as e:
            reason = _dial_failure(target, e, self.config.connect_timeout)
            log.info("outbound lane: %s", reason)
            await self._answer_lane(sock, reason)
            return
        if not await self._answer_lane(sock, None):
            upstream.close()
            return
        await self._relay(upstream, sock, f"outbound lane -> {target}")

    async def _answer_lane(self, sock: socket.socket, reason: str | None) -> bool:
        try:
            if reason is None:
                await send_frame(sock, FrameType.OPEN_OK, {})
                return True
            await send_frame(sock, FrameType.OPEN_FAIL, {"reason": reason})
        except OSError:
            pass
        sock.close()
        return False

    async def _relay(self, near: socket.socket, lane: socket.socket, what: str) -> None:
        self._track(self._pipes)
        result = await relay(near, lane, stats=self.stats, idle_timeout=self.config.stream_idle_timeout)
        if result.error:
            log.info("%s: aborted after %d/%d bytes: %s", what, result.bytes_ab, result.bytes_ba, result.error)

    # ---- streams opened by a client ----
    async def _on_stream(self, stream: MuxStream) -> None:
        kind = stream.request.get("kind")
        if kind == "tcp":
            await self._open_tcp(stream)
        elif kind == "env":
            stream.accept()
            stream.write(json.dumps(agent_env()).encode())
            stream.write_eof()
            await stream.wait_closed()
        elif kind == "files":
            await self._send_files(stream)
        else:
            stream.reject(f"unknown stream kind {kind!r}")

    async def _open_tcp(self, stream: MuxStream) -> None:
        host, port = stream.request.get("host"), stream.request.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            stream.reject(f"invalid target {host!r}:{port!r}")
            return
        target = f"{host}:{port}"
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as e:
            reason = _dial_failure(target, e, self.config.connect_timeout)
            log.info("outbound stream %d: %s", stream.id, reason)
            stream.reject(reason)
            return
        stream.accept()
        await self._pipe(stream, reader, writer, f"outbound stream {stream.id} -> {target}")

    async def _send_files(self, stream: MuxStream) -> None:
        path = stream.request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            stream.reject(f"path must be absolute, got {path!r}")
            return
        try:
            data = await asyncio.to_thread(tar_path, path)
        except FileNotFoundError:
            stream.reject(f"no such file or directory in the pod: {path}")
            return
        except OSError as e:
            stream.reject(f"cannot read {path} in the pod: {e}")
            return
        log.info("files stream %d: %s (%d bytes tar.gz)", stream.id, path, len(data))
        stream.accept({"size": len(data)})
        stream.write(data)
        stream.write_eof()
        await stream.wait_closed()

    async def _pipe(
        self, stream: MuxStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, what: str
    ) -> None:
        self._track(self._pipes)
        result = await pipe(stream, reader, writer, idle_timeout=self.config.stream_idle_timeout)
        if result.error:
            log.info("%s: aborted after %d/%d bytes: %s", what, result.bytes_in, result.bytes_out, result.error)
        else:
            log.debug("%s: done, %d bytes in, %d bytes out", what, result.bytes_in, result.bytes_out)

    # ---- cluster -> local ----
    def _current_session(self) -> Mux | None:
        for mux in reversed(self._sessions):
            if mux.accepting:
                return mux
        return None

    async def _next_session(self, deadline: float) -> Mux | None:
        """The client's session once it is connected again (until ``deadline``), or None."""
        loop = asyncio.get_running_loop()
        while (mux := self._current_session()) is None:
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.05)
        return mux

    async def _on_listen(self, port: int, sock: socket.socket) -> None:
        self._track(self._connections)
        peer = _sock_peer(sock)
        try:
            mux = self._current_session()
            if mux is None and self.config.hold_seconds > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.hold_seconds):
                        while (mux := self._current_session()) is None:
                            await self._client_available.wait()
                            await asyncio.sleep(0.05)  # a client going away still sets the event
            if mux is None:
                log.info("listen :%d: refused %s: no client connected", port, peer)
                abort_socket(sock)
                return
            lanes = self._lanes.get(mux.name)
            while lanes is not None and lanes.idle_in:
                lane = lanes.idle_in.popleft()
                request = {"kind": "reverse", "port": port, "peer": peer}
                answer = await open_on_lane(lane, request, self.config.open_timeout)
                if answer is None:
                    await self._relay(sock, lane, f"reverse lane :{port} from {peer}")
                    return
                if answer:  # the client refused (local app not reachable): as with a stream
                    log.info("listen :%d: refused %s: %s", port, peer, answer)
                    abort_socket(sock)
                    return
                # "": the lane died while idle; try the next one, then a stream
        except asyncio.CancelledError:
            abort_socket(sock)
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        await connection_handler(functools.partial(self._reverse_stream, mux, port, peer))(reader, writer)

    async def _reverse_stream(
        self, mux: Mux, port: int, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = {"kind": "reverse", "port": port, "peer": peer}
        deadline = asyncio.get_running_loop().time() + self.config.hold_seconds
        while True:
            try:
                stream = await mux.open(request, self.config.open_timeout)
                break
            except ConnectionLost as e:
                # The client's tunnel went down before the stream opened (nothing was sent yet):
                # hold the connection for its reconnect, as for a connection that finds no client.
                successor = await self._next_session(deadline)
                if successor is None:
                    log.info("listen :%d: refused %s: %s", port, peer, e)
                    abort(writer)
                    return
                mux = successor
            except ConnectionError as e:
                log.info("listen :%d: refused %s: %s", port, peer, e)
                abort(writer)
                return
        await self._pipe(stream, reader, writer, f"reverse stream {stream.id} :{port} from {peer}")

    # ---- status ----
    def status(self) -> dict[str, object]:
        connected = len(self._sessions)
        return {
            "connected_clients": connected,
            "idle_seconds": 0.0 if connected else round(time.monotonic() - self._idle_since, 3),
            "sessions_total": self.sessions_total,
            "streams_open": self.stats.streams_open,
            "streams_total": self.stats.streams_total,
            "bytes_to_clients": self.stats.bytes_sent,
            "bytes_from_clients": self.stats.bytes_received,
            "idle_lanes": sum(len(lanes.idle_in) + len(lanes.waiting_out) for lanes in self._lanes.values()),
            "listen_ports": self.config.listen_ports,
        }

    async def _on_status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, target, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            body: dict[str, object]
            if method != "GET":
                code, body = "405 Method Not Allowed", {"error": "GET only"}
            elif target == "/status":
                code, body = "200 OK", self.status()
            elif target == "/healthz":
                code, body = "200 OK", {"ok": True}
            else:
                code, body = "404 Not Found", {"error": "try /status or /healthz"}
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def _dial_failure(target: str, error: OSError | TimeoutError, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"connect to {target} timed out after {timeout:g}s"
    if isinstance(error, socket.gaierror):
        return f"connect to {target} failed: cannot resolve {target.rsplit(':', 1)[0]}: {error.strerror}"
    return f"connect to {target} failed: {os_error_detail(error)}"


def _sock_peer(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
