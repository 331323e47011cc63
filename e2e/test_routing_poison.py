"""End to end: objects the routing manager cannot route never block anyone else's route.

In a namespace of its own (``<e2e namespace>-poison``) with the sample app, the test adds what the
manager must survive: an Ingress with a wildcard host, one with a host-less rule and backends that
name a missing Service, a missing port and an ExternalName; a Service whose original-selector
annotation is not JSON and one without a selector (each asked for by a hand-made route pod), and
route pods with a malformed route label and route-on-header annotation. An isolated route for
``orders`` still goes live (header and ``<route>.<host>``), the manager names every poison once in
its log and in its status ConfigMap by what it blocks; and where something blocks the route itself
(here: a ResourceQuota refusing the manager's objects), the route fails at once naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pytest_bridge_routing import objects as ro

from e2e.conftest import NAMESPACE, SAMPLE_IMAGE, apply_sample_app, pod_is_ready

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
POISON_NAMESPACE = f"{NAMESPACE}-poison"
HOST = f"shop.{POISON_NAMESPACE}.example"  # the sample app's Ingress host, in this namespace
SETTLE_TIMEOUT = 180.0

INNER_SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path

NS = os.environ["E2E_NAMESPACE"]
SHARED = Path(os.environ["E2E_SHARED"])


def get(headers):
    request = urllib.request.Request(f"http://frontend.{{NS}}/api", headers=headers)
    return json.load(urllib.request.urlopen(request, timeout=30))["downstream"][0]


def test_orders_route_goes_live_among_the_poisons(isolated_route):
    isolated_route.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(isolated_route.local_port),
             "LISTEN_PORT_2": str(isolated_route.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    assert get(isolated_route.header)["pod"] == "local-orders"
    shop = f"{{isolated_route.name}}.{HOST}"
    assert shop in isolated_route.hosts and not any("*" in h for h in isolated_route.hosts), isolated_route.hosts
    assert get({{"Host": shop}})["pod"] == "local-orders"
    assert get({{}})["pod"].startswith("orders-")
    (SHARED / "live").write_text(isolated_route.name)
    deadline = time.monotonic() + 120
    while not (SHARED / "release").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
"""


# --- the poisons ------------------------------------------------------------------------------------


def _ingress(name: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name},
        "spec": {"rules": rules, **spec},
    }


def _rule(host: str | None, backend: str, port: dict[str, Any] | None = None) -> dict[str, Any]:
    path = {
        "path": "/",
        "pathType": "Prefix",
        "backend": {"service": {"name": backend, "port": port or {"number": 80}}},
    }
    return {**({"host": host} if host else {}), "http": {"paths": [path]}}


INGRESSES = [
    _ingress("wild", [_rule(f"*.{POISON_NAMESPACE}.example", "frontend")]),
    _ingress(
        "catchall",
        [
            _rule(None, "frontend"),
            _rule(f"ghost.{POISON_NAMESPACE}.example", "ghost"),
            _rule(f"nope.{POISON_NAMESPACE}.example", "frontend", {"name": "nope"}),
            _rule(f"pay.{POISON_NAMESPACE}.example", "payments"),
        ],
    ),
]
SERVICES: list[dict[str, Any]] = [
    {  # its isolated-routes record is not JSON
        "metadata": {"name": "legacy", "annotations": {ro.ANN_ORIGINAL_SELECTOR: "{app: inventory"}},
        "spec": {"selector": {"app.kubernetes.io/name": "inventory"}, "ports": [{"name": "http", "port": 80}]},
    },
    {"metadata": {"name": "manual"}, "spec": {"ports": [{"name": "http", "port": 80}]}},  # no selector
    {"metadata": {"name": "payments"}, "spec": {"type": "ExternalName", "externalName": "payments.example.com"}},
]


def _route_pod(name: str, service: str, route: str, header: str) -> dict[str, Any]:
    """A pod that looks like a route pod to the manager (labels, annotation); it only sleeps."""
    return {
        "metadata": {
            "name": name,
            "labels": {ro.COMPONENT: "route", ro.LABEL_ROUTE: route, ro.LABEL_ROUTE_SERVICE: service},
            "annotations": {ro.ANN_ROUTE_ON_HEADER: header},
        },
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "sleep",
                    "image": SAMPLE_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", "import time; time.sleep(3600)"],
                }
            ],
        },
    }


