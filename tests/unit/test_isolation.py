"""Route names, the route pod and the canary request (pure parts of pytest_bridge.orchestration.isolation)."""

from __future__ import annotations

import inspect
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
from k8s_samples import orders_deployment, orders_pod, orders_replicaset, orders_service
from pytest_bridge_routing import objects as o

from pytest_bridge.core import timing
from pytest_bridge.core.errors import ConnectError, JsonPatchError
from pytest_bridge.core.jsonpatch import apply_patch
from pytest_bridge.core.patch import SESSION_LABEL, AgentSpec
from pytest_bridge.core.plan import BridgePlan, make_plan
from pytest_bridge.orchestration import isolation

AGENT = AgentSpec(image="agent:1", session="s-1a2b", token_sha256="ef" * 32)
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def counter_token() -> Callable[[int], str]:
    state = iter(range(1000))
    return lambda n: f"{next(state):0{2 * n}x}"


def test_route_names_are_dns_labels_distinct_and_carry_prefix_and_worker() -> None:
    token = counter_token()
    names = {isolation.route_name("ci", None, {}, token) for _ in range(50)}
    assert len(names) == 50
    name = isolation.route_name("Build_42.Main", "gw3", {}, token)
    assert name.startswith("build-42-mai-w3-")
    assert LABEL.match(name) and len(name) <= 30


def test_route_prefix_falls_back_to_ci_job_then_user() -> None:
    assert isolation.route_name(None, None, {"CI_JOB_NAME": "e2e tests"}, lambda n: "abc123").startswith("e2e-tests-")
    assert isolation.route_name(None, None, {"GITHUB_JOB": "unit"}, lambda n: "abc123") == "unit-abc123"


def test_route_must_fit_as_host_prefix() -> None:
    isolation.check_hosts_fit("r-1", ["shop.example"])
    with pytest.raises(ValueError, match="longer than 253"):
        isolation.check_hosts_fit("r" * 40, ["a" * 220])


def orders_plan() -> BridgePlan:
    return make_plan(orders_service(), [orders_pod()], [orders_replicaset(), orders_deployment()])


def test_route_pod_is_the_template_with_the_agent_and_route_labels_only() -> None:
    deployment = orders_deployment()
    plan = orders_plan()
    pod = isolation.route_pod(deployment, plan, AGENT, "alice-1a2b3c", exit_when_idle=45, observe=["inventory"])
    template = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert not set(template["metadata"]["labels"]) & set(labels), "the Service must not select the route pod"
    assert labels[o.LABEL_ROUTE] == "alice-1a2b3c"
    assert labels[o.LABEL_ROUTE_SERVICE] == "orders"
    assert labels[SESSION_LABEL] == "s-1a2b"
    assert pod["metadata"]["annotations"][o.ANN_ROUTE_ON_HEADER] == "kubernetes-route-as=alice-1a2b3c"
    assert pod["metadata"]["annotations"][o.ANN_OBSERVE] == "inventory"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec.get("serviceAccountName") == template["spec"].get("serviceAccountName")
    assert spec["volumes"] == template["spec"]["volumes"]
    container = spec["containers"][plan.container_index]
    assert container["image"] == "agent:1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PYTEST_BRIDGE_EXIT_WHEN_IDLE"] == "45"
    assert LABEL.match(pod["metadata"]["name"])
    assert deployment == orders_deployment(), "the workload is not modified"


def test_canary_request_carries_the_route_header() -> None:
    request = isolation.canary_request("orders:80", "r-1").decode()
    assert request.startswith("GET /.pytest-bridge/canary HTTP/1.1\r\n")
    assert "\r\nkubernetes-route-as: r-1\r\n" in request
    assert request.endswith("\r\n\r\n")


def test_http_port_is_the_first_routable_one() -> None:
    assert isolation.http_port(orders_plan()) == 80


class _ConfigMaps:
    """``k.core.read_namespaced_config_map`` answering with the given data (None: not found)."""

    def __init__(self, data: dict[str, str] | None) -> None:
        self.data = data
        self.core = self
        self.namespace = "shop"

    def read_namespaced_config_map(self, name: str, namespace: str, **_: object) -> object:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        assert (name, namespace) == (o.STATUS_CONFIGMAP, "shop")
        if self.data is None:
            raise ApiException(status=404, reason="Not Found")
        return type("ConfigMap", (), {"data": self.data})()


