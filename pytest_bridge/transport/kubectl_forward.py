"""The ``kubectl`` transport: the tunnel rides ``kubectl port-forward`` instead of our WebSocket.

``--bridge-transport=kubectl`` starts one ``kubectl port-forward pod/<agent> :<control port>``
per tunnel and connects to the local port it reports. kubectl (≥ 1.31) speaks the newer
port-forward protocol, which costs containerd a third of the CPU per byte of the
``v4.channel.k8s.io`` WebSocket protocol our own client uses (BENCHMARKS.md), at the price of
a kubectl binary and a process per tunnel. Each connection to kubectl's local port becomes a
new stream of its one connection to the node, so bridged connections ride lanes of their own
(``pytest_bridge_agent.lanes``) instead of sharing the multiplexed connection. The process gets SIGTERM when pytest dies
(``PR_SET_PDEATHSIG`` via ``setpriv``, when available) and is stopped with the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable

from pytest_bridge_agent.lanes import LANE_POOL

from pytest_bridge.core.errors import ConnectError
from pytest_bridge.transport.tunnel import tcp_socket_connector

__all__ = ["KubectlForward", "kubectl_or_none", "lane_pool", "parse_forwarding_port"]

_FORWARDING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) ->")


def parse_forwarding_port(line: bytes) -> int | None:
    """The local port from kubectl's "Forwarding from 127.0.0.1:PORT -> REMOTE" line."""
    match = _FORWARDING.search(line)
    return int(match.group(1)) if match else None


def lane_pool() -> int:
    """Idle lanes of each direction to keep open (``PYTEST_BRIDGE_LANES``; 0: streams only)."""
    raw = os.environ.get("PYTEST_BRIDGE_LANES", "").strip()
    if not raw:
        return LANE_POOL
    try:
        count = int(raw)
    except ValueError:
        raise ConnectError(f"PYTEST_BRIDGE_LANES={raw!r}: expected a whole number (0 turns lanes off)") from None
    if not 0 <= count <= 64:
        raise ConnectError(f"PYTEST_BRIDGE_LANES={raw!r}: expected 0 to 64")
    return count


def kubectl_or_none() -> str | None:
    """``PYTEST_BRIDGE_KUBECTL``, else kubectl on PATH, else None."""
    return os.environ.get("PYTEST_BRIDGE_KUBECTL") or shutil.which("kubectl")


def find_kubectl() -> str:
    found = kubectl_or_none()
    if not found:
        raise ConnectError(
            "--bridge-transport=kubectl needs a kubectl binary: put it on PATH or set PYTEST_BRIDGE_KUBECTL"
        )
    return found


class KubectlForward:
    """One ``kubectl port-forward`` process; :meth:`connect` opens a connection through it."""

    def __init__(
        self,
        pod: str | Callable[[], str],
        namespace: str,
        port: int,
        *,
        kubeconfig: str | None,
        context: str | None,
        timeout: float,
    ) -> None:
        """``pod``: the pod's name, or what tells it each time kubectl (re)starts (it may be replaced)."""
        argv = [find_kubectl()]
        if kubeconfig:
            argv += ["--kubeconfig", kubeconfig]
        if context:
            argv += ["--context", context]
        argv += ["-n", namespace, "port-forward", "--address", "127.0.0.1"]
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        self._argv = argv
        self._pod = pod if callable(pod) else (lambda: pod)
        self._port_spec = f":{port}"
        self._timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._namespace = namespace
        self.what = f"kubectl port-forward to {namespace}:{port}"

    def _ensure(self) -> int:
        """The local port of a running kubectl, started if needed (blocking; called in a thread)."""
        with self._lock:
            if self._process is not None and self._process.poll() is None and self._port is not None:
                return self._port
            self._stop_locked()
            pod = self._pod()
            self.what = f"kubectl port-forward to pod {self._namespace}/{pod}{self._port_spec}"
            process = subprocess.Popen(
                [*self._argv, f"pod/{pod}", self._port_spec],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            self._process = process
            assert process.stdout is not None
            line = process.stdout.readline()
            port = parse_forwarding_port(line)
            if port is None:
                self._stop_locked()
                err = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
                raise ConnectError(f"{self.what} did not start: {(line.decode(errors='replace') + err).strip()}")
            # Keep draining stdout (one line per handled connection) so kubectl never blocks on it.
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            self._port = port
            return port

    async def _local_port(self) -> int:
        """kubectl's local port: read without a thread while it runs, else (re)started in one."""
        process, port = self._process, self._port
        if process is None or port is None or process.poll() is not None:
            port = await asyncio.wait_for(asyncio.to_thread(self._ensure), self._timeout)
        return port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", await self._local_port(), limit=1024 * 1024)

    async def connect_socket(self) -> socket.socket:
        """A plain connection through the same kubectl (a lane: kubectl opens a new stream for it)."""
        return await tcp_socket_connector("127.0.0.1", await self._local_port())()

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        process, self._process, self._port = self._process, None, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _drain(stream: object) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _ in stream:  # type: ignore[attr-defined]
            pass
