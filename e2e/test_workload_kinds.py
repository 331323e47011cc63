"""End to end: workloads whose controllers would not follow the bridge's patch on their own.

In a namespace of their own (``<e2e namespace>-kinds``), small workloads run the sample app on the
stock Python image, and a ``caller`` (the sample app too) calls each of them:

* ``scaled``: a Deployment a HorizontalPodAutoscaler keeps at two replicas or more. Bridged, the
  HPA is pinned to one replica (it would scale the agent's Deployment back up and fight the patch);
  after the session, and after a SIGKILL (by the guard), Deployment and HPA are as before.
* ``ledger``: a StatefulSet with ``updateStrategy: OnDelete`` (its pods do not roll when the
  template changes): the bridge deletes its pod so the agent starts, and again after the restore.
* ``stopped``: a paused Deployment: refused before any change, with what to do instead.
"""

from __future__ import annotations

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

from e2e.conftest import NAMESPACE, SAMPLE_CODE_CONFIGMAP, SAMPLE_COMMAND, SAMPLE_IMAGE, pod_is_ready, sample_app_code
from pytest_bridge.core.patch import SESSION_LABEL, strip_server_fields

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
KINDS_NAMESPACE = f"{NAMESPACE}-kinds"
MANAGED = "app.kubernetes.io/managed-by=pytest-bridge"
NAME_LABEL = "app.kubernetes.io/name"
SETTLE_TIMEOUT = 120.0
HPA_SYNC = 15.0  # the controller manager's default --horizontal-pod-autoscaler-sync-period
TTL = 10

INNER_SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path

SERVICE = os.environ["E2E_SERVICE"]
NS = os.environ["E2E_NAMESPACE"]


def hop():
    reply = json.load(urllib.request.urlopen(f"http://caller.{{NS}}/api", timeout=20))
    return next(h for h in reply["downstream"] if h.get("url", "").startswith(f"http://{{SERVICE}}/") or
                h.get("service") == SERVICE)


def test_the_caller_in_the_cluster_reaches_the_local_service(bridged_service):
    bridged_service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": SERVICE, "LISTEN_PORT": str(bridged_service.local_port), "HOSTNAME": "local-" + SERVICE}},
    )
    assert hop().get("pod") == "local-" + SERVICE, hop()
    marker = os.environ.get("E2E_MARKER")
    if marker:
        Path(marker).write_text("connected")
    # Longer than the HPA's sync period: every request still reaches the one agent, none is lost.
    deadline = time.monotonic() + float(os.environ.get("E2E_HOLD", "0"))
    while time.monotonic() < deadline:
        assert hop().get("pod") == "local-" + SERVICE, hop()
        time.sleep(1)
