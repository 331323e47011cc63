"""Local side of the tunnel (asyncio): one multiplexed, authenticated connection to the agent.

Serves reverse streams (cluster -> local app), opens outbound streams (local -> cluster), asks the
agent for its env and files, and reconnects with backoff when the transport drops. The transport
itself (API-server port-forward, plain TCP in tests) comes from a ``connect`` factory; this module
does no Kubernetes calls and must stay usable without pytest.

When the transport can also open plain connections cheaply (``lane_connect``: kubectl
port-forward, loopback in tests), bridged connections ride their own connection -- a lane --
instead of a stream of the multiplexed one (``pytest_bridge_agent.lanes``): a few idle lanes of
each direction are kept open, and a connection falls back to a stream when none is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_bridge_agent.lanes import (
    LANE_POOL,
    RelayResult,
    SocketServer,
    abort_socket,
    open_on_lane,
    recv_frame,
    relay,
    send_frame,
    tcp_socket,
)
from pytest_bridge_agent.mux import ConnectionLost, Mux, MuxStats, MuxStream, OpenFailed, StreamReset
from pytest_bridge_agent.pipes import abort, connection_handler, os_error_detail, pipe
from pytest_bridge_agent.wire import (
    DEFAULT_WINDOW,
    MAX_HANDSHAKE_PAYLOAD,
    PROTOCOL_VERSION,
    FrameType,
    ProtocolError,
    decode_json,
    encode_json_frame,
    read_frame,
)

from pytest_bridge.core.errors import ConnectError

__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "Connector",
    "LaneRelay",
    "MuxStream",
    "OpenFailed",
    "SocketConnector",
    "StreamReset",
    "Tunnel",
    "TunnelError",
    "TunnelStats",
    "socket_connector",
    "tcp_connector",
    "tcp_socket_connector",
]

log = logging.getLogger(__name__)

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
# A connected, non-blocking socket to the agent's control port (for lanes).
SocketConnector = Callable[[], Awaitable[socket.socket]]


class LaneRelay(Protocol):
    """What relays one lane: :func:`pytest_bridge_agent.lanes.relay` (:attr:`Tunnel.lane_relay`)."""

    async def __call__(
        self, a: socket.socket, b: socket.socket, *, stats: MuxStats | None = None, idle_timeout: float | None = None
    ) -> RelayResult: ...


# StreamReader buffer for the transport: big enough that a 64 KiB frame never waits on a pause.
TRANSPORT_READ_LIMIT = 1024 * 1024
# Cluster -> local: a stream whose local reader keeps up may grow its receive window from
# DEFAULT_WINDOW to MAX_STREAM_WINDOW (fewer credit round trips over the port-forward);
# all streams together may grow by at most WINDOW_GROWTH_BUDGET, so stalled readers cannot
# pin more than streams x DEFAULT_WINDOW + the budget in this process.
MAX_STREAM_WINDOW = 8 * 1024 * 1024
WINDOW_GROWTH_BUDGET = 64 * 1024 * 1024
LISTEN_BACKLOG = 4096  # listen(2) backlog of the outbound listeners (connect bursts queue, not fail)
# A used lane is replaced only once no new connection (lane or stream) has come for this long.
# Opening a lane costs a new port-forward stream (kubectl, API server, kubelet, container
# runtime), which during a burst of short connections competes with the connections themselves
# on a small machine, while a stream of the multiplexed connection costs nothing to open. So a
# burst rides streams once the idle lanes are taken, and the lanes -- which pay off for bulk
# transfers -- are back for the first connections after a pause.
LANE_REFILL_QUIET = 0.05
# Lanes in use at once, at most; beyond, used lanes are not replaced (new connections ride
# streams) until some finish, which bounds relay buffers here and in the agent.
MAX_ACTIVE_LANES = 64


class TunnelError(ConnectError):
    """The tunnel cannot do what was asked (not connected, handshake failed, ...)."""


class TunnelTimeoutError(TunnelError, TimeoutError):
    """A tunnel operation did not finish in time (the agent or the port-forward does not answer)."""


class AuthenticationError(TunnelError):
    """The agent refused the handshake (wrong token, version mismatch); retrying will not help."""


@dataclass(frozen=True)
class TunnelStats:
    bytes_to_agent: int
    bytes_from_agent: int
    streams_open: int
    streams_total: int
    connected: bool
    connects: int
    reverse_total: int = 0  # reverse streams the agent has offered (cluster -> local)
    lanes_used: int = 0  # connections (of streams_total) carried on a lane of their own


def tcp_connector(host: str, port: int) -> Connector:
    """A connector for a plain TCP endpoint (tests, ``kubectl port-forward``)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port, limit=TRANSPORT_READ_LIMIT)

    return connect


