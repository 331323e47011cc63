"""What a workload's own controllers need for a bridge to take hold, and to be undone exactly.

The workload patch (:mod:`.patch`) swaps the container and sets one replica. Three kinds of
workload would not follow it on their own:

* a **HorizontalPodAutoscaler** scaling the workload puts the replicas back to its minimum and
  fights the patch (a second agent pod with no client behind it). Its ``minReplicas`` and
  ``maxReplicas`` are pinned to 1 for the session by a JSON Patch that tests what it recorded
  and marks the HPA with the session; the reverse patch (in the restore record, so the guard
  can apply it after a SIGKILL) puts both back and removes the mark. An HPA that another
  controller owns (KEDA's ScaledObject) would undo the pin: refused.
* a **StatefulSet with updateStrategy OnDelete** does not replace its pod when the template
  changes: its first pod (``<name>-<start ordinal>``) is deleted once the controller has seen
  the patch, and again after the restore (recorded, so the guard does it too). Refused when a
  pod still runs an older revision than the template: deleting it would roll that out.
* a **paused Deployment** or a **StatefulSet rolling out with a partition** do not roll the
  template out at all; resuming them for the session would also roll out whatever template
  changes wait in them, which no restore can undo. Refused before any change.

The checks and patch builders are pure (API JSON dicts in, no I/O); :func:`check`,
:func:`prepare`, :func:`after_patch`, :func:`before_restore` and :func:`after_restore` do the
I/O through ``kube.call``. Bare Pods need none of this.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_bridge.cluster import kube
from pytest_bridge.cluster.permissions import required_permissions_check
from pytest_bridge.core.errors import ConflictError, ConnectError, NotFoundError, PlanError
from pytest_bridge.core.jsonpatch import pointer
from pytest_bridge.core.patch import SESSION_ANNOTATION, SESSION_LABEL, JsonOps
from pytest_bridge.core.plan import BridgePlan

if TYPE_CHECKING:
    from pytest_bridge.core.records import RestoreRecord

__all__ = [
    "HPA_KIND",
    "RelatedPatch",
    "WorkloadExtras",
    "after_patch",
    "after_restore",
    "autoscalers_of",
    "before_restore",
    "check",
    "pin_patch",
    "prepare",
    "refusal",
    "roll_pods",
]

Obj = Mapping[str, Any]
HPA_KIND = "HorizontalPodAutoscaler"
REVISION_LABEL = "controller-revision-hash"
OBSERVED_TIMEOUT = 30.0  # seconds for the workload's controller to see a patch


@dataclass(frozen=True)
class RelatedPatch:
    """A change to another object than the workload (an HPA), made after the workload patch and
    undone before the workload's restore."""

    kind: str
    name: str
    forward: JsonOps
    reverse: JsonOps

    def record(self) -> dict[str, Any]:
        """How the restore record (and the guard) carries it."""
        return {"kind": self.kind, "name": self.name, "reverse_patch": self.reverse}


@dataclass(frozen=True)
class WorkloadExtras:
    related: tuple[RelatedPatch, ...] = ()
    roll_pods: tuple[str, ...] = ()  # deleted once the patch is seen, and again after the restore


# --- pure ----------------------------------------------------------------------------------------


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Obj) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _isolate_hint(kind: str) -> str:
    return f"or use --bridge-isolate (a route pod of its own serves the session; the {kind} is left alone)"


def _start_ordinal(workload: Obj) -> int:
    start = (_spec(workload).get("ordinals") or {}).get("start")
    return int(start) if isinstance(start, int) and not isinstance(start, bool) else 0


def _strategy(workload: Obj) -> tuple[str, int]:
    """A StatefulSet's update strategy type and rolling-update partition."""
    strategy = _spec(workload).get("updateStrategy") or {}
    kind = str(strategy.get("type") or "RollingUpdate")
    partition = (strategy.get("rollingUpdate") or {}).get("partition") or 0
    return kind, int(partition) if isinstance(partition, int) and not isinstance(partition, bool) else 0