"""

NOTHING_SUITE = "def test_never_runs():\n    raise AssertionError('the session must not start')\n"


# --- the workloads ----------------------------------------------------------------------------


def _pod_template(name: str, **env: str) -> dict[str, Any]:
    labels = {NAME_LABEL: name}
    return {
        "metadata": {"labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": SAMPLE_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": SAMPLE_COMMAND,
                    "env": [{"name": "SERVICE_NAME", "value": name}, {"name": "LISTEN_PORT", "value": "8080"}]
                    + [{"name": k, "value": v} for k, v in env.items()],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "code", "mountPath": "/app", "readOnly": True}],
                }
            ],
            "volumes": [{"name": "code", "configMap": {"name": SAMPLE_CODE_CONFIGMAP}}],
        },
    }


def _deployment(name: str, replicas: int, **env: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {NAME_LABEL: name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {NAME_LABEL: name}},
            "template": _pod_template(name, **env),
        },
    }


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {NAME_LABEL: name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }


LEDGER: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": {"name": "ledger", "labels": {NAME_LABEL: "ledger"}},
    "spec": {
        "serviceName": "ledger",
        "replicas": 2,
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "OnDelete"},
        "selector": {"matchLabels": {NAME_LABEL: "ledger"}},
        "template": _pod_template("ledger"),
    },
}
SCALED_HPA: dict[str, Any] = {
    "apiVersion": "autoscaling/v2",
    "kind": "HorizontalPodAutoscaler",
    "metadata": {"name": "scaled"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
        "minReplicas": 2,
        "maxReplicas": 4,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
            }
        ],
    },
}


def _wait_namespace_gone(core: client.CoreV1Api, namespace: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1)
    raise AssertionError(f"namespace {namespace} still exists")


def _pods(core: client.CoreV1Api, name: str) -> list[Any]:
    return list(core.list_namespaced_pod(KINDS_NAMESPACE, label_selector=f"{NAME_LABEL}={name}").items)


def _settled(core: client.CoreV1Api, name: str, replicas: int, timeout: float = SETTLE_TIMEOUT) -> None:
    """``replicas`` pods of ``name``, all Ready, none terminating, none of them an agent."""
    deadline = time.monotonic() + timeout
    while True:
        pods = _pods(core, name)
        if (
            len(pods) == replicas
            and all(pod_is_ready(p) for p in pods)
            and not any(SESSION_LABEL in (p.metadata.labels or {}) for p in pods)
        ):
            return
        assert time.monotonic() < deadline, f"{name}: {[(p.metadata.name, p.status.phase) for p in pods]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def kinds(core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api) -> Iterator[str]:
    """The namespace with its workloads settled; deleted afterwards."""
    try:
        core_v1.read_namespace(KINDS_NAMESPACE)
    except ApiException as e:
        if e.status != 404:
            raise
    else:  # left over from an interrupted run
        core_v1.delete_namespace(KINDS_NAMESPACE)
        _wait_namespace_gone(core_v1, KINDS_NAMESPACE)
    namespace: Any = {"metadata": {"name": KINDS_NAMESPACE}}
    core_v1.create_namespace(namespace)
    autoscaling = client.AutoscalingV2Api(core_v1.api_client)
    try:
        code: Any = sample_app_code(KINDS_NAMESPACE)
        core_v1.create_namespaced_config_map(KINDS_NAMESPACE, code)
        for name in ("scaled", "ledger", "stopped", "caller"):
            core_v1.create_namespaced_service(KINDS_NAMESPACE, _service(name))  # type: ignore[arg-type]
        # One replica: the HPA must scale it to its minimum (2), which shows that it acts here.
        apps_v1.create_namespaced_deployment(KINDS_NAMESPACE, _deployment("scaled", 1))  # type: ignore[arg-type]
        autoscaling.create_namespaced_horizontal_pod_autoscaler(KINDS_NAMESPACE, SCALED_HPA)  # type: ignore[arg-type]
        apps_v1.create_namespaced_stateful_set(KINDS_NAMESPACE, LEDGER)  # type: ignore[arg-type]
        apps_v1.create_namespaced_deployment(KINDS_NAMESPACE, _deployment("stopped", 1))  # type: ignore[arg-type]
        caller = _deployment("caller", 1, DOWNSTREAM="http://scaled/api,http://ledger/api", DOWNSTREAM_TIMEOUT="10")
        apps_v1.create_namespaced_deployment(KINDS_NAMESPACE, caller)  # type: ignore[arg-type]
        _settled(core_v1, "stopped", 1)
        apps_v1.patch_namespaced_deployment("stopped", KINDS_NAMESPACE, {"spec": {"paused": True}})
        _settled(core_v1, "scaled", 2, timeout=SETTLE_TIMEOUT + 4 * HPA_SYNC)
        for name, replicas in (("ledger", 2), ("caller", 1)):
            _settled(core_v1, name, replicas)
        yield KINDS_NAMESPACE
    finally:
        core_v1.delete_namespace(KINDS_NAMESPACE)
        _wait_namespace_gone(core_v1, KINDS_NAMESPACE)


# --- helpers ------------------------------------------------------------------------------------


def _spec_of(api: client.ApiClient, kind: str, name: str) -> dict[str, Any]:
    readers: dict[str, Any] = {
        "Deployment": client.AppsV1Api(api).read_namespaced_deployment,
        "StatefulSet": client.AppsV1Api(api).read_namespaced_stateful_set,
        "HorizontalPodAutoscaler": client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler,
    }
    obj = strip_server_fields(api.sanitize_for_serialization(readers[kind](name, KINDS_NAMESPACE)))
    return obj


def _labelled(api: client.ApiClient) -> list[str]:
    """Objects of ours (managed-by, or a session label) in the namespace."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    found = []
    for selector in (MANAGED, SESSION_LABEL):
        listers: tuple[tuple[str, Any], ...] = (
            ("pod", core.list_namespaced_pod),
            ("job", batch.list_namespaced_job),
            ("secret", core.list_namespaced_secret),
            ("configmap", core.list_namespaced_config_map),
        )
        for kind, lister in listers:
            found += [f"{kind}/{i.metadata.name}" for i in lister(KINDS_NAMESPACE, label_selector=selector).items]
    return sorted(set(found))


