from __future__ import annotations

import pytest
from k8s_samples import (
    echo_pod,
    echo_service,
    ledger_pod,
    ledger_service,
    ledger_statefulset,
    orders_deployment,
    orders_pod,
    orders_replicaset,
    orders_service,
)

from pytest_bridge.core.errors import BridgeError, PlanError
from pytest_bridge.core.plan import (
    BridgePlan,
    LocalPortSpec,
    PortBinding,
    WorkloadRef,
    check_local_port_specs,
    check_plans_disjoint,
    make_plan,
)


def orders_plan(**kwargs: object) -> BridgePlan:
    return make_plan(
        orders_service(),
        [orders_pod("a"), orders_pod("b")],
        [orders_replicaset(), orders_deployment()],
        **kwargs,  # type: ignore[arg-type]
    )


def test_deployment_with_istio_sidecar_and_named_target_port() -> None:
    plan = orders_plan()
    assert plan.workload == WorkloadRef("Deployment", "orders", "shop", orders_deployment()["metadata"]["uid"])
    assert plan.container == "app"
    assert plan.container_index == 0
    assert plan.target_ports == (8080, 9090)
    http, grpc = plan.service_ports
    assert (http.name, http.port, http.target_port, http.target_port_name) == ("http", 80, 8080, "http")
    assert (grpc.name, grpc.port, grpc.target_port, grpc.target_port_name) == ("grpc", 9090, 9090, None)
    assert plan.port_bindings == (PortBinding(8080, 8080), PortBinding(9090, 9090))
    assert plan.replicas == 3
    assert plan.pod_names == ("orders-7d9f8c6b5-a", "orders-7d9f8c6b5-b")
    assert plan.local_port(9090) == 9090
    with pytest.raises(KeyError):
        plan.local_port(1)


def test_sidecar_listed_first_is_never_chosen() -> None:
    deployment = orders_deployment()
    containers = deployment["spec"]["template"]["spec"]["containers"]
    containers.reverse()
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment])
    assert (plan.container, plan.container_index) == ("app", 1)


def test_statefulset() -> None:
    plan = make_plan(ledger_service(), [ledger_pod(0), ledger_pod(1)], [ledger_statefulset()])
    assert plan.workload.kind == "StatefulSet"
    assert plan.container == "ledger"
    assert plan.target_ports == (7000,)
    assert plan.replicas == 2


def test_bare_pod() -> None:
    plan = make_plan(echo_service(), [echo_pod()])
    assert plan.workload == WorkloadRef("Pod", "echo", "shop", "pod-echo")
    assert plan.container == "echo"
    assert plan.target_ports == (5678,)
    assert plan.replicas is None


def test_explicit_container_wins_even_over_port_match_and_sidecar_list() -> None:
    pod = echo_pod()
    pod["spec"]["containers"].append({"name": "envoy", "image": "envoy"})
    plan = make_plan(echo_service(), [pod], container="envoy")
    assert (plan.container, plan.container_index, plan.target_ports) == ("envoy", 1, (5678,))


def test_explicit_container_must_declare_named_target_ports() -> None:
    with pytest.raises(PlanError, match=r"named port 'http'.*'istio-proxy' does not declare"):
        orders_plan(container="istio-proxy")


def test_explicit_container_not_found_lists_containers() -> None:
    with pytest.raises(PlanError, match=r"'web'.*app \[ports 8080,9090\], istio-proxy \(sidecar\)"):
        orders_plan(container="web")


def test_single_non_sidecar_without_declared_ports_is_chosen() -> None:
    service = echo_service()
    pod = echo_pod()
    del pod["spec"]["containers"][0]["ports"]
    pod["spec"]["containers"].append({"name": "envoy", "image": "envoy"})
    assert make_plan(service, [pod]).container == "echo"


def test_two_candidates_and_no_port_match_is_an_error_naming_the_flag() -> None:
    pod = echo_pod()
    del pod["spec"]["containers"][0]["ports"]
    pod["spec"]["containers"].append({"name": "worker", "image": "w"})
    with pytest.raises(PlanError, match=r"echo, worker.*--bridge-container=echo=NAME"):
        make_plan(echo_service(), [pod])


def test_two_serving_candidates_prefers_the_one_serving_all_targets() -> None:
    deployment = orders_deployment()
    containers = deployment["spec"]["template"]["spec"]["containers"]
    containers.append({"name": "grpc-gateway", "image": "gw", "ports": [{"containerPort": 9090}]})
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment])
    assert plan.container == "app"


def test_two_serving_candidates_ambiguous() -> None:
    service = echo_service()
    pod = echo_pod()
    pod["spec"]["containers"].append({"name": "echo2", "image": "x", "ports": [{"containerPort": 5678}]})
    with pytest.raises(PlanError, match="several containers serve"):
        make_plan(service, [pod])


