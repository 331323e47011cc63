"""End to end: isolated routes on the real cluster — concurrent sessions, xdist, propagation, cleanup.

Each test runs pytest as subprocesses (as users and CI jobs would), bridging ``orders`` with
``--bridge-isolate``; the outer test checks that every run saw only its own traffic and that
afterwards the namespace — its objects and every Service's selector — equals what it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from pytest_bridge_agent import labels

from e2e.conftest import NAMESPACE, role_user_kubeconfig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
VARIANT = REPO / "fixtures" / "manifests" / "variants" / "inventory-nopropagate.yaml"
IDLE = 3  # the routing manager removes itself this long after the last route
CONCURRENT = 10

INNER_CONFTEST = """
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ["E2E_SHARED"])


@pytest.fixture(scope="session", autouse=True)
def announce_session_route(bridge_session):
    for route in bridge_session.routes.values():
        (SHARED / f"{route.name}.live").write_text("session")
    yield
    for route in bridge_session.routes.values():
        (SHARED / f"{route.name}.live").unlink(missing_ok=True)
"""

INNER_SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path

import pytest

SHARED = Path(os.environ["E2E_SHARED"])
FRONTEND = "http://frontend.{NAMESPACE}/api"
MARKED = int(os.environ.get("E2E_MARKED", "0"))
WAIT = float(os.environ.get("E2E_WAIT", "0"))


def start_local(route, **env):
    return route.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(route.local_port),
             "LISTEN_PORT_2": str(route.local_ports[9091]), "HOSTNAME": f"local-{{route.name}}",
             "DOWNSTREAM": "http://inventory/api", **env}},
    )


def get(headers):
    reply = json.load(urllib.request.urlopen(urllib.request.Request(FRONTEND, headers=headers), timeout=30))
    return reply["downstream"][0]


def check_only_own_traffic(route):
    mine = get(route.header)
    assert mine.get("pod") == f"local-{{route.name}}", mine
    assert mine["downstream"][0]["route"] == route.name, "the header reached inventory"
    via_host = get({{"Host": route.hosts[0]}})
    assert via_host.get("pod") == f"local-{{route.name}}", via_host
    others = get({{}})
    assert others["pod"].startswith("orders-"), others
    assert get({{"kubernetes-route-as": "nobody-000000"}})["pod"].startswith("orders-")
    # orders' second port (9090 -> "admin") is plain TCP to the router: always the original pods.
    admin = urllib.request.Request("http://orders.{NAMESPACE}:9090/api", headers=route.header)
    assert json.load(urllib.request.urlopen(admin, timeout=30))["pod"].startswith("orders-")


def hold(route):
    \"\"\"Wait until {CONCURRENT} routes are live at once (across all runs), then check again.\"\"\"
    (SHARED / f"{{route.name}}.live").write_text("test")
    deadline = time.monotonic() + 240
    while not (SHARED / "go").exists():
        if len(list(SHARED.glob("*.live"))) >= {CONCURRENT}:
            (SHARED / "go").write_text(" ".join(sorted(p.stem for p in SHARED.glob("*.live"))))
            break
        assert time.monotonic() < deadline, sorted(p.name for p in SHARED.iterdir())
        time.sleep(0.2)
    check_only_own_traffic(route)


def test_session_route(isolated_route):
    start_local(isolated_route)
    check_only_own_traffic(isolated_route)
    (SHARED / f"{{isolated_route.name}}.ok").write_text("session")
    hold(isolated_route)
    if WAIT:
        (SHARED / "connected").write_text(isolated_route.name)
        time.sleep(WAIT)


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(MARKED))
def test_marked_route(isolated_route, n):
    start_local(isolated_route)
    check_only_own_traffic(isolated_route)
    (SHARED / f"{{isolated_route.name}}.ok").write_text("marked")
    hold(isolated_route)
"""

