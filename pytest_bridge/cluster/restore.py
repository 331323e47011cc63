"""Record-before-change and restore: the session's objects in the cluster, and the guard.

Everything a session creates hangs off one object, the **guard Job**
``pytest-bridge-guard-<session>``: its ServiceAccount, Role and RoleBinding, the code
ConfigMap and the **restore record** ConfigMap carry an ownerReference to it, so deleting
the Job (with background propagation) removes all of them. Order on connect:

1. the Job, running, with a **setup deadline** (``activeDeadlineSeconds``): if the plugin dies
   before step 4, the Job fails at the deadline and its ``ttlSecondsAfterFinished`` deletes it,
   and everything below with it (a suspended Job, as before, stayed for ever);
2. ServiceAccount, Role (least privilege: only the named objects), RoleBinding;
3. the restore record (original object, reverse JSON Patch; a ConfigMap, not a Secret: it holds
   only what the workload's own spec holds, and users need no access to Secrets), the code ConfigMap;
4. **arm** the guard: lift the deadline; only then is the workload changed.

The guard's pod starts as soon as its ServiceAccount exists and waits for the record; a record
that disappears after it was seen means the plugin restored the workload itself.
The guard (``python3 -I pytest-bridge.pyz guard`` on the Python image) polls the agent's
``/status``; when no client has been connected for the TTL it applies the reverse patch
(or re-creates a bare Pod), then deletes its Job. The builders here are pure; ``apply_*``
and ``sweep_*`` do the I/O through ``kube.call``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from typing import Any

from pytest_bridge_agent import labels, merge
from pytest_bridge_agent.runtime import Code, command, container_security, pod_security, resources

from pytest_bridge.cluster import bundle, kube, workloads
from pytest_bridge.core import faults, records
from pytest_bridge.core.errors import ConflictError, ConnectError, ForbiddenError, NotFoundError
from pytest_bridge.core.patch import SESSION_ANNOTATION, SESSION_LABEL
from pytest_bridge.core.records import RestoreRecord

__all__ = [
    "MANAGED_BY",
    "ROLE_LABEL",
    "RestoreRecord",
    "guard_job",
    "guard_name",
    "guard_rbac",
    "owned_configmap",
]

MANAGED_BY = {labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE}
# Seconds the plugin has from creating the guard Job to arming it (normally well under one).
SETUP_DEADLINE = 20
ROLE_LABEL = labels.ROLE_LABEL
# Merged restores tried when the workload keeps changing under us (each after reading it again).
MERGE_ATTEMPTS = 3
log = logging.getLogger(__name__)


def guard_name(session: str) -> str:
    return f"pytest-bridge-guard-{session}"[:63].rstrip("-")


def record_configmap_name(session: str) -> str:
    return f"pytest-bridge-restore-{session}"[:63].rstrip("-")


def _labels(session: str, role: str) -> dict[str, str]:
    return {**MANAGED_BY, SESSION_LABEL: session, ROLE_LABEL: role}


def guard_job(
    session: str, namespace: str, image: str, ttl: float, agent_status_port: int, *, code: Code | None = None
) -> dict[str, Any]:
    """The guard Job, with its setup deadline: the code's ``guard`` role on the Python image, Pod Security ``restricted``."""
    name = guard_name(session)
    code = code or Code()
    env = {
        "GUARD_SESSION": session,
        "GUARD_NAMESPACE": namespace,
        "GUARD_TTL_SECONDS": str(ttl),
        "GUARD_RECORD_CONFIGMAP": record_configmap_name(session),
        "GUARD_JOB": name,
        "GUARD_SESSION_LABEL": SESSION_LABEL,
        "GUARD_STATUS_PORT": str(agent_status_port),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(session, "guard")},
        "spec": {
            "activeDeadlineSeconds": SETUP_DEADLINE,
            "backoffLimit": 20,
            "ttlSecondsAfterFinished": 5,
            "template": {
                "metadata": {"labels": _labels(session, "guard")},
                "spec": {
                    "serviceAccountName": name,
                    "restartPolicy": "OnFailure",
                    "terminationGracePeriodSeconds": 2,
                    "enableServiceLinks": False,
                    "securityContext": pod_security(),
                    "volumes": code.volumes(),
                    "containers": [
                        {
                            "name": "guard",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": command("guard"),
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "volumeMounts": code.mounts(),
                            "securityContext": container_security(),
                            "resources": resources("10m", "32Mi", "200m", "96Mi"),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                },
            },
        },
    }


def _owner_ref(job: dict[str, Any]) -> dict[str, Any]:
    meta = job["metadata"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": meta["name"],
        "uid": meta["uid"],
        "blockOwnerDeletion": False,
    }


def guard_rbac(session: str, namespace: str, record: RestoreRecord, job: dict[str, Any]) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding of the guard: only the objects it must touch."""
    name = guard_name(session)
    owner = [_owner_ref(job)]
    meta = {"name": name, "namespace": namespace, "labels": _labels(session, "guard"), "ownerReferences": owner}
    workload_rule: dict[str, Any]
    if record.kind == "Pod":
        # A bare Pod is restored by re-creating it; `create` can't be limited by name.
        workload_rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "delete", "create"]}
    else:
        resource = {"Deployment": "deployments", "StatefulSet": "statefulsets"}[record.kind]
        workload_rule = {
            "apiGroups": ["apps"],
            "resources": [resource],
            "resourceNames": [record.name],
            "verbs": ["get", "patch"],
        }
    related = sorted({str(r["name"]) for r in record.related if r.get("kind") == workloads.HPA_KIND})
    extra_rules: list[dict[str, Any]] = []
    if related:
        extra_rules.append(
            {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "resourceNames": related,
             "verbs": ["get", "patch"]}
        )  # fmt: skip
    if record.roll_pods:
        extra_rules.append(
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "resourceNames": list(record.roll_pods),
                "verbs": ["get", "delete"],
            }
        )
    rules = [
        workload_rule,
        *extra_rules,
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [record_configmap_name(session)],
            "verbs": ["get"],
        },
        {"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": [name], "verbs": ["get", "delete"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]


def owned_configmap(
    name: str, *, session: str, namespace: str, role: str, job: dict[str, Any], data: dict[str, str]
) -> dict[str, Any]:
    """A ConfigMap of the session, owned by its guard Job; ``data`` goes in ``binaryData`` (base64)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": _labels(session, role),
            "ownerReferences": [_owner_ref(job)],
        },
        "binaryData": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