def refusal(workload: Obj, pods: Sequence[Obj] = ()) -> str | None:
    """Why the workload patch would not take hold (or could not be undone), or None.

    ``pods`` are the workload's pods (a StatefulSet's: which revision each runs).
    """
    kind, name = str(workload.get("kind")), str(_meta(workload).get("name"))
    ns = str(_meta(workload).get("namespace") or "default")
    spec = _spec(workload)
    if kind == "Deployment" and spec.get("paused"):
        return (
            f"Deployment {name!r} is paused (spec.paused: true): a change to its pod template does not roll "
            "out while it is paused, so the agent would never start; and resuming it for the session would "
            "also roll out whatever template changes wait in it, which a restore cannot take back. Resume it "
            f"(`kubectl -n {ns} rollout resume deployment/{name}`) {_isolate_hint(kind)}. Nothing was changed"
        )
    if kind != "StatefulSet":
        return None
    strategy, partition = _strategy(workload)
    if strategy == "RollingUpdate" and partition > 0:
        return (
            f"StatefulSet {name!r} rolls out with a partition ({partition}): its pods below the partition keep "
            "their revision when the template changes, so the agent would never start; and lifting the partition "
            "for the session would also roll out what waits behind it. Set "
            f"spec.updateStrategy.rollingUpdate.partition to 0 once the rollout is done {_isolate_hint(kind)}. "
            "Nothing was changed"
        )
    if strategy == "OnDelete":
        update = str((workload.get("status") or {}).get("updateRevision") or "")
        stale = sorted(
            str(_meta(p).get("name"))
            for p in pods
            if update and (_meta(p).get("labels") or {}).get(REVISION_LABEL, update) != update
        )
        if stale:
            return (
                f"StatefulSet {name!r} replaces its pods only when they are deleted (updateStrategy OnDelete), "
                f"and {', '.join(stale)} still run(s) an older revision than its template ({update}): the bridge "
                "deletes the pod to start the agent and again to restore it, which would roll out those pending "
                f"template changes. Delete those pods first, so they run the current template, {_isolate_hint(kind)}. "
                "Nothing was changed"
            )
    return None


def roll_pods(workload: Obj) -> tuple[str, ...]:
    """Pods the bridge must delete itself: an OnDelete StatefulSet's one remaining pod."""
    if workload.get("kind") != "StatefulSet" or _strategy(workload)[0] != "OnDelete":
        return ()
    return (f"{_meta(workload).get('name')}-{_start_ordinal(workload)}",)


def autoscalers_of(workload: Obj, hpas: Sequence[Obj]) -> list[Obj]:
    """The HPAs (autoscaling/v2 dicts) scaling ``workload``; PlanError for one we cannot pin."""
    kind, name = workload.get("kind"), _meta(workload).get("name")
    found = []
    for hpa in hpas:
        target = _spec(hpa).get("scaleTargetRef") or {}
        if target.get("kind") != kind or target.get("name") != name:
            continue
        controller = next((ref for ref in _meta(hpa).get("ownerReferences") or [] if ref.get("controller")), None)
        if controller is not None:
            raise PlanError(
                f"{kind} {name!r} is scaled by HorizontalPodAutoscaler {_meta(hpa).get('name')!r}, which "
                f"{controller.get('kind')} {controller.get('name')!r} manages: it would undo the bridge's pin of "
                f"the HPA to one replica. Pause that autoscaler (KEDA: the annotation "
                f"autoscaling.keda.sh/paused-replicas) {_isolate_hint(str(kind))}. Nothing was changed"
            )
        found.append(hpa)
    return found


def pin_patch(hpa: Obj, session: str) -> RelatedPatch:
    """JSON Patches pinning an HPA to one replica for ``session``, and back exactly.

    The forward patch tests the uid and the recorded bounds, so an HPA changed since it was read
    is refused rather than recorded wrongly; the reverse patch tests the session's mark.
    """
    meta, spec = _meta(hpa), _spec(hpa)
    mark = pointer("metadata", "annotations", SESSION_ANNOTATION)
    forward: JsonOps = [{"op": "test", "path": "/metadata/uid", "value": meta.get("uid")}] if meta.get("uid") else []
    forward.append({"op": "test", "path": "/spec/maxReplicas", "value": spec.get("maxReplicas")})
    reverse: JsonOps = [{"op": "test", "path": mark, "value": session}]
    if "minReplicas" in spec:
        forward.append({"op": "test", "path": "/spec/minReplicas", "value": spec["minReplicas"]})
        forward.append({"op": "replace", "path": "/spec/minReplicas", "value": 1})
        reverse.append({"op": "replace", "path": "/spec/minReplicas", "value": spec["minReplicas"]})
    else:
        forward.append({"op": "add", "path": "/spec/minReplicas", "value": 1})
        reverse.append({"op": "remove", "path": "/spec/minReplicas"})
    forward.append({"op": "replace", "path": "/spec/maxReplicas", "value": 1})
    reverse.append({"op": "replace", "path": "/spec/maxReplicas", "value": spec.get("maxReplicas")})
    if isinstance(meta.get("annotations"), Mapping):
        forward.append({"op": "add", "path": mark, "value": session})
        reverse.append({"op": "remove", "path": mark})
    else:
        forward.append({"op": "add", "path": "/metadata/annotations", "value": {SESSION_ANNOTATION: session}})
        reverse.append({"op": "remove", "path": "/metadata/annotations"})
    return RelatedPatch(HPA_KIND, str(meta.get("name")), forward, reverse)


