"""End to end, continued: several services at once, xdist, and the error paths that must leave
the cluster untouched.

Like ``test_bridge.py``, every test runs pytest as a subprocess on a small inner suite and
checks from outside what the cluster saw. The error cases run in a namespace of their own
(``<e2e namespace>-err``, created here and deleted at the end), with small workloads built
for each case; the before/after comparison covers the workload specs and every object
carrying the plugin's labels.
"""

from __future__ import annotations

import json
import os
import socket
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

from e2e.conftest import (
    NAMESPACE,
    SAMPLE_CODE_CONFIGMAP,
    SAMPLE_COMMAND,
    SAMPLE_IMAGE,
    pod_is_ready,
    sample_app_code,
)
from pytest_bridge.core.patch import SESSION_LABEL, strip_server_fields
from pytest_bridge.local.ports import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
ERRORS_NAMESPACE = f"{NAMESPACE}-err"
MANAGED = "app.kubernetes.io/managed-by=pytest-bridge"
SETTLE_TIMEOUT = 120.0

TWO_SERVICES_SUITE = f"""
import json, sys, urllib.request

APP = {str(APP)!r}


def test_frontend_reaches_local_orders_which_reaches_local_inventory(bridged_services):
    orders, inventory = bridged_services["orders"], bridged_services["inventory"]
    assert orders.local_port != inventory.local_port
    inventory.start(
        [sys.executable, APP],
        env={{"SERVICE_NAME": "inventory", "LISTEN_PORT": str(inventory.local_port), "HOSTNAME": "local-inventory"}},
    )
    orders.start(
        [sys.executable, APP],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(orders.local_port),
             "LISTEN_PORT_2": str(orders.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    request = urllib.request.Request("http://frontend.{NAMESPACE}/api", headers={{"kubernetes-route-as": "two"}})
    reply = json.load(urllib.request.urlopen(request, timeout=20))
    hop_orders = reply["downstream"][0]
    assert hop_orders.get("pod") == "local-orders", hop_orders
    # local orders -> "inventory" (name mapping) -> agent dials the Service -> inventory's agent -> local inventory
    hop_inventory = hop_orders["downstream"][0]
    assert hop_inventory.get("pod") == "local-inventory", hop_inventory
    assert hop_inventory["route"] == "two"
"""

XDIST_SUITE = f"""
import fcntl, json, os, socket, sys, urllib.request
from pathlib import Path

APP = {str(APP)!r}
OUT = Path(os.environ["BRIDGE_E2E_OUT"])


def test_worker_sees_the_bridge(bridged_service, worker_id):
    inventory = json.load(urllib.request.urlopen("http://inventory/api", timeout=20))  # in-process mapping
    view = {{
        "local_ports": {{str(target): local for target, local in bridged_service.local_ports.items()}},
        "env": {{name: bridged_service.env[name] for name in ("GREETING", "API_TOKEN", "POD_NAMESPACE")}},
        "session_dir": str(bridged_service.session_dir),
        "inventory_url": bridged_service.url("inventory", path="/api"),
        "inventory_ip": socket.gethostbyname("inventory"),
        "inventory_service": inventory["service"],
    }}
    (OUT / f"{{worker_id}}.json").write_text(json.dumps({{"view": view, "pid": os.getpid()}}))


def test_frontend_reaches_orders_started_by_this_worker(bridged_service, worker_id):
    # The bridged traffic goes to one local port: one local orders at a time across workers.
    with open(bridged_service.session_dir / "orders.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = bridged_service.start(
            [sys.executable, APP],
            env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(bridged_service.local_port),
                 "LISTEN_PORT_2": str(bridged_service.local_ports[9091]), "HOSTNAME": f"local-orders-{{worker_id}}",
                 "DOWNSTREAM": "http://inventory/api"}},
        )
        try:
            reply = json.load(urllib.request.urlopen("http://frontend.{NAMESPACE}/api", timeout=20))
        finally:
            process.stop()
    orders = reply["downstream"][0]
    assert orders.get("pod") == f"local-orders-{{worker_id}}", orders
    # the subprocess resolved "inventory" through the worker's mapping to the controller's listener
    assert orders["downstream"][0]["pod"].startswith("inventory-"), orders
"""

