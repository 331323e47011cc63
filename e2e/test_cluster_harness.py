"""The embedded cluster harness itself: the images on the node, `up` is idempotent, `down`
leaves nothing behind.

Some of these tests stop and restart the cluster, so they all run last (see `cluster_cycle` in
conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import embedded, hostnet, images, procs
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


def test_the_node_has_the_stand_ins_and_no_image_of_the_project() -> None:
    on_node = images.node_images(LAYOUT)
    assert [name for name in on_node if images.OBSOLETE_MARK in name] == []
    assert {stand_in.ref for stand_in in images.STAND_INS} <= set(on_node)
    assert {images.PAUSE_IMAGE, images.COREDNS_IMAGE} <= set(on_node)


# How the plugin runs the stock images: uid/gid 65532, read-only root, no capabilities, /tmp an
# emptyDir; nginx with its own configuration and paths under /tmp (Debian's module convention
# first: on the official image the include matches nothing). The python container checks the
# interpreter and talks to both of nginx's modules over the pod's loopback.
_NGINX_CONF = """include /etc/nginx/modules-enabled/*.conf;
pid /tmp/nginx/nginx.pid;
events {}
http {
    client_body_temp_path /tmp/nginx/body; proxy_temp_path /tmp/nginx/proxy;
    fastcgi_temp_path /tmp/nginx/fastcgi; uwsgi_temp_path /tmp/nginx/uwsgi; scgi_temp_path /tmp/nginx/scgi;
    access_log off;
    server { listen 8080; return 200 "http ok"; }
}
stream { server { listen 8081; return "stream ok"; } }
"""
_NGINX_COMMAND = f"""set -e
mkdir -p /tmp/nginx
cat > /tmp/nginx/nginx.conf <<'EOF'
{_NGINX_CONF}EOF
exec nginx -e /tmp/nginx/error.log -g 'daemon off;' -p /tmp/nginx/ -c /tmp/nginx/nginx.conf
"""
_PYTHON_CHECK = """
import json, os, socket, sys, time, urllib.request
for attempt in range(100):
    try:
        http = urllib.request.urlopen("http://127.0.0.1:8080/", timeout=2).read().decode()
        break
    except OSError:
        time.sleep(0.1)
with socket.create_connection(("127.0.0.1", 8081), timeout=2) as conn:
    stream = conn.recv(100).decode()
try:
    open("/usr/x", "w")
    root = "writable"
except OSError as e:
    root = e.strerror
print(json.dumps({"executable": sys.executable, "version": os.environ.get("PYTHON_VERSION"), "uid": os.getuid(),
                  "http": http, "stream": stream, "root": root}))
"""


def _restricted_container(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",  # only what is on the node
        "command": command,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def test_stand_ins_run_as_the_plugin_runs_them(tmp_path: Path) -> None:
    name = f"stand-in-check-{os.getpid()}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "containers": [
                _restricted_container("nginx", images.NGINX.name, ["/bin/sh", "-c", _NGINX_COMMAND]),
                _restricted_container("python", images.PYTHON.name, ["python3", "-I", "-c", _PYTHON_CHECK]),
            ],
        },
    }
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod))
    embedded.kubectl(LAYOUT, "apply", "-f", str(manifest))
    try:
        deadline = time.monotonic() + 90
        while True:
            status = json.loads(embedded.kubectl(LAYOUT, "-n", "default", "get", "pod", name, "-o", "json"))["status"]
            states = {c["name"]: c["state"] for c in status.get("containerStatuses", [])}
            if "terminated" in states.get("python", {}) or "terminated" in states.get("nginx", {}):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        logs = {c: embedded.kubectl(LAYOUT, "-n", "default", "logs", name, "-c", c) for c in ("python", "nginx")}
        assert states["python"]["terminated"]["exitCode"] == 0, (states, logs)
        assert "running" in states["nginx"], (states, logs)
        assert json.loads(logs["python"]) == {
            "executable": "/usr/local/bin/python3",
            "version": "3.11.13",
            "uid": 65532,
            "http": "http ok",
            "stream": "stream ok",
            "root": "Read-only file system",
        }
    finally:
        embedded.kubectl(LAYOUT, "-n", "default", "delete", "pod", name, "--wait=false", check=False)


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