# --- I/O -------------------------------------------------------------------------------------


def code_configmap_name(session: str, code: bundle.Bundle) -> str:
    return bundle.configmap_name(code, session)


def create_guard(
    k: kube.Kube,
    record: RestoreRecord,
    *,
    image: str,
    ttl: float,
    status_port: int,
    code: bundle.Bundle,
    pod_code: Code,
) -> None:
    """Steps 1 to 4 of the module docstring; call before the workload is changed.

    When ``pod_code`` names a ConfigMap (:func:`code_configmap_name`), it is created too,
    holding ``code`` and owned by the Job, before the guard is armed.
    """
    ns, session = record.namespace, record.session
    job = guard_job(session, ns, image, ttl, status_port, code=pod_code)
    created = kube.call(
        f"create the restore guard Job in {ns!r}", k.batch.create_namespaced_job, ns, job,
        verb="create", resource="jobs", namespace=ns,
    )  # fmt: skip
    job = k.to_dict(created)
    faults.checkpoint("guard-job")
    for obj in guard_rbac(session, ns, record, job):
        kind = obj["kind"]
        create: Any = {
            "ServiceAccount": k.core.create_namespaced_service_account,
            "Role": k.rbac.create_namespaced_role,
            "RoleBinding": k.rbac.create_namespaced_role_binding,
        }[kind]
        resource = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings"}[kind]
        kube.call(f"create the guard's {kind}", create, ns, obj, verb="create", resource=resource, namespace=ns)
    faults.checkpoint("guard-rbac")
    if pod_code.configmap is not None:
        manifest = bundle.configmap(
            code, pod_code.configmap, ns, labels=_labels(session, "code"), owner=_owner_ref(job)
        )
        bundle.ship(k, manifest, code)
    record_map = owned_configmap(
        record_configmap_name(session), session=session, namespace=ns, role="restore-record", job=job,
        data={"record.json": record.to_json()},
    )  # fmt: skip
    kube.call(
        "store the restore record", k.core.create_namespaced_config_map, ns, record_map,
        verb="create", resource="configmaps", namespace=ns,
    )  # fmt: skip
    faults.checkpoint("guard-record")
    name = job["metadata"]["name"]
    armed: Any = kube.call(
        "arm the restore guard", k.batch.patch_namespaced_job, name, ns,
        [{"op": "test", "path": "/metadata/uid", "value": job["metadata"]["uid"]},
         {"op": "remove", "path": "/spec/activeDeadlineSeconds"}],
        verb="patch", resource="jobs", namespace=ns,
    )  # fmt: skip
    failed = [
        c.reason
        for c in (armed.status.conditions or [])
        if c.type in ("Failed", "FailureTarget") and c.status == "True"
    ]
    if failed:
        raise ConnectError(
            f"the restore guard {ns}/{name} failed before it was armed ({', '.join(failed)}): setting it up "
            f"took longer than {SETUP_DEADLINE}s; is the API server overloaded? Nothing was changed"
        )
    faults.checkpoint("guard-armed")


