"""Load server and load clients of the benchmarks: stdlib only, one file.

The same file runs on the host (``python -m bench.loadtool``) and, unchanged, in a pod of the
sample-app image (``python3 -c <this source> server``), which has a bare Python and nothing else.
Every connection starts with one ASCII header line that says what it is for:

``SINK <n>``            the client sends n bytes; the server answers ``OK <n> <sha256>`` and closes.
``SOURCE <n> <seed>``   the server sends n bytes of :func:`pattern` (seed) and closes.
``ECHO <n>``            the server echoes exactly n bytes back as they arrive, then closes.
``RR <size>``           request/response: read ``size`` bytes, send them back, until EOF.

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
            if command == "SINK":
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
    for name in ("throughput", "latency", "concurrency"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--seed", type=int, default=1)
        if name == "throughput":
            p.add_argument("--op", choices=("sink", "source"), required=True)
            p.add_argument("--bytes", type=int, required=True)
            p.add_argument("--expect", help="sha256 of the stream, if known (see pattern_digest)")
        elif name == "latency":
            p.add_argument("--mode", choices=("keepalive", "newconn"), required=True)
            p.add_argument("--count", type=int, default=1000)
            p.add_argument("--size", type=int, default=100)
            p.add_argument("--warmup", type=int, default=20)
        else:
            p.add_argument("--connections", type=int, required=True)
            p.add_argument("--bytes", type=int, default=32 * 1024)
    args = parser.parse_args(argv)
    if args.command == "server":
        serve(args.host, args.port, args.fd)
        return 0
    if args.command == "throughput":
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