def test_only_sidecars() -> None:
    pod = echo_pod()
    pod["spec"]["containers"][0]["name"] = "envoy"
    with pytest.raises(PlanError, match="every container is a known sidecar"):
        make_plan(echo_service(), [pod])


def test_named_target_port_missing_in_container() -> None:
    service = orders_service()
    service["spec"]["ports"][0]["targetPort"] = "web"
    with pytest.raises(PlanError, match="named port 'web'"):
        make_plan(service, [orders_pod()], [orders_replicaset(), orders_deployment()], container="app")


def test_target_port_defaults_to_port_and_numeric_string() -> None:
    service = echo_service()
    service["spec"]["ports"] = [{"port": 5678}, {"port": 81, "targetPort": "5679"}]
    plan = make_plan(service, [echo_pod()])
    assert plan.target_ports == (5678, 5679)


def test_duplicate_target_ports_are_listed_once() -> None:
    service = echo_service()
    service["spec"]["ports"] = [
        {"name": "a", "port": 80, "targetPort": 5678},
        {"name": "b", "port": 81, "targetPort": 5678},
    ]
    plan = make_plan(service, [echo_pod()])
    assert plan.target_ports == (5678,)
    assert len(plan.service_ports) == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["spec"].update(type="ExternalName", externalName="db.example.com"), "ExternalName"),
        (lambda s: s["spec"].pop("selector"), "no selector"),
        (lambda s: s["spec"].update(ports=[]), "has no ports"),
        (lambda s: s["spec"].update(ports=[{"port": 53, "protocol": "UDP"}]), "only UDP ports"),
    ],
    ids=["external-name", "selector-less", "no-ports", "udp-only"],
)
def test_service_shape_errors(mutate: object, message: str) -> None:
    service = echo_service()
    mutate(service)  # type: ignore[operator]
    with pytest.raises(PlanError, match=message):
        make_plan(service, [echo_pod()])


def test_udp_ports_beside_tcp_are_ignored_and_recorded() -> None:
    service = echo_service()
    service["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
    plan = make_plan(service, [echo_pod()])
    assert plan.target_ports == (5678,)
    assert plan.ignored_ports == ({"name": "dns", "port": 53, "protocol": "UDP"},)


def test_no_pods() -> None:
    with pytest.raises(PlanError, match="selects no pods"):
        make_plan(orders_service(), [], [orders_deployment()])


def test_pods_not_matching_the_selector_are_ignored() -> None:
    stranger = echo_pod()
    plan = make_plan(orders_service(), [stranger, orders_pod()], [orders_replicaset(), orders_deployment()])
    assert plan.workload.kind == "Deployment"


def test_terminating_pods_are_ignored_when_live_ones_exist() -> None:
    old = orders_pod("old")
    old["metadata"]["deletionTimestamp"] = "2026-01-10T10:00:00Z"
    old["metadata"]["ownerReferences"][0]["name"] = "orders-gone"
    old["metadata"]["ownerReferences"][0]["uid"] = "gone"
    plan = make_plan(orders_service(), [old, orders_pod()], [orders_replicaset(), orders_deployment()])
    assert plan.pod_names == ("orders-7d9f8c6b5-abcde",)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("DaemonSet", "one pod per node"),
        ("Job", "run to completion"),
        ("CronJob", "on a schedule"),
        ("ReplicationController", "migrate"),
        ("Rollout", "only Deployments, StatefulSets and bare Pods"),
    ],
)
def test_unsupported_owner_kinds_say_why(kind: str, reason: str) -> None:
    pod = echo_pod()
    pod["metadata"]["ownerReferences"] = [{"kind": kind, "name": "x", "uid": "u", "controller": True}]
    with pytest.raises(PlanError, match=f"{kind} 'x'.*{reason}"):
        make_plan(echo_service(), [pod])


def test_replicaset_without_deployment() -> None:
    rs = orders_replicaset()
    del rs["metadata"]["ownerReferences"]
    with pytest.raises(PlanError, match="no Deployment above it"):
        make_plan(orders_service(), [orders_pod()], [rs])


def test_replicaset_owned_by_other_kind() -> None:
    rs = orders_replicaset()
    rs["metadata"]["ownerReferences"] = [{"kind": "Rollout", "name": "orders", "uid": "r", "controller": True}]
    with pytest.raises(PlanError, match="Rollout 'orders'"):
        make_plan(orders_service(), [orders_pod()], [rs])


