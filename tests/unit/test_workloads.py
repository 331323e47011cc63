"""Workloads whose controllers would not follow the bridge's patch: HPAs, StatefulSets on OnDelete, paused
Deployments. The pure checks and patches, the restore record and guard Role, and the guard undoing it all
against an in-memory API (so a SIGKILLed session is restored exactly too)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from k8s_samples import (
    NS,
    ledger_pod,
    ledger_service,
    ledger_statefulset,
    orders_deployment,
    orders_pod,
    orders_replicaset,
    orders_service,
)
from pytest_bridge_agent import guard as g
from pytest_bridge_agent import kubeapi

from pytest_bridge.cluster.restore import RestoreRecord, guard_rbac
from pytest_bridge.cluster.workloads import (
    HPA_KIND,
    WorkloadExtras,
    autoscalers_of,
    extras_for,
    pin_patch,
    refusal,
    roll_pods,
)
from pytest_bridge.core.errors import PatchConflictError, PlanError
from pytest_bridge.core.jsonpatch import apply_patch
from pytest_bridge.core.patch import SESSION_ANNOTATION, SESSION_LABEL, AgentSpec, WorkloadPatches, workload_patches
from pytest_bridge.core.plan import make_plan

SESSION = "s-1a2b3c"


def hpa(name: str = "orders", *, target: str = "orders", kind: str = "Deployment", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": HPA_KIND,
        "metadata": {"name": name, "namespace": NS, "uid": f"hpa-{name}", "resourceVersion": "5"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
            "minReplicas": 2,
            "maxReplicas": 5,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization"}}}],
            **spec,
        },
    }


def on_delete(sts: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    sts = copy.deepcopy(sts or ledger_statefulset())
    sts["spec"]["updateStrategy"] = {"type": "OnDelete"}
    sts["status"] = {"observedGeneration": 1, "updateRevision": "ledger-7c9", **status}
    sts["metadata"]["generation"] = 1
    return sts


def revision(pod: dict[str, Any], rev: str) -> dict[str, Any]:
    pod["metadata"].setdefault("labels", {})["controller-revision-hash"] = rev
    return pod


# ---------------------------------------------------------------- refusals, before any change


def test_paused_deployment_is_refused_naming_resume_and_isolate() -> None:
    deployment = orders_deployment()
    deployment["spec"]["paused"] = True
    problem = refusal(deployment)
    assert problem is not None
    assert "Deployment 'orders' is paused (spec.paused: true)" in problem
    assert f"kubectl -n {NS} rollout resume deployment/orders" in problem
    assert "--bridge-isolate" in problem and problem.endswith("Nothing was changed")


def test_ordinary_workloads_pass() -> None:
    assert refusal(orders_deployment()) is None
    assert refusal({**orders_deployment(), "spec": {**orders_deployment()["spec"], "paused": False}}) is None
    assert refusal(ledger_statefulset(), [ledger_pod(0)]) is None
    assert refusal(on_delete(), [revision(ledger_pod(0), "ledger-7c9")]) is None


def test_partitioned_statefulset_is_refused() -> None:
    sts = ledger_statefulset()
    sts["spec"]["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}
    problem = refusal(sts)
    assert problem is not None and "rolls out with a partition (1)" in problem
    sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = 0
    assert refusal(sts) is None


def test_on_delete_with_pods_behind_the_template_is_refused() -> None:
    pods = [revision(ledger_pod(0), "ledger-7c9"), revision(ledger_pod(1), "ledger-5f1")]
    problem = refusal(on_delete(), pods)
    assert problem is not None
    assert "updateStrategy OnDelete" in problem and "ledger-1 still run(s) an older revision" in problem


def test_roll_pods_only_for_on_delete_at_the_start_ordinal() -> None:
    assert roll_pods(ledger_statefulset()) == ()
    assert roll_pods(orders_deployment()) == ()
    assert roll_pods(on_delete()) == ("ledger-0",)
    sts = on_delete()
    sts["spec"]["ordinals"] = {"start": 3}
    assert roll_pods(sts) == ("ledger-3",)


# ---------------------------------------------------------------- autoscalers


def test_autoscalers_of_match_kind_and_name() -> None:
    mine = hpa()
    others = [hpa("other", target="inventory"), hpa("ledger", target="orders", kind="StatefulSet")]
    assert autoscalers_of(orders_deployment(), [*others, mine]) == [mine]
    assert autoscalers_of(orders_deployment(), others) == []


def test_an_autoscaler_another_controller_manages_is_refused() -> None:
    keda = hpa("keda-hpa-orders")
    keda["metadata"]["ownerReferences"] = [
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "orders", "uid": "so", "controller": True}
    ]
    with pytest.raises(PlanError, match=r"ScaledObject 'orders' manages.*paused-replicas.*--bridge-isolate"):
        autoscalers_of(orders_deployment(), [keda])


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"annotations": {"team": "shop"}},
        {"no_min": True},
    ],
    ids=["no-annotations", "annotations", "min-unset"],
)
def test_pin_is_one_replica_and_its_reverse_is_exact(variant: dict[str, Any]) -> None:
    original = hpa()
    if "annotations" in variant:
        original["metadata"]["annotations"] = variant["annotations"]
    if variant.get("no_min"):
        del original["spec"]["minReplicas"]
    pin = pin_patch(original, SESSION)
    pinned = apply_patch(original, pin.forward)
    assert (pinned["spec"]["minReplicas"], pinned["spec"]["maxReplicas"]) == (1, 1)
    assert pinned["metadata"]["annotations"][SESSION_ANNOTATION] == SESSION
    assert apply_patch(pinned, pin.reverse) == original
    assert pin.record() == {"kind": HPA_KIND, "name": "orders", "reverse_patch": pin.reverse}


def test_pin_refuses_an_hpa_changed_since_it_was_read() -> None:
    original = hpa()
    pin = pin_patch(original, SESSION)
    changed = copy.deepcopy(original)
    changed["spec"]["maxReplicas"] = 9
    with pytest.raises(PatchConflictError):
        apply_patch(changed, pin.forward)
    pinned = apply_patch(original, pin.forward)
    del pinned["metadata"]["annotations"][SESSION_ANNOTATION]  # restored by someone else meanwhile
    with pytest.raises(PatchConflictError):
        apply_patch(pinned, pin.reverse)


def test_extras_for_a_deployment_with_an_hpa_and_an_on_delete_statefulset() -> None:
    extras = extras_for(orders_deployment(), [hpa(), hpa("other", target="x")], SESSION)
    assert [r.name for r in extras.related] == ["orders"] and extras.roll_pods == ()
    extras = extras_for(on_delete(), [], SESSION)
    assert extras.related == () and extras.roll_pods == ("ledger-0",)


# ---------------------------------------------------------------- the record and the guard's Role


def record_for(
    workload: dict[str, Any], hpas: list[dict[str, Any]], pods: list[Any], owners: list[Any]
) -> tuple[RestoreRecord, WorkloadPatches, WorkloadExtras]:
    service = orders_service() if workload["kind"] == "Deployment" else ledger_service()
    plan = make_plan(service, pods, owners)
    agent = AgentSpec(image="python:3.11", session=SESSION, token_sha256="0" * 64)
    patches = workload_patches(workload, plan, agent)
    extras = extras_for(workload, hpas, SESSION)
    record = RestoreRecord(
        session=SESSION, namespace=NS, kind=workload["kind"], name=workload["metadata"]["name"],
        reverse_patch=patches.reverse, original=workload, owner="dev", created=1.0,
        related=[r.record() for r in extras.related], roll_pods=list(extras.roll_pods),
    )  # fmt: skip
    return record, patches, extras


def test_record_round_trips_and_old_records_still_read() -> None:
    record, _, _ = record_for(orders_deployment(), [hpa()], [orders_pod()], [orders_replicaset(), orders_deployment()])
    assert RestoreRecord.from_json(record.to_json()) == record
    old = json.loads(record.to_json())
    del old["related"], old["roll_pods"]
    assert RestoreRecord.from_json(json.dumps(old)).related == []


def test_guard_role_covers_the_hpa_and_the_pod_by_name_only() -> None:
    record, _, _ = record_for(orders_deployment(), [hpa()], [orders_pod()], [orders_replicaset(), orders_deployment()])
    job = {"metadata": {"name": f"pytest-bridge-guard-{SESSION}", "uid": "job-uid"}}
    role = next(obj for obj in guard_rbac(SESSION, NS, record, job) if obj["kind"] == "Role")
    assert {
        "apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "resourceNames": ["orders"],
        "verbs": ["get", "patch"],
    } in role["rules"]  # fmt: skip
    sts = on_delete()
    record, _, _ = record_for(sts, [], [ledger_pod(0)], [sts])
    role = next(obj for obj in guard_rbac(SESSION, NS, record, job) if obj["kind"] == "Role")
    assert {"apiGroups": [""], "resources": ["pods"], "resourceNames": ["ledger-0"], "verbs": ["get", "delete"]} in (
        role["rules"]
    )
    assert not any("horizontalpodautoscalers" in rule["resources"] for rule in role["rules"])


# ---------------------------------------------------------------- the guard restores it after a SIGKILL


class Api:
    """Objects by API path; GET, JSON-Patch PATCH (with tests) and DELETE (uid precondition) as the server does."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = copy.deepcopy(objects)
        self.log: list[str] = []

    def send(self, request: kubeapi.Request) -> kubeapi.Response:
        path = request.path.split("?")[0]
        self.log.append(f"{request.method} {path}")
        obj = self.objects.get(path)
        if obj is None:
            return kubeapi.Response(404, {"message": "not found"})
        if request.method == "GET":
            return kubeapi.Response(200, copy.deepcopy(obj))
        if request.method == "PATCH":
            try:
                patched = apply_patch(obj, json.loads(request.body or b"[]"))
            except PatchConflictError as e:
                return kubeapi.Response(422, {"message": f"the test failed: {e}"})
            if patched.get("spec") != obj.get("spec") and "generation" in obj["metadata"]:
                patched["metadata"]["generation"] = obj["metadata"]["generation"] + 1
            self.objects[path] = patched
            return kubeapi.Response(200, patched)
        if request.method == "DELETE":
            uid = (json.loads(request.body or b"{}").get("preconditions") or {}).get("uid")
            if uid and uid != obj["metadata"].get("uid"):
                return kubeapi.Response(409, {"message": "uid precondition"})
            del self.objects[path]
            return kubeapi.Response(200, {})
        raise AssertionError(request.method)