def delete_session_objects(k: kube.Kube, namespace: str, session: str) -> None:
    """Delete the guard Job and, through ownerReferences, everything hanging off it."""
    with contextlib.suppress(NotFoundError):
        kube.call(
            "delete the session's guard", k.batch.delete_namespaced_job, guard_name(session), namespace,
            propagation_policy="Background", verb="delete", resource="jobs", namespace=namespace,
        )  # fmt: skip
    # Belt and braces: anything labelled with the session that lost its owner.
    selector = f"{SESSION_LABEL}={session},{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"
    # No Secrets: a session creates none (records are ConfigMaps; tunnel tokens live only in pods, hashed).
    cleaners: tuple[tuple[Any, Any], ...] = (
        (k.core.list_namespaced_config_map, k.core.delete_namespaced_config_map),
        (k.rbac.list_namespaced_role_binding, k.rbac.delete_namespaced_role_binding),
        (k.rbac.list_namespaced_role, k.rbac.delete_namespaced_role),
        (k.core.list_namespaced_service_account, k.core.delete_namespaced_service_account),
    )
    for lister, deleter in cleaners:
        try:
            items = kube.call("list session objects", lister, namespace, label_selector=selector).items
        except ForbiddenError:
            continue  # bridge-user.yaml grants no list here: the Job's ownerReferences take them
        for item in items:
            with contextlib.suppress(NotFoundError, ForbiddenError):
                kube.call("delete a session object", deleter, item.metadata.name, namespace)


def read_records(k: kube.Kube, namespace: str, rejected: list[str] | None = None) -> list[RestoreRecord]:
    """The namespace's restore records that have the shape this plugin writes (:mod:`.records`);
    why each other one is not used is appended to ``rejected``."""
    selector = f"{ROLE_LABEL}=restore-record,{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"
    maps = kube.call(
        "list restore records", k.core.list_namespaced_config_map, namespace, label_selector=selector,
        verb="list", resource="configmaps", namespace=namespace,
    ).items  # fmt: skip
    found = []
    for record_map in maps:
        try:
            found.append(_record_from_configmap(k.to_dict(record_map), namespace))
        except records.RecordError as exc:
            if rejected is not None:
                rejected.append(str(exc))
    return found


