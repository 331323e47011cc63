"""End to end: `pytest --bridge-service=orders` on the real cluster with the sample app.

Each test runs pytest as a subprocess (as a user would), on a small suite that starts a
local `orders` through the `bridged_service` fixture; the outer test checks what the
cluster saw and that it was restored exactly — after a normal end, Ctrl-C and SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from pytest_bridge_routing import objects as ro

from e2e.conftest import NAMESPACE, pod_is_ready, role_user_kubeconfig
from e2e.test_smoke import exec_in_pod_json
from pytest_bridge.core.patch import strip_server_fields
from pytest_bridge.local import sessiondir

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
MANAGED = "app.kubernetes.io/managed-by=pytest-bridge"
COMPARED_ENV = ("GREETING", "DB_HOST", "API_TOKEN", "POD_NAMESPACE", "ORDERS_REGION", "ORDERS_DB_PASSWORD")

INNER_SUITE = f"""
import json, os, socket, sys, time, urllib.request
from pathlib import Path

EXPECTED = json.loads(Path(os.environ["BRIDGE_E2E_EXPECTED"]).read_text())


def start_orders(bridged_service):
    return bridged_service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(bridged_service.local_port),
             "LISTEN_PORT_2": str(bridged_service.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api", "REPORT_ENV": {",".join(COMPARED_ENV)!r},
             "SAMPLE_FILES_ROOT": os.environ.get("CONFIG_ROOT", "/nonexistent")}},
    )


def test_frontend_in_the_cluster_reaches_the_local_orders(bridged_service):
    start_orders(bridged_service)
    request = urllib.request.Request("http://frontend.{NAMESPACE}/api", headers={{"kubernetes-route-as": "e2e"}})
    # The very first request through the fresh bridge must succeed: no retry.
    reply = json.load(urllib.request.urlopen(request, timeout=20))
    orders = reply["downstream"][0]
    assert orders.get("pod") == "local-orders", orders
    inventory = orders["downstream"][0]
    assert inventory["service"] == "inventory" and inventory["pod"].startswith("inventory-"), inventory
    assert inventory["route"] == "e2e"
    for name in {COMPARED_ENV!r}:
        assert orders["env"][name] == EXPECTED["env"][name], name


def test_env_and_volume_files_equal_the_pods(bridged_service):
    for name in {COMPARED_ENV!r}:
        assert bridged_service.env[name] == EXPECTED["env"][name], name
    config_dir = Path(bridged_service.env["ORDERS_CONFIG_DIR"])
    assert (config_dir / "settings.json").read_text() == EXPECTED["settings.json"]
    tokens = list((bridged_service.session_dir / "volumes").rglob("token"))
    assert tokens and tokens[0].read_text().count(".") == 2, tokens  # a JWT


def test_wait_for_signal(bridged_service):
    marker = os.environ.get("BRIDGE_E2E_WAIT")
    if not marker:
        return
    start_orders(bridged_service)
    Path(marker + ".tmp").write_text(str(bridged_service.session_dir.parent))  # the session's directory
    os.replace(marker + ".tmp", marker)
    time.sleep(120)
"""

CONFIG = """\
version: 0.1
env:
  - name: ORDERS_CONFIG_DIR
    value: $(volumeMounts:config)
"""


def _deployment(apps: client.AppsV1Api) -> dict[str, Any]:
    obj = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("orders", NAMESPACE))
    return strip_server_fields(obj)


def _settled(apps: client.AppsV1Api, core: client.CoreV1Api, timeout: float = 120) -> str:
    """Wait until orders is fully rolled out (one pod, ready, nothing terminating); return its pod."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d: Any = apps.read_namespaced_deployment("orders", NAMESPACE)
        pods: Any = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/name=orders")
        ready = [p for p in pods.items if pod_is_ready(p)]
        if (
            d.status.observed_generation == d.metadata.generation
            and d.status.updated_replicas == d.status.ready_replicas == (d.spec.replicas or 1)
            and len(pods.items) == len(ready) == 1
        ):
            return str(ready[0].metadata.name)
        time.sleep(0.3)
    raise AssertionError("orders did not settle")


