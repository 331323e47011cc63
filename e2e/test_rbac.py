"""End to end: a user bound only to the shipped least-privilege Role (deploy/rbac/bridge-user.yaml).

In a namespace of its own (``<e2e namespace>-rbac``) with the sample app, a ServiceAccount bound to
nothing but the Role of ``pytest-bridge rbac`` (a TokenRequest token in a kubeconfig written to a
temporary folder, as CI users have) runs inner pytest sessions:

* a bridge of ``orders`` with the env import: the Secret-sourced variables and mounted Secret files
  arrive although the user may read no Secret at all;
* a SIGKILL in the middle of a session: the guard restores the workload;
* an isolated route, with the routing manager's RBAC installed once by the admin
  (``pytest-bridge rbac --routing-manager``); without it, the route is one error naming what is
  missing and the file that grants it, before anything is created;
* the Role less one verb: one error naming the verb, the resource and the file, nothing changed.
* the Role with `patch` on deployments narrowed to ``orders`` (resourceNames) still bridges it.

After each, the namespace is as before: workloads, Services, nothing of ours left.
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
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.conftest import NAMESPACE, apply_sample_app, ensure_namespace, objects_of_ours, wait_app_settled
from e2e.test_isolation import namespace_state, wait_for_state
from pytest_bridge.core import rbac
from pytest_bridge.core.patch import strip_server_fields

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
RBAC_NAMESPACE = f"{NAMESPACE}-rbac"
USER = "pytest-bridge-e2e-user"
IDLE = 3  # --bridge-routing-idle

INNER_SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path

import pytest

NAMESPACE = os.environ["E2E_NAMESPACE"]


def start_local(service, name):
    return service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(service.local_port),
             "LISTEN_PORT_2": str(service.local_ports[9091]), "HOSTNAME": name,
             "DOWNSTREAM": "http://inventory/api"}},
    )


def get(headers=None):
    request = urllib.request.Request(f"http://frontend.{{NAMESPACE}}/api", headers=headers or {{}})
    return json.load(urllib.request.urlopen(request, timeout=30))["downstream"][0]


def test_bridged_with_the_services_env(bridged_service):
    if os.environ.get("E2E_ISOLATE"):
        pytest.skip("routes only")
    # Secrets reach the local process through the agent, not through the user's permissions.
    assert bridged_service.env["API_TOKEN"] == "demo-token-not-a-secret"
    assert bridged_service.env["ORDERS_DB_PASSWORD"] == "demo-password-not-a-secret"
    secret_dir = Path(bridged_service.env["ORDERS_SECRET_DIR"])
    assert (secret_dir / "ORDERS_API_TOKEN").read_text() == "demo-token-not-a-secret"
    start_local(bridged_service, "local-orders")
    orders = get()
    assert orders["pod"] == "local-orders", orders
    assert orders["downstream"][0]["pod"].startswith("inventory-"), orders
    marker = os.environ.get("E2E_WAIT")
    if marker:
        Path(marker).write_text("connected")
        time.sleep(120)


@pytest.mark.isolated
@pytest.mark.skipif(not os.environ.get("E2E_ISOLATE"), reason="bridge only")
def test_route(isolated_route):
    start_local(isolated_route, f"local-{{isolated_route.name}}")
    assert get(isolated_route.header)["pod"] == f"local-{{isolated_route.name}}"
    assert get()["pod"].startswith("orders-")
"""

CONFIG = """\
version: 0.1
env:
  - name: ORDERS_SECRET_DIR
    value: $(volumeMounts:secret)
"""


# --- the namespace, the user and the admin's install -------------------------------------------


@pytest.fixture(scope="module")
def namespace(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> str:
    """A namespace with the sample app in it (kept between runs)."""
    ensure_namespace(core_v1, RBAC_NAMESPACE, {"app.kubernetes.io/part-of": "pytest-bridge-e2e"})
    apply_sample_app(kube_api_client, RBAC_NAMESPACE)
    wait_app_settled(core_v1, RBAC_NAMESPACE)
    return RBAC_NAMESPACE


def _shipped_role() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(rbac.file_text(rbac.USER_FILE)) if d["kind"] == "Role")


