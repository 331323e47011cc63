"""Load server and load clients of the benchmarks: stdlib only, one file.

The same file runs on the host (``python -m bench.loadtool``) and, unchanged, in a pod of the
stock Python image (``python3 -c <this source> server``), which has nothing of ours.
Every connection starts with one ASCII header line that says what it is for:

``SINK <n>``            the client sends n bytes; the server answers ``OK <n> <sha256>`` and closes.
``SOURCE <n> <seed>``   the server sends n bytes of :func:`pattern` (seed) and closes.
``ECHO <n>``            the server echoes exactly n bytes back as they arrive, then closes.
``RR <size>``           request/response: read ``size`` bytes, send them back, until EOF.

A first line that is an HTTP/1.x request line switches the connection to HTTP/1.1 (kept alive),
for paths that go through the routing proxy (nginx), which only passes HTTP on routed ports:
``POST /sink`` (answers ``OK <n> <sha256>``), ``GET /source?bytes=<n>&seed=<s>``, ``POST /echo``
(the body back); anything else answers ``ok``. Every answer carries ``X-Bench-Server: <--name>``
and ``X-Bench-Route: <the kubernetes-route-as header received>``, so a client can tell which
server a request reached.

Nothing here relies on half-close (the Kubernetes port-forward protocol has none), so every
path of the benchmarks carries the same byte stream. Clients print one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from typing import Any

BLOCK = 1024 * 1024
RECV = 1024 * 1024
HEADER_LIMIT = 256


def pattern(seed: int) -> bytes:
    """The 1 MiB block a SOURCE stream (and a SINK client) repeats: cheap to make, not compressible."""
    return random.Random(seed).randbytes(BLOCK)


def pattern_digest(seed: int, size: int) -> str:
    block = memoryview(pattern(seed))
    digest = hashlib.sha256()
    left = size
    while left:
        n = min(left, BLOCK)
        digest.update(block[:n])
        left -= n
    return digest.hexdigest()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- server


def _read_header(conn: socket.socket) -> tuple[list[str], bytes]:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(HEADER_LIMIT)
        if not chunk:
            raise ConnectionError("closed before the header")
        data += chunk
        if len(data) > HEADER_LIMIT:
            raise ValueError("header too long")
    line, rest = data.split(b"\n", 1)
    return line.decode("ascii").split(), rest


def _recv_exactly(conn: socket.socket, buffer: bytearray, n: int) -> memoryview:
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        got += k
    return view


def _serve_connection(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            words, rest = _read_header(conn)
            command = words[0]
            if len(words) == 3 and words[2].startswith("HTTP/1."):
                _serve_http(conn, words, rest)
            elif command == "SINK":
                _sink(conn, int(words[1]), rest)
            elif command == "SOURCE":
                _source(conn, int(words[1]), int(words[2]))
            elif command == "ECHO":
                _echo(conn, int(words[1]), rest)
            elif command == "RR":
                _request_response(conn, int(words[1]), rest)
            else:
                conn.sendall(b"ERR unknown command\n")
        except (OSError, ValueError, IndexError):
            # A client that gives up is the client's to report; the server just moves on.
            pass


def _sink(conn: socket.socket, size: int, rest: bytes) -> None:
    digest = hashlib.sha256(rest[:size])
    got = len(rest[:size])
    buffer = bytearray(RECV)
    view = memoryview(buffer)
    while got < size:
        k = conn.recv_into(view, min(RECV, size - got))
        if not k:
            break
        digest.update(view[:k])
        got += k
    conn.sendall(f"OK {got} {digest.hexdigest()}\n".encode())


def _source(conn: socket.socket, size: int, seed: int) -> None:
    block = memoryview(pattern(seed))
    left = size
    while left:
        n = min(left, BLOCK)
        conn.sendall(block[:n])
        left -= n


def _echo(conn: socket.socket, size: int, rest: bytes) -> None:
    first = rest[:size]
    if first:
        conn.sendall(first)
    got = len(first)
    buffer = bytearray(64 * 1024)
    view = memoryview(buffer)
    while got < size:
        k = conn.recv_into(view, min(len(buffer), size - got))
        if not k:
            return
        conn.sendall(view[:k])
        got += k


def _request_response(conn: socket.socket, size: int, rest: bytes) -> None:
    pending = bytearray(rest)
    while True:
        while len(pending) < size:
            chunk = conn.recv(64 * 1024)
            if not chunk:
                return
            pending += chunk
        conn.sendall(pending[:size])
        del pending[:size]


# ----------------------------------------------------------------------------- HTTP (through the router)

HTTP_HEAD_LIMIT = 64 * 1024
SERVER_NAME = os.environ.get("BENCH_SERVER_NAME", "loadtool")
ROUTE_HEADER = "kubernetes-route-as"


class _Reader:
    """Buffered reads from a socket: HTTP heads and bodies (no chunked encoding; nothing here sends it)."""

    def __init__(self, sock: socket.socket, data: bytes = b"") -> None:
        self.sock = sock
        self.buffer = bytearray(data)

    def head(self) -> bytes | None:
        """Up to and including the blank line; None on a clean EOF before any byte."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return head
            if len(self.buffer) > HTTP_HEAD_LIMIT:
                raise ValueError("HTTP head too long")
            chunk = self.sock.recv(64 * 1024)
            if not chunk:
                if self.buffer:
                    raise ConnectionError(f"closed inside an HTTP head ({len(self.buffer)} bytes)")
                return None
            self.buffer += chunk

    def body(self, n: int, consume: Any, chunk_size: int = RECV) -> int:
        """Pass ``n`` body bytes to ``consume`` (a callable taking a memoryview); returns bytes seen."""
        got = 0
        if self.buffer:
            first = bytes(self.buffer[:n])
            del self.buffer[: len(first)]
            consume(memoryview(first))
            got = len(first)
        scratch = bytearray(min(chunk_size, max(n, 1)))
        view = memoryview(scratch)
        while got < n:
            k = self.sock.recv_into(view, min(len(scratch), n - got))
            if not k:
                break
            consume(view[:k])
            got += k
        return got


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return lines[0], headers