def test_missing_owner_objects() -> None:
    with pytest.raises(PlanError, match=r"ReplicaSet 'orders-7d9f8c6b5'.*not provided"):
        make_plan(orders_service(), [orders_pod()], [])
    with pytest.raises(PlanError, match=r"Deployment 'orders'.*not provided"):
        make_plan(orders_service(), [orders_pod()], [orders_replicaset()])
    with pytest.raises(PlanError, match=r"StatefulSet 'ledger'.*not provided"):
        make_plan(ledger_service(), [ledger_pod()], [])


def test_owner_lookup_by_name_when_uids_are_absent() -> None:
    rs = orders_replicaset()
    del rs["metadata"]["uid"]
    deployment = orders_deployment()
    del deployment["metadata"]["uid"]
    pod = orders_pod()
    plan = make_plan(orders_service(), [pod], [deployment, rs])
    assert plan.workload.name == "orders"


def test_several_bare_pods() -> None:
    other = echo_pod()
    other["metadata"]["name"] = "echo-2"
    with pytest.raises(PlanError, match="2 bare pods"):
        make_plan(echo_service(), [echo_pod(), other])


def test_pods_of_several_workloads() -> None:
    service = orders_service()
    stray = echo_pod()
    stray["metadata"]["labels"]["app"] = "orders"
    with pytest.raises(PlanError, match=r"several workloads.*Deployment/orders, Pod/echo"):
        make_plan(service, [orders_pod(), stray], [orders_replicaset(), orders_deployment()])


def test_plan_error_is_a_bridge_error() -> None:
    assert issubclass(PlanError, BridgeError)


# ----------------------------------------------------------------- local ports


def test_explicit_target_mapping_and_positional() -> None:
    plan = orders_plan(local_ports=[LocalPortSpec(19090, target_port=9090), LocalPortSpec(18080)])
    assert plan.port_bindings == (PortBinding(8080, 18080), PortBinding(9090, 19090))


def test_positional_in_service_order() -> None:
    plan = orders_plan(local_ports=[LocalPortSpec(1), LocalPortSpec(2)])
    assert plan.port_bindings == (PortBinding(8080, 1), PortBinding(9090, 2))


def test_scoped_specs_for_other_services_are_ignored() -> None:
    plan = orders_plan(local_ports=[LocalPortSpec(1, service="payments"), LocalPortSpec(2, 9090, "orders")])
    assert plan.port_bindings == (PortBinding(8080, 8080), PortBinding(9090, 2))


def test_unscoped_target_mapping_for_another_service_is_ignored() -> None:
    plan = orders_plan(local_ports=[LocalPortSpec(3000, target_port=7000)])
    assert plan.local_port(8080) == 8080


def test_scoped_unknown_target_is_an_error() -> None:
    with pytest.raises(PlanError, match="no target port 7000; its target ports are 8080, 9090"):
        orders_plan(local_ports=[LocalPortSpec(3000, target_port=7000, service="orders")])


def test_too_many_positional() -> None:
    with pytest.raises(PlanError, match="3 positional"):
        orders_plan(local_ports=[LocalPortSpec(1), LocalPortSpec(2), LocalPortSpec(3)])


def test_duplicate_local_ports() -> None:
    with pytest.raises(PlanError, match="both map to local port 5000"):
        orders_plan(local_ports=[LocalPortSpec(5000, 8080), LocalPortSpec(5000, 9090)])


def test_default_local_port_uses_injected_chooser() -> None:
    taken = {8080}
    plan = orders_plan(choose_local_port=lambda p: p + 10000 if p in taken else p)
    assert plan.port_bindings == (PortBinding(8080, 18080), PortBinding(9090, 9090))


def test_check_plans_disjoint() -> None:
    plan = orders_plan()
    check_plans_disjoint([plan, make_plan(echo_service(), [echo_pod()])])
    with pytest.raises(PlanError, match="same Deployment 'orders'"):
        check_plans_disjoint([plan, plan])


def test_check_local_port_specs_catches_unclaimed_target_mappings() -> None:
    plans = [orders_plan(), make_plan(echo_service(), [echo_pod()])]
    check_local_port_specs(plans, [LocalPortSpec(1, 5678), LocalPortSpec(2), LocalPortSpec(3, 7, "orders")])
    with pytest.raises(PlanError, match=r"no bridged service has target port 7000 \(orders: 8080, 9090; echo: 5678\)"):
        check_local_port_specs(plans, [LocalPortSpec(3000, 7000)])


def test_a_damaged_record_of_isolated_routes_is_named() -> None:
    service = orders_service()
    service["metadata"]["annotations"] = {"pytest-bridge.io/original-selector": "{app: orders"}
    with pytest.raises(PlanError, match=r"annotation pytest-bridge.io/original-selector='\{app: orders' is not JSON"):
        make_plan(service, [orders_pod()], [orders_replicaset(), orders_deployment()])