@contextlib.contextmanager
def user_kubeconfig(api: client.ApiClient, namespace: str, role: dict[str, Any], path: Path) -> Iterator[Path]:
    """A kubeconfig at ``path`` for the ServiceAccount USER bound only to ``role`` in ``namespace``."""
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    named: Any = {**role, "metadata": {"name": USER}}
    binding: Any = {
        "metadata": {"name": USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": USER},
        "subjects": [{"kind": "ServiceAccount", "name": USER, "namespace": namespace}],
    }
    for delete in (rbac_api.delete_namespaced_role_binding, rbac_api.delete_namespaced_role):
        with contextlib.suppress(ApiException):  # left by an interrupted run
            delete(USER, namespace)
    with contextlib.suppress(ApiException):
        account: Any = {"metadata": {"name": USER}}
        core.create_namespaced_service_account(namespace, account)
    rbac_api.create_namespaced_role(namespace, named)
    rbac_api.create_namespaced_role_binding(namespace, binding)
    try:
        request: Any = {"spec": {"expirationSeconds": 900}}
        token: Any = core.create_namespaced_service_account_token(USER, namespace, request)
        configuration = api.configuration
        path.write_text(
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "user",
                "clusters": [{"name": "c", "cluster": {"server": configuration.host,
                                                       "certificate-authority": configuration.ssl_ca_cert}}],
                "users": [{"name": "u", "user": {"token": token.status.token}}],
                "contexts": [{"name": "user", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
            })
        )  # fmt: skip
        path.chmod(0o600)
        yield path
    finally:
        rbac_api.delete_namespaced_role_binding(USER, namespace)
        rbac_api.delete_namespaced_role(USER, namespace)


@pytest.fixture
def as_user(namespace: str, kube_api_client: client.ApiClient, tmp_path: Path) -> Iterator[Path]:
    with user_kubeconfig(kube_api_client, namespace, _shipped_role(), tmp_path / "user.kubeconfig") as path:
        yield path


def _manager_rbac() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rbac.file_text(rbac.MANAGER_FILE)) if d]


def _install_manager_rbac(api: client.ApiClient, namespace: str) -> None:
    """What `pytest-bridge rbac --routing-manager | kubectl -n NS apply -f -` does, as the admin."""
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    create: dict[str, Any] = {
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac_api.create_namespaced_role,
        "RoleBinding": rbac_api.create_namespaced_role_binding,
    }
    for doc in _manager_rbac():
        try:
            create[doc["kind"]](namespace, doc)
        except ApiException as e:
            if e.status != 409:
                raise


def _uninstall_manager_rbac(api: client.ApiClient, namespace: str) -> None:
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    delete: dict[str, Any] = {
        "ServiceAccount": core.delete_namespaced_service_account,
        "Role": rbac_api.delete_namespaced_role,
        "RoleBinding": rbac_api.delete_namespaced_role_binding,
    }
    for doc in _manager_rbac():
        with contextlib.suppress(ApiException):
            delete[doc["kind"]](doc["metadata"]["name"], namespace)


# --- running the inner suite --------------------------------------------------------------------


def _pytest(suite: Path, kubeconfig: Path, namespace: str, *args: str, **env: str) -> subprocess.Popen[str]:
    (suite / "test_inner.py").write_text(INNER_SUITE)
    (suite / "KubernetesLocalProcessConfig.yaml").write_text(CONFIG)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(suite / "test_inner.py"),
         "--bridge-service=orders", f"--bridge-kubeconfig={kubeconfig}", *args],
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_NAMESPACE": namespace, **env},
    )  # fmt: skip


def _orders(apps: client.AppsV1Api, namespace: str) -> dict[str, Any]:
    return strip_server_fields(
        apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("orders", namespace))
    )