def extras_for(workload: Obj, hpas: Sequence[Obj], session: str) -> WorkloadExtras:
    """Everything beyond the workload patch that bridging ``workload`` needs (pure)."""
    return WorkloadExtras(
        related=tuple(pin_patch(hpa, session) for hpa in autoscalers_of(workload, hpas)),
        roll_pods=roll_pods(workload),
    )


def _owned_by(pod: Obj, workload: Obj) -> bool:
    uid = _meta(workload).get("uid")
    return any(ref.get("uid") == uid for ref in _meta(pod).get("ownerReferences") or []) if uid else True


def _selector(workload: Obj) -> str:
    labels = (_spec(workload).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --- I/O -----------------------------------------------------------------------------------------


def _autoscaling(k: kube.Kube) -> Any:
    from kubernetes import client  # noqa: PLC0415 - only here; the rest goes through kube.Kube

    return client.AutoscalingV2Api(k.api_client)


def _list_hpas(k: kube.Kube, namespace: str) -> list[dict[str, Any]]:
    listed: Any = kube.call(
        "list the HorizontalPodAutoscalers (one may scale the workload)",
        _autoscaling(k).list_namespaced_horizontal_pod_autoscaler, namespace,
        verb="list", resource="horizontalpodautoscalers", namespace=namespace,
    )  # fmt: skip
    return [k.to_dict(item) for item in listed.items]


def check(k: kube.Kube, plan: BridgePlan, workload: dict[str, Any]) -> None:
    """Before any change: PlanError if the workload's controllers would not follow the patch, and
    ForbiddenError if what they need (pinning an HPA, deleting a pod) is not allowed."""

    if plan.workload.kind == "Pod":
        return
    ns = plan.workload.namespace
    pods: list[dict[str, Any]] = []
    if plan.workload.kind == "StatefulSet" and _strategy(workload)[0] == "OnDelete":
        listed: Any = kube.call(
            "list the StatefulSet's pods", k.core.list_namespaced_pod, ns, label_selector=_selector(workload)
        )
        pods = [k.to_dict(p) for p in listed.items if _owned_by(k.to_dict(p), workload)]
    problem = refusal(workload, pods)
    if problem:
        raise PlanError(f"cannot bridge service {plan.service!r}: {problem}")
    needed: list[tuple[str, str, str]] = []
    if autoscalers_of(workload, _list_hpas(k, ns)):
        # The guard's Role gets these too (Kubernetes lets us grant only what we hold).
        needed += [
            ("get", "autoscaling", "horizontalpodautoscalers"),
            ("patch", "autoscaling", "horizontalpodautoscalers"),
        ]
    if roll_pods(workload):
        needed += [("get", "", "pods"), ("delete", "", "pods")]
    if needed:
        required_permissions_check(
            k, needed, what=f"bridge {plan.service!r} ({plan.workload.kind} {plan.workload.name})"
        )


def prepare(k: kube.Kube, plan: BridgePlan, workload: dict[str, Any], session: str) -> WorkloadExtras:
    """What to record and do beyond the workload patch (read now: just before the record is written)."""
    if plan.workload.kind == "Pod":
        return WorkloadExtras()
    return extras_for(workload, _list_hpas(k, plan.workload.namespace), session)


def _read_workload(k: kube.Kube, kind: str, name: str, ns: str) -> dict[str, Any]:
    reader = {"Deployment": k.apps.read_namespaced_deployment, "StatefulSet": k.apps.read_namespaced_stateful_set}
    return k.to_dict(kube.call(f"read {kind} {name}", reader[kind], name, ns))


def _wait_observed(k: kube.Kube, kind: str, name: str, ns: str, timeout: float = OBSERVED_TIMEOUT) -> None:
    """Until the workload's controller has seen its latest spec (a pod deleted before that would come
    back from the old template)."""
    deadline = time.monotonic() + timeout
    while True:
        obj = _read_workload(k, kind, name, ns)
        observed = (obj.get("status") or {}).get("observedGeneration") or 0
        if observed >= (obj.get("metadata") or {}).get("generation", 0):
            return
        if time.monotonic() > deadline:
            raise ConnectError(f"the controller of {kind} {ns}/{name} did not take up its change within {timeout:.0f}s")
        time.sleep(0.1)


def _delete_pods(k: kube.Kube, ns: str, names: Sequence[str], *, session: str, ours: bool) -> list[str]:
    """Delete the named pods that carry (``ours``) or do not carry ``session``'s label; the deleted names."""
    from kubernetes import client  # noqa: PLC0415

    deleted = []
    for name in names:
        try:
            pod: Any = kube.call(f"read pod {name}", k.core.read_namespaced_pod, name, ns)
        except NotFoundError:
            continue
        if pod.metadata.deletion_timestamp is not None:
            continue
        if ((pod.metadata.labels or {}).get(SESSION_LABEL) == session) != ours:
            continue
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.metadata.uid))
        with contextlib.suppress(NotFoundError):
            kube.call(
                f"delete pod {name} (its StatefulSet replaces pods only when they are deleted)",
                k.core.delete_namespaced_pod, name, ns, body=options,
                verb="delete", resource="pods", namespace=ns,
            )  # fmt: skip
            deleted.append(name)
    return deleted


