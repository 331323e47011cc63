"""A throwaway image registry on loopback that the embedded cluster's node pulls from.

The embedded cluster has no registry: its images are imported into containerd, never pulled.
Tests and benchmarks that need a real pull (``bench.coldstart``, ``e2e/test_images.py``) run
go-containerregistry's in-memory ``registry`` as a child process on ``localhost:<port>``, and
use its ``crane`` to push tarballs and read manifests. Both are ``go install``\\ ed once from the
Go module proxy into :func:`tools_dir`. containerd (and dockerd) speak plain HTTP to registries
on localhost, so no certificate is involved; the registry keeps everything in memory and
forgets it when stopped.

Nothing here touches the cluster: removing pulled images from containerd is
:func:`e2e.cluster.images.remove_images`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from .layout import Layout
from .prereq import _find_go

__all__ = ["GCR_MODULE", "GCR_VERSION", "Registry", "crane", "ensure_tools", "tools_dir"]

GCR_MODULE = "github.com/google/go-containerregistry"
GCR_VERSION = "v0.22.1"
TOOLS = ("registry", "crane")
DEFAULT_PORT = 5000


def tools_dir(layout: Layout | None = None) -> Path:
    """Where the tools are installed: kept with the harness's other builds (``down`` keeps it)."""
    return (layout or Layout.default()).cache / "registry-tools"


def ensure_tools(directory: Path | None = None) -> dict[str, Path]:
    """``registry`` and ``crane`` from the Go module proxy, built once into ``directory``."""
    directory = directory or tools_dir()
    tools = {name: directory / name for name in TOOLS}
    missing = [name for name, path in tools.items() if not path.exists()]
    if missing:
        go = _find_go()
        if go is None:
            raise RuntimeError("Go is not installed (needed to build the test registry): install Go and put it on PATH")
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [go, "install", *(f"{GCR_MODULE}/cmd/{name}@{GCR_VERSION}" for name in missing)],
            env={**os.environ, "GOBIN": str(directory)}, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"go install {', '.join(missing)} failed: {done.stderr.strip()[-1000:]}")
    return tools


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the registry's listener: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Registry:
    """The in-memory registry as a child process (own process group); its request log tells what was fetched.

    ``port`` is used when free, else the registry takes any free port; :attr:`host` is
    ``localhost:<port>``, the name pushes and pod specs use.
    """

    def __init__(self, binary: Path, workdir: Path, port: int = DEFAULT_PORT, timeout: float = 15.0) -> None:
        self.log_path = workdir / "registry.log"
        wanted = port if port and _port_free(port) else 0  # 0: the registry takes a free one and prints it
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(binary), "-port", str(wanted)], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(r"serving on port (\d+)", self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the registry did not start: {self.log_path.read_text(errors='replace')[-500:]}")
            time.sleep(0.05)
        self.host = f"localhost:{self.port}"

    def mark(self) -> int:
        """Where the request log is now (pass to :meth:`blobs_fetched`)."""
        return self.log_path.stat().st_size

    def requests_since(self, since: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def blobs_fetched(self, since: int, repository: str, digests: list[str]) -> int:
        """How many of ``digests`` were downloaded from ``repository`` (``GET .../blobs/<digest>``) after ``since``."""
        text = self.requests_since(since)
        got = set(re.findall(rf"GET /v2/{re.escape(repository)}/blobs/(sha256:[0-9a-f]{{64}})", text))
        return len(got & set(digests))

    def manifests_fetched(self, since: int, repository: str) -> int:
        """How many manifest GETs of ``repository`` the registry served after ``since`` (a pull makes one or more)."""
        return len(re.findall(rf"GET /v2/{re.escape(repository)}/manifests/", self.requests_since(since)))

    def stop(self) -> None:
        """SIGTERM the registry's process group, SIGKILL after 10 s; close the log."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


def crane(tools: dict[str, Path], *args: str) -> str:
    """Run ``crane --insecure ARGS`` (plain HTTP to the loopback registry) and return its output."""
    done = subprocess.run([str(tools["crane"]), "--insecure", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"crane {shlex.join(args)} failed: {done.stderr.strip()[-1000:]}")
    return done.stdout