def _wait_nothing_of_ours(api: client.ApiClient, namespace: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while objects_of_ours(api, namespace) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert objects_of_ours(api, namespace) == []


def _settle(api: client.ApiClient, namespace: str) -> None:
    _wait_nothing_of_ours(api, namespace)
    wait_app_settled(client.CoreV1Api(api), namespace)


# --- the tests ----------------------------------------------------------------------------------


def test_the_user_may_read_no_secret(as_user: Path, namespace: str) -> None:
    from kubernetes import config  # noqa: PLC0415

    user_api = config.new_client_from_config(config_file=str(as_user))
    with pytest.raises(ApiException) as caught:
        client.CoreV1Api(user_api).list_namespaced_secret(namespace)
    assert caught.value.status == 403
    with pytest.raises(ApiException) as caught:
        client.CoreV1Api(user_api).read_namespaced_secret("orders-secret", namespace)
    assert caught.value.status == 403


def test_bridge_with_env_import_as_the_bridge_user(
    as_user: Path, namespace: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    _settle(kube_api_client, namespace)
    before = _orders(apps_v1, namespace)
    run = _pytest(tmp_path, as_user, namespace)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _orders(apps_v1, namespace) == before
    _wait_nothing_of_ours(kube_api_client, namespace, timeout=60)


def test_guard_restores_after_sigkill_as_the_bridge_user(
    as_user: Path, namespace: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    _settle(kube_api_client, namespace)
    before = _orders(apps_v1, namespace)
    ttl = 10
    marker = tmp_path / "connected"
    run = _pytest(tmp_path, as_user, namespace, f"--bridge-restore-ttl={ttl}", E2E_WAIT=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)
    assert _orders(apps_v1, namespace) != before
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=30)
    started = time.monotonic()
    while _orders(apps_v1, namespace) != before:
        assert time.monotonic() - started < ttl + 30, "the guard did not restore in time"
        time.sleep(0.5)
    print(f"restored by the guard {time.monotonic() - started:.1f}s after SIGKILL (TTL {ttl}s)")
    _wait_nothing_of_ours(kube_api_client, namespace, timeout=60)
    wait_app_settled(client.CoreV1Api(kube_api_client), namespace)


def test_a_route_without_the_installed_manager_names_what_is_missing(
    as_user: Path, namespace: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    _uninstall_manager_rbac(kube_api_client, namespace)
    _settle(kube_api_client, namespace)
    before = namespace_state(kube_api_client, namespace)
    run = _pytest(tmp_path, as_user, namespace, "--bridge-isolate", E2E_ISOLATE="1")
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out
    assert "to deploy the routing manager" in out, out
    assert "'create' on 'services'" in out, out
    assert "nothing was changed" in out, out
    assert "pytest-bridge rbac --routing-manager" in out, out
    assert "deploying the routing manager" not in out, out
    wait_for_state(kube_api_client, before, timeout=60, namespace=namespace)


def test_isolated_route_as_the_bridge_user_with_the_manager_installed_by_the_admin(
    as_user: Path, namespace: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    _settle(kube_api_client, namespace)
    _install_manager_rbac(kube_api_client, namespace)
    try:
        before = namespace_state(kube_api_client, namespace)
        run = _pytest(
            tmp_path, as_user, namespace, "--bridge-isolate", f"--bridge-routing-idle={IDLE}", E2E_ISOLATE="1"
        )
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out
        assert "1 passed" in out, out
        assert "deploying the routing manager" in out, out
        # The manager removes itself when idle; what the admin installed stays, and nothing else.
        wait_for_state(kube_api_client, before, timeout=120, namespace=namespace)
        roles: Any = client.RbacAuthorizationV1Api(kube_api_client).list_namespaced_role(namespace).items
        assert {"pytest-bridge-routing-manager", "pytest-bridge-router"} <= {r.metadata.name for r in roles}
    finally:
        _uninstall_manager_rbac(kube_api_client, namespace)


def test_a_missing_permission_is_one_clear_error_before_any_change(
    namespace: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    role = _shipped_role()
    for rule in role["rules"]:  # the shipped Role less one verb: creating the guard Job
        if rule["resources"] == ["jobs"]:
            rule["verbs"] = [verb for verb in rule["verbs"] if verb != "create"]
    _settle(kube_api_client, namespace)
    with user_kubeconfig(kube_api_client, namespace, role, tmp_path / "limited.kubeconfig") as kubeconfig:
        before = namespace_state(kube_api_client, namespace)
        orders = _orders(apps_v1, namespace)
        run = _pytest(tmp_path, kubeconfig, namespace)
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 4, out
        errors = [line for line in out.splitlines() if "missing permissions" in line]
        assert len(errors) == 1, out
        assert "'create' on 'jobs'" in errors[0], out
        assert "nothing was changed" in errors[0], out
        assert "bridge-user.yaml" in errors[0], out
        assert _orders(apps_v1, namespace) == orders
        assert namespace_state(kube_api_client, namespace) == before
        assert objects_of_ours(kube_api_client, namespace) == []


def test_a_role_narrowed_to_the_bridged_workload_is_enough(
    namespace: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    """What the README suggests: `patch` on deployments only for the workloads you bridge."""
    role = _shipped_role()
    for rule in role["rules"]:
        if rule["resources"] == ["deployments", "statefulsets"]:
            rule["verbs"] = ["get"]
    role["rules"].append(
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["orders"], "verbs": ["patch"]}
    )
    _settle(kube_api_client, namespace)
    before = _orders(apps_v1, namespace)
    with user_kubeconfig(kube_api_client, namespace, role, tmp_path / "narrow.kubeconfig") as kubeconfig:
        run = _pytest(tmp_path, kubeconfig, namespace)
        out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _orders(apps_v1, namespace) == before
    _wait_nothing_of_ours(kube_api_client, namespace, timeout=60)