def _managed_objects(core: client.CoreV1Api, batch: client.BatchV1Api | None = None) -> list[str]:
    batch = batch or client.BatchV1Api(core.api_client)
    listed: list[tuple[str, Any]] = [
        ("secret", core.list_namespaced_secret(NAMESPACE, label_selector=MANAGED)),
        ("job", batch.list_namespaced_job(NAMESPACE, label_selector=MANAGED)),
        ("sa", core.list_namespaced_service_account(NAMESPACE, label_selector=MANAGED)),
    ]
    return [f"{kind}/{item.metadata.name}" for kind, result in listed for item in result.items]


def _wait_restored(apps: client.AppsV1Api, before: dict[str, Any], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _deployment(apps) == before:
            return time.monotonic() - started
        time.sleep(0.5)
    assert _deployment(apps) == before
    return time.monotonic() - started


@pytest.fixture(scope="module", autouse=True)
def _no_idle_routing_manager(core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api) -> None:
    """Retire a routing manager an earlier run left idling (nothing routed), before these tests.

    A manager stays for --bridge-routing-idle (300 s) after its last route, and the demo suite
    opens a route: a test run started within 5 minutes of the last one would see the manager's
    ServiceAccounts as "left behind" by its own bridges. With no route pod and no switched
    Service it manages nothing, so deleting it is what it would do itself.
    """
    try:
        apps_v1.read_namespaced_deployment(ro.MANAGER_NAME, NAMESPACE)
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return
        raise
    routes = core_v1.list_namespaced_pod(NAMESPACE, label_selector=ro.LABEL_ROUTE).items
    switched = [
        s
        for s in core_v1.list_namespaced_service(NAMESPACE).items
        if ro.is_switched(core_v1.api_client.sanitize_for_serialization(s))
    ]
    if routes or switched:
        return  # a live session routes here: leave it (the checks below will say what they see)
    apps_v1.delete_namespaced_deployment(ro.MANAGER_NAME, NAMESPACE, propagation_policy="Foreground")
    deadline = time.monotonic() + 60
    while [o for o in _managed_objects(core_v1) if o.startswith("sa/")] and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture
def suite(tmp_path: Path, core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api, sample_app: Any) -> Path:
    pod = _settled(apps_v1, core_v1)
    env = exec_in_pod_json(core_v1, pod, "import os; print(json.dumps(dict(os.environ)))")
    settings = exec_in_pod_json(core_v1, pod, "print(json.dumps(open('/etc/sample/config/settings.json').read()))")
    (tmp_path / "expected.json").write_text(json.dumps({"env": env, "settings.json": settings}))
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    (tmp_path / "KubernetesLocalProcessConfig.yaml").write_text(CONFIG)
    return tmp_path


def _pytest(suite: Path, *args: str, ttl: int = 60, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(suite),
         "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}",
         f"--bridge-config-file={suite / 'KubernetesLocalProcessConfig.yaml'}", f"--bridge-restore-ttl={ttl}", *args],
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "BRIDGE_E2E_EXPECTED": str(suite / "expected.json"), **env},
    )  # fmt: skip


def test_bridge_end_to_end_and_exact_restore(suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api) -> None:
    before = _deployment(apps_v1)
    run = _pytest(suite)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "3 passed" in out, out
    assert "bridge: orders (container app of Deployment orders)" in out
    assert "connect" in out and "disconnect" in out
    transport = "kubectl" if os.environ.get("PYTEST_BRIDGE_KUBECTL") or shutil.which("kubectl") else "websocket"
    assert f"bridge: transport: {transport}" in out, out
    assert _deployment(apps_v1) == before
    assert _managed_objects(core_v1) == []
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"port-forward" in _read(p / "cmdline")]
    assert not leftover, "a kubectl port-forward process outlived the session"


def _wait_local_orders_gone(timeout: float = 10) -> None:
    """The local service started through the fixture dies with pytest, even on SIGKILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            p for p in Path("/proc").iterdir()
            if p.name.isdigit() and b"local-orders" in _read(p / "environ") and str(APP).encode() in _read(p / "cmdline")
        ]  # fmt: skip
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"local orders still running after pytest was killed: {alive}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _run_until_connected(suite: Path, ttl: int = 60) -> tuple[subprocess.Popen[str], Path]:
    """The inner pytest, once its session is connected, and the session's directory."""
    marker = suite / "connected"
    run = _pytest(suite, "-k", "wait_for_signal", ttl=ttl, BRIDGE_E2E_WAIT=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)
    session_dir = Path(marker.read_text())
    assert (session_dir / sessiondir.OWNER_FILE).read_text().strip() == str(run.pid)
    return run, session_dir