PROPAGATION_SUITE = f"""
import sys

import pytest


def start_local(route, **env):
    return route.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(route.local_port),
             "LISTEN_PORT_2": str(route.local_ports[9091]), "HOSTNAME": "local-orders", **env}},
    )


def test_a_propagating_chain_passes(isolated_route):
    start_local(isolated_route, DOWNSTREAM="http://inventory/api")
    result = isolated_route.assert_propagates("frontend", "/api")
    assert result.reached[:2] == ["frontend", "orders"], result.describe()


@pytest.mark.isolated
def test_the_dropping_cluster_service_is_named(isolated_route):
    start_local(isolated_route, DOWNSTREAM="http://inventory-nopropagate/api")
    result = isolated_route.check_propagation("frontend", "/api")
    assert not result.ok
    assert [d.describe() for d in result.dropped] == [
        "service inventory-nopropagate received the request with the header, but its call to inventory did not carry it"
    ]


@pytest.mark.isolated
def test_the_local_service_dropping_it_is_named(isolated_route):
    start_local(isolated_route, DOWNSTREAM="http://inventory/api", DROP_ROUTE_HEADER="1")
    with pytest.raises(AssertionError, match="service orders \\\\(local\\\\) received the request with the header, but its call to inventory did not carry it"):
        isolated_route.assert_propagates("frontend", "/api")
"""


# --- the namespace before and after -------------------------------------------------------------