def after_patch(
    k: kube.Kube, plan: BridgePlan, extras: WorkloadExtras, session: str, report: Callable[[str], None]
) -> None:
    """Right after the workload patch: pin its HPAs, then replace an OnDelete StatefulSet's pod."""
    ns = plan.workload.namespace
    for related in extras.related:
        kube.call(
            f"pin HorizontalPodAutoscaler {related.name} to one replica for the session",
            _autoscaling(k).patch_namespaced_horizontal_pod_autoscaler, related.name, ns, related.forward,
            verb="patch", resource="horizontalpodautoscalers", namespace=ns,
        )  # fmt: skip
        report(f"{plan.service}: HorizontalPodAutoscaler {related.name} pinned to 1 replica for the session")
    if extras.roll_pods:
        _wait_observed(k, plan.workload.kind, plan.workload.name, ns)
        deleted = _delete_pods(k, ns, extras.roll_pods, session=session, ours=False)
        if deleted:
            report(f"{plan.service}: deleted pod {', '.join(deleted)} (StatefulSet updateStrategy OnDelete)")


def before_restore(k: kube.Kube, record: RestoreRecord) -> None:
    """Undo the pins of ``record`` (before the workload's own restore); idempotent."""
    for related in record.related:
        if related.get("kind") != HPA_KIND:
            continue
        name, ns = str(related["name"]), record.namespace
        api = _autoscaling(k)
        try:
            kube.call(
                f"restore HorizontalPodAutoscaler {name}", api.patch_namespaced_horizontal_pod_autoscaler, name, ns,
                related["reverse_patch"], verb="patch", resource="horizontalpodautoscalers", namespace=ns,
            )  # fmt: skip
        except NotFoundError:
            continue  # deleted meanwhile: nothing to restore
        except ConflictError:
            current = k.to_dict(
                kube.call(
                    f"read HorizontalPodAutoscaler {name}", api.read_namespaced_horizontal_pod_autoscaler, name, ns
                )
            )
            if ((current.get("metadata") or {}).get("annotations") or {}).get(SESSION_ANNOTATION) == record.session:
                raise
            # Not pinned (any more) by this session: restored already, or never pinned.


def after_restore(k: kube.Kube, record: RestoreRecord) -> None:
    """Replace the pods that still run the agent (OnDelete) once the controller saw the restore."""
    if not record.roll_pods:
        return
    _wait_observed(k, record.kind, record.name, record.namespace)
    _delete_pods(k, record.namespace, record.roll_pods, session=record.session, ours=True)
