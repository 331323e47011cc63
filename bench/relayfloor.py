"""``python -m bench.relayfloor [--gib N]``: what one relay hop costs, ours against socat's.

A lane adds two relays to a ``kubectl port-forward`` path (the agent's and the tunnel
client's). This measures one relay alone, on loopback, as CPU seconds per GiB of the relay
process: our ``pytest_bridge_agent.lanes.relay`` (asyncio, ``recv_into``/``sendall``, 256 KiB
chunks) against socat (C, 256 KiB buffer), a ``splice(2)`` relay (through a pipe, no copy to
user space) and no relay at all. When ours costs what
socat costs, the rest of a relay's price is the kernel's work for the extra TCP hop, not Python.
No cluster needed; loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pytest_bridge.local.ports import free_port

MIB = 2**20
REPO = Path(__file__).resolve().parent.parent

_OUR_RELAY = """
import asyncio, socket, sys
from pytest_bridge_agent.lanes import prepare, relay

async def main(listen_port, target_port):
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", listen_port))
    server.setblocking(False)
    near, _ = await loop.sock_accept(server)
    far = prepare(socket.socket())
    await loop.sock_connect(far, ("127.0.0.1", target_port))
    await relay(prepare(near), far)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

_SPLICE_RELAY = """
import fcntl, os, socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
near, _ = server.accept()
far = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
r, w = os.pipe()
fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
while n := os.splice(near.fileno(), w, 1 << 20, flags=os.SPLICE_F_MOVE):
    while n:
        n -= os.splice(r, far.fileno(), n, flags=os.SPLICE_F_MOVE)
far.shutdown(socket.SHUT_WR)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time of the whole machine, all cores, that was not idle (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, size: int) -> dict[str, float | str | bool]:
    sink = socket.create_server(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]
    received = [0]

    def drain() -> None:
        conn, _ = sink.accept()
        with conn:
            while data := conn.recv(MIB):
                received[0] += len(data)

    port, process = sink_port, None
    if mode == "socat":
        port = free_port()
        argv = ["socat", "-b", "262144", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"TCP:127.0.0.1:{sink_port}"]
        process = subprocess.Popen(argv)
    elif mode in ("lanes relay", "splice relay"):
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "agent")}
        code = _OUR_RELAY if mode == "lanes relay" else _SPLICE_RELAY
        process = subprocess.Popen([sys.executable, "-c", code, str(port), str(sink_port)], env=env)
    if process is not None:
        # Both relays serve exactly one connection, so no probe: give them a moment to listen.
        time.sleep(0.5)
    drainer = threading.Thread(target=drain)
    drainer.start()
    chunk = b"\x5a" * MIB
    with socket.create_connection(("127.0.0.1", port)) as out:
        started, cpu_before = time.monotonic(), _cpu_seconds(process.pid) if process else 0.0
        machine_before = _machine_busy_seconds()
        for _ in range(size // MIB):
            out.sendall(chunk)
        out.shutdown(socket.SHUT_WR)
        drainer.join()
        elapsed = time.monotonic() - started
        cpu = (_cpu_seconds(process.pid) - cpu_before) if process else 0.0
        machine = _machine_busy_seconds() - machine_before
    if process is not None:
        process.terminate()
        process.wait(5)
    sink.close()
    return {
        "relay": mode,
        "MiB/s": round(size / MIB / elapsed, 1),
        "relay CPU-s/GiB": round(cpu / (size / 2**30), 3),
        "machine CPU-s/GiB": round(machine / (size / 2**30), 3),
        "bytes intact": received[0] == size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relayfloor", description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0, help="GiB per transfer (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    size = int(args.gib * 1024) * MIB
    modes = ["no relay", "lanes relay", "splice relay"] + (["socat"] if shutil.which("socat") else [])
    print("| relay | MiB/s | relay process, CPU-s/GiB | whole machine, CPU-s/GiB | bytes intact |")
    print("|---|---|---|---|---|")
    for _ in range(args.rounds):
        for mode in modes:
            row = measure(mode, size)
            print(
                f"| {row['relay']} | {row['MiB/s']} | {row['relay CPU-s/GiB']} | {row['machine CPU-s/GiB']} "
                f"| {row['bytes intact']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