ROUTE_PODS = [
    _route_pod("poison-header", "orders", "fake-1", "x-route=fake-1"),  # malformed route-on-header
    _route_pod("poison-label", "orders", "Bad_Route", "kubernetes-route-as=Bad_Route"),  # not a route name
    _route_pod("poison-legacy", "legacy", "fake-2", "kubernetes-route-as=fake-2"),  # asks for `legacy`
    _route_pod("poison-manual", "manual", "fake-3", "kubernetes-route-as=fake-3"),  # asks for `manual`
]

# What the manager must name (status ConfigMap and log), by where it lands in the status.
EXPECTED_NOTES = [
    f"ingress wild: host '*.{POISON_NAMESPACE}.example' cannot carry routes",
    "ingress catchall: rule 0 has no host",
    "ingress catchall: backend service 'ghost' does not exist",
    "ingress catchall: backend service frontend has no port named 'nope'",
    "ingress catchall: backend service payments is an ExternalName alias",
    "route pod poison-label: label pytest-bridge.io/route='Bad_Route' is not a route name",
]
EXPECTED_BLOCKING = {
    ("routes", "fake-1"): "route pod poison-header: annotation pytest-bridge.io/route-on-header='x-route=fake-1'",
    (
        "services",
        "legacy",
    ): "service legacy: annotation pytest-bridge.io/original-selector='{app: inventory' is not JSON",
    ("services", "manual"): "service manual has no selector",
}


def _wait_namespace_gone(core: client.CoreV1Api) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            core.read_namespace(POISON_NAMESPACE)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1)
    raise AssertionError(f"namespace {POISON_NAMESPACE} still exists")


def _wait_sample_app(core: client.CoreV1Api) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        pods: Any = core.list_namespaced_pod(POISON_NAMESPACE, label_selector="app.kubernetes.io/part-of=bridge-demo")
        names = sorted(p.metadata.labels.get("app.kubernetes.io/name") for p in pods.items if pod_is_ready(p))
        if names == ["frontend", "inventory", "orders"] and len(pods.items) == 3:
            return
        assert time.monotonic() < deadline, f"sample app in {POISON_NAMESPACE} not ready: {names}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def poisoned(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> Iterator[str]:
    """The namespace with the sample app and every poison; deleted afterwards."""
    try:
        core_v1.read_namespace(POISON_NAMESPACE)
    except ApiException as e:
        if e.status != 404:
            raise
    else:  # left over from an interrupted run
        core_v1.delete_namespace(POISON_NAMESPACE)
        _wait_namespace_gone(core_v1)
    apply_sample_app(kube_api_client, POISON_NAMESPACE)  # creates the namespace too
    net = client.NetworkingV1Api(kube_api_client)
    try:
        for ingress in INGRESSES:
            net.create_namespaced_ingress(POISON_NAMESPACE, ingress)  # type: ignore[arg-type]
        for service in SERVICES:
            core_v1.create_namespaced_service(POISON_NAMESPACE, service)  # type: ignore[arg-type]
        for pod in ROUTE_PODS:
            core_v1.create_namespaced_pod(POISON_NAMESPACE, pod)  # type: ignore[arg-type]
        _wait_sample_app(core_v1)
        yield POISON_NAMESPACE
    finally:
        core_v1.delete_namespace(POISON_NAMESPACE)
        _wait_namespace_gone(core_v1)


def _pytest(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    (tmp_path / "shared").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(tmp_path / "test_inner.py"),
         "--bridge-service=orders", f"--bridge-namespace={POISON_NAMESPACE}", "--bridge-isolate", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_NAMESPACE": POISON_NAMESPACE, "E2E_SHARED": str(tmp_path / "shared")},
    )  # fmt: skip


def _status(core: client.CoreV1Api) -> dict[str, Any]:
    try:
        cm: Any = core.read_namespaced_config_map(ro.STATUS_CONFIGMAP, POISON_NAMESPACE)
    except ApiException as e:
        if e.status == 404:
            return {}
        raise
    return json.loads(cm.data["status.json"])  # type: ignore[no-any-return]