def _wait_until(check: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.5)
    return time.monotonic() - started


def _pytest(tmp_path: Path, service: str, *args: str, **env: str) -> subprocess.Popen[str]:
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(tmp_path / "test_inner.py"),
         f"--bridge-service={service}", f"--bridge-namespace={KINDS_NAMESPACE}", f"--bridge-restore-ttl={TTL}", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_SERVICE": service, "E2E_NAMESPACE": KINDS_NAMESPACE, **env},
    )  # fmt: skip


def _wait_connected(run: subprocess.Popen[str], marker: Path) -> None:
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never connected"
        time.sleep(0.2)


# --- an HPA -------------------------------------------------------------------------------------


def _scaled_state(api: client.ApiClient) -> dict[str, Any]:
    return {
        "deployment": _spec_of(api, "Deployment", "scaled"),
        "hpa": _spec_of(api, "HorizontalPodAutoscaler", "scaled"),
    }


@pytest.mark.parametrize("end", ["normal", "sigkill"])
def test_a_deployment_an_hpa_scales_is_bridged_with_the_hpa_pinned_and_restored(
    kinds: str, tmp_path: Path, kube_api_client: client.ApiClient, core_v1: client.CoreV1Api, end: str
) -> None:
    _settled(core_v1, "scaled", 2)
    before = _scaled_state(kube_api_client)
    assert before["deployment"]["spec"]["replicas"] == 2, "set by the HPA"
    marker = tmp_path / "connected"
    hold = 3 * HPA_SYNC if end == "normal" else 600
    run = _pytest(tmp_path, "scaled", E2E_MARKER=str(marker), E2E_HOLD=str(hold))
    _wait_connected(run, marker)
    during = _scaled_state(kube_api_client)
    assert during["deployment"]["spec"]["replicas"] == 1
    assert (during["hpa"]["spec"]["minReplicas"], during["hpa"]["spec"]["maxReplicas"]) == (1, 1)
    if end == "sigkill":
        time.sleep(HPA_SYNC + 2)  # the HPA had its chance to scale the agent's Deployment up
        assert _spec_of(kube_api_client, "Deployment", "scaled")["spec"]["replicas"] == 1
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=30)
        took = _wait_until(lambda: _scaled_state(kube_api_client) == before, TTL + 60, "guard restore")
        print(f"Deployment and HPA restored by the guard {took:.1f}s after SIGKILL (TTL {TTL}s)")
    else:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out
        assert "1 passed" in out, out
        assert "HorizontalPodAutoscaler scaled pinned to 1 replica for the session" in out, out
        assert _scaled_state(kube_api_client) == before
    _wait_until(lambda: _labelled(kube_api_client) == [], 90, f"objects left: {_labelled(kube_api_client)}")
    _settled(core_v1, "scaled", 2)


# --- a StatefulSet on OnDelete ---------------------------------------------------------------------


def _ledger_pods_current(api: client.ApiClient) -> bool:
    """Both pods run the StatefulSet's current template (not the agent): ready, at its update revision."""
    sts: Any = client.AppsV1Api(api).read_namespaced_stateful_set("ledger", KINDS_NAMESPACE)
    pods = _pods(client.CoreV1Api(api), "ledger")
    return (
        sorted(p.metadata.name for p in pods) == ["ledger-0", "ledger-1"]
        and all(pod_is_ready(p) and SESSION_LABEL not in (p.metadata.labels or {}) for p in pods)
        and all((p.metadata.labels or {}).get("controller-revision-hash") == sts.status.update_revision for p in pods)
        and all(p.spec.containers[0].image == SAMPLE_IMAGE for p in pods)
    )


