"""What the benchmarks read from /proc: CPU seconds and memory of processes, and the machine.

Everything here is read-only except :func:`reset_peak_rss`, which writes ``5`` to a process's
``clear_refs`` (resets its VmHWM, the kernel's peak-RSS counter) so a peak can be taken per phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CpuByKind",
    "CpuMeter",
    "RssSampler",
    "find_pids",
    "listen_drops",
    "machine_info",
    "memory_kib",
    "pids_in_pod",
    "reset_peak_rss",
    "system_cpu",
]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (threads included), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot, all cores."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB; empty if the process is gone."""
    result: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                result[key] = int(value.split()[0])
    return result


def listen_drops(pid: int) -> int | None:
    """TcpExt ListenDrops of the network namespace ``pid`` lives in: SYNs or handshakes a full
    listen queue threw away (the client retries after 1 s, 3 s, ...)."""
    try:
        lines = Path(f"/proc/{pid}/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenDrops", 0))
    return None


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def find_pids(comm: str) -> list[int]:
    """Processes whose command name (``/proc/PID/comm``, 15 characters) is ``comm``."""
    return [pid for pid in _all_pids() if _comm(pid) == comm[:15]]


def pids_in_pod(pod_uid: str, argv_contains: str | None = None) -> list[int]:
    """Host PIDs of a pod's processes (this node only), found by the pod UID in their cgroup path."""
    needles = (f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}")
    found = []
    for pid in _all_pids():
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        if not any(needle in cgroups for needle in needles) or _comm(pid) == "pause":
            continue
        if argv_contains is not None and not any(argv_contains in arg for arg in _cmdline(pid)):
            continue
        found.append(pid)
    return found


def _all_cpu() -> dict[int, float]:
    """CPU seconds of every user-space process now (kernel threads have no cmdline and are left out)."""
    result = {}
    for pid in _all_pids():
        if not any(_cmdline(pid)):
            continue
        seconds = cpu_seconds(pid)
        if seconds is not None:
            result[pid] = seconds
    return result


@dataclass
class CpuMeter:
    """CPU seconds used between :meth:`start` and :meth:`stop`: by named processes, by every other
    process on the machine (other people's test runs share this VM), and by the machine as a whole."""

    pids: Mapping[str, list[int]]
    _before: dict[int, float] = field(default_factory=dict)
    _system_before: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self._before = _all_cpu()
        self._system_before = system_cpu()

    def stop(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        after = _all_cpu()
        busy, total = system_cpu()
        delta = {pid: seconds - self._before.get(pid, 0.0) for pid, seconds in after.items()}
        used: dict[str, float] = {}
        ours: set[int] = set()
        for name, pids in self.pids.items():
            used[name] = round(sum(delta.get(pid, 0.0) for pid in pids), 3)
            ours.update(pids)
        used.update({name: round(value, 3) for name, value in (extra or {}).items()})
        used["other processes"] = round(sum(v for pid, v in delta.items() if pid not in ours), 3)
        busy0, total0 = self._system_before
        attributed = sum(delta.values()) + sum((extra or {}).values())
        used["kernel and exited processes"] = round(max(0.0, busy - busy0 - attributed), 3)
        used["machine busy"] = round(busy - busy0, 3)
        used["machine capacity"] = round(total - total0, 3)
        return used


class CpuByKind:
    """CPU seconds of every process on the machine, summed by kind, sampled once a second in a thread.

    ``kind(comm, argv)`` names what a process is (e.g. "kubelet", "route agent"). A process first
    seen in a sample counts from its start; what a process used in its last second before it
    exited is lost (short-lived ones go under "kernel and exited processes", the machine's busy
    time that no sampled process accounts for).
    """

    def __init__(self, kind: Callable[[str, list[str]], str], interval: float = 1.0) -> None:
        self.kind, self.interval = kind, interval
        self._seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, last CPU seconds)
        self._used: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-by-kind", daemon=True)
        self._system_before = (0.0, 0.0)

    def start(self) -> CpuByKind:
        self._system_before = system_cpu()
        for pid, seconds in _all_cpu().items():  # what ran before the start is not counted
            self._seen[pid] = (self.kind(_comm(pid), _cmdline(pid)), seconds)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for pid, seconds in _all_cpu().items():
            known = self._seen.get(pid)
            kind, before = known if known is not None else (self.kind(_comm(pid), _cmdline(pid)), 0.0)
            self._used[kind] = self._used.get(kind, 0.0) + max(0.0, seconds - before)
            self._seen[pid] = (kind, seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, float]:
        """Kind -> CPU seconds, largest first, with the machine's busy time and capacity."""
        self._stop.set()
        self._thread.join()
        self._sample()
        busy, total = system_cpu()
        busy0, total0 = self._system_before
        result = {k: round(v, 1) for k, v in sorted(self._used.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        result["kernel and exited processes"] = round(max(0.0, busy - busy0 - sum(self._used.values())), 1)
        result["machine busy"] = round(busy - busy0, 1)
        result["machine capacity"] = round(total - total0, 1)
        return result


class RssSampler:
    """Polls VmRSS of some processes in a thread and keeps the largest value seen (KiB)."""

    def __init__(self, pids: Callable[[], Mapping[str, int | None]], interval: float = 0.05) -> None:
        self._pids = pids
        self._interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self._pids().items():
                if pid is None:
                    continue
                rss = memory_kib(pid).get("VmRSS")
                if rss is not None and rss > self.peak.get(name, 0):
                    self.peak[name] = rss
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else "?"


def _git_state() -> str:
    """The commit measured, and whether the code under test differs from it (others edit the tree)."""
    repo = Path(__file__).resolve().parent.parent
    head = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "pytest_bridge", "agent"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return head
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head} + uncommitted changes in {', '.join(changed)}" if changed else head


def machine_info(kubectl: str, kubeconfig: str) -> dict[str, object]:
    """The machine the figures come from, read now (not assumed)."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = f"{int(line.split()[1]) // 1024} MiB"
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    server = client = "?"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError):
        out = subprocess.run(
            [kubectl, "version", "-o", "json"], capture_output=True, text=True, timeout=20, env=env, check=False
        ).stdout
        versions = json.loads(out)
        server = versions.get("serverVersion", {}).get("gitVersion", "?")
        client = versions.get("clientVersion", {}).get("gitVersion", "?")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem_total,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kubernetes_server": server,
        "kubectl": client,
        "containerd": _first_line(["containerd", "--version"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "git": _git_state(),
    }
