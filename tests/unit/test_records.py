"""Restore records are used only when they have the shape the plugin writes (forged ones are not)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from k8s_samples import echo_pod, echo_service, orders_deployment, orders_pod, orders_replicaset, orders_service

from pytest_bridge.cluster.restore import RestoreRecord, _record_from_configmap, guard_name, owned_configmap
from pytest_bridge.core.patch import AgentSpec, agent_pod, pod_for_recreate, strip_server_fields, workload_patches
from pytest_bridge.core.plan import make_plan
from pytest_bridge.core.records import RecordError, check_owner, check_pod_matches, check_record

AGENT = AgentSpec(image="python:3", session="s-1a2b", token_sha256="00" * 32)
WHERE = "record"


def genuine() -> RestoreRecord:
    deployment = orders_deployment()
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment])
    patches = workload_patches(deployment, plan, AGENT)
    return RestoreRecord(
        session="s-1a2b", namespace=deployment["metadata"]["namespace"], kind="Deployment", name="orders",
        reverse_patch=patches.reverse, original=strip_server_fields(deployment), owner="me", created=1.0,
    )  # fmt: skip


def test_the_plugins_own_record_passes() -> None:
    record = genuine()
    check_record(record, namespace=record.namespace, where=WHERE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "ClusterRole"}, "kind 'ClusterRole'"),
        ({"namespace": "kube-system"}, "namespace 'kube-system'"),
        ({"name": "../etc"}, "not an object name"),
        ({"reverse_patch": []}, "no reverse patch"),
        ({"session": "other"}, "tests for session 's-1a2b', not 'other'"),
    ],
)
def test_forged_fields_are_refused(change: dict[str, Any], message: str) -> None:
    record = dataclasses.replace(genuine(), **change)
    with pytest.raises(RecordError, match=message):
        check_record(record, namespace=genuine().namespace, where=WHERE)


@pytest.mark.parametrize(
    "op",
    [
        {"op": "replace", "path": "/spec/template/spec/serviceAccountName", "value": "admin"},
        {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
        {"op": "replace", "path": "/metadata/labels/app", "value": "x"},
        {"op": "move", "from": "/a", "path": "/spec/replicas"},
    ],
)
def test_a_reverse_patch_may_touch_only_what_a_bridge_changes(op: dict[str, Any]) -> None:
    record = genuine()
    forged = dataclasses.replace(record, reverse_patch=[*record.reverse_patch, op])
    with pytest.raises(RecordError):
        check_record(forged, namespace=record.namespace, where=WHERE)


def test_a_reverse_patch_must_first_test_the_session() -> None:
    record = genuine()
    with pytest.raises(RecordError, match="does not begin by testing"):
        check_record(dataclasses.replace(record, reverse_patch=record.reverse_patch[1:]), namespace=record.namespace,
                     where=WHERE)  # fmt: skip


def test_owner_and_label() -> None:
    record = genuine()
    job = {"metadata": {"name": guard_name("s-1a2b"), "uid": "u"}}
    record_map = owned_configmap("rec", session="s-1a2b", namespace=record.namespace, role="restore-record",
                                 job=job, data={"record.json": record.to_json()})  # fmt: skip
    assert _record_from_configmap(record_map, record.namespace) == record
    orphan = copy.deepcopy(record_map)
    orphan["metadata"]["ownerReferences"] = []
    with pytest.raises(RecordError, match="not owned by the guard Job"):
        _record_from_configmap(orphan, record.namespace)
    with pytest.raises(RecordError, match="label"):
        check_owner({**record_map["metadata"], "labels": {}}, "s-1a2b", guard_name("s-1a2b"))
    garbage = copy.deepcopy(record_map)
    garbage["binaryData"]["record.json"] = "bm90IGpzb24="  # "not json"
    with pytest.raises(RecordError, match="not a restore record"):
        _record_from_configmap(garbage, record.namespace)


def test_a_bare_pod_is_recreated_only_in_place_of_its_agent_pod() -> None:
    pod = echo_pod()
    plan = make_plan(echo_service(), [pod])
    record = RestoreRecord(
        session="s-1a2b", namespace=pod["metadata"]["namespace"], kind="Pod", name=pod["metadata"]["name"],
        reverse_patch=[], original=pod_for_recreate(pod), owner="me", created=1.0,
    )  # fmt: skip
    check_record(record, namespace=record.namespace, where=WHERE)
    live = agent_pod(pod, plan, AGENT)
    check_pod_matches(record, live, where=WHERE)
    forged = copy.deepcopy(record.original)
    forged["spec"]["containers"].append({"name": "miner", "image": "evil:1"})
    with pytest.raises(RecordError, match="does not match the agent pod"):
        check_pod_matches(dataclasses.replace(record, original=forged), live, where=WHERE)
    with pytest.raises(RecordError, match="not bridged by session"):
        check_pod_matches(record, pod, where=WHERE)


def _with_extras(**changes: Any) -> RestoreRecord:
    from pytest_bridge.cluster.workloads import pin_patch  # noqa: PLC0415

    hpa = {"metadata": {"name": "orders", "uid": "u"}, "spec": {"minReplicas": 2, "maxReplicas": 5}}
    pin = pin_patch(hpa, "s-1a2b")
    return dataclasses.replace(genuine(), related=[pin.record()], **changes)


def test_a_pinned_hpa_and_pods_to_roll_as_the_plugin_writes_them_pass() -> None:
    record = _with_extras()
    check_record(record, namespace=record.namespace, where=WHERE)
    sts = dataclasses.replace(record, kind="StatefulSet", original={"kind": "StatefulSet"}, roll_pods=["orders-0"])
    check_record(sts, namespace=record.namespace, where=WHERE)


@pytest.mark.parametrize(
    ("related", "message"),
    [
        ({"kind": "Deployment", "name": "x", "reverse_patch": []}, "is not a HorizontalPodAutoscaler"),
        ({"kind": "HorizontalPodAutoscaler", "name": "../x", "reverse_patch": []}, "is not an object name"),
        ({"kind": "HorizontalPodAutoscaler", "name": "x", "reverse_patch": []}, "does not test our mark"),
        (
            {"kind": "HorizontalPodAutoscaler", "name": "x", "reverse_patch": [
                {"op": "test", "path": "/metadata/annotations/pytest-bridge.io~1session", "value": "s-1a2b"},
                {"op": "replace", "path": "/spec/scaleTargetRef/name", "value": "other"},
            ]},
            "touches /spec/scaleTargetRef/name",
        ),
    ],
)  # fmt: skip
def test_forged_related_objects_are_refused(related: dict[str, Any], message: str) -> None:
    record = dataclasses.replace(genuine(), related=[related])
    with pytest.raises(RecordError, match=message):
        check_record(record, namespace=record.namespace, where=WHERE)


def test_pods_to_roll_are_only_the_statefulsets_own() -> None:
    record = dataclasses.replace(genuine(), roll_pods=["orders-0"])  # a Deployment rolls nothing
    with pytest.raises(RecordError, match="not one of StatefulSet"):
        check_record(record, namespace=record.namespace, where=WHERE)
    sts = dataclasses.replace(record, kind="StatefulSet", original={"kind": "StatefulSet"}, roll_pods=["db-0"])
    with pytest.raises(RecordError, match="'db-0' to roll is not one of StatefulSet orders's"):
        check_record(sts, namespace=record.namespace, where=WHERE)