def tcp_socket_connector(host: str, port: int) -> SocketConnector:
    async def connect() -> socket.socket:
        sock = tcp_socket(host)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def socket_connector(make_socket: Callable[[], socket.socket]) -> Connector:
    """A connector for blocking transports that hand out a connected socket.

    ``make_socket`` runs in a worker thread (it may block, e.g. while a port-forward websocket is set
    up) and must return a real, connected ``socket.socket`` (for instance one end of a socketpair
    pumped by a thread); the tunnel takes ownership of it.
    """

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await asyncio.to_thread(make_socket)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock, limit=TRANSPORT_READ_LIMIT)

    return connect


class Tunnel:
    """Client of one agent. ``reverse_ports`` maps the agent's target ports to local ports."""

    def __init__(
        self,
        connect: Connector,
        token: str,
        reverse_ports: Mapping[int, int] | None = None,
        *,
        local_host: str = "127.0.0.1",
        window: int = DEFAULT_WINDOW,
        connect_timeout: float = 15.0,
        open_timeout: float = 15.0,
        keepalive_interval: float | None = 10.0,
        keepalive_timeout: float = 30.0,
        stream_idle_timeout: float | None = 3600.0,
        reconnect: bool = True,
        reconnect_max_delay: float = 2.0,
        lane_connect: SocketConnector | None = None,
        lanes: int = LANE_POOL,
    ) -> None:
        self._connect = connect
        self._token = token
        self.reverse_ports = dict(reverse_ports or {})
        self.reverse_total = 0
        self.probing = 0  # canaries in flight (BackgroundTunnel.canary): their refusals are expected
        self.local_host = local_host
        self._window = window
        self._connect_timeout = connect_timeout
        self._open_timeout = open_timeout
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._stream_idle_timeout = stream_idle_timeout
        self._reconnect = reconnect
        self._reconnect_max_delay = reconnect_max_delay
        self._stats = MuxStats()
        self._mux: Mux | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._servers: list[SocketServer] = []
        self._lane_connect = lane_connect if lanes > 0 else None
        self._lane_pool = lanes
        self._lane_session: str | None = None
        self._lane_tasks: set[asyncio.Task[Any]] = set()
        self._out_lanes: list[socket.socket] = []
        self._out_lanes_wanted = asyncio.Event()
        self.lanes_used = 0  # connections carried on a lane (the rest went as streams)
        self._connection_at = 0.0  # loop time of the last new bridged connection, either way
        self.lanes_active = 0  # lanes taken for a connection and not finished yet
        self._lane_finished = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connects = 0
        self.agent_info: dict[str, Any] = {}
        self.last_error: str | None = None
        self.down_since: float | None = None  # time.monotonic() when the connection was lost
        # Relays one lane (``lanes.relay``); a caller may swap it, e.g. the benchmarks' levers
        # (bench/experiments.py). Read at each lane, in the tunnel's thread.
        self.lane_relay: LaneRelay = relay

    # ---- lifecycle ----
    async def start(self) -> None:
        """Connect and authenticate; raises on failure (no retry for the first connection)."""
        self._mux = await self._open_mux()
        self._supervisor = asyncio.create_task(self._supervise(), name="pytest-bridge-tunnel-supervisor")

    async def close(self, grace: float = 1.0) -> None:
        """Stop listening and close the connection, giving the agent ``grace`` seconds to agree."""
        self._closing = True
        for server in self._servers:
            server.close()
        self._stop_lanes()
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._mux is not None:
            await self._mux.aclose("tunnel closed by the client", grace=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._connected.clear()

    async def __aenter__(self) -> Tunnel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stats(self) -> TunnelStats:
        s = self._stats
        return TunnelStats(
            bytes_to_agent=s.bytes_sent,
            bytes_from_agent=s.bytes_received,
            streams_open=s.streams_open,
            streams_total=s.streams_total,
            connected=self.connected,
            connects=self.connects,
            reverse_total=self.reverse_total,
            lanes_used=self.lanes_used,
        )

    async def wait_connected(self, max_wait: float | None = None) -> Mux:
        async with asyncio.timeout(max_wait):
            while True:
                await self._connected.wait()
                mux = self._mux
                if mux is not None and mux.accepting:
                    return mux
                await asyncio.sleep(0.05)

    async def wait_disconnected(self) -> None:
        """Until the current connection is lost (for tests and reporting)."""
        mux = self._mux
        if mux is not None:
            await mux.wait_closed()

    # ---- requests ----
    async def open_stream(self, host: str, port: int) -> tuple[MuxStream, MuxStream]:
        """A TCP connection to host:port dialled by the agent in-cluster, as (reader, writer)."""
        stream = await self._open({"kind": "tcp", "host": host, "port": port})
        return stream, stream

    async def get_env(self) -> dict[str, str]:
        """The agent container's environment (without PYTEST_BRIDGE_* variables)."""
        stream = await self._open({"kind": "env"})
        stream.write_eof()  # the request is complete; lets the stream finish on both sides
        env = json.loads(await stream.read_all())
        if not isinstance(env, dict):
            raise TunnelError("agent sent a malformed environment")
        return {str(k): str(v) for k, v in env.items()}

    async def fetch_files(self, path: str) -> bytes:
        """A file or directory inside the pod, as tar.gz bytes (directory entries are relative)."""
        stream = await self._open({"kind": "files", "path": path})
        stream.write_eof()
        return await stream.read_all()

    async def ping(self) -> float:
        """Round-trip time to the agent in seconds (TimeoutError after the open timeout)."""
        mux = await self.wait_connected(self._connect_timeout)
        async with asyncio.timeout(self._open_timeout):
            return await mux.ping()

    async def serve_outbound(
        self, bind_host: str, bind_port: int, remote_host: str, remote_port: int
    ) -> tuple[str, int]:
        """Listen locally; every accepted connection is forwarded to remote_host:remote_port in-cluster."""
        target = f"{remote_host}:{remote_port}"

        async def handle(sock: socket.socket) -> None:
            self._track()
            self._connection_at = asyncio.get_running_loop().time()
            try:
                while lane := self._take_out_lane():
                    try:
                        request = {"kind": "tcp", "host": remote_host, "port": remote_port}
                        answer = await open_on_lane(lane, request, self._open_timeout)
                        if answer is None:
                            result = await self._relay_lane(sock, lane)
                            if result.error:
                                log.info("outbound %s lane aborted: %s", target, result.error)
                            return
                        if answer:
                            log.warning("outbound %s: %s", target, answer)
                            abort_socket(sock)
                            return
                        log.debug("outbound %s: an idle lane had died, trying another", target)
                    finally:
                        self._lane_released()
            except asyncio.CancelledError:
                abort_socket(sock)
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
            await connection_handler(functools.partial(outbound_stream, target))(reader, writer)

        async def outbound_stream(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._connect_timeout
            while True:
                try:
                    stream = await self._open({"kind": "tcp", "host": remote_host, "port": remote_port})
                    break
                except ConnectionLost as e:
                    # The tunnel went down before the stream opened: none of the client's bytes left
                    # this machine, so the connection waits for the reconnect instead of being reset
                    # (a killed kubectl port-forward reset connections that were only opening).
                    if loop.time() >= deadline:
                        log.warning("outbound %s: %s", target, e)
                        abort(writer)
                        return
                    log.info("outbound %s: the tunnel was lost while opening (%s); opening again", target, e)
                except (OpenFailed, ConnectionError, TimeoutError, TunnelError) as e:
                    log.warning("outbound %s: %s", target, e)
                    abort(writer)
                    return
            result = await pipe(stream, reader, writer, idle_timeout=self._stream_idle_timeout)
            if result.error:
                log.info("outbound %s stream %d aborted: %s", target, stream.id, result.error)

        # A deep backlog: bursts of connects (a pool opening hundreds) must queue, not be refused.
        server = await SocketServer.start(handle, bind_host, bind_port, backlog=LISTEN_BACKLOG)
        self._servers.append(server)
        host, port = server.address
        log.info("outbound %s:%d -> %s", host, port, target)
        return host, port

    async def _open(self, request: dict[str, Any]) -> MuxStream:
        mux = await self.wait_connected(self._connect_timeout)
        return await mux.open(request, self._open_timeout)

    # ---- lanes ----
    def _start_lanes(self, session: str) -> None:
        self._stop_lanes()
        if self._lane_connect is None:
            return
        self._lane_session = session
        self._out_lanes_wanted.set()
        for i in range(self._lane_pool):
            self._spawn_lane_task(self._in_lane_worker(session), f"pytest-bridge-in-lane-{i}")
        self._spawn_lane_task(self._out_lane_filler(session), "pytest-bridge-out-lanes")

    def _spawn_lane_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    def _stop_lanes(self) -> None:
        self._lane_session = None
        for task in list(self._lane_tasks):
            task.cancel()
        while self._out_lanes:
            self._out_lanes.pop().close()

    async def _open_lane(self, session: str, role: str) -> socket.socket:
        assert self._lane_connect is not None
        async with asyncio.timeout(self._connect_timeout):
            sock = await self._lane_connect()
        try:
            hello = {"protocol": "pytest-bridge", "version": PROTOCOL_VERSION, "token": self._token}
            await send_frame(sock, FrameType.LANE, {**hello, "session": session, "role": role}, stream_id=0)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _lane_backoff(self, failures: int, error: object) -> bool:
        """Sleep before the next try; False once lanes have failed too often in a row (streams remain)."""
        if failures >= 8:
            log.info("lanes unavailable (%s): using streams", error)
            return False
        await asyncio.sleep(min(0.05 * 2**failures, 2.0))
        return True

    async def _in_lane_worker(self, session: str) -> None:
        """Keep one idle "in" lane at the agent; serve the connection it brings, open the next."""
        failures = 0
        while self._lane_session == session:
            try:
                lane = await self._open_lane(session, "in")
            except (OSError, TimeoutError) as e:
                failures += 1
                if not await self._lane_backoff(failures, e):
                    return
                continue
            try:
                frame = await recv_frame(lane)  # idle until the agent has a connection for us
                if frame.type is FrameType.ERROR:
                    log.info("agent refused a lane: %s", decode_json(frame.payload).get("reason"))
                    lane.close()
                    return
                request = decode_json(frame.payload) if frame.type is FrameType.OPEN else {}
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                lane.close()
                failures += 1
                if not await self._lane_backoff(failures, e):
                    return
                continue
            except asyncio.CancelledError:
                lane.close()
                raise
            failures = 0
            self._connection_at = asyncio.get_running_loop().time()
            self.lanes_active += 1  # released when _serve_in_lane ends
            task = asyncio.create_task(self._serve_in_lane(lane, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await self._lanes_quiet()

    async def _serve_in_lane(self, lane: socket.socket, request: dict[str, Any]) -> None:
        try:
            await self._serve_in_lane_request(lane, request)
        finally:
            self._lane_released()

    async def _serve_in_lane_request(self, lane: socket.socket, request: dict[str, Any]) -> None:
        target_port = request.get("port")
        if request.get("kind") == "reverse":
            self.reverse_total += 1
        try:
            local, reason = await self._dial_local(target_port if request.get("kind") == "reverse" else None)
            if local is None:
                await send_frame(lane, FrameType.OPEN_FAIL, {"reason": reason})
                lane.close()
                return
            await send_frame(lane, FrameType.OPEN_OK, {})
        except OSError:
            abort_socket(lane)
            return
        except asyncio.CancelledError:
            abort_socket(lane)
            raise
        result = await self._relay_lane(local, lane)
        if result.error:
            log.info("reverse :%s lane aborted: %s", target_port, result.error)

    async def _out_lane_filler(self, session: str) -> None:
        """Keep ``lanes`` idle "out" lanes ready for outbound connections."""
        failures = 0
        while self._lane_session == session:
            if len(self._out_lanes) >= self._lane_pool:
                self._out_lanes_wanted.clear()
                await self._out_lanes_wanted.wait()
                continue
            await self._lanes_quiet()
            try:
                lane = await self._open_lane(session, "out")
            except (OSError, TimeoutError) as e:
                failures += 1
                if not await self._lane_backoff(failures, e):
                    return
                continue
            failures = 0
            if self._lane_session != session:
                lane.close()
                return
            self._out_lanes.append(lane)

    async def _relay_lane(self, near: socket.socket, lane: socket.socket) -> RelayResult:
        self.lanes_used += 1
        return await self.lane_relay(near, lane, stats=self._stats, idle_timeout=self._stream_idle_timeout)

    def _lane_released(self) -> None:
        self.lanes_active -= 1
        self._lane_finished.set()

    async def _lanes_quiet(self) -> None:
        """Until fewer than MAX_ACTIVE_LANES lanes are taken and no new connection came for a lull."""
        loop = asyncio.get_running_loop()
        while True:
            if self.lanes_active >= MAX_ACTIVE_LANES:
                self._lane_finished.clear()
                await self._lane_finished.wait()
            elif (delay := self._connection_at + LANE_REFILL_QUIET - loop.time()) > 0:
                await asyncio.sleep(delay)
            else:
                return

    def _take_out_lane(self) -> socket.socket | None:
        if not self._out_lanes:
            return None
        self.lanes_active += 1  # released by the caller
        self._out_lanes_wanted.set()
        return self._out_lanes.pop(0)

    async def _dial_local(self, target_port: object) -> tuple[socket.socket | None, str]:
        """A connection to the local app for a service target port, or None and why not."""
        local_port = self.reverse_ports.get(target_port) if isinstance(target_port, int) else None
        if local_port is None:
            return None, f"no local port mapped for target port {target_port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await tcp_socket_connector(self.local_host, local_port)(), ""
        except TimeoutError:
            reason = f"local app not reachable at {self.local_host}:{local_port}: connect timed out"
        except OSError as e:
            reason = f"local app not reachable at {self.local_host}:{local_port}: {os_error_detail(e)}"
        log.log(self._unreachable_level(), "reverse :%s: %s", target_port, reason)
        return None, reason

    # ---- reverse streams from the agent ----
    async def _on_stream(self, stream: MuxStream) -> None:
        request = stream.request
        if request.get("kind") == "reverse":
            self.reverse_total += 1
            self._connection_at = asyncio.get_running_loop().time()
        if request.get("kind") != "reverse":
            stream.reject(f"unsupported stream kind {request.get('kind')!r}")
            return
        target_port = request.get("port")
        local, reason = await self._dial_local(target_port)
        if local is None:
            stream.reject(reason)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=local)
        except OSError as e:
            abort_socket(local)
            stream.reject(f"local app connection failed: {e}")
            return
        stream.accept()
        result = await pipe(stream, reader, writer, idle_timeout=self._stream_idle_timeout)
        if result.error:
            log.info("reverse :%s stream %d aborted: %s", target_port, stream.id, result.error)

    def _unreachable_level(self) -> int:
        # Canaries arrive before the local app runs: expected, so not worth a warning.
        return logging.DEBUG if self.probing else logging.WARNING

    # ---- connection management ----
    async def _open_mux(self) -> Mux:
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self._connect_timeout):
                hello_ok = await self._handshake(reader, writer)
        except BaseException:
            abort(writer)
            raise
        self.agent_info = hello_ok
        mux = Mux(
            reader,
            writer,
            is_client=True,
            peer_window=int(hello_ok["window"]),
            window=self._window,
            on_open=self._on_stream,
            keepalive_interval=self._keepalive_interval,
            keepalive_timeout=self._keepalive_timeout,
            stats=self._stats,
            name="tunnel",
            max_window=MAX_STREAM_WINDOW,
            window_budget=WINDOW_GROWTH_BUDGET,
        )
        mux.start()
        self.connects += 1
        session = hello_ok.get("session")
        if hello_ok.get("lanes") is True and isinstance(session, str):
            self._start_lanes(session)
        self._connected.set()
        log.info("tunnel connected (agent listen ports %s)", hello_ok.get("listen_ports"))
        return mux

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        hello = {
            "protocol": "pytest-bridge",
            "version": PROTOCOL_VERSION,
            "token": self._token,
            "window": self._window,
            "client": "pytest-bridge",
        }
        writer.write(encode_json_frame(FrameType.HELLO, 0, hello))
        await writer.drain()
        try:
            frame = await read_frame(reader, MAX_HANDSHAKE_PAYLOAD)
        except asyncio.IncompleteReadError:
            raise TunnelError("agent closed the connection during the handshake") from None
        except ProtocolError as e:
            raise TunnelError(f"not a pytest-bridge agent: {e}") from e
        if frame.type is FrameType.ERROR:
            raise AuthenticationError(f"agent refused the tunnel: {decode_json(frame.payload).get('reason')}")
        if frame.type is not FrameType.HELLO_OK:
            raise TunnelError(f"unexpected {frame.type.name} during the handshake")
        hello_ok = decode_json(frame.payload)
        if hello_ok.get("version") != PROTOCOL_VERSION or not isinstance(hello_ok.get("window"), int):
            raise TunnelError(f"agent speaks an incompatible protocol: {hello_ok}")
        return hello_ok

    async def _supervise(self) -> None:
        while True:
            mux = self._mux
            assert mux is not None
            await mux.wait_closed()
            self._connected.clear()
            self._stop_lanes()
            if self._closing:
                return
            self.last_error = mux.close_reason
            self.down_since = time.monotonic()
            if not self._reconnect:
                log.warning("tunnel lost: %s (reconnect disabled)", mux.close_reason)
                return
            log.warning("tunnel lost: %s; reconnecting", mux.close_reason)
            delay = 0.1
            while not self._closing:
                try:
                    self._mux = await self._open_mux()
                    log.warning("tunnel reconnected after %.1fs", time.monotonic() - (self.down_since or 0.0))
                    self.down_since = None
                    break
                except AuthenticationError as e:
                    self.last_error = str(e)
                    log.error("reconnect refused, giving up: %s", e)  # noqa: TRY400
                    return
                except Exception as e:  # the connector may raise anything (API errors, ...)
                    self.last_error = str(e)
                    log.info("reconnect failed (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)

    def _track(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
