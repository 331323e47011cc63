"""End to end: what a user sees around a bridge — imported volumes, failure reports, progress, doctor.

In a namespace of its own (``<e2e namespace>-ux``, applied when missing and kept, like the
packaging check's) the sample app's ``orders`` gets more mounts than it ships with: a downwardAPI
volume, a projected one, a ``subPath`` file of its ConfigMap and an ``emptyDir``. A suite run as a
user runs it (``pytest -v --junitxml``, in a subprocess):

* **volumes** (issue 12 item 3): with no KubernetesLocalProcessConfig.yaml, every ConfigMap,
  Secret, projected and downwardAPI mount arrives under ``bridged_service.volumes`` with the
  pod's content; the ``emptyDir`` is listed as skipped, with a note; ``--bridge-import-volumes=false``
  fetches only the service-account token;
* **progress** (item 4): ``-v`` prints connect's phases as they start;
* **failure artifacts** (item 5): a failing test that used the bridge gets a ``pytest-bridge``
  section with the agent's logs and the phase timings; one with an isolated route also gets the
  route's state and the route pod's, router's and routing manager's logs; the JUnit XML carries
  the phase timings as properties;
* **doctor** (item 7): ``pytest-bridge doctor orders`` says it can bridge and changes nothing (every
  object of the namespace has the same resourceVersion after); a paused Deployment and a
  ResourceQuota that refuses pods are named as FAIL lines, exit 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from pytest_bridge_routing import objects as ro

from e2e.conftest import NAMESPACE, apply_sample_app, wait_app_settled

pytestmark = pytest.mark.e2e

UX_NAMESPACE = f"{NAMESPACE}-ux"
README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"```python\n(# example: [^\n]*\n.*?)```", re.DOTALL)
GREETING = "hello from the orders ConfigMap\n"  # fixtures/manifests/orders-config.yaml, greeting.txt
SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"

# More mounts than the sample app ships with: every kind the import knows, and one it skips.
EXTRA_MOUNTS: dict[str, Any] = {
    "spec": {
        "template": {
            "spec": {
                "volumes": [
                    {
                        "name": "podinfo",
                        "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
                    },
                    {"name": "bundle", "projected": {"sources": [{"configMap": {"name": "orders-files"}}]}},
                    {"name": "scratch", "emptyDir": {}},
                ],
                "containers": [
                    {
                        "name": "app",
                        "volumeMounts": [
                            {"name": "podinfo", "mountPath": "/etc/podinfo"},
                            {"name": "bundle", "mountPath": "/etc/bundle"},
                            {"name": "config", "mountPath": "/etc/greeting.txt", "subPath": "greeting.txt"},
                            {"name": "scratch", "mountPath": "/scratch"},
                        ],
                    }
                ],
            }
        }
    }
}

INNER_SUITE = """
import json, os
from pathlib import Path

import pytest

from pytest_bridge import LocalService

GREETING = {greeting!r}
SA_PATH = {sa_path!r}


def test_volumes(bridged_service: LocalService) -> None:
    volumes = bridged_service.volumes
    Path(os.environ["E2E_OUT"]).write_text(json.dumps({{"volumes": volumes, "skipped": bridged_service.skipped_volumes}}))
    assert (Path(volumes[SA_PATH]) / "token").read_text().count(".") == 2  # a JWT
    if os.environ["E2E_IMPORT"] == "false":
        assert list(volumes) == [SA_PATH]
        return
    assert (Path(volumes["/etc/sample/config"]) / "greeting.txt").read_text() == GREETING
    assert sorted(os.listdir(volumes["/etc/sample/secret"])) == ["ORDERS_API_TOKEN", "ORDERS_DB_PASSWORD"]
    assert Path(volumes["/etc/greeting.txt"]).read_text() == GREETING  # a subPath mount: the file itself
    assert 'app.kubernetes.io/name="orders"' in (Path(volumes["/etc/podinfo"]) / "labels").read_text()
    assert (Path(volumes["/etc/bundle"]) / "greeting.txt").read_text() == GREETING
    assert "/scratch" not in volumes
    assert [s for s in bridged_service.skipped_volumes if s.startswith("/scratch (emptyDir scratch")]


def test_fails_with_the_bridge(bridged_service: LocalService) -> None:
    if os.environ["E2E_IMPORT"] == "true":
        raise AssertionError("deliberately, to get the failure section")


@pytest.mark.isolated
def test_fails_with_a_route(isolated_route) -> None:
    if os.environ["E2E_IMPORT"] == "true":
        raise AssertionError("deliberately, with a route")
