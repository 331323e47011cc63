"""Long-running processes of the embedded cluster: start detached, one log each, stop for sure.

Each component runs in its own session (it outlives the ``up`` command) with its pid in
``state/run/<name>.pid`` and its output in ``state/logs/<name>.log``. ``stop`` sends SIGTERM,
waits, then SIGKILLs; a pid is only trusted while its command line still names the binary,
so a recycled pid is never killed. Next to the pid, a fingerprint of what the process was
started with (command line, environment, configuration text), so a caller can tell a process
that must be restarted to take a new configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout

__all__ = ["Component", "cmdline", "is_running", "pid_of", "start", "started_as", "stop"]


@dataclass(frozen=True)
class Component:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    config: str = ""  # the text of its configuration files: read at start only

    def fingerprint(self) -> str:
        text = "\0".join([*self.argv, "", *(f"{k}={v}" for k, v in self.env), "", self.config])
        return hashlib.sha256(text.encode()).hexdigest()


def _pidfile(layout: Layout, name: str) -> Path:
    return layout.run / f"{name}.pid"


def _fingerprint_file(layout: Layout, name: str) -> Path:
    return layout.run / f"{name}.fingerprint"


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (spaces for NULs), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``Z`` for a zombie), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_of(layout: Layout, name: str) -> int | None:
    """The live pid recorded for ``name``, or None if it is not running."""
    pidfile = _pidfile(layout, name)
    try:
        pid, binary = pidfile.read_text().split(" ", 1)
    except (OSError, ValueError):
        return None
    command = cmdline(int(pid))
    if not command or binary.strip() not in command:
        return None
    return None if _state(int(pid)) in (None, "Z") else int(pid)


def is_running(layout: Layout, name: str) -> bool:
    return pid_of(layout, name) is not None


def started_as(layout: Layout, component: Component) -> bool:
    """Whether ``component`` runs, started with this very command line, environment and configuration."""
    pid = pid_of(layout, component.name)
    if pid is None:
        return False
    try:
        return _fingerprint_file(layout, component.name).read_text() == component.fingerprint()
    except FileNotFoundError:
        # Started before fingerprints were kept: the command line is all there is to compare.
        return not component.config and cmdline(pid).strip() == " ".join(component.argv)


def start(layout: Layout, component: Component) -> int:
    """Start ``component`` unless it already runs; return its pid."""
    running = pid_of(layout, component.name)
    if running is not None:
        return running
    layout.run.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    log = (layout.logs / f"{component.name}.log").open("ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(component.argv)}\n".encode())
    log.flush()
    env = dict(os.environ)
    env.update(dict(component.env))
    proc = subprocess.Popen(
        component.argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    log.close()
    _pidfile(layout, component.name).write_text(f"{proc.pid} {component.argv[0]}")
    _fingerprint_file(layout, component.name).write_text(component.fingerprint())
    # /proc/<pid>/cmdline can still show the parent's for a moment after Popen returns;
    # wait until the pid is recognisable, so a liveness check right after start is true.
    deadline = time.monotonic() + 2.0
    while pid_of(layout, component.name) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc.pid


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Reap it if it is our child (it is when started in this same process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.05)
    return False


def stop(layout: Layout, name: str, timeout: float = 10.0) -> bool:
    """Stop ``name`` (TERM, then KILL). Return True if it was running."""
    pid = pid_of(layout, name)
    _pidfile(layout, name).unlink(missing_ok=True)
    _fingerprint_file(layout, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if _wait_gone(pid, wait):
            return True
    raise RuntimeError(f"{name} (pid {pid}) did not exit after SIGKILL")