def guard(api: Api) -> g.Guard:
    cfg = g.config_from_env({
        "GUARD_SESSION": SESSION, "GUARD_NAMESPACE": NS, "GUARD_TTL_SECONDS": "1", "GUARD_RECORD_CONFIGMAP": "r",
        "GUARD_JOB": "j", "GUARD_SESSION_LABEL": SESSION_LABEL, "GUARD_STATUS_PORT": "47101",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    })  # fmt: skip

    def no_sleep(seconds: float) -> None:
        for path, obj in api.objects.items():  # the controller catches up while the guard waits
            if "statefulsets" in path:
                obj.setdefault("status", {})["observedGeneration"] = obj["metadata"]["generation"]

    return g.Guard(cfg, api.send, clock=lambda: 0.0, sleep=no_sleep)


def parsed(record: RestoreRecord) -> g.Record:
    return g.Record(**json.loads(record.to_json()))


DEPLOY = f"/apis/apps/v1/namespaces/{NS}/deployments/orders"
HPA = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/orders"
STS = f"/apis/apps/v1/namespaces/{NS}/statefulsets/ledger"
POD0 = f"/api/v1/namespaces/{NS}/pods/ledger-0"


def test_guard_unpins_the_hpa_then_restores_the_deployment_exactly() -> None:
    deployment = {**orders_deployment(), "status": {}}
    deployment["metadata"]["generation"] = 4
    record, patches, extras = record_for(deployment, [hpa()], [orders_pod()], [orders_replicaset(), deployment])
    before = {DEPLOY: deployment, HPA: hpa()}
    bridged = {DEPLOY: apply_patch(deployment, patches.forward), HPA: apply_patch(hpa(), extras.related[0].forward)}
    api = Api(bridged)
    guard(api).restore(parsed(record))
    assert api.log[:2] == [f"PATCH {HPA}", f"PATCH {DEPLOY}"], "the HPA first: pinned, it would scale the restore"
    assert api.objects[HPA] == before[HPA]
    restored = api.objects[DEPLOY]
    restored["metadata"].pop("generation")
    expected = copy.deepcopy(deployment)
    expected["metadata"].pop("generation")
    assert restored == expected
    guard(api).restore(parsed(record))  # a retried restore changes nothing
    assert api.objects[HPA] == before[HPA]


