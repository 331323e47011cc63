"""End to end: warm route pods (``--bridge-route-pool``) on the real cluster, in a namespace of its own.

A session opens a per-test route of ``orders`` (cold: its pod starts), which fills the session's
pool; while they wait, the warm pods are in no Service's endpoints and no router's config, and not
one untagged request reaches them. Then per-test routes, each closed before the next (so no other
route keeps the router), claim a warm pod each and are live well under the cold time, proven by
the canary and by a request with the header answered by a local server. A closed route's pod goes
back to the pool: the six routes run on the two warm pods, none started or deleted, and the
previous route's header reaches the cluster's orders, never the next test's local server on
the same pod. Closing the session deletes the warm pods at once, and the manager restores
``orders`` and removes itself.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from pytest_bridge_agent import labels
from pytest_bridge_routing import objects as ro

from e2e.conftest import NAMESPACE, apply_sample_app, ensure_namespace, wait_app_settled
from pytest_bridge.local.ports import free_port
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings, NameMappingMode

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
POOL_NAMESPACE = f"{NAMESPACE}-pool"
ROUTES = 6


def _pool_pods(core: client.CoreV1Api, session: str = "") -> list[Any]:
    selector = ro.LABEL_POOL + (f",{labels.SESSION_LABEL}={session}" if session else "")
    pods: Any = core.list_namespaced_pod(POOL_NAMESPACE, label_selector=selector)
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.2)


def _get(cluster_ip: str, headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{cluster_ip}/api", headers=headers)
    reply: dict[str, Any] = json.load(urllib.request.urlopen(request, timeout=30))
    return reply


def test_per_test_routes_claim_warm_pods_that_get_no_untagged_traffic(kube_api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api_client)
    ensure_namespace(core, POOL_NAMESPACE, {"pytest-bridge-e2e": "route-pool"})
    apply_sample_app(kube_api_client, namespace=POOL_NAMESPACE)
    wait_app_settled(core, POOL_NAMESPACE)
    settings = BridgeSettings(
        namespace=POOL_NAMESPACE,
        kubeconfig=Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]),
        name_mapping=NameMappingMode.IN_PROCESS,
        routing_idle=3.0,
        route_pool=2,
        route_pool_idle=120.0,
    )
    session = BridgeSession(settings)
    orders: Any = core.read_namespaced_service("orders", POOL_NAMESPACE)
    orders_ip: str = orders.spec.cluster_ip
    try:
        first = session.open_route("orders", per_test=True)
        assert first.timings["warm"] == 0.0, "the session's first route starts its own pod"
        pool = session.route_pools["orders"]
        _wait(lambda: len(pool) == 2, 120, "two warm pods ready")
        warm_pods = _pool_pods(core, session.session_id)
        assert len(warm_pods) == 2
        warm_ips = {p.status.pod_ip for p in warm_pods}
        # selected by no Service: no EndpointSlice of the namespace lists them
        slices: Any = client.DiscoveryV1Api(kube_api_client).list_namespaced_endpoint_slice(POOL_NAMESPACE)
        listed = {a for s in slices.items for e in s.endpoints or [] for a in e.addresses}
        assert not listed & warm_ips, "a warm pod is behind a Service"
        router_config: Any = core.read_namespaced_config_map(ro.router_name("orders"), POOL_NAMESPACE)
        config = router_config.data["nginx.conf"]
        assert not any(ip in config for ip in warm_ips), "a warm pod is in the router's config"
        # untagged traffic never reaches a warm pod (its agent would carry it to our tunnel)
        for _ in range(40):
            assert _get(orders_ip, {})["pod"].startswith("orders-")
        tunnels = [w.conn.tunnel.tunnel for w in pool._ready if w.conn.tunnel is not None]
        assert len(tunnels) == 2 and all(t.reverse_total == 0 for t in tunnels), "a warm pod got a request"
        session.close_route(first)

        times: list[float] = []
        used: list[str] = []
        previous: Any = None
        for _ in range(ROUTES):
            _wait(lambda: len(pool) >= 1, 120, "a warm pod ready")
            time.sleep(0.5)  # the next test: the manager takes the last route out of the router
            route = session.open_route("orders", per_test=True)
            try:
                assert route.timings["warm"] == 1.0, route.timings
                assert route.pod.startswith("orders-pool-")
                times.append(route.timings["live"])
                used.append(route.pod)
                local = subprocess.Popen(
                    [sys.executable, str(APP)],
                    env={**os.environ, "SERVICE_NAME": "orders", "LISTEN_PORT": str(route.local_port),
                         "LISTEN_PORT_2": str(free_port()), "HOSTNAME": f"local-{route.name}"},
                )  # fmt: skip
                try:
                    _wait(lambda r=route: _listens(r.local_port), 30, "the local server listens")
                    reply = _get(orders_ip, route.header)
                    assert reply["pod"] == f"local-{route.name}"
                    assert _get(orders_ip, {})["pod"].startswith("orders-"), "untagged traffic stays in the cluster"
                    if previous is not None:  # its pod may be this one now: its header must not follow it
                        assert _get(orders_ip, previous.header)["pod"].startswith("orders-"), previous.name
                finally:
                    local.terminate()
                    local.wait(10)
            finally:
                session.close_route(route)
                previous = route
        assert statistics.median(times) < 1.0, times
        assert set(used) <= {p.metadata.name for p in warm_pods}, f"a pod was started for a route: {used}"
    finally:
        session.close()
    assert not _pool_pods(core, session.session_id), "closing the session deletes its warm pods"

    def restored() -> bool:
        current: Any = core.read_namespaced_service("orders", POOL_NAMESPACE)
        return ro.LABEL_ROUTER not in (current.spec.selector or {})

    _wait(restored, 90, "orders restored")
    apps = client.AppsV1Api(kube_api_client)
    _wait(
        lambda: not apps.list_namespaced_deployment(POOL_NAMESPACE, label_selector=ro.COMPONENT).items,
        90,
        "the routers and the manager gone",
    )
    print(f"warm per-test routes live in {sorted(times)} s")


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
