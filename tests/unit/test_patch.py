from __future__ import annotations

import copy
import itertools
import json
from typing import Any

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
from pytest_bridge_agent.runtime import Code

from pytest_bridge.core.errors import JsonPatchError, PatchConflictError, PatchError
from pytest_bridge.core.jsonpatch import apply_patch, pointer, resolve_pointer
from pytest_bridge.core.patch import (
    AGENT_CONTROL_PORT,
    AGENT_STATUS_PORT,
    SESSION_ANNOTATION,
    SESSION_LABEL,
    AgentSpec,
    agent_container,
    agent_pod,
    bridged_session,
    pod_for_recreate,
    strip_server_fields,
    workload_patches,
)
from pytest_bridge.core.plan import BridgePlan, make_plan

AGENT = AgentSpec(image="localhost/pytest-bridge/agent:0.1.0", session="s-1a2b", token_sha256="01" * 32)


def orders_plan(deployment: dict[str, Any] | None = None) -> BridgePlan:
    return make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment or orders_deployment()])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ----------------------------------------------------------------- agent container


def test_agent_container_keeps_what_the_agent_needs() -> None:
    original = orders_deployment()["spec"]["template"]["spec"]["containers"][0]
    agent = agent_container(original, orders_plan(), AGENT)
    for key in ("name", "envFrom", "volumeMounts", "ports", "resources", "securityContext", "terminationMessagePath"):
        assert agent[key] == original[key], key
    assert agent["image"] == AGENT.image
    assert agent["imagePullPolicy"] == "IfNotPresent"
    assert agent["command"] == ["python3", "-I", "/opt/pytest-bridge/pytest-bridge.pyz", "agent"]
    assert "args" not in agent and "workingDir" not in agent
    for key in ("livenessProbe", "startupProbe", "lifecycle"):
        assert key not in agent
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": AGENT_STATUS_PORT, "scheme": "HTTP"}
    assert original["command"] == ["/app/orders"], "input must not be mutated"


def test_agent_env_keeps_original_and_adds_agent_vars() -> None:
    original = orders_deployment()["spec"]["template"]["spec"]["containers"][0]
    env = env_of(agent_container(original, orders_plan(), AGENT))
    assert env["LOG_LEVEL"] == "debug"
    assert env["DB_PASSWORD"] == {"secretKeyRef": {"name": "orders-db", "key": "password"}}
    assert env["PYTEST_BRIDGE_TOKEN_SHA256"] == "01" * 32
    assert env["PYTEST_BRIDGE_LISTEN_PORTS"] == "8080,9090"
    assert env["PYTEST_BRIDGE_CONTROL_PORT"] == str(AGENT_CONTROL_PORT) == "47100"
    assert env["PYTEST_BRIDGE_STATUS_PORT"] == "47101"
    assert env["PYTEST_BRIDGE_SESSION"] == "s-1a2b"


def test_token_from_secret_and_stale_agent_vars_replaced() -> None:
    original = orders_deployment()["spec"]["template"]["spec"]["containers"][0]
    original["env"].append({"name": "PYTEST_BRIDGE_SESSION", "value": "old"})
    spec = AgentSpec(image="a", session="s2", token_sha256="ab" * 32, args=("--verbose",))
    agent = agent_container(original, orders_plan(), spec)
    names = [e["name"] for e in agent["env"]]
    assert names.count("PYTEST_BRIDGE_SESSION") == 1
    assert env_of(agent)["PYTEST_BRIDGE_TOKEN_SHA256"] == "ab" * 32
    assert "PYTEST_BRIDGE_TOKEN" not in env_of(agent), "the pod never carries the token itself"
    assert agent["args"] == ["--verbose"]


def test_features_keep_probes_and_lifecycle() -> None:
    original = orders_deployment()["spec"]["template"]["spec"]["containers"][0]
    spec = AgentSpec(image="a", session="s", token_sha256="t", keep_probes=True, keep_lifecycle=True)
    agent = agent_container(original, orders_plan(), spec)
    for key in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
        assert agent[key] == original[key]


def test_target_port_colliding_with_agent_ports() -> None:
    service = echo_service()
    service["spec"]["ports"] = [{"port": 80, "targetPort": AGENT_CONTROL_PORT}]
    plan = make_plan(service, [echo_pod()])
    with pytest.raises(PatchError, match="collide"):
        agent_container(echo_pod()["spec"]["containers"][0], plan, AGENT)


@pytest.mark.parametrize("session", ["", "UPPER", "has space", "x" * 64, "-lead"])
def test_invalid_session_id(session: str) -> None:
    with pytest.raises(PatchError, match="session id"):
        agent_container(
            echo_pod()["spec"]["containers"][0],
            make_plan(echo_service(), [echo_pod()]),
            AgentSpec(image="a", session=session, token_sha256="t"),
        )