def test_the_managers_findings_name_what_blocks_the_route() -> None:
    status = o.routing_status(
        {"orders": ["service orders: annotation … is not JSON"]}, {"r1": ["route pod orders-r1: …"]}, ["ingress x: …"]
    )
    k = _ConfigMaps(o.status_config_map("shop", status, None)["data"])
    assert isolation.manager_findings(k, "orders", "r1") == (  # type: ignore[arg-type]
        ["service orders: annotation … is not JSON", "route pod orders-r1: …"],
        ["ingress x: …"],
    )
    assert isolation.manager_findings(_ConfigMaps(None), "orders", "r1") == ([], [])  # type: ignore[arg-type]


def test_a_pool_pod_is_a_route_pod_without_a_route_until_the_claim_patch() -> None:
    deployment = orders_deployment()
    plan = orders_plan()
    name = isolation.pool_pod_name("orders", lambda n: "abc123")
    assert name == "orders-pool-abc123"
    pod = isolation.pool_pod(deployment, plan, AGENT, name, exit_when_idle=45)
    labels = pod["metadata"]["labels"]
    assert not set(deployment["spec"]["template"]["metadata"]["labels"]) & set(labels), "no Service selects it"
    assert o.LABEL_ROUTE not in labels and o.ANN_ROUTE_ON_HEADER not in pod["metadata"]["annotations"]
    assert (labels[o.LABEL_POOL], labels[o.COMPONENT], labels[SESSION_LABEL]) == ("orders", "route", "s-1a2b")
    assert o.is_pool_pod(pod) and o.pool_services([pod]) == {"orders"}
    assert o.live_routes([pod]) == {}, "no router routes to an unclaimed pod"
    claimed = apply_patch(pod, isolation.claim_patch("orders", "alice-1a2b3c"))
    cold = isolation.route_pod(deployment, plan, AGENT, "alice-1a2b3c", exit_when_idle=45)
    assert claimed["metadata"]["labels"] == cold["metadata"]["labels"], "a claimed pod is labelled like a route pod"
    assert claimed["metadata"]["annotations"] == cold["metadata"]["annotations"]
    assert claimed["spec"] == cold["spec"]
    assert o.route_pod_problem(claimed) is None and not o.is_pool_pod(claimed)
    with pytest.raises(JsonPatchError):
        apply_patch(claimed, isolation.claim_patch("orders", "bob-000000"))  # claimed once only


def test_a_route_waits_for_a_warm_pod_that_is_starting_rather_than_starting_its_own() -> None:
    bs: Any = SimpleNamespace(settings=SimpleNamespace(connect_timeout=5.0))
    pool = isolation.RoutePool(bs, "orders", 2, 120.0, lambda line: None)
    try:
        assert pool.take(wait=5.0) is None, "nothing ready or starting: no wait"
        warm: Any = SimpleNamespace(pod="orders-pool-1")
        with pool._lock:
            pool._starting = 1

        def ready_later() -> None:
            time.sleep(0.2)
            with pool._lock:
                pool._starting = 0
                pool._ready.append(warm)
                pool._changed.notify_all()

        threading.Thread(target=ready_later).start()
        started = time.monotonic()
        assert pool.take(wait=5.0) is warm
        assert time.monotonic() - started < 2.0
    finally:
        pool.close()


def test_the_unclaim_patch_gives_a_claimed_pod_back_to_the_pool_as_it_was() -> None:
    pod = isolation.pool_pod(orders_deployment(), orders_plan(), AGENT, "orders-pool-abc123", exit_when_idle=45)
    claimed = apply_patch(pod, isolation.claim_patch("orders", "alice-1a2b3c"))
    back = apply_patch(claimed, isolation.unclaim_patch("orders", "alice-1a2b3c"))
    assert back == pod, "labelled and annotated as a warm pod again"
    assert o.live_routes([back]) == {} and o.pool_services([back]) == {"orders"}
    assert apply_patch(back, isolation.claim_patch("orders", "bob-000000"))["metadata"]["labels"][o.LABEL_ROUTE] == (
        "bob-000000"
    ), "claimable again"
    with pytest.raises(JsonPatchError):  # only the pod that still serves that route
        apply_patch(claimed, isolation.unclaim_patch("orders", "bob-000000"))
    with pytest.raises(JsonPatchError):
        apply_patch(back, isolation.unclaim_patch("orders", "alice-1a2b3c"))