"""


def _ux_app(api: client.ApiClient) -> str:
    apply_sample_app(api, UX_NAMESPACE)  # creates the namespace too; idempotent
    apps = client.AppsV1Api(api)
    apps.patch_namespaced_deployment("orders", UX_NAMESPACE, EXTRA_MOUNTS)
    wait_app_settled(client.CoreV1Api(api), UX_NAMESPACE)
    return UX_NAMESPACE


@pytest.fixture(scope="module")
def ux_namespace(kube_api_client: client.ApiClient) -> str:
    return _ux_app(kube_api_client)


def _run_suite(
    tmp_path: Path, namespace: str, *extra: str, import_volumes: str = "true"
) -> tuple[str, Path, dict[str, Any]]:
    (tmp_path / "test_user.py").write_text(INNER_SUITE.format(greeting=GREETING, sa_path=SA_PATH))
    junit, out = tmp_path / "junit.xml", tmp_path / "volumes.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:asyncio", "-v",
         "--bridge-service=orders", f"--bridge-namespace={namespace}", f"--bridge-import-volumes={import_volumes}",
         f"--junitxml={junit}", *extra, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False,
        env={**os.environ, "E2E_OUT": str(out), "E2E_IMPORT": import_volumes},
    )  # fmt: skip
    output = run.stdout + run.stderr
    return output, junit, json.loads(out.read_text()) if out.exists() else {}


def _properties(junit: Path) -> dict[str, dict[str, str]]:
    cases = ET.parse(junit).getroot().iter("testcase")
    return {str(c.get("name")): {str(p.get("name")): str(p.get("value")) for p in c.iter("property")} for c in cases}


def test_volumes_progress_and_failure_artifacts(ux_namespace: str, tmp_path: Path) -> None:
    output, junit, seen = _run_suite(tmp_path, ux_namespace)
    assert "2 failed, 1 passed" in output, output
    # item 3: volumes imported by default, the emptyDir skipped with a note
    assert set(seen["volumes"]) >= {"/etc/sample/config", "/etc/sample/secret", "/etc/greeting.txt", "/etc/podinfo",
                                    "/etc/bundle", SA_PATH}, seen  # fmt: skip
    assert "/opt/pytest-bridge" not in seen["volumes"]  # the agent's own code mount is not the service's
    assert "pytest-bridge: orders: volumes not imported: /scratch (emptyDir scratch: scratch space" in output, output
    # item 4: -v shows connect's phases as they start
    for phase in ("plan", "orders: restore guard", "orders: agent pod", "orders: tunnel and canaries",
                  "orders: import env and volumes", "name mapping"):  # fmt: skip
        assert f"pytest-bridge: connect: {phase} (+" in output, output
    # item 5: the failures' sections
    bridge_failure = output.split("_ test_fails_with_the_bridge _", 1)[1].split("_ test_fails_with_a_route _", 1)[0]
    assert "- pytest-bridge -" in bridge_failure, bridge_failure
    assert "connect phases: plan " in bridge_failure and "orders: agent pod " in bridge_failure, bridge_failure
    assert "agent of orders: orders-" in bridge_failure and "last 40 log lines:" in bridge_failure, bridge_failure
    route_failure = output.split("_ test_fails_with_a_route _", 1)[1]
    for expected in ("- pytest-bridge -", "route pod of orders: ", "router of orders: ", "routing manager "):
        assert expected in route_failure, route_failure
    # the route's state: its pod, and what the manager's status ConfigMap says (absent: no problem)
    state = r"route \S+: pod orders-\S+; the routing manager (reports no problem|says nothing blocks)"
    assert re.search(state, route_failure), route_failure
    # item 5: the phase timings as JUnit properties
    properties = _properties(junit)
    assert float(properties["test_volumes"]["pytest-bridge connect: orders: agent pod"]) > 0, properties
    assert "pytest-bridge connect: orders: import env and volumes" in properties["test_fails_with_the_bridge"]
    assert "pytest-bridge route: live" in properties["test_fails_with_a_route"], properties


def readme_examples() -> list[str]:
    """The README's Python blocks that start with ``# example:``: whole test modules, run as users would."""
    return EXAMPLE.findall(README.read_text())


def test_the_readme_examples_run(ux_namespace: str, tmp_path: Path) -> None:
    examples = readme_examples()
    assert examples, "no '# example:' block in README.md"
    for n, example in enumerate(examples):
        (tmp_path / f"test_readme_example_{n}.py").write_text(example)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error",
         "--bridge-service=orders", f"--bridge-namespace={ux_namespace}", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0 and f"{len(examples)} passed" in output, output


def test_volume_import_turned_off(ux_namespace: str, tmp_path: Path) -> None:
    output, _, seen = _run_suite(tmp_path, ux_namespace, "-k", "volumes", import_volumes="false")
    assert "1 passed" in output, output
    assert list(seen["volumes"]) == [SA_PATH], seen
    assert "volumes not imported" not in output, output


# --- doctor ----------------------------------------------------------------------------------------


