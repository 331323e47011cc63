"""The routing vocabulary (objects) and the manager's reconcile loop against an in-memory API."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from pytest_bridge_routing import objects as o
from pytest_bridge_routing.manager import ApiError, Manager

from pytest_bridge.core.jsonpatch import apply_patch

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
        self.versions = itertools.count(1000)  # replace() stores a new resourceVersion, as the API server does
        self.conflicts = False  # True: replace() with a stale resourceVersion fails (409), as the API server does
        self.replaced: list[str] = []

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

    def replace(self, group: str, resource: str, name: str, obj: Any) -> dict[str, Any]:
        self.mutations += 1
        stored = self.store.get(resource, {}).get(name)
        if (
            stored is not None
            and self.conflicts
            and obj["metadata"].get("resourceVersion") != stored["metadata"].get("resourceVersion")
        ):
            raise ApiError(f"PUT {name}: HTTP 409 Conflict")
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
        self.put(resource, obj)
        self.replaced.append(name)
        return copy.deepcopy(obj)

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


@pytest.fixture(autouse=True)
def _no_router_wakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's default wake posts to router pod IPs: none of these exist."""
    monkeypatch.setattr("pytest_bridge_routing.manager.wake_router", lambda ip: None)


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
    v2 = app_pod("orders-v2", "orders", "10.244.0.12")
    v2["metadata"]["labels"]["tier"] = "v2"
    api.put("pods", v2)
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


# --- poison: objects the manager cannot route never stop it or other services' routes -------------


def routed(api: FakeApi, service_name: str = "orders", route: str = "r1") -> bool:
    """``route`` of ``service_name`` is live: the service switched to its router, the route in its config."""
    svc = api.store["services"][service_name]
    conf = api.store.get("configmaps", {}).get(o.router_name(service_name), {}).get("data", {}).get("nginx.conf", "")
    return svc["spec"]["selector"] == o.router_selector(service_name) and route in conf


def status(api: FakeApi) -> dict[str, Any]:
    cm = api.store.get("configmaps", {}).get(o.STATUS_CONFIGMAP)
    return json.loads(cm["data"]["status.json"]) if cm else {}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def ingress_rules(name: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"rules": rules, **spec},
    }


def rule(host: str | None, backend: str, port: dict[str, Any] | None = None) -> dict[str, Any]:
    path = {
        "path": "/",
        "pathType": "Prefix",
        "backend": {"service": {"name": backend, "port": port or {"number": 80}}},
    }
    return {**({"host": host} if host else {}), "http": {"paths": [path]}}


def test_a_wildcard_ingress_host_is_noted_once_and_blocks_nothing(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "pytest_bridge_routing.manager")
    wild = ingress_rules(
        "wild",
        [rule("*.shop.example", "frontend"), rule("api.shop.example", "frontend")],
        tls=[{"hosts": ["*.shop.example", "api.shop.example"], "secretName": "wild"}],
    )
    api.put("ingresses", wild)
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    settle(manager, api, rounds=8)
    assert api.store["services"]["orders"]["spec"]["selector"] == o.router_selector("orders")
    conf = api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert "route r1" in conf and "*" not in conf.split("# port")[0]
    assert "#   host <route>.api.shop.example" in conf and "#   host <route>.shop.example" in conf
    copy_ = api.store["ingresses"]["wild-pbr-r1"]
    assert [r["host"] for r in copy_["spec"]["rules"]] == ["r1.api.shop.example"], "the wildcard rule is not copied"
    assert copy_["spec"]["tls"][0]["hosts"] == ["r1.api.shop.example"]
    problem = "ingress wild: host '*.shop.example' cannot carry routes (<route>.*.shop.example is no host name)"
    assert status(api)["notes"] == [problem]
    assert status(api)["services"] == {} and status(api)["routes"] == {}
    assert warnings(caplog).count(problem) == 1, "logged once, not every reconcile"


