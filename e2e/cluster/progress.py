"""Progress of the harness's long steps: a line every few seconds saying what a build is doing.

A cold ``up`` spends minutes in ``go build`` of Kubernetes and in debootstrap, both writing to a
log file only. :func:`run_with_progress` runs such a command and, while it runs, reports the step,
the time it has taken so far and what its log says it is doing now (:func:`go_activity`,
:func:`last_line`), so a terminal (``scripts/demo.sh``) never sits silent for five minutes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["elapsed", "go_activity", "last_line", "run_with_progress"]

EVERY = 15.0  # seconds between progress lines
_TAIL = 4096  # bytes of the log read for the last line


def elapsed(seconds: float) -> str:
    """``42s``, ``3m05s``."""
    whole = int(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


def go_activity(text: str) -> str:
    """What ``go build -v`` is doing, from the end of its output."""
    line = last_line(text)
    if line.startswith("go: downloading "):
        return f"downloading modules ({line.removeprefix('go: downloading ')})"
    if line.startswith("go: "):
        return line.removeprefix("go: ")
    if line.startswith("# "):
        return f"compiling {line.removeprefix('# ')}"
    if line and " " not in line and not line.startswith("$"):
        return f"compiling {line}"
    return "starting"


def _tail(log: Path, start: int) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(max(start, log.stat().st_size - _TAIL))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def run_with_progress(
    cmd: Sequence[str],
    *,
    log: Path,
    what: str,
    report: Callable[[str], None],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    activity: Callable[[str], str] = last_line,
    every: float = EVERY,
) -> int:
    """Run ``cmd`` with its output appended to ``log``; every ``every`` seconds report
    ``"<what>: 1m15s so far, <activity of the log>"``. Returns the exit code."""
    start = log.stat().st_size if log.exists() else 0
    started = time.monotonic()
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(cmd), cwd=cwd, env=dict(env) if env is not None else dict(os.environ), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            while True:
                try:
                    return process.wait(timeout=every)
                except subprocess.TimeoutExpired:
                    doing = activity(_tail(log, start)) or "working"
                    report(f"{what}: {elapsed(time.monotonic() - started)} so far, {doing}")
        except BaseException:
            process.kill()
            process.wait()
            raise