def _http_answer(conn: socket.socket, status: str, body: bytes | None, length: int, route: str) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Bench-Server: {SERVER_NAME}\r\nX-Bench-Route: {route}\r\n\r\n"
    ).encode()
    conn.sendall(head + body if body is not None else head)


def _serve_http(conn: socket.socket, words: list[str], rest: bytes) -> None:
    reader = _Reader(conn, rest)
    # _read_header took the request line; the header lines (if any) and the blank line follow.
    if reader.buffer.startswith(b"\r\n"):
        del reader.buffer[:2]
        headers: dict[str, str] = {}
    else:
        head = reader.head()
        if head is None:
            return
        _, headers = _parse_head(b"-\r\n" + head)
    while True:
        method, target = words[0], words[1]
        route = headers.get(ROUTE_HEADER, "")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            _http_answer(conn, "411 Length Required", b"", 0, route)
            return
        length = int(headers.get("content-length") or 0)
        path, _, query = target.partition("?")
        params = dict(item.partition("=")[::2] for item in query.split("&") if item)
        if path == "/sink":
            digest = hashlib.sha256()
            got = reader.body(length, digest.update)
            reply = f"OK {got} {digest.hexdigest()}\n".encode()
            _http_answer(conn, "200 OK", reply, len(reply), route)
        elif path == "/source" and method == "GET":
            size, seed = int(params.get("bytes", "0")), int(params.get("seed", "1"))
            _http_answer(conn, "200 OK", None, size, route)
            _source(conn, size, seed)
        elif path == "/echo":
            body = bytearray()
            reader.body(length, body.extend)
            _http_answer(conn, "200 OK", bytes(body), len(body), route)
        else:
            reader.body(length, lambda view: None)
            _http_answer(conn, "200 OK", b"ok\n", 3, route)
        if headers.get("connection", "").lower() == "close":
            return
        head = reader.head()
        if head is None:
            return
        request_line, headers = _parse_head(head)
        words = request_line.split()
        if len(words) != 3:
            return