def test_host_less_rules_and_default_backends_are_not_copied(api: FakeApi) -> None:
    api.put(
        "ingresses",
        ingress_rules(
            "catchall",
            [rule(None, "frontend"), rule("m.shop.example", "frontend")],
            defaultBackend={"service": {"name": "frontend", "port": {"number": 80}}},
        ),
    )
    api.put("ingresses", ingress_rules("only-catchall", [rule(None, "frontend")]))
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    settle(manager, api)
    assert routed(api)
    copy_ = api.store["ingresses"]["catchall-pbr-r1"]
    assert [r["host"] for r in copy_["spec"]["rules"]] == ["r1.m.shop.example"]
    assert "defaultBackend" not in copy_["spec"]
    assert "only-catchall-pbr-r1" not in api.store["ingresses"], "nothing of it can carry a route"
    assert "ingress catchall: rule 0 has no host: <route>.<host> requests cannot reach it" in status(api)["notes"]


def test_an_ingress_backend_missing_or_without_the_named_port_is_noted(api: FakeApi) -> None:
    api.put(
        "ingresses",
        ingress_rules(
            "broken", [rule("x.shop.example", "ghost"), rule("y.shop.example", "frontend", {"name": "nope"})]
        ),
    )
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    settle(Manager(api, o.RoutingRuntime()), api)  # type: ignore[arg-type]
    assert routed(api)
    assert api.store["services"]["frontend"]["spec"]["selector"] == o.router_selector("frontend")
    notes = status(api)["notes"]
    assert "ingress broken: backend service 'ghost' does not exist" in notes
    assert "ingress broken: backend service frontend has no port named 'nope'" in notes


