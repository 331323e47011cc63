"""The shared vocabulary of a session and its isolated routes: what one bridge is made of.

``session.py`` (the bridge) and ``isolation.py`` (routes) both build and tear down
:class:`Connection` objects and hand :class:`BridgedService` values to tests; they live here,
below both, so neither imports the other for them. No I/O here.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_bridge.cluster import restore
from pytest_bridge.core import names
from pytest_bridge.core.errors import ConnectError
from pytest_bridge.core.plan import BridgePlan
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

__all__ = ["PULL_FAILURES", "AgentStartCheck", "BridgedService", "Connection"]

PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
_START_FAILURES = {"CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}
_START_FAILURE_GRACE = 20.0  # seconds a start failure may last before connect gives up


class AgentStartCheck:
    """Fails fast when an agent pod cannot start: at once if its image cannot be pulled, and after
    a grace if the container cannot start (some of those are transient, e.g. the kubelet's
    "failed to sync secret cache" right after the token Secret was created)."""

    def __init__(self, image: str, what: str) -> None:
        self.image = image
        self.what = what
        self._failing_since: float | None = None

    def check(self, pod: Any) -> None:
        """ConnectError if ``pod`` (a client V1Pod) shows a pull error, or a start error that lasts."""
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting and waiting.reason in PULL_FAILURES:
                raise ConnectError(
                    f"{self.what}: the image {self.image!r} cannot be pulled ({waiting.reason}: "
                    f"{waiting.message or ''}); the cluster must be able to pull it: mirror it to a registry the "
                    "cluster reaches and pass --bridge-agent-image (see `pytest-bridge images --help`)"
                )
            if waiting and waiting.reason in _START_FAILURES:
                self._failing_since = self._failing_since or time.monotonic()
                if time.monotonic() - self._failing_since > _START_FAILURE_GRACE:
                    raise ConnectError(f"{self.what} cannot start ({waiting.reason}: {waiting.message or ''})")


@dataclass
class BridgedService:
    """What a test sees of one bridged service (the ``bridged_service`` fixture's value)."""

    name: str
    namespace: str
    plan: BridgePlan
    local_ports: dict[int, int]  # target port in the pod -> local port the traffic goes to
    env: dict[str, str] = field(repr=False)  # secrets among them: never in a traceback or report
    session_dir: Path
    mapping: names.NameMapping = field(repr=False)
    agent_pod: str
    dropped_env: tuple[str, ...] = ()
    # mountPath in the container -> local folder (a subPath file: the file) of each fetched volume
    volumes: dict[str, str] = field(default_factory=dict)
    skipped_volumes: tuple[str, ...] = ()  # mounts not fetched, each "<mountPath> (<kind> <name>: why)"

    @property
    def local_port(self) -> int:
        """The local port of the first target port (the common one-port case)."""
        return self.local_ports[self.plan.target_ports[0]]

    def url(self, service: str, port: int | None = None, path: str = "") -> str:
        """``http://<service>.<ns>:<port><path>``: a cluster name that resolves to the local mapping."""
        svc, _, ns = service.partition(".")
        entry = self.mapping.service(svc, ns or self.namespace)
        remote = port if port is not None else entry.ports[0].remote_port
        qualified = [name for name in entry.hostnames if "." in name]  # svc.ns unless that is a public name
        host = qualified[0] if qualified else f"{svc}.{ns or self.namespace}.svc"
        return f"http://{host}:{entry.local_port(remote)}{path}"


@dataclass
class Connection:
    """One bridged service (or isolated route) while it is set up and torn down."""

    service: str
    plan: BridgePlan | None = None
    # Names this bridge's objects in the cluster (agent label, guard, record, token): the session
    # id for the first service, ``<session>-<n>`` for more, so each service has its own guard.
    key: str = ""
    record: restore.RestoreRecord | None = None
    patched: bool = False
    guard: bool = False
    tunnel: BackgroundTunnel | None = None
    bridged: BridgedService | None = None
    # The tunnel's secret, one per bridged service or route; the cluster sees only its SHA-256.
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