# ----------------------------------------------------------------- workload patches


def test_forward_patch_bridges_the_deployment() -> None:
    deployment = orders_deployment()
    patches = workload_patches(deployment, orders_plan(), AGENT)
    bridged = apply_patch(deployment, patches.forward)
    template = bridged["spec"]["template"]
    assert bridged["spec"]["replicas"] == 1
    assert template["spec"]["containers"][0]["image"] == AGENT.image
    assert template["spec"]["containers"][1] == deployment["spec"]["template"]["spec"]["containers"][1]
    assert template["metadata"]["labels"] == {"app": "orders", "version": "v1", SESSION_LABEL: "s-1a2b"}
    assert template["metadata"]["annotations"][SESSION_ANNOTATION] == "s-1a2b"
    assert template["spec"]["serviceAccountName"] == "orders"
    assert template["spec"]["volumes"] == deployment["spec"]["template"]["spec"]["volumes"]
    assert bridged_session(bridged) == "s-1a2b"
    assert bridged_session(deployment) is None
    assert bridged["metadata"]["annotations"]["owner"] == "checkout-team"


def test_forward_patch_tests_uid_generation_and_container() -> None:
    patches = workload_patches(orders_deployment(), orders_plan(), AGENT)
    tests = [op for op in patches.forward if op["op"] == "test"]
    assert tests == [
        {"op": "test", "path": "/metadata/uid", "value": orders_deployment()["metadata"]["uid"]},
        {"op": "test", "path": "/metadata/generation", "value": 7},
        {"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "app"},
    ]
    assert all(op["op"] != "test" for op in patches.forward[3:])


def test_forward_patch_fails_safely_on_concurrent_change() -> None:
    deployment = orders_deployment()
    patches = workload_patches(deployment, orders_plan(), AGENT)
    changed = copy.deepcopy(deployment)
    changed["metadata"]["generation"] = 99
    with pytest.raises(PatchConflictError, match="generation"):
        apply_patch(changed, patches.forward)


def test_reverse_patch_refuses_when_someone_else_redeployed() -> None:
    deployment = orders_deployment()
    patches = workload_patches(deployment, orders_plan(), AGENT)
    bridged = apply_patch(deployment, patches.forward)
    bridged["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com/shop/orders:1.5.0"
    with pytest.raises(PatchConflictError, match="image"):
        apply_patch(bridged, patches.reverse)


def test_reverse_patch_restores_even_if_replicas_were_scaled_meanwhile() -> None:
    deployment = orders_deployment()
    patches = workload_patches(deployment, orders_plan(), AGENT)
    bridged = apply_patch(deployment, patches.forward)
    bridged["spec"]["replicas"] = 5  # e.g. an HPA
    assert apply_patch(bridged, patches.reverse)["spec"]["replicas"] == 3


def test_spec_after_restore_equals_spec_before_modulo_server_fields() -> None:
    deployment = orders_deployment()
    patches = workload_patches(deployment, orders_plan(), AGENT)
    bridged = apply_patch(deployment, patches.forward)
    # What the server would do meanwhile: bump versions, rewrite status.
    bridged["metadata"].update(resourceVersion="50000", generation=8)
    bridged["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "8"
    bridged["status"] = {"replicas": 1}
    restored = apply_patch(bridged, patches.reverse)
    assert strip_server_fields(restored) == strip_server_fields(deployment)


def _shapes() -> list[tuple[str, dict[str, Any], BridgePlan]]:
    """A range of workload shapes: missing maps, missing replicas, sidecars first, StatefulSet."""
    shapes: list[tuple[str, dict[str, Any], BridgePlan]] = []
    base = orders_deployment()
    shapes.append(("deployment", base, orders_plan(base)))
    for variant in itertools.product([True, False], repeat=4):
        no_replicas, no_template_annotations, no_labels, sidecar_first = variant
        d = orders_deployment()
        if no_replicas:
            del d["spec"]["replicas"]
        if no_template_annotations:
            d["spec"]["template"]["metadata"].pop("annotations", None)
        else:
            d["spec"]["template"]["metadata"]["annotations"] = {"sidecar.istio.io/inject": "true"}
        if no_labels:
            del d["metadata"]["labels"]
            del d["metadata"]["annotations"]
        if sidecar_first:
            d["spec"]["template"]["spec"]["containers"].reverse()
        shapes.append((f"deployment-{variant}", d, orders_plan(d)))
    d = orders_deployment()
    del d["spec"]["template"]["metadata"]
    d["spec"]["template"]["metadata"] = {}
    shapes.append(("empty-template-metadata", d, orders_plan(d)))
    d = orders_deployment()
    d["spec"]["template"]["metadata"]["labels"][SESSION_LABEL] = "stale"  # a leftover label gets restored too
    shapes.append(("stale-label", d, orders_plan(d)))
    d = orders_deployment()
    del d["spec"]["template"]["spec"]["containers"][0]["env"]
    shapes.append(("no-env", d, orders_plan(d)))
    sts = ledger_statefulset()
    shapes.append(("statefulset", sts, make_plan(ledger_service(), [ledger_pod()], [sts])))
    sts = ledger_statefulset()
    sts["spec"]["replicas"] = 1
    del sts["metadata"]["resourceVersion"]
    shapes.append(("statefulset-1", sts, make_plan(ledger_service(), [ledger_pod()], [sts])))
    return shapes


@pytest.mark.parametrize(("name", "workload", "plan"), _shapes(), ids=[s[0] for s in _shapes()])
@pytest.mark.parametrize(
    "agent",
    [
        AGENT,
        AgentSpec(image="img:2", session="z", token_sha256="cd" * 32, keep_probes=True),
        AgentSpec(
            image="python:3", session="c", token_sha256="t", code=Code(configmap="pytest-bridge-code-0123456789-c")
        ),
    ],
    ids=["default", "keep-probes", "code-configmap"],
)
def test_forward_then_reverse_is_identity(
    name: str, workload: dict[str, Any], plan: BridgePlan, agent: AgentSpec
) -> None:
    before = copy.deepcopy(workload)
    patches = workload_patches(workload, plan, agent)
    bridged = apply_patch(workload, patches.forward)
    assert bridged != workload
    assert resolve_pointer(bridged, pointer("spec", "replicas")) == 1
    containers = bridged["spec"]["template"]["spec"]["containers"]
    assert containers[plan.container_index]["image"] == agent.image
    assert bridged["spec"]["template"]["metadata"]["labels"][SESSION_LABEL] == agent.session
    if agent.code.configmap:
        volumes = bridged["spec"]["template"]["spec"]["volumes"]
        assert volumes[-1] == agent.code.volumes()[0]
        assert volumes[:-1] == workload["spec"]["template"]["spec"].get("volumes", [])
        assert containers[plan.container_index]["volumeMounts"][-1]["mountPath"] == "/opt/pytest-bridge"
    assert apply_patch(bridged, patches.reverse) == workload
    assert workload == before, "inputs are never mutated"


def test_patches_are_json_serialisable_lists_of_ops() -> None:
    patches = workload_patches(orders_deployment(), orders_plan(), AGENT)
    for ops in (patches.forward, patches.reverse):
        assert json.loads(json.dumps(ops)) == ops
        assert all(op["op"] in {"test", "add", "remove", "replace"} for op in ops)


def test_workload_patches_rejects_pods_and_mismatches() -> None:
    plan = make_plan(echo_service(), [echo_pod()])
    with pytest.raises(PatchError, match="bare Pods"):
        workload_patches(echo_pod(), plan, AGENT)
    with pytest.raises(PatchError, match="bare Pods"):
        workload_patches(ledger_statefulset(), orders_plan(), AGENT)


def test_workload_changed_since_planned() -> None:
    plan = orders_plan()
    changed = orders_deployment()
    changed["spec"]["template"]["spec"]["containers"].reverse()
    with pytest.raises(PatchError, match="no longer has container 'app' at index 0"):
        workload_patches(changed, plan, AGENT)


# ----------------------------------------------------------------- server fields, bare pods


def test_strip_server_fields() -> None:
    stripped = strip_server_fields(orders_deployment())
    meta = stripped["metadata"]
    for key in ("resourceVersion", "uid", "generation", "managedFields", "creationTimestamp"):
        assert key not in meta
    assert "status" not in stripped
    assert meta["annotations"] == {"owner": "checkout-team"}
    assert meta["labels"] == {"app": "orders", "team": "checkout"}
    d = orders_deployment()
    d["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "3"}
    assert "annotations" not in strip_server_fields(d)["metadata"]
    assert strip_server_fields({"kind": "X"}) == {"kind": "X"}


def test_bare_pod_swap_and_restore() -> None:
    original = echo_pod()
    plan = make_plan(echo_service(), [original])
    bridged = agent_pod(original, plan, AGENT)
    assert bridged["metadata"]["name"] == "echo"
    assert bridged["metadata"]["labels"] == {"app": "echo", SESSION_LABEL: "s-1a2b"}
    assert bridged["metadata"]["annotations"][SESSION_ANNOTATION] == "s-1a2b"
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        assert key not in bridged["metadata"]
    assert "status" not in bridged
    assert "nodeName" not in bridged["spec"] and "ephemeralContainers" not in bridged["spec"]
    container = bridged["spec"]["containers"][0]
    assert container["image"] == AGENT.image
    assert container["volumeMounts"] == original["spec"]["containers"][0]["volumeMounts"]
    assert bridged["spec"]["volumes"] == original["spec"]["volumes"]

    restored = pod_for_recreate(original)
    assert restored["spec"]["containers"] == original["spec"]["containers"]
    assert restored["metadata"] == {"name": "echo", "namespace": "shop", "labels": {"app": "echo"}}
    assert bridged_session(restored) is None
    # Restoring again from a recreated pod is stable.
    assert pod_for_recreate(restored) == restored
    assert original == echo_pod()


def test_agent_pod_requires_a_pod_plan() -> None:
    with pytest.raises(PatchError, match="bare Pods"):
        agent_pod(echo_pod(), orders_plan(), AGENT)
    with pytest.raises(PatchError, match="needs a Pod"):
        pod_for_recreate(orders_deployment())


# ----------------------------------------------------------------- the JSON Patch engine


def test_rfc6902_appendix_examples() -> None:
    assert apply_patch({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}]) == {"foo": "bar", "baz": "qux"}
    assert apply_patch({"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}]) == {
        "foo": ["bar", "qux", "baz"]
    }
    assert apply_patch({"foo": [1]}, [{"op": "add", "path": "/foo/-", "value": 2}]) == {"foo": [1, 2]}
    assert apply_patch({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}]) == {"foo": "bar"}
    assert apply_patch({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}]) == {"foo": ["bar", "baz"]}
    assert apply_patch({"baz": "qux"}, [{"op": "replace", "path": "/baz", "value": "boo"}]) == {"baz": "boo"}
    doc = {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}
    assert apply_patch(doc, [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]) == {
        "foo": {"bar": "baz"},
        "qux": {"corge": "grault", "thud": "fred"},
    }
    assert apply_patch({"a": [1]}, [{"op": "copy", "from": "/a", "path": "/b"}]) == {"a": [1], "b": [1]}
    assert apply_patch({"a/b": {"m~n": 1}}, [{"op": "test", "path": "/a~1b/m~0n", "value": 1}]) == {"a/b": {"m~n": 1}}
    assert apply_patch({"x": 1}, [{"op": "replace", "path": "", "value": [1]}]) == [1]
    assert apply_patch({"n": 1}, [{"op": "test", "path": "/n", "value": 1.0}]) == {"n": 1}


@pytest.mark.parametrize(
    ("doc", "op", "error"),
    [
        ({"a": 1}, {"op": "test", "path": "/a", "value": True}, PatchConflictError),
        ({"a": True}, {"op": "test", "path": "/a", "value": 1}, PatchConflictError),
        ({"a": 1}, {"op": "test", "path": "/b", "value": 1}, PatchConflictError),
        ({"a": "1"}, {"op": "test", "path": "/a", "value": 1}, PatchConflictError),
        ({"a": 1}, {"op": "remove", "path": "/b"}, JsonPatchError),
        ({"a": [1]}, {"op": "replace", "path": "/a/1", "value": 0}, JsonPatchError),
        ({"a": [1]}, {"op": "add", "path": "/a/01", "value": 0}, JsonPatchError),
        ({"a": [1]}, {"op": "add", "path": "/a/x", "value": 0}, JsonPatchError),
        ({"a": 1}, {"op": "add", "path": "/a/b", "value": 0}, JsonPatchError),
        ({"a": 1}, {"op": "add", "path": "a", "value": 0}, JsonPatchError),
        ({"a": 1}, {"op": "add", "path": "/b"}, JsonPatchError),
        ({"a": 1}, {"op": "frobnicate", "path": "/a"}, JsonPatchError),
        ({"a": 1}, {"op": "move", "path": "/a/b"}, JsonPatchError),
        ({"a": {"b": 1}}, {"op": "move", "from": "/a", "path": "/a/c"}, JsonPatchError),
        ({"a": 1}, {"op": "remove", "path": ""}, JsonPatchError),
        ({"a": 1}, {"op": "remove"}, JsonPatchError),
    ],
)
def test_json_patch_errors(doc: Any, op: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        apply_patch(doc, [op])


def test_json_patch_is_atomic_and_never_mutates() -> None:
    doc = {"a": 1}
    with pytest.raises(PatchConflictError):
        apply_patch(doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "test", "path": "/a", "value": 2}])
    assert doc == {"a": 1}
