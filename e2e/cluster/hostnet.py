"""Host networking of the embedded node, and everything ``down`` must undo.

``prepare`` records a baseline (sysctls, network namespaces) before the first change;
``sweep`` removes what the cluster added: the node's dummy interface, the CNI bridge,
KUBE-/CNI- iptables chains and the rules that jump to them, leftover CNI network
namespaces, mounts under the state dir, and sysctls set back to their recorded values.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from .layout import Layout

__all__ = ["leftovers", "prepare", "sweep", "write_cni_config"]

_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}
_OUR_CHAIN = re.compile(r"^(KUBE-|CNI-)")
_TABLES = ("filter", "nat", "mangle", "raw")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _baseline_file(layout: Layout) -> Path:
    return layout.state / "baseline.json"


def _netns() -> set[str]:
    root = Path("/run/netns")
    return {p.name for p in root.iterdir()} if root.exists() else set()


def prepare(layout: Layout) -> None:
    layout.state.mkdir(parents=True, exist_ok=True)
    baseline = _baseline_file(layout)
    if not baseline.exists():
        if not Path("/proc/sys/net/bridge").exists():
            _run("modprobe", "br_netfilter", check=False)
        sysctls = {
            key: Path("/proc/sys", key).read_text().strip() for key in _SYSCTLS if Path("/proc/sys", key).exists()
        }
        baseline.write_text(json.dumps({"sysctls": sysctls, "netns": sorted(_netns())}))
    for key, value in _SYSCTLS.items():
        path = Path("/proc/sys", key)
        if path.exists():
            path.write_text(value)
    if _run("ip", "link", "show", layout.node_interface, check=False).returncode != 0:
        # A port-less bridge: the kernel here has no `dummy` link type, and a bridge is
        # just as inert while giving the node IP an interface of its own to remove.
        _run("ip", "link", "add", layout.node_interface, "type", "bridge")
    _run("ip", "addr", "replace", f"{layout.node_ip}/32", "dev", layout.node_interface)
    _run("ip", "link", "set", layout.node_interface, "up")


def write_cni_config(layout: Layout) -> None:
    """Bridge + host-local pod network; `firewall` accepts pod traffic past Docker's FORWARD DROP."""
    layout.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    layout.cni_state.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": "pytest-bridge",
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.cni_bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": layout.node_pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.cni_state / "ipam"),
                },
            },
            {"type": "firewall", "backend": "iptables"},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (layout.cni_conf_dir / "10-pytest-bridge.conflist").write_text(json.dumps(conflist, indent=2))


def _iptables_ours(save_cmd: str) -> dict[str, list[str]]:
    """Per table, the lines of ``*-save`` output that belong to KUBE-/CNI- chains."""
    found: dict[str, list[str]] = {}
    for table in _TABLES:
        result = _run(save_cmd, "-t", table, check=False)
        if result.returncode != 0:
            continue
        ours = [line for line in result.stdout.splitlines() if _is_ours(line)]
        if ours:
            found[table] = ours
    return found


def _is_ours(line: str) -> bool:
    if line.startswith(":"):
        return bool(_OUR_CHAIN.match(line[1:]))
    if line.startswith("-A "):
        parts = line.split()
        if _OUR_CHAIN.match(parts[1]):
            return True
        for flag in ("-j", "-g"):
            if flag in parts and _OUR_CHAIN.match(parts[parts.index(flag) + 1]):
                return True
    return False


def _sweep_iptables(family: str) -> None:
    save, restore = f"{family}-save", f"{family}-restore"
    for table in _iptables_ours(save):
        saved = _run(save, "-t", table).stdout.splitlines()
        kept = [line for line in saved if not _is_ours(line)]
        _restore(restore, table, kept)


def _restore(restore: str, table: str, lines: list[str]) -> None:
    result = subprocess.run(
        [restore, "-T", table], input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{restore} -T {table} failed: {result.stderr.strip()}")


def _mounts_under(paths: list[Path]) -> list[str]:
    prefixes = [str(p).rstrip("/") + "/" for p in paths]
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point.startswith(prefix) or point + "/" == prefix for prefix in prefixes):
            mounts.append(point)
    return sorted(set(mounts), key=len, reverse=True)


def sweep(layout: Layout, extra_mount_roots: list[Path]) -> None:
    baseline_file = _baseline_file(layout)
    baseline = json.loads(baseline_file.read_text()) if baseline_file.exists() else {"sysctls": {}, "netns": []}
    for name in sorted(_netns() - set(baseline["netns"])):
        if name.startswith("cni-"):
            _run("ip", "netns", "delete", name, check=False)
    for point in _mounts_under([layout.state, *extra_mount_roots]):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "-l", point, check=False)
    for family in ("iptables", "ip6tables"):
        _sweep_iptables(family)
    for link in (layout.cni_bridge, layout.node_interface):
        _run("ip", "link", "delete", link, check=False)
    for key, value in baseline["sysctls"].items():
        path = Path("/proc/sys", key)
        if path.exists():
            path.write_text(value)


def leftovers(layout: Layout, extra_mount_roots: list[Path]) -> list[str]:
    """What the cluster left on the host (empty after a clean ``down``); used by tests."""
    found = []
    for family in ("iptables", "ip6tables"):
        for table, lines in _iptables_ours(f"{family}-save").items():
            found.append(f"{family} {table}: {len(lines)} KUBE-/CNI- lines, e.g. {lines[0]}")
    for link in (layout.cni_bridge, layout.node_interface):
        if _run("ip", "link", "show", link, check=False).returncode == 0:
            found.append(f"interface {link}")
    found += [f"mount {m}" for m in _mounts_under([layout.state, *extra_mount_roots])]
    found += [f"netns {n}" for n in _netns() if n.startswith("cni-")]
    return found
