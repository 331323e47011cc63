"""Framing and flow-control accounting of the agent/tunnel wire protocol (no sockets)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from pytest_bridge_agent.mux import Mux, MuxStream
from pytest_bridge_agent.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_WINDOW,
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
    parse_header,
    read_frame,
)


def decode_all(data: bytes) -> list[Frame]:
    """Every frame in ``data``, read as the agent and the tunnel read them (:func:`read_frame`)."""

    async def read() -> list[Frame]:
        reader = asyncio.StreamReader(limit=len(data) + 1)
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        while not reader.at_eof():
            frames.append(await read_frame(reader))
        return frames

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("ftype", "stream_id", "payload"),
    [
        (FrameType.DATA, 1, b"hello"),
        (FrameType.DATA, 2**32 - 1, os.urandom(MAX_FRAME_PAYLOAD)),
        (FrameType.FIN, 7, b""),
        (FrameType.PING, 0, b"12345678"),
        (FrameType.RST, 4, b"reason"),
    ],
)
def test_encode_decode_round_trip(ftype: FrameType, stream_id: int, payload: bytes) -> None:
    data = encode_frame(ftype, stream_id, payload)
    assert len(data) == HEADER_SIZE + len(payload)
    assert decode_all(data) == [Frame(ftype, stream_id, payload)]


def test_header_layout_is_type_stream_length() -> None:
    assert encode_frame(FrameType.DATA, 0x01020304, b"xy") == b"\x20\x01\x02\x03\x04\x00\x00\x00\x02xy"


def test_json_frames() -> None:
    (frame,) = decode_all(encode_json_frame(FrameType.OPEN, 3, {"kind": "tcp", "port": 80}))
    assert frame.type is FrameType.OPEN
    assert decode_json(frame.payload) == {"kind": "tcp", "port": 80}


@pytest.mark.asyncio
async def test_read_frame_from_stream_reader_in_pieces() -> None:
    reader = asyncio.StreamReader()
    data = encode_frame(FrameType.DATA, 5, b"x" * 1000) + encode_frame(FrameType.FIN, 5)

    async def feed() -> None:
        for i in range(0, len(data), 7):
            reader.feed_data(data[i : i + 7])
            await asyncio.sleep(0)
        reader.feed_eof()

    task = asyncio.create_task(feed())
    assert await read_frame(reader) == Frame(FrameType.DATA, 5, b"x" * 1000)
    assert await read_frame(reader) == Frame(FrameType.FIN, 5, b"")
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)
    await task


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x7f\x00\x00\x00\x01\x00\x00\x00\x00", "unknown frame type 0x7f"),
        (b"GET / HTTP/1.1"[:HEADER_SIZE], "unknown frame type 0x47"),
        (b"\x20\x00\x00\x00\x01\x00\x01\x00\x01", "exceeds the limit"),
        (b"\x20\x00\x00\x00\x00\x00\x00\x00\x01", "DATA frame on stream 0"),
        (b"\x05\x00\x00\x00\x03\x00\x00\x00\x08", "PING frame on stream 3"),
    ],
)
def test_bad_headers_are_protocol_errors(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_header(header)


def test_handshake_limit_refuses_big_first_frame() -> None:
    header = encode_frame(FrameType.HELLO, 0, b"x" * 5000)[:HEADER_SIZE]
    with pytest.raises(ProtocolError, match="exceeds the limit of 4096"):
        parse_header(header, 4096)


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(FrameType.DATA, 1, b"x" * (MAX_FRAME_PAYLOAD + 1))


def test_bad_json_and_window_payloads() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_json(b"\xff{")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode_json(b"[1]")
    with pytest.raises(ProtocolError, match="4 bytes"):
        decode_window(b"\x00\x01")
    with pytest.raises(ProtocolError, match="increment of 0"):
        decode_window(encode_window(0))
    assert decode_window(encode_window(123456)) == 123456


def test_send_credit_limits_and_grants() -> None:
    credit = SendCredit(100)
    assert credit.take(60) == 60
    assert credit.take(60) == 40
    assert credit.take(1) == 0
    credit.grant(10)
    assert credit.take(50) == 10
    with pytest.raises(ProtocolError, match="overflows"):
        credit.grant(MAX_WINDOW + 1)


def test_recv_window_enforces_credit() -> None:
    window = RecvWindow(1000)
    window.received(1000)
    with pytest.raises(ProtocolError, match="only 0 of credit"):
        window.received(1)


def test_recv_window_grants_in_batches_of_a_quarter() -> None:
    window = RecvWindow(1000)
    window.received(800)
    assert window.consumed(100) == 0  # below the 250-byte threshold: no WINDOW frame yet
    assert window.consumed(200) == 300
    assert window.remaining == 500
    window.received(500)
    assert window.consumed(500) == 500
    assert window.remaining == 500


def test_recv_window_never_deadlocks_when_everything_is_consumed() -> None:
    # Invariant: once the consumer drained everything, the sender holds at least 3/4 of the window.
    window = RecvWindow(1000)
    for step in (1, 7, 249, 250, 333, 1000):
        received = min(step, window.remaining)
        window.received(received)
        window.consumed(received)
        assert window.remaining >= 750


@pytest.mark.asyncio
async def test_mux_sender_stops_at_the_granted_window() -> None:
    """A stream whose reader does not read holds exactly one window in flight; nothing is lost."""
    window = 256 * 1024
    left, right = socket.socketpair()
    a_reader, a_writer = await asyncio.open_connection(sock=left)
    b_reader, b_writer = await asyncio.open_connection(sock=right)
    accepted: asyncio.Queue[MuxStream] = asyncio.Queue()

    async def on_open(stream: MuxStream) -> None:
        stream.accept()
        await accepted.put(stream)

    client = Mux(a_reader, a_writer, is_client=True, peer_window=window, window=window)
    server = Mux(b_reader, b_writer, is_client=False, peer_window=window, window=window, on_open=on_open)
    client.start()
    server.start()
    try:
        sent = os.urandom(3 * 1024 * 1024)
        stream = await client.open({"kind": "test"})
        stream.write(sent)
        stream.write_eof()
        peer = await asyncio.wait_for(accepted.get(), 5)
        await asyncio.sleep(0.2)
        assert client.stats.bytes_sent == window  # blocked on credit, not on the socket
        received = await asyncio.wait_for(peer.read_all(), 10)
        assert received == sent
        assert server.stats.bytes_received == len(sent)
        # The other direction still works on the same stream after the first one finished.
        peer.write(b"reply")
        peer.write_eof()
        assert await stream.read_all() == b"reply"
        await asyncio.wait_for(stream.wait_closed(), 5)
        assert client.open_streams == 0
    finally:
        client.close()
        server.close()
        await client.wait_closed()
        await server.wait_closed()


def test_a_draining_stream_grows_its_window_within_the_budget() -> None:
    budget = WindowBudget(10)
    window = RecvWindow(4, max_window=16, budget=budget)
    window.received(4)
    assert window.consumed(1) == 5  # a quarter drained: grant it back plus 4 more (window 4 -> 8)
    assert window.window == 8 and budget.available == 6
    window.received(5)
    assert window.consumed(2) == 8  # threshold 2: grant 2 + 6 (the rest of the budget), window 14
    assert window.window == 14 and budget.available == 0
    window.received(8)
    assert window.consumed(14) == 14  # no budget left: no more growth
    window.release()
    assert budget.available == 10


def test_without_a_budget_the_window_stays_put() -> None:
    window = RecvWindow(4, max_window=16)
    window.received(4)
    assert window.consumed(4) == 4
    assert window.window == 4
