"""Lanes: one plain connection per bridged TCP connection, beside the multiplexed control connection.

The multiplexer carries every stream over one connection, which suits our own WebSocket
port-forward (one WebSocket per tunnel). When the transport can open connections cheaply --
``kubectl port-forward`` turns each local connection into a new stream of its existing
connection to the node -- a bridged connection can instead ride its own transport connection:
no framing, no credit, no copies through Python buffers beyond one ``recv_into`` per chunk. On
our 2-core VM that halves the CPU the two relays spend per byte (BENCHMARKS.md).

A lane is a connection to the agent's control port whose first frame is ``LANE`` (token, the
session it belongs to, and its role) instead of ``HELLO``. The client keeps a few idle lanes of
each role open, so a new bridged connection costs no extra round trip:

- ``in`` lanes wait in the agent; a connection accepted on a service port takes one, the agent
  sends ``OPEN {kind: reverse, port, peer}``, the client dials the local app and answers
  ``OPEN_OK`` or ``OPEN_FAIL``;
- ``out`` lanes wait in the client; a local outbound connection takes one and sends
  ``OPEN {kind: tcp, host, port}``, the agent dials and answers.

After ``OPEN_OK`` both ends relay raw bytes (half-close forwarded, errors become RST on both
sides, as with streams). Any failure before ``OPEN_OK`` -- no idle lane, a lane that died while
idle -- falls back to a multiplexed stream, so lanes are only ever an optimisation.
Stdlib only; shared by the agent and the tunnel client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .mux import MuxStats
from .pipes import describe_error, idle_watchdog, reset_on_close
from .wire import (
    HEADER_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    Frame,
    FrameType,
    ProtocolError,
    decode_json,
    encode_json_frame,
    parse_header,
)

__all__ = [
    "LANE_POOL",
    "RelayResult",
    "SocketHandler",
    "SocketServer",
    "abort_socket",
    "dial",
    "open_on_lane",
    "recv_frame",
    "relay",
    "send_frame",
    "tcp_socket",
]

LANE_POOL = 4  # idle lanes of each role the client keeps open
RELAY_CHUNK = 256 * 1024  # one recv_into per chunk: fewer system calls than the mux's 64 KiB frames
RELAY_FIRST_CHUNK = 16 * 1024  # a direction starts small and grows to RELAY_CHUNK once reads fill it

SocketHandler = Callable[[socket.socket], Coroutine[Any, Any, None]]


def abort_socket(sock: socket.socket) -> None:
    """Close with RST, so the peer cannot mistake a broken transfer for a complete one."""
    reset_on_close(sock)
    sock.close()


def tcp_socket(host: str) -> socket.socket:
    """A new non-blocking TCP socket (TCP_NODELAY) of the family ``host`` is written in."""
    return prepare(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))


def prepare(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise asyncio.IncompleteReadError(bytes(buffer[:got]), n)
        got += k
    return bytes(buffer)


async def recv_frame(sock: socket.socket, max_payload: int = MAX_HANDSHAKE_PAYLOAD) -> Frame:
    """Exactly one frame from a raw socket: never reads past it (the bytes after it are the relay's)."""
    ftype, stream_id, length = parse_header(await _recv_exactly(sock, HEADER_SIZE), max_payload)
    payload = await _recv_exactly(sock, length) if length else b""
    return Frame(ftype, stream_id, payload)


async def send_frame(sock: socket.socket, ftype: FrameType, obj: dict[str, Any], stream_id: int = 1) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, encode_json_frame(ftype, stream_id, obj))


async def open_on_lane(lane: socket.socket, request: dict[str, Any], answer_within: float) -> str | None:
    """Send OPEN on an idle lane and wait for the answer.

    None: accepted, relay now. A reason: the peer refused (the lane is closed). "": the lane
    was dead (it is aborted; the caller tries another lane or a stream).
    """
    try:
        await send_frame(lane, FrameType.OPEN, request)
        async with asyncio.timeout(answer_within):
            frame = await recv_frame(lane)
    except (OSError, asyncio.IncompleteReadError, ProtocolError):  # TimeoutError is an OSError
        abort_socket(lane)
        return ""
    if frame.type is FrameType.OPEN_OK:
        return None
    if frame.type is FrameType.OPEN_FAIL:
        lane.close()
        try:
            return str(decode_json(frame.payload).get("reason") or "refused")
        except ProtocolError:
            return "refused"
    abort_socket(lane)
    return ""


async def dial(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket; raises like asyncio.open_connection (gaierror, OSError)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            prepare(sock)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


@dataclass
class RelayResult:
    bytes_ab: int = 0
    bytes_ba: int = 0
    error: str | None = None


async def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    stats: MuxStats | None = None,
    idle_timeout: float | None = None,
    chunk: int = RELAY_CHUNK,
    first_chunk: int = RELAY_FIRST_CHUNK,
) -> RelayResult:
    """Copy both ways between two sockets until both directions ended; both are closed on return.

    ``a`` is the near side (the app or in-cluster peer), ``b`` the lane: a -> b counts as sent,
    b -> a as received in ``stats``. Half-close is forwarded; any error aborts both with RST.
    Reads start at ``first_chunk`` bytes and grow to ``chunk`` while they fill the buffer.
    """
    loop = asyncio.get_running_loop()
    result = RelayResult()
    last = [loop.time()]

    async def copy(src: socket.socket, dst: socket.socket, forward: bool) -> None:
        # Idle or chatty connections keep 16 KiB per direction; bulk ones grow to 256 KiB.
        buffer = bytearray(first_chunk)
        view = memoryview(buffer)
        while n := await loop.sock_recv_into(src, buffer):
            last[0] = loop.time()
            await loop.sock_sendall(dst, view[:n])
            if n == len(buffer) < chunk:
                buffer = bytearray(min(4 * n, chunk))
                view = memoryview(buffer)
            if forward:
                result.bytes_ab += n
                if stats is not None:
                    stats.bytes_sent += n
            else:
                result.bytes_ba += n
                if stats is not None:
                    stats.bytes_received += n
        dst.shutdown(socket.SHUT_WR)

    if stats is not None:
        stats.streams_open += 1
        stats.streams_total += 1
    clean = False
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = {tg.create_task(copy(a, b, True)), tg.create_task(copy(b, a, False))}
            if idle_timeout:
                tg.create_task(idle_watchdog(tasks, idle_timeout, last))
        clean = True
    except ExceptionGroup as eg:
        result.error = describe_error(eg.exceptions[0])
    finally:
        if stats is not None:
            stats.streams_open -= 1
        for sock in (a, b):
            if clean:
                sock.close()
            else:
                abort_socket(sock)
    return result


class SocketServer:
    """A listening socket whose accepted connections go, raw, to ``handler`` (one task each).

    asyncio.start_server starts reading before its callback runs, so the bytes after a first
    frame could already sit in a StreamReader; here nothing is read until the handler decides
    (a lane relays the socket itself, a mux stream wraps it with asyncio.open_connection(sock=)).
    """

    def __init__(self, sock: socket.socket, handler: SocketHandler) -> None:
        self._sock = sock
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    @classmethod
    async def start(cls, handler: SocketHandler, host: str, port: int, backlog: int = 4096) -> SocketServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
        sock.setblocking(False)
        return cls(sock, handler)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError:  # e.g. EMFILE: back off instead of spinning
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handler(prepare(conn)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop accepting (connections being handled go on)."""
        self._accepting.cancel()
        self._sock.close()