FACTORY_SUITE = f"""
import json, os, sys, urllib.request

APP = {str(APP)!r}


def test_orders_bridged_for_this_test_only(bridge_factory):
    orders = bridge_factory(
        "orders", namespace={NAMESPACE!r},
        local_port=["8080=" + os.environ["ORDERS_PORT"], "9091=" + os.environ["ADMIN_PORT"]],
    )
    assert orders.local_port == int(os.environ["ORDERS_PORT"])
    orders.start(
        [sys.executable, APP],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(orders.local_port),
             "LISTEN_PORT_2": str(orders.local_ports[9091]), "HOSTNAME": "per-test-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    reply = json.load(urllib.request.urlopen("http://frontend.{NAMESPACE}/api", timeout=20))
    assert reply["downstream"][0].get("pod") == "per-test-orders", reply
    assert reply["downstream"][0]["downstream"][0]["pod"].startswith("inventory-"), reply
"""

NOTHING_SUITE = "def test_never_runs():\n    raise AssertionError('the session must not start')\n"


# --- helpers --------------------------------------------------------------------------------


def _deployment(apps: client.AppsV1Api, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    obj = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment(name, namespace))
    return strip_server_fields(obj)


def _labelled_objects(api: client.ApiClient, namespace: str) -> list[str]:
    """Everything in ``namespace`` the plugin labels: managed-by, or any session label."""
    core, batch, rbac = client.CoreV1Api(api), client.BatchV1Api(api), client.RbacAuthorizationV1Api(api)
    found = []
    for selector in (MANAGED, SESSION_LABEL):
        listed: list[tuple[str, Any]] = [
            ("secret", core.list_namespaced_secret(namespace, label_selector=selector)),
            ("sa", core.list_namespaced_service_account(namespace, label_selector=selector)),
            ("pod", core.list_namespaced_pod(namespace, label_selector=selector)),
            ("job", batch.list_namespaced_job(namespace, label_selector=selector)),
            ("role", rbac.list_namespaced_role(namespace, label_selector=selector)),
            ("rolebinding", rbac.list_namespaced_role_binding(namespace, label_selector=selector)),
        ]
        found += [f"{kind}/{item.metadata.name}" for kind, result in listed for item in result.items]
    return sorted(set(found))


