"""Local port choices that nothing else on the machine is handed in the meantime.

A port found free by ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range,
the range every later ``bind(0)`` on the machine draws from too. The plugin chooses a
local service port when the session connects, but the test may start the local service
much later; in between, any program binding port 0 — our own ``kubectl port-forward``
listener, a test server, another CI job — can be given the same number, and the local
service then fails with "port in use" (or, worse, bridged traffic reaches that program).

:func:`free_port` therefore chooses, at random, a free port *below* the ephemeral range,
which the kernel never hands out by itself. Two sessions choosing at the same moment
collide only by chance (about one in ten thousand) and the port-in-use check before the
local service starts still catches it.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

__all__ = ["ephemeral_range", "free_port", "port_free", "who_listens"]

# Below this, ports are often fixed by convention (databases, dev servers): never chosen.
LOWEST_CHOSEN = 15000
_LINUX_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# The IANA range, used by macOS and Windows and as a fallback.
_IANA_EPHEMERAL = (49152, 65535)
_random = random.SystemRandom()


def ephemeral_range(range_file: Path = _LINUX_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (``first``, ``last``), where ``bind(0)`` ports come from."""
    if sys.platform.startswith("linux"):
        try:
            first, last = (int(part) for part in range_file.read_text().split())
        except (OSError, ValueError):
            pass
        else:
            return first, last
    return _IANA_EPHEMERAL


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind ``host:port`` now (as a server with SO_REUSEADDR would)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port(host: str = "127.0.0.1", *, exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port on ``host`` outside the ephemeral range (see the module text), not in ``exclude``."""
    first, _ = ephemeral_range()
    span = first - LOWEST_CHOSEN
    if span >= 1000:
        start = _random.randrange(span)  # at random, then in turn, as the kernel does
        for step in range(span):
            port = LOWEST_CHOSEN + (start + step) % span
            if port not in exclude and port_free(port, host):
                return port
    # A machine whose ephemeral range starts low (or a crowded one): the kernel's choice.
    while True:
        port = _kernel_port(host)
        if port not in exclude:
            return port


def who_listens(port: int, proc: Path = Path("/proc")) -> str:
    """Which processes listen on TCP ``port`` (``"kubectl (pid 42)"``), for an error message.

    Linux only, best effort: the listening sockets of this network namespace from
    ``/proc/net/tcp{,6}``, their owners from ``/proc/PID/fd`` (only our own processes unless
    root). Empty when nothing can be told.
    """
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return ""
    owners: list[str] = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
            name = (pid_dir / "comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    owners.append(f"{name} (pid {pid_dir.name})")
                    break
            except OSError:
                continue
    return ", ".join(owners)