def namespace_state(api: client.ApiClient, namespace: str = NAMESPACE) -> dict[str, Any]:
    """Every object name of the kinds routing touches, and each Service's selector and annotations."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    net, rbac = client.NetworkingV1Api(api), client.RbacAuthorizationV1Api(api)

    def names(items: Any) -> list[str]:
        return sorted(i.metadata.name for i in items.items)

    services: Any = core.list_namespaced_service(namespace).items
    return {
        "services": {
            s.metadata.name: {"selector": s.spec.selector, "annotations": s.metadata.annotations} for s in services
        },
        "pods": names(core.list_namespaced_pod(namespace)),
        "deployments": names(apps.list_namespaced_deployment(namespace)),
        "configmaps": names(core.list_namespaced_config_map(namespace)),
        "secrets": names(core.list_namespaced_secret(namespace)),
        "serviceaccounts": names(core.list_namespaced_service_account(namespace)),
        "roles": names(rbac.list_namespaced_role(namespace)),
        "rolebindings": names(rbac.list_namespaced_role_binding(namespace)),
        "ingresses": names(net.list_namespaced_ingress(namespace)),
    }


def wait_for_state(
    api: client.ApiClient, expected: dict[str, Any], timeout: float = 120, namespace: str = NAMESPACE
) -> float:
    """Seconds until the namespace equals ``expected`` again; fails with the difference."""
    started = time.monotonic()
    while True:
        current = namespace_state(api, namespace)
        if current == expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            diff = {k: (expected[k], current[k]) for k in expected if expected[k] != current[k]}
            raise AssertionError(f"namespace not restored after {timeout:.0f}s: {json.dumps(diff, indent=1)}")
        time.sleep(0.5)


@pytest.fixture
def settled(kube_api_client: client.ApiClient, sample_app: Any) -> Iterator[dict[str, Any]]:
    """The namespace with no routing in it (waits out a manager left by an earlier test)."""
    deadline = time.monotonic() + 120
    while True:
        state = namespace_state(kube_api_client)
        # Nothing of ours, e.g. no routing manager pod still terminating after an earlier test.
        ours = [name for kind in state for name in state[kind] if "pytest-bridge" in name or "-pbr-" in name]
        switched = [
            n
            for n, svc in state["services"].items()
            if labels.ORIGINAL_SELECTOR_ANNOTATION in (svc["annotations"] or {})
        ]
        if not ours and not switched:
            break
        # A manager left idle by an earlier run (e.g. the demo, default idle 300 s) with no
        # routes and nothing switched: remove it rather than wait it out.
        routes = client.CoreV1Api(kube_api_client).list_namespaced_pod(
            NAMESPACE, label_selector=f"{labels.COMPONENT_LABEL}=route"
        )
        if not switched and not routes.items:
            with contextlib.suppress(ApiException):
                client.AppsV1Api(kube_api_client).delete_namespaced_deployment(
                    "pytest-bridge-routing-manager", NAMESPACE, propagation_policy="Background"
                )
        assert time.monotonic() < deadline, state
        time.sleep(1)
    yield state


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "shared").mkdir()
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    return tmp_path


def _pytest(suite: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
         str(suite), "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}", "--bridge-isolate",
         f"--bridge-routing-idle={IDLE}", *args],
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_SHARED": str(suite / "shared"), **env},
    )  # fmt: skip


def test_concurrent_sessions_and_xdist_workers_get_only_their_own_traffic(
    suite: Path, kube_api_client: client.ApiClient, settled: dict[str, Any]
) -> None:
    """Three pytest runs at once, two with xdist workers and marked tests: >= 10 routes live at once."""
    runs = [
        _pytest(suite, "-n", "4", "--bridge-route-prefix=ci-a", E2E_MARKED="8"),
        _pytest(suite, "-n", "2", "--bridge-route-prefix=ci-b", E2E_MARKED="2"),
        _pytest(suite, "--bridge-route-prefix=alice"),
    ]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, out in zip(runs, outputs, strict=True):
        assert run.returncode == 0, out
    assert "9 passed" in outputs[0] and "3 passed" in outputs[1] and "1 passed" in outputs[2], outputs
    shared = suite / "shared"
    ok = sorted(p.stem for p in shared.glob("*.ok"))
    assert len(ok) == 13, ok  # every test checked its own, distinct route
    go = (shared / "go").read_text().split()
    assert len(go) >= CONCURRENT, go
    assert len(set(go)) == len(go)
    restored_in = wait_for_state(kube_api_client, settled)
    print(f"namespace equal to before {restored_in:.1f}s after the runs ended (manager idle {IDLE}s)")


def test_propagation_check_names_the_hop_that_drops_the_header(
    tmp_path: Path, kube_api_client: client.ApiClient, settled: dict[str, Any]
) -> None:
    variant = _apply_variant(kube_api_client)
    try:
        with_variant = namespace_state(kube_api_client)
        (tmp_path / "shared").mkdir()
        (tmp_path / "test_propagation.py").write_text(PROPAGATION_SUITE)
        run = _pytest(tmp_path)
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out
        assert "3 passed" in out, out
        assert "propagation: BROKEN" in out and "propagation: ok" in out, out
        wait_for_state(kube_api_client, with_variant)
    finally:
        for document in variant:
            _delete(kube_api_client, document)
    wait_for_state(kube_api_client, settled)


def _apply_variant(api: client.ApiClient) -> list[dict[str, Any]]:
    """inventory-nopropagate (a copy of the sample app that drops the header) applied and Available."""
    dynamic: Any = DynamicClient(api)
    documents = [d for d in yaml.safe_load_all(VARIANT.read_text()) if d]
    for document in documents:
        document["metadata"]["namespace"] = NAMESPACE
        resource = dynamic.resources.get(api_version=document["apiVersion"], kind=document["kind"])
        dynamic.server_side_apply(resource, body=document, field_manager="pytest-bridge-e2e", force_conflicts=True)
    apps: Any = client.AppsV1Api(api)
    deadline = time.monotonic() + 120
    while (apps.read_namespaced_deployment("inventory-nopropagate", NAMESPACE).status.available_replicas or 0) < 1:
        assert time.monotonic() < deadline, "inventory-nopropagate never became available"
        time.sleep(0.5)
    return documents


def _delete(api: client.ApiClient, document: dict[str, Any]) -> None:
    dynamic: Any = DynamicClient(api)
    resource = dynamic.resources.get(api_version=document["apiVersion"], kind=document["kind"])
    with contextlib.suppress(ApiException):
        dynamic.delete(resource, name=document["metadata"]["name"], namespace=NAMESPACE)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_or_killed_session_leaves_nothing_behind(
    suite: Path, kube_api_client: client.ApiClient, settled: dict[str, Any], sig: signal.Signals
) -> None:
    ttl = 5
    run = _pytest(suite, f"--bridge-restore-ttl={ttl}", E2E_WAIT="300")
    marker = suite / "shared" / "connected"
    # The waiting test holds until CONCURRENT routes exist; let it pass the barrier at once.
    (suite / "shared" / "go").write_text("single")
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)
    run.send_signal(sig)
    out, _ = run.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in out, out
    restored_in = wait_for_state(kube_api_client, settled, timeout=180)
    print(f"{sig.name}: namespace equal to before {restored_in:.1f}s later (route TTL {ttl}s, manager idle {IDLE}s)")


def test_the_shipped_least_privilege_role_is_enough_for_isolated_routes(
    suite: Path, tmp_path: Path, kube_api_client: client.ApiClient, settled: dict[str, Any]
) -> None:
    """A user bound only to deploy/rbac/bridge-user.yaml can deploy the manager and route, once an admin
    installed the manager's RBAC (deploy/rbac/routing-manager.yaml; e2e/test_rbac.py covers the rest)."""
    role: Any = next(yaml.safe_load_all((REPO / "deploy" / "rbac" / "bridge-user.yaml").read_text()))
    installed = [d for d in yaml.safe_load_all((REPO / "deploy" / "rbac" / "routing-manager.yaml").read_text()) if d]
    core, rbac_api = client.CoreV1Api(kube_api_client), client.RbacAuthorizationV1Api(kube_api_client)
    create: dict[str, Any] = {
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac_api.create_namespaced_role,
        "RoleBinding": rbac_api.create_namespaced_role_binding,
    }
    delete: dict[str, Any] = {
        "ServiceAccount": core.delete_namespaced_service_account,
        "Role": rbac_api.delete_namespaced_role,
        "RoleBinding": rbac_api.delete_namespaced_role_binding,
    }
    for doc in installed:
        create[doc["kind"]](NAMESPACE, doc)
    try:
        with role_user_kubeconfig(
            kube_api_client, "pytest-bridge-e2e-route-user", role, tmp_path / "user.kubeconfig"
        ) as kc:
            before = namespace_state(kube_api_client)
            (suite / "shared" / "go").write_text("single")
            run = _pytest(suite, f"--bridge-kubeconfig={kc}", "-k", "session_route")
            out, _ = run.communicate(timeout=300)
            assert run.returncode == 0, out
            assert "1 passed" in out, out
            assert "deploying the routing manager" in out, out
            wait_for_state(kube_api_client, before)
    finally:
        for doc in installed:
            with contextlib.suppress(ApiException):
                delete[doc["kind"]](doc["metadata"]["name"], NAMESPACE)


def test_cleanup_cli_removes_what_a_killed_session_left_at_once(
    suite: Path, kube_api_client: client.ApiClient, settled: dict[str, Any]
) -> None:
    """`pytest-bridge cleanup` does not wait for the TTL: the killed session's route goes now."""
    run = _pytest(suite, "--bridge-restore-ttl=600", E2E_WAIT="300")
    (suite / "shared" / "go").write_text("single")
    marker = suite / "shared" / "connected"
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)
    run.kill()
    run.communicate(timeout=60)
    cli = [sys.executable, "-m", "pytest_bridge.cli", "-n", NAMESPACE]
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"route: {marker.read_text()} of orders" in status, status
    cleaned = subprocess.run([*cli, "cleanup"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "deleted: route pod" in cleaned, cleaned
    restored_in = wait_for_state(kube_api_client, settled, timeout=60)
    print(f"cleanup CLI: namespace equal to before {restored_in:.1f}s later (TTL was 600 s)")