def test_guard_restores_an_hpa_pin_that_never_happened_or_a_deleted_hpa() -> None:
    deployment = orders_deployment()
    record, patches, _ = record_for(deployment, [hpa()], [orders_pod()], [orders_replicaset(), deployment])
    api = Api({DEPLOY: apply_patch(deployment, patches.forward), HPA: hpa()})  # killed before the pin
    guard(api).restore(parsed(record))
    assert api.objects[HPA] == hpa()
    api = Api({DEPLOY: apply_patch(deployment, patches.forward)})  # the HPA deleted meanwhile
    guard(api).restore(parsed(record))
    assert api.objects[DEPLOY]["spec"]["replicas"] == deployment["spec"]["replicas"]


def test_guard_deletes_the_on_delete_pod_after_the_restore_once_the_controller_saw_it() -> None:
    sts = on_delete()
    record, patches, _ = record_for(sts, [], [ledger_pod(0)], [sts])
    agent_pod = {"metadata": {"name": "ledger-0", "uid": "p1", "labels": {SESSION_LABEL: SESSION}}}
    api = Api({STS: apply_patch(sts, patches.forward), POD0: agent_pod})
    api.objects[STS]["metadata"]["generation"] = 2
    g_ = guard(api)
    g_.restore(parsed(record))
    assert POD0 not in api.objects
    assert api.log.index(f"DELETE {POD0}") > api.log.index(f"PATCH {STS}")
    assert api.objects[STS]["spec"] == sts["spec"]
    # Replaced from the restored template: no session label, not deleted again.
    api.objects[POD0] = {"metadata": {"name": "ledger-0", "uid": "p2", "labels": {"app": "ledger"}}}
    g_.restore(parsed(record))
    assert POD0 in api.objects


def test_guard_refuses_a_record_with_a_related_object_it_cannot_restore() -> None:
    sts = on_delete()
    record, _, _ = record_for(sts, [], [ledger_pod(0)], [sts])
    bad = json.loads(record.to_json())
    bad["related"] = [{"kind": "VerticalPodAutoscaler", "name": "x", "reverse_patch": [{"op": "test"}]}]
    record_map = {"binaryData": {"record.json": base64.b64encode(json.dumps(bad).encode()).decode()}}
    cfg = guard(Api({})).config
    with pytest.raises(ValueError, match="related object it cannot restore"):
        g.parse_record(record_map, cfg)
