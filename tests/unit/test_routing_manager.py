"""The routing vocabulary (objects) and the manager's reconcile loop against an in-memory API."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from pytest_bridge_routing import objects as o
from pytest_bridge_routing.manager import Manager

from pytest_bridge.jsonpatch import apply_patch

NS = "shop"


def service(name: str, selector: dict[str, str] | None, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {
            "selector": selector,
            "ports": ports or [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def app_pod(name: str, app: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def route_pod(service_name: str, route: str, ip: str, *, ready: bool = True, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{service_name}-{route}",
            "namespace": NS,
            "labels": o.labels("route", **{o.LABEL_ROUTE: route, o.LABEL_ROUTE_SERVICE: service_name}),
        },
        "spec": {"containers": [{"name": "app"}]},
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def ingress(name: str, host: str, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "tls": [{"hosts": [host], "secretName": "cert"}],
            "rules": [
                {
                    "host": host,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": backend, "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ],
        },
    }


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if (eq and labels.get(key) != value) or (not eq and key not in labels):
            return False
    return True


class FakeApi:
    """The manager's Api over dicts; routers become Ready when the test says so."""

    def __init__(self) -> None:
        self.namespace = NS
        self.mutations = 0
        self.store: dict[str, dict[str, dict[str, Any]]] = {}
        self.ips = itertools.count(1)

    def put(self, resource: str, obj: dict[str, Any]) -> None:
        self.store.setdefault(resource, {})[obj["metadata"]["name"]] = obj

    def items(self, group: str, resource: str, selector: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(x) for x in self.store.get(resource, {}).values() if _matches(x, selector)]

    def create(self, group: str, resource: str, obj: Any) -> bool:
        self.mutations += 1
        if obj["metadata"]["name"] in self.store.get(resource, {}):
            return False
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = "1"
        if resource == "services":
            obj["spec"]["clusterIP"] = f"10.96.0.{next(self.ips)}"
        self.put(resource, obj)
        return True

    def replace(self, group: str, resource: str, name: str, obj: Any) -> None:
        self.mutations += 1
        self.put(resource, copy.deepcopy(obj))

    def patch(self, group: str, resource: str, name: str, ops: list[dict[str, Any]]) -> None:
        self.mutations += 1
        patched = apply_patch(self.store[resource][name], ops)
        if patched["metadata"].get("annotations") == {}:
            del patched["metadata"]["annotations"]  # the API server omits empty maps
        self.store[resource][name] = patched

    def delete(self, group: str, resource: str, name: str) -> None:
        self.mutations += 1
        self.store.get(resource, {}).pop(name, None)

    def router_pods_ready(self) -> None:
        for name, deployment in self.store.get("deployments", {}).items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            pod = {
                "metadata": {"name": f"{name}-pod", "namespace": NS, "labels": labels},
                "status": {
                    "phase": "Running",
                    "podIP": "10.244.0.99",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
            self.put("pods", pod)


@pytest.fixture
def api() -> FakeApi:
    api = FakeApi()
    api.put("services", service("orders", {"app": "orders"}))
    api.put("services", service("frontend", {"app": "frontend"}))
    api.put("services", service("inventory", {"app": "inventory"}))
    api.put("pods", app_pod("orders-1", "orders", "10.244.0.10"))
    api.put("pods", app_pod("frontend-1", "frontend", "10.244.0.11"))
    api.put("ingresses", ingress("shop", "shop.example", "frontend"))
    return api


def settle(manager: Manager, api: FakeApi, rounds: int = 6) -> None:
    for _ in range(rounds):
        manager.reconcile()
        api.router_pods_ready()


def snapshot(api: FakeApi) -> dict[str, Any]:
    return json.loads(json.dumps({resource: objs for resource, objs in api.store.items() if objs}))


def test_first_route_builds_router_and_switches_selector_after_router_is_ready(api: FakeApi) -> None:
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "alice-1a2b3c", "10.244.0.20"))
    manager.reconcile()
    manager.reconcile()
    manager.reconcile()
    orders = api.store["services"]["orders"]
    assert orders["spec"]["selector"] == {"app": "orders"}, "not switched before the router is Ready"
    settle(manager, api)
    orders = api.store["services"]["orders"]
    assert orders["spec"]["selector"] == {o.LABEL_ROUTER: "orders"}
    assert json.loads(orders["metadata"]["annotations"][o.ANN_ORIGINAL_SELECTOR]) == {"app": "orders"}
    default = api.store["services"]["orders-pbr-default"]
    assert default["spec"]["selector"] == {"app": "orders"}
    conf = api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert "alice-1a2b3c" in conf
    assert "10.244.0.20" in conf
    router = api.store["deployments"]["orders-pbr-router"]
    containers = {c["name"]: c for c in router["spec"]["template"]["spec"]["containers"]}
    ports = containers["nginx"]["ports"]
    assert {"containerPort": 8080, "name": "http", "protocol": "TCP"} in ports, (
        "named targetPort resolves on the router"
    )
    # the ingress backend gets a router (host -> header) and the ingress a copy per route
    assert api.store["services"]["frontend"]["spec"]["selector"] == {o.LABEL_ROUTER: "frontend"}
    copy_ = api.store["ingresses"]["shop-pbr-alice-1a2b3c"]
    assert copy_["spec"]["rules"][0]["host"] == "alice-1a2b3c.shop.example"
    assert copy_["spec"]["tls"][0]["hosts"] == ["alice-1a2b3c.shop.example"]
    assert "inventory" not in {o.LABEL_ROUTER} and api.store["services"]["inventory"]["spec"]["selector"] == {
        "app": "inventory"
    }


