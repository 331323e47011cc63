"""Start the local service under test with the bridged environment (the fixture's helper).

The process gets the service's imported env, the name mapping for subprocesses (so
``http://inventory/api`` reaches the cluster's inventory), and is checked to be listening
on its local port before the helper returns. It never silently shares a port: a port
already taken by someone else is an error that says who to stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_bridge.core.errors import BridgeError
from pytest_bridge.local.ports import who_listens

__all__ = ["LocalProcess", "PortInUseError", "start_local_process"]


class PortInUseError(BridgeError):
    """The local port the bridged traffic goes to is taken by another process."""


@dataclass
class LocalProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LocalProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> list[str]:
    """An argv prefix so the child gets SIGTERM when pytest dies, even by SIGKILL (Linux).

    ``setpriv --pdeathsig`` rather than ``preexec_fn``: the tunnel's thread is running, and
    code between fork and exec is not safe in a threaded process.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv and sys.platform.startswith("linux") else []


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def start_local_process(
    argv: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str],
    log_path: Path,
    cwd: str | Path | None = None,
    wrap: Sequence[str] = (),
    timeout: float = 30.0,
) -> LocalProcess:
    if _listening(port):
        owner = who_listens(port)
        raise PortInUseError(
            f"local port {port} is already in use{f' by {owner}' if owner else ''}, so bridged traffic would "
            f"reach another process; stop it (`ss -ltnp 'sport = :{port}'`) or choose another port with "
            "--bridge-local-port"
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*_die_with_parent(), *wrap, *argv], cwd=cwd, env={**os.environ, **env}, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    local = LocalProcess(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BridgeError(
                f"the local service exited with {process.returncode} before listening:\n{local.log()[-2000:]}"
            )
        if _listening(port):
            return local
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        local.stop()
    raise BridgeError(f"the local service did not listen on port {port} within {timeout:.0f}s:\n{local.log()[-2000:]}")