def serve(host: str, port: int, fd: int | None = None) -> None:
    """Serve forever; ``fd``: an inherited listening socket (no race for the port with anyone else)."""
    raise_nofile()
    threading.stack_size(512 * 1024)
    if fd is not None:
        listener = socket.socket(fileno=fd)
    else:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    listener.listen(4096)
    print(f"listening {listener.getsockname()[0]} {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


# ----------------------------------------------------------------------------- clients


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def throughput(
    host: str, port: int, *, op: str, size: int, seed: int, timeout: float, expected: str | None = None
) -> dict[str, Any]:
    """One transfer of ``size`` bytes (``sink``: to the server, ``source``: from it), verified by sha256.

    ``expected`` (the digest of the stream) saves hashing it here first, outside the timed part but
    inside the CPU accounting of whoever runs this.
    """
    expected = expected or pattern_digest(seed, size)
    block = memoryview(pattern(seed))
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    got = 0
    error = None
    ok = False
    try:
        with _connect(host, port, timeout) as sock:
            if op == "sink":
                sock.sendall(f"SINK {size}\n".encode())
                left = size
                while left:
                    n = min(left, BLOCK)
                    sock.sendall(block[:n])
                    left -= n
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                words = reply.decode().split()
                got = int(words[1]) if len(words) == 3 and words[0] == "OK" else 0
                ok = len(words) == 3 and got == size and words[2] == expected
                if not ok:
                    error = f"server saw {reply.decode().strip()!r}, expected OK {size} {expected}"
            else:
                sock.sendall(f"SOURCE {size} {seed}\n".encode())
                digest = hashlib.sha256()
                buffer = bytearray(RECV)
                view = memoryview(buffer)
                # Stop at the last byte, not at EOF: how fast a forwarder passes on the close is not throughput.
                while got < size:
                    k = sock.recv_into(view, min(RECV, size - got))
                    if not k:
                        break
                    digest.update(view[:k])
                    got += k
                ok = got == size and digest.hexdigest() == expected
                if not ok:
                    error = f"received {got} of {size} bytes, sha256 {'ok' if digest.hexdigest() == expected else 'differs'}"
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    return {
        "op": op,
        "bytes": size,
        "received_or_acknowledged": got,
        "seconds": seconds,
        "mib_per_s": size / seconds / 2**20 if ok else 0.0,
        "ok": ok,
        "error": error,
        "client_cpu_seconds": cpu_seconds() - cpu0,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency(host: str, port: int, *, mode: str, count: int, size: int, warmup: int, timeout: float) -> dict[str, Any]:
    """Round trips of ``size`` bytes: on one kept-alive connection, or a new connection each."""
    payload = random.Random(7).randbytes(size)
    samples: list[float] = []
    errors: list[str] = []
    header = f"RR {size}\n".encode()

    def round_trip(sock: socket.socket, first: bool) -> None:
        sock.sendall(header + payload if first else payload)
        got = b""
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                raise ConnectionError(f"closed after {len(got)} of {size} bytes")
            got += chunk
        if got != payload:
            raise ValueError("reply differs from the request")

    if mode == "keepalive":
        try:
            with _connect(host, port, timeout) as sock:
                sock.settimeout(timeout)
                for i in range(warmup + count):
                    started = time.perf_counter_ns()
                    round_trip(sock, i == 0)
                    if i >= warmup:
                        samples.append((time.perf_counter_ns() - started) / 1e6)
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            try:
                with _connect(host, port, timeout) as sock:
                    sock.settimeout(timeout)
                    round_trip(sock, True)
            except (OSError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if i >= warmup:
                samples.append((time.perf_counter_ns() - started) / 1e6)
    ordered = sorted(samples)
    return {
        "mode": mode,
        "size": size,
        "count": len(samples),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": _percentile(ordered, 50),
        "p90_ms": _percentile(ordered, 90),
        "p99_ms": _percentile(ordered, 99),
        "max_ms": ordered[-1] if ordered else float("nan"),
        "ok": not errors and len(samples) == count,
    }


def _http_request_head(method: str, path: str, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _http_response(reader: _Reader) -> tuple[int, dict[str, str]]:
    head = reader.head()
    if head is None:
        raise ConnectionError("closed before the response")
    status_line, headers = _parse_head(head)
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    if "content-length" not in headers:
        raise ValueError(f"response without Content-Length: {status_line[:80]!r}")
    return int(parts[1]), headers


def http_throughput(
    host: str,
    port: int,
    *,
    op: str,
    size: int,
    seed: int,
    timeout: float,
    headers: dict[str, str],
    expected: str | None = None,
) -> dict[str, Any]:
    """Like :func:`throughput`, over HTTP/1.1: ``sink`` POSTs ``size`` bytes to /sink, ``source`` GETs them."""
    expected = expected or pattern_digest(seed, size)
    block = memoryview(pattern(seed))
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    got, ok, error, server = 0, False, None, ""
    try:
        with _connect(host, port, timeout) as sock:
            reader = _Reader(sock)
            if op == "sink":
                sock.sendall(_http_request_head("POST", "/sink", headers, size))
                left = size
                while left:
                    n = min(left, BLOCK)
                    sock.sendall(block[:n])
                    left -= n
                status, reply_headers = _http_response(reader)
                server = reply_headers.get("x-bench-server", "")
                parts: list[bytes] = []
                reader.body(int(reply_headers["content-length"]), lambda view: parts.append(bytes(view)))
                words = b"".join(parts).decode(errors="replace").split()
                got = int(words[1]) if status == 200 and len(words) == 3 and words[0] == "OK" else 0
                ok = got == size and words[2] == expected
                if not ok:
                    error = f"HTTP {status}, server saw {words!r}, expected OK {size} {expected}"
            else:
                sock.sendall(_http_request_head("GET", f"/source?bytes={size}&seed={seed}", headers, None))
                status, reply_headers = _http_response(reader)
                server = reply_headers.get("x-bench-server", "")
                digest = hashlib.sha256()
                got = reader.body(min(size, int(reply_headers["content-length"])), digest.update)
                ok = status == 200 and got == size and digest.hexdigest() == expected
                if not ok:
                    error = f"HTTP {status}, received {got} of {size} bytes, sha256 {'ok' if digest.hexdigest() == expected else 'differs'}"
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    return {
        "op": op, "bytes": size, "received_or_acknowledged": got, "seconds": seconds,
        "mib_per_s": size / seconds / 2**20 if ok else 0.0, "ok": ok, "error": error, "server": server,
        "client_cpu_seconds": cpu_seconds() - cpu0,
    }  # fmt: skip


def http_latency(
    host: str,
    port: int,
    *,
    mode: str,
    count: int,
    size: int,
    warmup: int,
    timeout: float,
    headers: dict[str, str],
    path: str = "/echo",
    expect_server: str | None = None,
) -> dict[str, Any]:
    """Like :func:`latency`, over HTTP/1.1: POST ``size`` bytes to ``path``, which echoes them.

    ``expect_server``: every reply must carry this ``X-Bench-Server`` (which side answered), else
    it counts as an error; a server without that header (the sample app) is named ``-``.
    """
    payload = random.Random(7).randbytes(size)
    request = _http_request_head("POST", path, headers, size) + payload
    samples: list[float] = []
    errors: list[str] = []
    servers: dict[str, int] = {}

    def round_trip(sock: socket.socket, reader: _Reader) -> None:
        sock.sendall(request)
        status, reply_headers = _http_response(reader)
        parts: list[bytes] = []
        reader.body(int(reply_headers["content-length"]), lambda view: parts.append(bytes(view)))
        server = reply_headers.get("x-bench-server", "-")
        servers[server] = servers.get(server, 0) + 1
        if status != 200 or b"".join(parts) != payload:
            raise ValueError(f"HTTP {status}: reply differs from the request")
        if expect_server is not None and server != expect_server:
            raise ValueError(f"answered by {server!r}, not {expect_server!r}")

    if mode == "keepalive":
        try:
            with _connect(host, port, timeout) as sock:
                sock.settimeout(timeout)
                reader = _Reader(sock)
                for i in range(warmup + count):
                    started = time.perf_counter_ns()
                    round_trip(sock, reader)
                    if i >= warmup:
                        samples.append((time.perf_counter_ns() - started) / 1e6)
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            try:
                with _connect(host, port, timeout) as sock:
                    sock.settimeout(timeout)
                    round_trip(sock, _Reader(sock))
            except (OSError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if i >= warmup:
                samples.append((time.perf_counter_ns() - started) / 1e6)
    ordered = sorted(samples)
    return {
        "mode": mode, "size": size, "count": len(samples), "errors": len(errors), "first_errors": errors[:3],
        "servers": servers, "p50_ms": _percentile(ordered, 50), "p90_ms": _percentile(ordered, 90),
        "p99_ms": _percentile(ordered, 99), "max_ms": ordered[-1] if ordered else float("nan"),
        "ok": not errors and len(samples) == count,
    }  # fmt: skip


async def _concurrency(
    host: str, port: int, *, connections: int, size: int, seed: int, limit_s: float
) -> dict[str, Any]:
    """``connections`` ECHO streams that are all open end to end at once, each checked by sha256.

    Each connection sends half its payload and waits for its echo (so the stream reaches the
    server), then waits until every other connection got that far (or failed), then sends the rest.
    """
    half = size // 2
    arrived = 0
    all_arrived = asyncio.Event()
    results: list[dict[str, Any]] = []
    connect_ms: list[float] = []

    def arrive() -> None:
        nonlocal arrived
        arrived += 1
        if arrived >= connections:
            all_arrived.set()

    async def one(index: int) -> None:
        payload = random.Random(seed * 1_000_003 + index).randbytes(size)
        expected = hashlib.sha256(payload).hexdigest()
        received = bytearray()
        counted = False
        writer = None
        try:
            async with asyncio.timeout(limit_s):
                started = time.perf_counter()
                reader, writer = await asyncio.open_connection(host, port)
                connect_ms.append((time.perf_counter() - started) * 1000)
                writer.write(f"ECHO {size}\n".encode() + payload[:half])
                await writer.drain()
                received += await reader.readexactly(half)
                arrive()
                counted = True
                await all_arrived.wait()
                writer.write(payload[half:])
                await writer.drain()
                received += await reader.readexactly(size - half)
                extra = await reader.read(1)
            ok = hashlib.sha256(received).hexdigest() == expected and not extra
            results.append({"ok": ok, "lost": 0 if ok else size - len(received), "corrupt": not ok, "error": None})
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                received += exc.partial
            error = f"{type(exc).__name__}: {exc}"
            results.append({"ok": False, "lost": size - len(received), "corrupt": False, "error": error})
        finally:
            if not counted:
                arrive()
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    seconds = time.perf_counter() - started
    errors = [r for r in results if r["error"]]
    corrupt = [r for r in results if r["corrupt"]]
    ordered = sorted(connect_ms)
    return {
        "connections": connections,
        "bytes_per_connection": size,
        "seconds": seconds,
        "errors": len(errors),
        "first_errors": sorted({str(r["error"]) for r in errors})[:3],
        "corrupt_connections": len(corrupt),
        "bytes_lost": sum(int(r["lost"]) for r in results),
        "connect_p50_ms": _percentile(ordered, 50),
        "connect_max_ms": ordered[-1] if ordered else float("nan"),
        "ok": not errors and not corrupt and len(results) == connections,
    }


def concurrency(host: str, port: int, *, connections: int, size: int, seed: int, timeout: float) -> dict[str, Any]:
    limit = raise_nofile()
    if limit < connections + 64:
        return {"connections": connections, "ok": False, "errors": connections, "bytes_lost": 0,
                "first_errors": [f"RLIMIT_NOFILE is {limit}"]}  # fmt: skip
    return asyncio.run(_concurrency(host, port, connections=connections, size=size, seed=seed, limit_s=timeout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtool", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--port", type=int, default=9000)
    server.add_argument("--fd", type=int, help="serve on this inherited, bound socket instead")
    server.add_argument("--name", help="X-Bench-Server of HTTP answers (default: $BENCH_SERVER_NAME or loadtool)")
    for name in ("throughput", "latency", "concurrency", "http-throughput", "http-latency"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--seed", type=int, default=1)
        if name.startswith("http-"):
            p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
        if name == "http-latency":
            p.add_argument("--path", default="/echo")
            p.add_argument("--expect-server", help="every reply must carry this X-Bench-Server")
        if name in ("throughput", "http-throughput"):
            p.add_argument("--op", choices=("sink", "source"), required=True)
            p.add_argument("--bytes", type=int, required=True)
            p.add_argument("--expect", help="sha256 of the stream, if known (see pattern_digest)")
        elif name in ("latency", "http-latency"):
            p.add_argument("--mode", choices=("keepalive", "newconn"), required=True)
            p.add_argument("--count", type=int, default=1000)
            p.add_argument("--size", type=int, default=100)
            p.add_argument("--warmup", type=int, default=20)
        else:
            p.add_argument("--connections", type=int, required=True)
            p.add_argument("--bytes", type=int, default=32 * 1024)
    args = parser.parse_args(argv)
    if args.command == "server":
        global SERVER_NAME  # noqa: PLW0603 - the one setting of this process's HTTP answers
        SERVER_NAME = args.name or SERVER_NAME
        serve(args.host, args.port, args.fd)
        return 0
    headers = dict(h.split(":", 1) for h in getattr(args, "header", []))
    if args.command == "http-throughput":
        result = http_throughput(
            args.host, args.port, op=args.op, size=args.bytes, seed=args.seed, timeout=args.timeout,
            headers=headers, expected=args.expect,
        )  # fmt: skip
    elif args.command == "http-latency":
        result = http_latency(
            args.host, args.port, mode=args.mode, count=args.count, size=args.size, warmup=args.warmup,
            timeout=args.timeout, headers=headers, path=args.path, expect_server=args.expect_server,
        )  # fmt: skip
    elif args.command == "throughput":
        result = throughput(
            args.host,
            args.port,
            op=args.op,
            size=args.bytes,
            seed=args.seed,
            timeout=args.timeout,
            expected=args.expect,
        )
    elif args.command == "latency":
        result = latency(
            args.host,
            args.port,
            mode=args.mode,
            count=args.count,
            size=args.size,
            warmup=args.warmup,
            timeout=args.timeout,
        )
    else:
        result = concurrency(
            args.host, args.port, connections=args.connections, size=args.bytes, seed=args.seed, timeout=args.timeout
        )
    result["client_cpu_seconds_total"] = cpu_seconds()
    result["client_max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
    os._exit(130)
