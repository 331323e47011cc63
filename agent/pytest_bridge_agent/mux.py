"""Stream multiplexer over one connection, used by both the agent and the local tunnel client.

Drives :mod:`pytest_bridge_agent.wire` frames over an asyncio (StreamReader, StreamWriter) pair:
one reader task dispatches frames into per-stream buffers (bounded by the credit we granted, so it
never blocks on a slow stream), one writer task sends control frames first and then DATA round-robin
over the streams that have both data and credit. Stdlib only; no sockets are opened here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .wire import (
    DEFAULT_WINDOW,
    HEADER,
    MAX_FRAME_PAYLOAD,
    Frame,
    FrameType,
    ProtocolError,
    RecvWindow,
    SendCredit,
    WindowBudget,
    decode_json,
    decode_window,
    encode_frame,
    encode_json_frame,
    encode_window,
    read_frame,
)

__all__ = [
    "ConnectionLost",
    "Mux",
    "MuxStats",
    "MuxStream",
    "OpenFailed",
    "StreamReset",
]

log = logging.getLogger(__name__)

# A stream's unsent bytes above which drain() waits; with the peer's window this bounds the memory
# one stream can pin on the sending side.
STREAM_SEND_HIGH_WATER = 256 * 1024
# Bytes of frames joined into one transport write before awaiting drain().
WRITE_BATCH = 256 * 1024


class ConnectionLost(ConnectionError):
    """The multiplexed connection is gone (transport closed, keepalive timeout, peer error)."""


class StreamReset(ConnectionResetError):
    """The stream was aborted by the peer or locally (RST)."""


class OpenFailed(ConnectionError):
    """The peer refused to open a stream (OPEN_FAIL), with its reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class MuxStats:
    """Counters; one instance may be shared by successive connections (reconnects)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    streams_open: int = 0
    streams_total: int = 0


class MuxStream:
    """One bidirectional stream: StreamReader-like and StreamWriter-like at once."""

    def __init__(
        self, mux: Mux, stream_id: int, request: dict[str, Any], send_window: int, recv_window: int,
        *, max_window: int | None = None, budget: WindowBudget | None = None,
    ):  # fmt: skip
        self.id = stream_id
        self.request = request
        self._mux = mux
        self._credit = SendCredit(send_window)
        self._window = RecvWindow(recv_window, max_window, budget)
        self._recv: deque[bytes] = deque()
        self._recv_bytes = 0
        self._eof_received = False
        self._send: deque[memoryview] = deque()
        self._send_bytes = 0
        self._fin_queued = False
        self._fin_sent = False
        self._scheduled = False
        self._reset_reason: str | None = None
        self._answered = False
        self._finished = asyncio.Event()
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<MuxStream {self.id} {self.request.get('kind')}>"

    # ---- opening (acceptor side) ----
    def accept(self, info: dict[str, Any] | None = None) -> None:
        self._answered = True
        self._mux._send_control(encode_json_frame(FrameType.OPEN_OK, self.id, info or {}))

    def reject(self, reason: str) -> None:
        self._answered = True
        self._mux._send_control(encode_json_frame(FrameType.OPEN_FAIL, self.id, {"reason": reason}))
        self._on_reset(f"rejected: {reason}")

    # ---- reading ----
    def at_eof(self) -> bool:
        return self._eof_received and not self._recv

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (any amount if n < 0); b"" at EOF; StreamReset if aborted."""
        await self._wait_readable()
        if not self._recv:
            return b""
        chunk = self._recv.popleft()
        if 0 <= n < len(chunk):
            self._recv.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._consumed(len(chunk))
        return chunk

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        while need:
            chunk = await self.read(need)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = bytearray()
        while True:
            idx = data.find(separator)
            if idx >= 0:
                end = idx + len(separator)
                if end < len(data):
                    self._unread(bytes(data[end:]))
                return bytes(data[:end])
            chunk = await self.read()
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(data), None)
            data += chunk

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def _unread(self, data: bytes) -> None:
        # Bytes given back were already credited as consumed; re-buffering them needs no new credit.
        self._recv.appendleft(data)
        self._recv_bytes += len(data)

    async def _wait_readable(self) -> None:
        while not self._recv:
            if self._reset_reason is not None:
                raise StreamReset(self._reset_reason)
            if self._eof_received:
                return
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)

    def _consumed(self, n: int) -> None:
        self._recv_bytes -= n
        increment = self._window.consumed(n)
        if increment and not self._eof_received and self._reset_reason is None:
            self._mux._send_control(encode_frame(FrameType.WINDOW, self.id, encode_window(increment)))

    def _feed(self, payload: bytes) -> None:
        if self._reset_reason is not None:
            return
        if self._eof_received:
            raise ProtocolError(f"DATA after FIN on stream {self.id}")
        self._window.received(len(payload))
        self._recv.append(payload)
        self._recv_bytes += len(payload)
        self._wake_reader()

    def _feed_eof(self) -> None:
        self._eof_received = True
        self._wake_reader()
        self._maybe_finish()

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # ---- writing ----
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        if self._fin_queued:
            raise RuntimeError("write after write_eof()")
        if not data:
            return
        # Copy mutable buffers: the caller may reuse them before the writer task sends.
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._send.append(view)
        self._send_bytes += len(view)
        self._mux._schedule(self)

    def writelines(self, data: list[bytes]) -> None:
        for item in data:
            self.write(item)

    async def drain(self) -> None:
        while self._send_bytes > STREAM_SEND_HIGH_WATER and self._reset_reason is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._fin_queued or self._reset_reason is not None:
            return
        self._fin_queued = True
        self._mux._schedule(self)

    def reset(self, reason: str = "reset") -> None:
        """Abort both directions and tell the peer (RST)."""
        if self._reset_reason is not None or self._finished.is_set():
            return
        self._mux._send_control(encode_frame(FrameType.RST, self.id, reason.encode()[:1024]))
        self._on_reset(reason)

    def close(self) -> None:
        """Finish the stream: FIN if everything was read, otherwise abort (like a TCP close)."""
        if self._finished.is_set() or self._reset_reason is not None:
            return
        if not self._eof_received:
            self.reset("closed by the other side before the end of the stream")
            return
        self.write_eof()

    def is_closing(self) -> bool:
        return self._fin_queued or self._reset_reason is not None

    async def wait_closed(self) -> None:
        await self._finished.wait()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"stream_id": self.id, "request": self.request}.get(name, default)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def _sendable(self) -> bool:
        if self._reset_reason is not None:
            return False
        if self._send_bytes:
            return self._credit.available > 0
        return self._fin_queued and not self._fin_sent

    def _emit(self, parts: list[bytes | memoryview]) -> int:
        """Append this stream's next frame to parts; return its size."""
        if self._reset_reason is not None:
            return 0
        if self._send_bytes:
            n = self._credit.take(min(self._send_bytes, MAX_FRAME_PAYLOAD))
            if not n:
                return 0
            parts.append(HEADER.pack(FrameType.DATA, self.id, n))
            need = n
            while need:
                view = self._send.popleft()
                if len(view) > need:
                    self._send.appendleft(view[need:])
                    view = view[:need]
                parts.append(view)
                need -= len(view)
            self._send_bytes -= n
            self._mux.stats.bytes_sent += n
            if self._send_bytes <= STREAM_SEND_HIGH_WATER and self._drain_waiter and not self._drain_waiter.done():
                self._drain_waiter.set_result(None)
            return n + HEADER.size
        if self._fin_queued and not self._fin_sent:
            self._fin_sent = True
            parts.append(encode_frame(FrameType.FIN, self.id))
            self._maybe_finish()
            return HEADER.size
        return 0

    def _grant(self, increment: int) -> None:
        self._credit.grant(increment)
        self._mux._schedule(self)

    # ---- lifecycle ----
    def _on_reset(self, reason: str) -> None:
        """Mark aborted without telling the peer (it told us, or already knows)."""
        if self._reset_reason is not None:
            return
        self._reset_reason = reason
        self._send.clear()
        self._send_bytes = 0
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._finish()

    def _maybe_finish(self) -> None:
        if self._fin_sent and self._eof_received:
            self._finish()

    def _finish(self) -> None:
        if not self._finished.is_set():
            self._finished.set()
            self._window.release()
            self._mux._forget(self)


