"""Refuse quickly and clearly when the embedded cluster can't run here.

``gather`` reads the facts (cheap, no side effects); ``problems`` is pure and turns facts
into messages that say what to do. ``up`` calls both before changing anything.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .layout import Layout

__all__ = ["Facts", "PrerequisiteError", "check", "gather", "problems"]

# Debian packages that provide what the node needs, keyed by the executable checked.
REQUIRED_TOOLS = {
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "dockerd": "docker.io",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "ip": "iproute2",
    "debootstrap": "debootstrap",
    "openssl": "openssl",
    "gcc": "gcc",
}


class PrerequisiteError(RuntimeError):
    """The embedded cluster can't start on this machine; the message lists why and what to do."""


@dataclass(frozen=True)
class Facts:
    system: str
    is_root: bool
    go: str | None
    missing_tools: dict[str, str]
    cni_plugins: bool
    cgroups: bool
    ports_in_use: dict[str, int] = field(default_factory=dict)


def _port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _find_go() -> str | None:
    """``$PYTEST_BRIDGE_GO`` if set (it must exist), else ``go`` on PATH, else Go's default install."""
    explicit = os.environ.get("PYTEST_BRIDGE_GO")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    default = Path("/usr/local/go/bin/go")
    return shutil.which("go") or (str(default) if default.is_file() else None)


def gather(layout: Layout, check_ports: bool = True) -> Facts:
    ports = {}
    if check_ports:
        ports = {name: port for name, port in layout.ports.named().items() if _port_in_use(port)}
    return Facts(
        system=platform.system(),
        is_root=os.geteuid() == 0 if hasattr(os, "geteuid") else False,
        go=_find_go(),
        missing_tools={tool: pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None},
        cni_plugins=all(
            Path("/usr/lib/cni", p).exists() for p in ("bridge", "host-local", "firewall", "portmap", "loopback")
        ),
        cgroups=Path("/sys/fs/cgroup").is_dir(),
        ports_in_use=ports,
    )


def problems(facts: Facts) -> list[str]:
    found = []
    if facts.system != "Linux":
        found.append(
            f"the embedded cluster runs only on Linux (this is {facts.system}); "
            "use kind (`kind create cluster --config kind-config.yaml`) or pass --kubeconfig"
        )
        return found
    if not facts.is_root:
        found.append(
            "the embedded cluster needs root (it runs kubelet, containerd and iptables); run with sudo, or pass --kubeconfig to use an existing cluster"
        )
    if facts.go is None:
        found.append(
            "Go is not installed (needed to build Kubernetes, etcd and CoreDNS): install Go >= 1.24 and put `go` on PATH"
        )
    if facts.missing_tools:
        packages = " ".join(sorted(set(facts.missing_tools.values())))
        found.append(
            f"missing {', '.join(sorted(facts.missing_tools))}: apt-get install {packages} (scripts/install-deps.sh does it)"
        )
    if not facts.cni_plugins:
        found.append("CNI plugins missing in /usr/lib/cni: apt-get install containernetworking-plugins")
    if not facts.cgroups:
        found.append("no cgroup filesystem at /sys/fs/cgroup")
    for name, port in sorted(facts.ports_in_use.items()):
        found.append(
            f"port {port} ({name}) is already in use: stop what holds it (`ss -ltnp 'sport = :{port}'`) or, for the API server, set PYTEST_BRIDGE_APISERVER_PORT"
        )
    return found


def check(layout: Layout, check_ports: bool = True) -> Facts:
    facts = gather(layout, check_ports)
    found = problems(facts)
    if found:
        raise PrerequisiteError("cannot start the embedded cluster:\n  - " + "\n  - ".join(found))
    return facts
