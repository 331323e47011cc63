"""Restore records are checked before they are used: a forged one must not steer a restore. Pure.

A restore record is a ConfigMap anyone who may write ConfigMaps in the namespace could forge or edit,
and ``pytest-bridge cleanup`` (or a later session) applies what it says, with the permissions of
whoever runs it. So a record is used only if it has exactly the shape our plugin writes:

* the ConfigMap is owned by its session's guard Job and labelled with that session;
* kind, namespace, name and session agree with the ConfigMap it came from;
* its reverse patch begins with the test that the workload still carries this session, and
  touches only what a bridge changes (the target container, replicas, our labels and
  annotations, our code volume);
* a bare Pod's record is re-created only in place of the agent pod it recorded: every container
  but the agent's, and every volume but our code volume, must equal the record's;
* related objects (an HPA pinned to one replica, see :mod:`.workloads`) are HPAs whose reverse
  patch begins with the test of this session's mark and touches only the replica bounds and our
  annotation; the pods to roll are the recorded StatefulSet's own (``<name>-<ordinal>``).

Anything else is :class:`RecordError`, naming the ConfigMap and what is wrong with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_bridge_agent.runtime import CODE_VOLUME

from pytest_bridge.core.errors import BridgeError
from pytest_bridge.core.patch import CONTAINER_ANNOTATION, SESSION_ANNOTATION, SESSION_LABEL, JsonOps

__all__ = ["RecordError", "RestoreRecord", "check_owner", "check_pod_matches", "check_record"]


@dataclass(frozen=True)
class RestoreRecord:
    """What undoes one bridge: stored in the cluster before the change is made."""

    session: str
    namespace: str
    kind: str  # Deployment, StatefulSet or Pod
    name: str
    reverse_patch: JsonOps
    original: dict[str, Any]  # stripped of server fields; for a bare Pod, the manifest to re-create
    owner: str  # who/where: user@host pid N, for messages about stale sessions
    created: float
    # Other objects changed for the bridge, undone before the workload: [{kind, name, reverse_patch}]
    # (HPAs pinned to one replica; see workloads.py). Pods deleted again after the restore (OnDelete).
    related: list[dict[str, Any]] = field(default_factory=list)
    roll_pods: list[str] = field(default_factory=list)
    # The forward patch (what the bridge set where): lets a restore keep changes someone made to
    # the workload during the session (pytest_bridge_agent.merge). Empty for bare Pods.
    forward: JsonOps = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RestoreRecord:
        return cls(**json.loads(text))


KINDS = ("Deployment", "StatefulSet", "Pod")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_OURS = "pytest-bridge.io~1"
# The paths a reverse patch may touch (JSON Pointer, escaped), as pytest_bridge.core.patch writes them.
_ALLOWED = tuple(
    re.compile(p)
    for p in (
        r"^/spec/replicas$",
        r"^/spec/template/spec/containers/\d+(/.*)?$",
        r"^/spec/template/spec/volumes(/\d+)?$",
        rf"^/metadata/(labels|annotations)(/{_OURS}[a-z-]+)?$",
        rf"^/spec/template/metadata/(labels|annotations)(/{_OURS}[a-z-]+)?$",
    )
)
_OPS = ("test", "add", "remove", "replace")
# What the reverse patch of a pinned HPA may touch (pytest_bridge.cluster.workloads.pin_patch).
_HPA_ALLOWED = tuple(
    re.compile(p) for p in (r"^/spec/(minReplicas|maxReplicas)$", rf"^/metadata/annotations(/{_OURS}session)?$")
)


class RecordError(BridgeError):
    """A restore record that is not what this plugin writes: it is not used."""


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def check_owner(record_meta: Mapping[str, Any], session: str, guard: str) -> None:
    """The record's ConfigMap is labelled with ``session`` and owned by its guard Job ``guard``."""
    name = record_meta.get("name")
    labels = record_meta.get("labels") or {}
    if labels.get(SESSION_LABEL) != session:
        raise RecordError(f"ConfigMap {name}: its {SESSION_LABEL} label is not the record's session {session!r}")
    owners = record_meta.get("ownerReferences") or []
    if not any(o.get("kind") == "Job" and o.get("name") == guard for o in owners if isinstance(o, Mapping)):
        raise RecordError(f"ConfigMap {name}: not owned by the guard Job {guard} of session {session!r}")