def _leftovers(api: client.ApiClient, namespace: str, timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """Labelled objects still there once the agent pods of a restored workload had time to terminate."""
    deadline = time.monotonic() + timeout
    while (found := _labelled_objects(api, namespace)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _settled(apps: client.AppsV1Api, core: client.CoreV1Api, name: str, namespace: str = NAMESPACE) -> None:
    """Wait until ``name`` is fully rolled out: generation observed, every pod Ready, nothing terminating."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        d: Any = apps.read_namespaced_deployment(name, namespace)
        selector = ",".join(f"{k}={v}" for k, v in d.spec.selector.match_labels.items())
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        wanted = d.spec.replicas if d.spec.replicas is not None else 1
        if (
            d.status.observed_generation == d.metadata.generation
            and (d.status.updated_replicas or 0) == (d.status.ready_replicas or 0) == wanted
            and len(pods) == wanted
            and all(pod_is_ready(p) for p in pods)
        ):
            return
        time.sleep(0.3)
    raise AssertionError(f"deployment {namespace}/{name} did not settle")


def _pytest(
    suite: Path, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite), *args],
        cwd=suite, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **env},
    )  # fmt: skip


def _write_suite(directory: Path, text: str) -> Path:
    (directory / "test_inner.py").write_text(text)
    return directory


# --- several services, xdist ----------------------------------------------------------------


def test_two_services_bridged_at_once(
    tmp_path: Path, sample_app: Any, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    for name in ("orders", "inventory"):
        _settled(apps_v1, core_v1, name)
    before = {name: _deployment(apps_v1, name) for name in ("orders", "inventory")}
    suite = _write_suite(tmp_path, TWO_SERVICES_SUITE)
    run = _pytest(
        suite, "--bridge-service=orders", "--bridge-service=inventory", f"--bridge-namespace={NAMESPACE}",
        # Explicit free ports: other sessions on this machine may hold the defaults (8080).
        f"--bridge-local-port=orders:8080={free_port()}", f"--bridge-local-port=orders:9091={free_port()}",
        f"--bridge-local-port=inventory:8080={free_port()}",
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert "bridge: orders (container app of Deployment orders)" in out
    assert "bridge: inventory (container app of Deployment inventory)" in out
    assert {name: _deployment(apps_v1, name) for name in before} == before
    assert _leftovers(core_v1.api_client, NAMESPACE) == []


def test_xdist_workers_share_the_controllers_bridge(
    tmp_path: Path, sample_app: Any, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    _settled(apps_v1, core_v1, "orders")
    before = _deployment(apps_v1, "orders")
    (tmp_path / "suite").mkdir()
    suite = _write_suite(tmp_path / "suite", XDIST_SUITE)
    out_dir = tmp_path / "views"
    out_dir.mkdir()
    run = _pytest(
        suite, "-n", "2", "--dist=each", "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}",
        f"--bridge-local-port=8080={free_port()}", f"--bridge-local-port=9091={free_port()}",
        BRIDGE_E2E_OUT=str(out_dir),
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "4 passed" in out, out  # --dist=each: both tests in both workers
    assert out.count("agent pod orders-") == 1, out  # connected once, by the controller
    records = {path.stem: json.loads(path.read_text()) for path in out_dir.glob("*.json")}
    assert sorted(records) == ["gw0", "gw1"], records
    assert records["gw0"]["pid"] != records["gw1"]["pid"]
    views = [record["view"] for record in records.values()]
    assert views[0] == views[1], views
    assert views[0]["inventory_ip"].startswith("127."), views[0]
    assert views[0]["inventory_service"] == "inventory"
    assert _deployment(apps_v1, "orders") == before
    assert _leftovers(core_v1.api_client, NAMESPACE) == []


def test_per_test_bridge_is_restored_at_the_tests_teardown(
    tmp_path: Path, sample_app: Any, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> None:
    _settled(apps_v1, core_v1, "orders")
    before = _deployment(apps_v1, "orders")
    suite = _write_suite(tmp_path, FACTORY_SUITE)
    run = _pytest(suite, ORDERS_PORT=str(free_port()), ADMIN_PORT=str(free_port()))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed" in out, out
    assert _deployment(apps_v1, "orders") == before
    assert _leftovers(core_v1.api_client, NAMESPACE) == []


# --- errors: a clear message, and the cluster exactly as before ------------------------------


def _container(name: str, port_name: str, port: int) -> dict[str, Any]:
    """The sample app on the stock Python image, its code from the ``code`` volume (see _workload)."""
    return {
        "name": name,
        "image": SAMPLE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": SAMPLE_COMMAND,
        "env": [{"name": "SERVICE_NAME", "value": name}, {"name": "LISTEN_PORT", "value": str(port)}],
        "ports": [{"name": port_name, "containerPort": port}],
        "volumeMounts": [{"name": "code", "mountPath": "/app", "readOnly": True}],
    }


def _workload(name: str, containers: list[dict[str, Any]], replicas: int = 1) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": containers,
                    "volumes": [{"name": "code", "configMap": {"name": SAMPLE_CODE_CONFIGMAP}}],
                },
            },
        },
    }


def _service(name: str, target_port: int | str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": 80, "targetPort": target_port}],
        },
    }


def _udp_workload() -> dict[str, Any]:
    deployment = _workload("dns", [_container("app", "http", 8080)])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"name": "http", "containerPort": 8080},
        {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
    ]
    return deployment


def _udp_service() -> dict[str, Any]:
    service = _service("dns", "dns")
    service["spec"]["ports"] = [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]
    return service


# name -> (deployment, service): one workload per error case.
ERROR_WORKLOADS: dict[str, tuple[Any, Any]] = {
    # scaled to zero: the Service selects no pods
    "idle": (_workload("idle", [_container("app", "http", 8080)], replicas=0), _service("idle", "http")),
    # two containers, and the Service targets a port neither declares
    "twin": (
        _workload("twin", [_container("web", "http", 8080), _container("worker", "metrics", 9000)]),
        _service("twin", 7000),
    ),
    # an ordinary one-container service, for the local-port case
    "solo": (_workload("solo", [_container("app", "http", 8080)]), _service("solo", "http")),
    # a Service with only a UDP port
    "dns": (_udp_workload(), _udp_service()),
}
# Services without a workload of their own: no selector (endpoints kept by hand), ExternalName.
ERROR_SERVICES: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"},
     "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "outside"},
     "spec": {"type": "ExternalName", "externalName": "example.invalid"}},
]  # fmt: skip


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


@pytest.fixture(scope="module")
def error_namespace(core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api) -> Iterator[str]:
    """``<e2e namespace>-err`` with the workloads of ERROR_WORKLOADS, settled; deleted afterwards."""
    try:
        core_v1.read_namespace(ERRORS_NAMESPACE)
    except ApiException as e:
        if e.status != 404:
            raise
    else:  # left over from an interrupted run
        core_v1.delete_namespace(ERRORS_NAMESPACE)
        _wait_namespace_gone(core_v1, ERRORS_NAMESPACE)
    namespace: Any = {"metadata": {"name": ERRORS_NAMESPACE}}
    core_v1.create_namespace(namespace)
    try:
        code: Any = sample_app_code(ERRORS_NAMESPACE)  # the client takes plain dicts as bodies too
        core_v1.create_namespaced_config_map(ERRORS_NAMESPACE, code)
        for deployment, service in ERROR_WORKLOADS.values():
            apps_v1.create_namespaced_deployment(ERRORS_NAMESPACE, deployment)
            core_v1.create_namespaced_service(ERRORS_NAMESPACE, service)
        for extra in ERROR_SERVICES:
            body: Any = extra
            core_v1.create_namespaced_service(ERRORS_NAMESPACE, body)
        for name in ERROR_WORKLOADS:
            _settled(apps_v1, core_v1, name, ERRORS_NAMESPACE)
        yield ERRORS_NAMESPACE
    finally:
        core_v1.delete_namespace(ERRORS_NAMESPACE)
        _wait_namespace_gone(core_v1, ERRORS_NAMESPACE)


@pytest.fixture
def unchanged(
    error_namespace: str, apps_v1: client.AppsV1Api, core_v1: client.CoreV1Api
) -> Iterator[None]:  # fmt: skip
    """Every workload of the error namespace, and its labelled objects, are the same after the test."""
    before = {name: _deployment(apps_v1, name, error_namespace) for name in ERROR_WORKLOADS}
    assert _labelled_objects(core_v1.api_client, error_namespace) == []
    yield
    assert {name: _deployment(apps_v1, name, error_namespace) for name in ERROR_WORKLOADS} == before
    assert _labelled_objects(core_v1.api_client, error_namespace) == []  # nothing was created: no waiting


def _run_error_case(tmp_path: Path, namespace: str, *args: str) -> str:
    run = _pytest(_write_suite(tmp_path, NOTHING_SUITE), f"--bridge-namespace={namespace}", *args, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 4, out  # pytest's usage error: the session never started
    assert "never_runs" not in run.stdout, out
    return run.stderr


def test_service_without_pods_is_a_clear_error(tmp_path: Path, error_namespace: str, unchanged: None) -> None:
    stderr = _run_error_case(tmp_path, error_namespace, "--bridge-service=idle")
    assert f"service 'idle' selects no pods in namespace '{error_namespace}'" in stderr, stderr


def test_container_that_cannot_be_chosen_is_a_clear_error(
    tmp_path: Path, error_namespace: str, unchanged: None
) -> None:  # fmt: skip
    stderr = _run_error_case(tmp_path, error_namespace, "--bridge-service=twin")
    assert "cannot choose the container to replace for service 'twin'" in stderr, stderr
    assert "web" in stderr and "worker" in stderr, stderr  # lists the containers
    assert "--bridge-container=twin=NAME" in stderr, stderr  # and says what to do


def test_local_port_in_use_is_a_clear_error(tmp_path: Path, error_namespace: str, unchanged: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = _run_error_case(tmp_path, error_namespace, "--bridge-service=solo", f"--bridge-local-port={port}")
    assert f"local port {port} (for solo target port 8080) is already in use" in stderr, stderr
    assert f"(pid {os.getpid()})" in stderr, stderr  # names who holds it: this test's process
    assert "nothing was changed" in stderr, stderr


# The bad-input table (README "Bad input"): each row is a pytest run that must stop before the
# session starts with one clear message naming the cause (and, where there is one, the setting to
# change), while the cluster stays exactly as it was (the ``unchanged`` fixture). Rows:
# (id, pytest arguments ({ns}: the error namespace), files to write, fragments of the message).
KLPC = "KubernetesLocalProcessConfig.yaml"
BAD_INPUTS: list[tuple[str, list[str], dict[str, str], list[str]]] = [
    ("namespace-missing", ["--bridge-service=solo", "--bridge-namespace=no-such-namespace"], {},
     ["no-such-namespace"]),
    ("service-missing", ["--bridge-service=nope"], {}, ["service 'nope' not found"]),
    ("service-without-selector", ["--bridge-service=manual"], {}, ["manual", "selector"]),
    ("service-externalname", ["--bridge-service=outside"], {}, ["outside", "ExternalName"]),
    ("udp-only-port", ["--bridge-service=dns"], {}, ["dns", "UDP"]),
    ("container-missing", ["--bridge-service=solo", "--bridge-container=solo=nope"], {}, ["nope", "app"]),
    ("local-port-out-of-range", ["--bridge-service=solo", "--bridge-local-port=70000"], {}, ["70000"]),
    ("local-port-not-a-number", ["--bridge-service=solo", "--bridge-local-port=http"], {}, ["--bridge-local-port"]),
    ("ttl-shorter-than-connect-timeout",
     ["--bridge-service=solo", "--bridge-restore-ttl=5", "--bridge-connect-timeout=60"], {},
     ["--bridge-restore-ttl", "--bridge-connect-timeout"]),
    ("ttl-not-a-number", ["--bridge-service=solo", "--bridge-restore-ttl=soon"], {}, ["--bridge-restore-ttl", "soon"]),
    ("route-prefix-too-long", ["--bridge-service=solo", "--bridge-isolate", "--bridge-route-prefix=" + "r" * 40], {},
     ["--bridge-route-prefix"]),
    ("route-prefix-not-dns", ["--bridge-service=solo", "--bridge-isolate", "--bridge-route-prefix=Bad_Prefix"], {},
     ["--bridge-route-prefix", "Bad_Prefix"]),
    ("transport-unknown", ["--bridge-service=solo", "--bridge-transport=pigeon"], {}, ["--bridge-transport", "pigeon"]),
    ("code-delivery-unknown", ["--bridge-service=solo", "--bridge-code=floppy"], {}, ["--bridge-code", "floppy"]),
    ("name-mapping-unknown", ["--bridge-service=solo", "--bridge-name-mapping=dns"], {},
     ["--bridge-name-mapping", "dns"]),
    ("kubeconfig-missing", ["--bridge-service=solo", "--bridge-kubeconfig=/no/such/kubeconfig"], {},
     ["/no/such/kubeconfig"]),
    ("context-unknown", ["--bridge-service=solo", "--bridge-context=no-such-context"], {}, ["no-such-context"]),
    ("api-server-unreachable", ["--bridge-service=solo", "--bridge-kubeconfig=unreachable.kubeconfig"],
     {"unreachable.kubeconfig": "UNREACHABLE"}, ["did not answer", "is it reachable"]),
    ("config-not-yaml", ["--bridge-service=solo"], {KLPC: "env: [unclosed\n"}, [KLPC]),
    ("config-unsupported-version", ["--bridge-service=solo"], {KLPC: "version: 9.9\n"}, [KLPC, "9.9"]),
    ("config-missing-mount", ["--bridge-service=solo"],
     {KLPC: "version: 0.1\nenv:\n  - name: CA\n    value: $(volumeMounts:no-such-mount)/ca.crt\n"},
     ["no-such-mount"]),
    ("config-missing-service", ["--bridge-service=solo"],
     {KLPC: "version: 0.1\nenv:\n  - name: UP\n    value: http://$(services:no-such-service)\n"},
     ["no-such-service"]),
    ("config-malformed-token", ["--bridge-service=solo"],
     {KLPC: "version: 0.1\nenv:\n  - name: UP\n    value: $(services:)\n"}, [KLPC, "$(services:)"]),
]  # fmt: skip


def _unreachable_kubeconfig() -> str:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "gone", "user": {"token": "x"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone", "namespace": "default"}}],
    })  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_clear_error_and_changes_nothing(
    tmp_path: Path, error_namespace: str, unchanged: None, case: tuple[str, list[str], dict[str, str], list[str]]
) -> None:
    _, args, files, fragments = case
    for name, text in files.items():
        (tmp_path / name).write_text(_unreachable_kubeconfig() if text == "UNREACHABLE" else text)
    stderr = _run_error_case(tmp_path, error_namespace, *args)
    print(next(line for line in stderr.splitlines() if line.startswith("ERROR:")))  # the message, for -rP
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert "Traceback" not in stderr and "INTERNALERROR" not in stderr, stderr
    assert len([line for line in stderr.splitlines() if line.startswith("ERROR:")]) == 1, stderr