@pytest.mark.parametrize("end", ["normal", "sigkill"])
def test_an_on_delete_statefulset_is_bridged_by_deleting_its_pod_and_restored(
    kinds: str, tmp_path: Path, kube_api_client: client.ApiClient, end: str
) -> None:
    _wait_until(lambda: _ledger_pods_current(kube_api_client), SETTLE_TIMEOUT, "ledger not settled")
    before = _spec_of(kube_api_client, "StatefulSet", "ledger")
    marker = tmp_path / "connected"
    run = _pytest(tmp_path, "ledger", E2E_MARKER=str(marker), E2E_HOLD="600" if end == "sigkill" else "0")
    _wait_connected(run, marker)
    agent: Any = client.CoreV1Api(kube_api_client).read_namespaced_pod("ledger-0", KINDS_NAMESPACE)
    assert (agent.metadata.labels or {}).get(SESSION_LABEL), "ledger-0 runs the agent"
    if end == "sigkill":
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=30)
    else:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out
        assert "1 passed" in out, out
        assert "deleted pod ledger-0 (StatefulSet updateStrategy OnDelete)" in out, out
    took = _wait_until(
        lambda: _spec_of(kube_api_client, "StatefulSet", "ledger") == before and _ledger_pods_current(kube_api_client),
        TTL + 90, "ledger not restored (spec, or its pods still the agent's)",
    )  # fmt: skip
    print(f"{end}: StatefulSet and its pods restored {took:.1f}s after the session ended")
    _wait_until(lambda: _labelled(kube_api_client) == [], 90, f"objects left: {_labelled(kube_api_client)}")


# --- a paused Deployment ----------------------------------------------------------------------------


def test_a_paused_deployment_is_refused_before_any_change(
    kinds: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    before = _spec_of(kube_api_client, "Deployment", "stopped")
    assert before["spec"]["paused"] is True
    (tmp_path / "test_inner.py").write_text(NOTHING_SUITE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py"),
         "--bridge-service=stopped", f"--bridge-namespace={KINDS_NAMESPACE}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 4, out  # a usage error: the session never started
    assert "Deployment 'stopped' is paused (spec.paused: true)" in run.stderr, out
    assert f"kubectl -n {KINDS_NAMESPACE} rollout resume deployment/stopped" in run.stderr, out
    assert "--bridge-isolate" in run.stderr and "Nothing was changed" in run.stderr, out
    assert "Traceback" not in out, out
    assert _spec_of(kube_api_client, "Deployment", "stopped") == before
    assert _labelled(kube_api_client) == []


def test_a_paused_deployment_can_still_get_an_isolated_route(
    kinds: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    """What the refusal suggests works: a route pod of its own, the paused Deployment untouched."""
    before = _spec_of(kube_api_client, "Deployment", "stopped")
    suite = tmp_path / "test_route.py"
    suite.write_text(
        "import json, sys, urllib.request\n\n"
        "def test_route(isolated_route):\n"
        f"    isolated_route.start([sys.executable, {str(APP)!r}], env={{'SERVICE_NAME': 'stopped', "
        "'LISTEN_PORT': str(isolated_route.local_port), 'HOSTNAME': 'local-stopped'})\n"
        f"    request = urllib.request.Request('http://stopped.{KINDS_NAMESPACE}/api', headers=isolated_route.header)\n"
        "    assert json.load(urllib.request.urlopen(request, timeout=20))['pod'] == 'local-stopped'\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), "--bridge-service=stopped",
         f"--bridge-namespace={KINDS_NAMESPACE}", "--bridge-isolate", "--bridge-routing-idle=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _spec_of(kube_api_client, "Deployment", "stopped") == before
    _wait_until(lambda: _labelled(kube_api_client) == [], 120, f"objects left: {_labelled(kube_api_client)}")