def check_record(record: Any, *, namespace: str, where: str) -> None:
    """RecordError unless ``record`` (a RestoreRecord) has the shape this plugin writes."""
    if record.kind not in KINDS:
        raise RecordError(f"{where}: kind {record.kind!r} is none of {', '.join(KINDS)}")
    if record.namespace != namespace:
        raise RecordError(f"{where}: namespace {record.namespace!r} is not the ConfigMap's {namespace!r}")
    if not isinstance(record.name, str) or not _NAME.match(record.name):
        raise RecordError(f"{where}: {record.name!r} is not an object name")
    if not isinstance(record.original, dict) or record.original.get("kind", record.kind) != record.kind:
        raise RecordError(f"{where}: the original object is not a {record.kind}")
    if record.kind == "Pod":
        meta = record.original.get("metadata") or {}
        if meta.get("name") != record.name or meta.get("namespace", namespace) != namespace:
            raise RecordError(f"{where}: the original Pod is not {namespace}/{record.name}")
        if record.reverse_patch or getattr(record, "forward", None):
            raise RecordError(f"{where}: a bare Pod's record has no patches")
        return
    ops = record.reverse_patch
    if not isinstance(ops, list) or not ops:
        raise RecordError(f"{where}: no reverse patch")
    first = ops[0]
    guard_path = f"/spec/template/metadata/annotations/{_escape(SESSION_ANNOTATION)}"
    if not (isinstance(first, dict) and first.get("op") == "test" and first.get("path") == guard_path):
        raise RecordError(f"{where}: the reverse patch does not begin by testing that the workload is still bridged")
    if first.get("value") != record.session:
        raise RecordError(
            f"{where}: the reverse patch tests for session {first.get('value')!r}, not {record.session!r}"
        )
    _check_ops(ops, _ALLOWED, where=where, what="the reverse patch")
    # The forward patch steers a restore that keeps someone's changes: it may only name what a
    # bridge changes (its tests of uid and generation are not used for that, and not checked).
    forward = getattr(record, "forward", None) or []
    if not isinstance(forward, list):
        raise RecordError(f"{where}: the forward patch is not a list of operations")
    _check_ops([op for op in forward if not (isinstance(op, dict) and op.get("op") == "test")], _ALLOWED,
               where=where, what="the forward patch")  # fmt: skip
    _check_related(record, where=where)


def _check_ops(ops: list[Any], allowed: tuple[re.Pattern[str], ...], *, where: str, what: str) -> None:
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in _OPS or not isinstance(op.get("path"), str):
            raise RecordError(f"{where}: {op!r} is not a test/add/remove/replace operation")
        if not any(pattern.match(op["path"]) for pattern in allowed):
            raise RecordError(f"{where}: {what} touches {op['path']}, which a bridge never changes")


def _check_related(record: Any, *, where: str) -> None:
    """The HPAs a bridge pinned, and the pods it rolls (StatefulSet OnDelete), as :mod:`.workloads` writes them."""
    mark = f"/metadata/annotations/{_escape(SESSION_ANNOTATION)}"
    for related in getattr(record, "related", None) or []:
        if not isinstance(related, dict) or related.get("kind") != "HorizontalPodAutoscaler":
            raise RecordError(f"{where}: related object {related!r} is not a HorizontalPodAutoscaler")
        name, ops = related.get("name"), related.get("reverse_patch")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RecordError(f"{where}: related HorizontalPodAutoscaler {name!r} is not an object name")
        if not isinstance(ops, list) or not ops:
            raise RecordError(f"{where}: the reverse patch of HorizontalPodAutoscaler {name} does not test our mark")
        first = ops[0]
        if not (isinstance(first, dict) and first.get("op") == "test" and first.get("path") == mark):
            raise RecordError(f"{where}: the reverse patch of HorizontalPodAutoscaler {name} does not test our mark")
        if first.get("value") != record.session:
            raise RecordError(f"{where}: HorizontalPodAutoscaler {name}: its reverse patch tests another session")
        _check_ops(ops, _HPA_ALLOWED, where=where, what=f"the reverse patch of HorizontalPodAutoscaler {name}")
    for pod in getattr(record, "roll_pods", None) or []:
        ordinal = pod[len(record.name) + 1 :] if isinstance(pod, str) and pod.startswith(f"{record.name}-") else ""
        if record.kind != "StatefulSet" or not ordinal.isdigit():
            raise RecordError(f"{where}: pod {pod!r} to roll is not one of StatefulSet {record.name}'s")


def check_pod_matches(record: Any, current: Mapping[str, Any], *, where: str) -> None:
    """A bare Pod is re-created from ``record`` only in place of the agent pod made from it.

    ``current`` is the live pod: every container but the agent's, and every volume but our
    code volume, must equal the record's original.
    """
    annotations = (current.get("metadata") or {}).get("annotations") or {}
    if annotations.get(SESSION_ANNOTATION) != record.session:
        raise RecordError(f"{where}: pod {record.name} is not bridged by session {record.session!r}")
    agent = annotations.get(CONTAINER_ANNOTATION)
    live, recorded = current.get("spec") or {}, record.original.get("spec") or {}

    def others(spec: Mapping[str, Any]) -> list[Any]:
        return [c for c in spec.get("containers") or [] if c.get("name") != agent]

    def volumes(spec: Mapping[str, Any]) -> list[Any]:
        return [v for v in spec.get("volumes") or [] if v.get("name") != CODE_VOLUME]

    def names(items: list[Any]) -> list[Any]:
        return [(c.get("name"), c.get("image")) for c in items]

    if names(others(live)) != names(others(recorded)) or [v.get("name") for v in volumes(live)] != [
        v.get("name") for v in volumes(recorded)
    ]:
        raise RecordError(
            f"{where}: the recorded Pod does not match the agent pod {record.name} it would replace "
            "(other containers or volumes differ): not re-created"
        )
