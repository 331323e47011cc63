"""Where the embedded cluster keeps things and which addresses and ports it uses (pure data).

State (removed by ``down``) and cache (kept: Go builds, images) are separate so a
``down``/``up`` cycle starts clean but warm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KUBERNETES_VERSION", "Layout", "Ports"]

KUBERNETES_VERSION = "v1.34.4"


@dataclass(frozen=True)
class Ports:
    """Host ports the embedded cluster listens on (checked free before ``up``)."""

    apiserver: int = 6443
    etcd_client: int = 23790
    etcd_peer: int = 23800
    kubelet: int = 10250
    kubelet_healthz: int = 10248
    controller_manager: int = 10257
    scheduler: int = 10259
    proxy_healthz: int = 10256
    proxy_metrics: int = 10249

    def named(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class Layout:
    state: Path
    cache: Path
    repo: Path
    ports: Ports = field(default_factory=Ports)
    node_name: str = "pytest-bridge-node"
    # An interface of our own (a port-less bridge) holds the node IP: reachable from pods (via the CNI bridge gateway)
    # and from the host, but not exposed on any real network interface.
    node_interface: str = "pbr-node0"
    node_ip: str = "10.250.0.1"
    cni_bridge: str = "pbr-cni0"
    pod_cidr: str = "10.244.0.0/16"
    node_pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    kubernetes_service_ip: str = "10.96.0.1"
    dns_service_ip: str = "10.96.0.10"
    cluster_domain: str = "cluster.local"
    containerd_socket: Path = Path("/run/containerd/containerd.sock")

    @classmethod
    def default(cls, repo: Path | None = None) -> Layout:
        env = os.environ
        ports = Ports(apiserver=int(env.get("PYTEST_BRIDGE_APISERVER_PORT", "6443")))
        return cls(
            state=Path(env.get("PYTEST_BRIDGE_CLUSTER_STATE", "/var/lib/pytest-bridge/embedded")),
            cache=Path(env.get("PYTEST_BRIDGE_CACHE", "/var/cache/pytest-bridge")),
            repo=repo or Path(__file__).resolve().parents[2],
            ports=ports,
        )

    # state (removed by down)
    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_state(self) -> Path:
        return self.state / "cni" / "state"

    @property
    def containerd_state(self) -> Path:
        return self.state / "containerd-state"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "admin.kubeconfig"

    # cache (kept across down/up)
    @property
    def bin(self) -> Path:
        return self.cache / "bin"

    @property
    def containerd_root(self) -> Path:
        return self.cache / "containerd"

    @property
    def docker_root(self) -> Path:
        return self.cache / "docker"

    @property
    def apiserver_url(self) -> str:
        return f"https://{self.node_ip}:{self.ports.apiserver}"
