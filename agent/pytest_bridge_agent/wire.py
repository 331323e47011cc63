"""Wire protocol shared by the in-cluster agent and the local tunnel client.

Pure framing and flow-control bookkeeping: no sockets, no tasks, stdlib only. The multiplexer
that drives these frames over a connection lives in :mod:`pytest_bridge_agent.mux`.

Frame layout (network byte order, 9-byte header)::

    +--------+----------------+----------------+------------------+
    | type u8| stream id u32  | length u32     | payload (length) |
    +--------+----------------+----------------+------------------+

Stream 0 is the connection itself (HELLO, HELLO_OK, ERROR, GOAWAY, PING, PONG). Client-opened
streams have odd ids, agent-opened streams even ids. A sender may put at most as many DATA
bytes on a stream as the peer has granted (the initial window, announced in HELLO/HELLO_OK, plus
every WINDOW increment since); the receiver grants more as its consumer drains, so a slow reader
back-pressures only its own stream and nothing is ever dropped.
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_WINDOW",
    "HEADER",
    "HEADER_SIZE",
    "MAX_FRAME_PAYLOAD",
    "MAX_HANDSHAKE_PAYLOAD",
    "MAX_WINDOW",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameType",
    "ProtocolError",
    "RecvWindow",
    "SendCredit",
    "WindowBudget",
    "decode_json",
    "decode_window",
    "encode_frame",
    "encode_json_frame",
    "encode_window",
    "parse_header",
    "read_frame",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
MAX_FRAME_PAYLOAD = 64 * 1024
# HELLO/ERROR and OPEN requests are small JSON; anything bigger before authentication is refused.
MAX_HANDSHAKE_PAYLOAD = 4096
DEFAULT_WINDOW = 1024 * 1024
MAX_WINDOW = 2**31 - 1
_WINDOW = struct.Struct("!I")


class FrameType(enum.IntEnum):
    HELLO = 0x01  # client -> agent, stream 0, JSON {protocol, version, token, window}
    HELLO_OK = 0x02  # agent -> client, stream 0, JSON {version, window, listen_ports, agent}
    ERROR = 0x03  # stream 0, JSON {reason}; the connection is over, the receiver closes it
    GOAWAY = 0x04  # stream 0, JSON {reason}; no new streams, existing ones may finish
    PING = 0x05  # stream 0, opaque payload echoed by PONG
    PONG = 0x06
    # First frame of a lane (pytest_bridge_agent.lanes) instead of HELLO: JSON {protocol, version,
    # token, session, role: in|out}; then OPEN / OPEN_OK / OPEN_FAIL on stream 1 and raw bytes.
    LANE = 0x07
    OPEN = 0x10  # JSON request: {kind: tcp|reverse|env|files, ...}
    OPEN_OK = 0x11  # JSON (may be empty)
    OPEN_FAIL = 0x12  # JSON {reason}; the stream id is dead afterwards
    DATA = 0x20
    WINDOW = 0x21  # u32 credit increment for DATA toward the sender of this frame
    FIN = 0x22  # sender will send no more DATA on this stream (half-close)
    RST = 0x23  # UTF-8 reason; abort both directions


_CONNECTION_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.HELLO_OK,
        FrameType.ERROR,
        FrameType.GOAWAY,
        FrameType.PING,
        FrameType.PONG,
        FrameType.LANE,
    }
)


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    payload: bytes = b""


def encode_frame(ftype: FrameType, stream_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame as bytes (header and payload joined: a single transport write, one copy)."""
    length = len(payload)
    if length > MAX_FRAME_PAYLOAD:
        raise ValueError(f"frame payload of {length} bytes exceeds {MAX_FRAME_PAYLOAD}")
    header = HEADER.pack(ftype, stream_id, length)
    return header + payload if length else header


def encode_json_frame(ftype: FrameType, stream_id: int, obj: dict[str, Any]) -> bytes:
    return encode_frame(ftype, stream_id, json.dumps(obj, separators=(",", ":")).encode())


