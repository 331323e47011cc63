"""Copying between a mux stream and a TCP socket, shared by the agent and the tunnel client.

Both directions run in one task group; half-close is forwarded; on any error both ends are aborted
(RST), never left half-open or silently truncated. No frames are handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .mux import MuxStream

__all__ = [
    "ConnectionHandler",
    "PipeResult",
    "abort",
    "connection_handler",
    "describe_error",
    "idle_watchdog",
    "os_error_detail",
    "pipe",
    "reset_on_close",
]

CHUNK = 64 * 1024


def reset_on_close(sock: socket.socket) -> None:
    """Make closing ``sock`` send RST, so its peer cannot mistake a broken transfer for a complete one."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def abort(writer: asyncio.StreamWriter) -> None:
    """Close a stream's socket with RST (see reset_on_close)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        reset_on_close(sock)
    writer.transport.abort()


def describe_error(exc: BaseException) -> str:
    """``Type: message`` (just ``Type`` when the message is empty), for logs and results."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def os_error_detail(error: OSError) -> str:
    """The system's text for an OSError's errno, else the exception's own message."""
    return os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else str(error)


async def idle_watchdog(tasks: set[asyncio.Task[None]], idle: float, last: list[float]) -> None:
    """Raise TimeoutError once ``last[0]`` (loop time of the last traffic) is ``idle`` seconds old.

    Returns when every task in ``tasks`` is done; run it beside them in their task group.
    """
    loop = asyncio.get_running_loop()
    while True:
        delay = last[0] + idle - loop.time()
        if delay <= 0:
            raise TimeoutError(f"no traffic for {idle:g}s (idle timeout)")
        _, pending = await asyncio.wait(tasks, timeout=delay)
        if not pending:
            return


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def connection_handler(handler: ConnectionHandler) -> ConnectionHandler:
    """Wrap an asyncio.start_server callback so that cancelling it (shutdown) aborts the socket.

    On Python 3.11 asyncio logs a spurious "Exception in callback" for a cancelled callback task;
    the task ends normally here instead, which is safe because nothing awaits it.
    """

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            abort(writer)

    return run


@dataclass
class PipeResult:
    bytes_in: int = 0  # socket -> stream
    bytes_out: int = 0  # stream -> socket
    error: str | None = None


async def pipe(
    stream: MuxStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    idle_timeout: float | None = None,
) -> PipeResult:
    """Copy both ways between a stream and a socket until both directions ended.

    Half-close is forwarded (FIN <-> write_eof). On any error both ends are aborted, so neither
    peer mistakes a broken transfer for a complete one. Both ends are closed when this returns.
    """
    loop = asyncio.get_running_loop()
    result = PipeResult()
    last = [loop.time()]

    async def socket_to_stream() -> None:
        while data := await reader.read(CHUNK):
            last[0] = loop.time()
            result.bytes_in += len(data)
            stream.write(data)
            await stream.drain()
        stream.write_eof()

    async def stream_to_socket() -> None:
        while data := await stream.read(CHUNK):
            last[0] = loop.time()
            result.bytes_out += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    clean = False
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = {tg.create_task(socket_to_stream()), tg.create_task(stream_to_socket())}
            if idle_timeout:
                tg.create_task(idle_watchdog(tasks, idle_timeout, last))
        await stream.wait_closed()
        clean = True
    except ExceptionGroup as eg:
        result.error = describe_error(eg.exceptions[0])
    finally:
        if clean:
            writer.close()
        else:
            stream.reset(result.error or "cancelled")
            abort(writer)
    return result