def test_last_route_gone_restores_everything_exactly(api: FakeApi) -> None:
    before = snapshot(api)
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    api.put("pods", route_pod("orders", "r2", "10.244.0.21"))
    settle(manager, api)
    api.store["pods"].pop("orders-r1")
    settle(manager, api)
    assert api.store["services"]["orders"]["spec"]["selector"] == {o.LABEL_ROUTER: "orders"}, "r2 still routed"
    conf = api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert "10.244.0.20" not in conf and "10.244.0.21" in conf
    api.store["pods"].pop("orders-r2")
    for _ in range(4):
        manager.reconcile()
    for name in list(api.store["pods"]):
        if name.endswith("-pod"):
            api.store["pods"].pop(name)  # the router pods go with their Deployments
    assert snapshot(api) == before


def test_route_not_ready_yet_is_not_in_the_config(api: FakeApi) -> None:
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20", ready=False))
    settle(manager, api)
    assert "10.244.0.20" not in api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    generation = api.store["configmaps"]["orders-pbr-router"]["metadata"]["annotations"][o.ANN_GENERATION]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    manager.reconcile()
    cm = api.store["configmaps"]["orders-pbr-router"]
    assert "10.244.0.20" in cm["data"]["nginx.conf"]
    assert int(cm["metadata"]["annotations"][o.ANN_GENERATION]) == int(generation) + 1


def test_finished_route_pods_are_deleted(api: FakeApi) -> None:
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20", ready=False, phase="Succeeded"))
    manager.reconcile()
    assert "orders-r1" not in api.store["pods"]


def test_a_restarted_manager_carries_on_from_cluster_state(api: FakeApi) -> None:
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    settle(Manager(api, o.RoutingRuntime()), api)  # type: ignore[arg-type]
    state = snapshot(api)
    fresh = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    before = api.mutations
    fresh.reconcile()
    assert api.mutations == before, "a new manager changes nothing that is already right"
    assert snapshot(api) == state


def test_service_reapplied_while_routed_keeps_the_new_selector_as_original(api: FakeApi) -> None:
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    settle(manager, api)
    api.store["services"]["orders"]["spec"]["selector"] = {"app": "orders", "tier": "v2"}  # kubectl apply
    settle(manager, api)
    annotations = api.store["services"]["orders"]["metadata"]["annotations"]
    assert json.loads(annotations[o.ANN_ORIGINAL_SELECTOR]) == {"app": "orders", "tier": "v2"}
    api.store["pods"].pop("orders-r1")
    settle(manager, api)
    assert api.store["services"]["orders"]["spec"]["selector"] == {"app": "orders", "tier": "v2"}