def test_a_pod_on_loan_is_not_replaced_and_one_that_cannot_come_back_is() -> None:
    bs: Any = SimpleNamespace(settings=SimpleNamespace(connect_timeout=5.0))
    pool = isolation.RoutePool(bs, "orders", 2, 120.0, lambda line: None)
    made: list[int] = []

    def missing() -> int:  # what the pool's loop would start now
        with pool._lock:
            return pool.size - len(pool._ready) - pool._starting - pool._loaned - pool._returning

    try:
        first: Any = SimpleNamespace(pod="orders-pool-1")
        second: Any = SimpleNamespace(pod="orders-pool-2")
        with pool._lock:
            pool._ready += [first, second]
        assert pool.take() is first
        assert missing() == 0, "the claimed pod is on loan: not replaced while its route runs"
        pool.loan_ended()  # its route closed without giving it back (deleted)
        assert missing() == 1, "a pod that will not come back is replaced"
        made.append(1)
        stopped: Any = SimpleNamespace(pod="orders-pool-2", conn=SimpleNamespace(plan=None, tunnel=None))
        assert pool.take() is second
        assert not pool.give_back(stopped, "alice-1a2b3c"), "no tunnel: cannot come back"
    finally:
        pool.close()


def test_closing_the_pool_waits_until_a_returning_pod_is_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() returns only once a pod on its way back is in the pool or deleted (an e2e run saw one left)."""
    bs: Any = SimpleNamespace(settings=SimpleNamespace(connect_timeout=5.0), client=SimpleNamespace(core=None))
    pool = isolation.RoutePool(bs, "orders", 2, 120.0, lambda line: None)
    deleted: list[str] = []

    def slow_discard(warm: Any) -> None:
        time.sleep(0.3)
        deleted.append(warm.pod)

    def unclaim_fails(*args: Any, **kwargs: Any) -> Any:
        raise OSError("the pod is gone")

    monkeypatch.setattr(pool, "discard", slow_discard)
    monkeypatch.setattr(isolation.kube, "call", unclaim_fails)
    with pool._lock:
        pool._returning = 1  # as give_back leaves it
    returning = threading.Thread(target=pool._recycle, args=(SimpleNamespace(pod="orders-pool-1"), "alice-1a2b3c"))
    returning.start()
    time.sleep(0.05)  # it is deleting the pod now
    pool.close()
    assert deleted == ["orders-pool-1"], "close() returned before the returning pod was deleted"
    returning.join()


def test_host_routers_proven_once_are_not_proven_again_until_the_service_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """wait_host_routers with ``proven``: a Service proven at this resourceVersion is skipped."""
    versions = {"frontend": "100", "orders": "7"}
    proved: list[str] = []

    def service(name: str) -> dict[str, Any]:
        obj = orders_service()
        obj["metadata"] = {**obj["metadata"], "name": name, "resourceVersion": versions[name]}
        return obj

    k: Any = SimpleNamespace(
        namespace="shop",
        core=SimpleNamespace(
            list_namespaced_service=lambda ns, **_: SimpleNamespace(
                items=[SimpleNamespace(metadata=SimpleNamespace(name=n), api=service(n)) for n in sorted(versions)]
            )
        ),
        to_dict=lambda obj: obj.api,
    )
    monkeypatch.setattr(isolation, "endpoints_are_router", lambda k, name: True)
    monkeypatch.setattr(isolation, "router_answers", lambda tunnel, name, ns, obj: proved.append(name) or True)
    proven: dict[str, str] = {}
    deadline = time.monotonic() + 5
    assert isolation.wait_host_routers(k, None, ["frontend"], deadline, proven) == []
    assert (proved, proven) == (["frontend"], {"frontend": "100"})
    assert isolation.wait_host_routers(k, None, ["frontend"], deadline, proven) == []
    assert proved == ["frontend"]  # not again: the Service is as it was
    versions["frontend"] = "101"  # switched back and again by the manager in between
    assert isolation.wait_host_routers(k, None, ["frontend"], deadline, proven) == []
    assert (proved, proven) == (["frontend", "frontend"], {"frontend": "101"})
    assert isolation.wait_host_routers(k, None, ["frontend"], deadline) == []  # no cache: proven every time
    assert len(proved) == 3


def test_the_route_proof_is_the_timed_phase_and_the_burst_a_coroutine() -> None:
    """The connect report's "canary through the router" is prove_live (a refactor once moved it)."""
    plan = orders_plan()
    plan = replace(plan, service_ports=tuple(replace(p, name="raw", app_protocol=None) for p in plan.service_ports))
    seen: list[str] = []
    with (
        timing.observe(lambda label, start, end: seen.append(label)),
        pytest.raises(ConnectError, match="no HTTP port"),
    ):
        isolation.prove_live(cast(Any, None), plan, "r-1", 1.0)
    assert seen == ["canary through the router"]
    assert inspect.iscoroutinefunction(isolation._canary_burst)