def _record_from_configmap(record_map: dict[str, Any], namespace: str) -> RestoreRecord:
    meta = record_map.get("metadata") or {}
    where = f"restore record ConfigMap {namespace}/{meta.get('name')}"
    raw = (record_map.get("binaryData") or {}).get("record.json")
    if not raw:
        raise records.RecordError(f"{where}: no record.json")
    try:
        record = RestoreRecord.from_json(base64.b64decode(raw).decode())
    except (ValueError, TypeError) as exc:
        raise records.RecordError(f"{where}: not a restore record ({exc})") from exc
    records.check_record(record, namespace=namespace, where=where)
    records.check_owner(meta, record.session, guard_name(record.session))
    return record


def apply_restore(k: kube.Kube, record: RestoreRecord) -> list[str]:
    """Undo the bridge recorded in ``record``; a workload already restored, or deleted, is left alone.

    A workload someone changed during the session is restored with their changes kept
    (:func:`pytest_bridge_agent.merge.merge_restore`); the places kept are returned. ConflictError
    if it keeps changing under us.
    """
    kept: list[str] = []
    ns, name = record.namespace, record.name
    if record.kind == "Pod":
        try:
            current = k.to_dict(kube.call("read the agent pod", k.core.read_namespaced_pod, name, ns))
        except NotFoundError as exc:
            raise records.RecordError(
                f"pod {ns}/{name} of session {record.session} is gone: it is re-created only in place of the agent "
                "pod it was recorded from (the session's guard does that)"
            ) from exc
        records.check_pod_matches(record, current, where=f"the restore record of session {record.session}")
        with contextlib.suppress(NotFoundError):
            kube.call("delete the agent pod", k.core.delete_namespaced_pod, name, ns, grace_period_seconds=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                kube.call("wait for the agent pod to go", k.core.read_namespaced_pod, name, ns)
            except NotFoundError:
                break
            time.sleep(0.2)
        kube.call("re-create the original pod", k.core.create_namespaced_pod, ns, record.original)
        return kept
    workloads.before_restore(k, record)  # HPAs first: pinned to one replica, they would scale the restore down
    patcher = {"Deployment": k.apps.patch_namespaced_deployment, "StatefulSet": k.apps.patch_namespaced_stateful_set}
    reader = {"Deployment": k.apps.read_namespaced_deployment, "StatefulSet": k.apps.read_namespaced_stateful_set}
    resource = record.kind.lower() + "s"
    patch = record.reverse_patch
    for attempt in range(MERGE_ATTEMPTS + 1):
        try:
            current = k.to_dict(kube.call(f"read {record.kind} {name}", reader[record.kind], name, ns))
        except NotFoundError:
            log.info("%s %s/%s was deleted during the session: nothing to restore", record.kind, ns, name)
            return []
        annotations = (current.get("spec", {}).get("template", {}).get("metadata") or {}).get("annotations") or {}
        # Not carrying the session: already restored (or re-deployed by someone else), nothing of ours to undo.
        if annotations.get(SESSION_ANNOTATION) != record.session:
            break
        if attempt:
            # Someone changed it while bridged (kubectl set image, scale, apply): keep their change.
            merged = merge.merge_restore(record.original, current, record.forward)
            patch, kept = merged.patch, merged.kept
        try:
            kube.call(
                f"restore {record.kind} {ns}/{name}", patcher[record.kind], name, ns, patch,
                verb="patch", resource=resource, namespace=ns,
            )  # fmt: skip
            break
        except NotFoundError:
            return []
        except ConflictError as exc:
            if not record.forward or attempt == MERGE_ATTEMPTS:
                raise ConflictError(
                    f"{record.kind} {ns}/{name} was changed during the session and still runs the agent of session "
                    f"{record.session}; restoring it keeps changing under us ({exc}). Restore it by hand "
                    f"(`kubectl rollout undo {record.kind.lower()}/{name} -n {ns}` or re-apply its manifest), "
                    f"then run `pytest-bridge cleanup -n {ns}`"
                ) from exc
    workloads.after_restore(k, record)  # an OnDelete StatefulSet's pod still runs the agent until deleted
    return kept
