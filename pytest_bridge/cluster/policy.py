"""Will the cluster run our pods? Asked before any change, and read from workloads after.

Clusters refuse pods by policy: Pod Security admission (``restricted``), admission webhooks
(Kyverno, Gatekeeper) and ValidatingAdmissionPolicies. A pod that a controller (ReplicaSet,
Job) creates for us is refused silently, as a condition on its owner, and a session would only
time out. So before anything changes, the pods a bridge will need — the agent in the workload's
pod template and the restore guard — are created with ``dryRun=All``: admission runs, nothing is
stored, and a refusal is one clear error naming the policy (:class:`PolicyError`). Pods we create
ourselves (route pods) are refused at once by their create. Afterwards :func:`replica_failure`
reads the refusal from a Deployment's or Job's status.

A dry-run create needs the ``create pods`` permission; without it the check is skipped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from pytest_bridge.cluster import kube
from pytest_bridge.cluster.permissions import allowed
from pytest_bridge.core.errors import ForbiddenError, PolicyError

__all__ = ["as_policy_error", "dry_run_pods", "is_policy_refusal", "pod_from_template", "replica_failure"]

_RBAC_DENIAL = re.compile(r"cannot \w+ resource")


def is_policy_refusal(message: str) -> bool:
    """Whether a 403 came from admission (a policy) rather than RBAC (a missing permission)."""
    return not _RBAC_DENIAL.search(message)


def as_policy_error(what: str, exc: ForbiddenError, advice: str = "") -> PolicyError | None:
    """A :class:`PolicyError` for a 403 that admission gave, None for an RBAC denial."""
    if not is_policy_refusal(str(exc)):
        return None
    reason = str(exc).split("forbidden (", 1)[-1].split("); grant", 1)[0]
    return PolicyError(
        f"the cluster refuses {what} by policy: {reason}. "
        + (advice or "Ask the cluster's administrator which policy applies to this namespace")
        + "; nothing was changed"
    )


def pod_from_template(template: Mapping[str, Any], name: str, namespace: str) -> dict[str, Any]:
    """A Pod manifest with a pod template's metadata and spec (what its controller would create)."""
    meta = copy.deepcopy(dict(template.get("metadata") or {}))
    meta.update({"name": name, "namespace": namespace})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(dict(template["spec"]))}


def dry_run_pods(k: kube.Kube, pods: list[tuple[str, dict[str, Any]]], advice: str = "") -> bool:
    """Dry-run create each ``(what, pod)``; PolicyError on the first one admission refuses.

    Returns False (and checks nothing) when this user may not create pods at all.
    """

    if not allowed(k, "create", "", "pods"):
        return False
    for what, pod in pods:
        ns = pod["metadata"]["namespace"]
        try:
            kube.call(
                f"check that the cluster admits {what}", k.core.create_namespaced_pod, ns, pod, dry_run="All",
                verb="create", resource="pods", namespace=ns,
            )  # fmt: skip
        except ForbiddenError as exc:
            error = as_policy_error(what, exc, advice)
            if error is None:
                raise
            raise error from exc
    return True


def replica_failure(status: Mapping[str, Any] | None) -> str | None:
    """The message of a Deployment's ``ReplicaFailure`` condition (its pods refused), if any."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return str(condition.get("message") or condition.get("reason") or "ReplicaFailure")
    return None