def test_ctrl_c_restores(suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api) -> None:
    before = _deployment(apps_v1)
    run, session_dir = _run_until_connected(suite)
    assert _deployment(apps_v1) != before, "the workload should be bridged while the session runs"
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 2, out  # pytest's "interrupted"
    assert _deployment(apps_v1) == before
    assert _managed_objects(core_v1) == []
    assert not session_dir.exists(), "the session's directory (imported env, logs) outlived Ctrl-C"


def test_sigkill_is_restored_by_the_guard(suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api) -> None:
    before = _deployment(apps_v1)
    ttl = 5
    run, session_dir = _run_until_connected(suite, ttl=ttl)
    run.kill()
    run.communicate(timeout=30)
    # Killed: its directory (imported secrets among them) stays until the next session sweeps it.
    assert (session_dir / "orders" / "env").exists()
    assert session_dir in sessiondir.sweep()
    assert not session_dir.exists()
    _wait_local_orders_gone()
    took = _wait_restored(apps_v1, before, timeout=ttl + 60)
    print(f"guard restored {took:.1f}s after SIGKILL (TTL {ttl}s)")
    deadline = time.monotonic() + 60
    while _managed_objects(core_v1) and time.monotonic() < deadline:
        time.sleep(1)
    assert _managed_objects(core_v1) == []


def test_unknown_service_is_a_clear_error_and_changes_nothing(
    suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    before = _deployment(apps_v1)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "--bridge-service=no-such-service",
         f"--bridge-namespace={NAMESPACE}"],
        cwd=suite, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 4, run.stdout + run.stderr
    assert f"service 'no-such-service' not found in namespace '{NAMESPACE}'" in run.stderr
    assert "orders" in run.stderr  # lists the services that do exist
    assert _deployment(apps_v1) == before
    assert _managed_objects(core_v1) == []


def test_missing_rbac_names_verb_and_resource_and_changes_nothing(
    suite: Path, tmp_path: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    import yaml  # noqa: PLC0415

    role_doc = next(yaml.safe_load_all((REPO / "deploy" / "rbac" / "bridge-user.yaml").read_text()))
    # The shipped least-privilege Role, less one verb: patching deployments.
    for rule in role_doc["rules"]:
        if "deployments" in rule["resources"]:
            rule["verbs"] = ["get"]
    with role_user_kubeconfig(
        core_v1.api_client, "pytest-bridge-e2e-limited", role_doc, tmp_path / "limited.kubeconfig"
    ) as kubeconfig:
        before = _deployment(apps_v1)
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "--bridge-service=orders",
             f"--bridge-kubeconfig={kubeconfig}"],
            cwd=suite, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 4, run.stdout + run.stderr
        assert "'patch' on 'deployments'" in run.stderr, run.stderr
        assert "nothing was changed" in run.stderr
        assert _deployment(apps_v1) == before
        assert _managed_objects(core_v1) == []


def test_unpullable_agent_image_fails_fast_and_restores(
    suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    before = _deployment(apps_v1)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "--bridge-service=orders",
         f"--bridge-namespace={NAMESPACE}", "--bridge-agent-image=localhost/pytest-bridge/no-such-agent:0"],
        cwd=suite, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert run.returncode == 4, run.stdout + run.stderr
    assert "cannot be pulled" in run.stderr, run.stderr
    assert took < 45, f"reported after {took:.0f}s: should be seconds, not the connect timeout"
    assert _deployment(apps_v1) == before
    assert _managed_objects(core_v1) == []


def test_bridge_over_the_websocket_transport(suite: Path, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api) -> None:
    """--bridge-transport=websocket: our own port-forward client, one multiplexed connection, no kubectl."""
    before = _deployment(apps_v1)
    run = _pytest(suite, "--bridge-transport=websocket", "-k", "frontend or env_and_volume")
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "2 passed" in out, out
    assert "bridge: transport: websocket" in out, out
    assert _deployment(apps_v1) == before
    assert _managed_objects(core_v1) == []
