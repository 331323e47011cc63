"""End to end: the agent pod or the port-forward goes away under a running session.

* The bridged Deployment's agent pod is deleted (as an eviction would): the Deployment makes a
  new one and the tunnel follows it; requests reach the local service again.
* ``kubectl port-forward`` is killed again and again: each time the tunnel is back within 5 s,
  every new connection afterwards arrives whole, and the session still closes within 10 s.
* A route pod (a bare pod: nothing replaces it) is deleted: the next test that uses the route
  fails at once with "bridge lost: ...", instead of waiting out timeouts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from e2e.conftest import NAMESPACE, objects_of_ours, wait_app_settled

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parents[1] / "fixtures" / "sampleapp" / "app.py"

SUITE = f"""
import json, os, signal, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

NS = {NAMESPACE!r}
KUBECTL = os.environ["PYTEST_BRIDGE_KUBECTL"]
KUBECONFIG = os.environ["KUBECONFIG"]


def start(service, name):
    service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(service.local_port),
             "LISTEN_PORT_2": str(service.local_ports[9091]), "HOSTNAME": name, "DOWNSTREAM": "http://inventory/api"}},
    )


def get(headers=None, timeout=10):
    request = urllib.request.Request(f"http://frontend.{{NS}}/api", headers=headers or {{}})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.load(reply)["downstream"][0]


def until(check, within):
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def kubectl(*args):
    return subprocess.run([KUBECTL, "--kubeconfig", KUBECONFIG, "-n", NS, *args], check=True,
                          capture_output=True, text=True).stdout


def port_forwards():
    def parent(p):
        fields = _read(p / "stat").rpartition(b")")[2].split()
        return int(fields[1]) if len(fields) > 1 else -1

    return [p for p in Path("/proc").iterdir()
            if p.name.isdigit() and b"port-forward" in _read(p / "cmdline") and parent(p) == os.getpid()]


def _read(path):
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_the_tunnel_follows_a_replaced_agent_pod(bridged_service):
    start(bridged_service, "local-orders")
    assert get()["pod"] == "local-orders"
    kubectl("delete", "pod", bridged_service.agent_pod, "--wait=false")
    started = time.monotonic()
    def reaches_local():
        reply = get()
        assert reply.get("pod") == "local-orders", reply

    until(reaches_local, within=90)
    # The deleted pod serves on while it drains (the tunnel may still be on it): only once it is
    # gone has the tunnel followed the Deployment's replacement, which the next test relies on.
    kubectl("wait", "--for=delete", f"pod/{{bridged_service.agent_pod}}", "--timeout=90s")
    until(reaches_local, within=90)
    print(f"AGENT-REPLACED {{time.monotonic() - started:.1f}}")


def test_kubectl_killed_again_and_again(bridged_service):
    if os.environ.get("E2E_TRANSPORT") != "kubectl":
        pytest.skip("kubectl transport only")
    for attempt in range(5):
        killed = port_forwards()
        assert killed, "no kubectl port-forward of this session"
        for proc in killed:
            os.kill(int(proc.name), signal.SIGKILL)
        started = time.monotonic()

        def reaches_local():
            # A request that met the killed kubectl fails (the frontend reports the reset as an
            # error entry instead of a pod): not yet reconnected, so asked again.
            reply = get(timeout=5)
            assert reply.get("pod") == "local-orders", reply

        until(reaches_local, within=5)
        print(f"RECONNECTED {{time.monotonic() - started:.1f}}")
    for _ in range(20):  # every new connection afterwards arrives whole
        reply = get()
        assert reply.get("pod") == "local-orders", reply
"""

ROUTE_SUITE = f"""
import os, subprocess

import pytest

NS = {NAMESPACE!r}


@pytest.fixture(scope="module")
def route(bridge_session):
    return bridge_session.routes["orders"]


def test_delete_the_route_pod(route):
    subprocess.run([os.environ["PYTEST_BRIDGE_KUBECTL"], "--kubeconfig", os.environ["KUBECONFIG"], "-n", NS,
                    "delete", "pod", route.pod, "--wait=true"], check=True)


def test_the_next_test_is_told_the_bridge_is_lost(isolated_route):
    pass
"""


def _run(tmp_path: Path, suite: str, *args: str, timeout: float = 400, **env: str) -> tuple[int, str, float]:
    (tmp_path / "test_loss.py").write_text(suite)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-rA", str(tmp_path / "test_loss.py"),
         "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}, check=False,
    )  # fmt: skip
    return run.returncode, run.stdout + run.stderr, time.monotonic() - started


@pytest.mark.parametrize("transport", ["kubectl", "websocket"])
def test_agent_pod_replaced_and_port_forward_killed(
    transport: str, tmp_path: Path, core_v1: client.CoreV1Api, sample_app: object
) -> None:
    if not os.environ.get("PYTEST_BRIDGE_KUBECTL"):
        pytest.skip("the inner suite deletes pods with kubectl (PYTEST_BRIDGE_KUBECTL)")
    wait_app_settled(core_v1, NAMESPACE)
    before = objects_of_ours(core_v1.api_client, NAMESPACE)  # a routing manager idling from earlier routes
    code, out, _ = _run(tmp_path, SUITE, f"--bridge-transport={transport}", E2E_TRANSPORT=transport)
    assert code == 0, out
    assert "AGENT-REPLACED" in out, out
    if transport == "kubectl":
        reconnects = [float(seconds) for seconds in re.findall(r"RECONNECTED ([\d.]+)", out)]
        assert len(reconnects) == 5 and max(reconnects) < 5.0, reconnects
    closing = [line for line in out.splitlines() if "disconnect" in line]
    assert closing, out
    wait_app_settled(core_v1, NAMESPACE)
    deadline = time.monotonic() + 30
    while objects_of_ours(core_v1.api_client, NAMESPACE) != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert objects_of_ours(core_v1.api_client, NAMESPACE) == before


def test_a_lost_route_fails_the_next_test_with_bridge_lost(tmp_path: Path, sample_app: object) -> None:
    if not os.environ.get("PYTEST_BRIDGE_KUBECTL"):
        pytest.skip("the inner suite deletes pods with kubectl (PYTEST_BRIDGE_KUBECTL)")
    code, out, _ = _run(tmp_path, ROUTE_SUITE, "--bridge-isolate", "--bridge-routing-idle=3")
    assert code == 1, out
    # a test that needs a lost bridge errors at setup (pytest's word for a fixture that failed), it never runs
    assert "1 passed" in out and "1 error" in out, out
    assert "bridge lost: orders (route" in out, out
    assert "INTERNALERROR" not in out, out
