"""End to end: clusters with policies — Pod Security ``restricted``, and admission that refuses what we need.

A namespace enforcing Pod Security ``restricted`` runs the sample app (its pods comply); there the
bridge, the guard's restore after SIGKILL and two isolated routes at once all work, on nothing
but the stock Python and nginx images. Then what a strict cluster may refuse — the agent's pod
(the workload does not comply), the ConfigMap with our code (forbidden, or too large), an image
the nodes cannot pull — is each one clear error naming the cause and the setting to change, and
the namespace is left as it was.
"""

from __future__ import annotations

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
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.conftest import NAMESPACE, apply_sample_app, ensure_namespace, objects_of_ours, wait_app_settled
from e2e.test_isolation import namespace_state, wait_for_state
from pytest_bridge.cluster import bundle
from pytest_bridge.core.patch import strip_server_fields

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
RESTRICTED = f"{NAMESPACE}-restricted"
LEGACY = f"{NAMESPACE}-legacy"
MANAGED = "app.kubernetes.io/managed-by=pytest-bridge"
PSS = "pod-security.kubernetes.io"
IDLE = 3  # --bridge-routing-idle: the routing manager removes itself this long after the last route

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


def test_bridged(bridged_service):
    if os.environ.get("E2E_ISOLATE"):
        pytest.skip("routes only")
    start_local(bridged_service, "local-orders")
    orders = get()
    assert orders["pod"] == "local-orders", orders
    assert orders["downstream"][0]["pod"].startswith("inventory-"), orders
    marker = os.environ.get("E2E_WAIT")
    if marker:
        Path(marker).write_text("connected")
        time.sleep(120)


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(2 if os.environ.get("E2E_ISOLATE") else 0))
def test_route(isolated_route, n):
    start_local(isolated_route, f"local-{{isolated_route.name}}")
    (Path(os.environ["E2E_SHARED"]) / isolated_route.name).write_text("live")
    deadline = time.monotonic() + 120
    while len(list(Path(os.environ["E2E_SHARED"]).iterdir())) < 2:  # both routes live at once
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert get(isolated_route.header)["pod"] == f"local-{{isolated_route.name}}"
    assert get()["pod"].startswith("orders-")