def test_idle_expiry() -> None:
    now = [0.0]
    manager = Manager(FakeApi(), o.RoutingRuntime(), idle_seconds=10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert not manager.idle_expired(busy=False)
    now[0] = 9
    assert not manager.idle_expired(busy=False)
    assert not manager.idle_expired(busy=True)
    now[0] = 15
    assert not manager.idle_expired(busy=False), "busy reset the idle clock"
    now[0] = 25.5
    assert manager.idle_expired(busy=False)


# --- objects -------------------------------------------------------------------------------------


def test_dns_label_cuts_long_names_with_a_hash() -> None:
    name = o.dns_label("a" * 60, "pbr-default")
    assert len(name) <= 63
    assert o.dns_label("a" * 60, "pbr-default") == name
    assert o.dns_label("b" * 60, "pbr-default") != name
    assert o.dns_label("Orders_V2", "x") == "orders-v2-x"


@pytest.mark.parametrize("bad", ["", "-a", "a-", "A", "a.b", "a" * 64, "a_b"])
def test_route_names_must_be_dns_labels(bad: str) -> None:
    with pytest.raises(ValueError, match="DNS label"):
        o.check_route_name(bad)


def test_switch_and_restore_patches_round_trip() -> None:
    svc = service("orders", {"app": "orders"})
    switched = apply_patch(svc, o.switch_patch(svc))
    assert switched["spec"]["selector"] == {o.LABEL_ROUTER: "orders"}
    assert apply_patch(switched, o.restore_patch(switched)) == {
        **svc,
        "metadata": {**svc["metadata"], "annotations": {}},
    }


def test_switch_patch_fails_if_the_selector_changed_meanwhile() -> None:
    svc = service("orders", {"app": "orders"})
    ops = o.switch_patch(svc)
    svc["spec"]["selector"] = {"app": "other"}
    with pytest.raises(Exception, match="test"):
        apply_patch(svc, ops)


def test_resolve_target_ports_numbers_names_and_skips_udp() -> None:
    svc = service(
        "orders",
        {"app": "orders"},
        [
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 9090, "targetPort": 9091},
            {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
            {"name": "ghost", "port": 81, "targetPort": "nope"},
        ],
    )
    ports = o.resolve_target_ports(svc, [app_pod("orders-1", "orders", "10.0.0.1")])
    assert [(p["name"], p["port"], p["target"], p["target_name"]) for p in ports] == [
        ("http", 80, 8080, "http"),
        ("admin", 9090, 9091, ""),
    ]


def test_manager_objects_are_least_privilege_and_owned_by_the_deployment_order() -> None:
    objs = o.manager_objects(NS, o.RoutingRuntime(), 30)
    assert objs[0]["kind"] == "Deployment"
    roles = {obj["metadata"]["name"]: obj for obj in objs if obj["kind"] == "Role"}
    assert roles[o.ROUTER_SA]["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]
    verbs = {rule["resources"][0]: set(rule["verbs"]) for rule in roles[o.MANAGER_NAME]["rules"]}
    assert "secrets" not in verbs and "create" not in verbs["pods"]
    env = {e["name"]: e["value"] for e in objs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MANAGER_IDLE_SECONDS"] == "30"


def test_live_routes_and_observed_services() -> None:
    pods = [
        route_pod("orders", "r1", "10.0.0.1"),
        route_pod("orders", "r2", "10.0.0.2", ready=False),
        route_pod("orders", "r3", "10.0.0.3", phase="Failed"),
    ]
    pods[0]["metadata"]["annotations"] = {o.ANN_OBSERVE: "inventory, frontend"}
    assert o.live_routes(pods) == {"orders": {"r1": "10.0.0.1", "r2": None}}
    assert o.observed_services(pods) == {"inventory", "frontend"}