def _versions(api: client.ApiClient, namespace: str) -> dict[str, str]:
    """Every object of the namespace that a bridge could touch, with its resourceVersion."""
    core, apps, batch = client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    listings: list[tuple[str, Any]] = [
        ("pod", core.list_namespaced_pod(namespace)),
        ("service", core.list_namespaced_service(namespace)),
        ("configmap", core.list_namespaced_config_map(namespace)),
        ("secret", core.list_namespaced_secret(namespace)),
        ("serviceaccount", core.list_namespaced_service_account(namespace)),
        ("deployment", apps.list_namespaced_deployment(namespace)),
        ("job", batch.list_namespaced_job(namespace)),
        ("role", rbac.list_namespaced_role(namespace)),
        ("rolebinding", rbac.list_namespaced_role_binding(namespace)),
    ]
    return {
        f"{kind}/{o.metadata.name}": str(o.metadata.resource_version)
        for kind, result in listings
        for o in result.items
        if not _routing_managers(o)
    }


def _routing_managers(obj: Any) -> bool:
    """The routing manager a route left (it removes itself when idle, on its own clock), and its objects."""
    meta = obj.metadata
    owners = {ref.name for ref in meta.owner_references or []}
    component = (meta.labels or {}).get(ro.COMPONENT)
    return meta.name == ro.MANAGER_NAME or ro.MANAGER_NAME in owners or component == "routing-manager"


def _doctor(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_bridge.cli", "-n", namespace, "doctor", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def quota_refusing_pods(kube_api_client: client.ApiClient, ux_namespace: str) -> Iterator[None]:
    core = client.CoreV1Api(kube_api_client)
    quota: Any = {"metadata": {"name": "e2e-no-more-pods"}, "spec": {"hard": {"pods": "0"}}}
    core.create_namespaced_resource_quota(ux_namespace, quota)
    try:
        yield
    finally:
        core.delete_namespaced_resource_quota("e2e-no-more-pods", ux_namespace)


def test_doctor_says_it_can_bridge_and_changes_nothing(kube_api_client: client.ApiClient, ux_namespace: str) -> None:
    wait_app_settled(client.CoreV1Api(kube_api_client), ux_namespace)  # an earlier session's restore is done
    before = _versions(kube_api_client, ux_namespace)
    run = _doctor(ux_namespace, "orders")
    assert run.returncode == 0, run.stdout + run.stderr
    for check in ("service", "workload", "permissions (bridge)", "permissions (isolated routes)", "policy",
                  "code ConfigMap", "image agent", "names", "transport"):  # fmt: skip
        assert any(line.startswith("ok ") and f" {check} " in line for line in run.stdout.splitlines()), run.stdout
    assert run.stdout.rstrip().endswith("can bridge: nothing in the cluster was changed to find out")
    assert _versions(kube_api_client, ux_namespace) == before


def test_doctor_names_what_stands_in_the_way(
    kube_api_client: client.ApiClient, ux_namespace: str, quota_refusing_pods: None
) -> None:
    apps = client.AppsV1Api(kube_api_client)
    wait_app_settled(client.CoreV1Api(kube_api_client), ux_namespace)
    apps.patch_namespaced_deployment("frontend", ux_namespace, {"spec": {"paused": True}})
    try:
        before = _versions(kube_api_client, ux_namespace)
        paused = _doctor(ux_namespace, "frontend")
        quota = _doctor(ux_namespace, "orders")
        missing = _doctor(ux_namespace, "nosuch")
        assert _versions(kube_api_client, ux_namespace) == before
    finally:
        apps.patch_namespaced_deployment("frontend", ux_namespace, {"spec": {"paused": False}})
    assert paused.returncode == 1, paused.stdout
    assert any(line.startswith("FAIL workload") and "paused" in line for line in paused.stdout.splitlines()), (
        paused.stdout
    )
    assert quota.returncode == 1, quota.stdout
    assert any(line.startswith("FAIL policy") and "quota" in line for line in quota.stdout.splitlines()), quota.stdout
    assert missing.returncode == 1 and "FAIL service" in missing.stdout and "services there:" in missing.stdout


HOLDING_SUITE = """
import os, time
from pathlib import Path


def test_hold_the_bridge(bridged_service):
    shared = Path(os.environ["E2E_SHARED"])
    (shared / "live").write_text("")
    deadline = time.monotonic() + 120
    while not (shared / "release").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
"""


def test_doctor_names_a_live_session_holding_the_service(ux_namespace: str, tmp_path: Path) -> None:
    (tmp_path / "test_hold.py").write_text(HOLDING_SUITE)
    holder = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:asyncio", "-q",
         "--bridge-service=orders", f"--bridge-namespace={ux_namespace}", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "E2E_SHARED": str(tmp_path)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "live").exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stdout.read() if holder.stdout else ""
            time.sleep(0.2)
        run = _doctor(ux_namespace, "orders")
    finally:
        (tmp_path / "release").write_text("")
        out, _ = holder.communicate(timeout=120)
    assert holder.returncode == 0, out
    assert run.returncode == 1, run.stdout
    in_use = [line for line in run.stdout.splitlines() if line.startswith("FAIL in use")]
    assert in_use and "bridged by live session" in in_use[0] and "--bridge-isolate" in in_use[0], run.stdout


def test_doctor_cannot_reach_the_cluster() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest_bridge.cli", "--kubeconfig", "/nonexistent", "doctor", "orders"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and run.stdout.startswith("FAIL kubeconfig"), run.stdout + run.stderr