"""


@pytest.fixture(scope="module")
def restricted(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> str:
    """A namespace enforcing Pod Security ``restricted`` with the sample app in it (kept between runs)."""
    labels = {f"{PSS}/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    ensure_namespace(core_v1, RESTRICTED, {**labels, f"{PSS}/enforce-version": "latest"})
    apply_sample_app(kube_api_client, RESTRICTED)
    wait_app_settled(core_v1, RESTRICTED)
    return RESTRICTED


# --- running the inner suite ---------------------------------------------------------------------


def _pytest(suite: Path, namespace: str, *args: str, **env: str) -> subprocess.Popen[str]:
    (suite / "test_inner.py").write_text(INNER_SUITE)
    (suite / "shared").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(suite / "test_inner.py"),
         "--bridge-service=orders", f"--bridge-namespace={namespace}", *args],
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_NAMESPACE": namespace, "E2E_SHARED": str(suite / "shared"), **env},
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
    """Nothing of ours left and the sample app's pods settled (an earlier test's restore done)."""
    _wait_nothing_of_ours(api, namespace)
    wait_app_settled(client.CoreV1Api(api), namespace)


def _wait_equal(read: Any, expected: Any, timeout: float) -> float:
    started = time.monotonic()
    while read() != expected:
        assert time.monotonic() - started < timeout, "not restored in time"
        time.sleep(0.5)
    return time.monotonic() - started


# --- Pod Security restricted: everything works ---------------------------------------------------


def test_bridge_in_a_restricted_namespace(
    restricted: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    _settle(kube_api_client, restricted)
    before = _orders(apps_v1, restricted)
    run = _pytest(tmp_path, restricted)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _orders(apps_v1, restricted) == before
    _wait_nothing_of_ours(kube_api_client, restricted, timeout=30)  # the guard's pod goes with its Job


def test_guard_restores_after_sigkill_in_a_restricted_namespace(
    restricted: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    _settle(kube_api_client, restricted)
    before = _orders(apps_v1, restricted)
    ttl = 10
    marker = tmp_path / "connected"
    run = _pytest(tmp_path, restricted, f"--bridge-restore-ttl={ttl}", E2E_WAIT=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)
    assert _orders(apps_v1, restricted) != before
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=30)
    took = _wait_equal(lambda: _orders(apps_v1, restricted), before, timeout=ttl + 30)
    print(f"restored {took:.1f}s after SIGKILL (TTL {ttl}s)")
    _wait_nothing_of_ours(kube_api_client, restricted, timeout=60)
    wait_app_settled(client.CoreV1Api(kube_api_client), restricted)  # the restored pods run again


def test_two_routes_at_once_in_a_restricted_namespace(
    restricted: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    _settle(kube_api_client, restricted)
    before = namespace_state(kube_api_client, restricted)
    run = _pytest(
        tmp_path, restricted, "--bridge-isolate", "-p", "xdist", "-n", "2", f"--bridge-routing-idle={IDLE}",
        E2E_ISOLATE="1",
    )  # fmt: skip
    out, _ = run.communicate(timeout=400)
    assert run.returncode == 0, out
    assert "2 passed" in out, out
    wait_for_state(kube_api_client, before, timeout=120, namespace=restricted)


# --- what a strict cluster refuses --------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> Iterator[str]:
    """A namespace that enforces ``restricted`` only after its workloads started (one does not comply)."""
    ensure_namespace(core_v1, LEGACY, {})
    core_v1.patch_namespace(LEGACY, {"metadata": {"labels": {f"{PSS}/enforce": None}}})
    apply_sample_app(kube_api_client, LEGACY)
    apps = client.AppsV1Api(kube_api_client)
    # orders loses its securityContext, as a workload deployed before the policy would have
    patch = [{"op": "remove", "path": "/spec/template/spec/containers/0/securityContext"}]
    current: Any = apps.read_namespaced_deployment("orders", LEGACY)
    if current.spec.template.spec.containers[0].security_context is not None:
        apps.patch_namespaced_deployment("orders", LEGACY, patch)
    wait_app_settled(core_v1, LEGACY)
    core_v1.patch_namespace(LEGACY, {"metadata": {"labels": {f"{PSS}/enforce": "restricted"}}})
    yield LEGACY


def test_a_workload_the_policy_would_refuse_is_refused_before_any_change(
    legacy: str, tmp_path: Path, kube_api_client: client.ApiClient, apps_v1: client.AppsV1Api
) -> None:
    before = _orders(apps_v1, legacy)
    run = _pytest(tmp_path, legacy)
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out
    assert "the cluster refuses the agent pod for Deployment orders by policy" in out, out
    assert 'violates PodSecurity "restricted:latest"' in out, out
    assert "nothing was changed" in out, out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert _orders(apps_v1, legacy) == before
    assert objects_of_ours(kube_api_client, legacy) == [], "refused before anything was created"


def _policy(
    name: str, namespace: str, expression: str, message: str, reason: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}
                ]
            },
            "validations": [{"expression": expression, "message": message, "reason": reason}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }
    return policy, binding


@pytest.fixture
def code_configmaps_refused(
    request: pytest.FixtureRequest, kube_api_client: client.ApiClient, restricted: str
) -> Iterator[str]:
    """A ValidatingAdmissionPolicy refusing ConfigMaps that carry our code, with the given reason."""
    reason: str = request.param
    name = f"e2e-no-code-configmaps-{reason.lower()}"
    message = "ConfigMaps of code are too large here" if reason == "RequestEntityTooLarge" else "no code in ConfigMaps"
    policy, binding = _policy(
        name, restricted, f"!has(object.metadata.labels) || !('{bundle.CODE_LABEL}' in object.metadata.labels)",
        message, reason,
    )  # fmt: skip
    admission = client.AdmissionregistrationV1Api(kube_api_client)
    core = client.CoreV1Api(kube_api_client)
    admission.create_validating_admission_policy(policy)  # type: ignore[arg-type]
    admission.create_validating_admission_policy_binding(binding)  # type: ignore[arg-type]
    try:
        probe: Any = {"metadata": {"name": "e2e-probe", "labels": {bundle.CODE_LABEL: "x"}}}
        deadline = time.monotonic() + 30
        while True:  # policies take effect a moment after they are created
            try:
                core.create_namespaced_config_map(restricted, probe, dry_run="All")
            except ApiException:
                break
            assert time.monotonic() < deadline, "the admission policy never took effect"
            time.sleep(0.2)
        yield message
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)


@pytest.mark.parametrize("code_configmaps_refused", ["Forbidden", "RequestEntityTooLarge"], indirect=True)
def test_a_refused_code_configmap_is_a_clear_error_and_changes_nothing(
    code_configmaps_refused: str,
    restricted: str,
    tmp_path: Path,
    kube_api_client: client.ApiClient,
    apps_v1: client.AppsV1Api,
) -> None:
    _settle(kube_api_client, restricted)
    before = _orders(apps_v1, restricted)
    run = _pytest(tmp_path, restricted)
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out
    assert code_configmaps_refused in out, out
    assert "pytest-bridge images push" in out and "--bridge-code=image" in out, out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert _orders(apps_v1, restricted) == before
    _wait_nothing_of_ours(kube_api_client, restricted, timeout=30)


def test_an_unpullable_routing_image_fails_the_route_fast_naming_the_setting(
    restricted: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    _settle(kube_api_client, restricted)
    before = namespace_state(kube_api_client, restricted)
    started = time.monotonic()
    run = _pytest(
        tmp_path, restricted, "--bridge-isolate", "--bridge-routing-image=localhost/e2e/no-such-nginx:0",
        f"--bridge-routing-idle={IDLE}", E2E_ISOLATE="1",
    )  # fmt: skip
    out, _ = run.communicate(timeout=300)
    took = time.monotonic() - started
    assert run.returncode != 0, out
    assert "cannot pull the image 'localhost/e2e/no-such-nginx:0'" in out, out
    assert "--bridge-routing-image" in out, out
    assert took < 60, f"the route failed only after {took:.0f}s"
    wait_for_state(kube_api_client, before, timeout=120, namespace=restricted)
    print(json.dumps({"failed_after_s": round(took, 1)}))