def _named(status: dict[str, Any]) -> list[str]:
    """What of the expected poisons the status does not name (yet)."""
    missing = [n for n in EXPECTED_NOTES if not any(line.startswith(n) for line in status.get("notes") or [])]
    for (where, key), text in EXPECTED_BLOCKING.items():
        if not any(line.startswith(text) for line in (status.get(where) or {}).get(key) or []):
            missing.append(text)
    return missing


def _manager_log(core: client.CoreV1Api) -> str:
    pods: Any = core.list_namespaced_pod(POISON_NAMESPACE, label_selector=f"{ro.COMPONENT}=routing-manager")
    running = [p for p in pods.items if p.status.phase == "Running"]
    assert running, "no routing manager pod"
    return str(core.read_namespaced_pod_log(running[0].metadata.name, POISON_NAMESPACE, container="manager"))


def test_a_route_goes_live_among_poisons_each_named_once(
    poisoned: str, tmp_path: Path, core_v1: client.CoreV1Api
) -> None:
    run = _pytest(tmp_path)
    shared = tmp_path / "shared"
    deadline = time.monotonic() + 180
    while not (shared / "live").exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "the route never went live"
        time.sleep(0.2)
    try:
        deadline = time.monotonic() + 30
        while missing := _named(_status(core_v1)):
            assert time.monotonic() < deadline, f"the status does not name {missing}: {_status(core_v1)}"
            time.sleep(0.5)
        route = (shared / "live").read_text()
        status = _status(core_v1)
        assert route not in status.get("routes", {}) and "orders" not in status.get("services", {}), status
        time.sleep(8)  # several more reconciles (2 s poll): still logged once
        log = _manager_log(core_v1)
        for text in [*EXPECTED_NOTES, *EXPECTED_BLOCKING.values()]:
            assert log.count(text) == 1, f"{text!r} logged {log.count(text)} times:\n{log}"
        assert "Traceback" not in log, log
    finally:
        (shared / "release").write_text("go")
        try:
            out, _ = run.communicate(timeout=120)  # also when the checks failed: no process left running
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, out
    assert "1 passed" in out, out


def test_what_blocks_a_route_is_named_in_its_error_at_once(
    poisoned: str, tmp_path: Path, core_v1: client.CoreV1Api
) -> None:
    """The manager cannot create orders' objects (a quota): the route fails within moments, saying so."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    # (frontend stays behind its router: the hand-made route pods keep routes alive in the namespace)
    services: Any = core_v1.list_namespaced_service
    while any(s.metadata.name == "orders-pbr-default" for s in services(POISON_NAMESPACE).items):
        assert time.monotonic() < deadline, "the last run's default Service of orders is still there"
        time.sleep(0.5)
    count = len(core_v1.list_namespaced_service(POISON_NAMESPACE).items)
    quota: Any = {"metadata": {"name": "no-more-services"}, "spec": {"hard": {"services": str(count)}}}
    core_v1.create_namespaced_resource_quota(POISON_NAMESPACE, quota)
    try:
        time.sleep(2)  # the quota controller computes its usage
        started = time.monotonic()
        run = _pytest(tmp_path)
        out, _ = run.communicate(timeout=180)
        took = time.monotonic() - started
    finally:
        core_v1.delete_namespaced_resource_quota("no-more-services", POISON_NAMESPACE)
    print(next((line for line in out.splitlines() if "cannot go live" in line), out))
    assert run.returncode == 4, out  # the session route is opened at connect: a usage error
    assert "cannot go live: the routing manager cannot route it: service orders: POST" in out, out
    assert "exceeded quota: no-more-services" in out, out
    assert took < 40, f"failed after {took:.0f}s: at once, not at the 60 s connect timeout"
    pods: Any = core_v1.list_namespaced_pod(POISON_NAMESPACE, label_selector=f"{ro.COMPONENT}=route")
    left = [p.metadata.name for p in pods.items if not p.metadata.deletion_timestamp]
    assert [name for name in left if not name.startswith("poison-")] == [], "route pod left"