def encode_window(increment: int) -> bytes:
    return _WINDOW.pack(increment)


def decode_window(payload: bytes) -> int:
    if len(payload) != _WINDOW.size:
        raise ProtocolError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    (increment,) = _WINDOW.unpack(payload)
    if increment == 0:
        raise ProtocolError("WINDOW increment of 0")
    return int(increment)


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"payload is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("payload is not a JSON object")
    return obj


def parse_header(header: bytes, max_payload: int = MAX_FRAME_PAYLOAD) -> tuple[FrameType, int, int]:
    """Validate a 9-byte header; return (type, stream id, payload length)."""
    raw_type, stream_id, length = HEADER.unpack(header)
    try:
        ftype = FrameType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{raw_type:02x}") from None
    if length > max_payload:
        raise ProtocolError(f"{ftype.name} frame of {length} bytes exceeds the limit of {max_payload}")
    if (ftype in _CONNECTION_TYPES) != (stream_id == 0):
        raise ProtocolError(f"{ftype.name} frame on stream {stream_id}")
    return ftype, stream_id, length


async def read_frame(reader: asyncio.StreamReader, max_payload: int = MAX_FRAME_PAYLOAD) -> Frame:
    """Read one frame; raises asyncio.IncompleteReadError at EOF, ProtocolError on garbage."""
    ftype, stream_id, length = parse_header(await reader.readexactly(HEADER_SIZE), max_payload)
    payload = await reader.readexactly(length) if length else b""
    return Frame(ftype, stream_id, payload)


class SendCredit:
    """How many DATA bytes we may still send on one stream."""

    def __init__(self, initial: int) -> None:
        self.available = initial

    def take(self, wanted: int) -> int:
        n = min(wanted, self.available)
        self.available -= n
        return n

    def grant(self, increment: int) -> None:
        if self.available + increment > MAX_WINDOW:
            raise ProtocolError(f"WINDOW increment {increment} overflows the send window")
        self.available += increment


class WindowBudget:
    """Bytes a connection may add to its streams' receive windows beyond their initial size.

    Streams whose reader keeps up grow their window (fewer round trips per byte on a
    high-latency tunnel); the budget bounds what all of them together may hold on top of
    the initial windows, so many stalled streams cannot pin unbounded memory.
    """

    def __init__(self, total: int) -> None:
        self.available = total

    def take(self, want: int) -> int:
        granted = max(0, min(want, self.available))
        self.available -= granted
        return granted

    def give(self, n: int) -> None:
        self.available += n


class RecvWindow:
    """Receive-side accounting for one stream.

    ``received`` enforces the credit we granted; ``consumed`` returns the increment to send back
    once enough has been drained (a quarter of the window), batching WINDOW frames. With a
    ``budget``, a stream whose reader drains it grows its window (doubling, up to ``max_window``);
    :meth:`release` returns the growth when the stream ends.
    """

    def __init__(self, window: int, max_window: int | None = None, budget: WindowBudget | None = None) -> None:
        self.window = window
        self.remaining = window  # what the peer may still send before we grant more
        self._unacked = 0  # consumed but not yet granted back
        self._threshold = max(1, window // 4)
        self._max_window = max(window, max_window or window)
        self._budget = budget
        self._grown = 0

    def received(self, n: int) -> None:
        if n > self.remaining:
            raise ProtocolError(f"peer sent {n} bytes with only {self.remaining} of credit")
        self.remaining -= n

    def consumed(self, n: int) -> int:
        self._unacked += n
        if self._unacked < self._threshold:
            return 0
        increment, self._unacked = self._unacked, 0
        if self._budget is not None and self.window < self._max_window:
            extra = self._budget.take(min(self.window, self._max_window - self.window))
            if extra:
                self.window += extra
                self._grown += extra
                self._threshold = max(1, self.window // 4)
                increment += extra
        self.remaining += increment
        return increment

    def release(self) -> None:
        """The stream is done: give its growth back to the budget."""
        if self._budget is not None and self._grown:
            self._budget.give(self._grown)
            self._grown = 0