@pytest.mark.parametrize(
    ("recorded", "why"),
    [
        ("{app: legacy", "is not JSON"),
        ('["app", "legacy"]', "is not a JSON object of strings"),
        ('{"app": 1}', "is not a JSON object of strings"),
        ("null", "is not a JSON object of strings"),
        ("{}", "is not a JSON object of strings"),
    ],
)
def test_a_malformed_original_selector_record_is_named_and_left_alone(
    api: FakeApi, recorded: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = service("legacy", {"app": "legacy"})
    legacy["metadata"]["annotations"] = {o.ANN_ORIGINAL_SELECTOR: recorded}
    api.put("services", legacy)
    stuck = service("stuck", o.router_selector("stuck"))  # switched to a router, its record then damaged
    stuck["metadata"]["annotations"] = {o.ANN_ORIGINAL_SELECTOR: recorded}
    api.put("services", stuck)
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    api.put("pods", route_pod("legacy", "r2", "10.244.0.21"))
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    settle(manager, api)
    assert routed(api), "orders' route is live"
    assert api.store["services"]["legacy"] == legacy, "not touched"
    assert api.store["services"]["stuck"] == stuck, "not restored to a selector it cannot know"
    blocking = status(api)["services"]
    assert why in blocking["legacy"][0] and "legacy" in blocking["legacy"][0]
    assert f"kubectl annotate service legacy {o.ANN_ORIGINAL_SELECTOR}-" in blocking["legacy"][0]
    assert "(the service is left as it is)" in blocking["stuck"][0]
    api.store["pods"].pop("orders-r1")
    api.store["pods"].pop("legacy-r2")
    settle(manager, api)
    assert api.store["services"]["orders"]["spec"]["selector"] == {"app": "orders"}, "others are restored"
    assert api.store["services"]["stuck"] == stuck
    assert len([w for w in warnings(caplog) if "service stuck" in w]) == 1


def test_route_pods_with_a_malformed_label_or_header_annotation_are_skipped(api: FakeApi) -> None:
    bad_header = route_pod("orders", "r2", "10.244.0.21")
    bad_header["metadata"]["annotations"] = {o.ANN_ROUTE_ON_HEADER: "x-route=r2"}
    bad_label = route_pod("orders", "r3", "10.244.0.22")
    bad_label["metadata"]["labels"][o.LABEL_ROUTE] = "Bad_Route"
    no_service = route_pod("orders", "r4", "10.244.0.23")
    del no_service["metadata"]["labels"][o.LABEL_ROUTE_SERVICE]
    good = route_pod("orders", "r1", "10.244.0.20")
    good["metadata"]["annotations"] = {o.ANN_ROUTE_ON_HEADER: "kubernetes-route-as=r1"}
    for pod in (bad_header, bad_label, no_service, good):
        api.put("pods", pod)
    settle(Manager(api, o.RoutingRuntime()), api)  # type: ignore[arg-type]
    conf = api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert "route r1 " in conf and "10.244.0.21" not in conf and "10.244.0.22" not in conf
    assert status(api)["routes"] == {
        "r2": [
            "route pod orders-r2: annotation pytest-bridge.io/route-on-header='x-route=r2' does not match its route "
            "(expected kubernetes-route-as=r2)"
        ],
        "r4": ["route pod orders-r4: label pytest-bridge.io/route-service=None does not name a service"],
    }
    # No route to name it by: a note.
    assert status(api)["notes"] == [
        "route pod orders-r3: label pytest-bridge.io/route='Bad_Route' is not a route name (a DNS label)"
    ]


def test_services_without_selector_external_names_and_missing_ones_are_named_for_their_routes(
    api: FakeApi,
) -> None:
    api.put("services", service("manual", None))
    external = service("payments", None)
    external["spec"] = {"type": "ExternalName", "externalName": "payments.example.com"}
    api.put("services", external)
    api.put("ingresses", ingress_rules("pay", [rule("pay.shop.example", "payments")]))
    for name, route in (("manual", "r2"), ("payments", "r3"), ("ghost", "r4"), ("orders", "r1")):
        api.put("pods", route_pod(name, route, f"10.244.0.{20 + int(route[1])}"))
    settle(Manager(api, o.RoutingRuntime()), api)  # type: ignore[arg-type]
    assert routed(api)
    blocking = status(api)["services"]
    assert blocking["manual"] == [
        "service manual has no selector (its endpoints are managed by hand): it cannot be routed"
    ]
    assert blocking["payments"] == [
        "service payments is an ExternalName alias for 'payments.example.com': it has no pods to route"
    ]
    assert blocking["ghost"] == ["service ghost does not exist"]
    assert api.store["services"]["payments"] == external and api.store["services"]["manual"]["spec"]["selector"] is None
    assert any("ingress pay: backend service payments is an ExternalName" in n for n in status(api)["notes"])


def test_a_service_whose_named_target_ports_resolve_to_nothing_is_not_switched(api: FakeApi) -> None:
    api.put("services", service("idle", {"app": "idle"}))  # targetPort "http", and no pods to name it
    api.put("pods", route_pod("idle", "r2", "10.244.0.21"))
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    settle(manager, api)
    assert routed(api)
    assert api.store["services"]["idle"]["spec"]["selector"] == {"app": "idle"}
    assert "idle-pbr-router" not in api.store["deployments"]
    assert "there is nothing to route" in status(api)["services"]["idle"][0]
    api.put("pods", app_pod("idle-1", "idle", "10.244.0.30"))  # its pods come up: routed on the next passes
    settle(manager, api)
    assert routed(api, "idle", "r2")
    assert "idle" not in status(api).get("services", {})


def test_the_status_goes_when_the_problems_do_and_is_owned_by_the_manager(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "pytest_bridge_routing.manager")
    manager_labels = o.labels("routing-manager")
    api.put(
        "deployments",
        {
            "metadata": {"name": o.MANAGER_NAME, "uid": "mgr-uid", "labels": manager_labels},
            "spec": {"template": {"metadata": {"labels": manager_labels}}},
        },
    )
    api.put("ingresses", ingress_rules("wild", [rule("*.shop.example", "frontend")]))
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    manager = Manager(api, o.RoutingRuntime())  # type: ignore[arg-type]
    settle(manager, api)
    cm = api.store["configmaps"][o.STATUS_CONFIGMAP]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "mgr-uid"
    assert cm["metadata"]["labels"][o.COMPONENT] == "routing-status"
    before = api.mutations
    manager.reconcile()
    assert api.mutations == before, "an unchanged status is not written again"
    api.store["ingresses"].pop("wild")
    settle(manager, api)
    assert o.STATUS_CONFIGMAP not in api.store["configmaps"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("no longer a problem: ingress wild: host '*.shop.example' cannot carry routes "
                          "(<route>.*.shop.example is no host name)") == 1  # fmt: skip


def test_a_failing_api_call_for_one_service_does_not_stop_the_others(api: FakeApi) -> None:
    api.put("services", service("inventory", {"app": "inventory"}))
    api.put("pods", app_pod("inventory-1", "inventory", "10.244.0.12"))
    api.put("pods", route_pod("inventory", "r2", "10.244.0.21"))
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    create = api.create

    def refuse_inventory(group: str, resource: str, obj: Any) -> bool:
        if obj["metadata"]["name"].startswith("inventory-"):
            raise ApiError(f"POST {resource}: HTTP 403: forbidden")
        return create(group, resource, obj)

    api.create = refuse_inventory  # type: ignore[method-assign]
    settle(Manager(api, o.RoutingRuntime()), api)  # type: ignore[arg-type]
    assert routed(api)
    assert status(api)["services"]["inventory"] == ["service inventory: POST services: HTTP 403: forbidden"]


def test_problems_for_reads_a_status_and_never_raises() -> None:
    data = o.status_config_map(
        NS, o.routing_status({"orders": ["a"]}, {"r1": ["b"], "r2": ["c"]}, ["n"]), None
    )["data"]  # fmt: skip
    assert o.problems_for(data, "orders", "r1") == (["a", "b"], ["n"])
    assert o.problems_for(data, "inventory", "r3") == ([], ["n"])
    for garbage in (None, {}, {"status.json": "{"}, {"status.json": "[1]"}, {"status.json": '{"services": 1}'}):
        assert o.problems_for(garbage, "orders", "r1") == ([], [])


def test_ingress_hosts_are_only_those_that_can_carry_routes() -> None:
    ingresses = [ingress_rules("i", [rule("*.a.example", "x"), rule(None, "x"), rule("b.example", "x")])]
    assert o.ingress_hosts(ingresses) == ["b.example"]
    assert not o.can_carry_routes("10.0.0.1") and not o.can_carry_routes("") and o.can_carry_routes("a-b.c")


def pool_pod(service_name: str, name: str, ip: str, *, phase: str = "Running") -> dict[str, Any]:
    pod = route_pod(service_name, "unused", ip, phase=phase)
    pod["metadata"]["name"] = name
    pod["metadata"]["labels"] = o.labels("route", **{o.LABEL_POOL: service_name, o.LABEL_ROUTE_SERVICE: service_name})
    return pod


def test_pool_pods_keep_the_router_but_get_no_traffic_until_claimed(api: FakeApi) -> None:
    woken: list[str] = []
    manager = Manager(api, o.RoutingRuntime(), wake=woken.append)  # type: ignore[arg-type]
    api.put("pods", route_pod("orders", "r1", "10.244.0.20"))
    api.put("pods", pool_pod("orders", "orders-pool-1", "10.244.0.30"))
    settle(manager, api)
    conf = api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert "10.244.0.30" not in conf, "an unclaimed pool pod is in no router's config"
    api.store["pods"].pop("orders-r1")  # the last route closes: the pool keeps the router
    settle(manager, api)
    assert "orders-pbr-router" in api.store["deployments"]
    assert api.store["services"]["orders"]["spec"]["selector"] == {o.LABEL_ROUTER: "orders"}
    assert "10.244.0.30" not in api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert not manager._problems.lines(), "pool pods are not malformed route pods"
    woken.clear()
    claim = [
        {"op": "test", "path": "/metadata/labels/pytest-bridge.io~1pool", "value": "orders"},
        {"op": "remove", "path": "/metadata/labels/pytest-bridge.io~1pool"},
        {"op": "add", "path": "/metadata/labels/pytest-bridge.io~1route", "value": "r2"},
    ]
    api.patch("", "pods", "orders-pool-1", claim)
    manager.reconcile()
    assert "10.244.0.30" in api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"]
    assert woken == ["10.244.0.99"], "the router is told at once that its config changed"
    api.store["pods"].pop("orders-pool-1")
    for _ in range(4):
        manager.reconcile()
    assert "orders-pbr-router" not in api.store.get("deployments", {}), "no route and no pool: router goes"
    assert api.store["services"]["orders"]["spec"]["selector"] == {"app": "orders"}


def test_finished_pool_pods_are_deleted_and_the_manager_is_busy_while_a_pool_lives(api: FakeApi) -> None:
    manager = Manager(api, o.RoutingRuntime(), wake=lambda ip: None)  # type: ignore[arg-type]
    api.put("pods", pool_pod("orders", "orders-pool-1", "10.244.0.30"))
    api.put("pods", pool_pod("orders", "orders-pool-2", "10.244.0.31", phase="Succeeded"))
    busy, _ = manager.reconcile()
    assert busy
    assert "orders-pool-2" not in api.store["pods"] and "orders-pool-1" in api.store["pods"]


# --- the watch's quick path: a claim reaches the router's ConfigMap without waiting for a pass ---


def versioned(pod: dict[str, Any], version: int) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["resourceVersion"] = str(version)
    return pod


def claimed(pod: dict[str, Any], route: str, version: int) -> dict[str, Any]:
    pod = versioned(pod, version)
    pod["metadata"]["labels"][o.LABEL_ROUTE] = route
    return pod


def warm_pod(name: str, ip: str, version: int) -> dict[str, Any]:
    pod = route_pod("orders", "x", ip)
    pod["metadata"]["name"] = name
    labels = pod["metadata"]["labels"]
    del labels[o.LABEL_ROUTE], labels[o.LABEL_ROUTE_SERVICE]
    labels[o.LABEL_POOL] = "orders"
    return versioned(pod, version)


def routed_conf(api: FakeApi) -> str:
    return str(api.store["configmaps"]["orders-pbr-router"]["data"]["nginx.conf"])


def claim_of(pod: dict[str, Any], route: str, version: int) -> dict[str, Any]:
    pod = claimed(pod, route, version)
    pod["metadata"]["labels"][o.LABEL_ROUTE_SERVICE] = "orders"
    return pod


@pytest.fixture
def pooled(api: FakeApi) -> tuple[Manager, list[str]]:
    """A settled manager for a pool of two warm ``orders`` pods and one route; wakes recorded."""
    woken: list[str] = []
    manager = Manager(api, o.RoutingRuntime(), wake=woken.append)  # type: ignore[arg-type]
    api.put("pods", versioned(route_pod("orders", "r1", "10.244.0.20"), 10))
    api.put("pods", warm_pod("warm-a", "10.244.0.30", 11))
    api.put("pods", warm_pod("warm-b", "10.244.0.31", 12))
    settle(manager, api)
    assert "10.244.0.20" in routed_conf(api) and "10.244.0.30" not in routed_conf(api)
    woken.clear()
    return manager, woken


def test_a_watched_claim_is_written_to_the_router_at_once(api: FakeApi, pooled: tuple[Manager, list[str]]) -> None:
    manager, woken = pooled
    generation = int(api.store["configmaps"]["orders-pbr-router"]["metadata"]["annotations"][o.ANN_GENERATION])
    claim = claim_of(api.store["pods"]["warm-a"], "bob-1", 20)
    assert manager.pod_event("MODIFIED", claim) is True
    assert manager.quick_step() == 1, "no pass: the watch's event alone"
    cm = api.store["configmaps"]["orders-pbr-router"]
    assert "bob-1" in cm["data"]["nginx.conf"] and "10.244.0.30" in cm["data"]["nginx.conf"]
    assert "10.244.0.20" in cm["data"]["nginx.conf"], "the other route stays"
    assert int(cm["metadata"]["annotations"][o.ANN_GENERATION]) == generation + 1
    assert woken == ["10.244.0.99"], "the router is told"
    assert manager.quick_step() == 0, "nothing new: nothing written"


def test_a_pass_listing_before_the_claim_does_not_render_it_away(
    api: FakeApi, pooled: tuple[Manager, list[str]]
) -> None:
    manager, _ = pooled
    api.conflicts = True
    manager.pod_event("MODIFIED", claim_of(api.store["pods"]["warm-a"], "bob-1", 20))
    manager.quick_step()
    # The API server's list still says warm-a is unclaimed (the list was answered before the claim).
    for _ in range(3):
        manager.reconcile()
    assert "bob-1" in routed_conf(api), "a pass with an older list keeps the watched claim"
    # Once a list holds it, the watched change is dropped, and the list rules again.
    api.put("pods", claim_of(api.store["pods"]["warm-a"], "bob-1", 20))
    manager.reconcile()
    assert "bob-1" in routed_conf(api)
    api.store["pods"].pop("warm-a")
    manager.reconcile()
    assert "bob-1" not in routed_conf(api)


def test_a_watched_event_older_than_the_list_changes_nothing(api: FakeApi, pooled: tuple[Manager, list[str]]) -> None:
    manager, _ = pooled
    stale = claim_of(api.store["pods"]["warm-a"], "bob-1", 5)  # older than the listed version 11
    assert manager.pod_event("MODIFIED", stale) is False
    assert manager.quick_step() == 0
    assert "bob-1" not in routed_conf(api)


def test_a_watched_deletion_takes_the_route_out(api: FakeApi, pooled: tuple[Manager, list[str]]) -> None:
    manager, _ = pooled
    gone = versioned(api.store["pods"]["orders-r1"], 30)
    assert manager.pod_event("DELETED", gone) is True
    assert manager.quick_step() == 1
    assert "10.244.0.20" not in routed_conf(api)
    assert manager.pod_event("MODIFIED", warm_pod("warm-b", "10.244.0.31", 31)) is False, "a warm pod routes nothing"


def test_resource_versions_that_are_not_numbers_leave_routing_to_the_passes(
    api: FakeApi, pooled: tuple[Manager, list[str]]
) -> None:
    manager, _ = pooled
    claim = claim_of(api.store["pods"]["warm-a"], "bob-1", 20)
    claim["metadata"]["resourceVersion"] = "opaque-7"
    assert manager.pod_event("MODIFIED", claim) is False
    assert manager.quick is False and manager.quick_step() == 0
    api.put("pods", claim)
    manager.reconcile()
    assert "bob-1" in routed_conf(api), "the pass routes it"


def test_a_conflicting_quick_write_is_left_to_the_next_pass(api: FakeApi, pooled: tuple[Manager, list[str]]) -> None:
    manager, _ = pooled
    api.conflicts = True
    api.store["configmaps"]["orders-pbr-router"]["metadata"]["resourceVersion"] = "99999"  # written by someone else
    manager.pod_event("MODIFIED", claim_of(api.store["pods"]["warm-a"], "bob-1", 20))
    assert manager.quick_step() == 0
    assert "bob-1" not in routed_conf(api)
    manager.reconcile()
    assert "bob-1" in routed_conf(api), "the pass reads the ConfigMap again and writes it"
