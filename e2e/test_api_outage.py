"""End to end: the API server stops answering (SIGSTOP, as a hung or partitioned control plane).

Every API call has a timeout: connecting while it is stopped fails with one clear message (no
INTERNALERROR, no traceback); a connected session lives through twice the restore TTL of outage
and is not restored by its guard (which cannot tell whether the session lives: not death);
closing while it is stopped ends in bounded time and leaves the restore to the guard.

Only on the embedded cluster, whose kube-apiserver is a process of this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from e2e.cluster import procs
from e2e.cluster.layout import Layout
from e2e.conftest import NAMESPACE, objects_of_ours, wait_app_settled
from pytest_bridge.core.patch import strip_server_fields

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parents[1] / "fixtures" / "sampleapp" / "app.py"
TTL = 10

SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path


def get():
    with urllib.request.urlopen("http://frontend.{NAMESPACE}/api", timeout=10) as reply:
        return json.load(reply)["downstream"][0]


def test_through_an_outage(bridged_service):
    bridged_service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(bridged_service.local_port),
             "LISTEN_PORT_2": str(bridged_service.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    assert get()["pod"] == "local-orders"
    Path(os.environ["E2E_CONNECTED"]).write_text("yes")
    go_on = Path(os.environ["E2E_GO_ON"])
    while not go_on.exists():
        time.sleep(0.2)
    deadline = time.monotonic() + 60  # the tunnel reconnects once the API server answers again
    while True:
        try:
            assert get()["pod"] == "local-orders"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(1)
"""


def _apiserver() -> int:
    layout = Layout.default()
    pid = procs.pid_of(layout, "kube-apiserver")
    if pid is None or os.environ.get("KUBECONFIG") != str(layout.admin_kubeconfig):
        pytest.skip("needs the embedded cluster (its kube-apiserver is a process of this machine)")
    return pid


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _ours_before(core: client.CoreV1Api) -> set[str]:
    """What of ours is there before the test: a routing manager earlier routes started removes
    itself when idle; given 30 s to go, whatever stays is not this test's."""
    deadline = time.monotonic() + 30
    while objects_of_ours(core.api_client, NAMESPACE) and time.monotonic() < deadline:
        time.sleep(0.5)
    return set(objects_of_ours(core.api_client, NAMESPACE))


def _left(core: client.CoreV1Api, before: set[str]) -> set[str]:
    return set(objects_of_ours(core.api_client, NAMESPACE)) - before


def _orders(apps: client.AppsV1Api) -> dict[str, object]:
    obj = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("orders", NAMESPACE))
    return strip_server_fields(obj)


def _pytest(suite: Path, **env: str) -> subprocess.Popen[str]:
    (suite / "test_outage.py").write_text(SUITE)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(suite / "test_outage.py"),
         "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}", f"--bridge-restore-ttl={TTL}",
         f"--bridge-connect-timeout={TTL}"],  # no longer than the TTL (a usage error otherwise)
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env},
    )  # fmt: skip


def test_connect_while_the_api_server_is_stopped_fails_clearly(
    tmp_path: Path, core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, sample_app: object
) -> None:
    pid = _apiserver()
    wait_app_settled(core_v1, NAMESPACE)
    ours = _ours_before(core_v1)
    before = _orders(apps_v1)
    with stopped(pid):
        started = time.monotonic()
        run = _pytest(tmp_path, E2E_CONNECTED=str(tmp_path / "c"), E2E_GO_ON=str(tmp_path / "g"))
        out, _ = run.communicate(timeout=180)
        took = time.monotonic() - started
    assert run.returncode != 0, out
    assert "the API server did not answer" in out, out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert took < 90, f"connect gave up only after {took:.0f}s"
    assert _orders(apps_v1) == before
    assert _left(core_v1, ours) == set()


def test_a_connected_session_lives_through_an_outage_of_twice_the_ttl(
    tmp_path: Path, core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, sample_app: object
) -> None:
    pid = _apiserver()
    wait_app_settled(core_v1, NAMESPACE)
    ours = _ours_before(core_v1)
    before = _orders(apps_v1)
    connected, go_on = tmp_path / "connected", tmp_path / "go-on"
    run = _pytest(tmp_path, E2E_CONNECTED=str(connected), E2E_GO_ON=str(go_on))
    try:
        deadline = time.monotonic() + 120
        while not connected.exists():
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with stopped(pid):
            time.sleep(2 * TTL)
        time.sleep(2 * TTL)  # the guard, back in touch, must still see the session alive
        assert _orders(apps_v1) != before, "the guard restored a live session"
        go_on.write_text("go")
        out, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _orders(apps_v1) == before
    deadline = time.monotonic() + 30
    while _left(core_v1, ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _left(core_v1, ours) == set()


def test_closing_while_the_api_server_is_stopped_ends_and_the_guard_restores(
    tmp_path: Path, core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, sample_app: object
) -> None:
    pid = _apiserver()
    wait_app_settled(core_v1, NAMESPACE)
    ours = _ours_before(core_v1)
    before = _orders(apps_v1)
    connected, go_on = tmp_path / "connected", tmp_path / "go-on"
    go_on.write_text("go")  # the test ends at once once connected
    run = _pytest(tmp_path, E2E_CONNECTED=str(connected), E2E_GO_ON=str(go_on))
    out = ""
    try:
        deadline = time.monotonic() + 120
        while not connected.exists():
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with stopped(pid):
            started = time.monotonic()
            out, _ = run.communicate(timeout=120)
            took = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert took < 60, f"close took {took:.0f}s with the API server stopped"
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert "the in-cluster guard will retry" in out, out
    restored_by = time.monotonic() + TTL + 60
    while _orders(apps_v1) != before:
        assert time.monotonic() < restored_by, "the guard did not restore after the outage"
        time.sleep(1)
    deadline = time.monotonic() + 60
    while _left(core_v1, ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _left(core_v1, ours) == set()