OpenHandler = Callable[[MuxStream], Awaitable[None]]


class Mux:
    """One multiplexed connection. Call :meth:`start` after the handshake."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        is_client: bool,
        peer_window: int,
        window: int = DEFAULT_WINDOW,
        on_open: OpenHandler | None = None,
        keepalive_interval: float | None = 10.0,
        keepalive_timeout: float = 30.0,
        stats: MuxStats | None = None,
        name: str = "mux",
        max_window: int | None = None,
        window_budget: int = 0,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._peer_window = peer_window
        self._window = window
        # Receive windows may grow up to max_window while their readers keep up, within a
        # connection-wide budget (see WindowBudget); without one they stay at ``window``.
        self._max_window = max_window
        self._budget = WindowBudget(window_budget) if max_window and window_budget > 0 else None
        self._on_open = on_open
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self.stats = stats if stats is not None else MuxStats()
        self.name = name
        self._next_id = 1 if is_client else 2
        self._peer_parity = 0 if is_client else 1
        self._streams: dict[int, MuxStream] = {}
        self._opening: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count(1)
        self._control: deque[bytes] = deque()
        self._sendq: deque[MuxStream] = deque()
        self._wakeup = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_recv = asyncio.get_running_loop().time()
        self.goaway_reason: str | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()

    # ---- public ----
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-run")
        return self._task

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def accepting(self) -> bool:
        return not self.closed.is_set() and self.goaway_reason is None

    async def open(self, request: dict[str, Any], open_timeout: float | None = 15.0) -> MuxStream:
        """Open a stream; raises OpenFailed with the peer's reason, or ConnectionLost."""
        if self.closed.is_set():
            raise ConnectionLost(self.close_reason or "connection closed")
        if self.goaway_reason is not None:
            raise ConnectionLost(f"peer is going away: {self.goaway_reason}")
        stream_id = self._next_id
        self._next_id += 2
        stream = MuxStream(
            self, stream_id, request, self._peer_window, self._window, max_window=self._max_window, budget=self._budget
        )
        self._streams[stream_id] = stream
        self.stats.streams_open += 1
        self.stats.streams_total += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._opening[stream_id] = future
        self._send_control(encode_json_frame(FrameType.OPEN, stream_id, request))
        try:
            async with asyncio.timeout(open_timeout):
                await future
        except TimeoutError:
            stream.reset("open timed out")
            raise OpenFailed(f"no answer from the peer within {open_timeout:g}s") from None
        except OpenFailed:
            stream._on_reset("open refused")
            raise
        except BaseException:
            stream.reset("open abandoned")
            raise
        finally:
            self._opening.pop(stream_id, None)
        return stream

    async def ping(self) -> float:
        """Round-trip time in seconds (wrap in asyncio.timeout: a dead peer never answers)."""
        payload = struct.pack("!Q", next(self._ping_ids))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pings[payload] = future
        started = loop.time()
        self._send_control(encode_frame(FrameType.PING, 0, payload))
        try:
            await future
        finally:
            self._pings.pop(payload, None)
        return loop.time() - started

    def send_goaway(self, reason: str) -> None:
        self._send_control(encode_json_frame(FrameType.GOAWAY, 0, {"reason": reason}))

    async def aclose(self, reason: str = "closed", grace: float = 1.0) -> None:
        """Close politely: tell the peer why (ERROR) and let it close first, so neither side
        resets the socket with frames still unread; force-close after ``grace`` seconds."""
        if not self.closed.is_set():
            if self.close_reason is None:
                self.close_reason = reason
            self._send_control(encode_json_frame(FrameType.ERROR, 0, {"reason": reason}))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.closed.wait()
        self.close(reason)
        await self.closed.wait()

    def close(self, reason: str = "closed") -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if self._task is not None:
            self._task.cancel()
        else:
            self._teardown()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    # ---- internals used by MuxStream ----
    def _send_control(self, frame: bytes) -> None:
        if self.closed.is_set():
            return
        self._control.append(frame)
        self._wakeup.set()

    def _schedule(self, stream: MuxStream) -> None:
        if not stream._scheduled and stream._sendable() and not self.closed.is_set():
            stream._scheduled = True
            self._sendq.append(stream)
            self._wakeup.set()

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self.stats.streams_open -= 1

    # ---- tasks ----
    async def _run(self) -> None:
        reason = "closed"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_loop(), name=f"{self.name}-read")
                tg.create_task(self._write_loop(), name=f"{self.name}-write")
                if self._keepalive_interval:
                    tg.create_task(self._keepalive_loop(), name=f"{self.name}-keepalive")
        except* asyncio.IncompleteReadError:
            reason = "connection closed by peer"
        except* (ConnectionLost, ProtocolError, OSError) as eg:
            reason = str(eg.exceptions[0]) or type(eg.exceptions[0]).__name__
        except* Exception as eg:
            reason = f"internal error: {eg.exceptions[0]!r}"
            log.exception("%s: internal error", self.name, exc_info=eg.exceptions[0])
        finally:
            if self.close_reason is None:
                self.close_reason = reason
            self._teardown()

    def _teardown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        reason = self.close_reason or "closed"
        for future in self._opening.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(ConnectionLost(reason))
        for stream in list(self._streams.values()):
            stream._on_reset(f"connection lost: {reason}")
        for task in self._handlers:
            task.cancel()
        self._control.clear()
        self._sendq.clear()
        self._writer.close()

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        reader = self._reader
        while True:
            frame = await read_frame(reader)
            self._last_recv = loop.time()
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        ftype, sid = frame.type, frame.stream_id
        if ftype is FrameType.DATA:
            self.stats.bytes_received += len(frame.payload)
            stream = self._streams.get(sid)
            if stream is None:
                return  # late data for a stream we already aborted
            try:
                stream._feed(frame.payload)
            except ProtocolError as e:
                stream.reset(str(e))
        elif ftype is FrameType.WINDOW:
            stream = self._streams.get(sid)
            if stream is not None:
                stream._grant(decode_window(frame.payload))
        elif ftype is FrameType.FIN:
            stream = self._streams.get(sid)
            if stream is not None:
                stream._feed_eof()
        elif ftype is FrameType.RST:
            stream = self._streams.get(sid)
            if stream is not None:
                reason = frame.payload.decode(errors="replace") or "reset by peer"
                stream._on_reset(f"reset by peer: {reason}")
        elif ftype is FrameType.OPEN:
            self._on_open_frame(sid, decode_json(frame.payload))
        elif ftype is FrameType.OPEN_OK:
            future = self._opening.get(sid)
            if future is not None and not future.done():
                future.set_result(decode_json(frame.payload) if frame.payload else {})
        elif ftype is FrameType.OPEN_FAIL:
            future = self._opening.get(sid)
            reason = str(decode_json(frame.payload).get("reason", "refused"))
            if future is not None and not future.done():
                future.set_exception(OpenFailed(reason))
        elif ftype is FrameType.PING:
            self._send_control(encode_frame(FrameType.PONG, 0, frame.payload))
        elif ftype is FrameType.PONG:
            ping = self._pings.get(frame.payload)
            if ping is not None and not ping.done():
                ping.set_result(None)
        elif ftype is FrameType.GOAWAY:
            self.goaway_reason = str(decode_json(frame.payload).get("reason", "going away"))
            log.info("%s: peer is going away: %s", self.name, self.goaway_reason)
        elif ftype is FrameType.ERROR:
            reason = str(decode_json(frame.payload).get("reason", "error"))
            raise ConnectionLost(f"peer closed the connection: {reason}")
        else:
            raise ProtocolError(f"unexpected {ftype.name} frame after the handshake")

    def _on_open_frame(self, sid: int, request: dict[str, Any]) -> None:
        if sid % 2 != self._peer_parity or sid in self._streams:
            raise ProtocolError(f"OPEN with invalid stream id {sid}")
        if self.closed.is_set():
            return
        stream = MuxStream(
            self, sid, request, self._peer_window, self._window, max_window=self._max_window, budget=self._budget
        )
        self._streams[sid] = stream
        self.stats.streams_open += 1
        self.stats.streams_total += 1
        if self._on_open is None:
            stream.reject("this side does not accept streams")
            return
        task = asyncio.create_task(self._handle(stream, self._on_open), name=f"{self.name}-stream-{sid}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, stream: MuxStream, handler: OpenHandler) -> None:
        try:
            await handler(stream)
        except Exception as e:
            log.warning("%s: stream %d (%s) failed: %r", self.name, stream.id, stream.request.get("kind"), e)
            if not stream._answered:
                stream.reject(f"agent error: {e}")
            else:
                stream.reset(f"error: {e}")
        finally:
            if not stream._answered:
                stream.reject("not handled")

    async def _write_loop(self) -> None:
        writer = self._writer
        control, sendq = self._control, self._sendq
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while control or sendq:
                parts: list[bytes | memoryview] = []
                size = 0
                while control:
                    frame = control.popleft()
                    parts.append(frame)
                    size += len(frame)
                while sendq and size < WRITE_BATCH:
                    stream = sendq.popleft()
                    stream._scheduled = False
                    size += stream._emit(parts)
                    if stream._sendable():
                        stream._scheduled = True
                        sendq.append(stream)
                if parts:
                    writer.write(b"".join(parts))
                    await writer.drain()

    async def _keepalive_loop(self) -> None:
        assert self._keepalive_interval
        loop = asyncio.get_running_loop()
        interval = self._keepalive_interval
        while True:
            await asyncio.sleep(interval)
            idle = loop.time() - self._last_recv
            if idle >= self._keepalive_timeout:
                raise ConnectionLost(f"no frames from the peer for {idle:.0f}s (keepalive timeout)")
            if idle >= interval:
                self._send_control(encode_frame(FrameType.PING, 0, b"keepaliv"))
