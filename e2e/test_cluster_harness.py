"""The embedded cluster harness itself: `up` is idempotent, `down` leaves nothing behind.

These tests stop and restart the cluster, so they run last (see `cluster_cycle` in conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.cluster import embedded, hostnet, procs
from e2e.cluster.layout import Layout

REPO = Path(__file__).resolve().parents[1]
LAYOUT = Layout.default()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.cluster_cycle,
    pytest.mark.skipif(
        os.environ.get("KUBECONFIG") != str(LAYOUT.admin_kubeconfig),
        reason="harness tests need the embedded cluster (KUBECONFIG is another cluster)",
    ),
]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.cluster", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _pids() -> dict[str, int | None]:
    return {name: procs.pid_of(LAYOUT, name) for name in embedded.COMPONENTS}


def _our_live_processes() -> list[str]:
    """Non-zombie processes running a cluster binary or tied to our containerd or dockerd."""
    markers = [str(LAYOUT.bin), str(LAYOUT.containerd_socket), str(LAYOUT.state)]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(m in cmdline for m in markers):
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def test_up_twice_is_a_no_op() -> None:
    before = _pids()
    assert all(before.values()), f"cluster not fully up: {before}"
    started = time.monotonic()
    result = _cli("up", "--embedded")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert _pids() == before, "a second `up` restarted components"
    assert "ready in" not in result.stderr.split("cluster up")[0], f"components were (re)started:\n{result.stderr}"
    print(f"second up took {took:.1f}s")


def test_down_leaves_nothing_then_up_works() -> None:
    result = _cli("down")
    assert result.returncode == 0, result.stderr
    assert _our_live_processes() == []
    assert hostnet.leftovers(LAYOUT, embedded._extra_mount_roots(LAYOUT)) == []
    assert not LAYOUT.state.exists()
    assert not Path("/sys/fs/cgroup/cpu/kubepods").exists()

    result = _cli("up", "--embedded")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"KUBECONFIG={LAYOUT.admin_kubeconfig}")
    nodes = embedded.kubectl(LAYOUT, "get", "nodes", "-o", "name")
    assert nodes.strip() == f"node/{LAYOUT.node_name}"
    available = embedded.kubectl(
        LAYOUT, "-n", "bridge-demo", "get", "deploy", "-o", "jsonpath={.items[*].status.availableReplicas}"
    )
    assert available.split() == ["1", "1", "1"]
