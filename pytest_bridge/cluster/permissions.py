"""What a session may do in its namespace, asked of the API server (SelfSubjectAccessReview).

The permissions connect, the guard and isolated routes need are listed next to the code that
uses them; this module checks them before any change and names the shipped Role that grants
each missing one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pytest_bridge.cluster import kube
from pytest_bridge.core import rbac, timing
from pytest_bridge.core.errors import ForbiddenError

__all__ = ["allowed", "required_permissions", "required_permissions_check"]


def required_permissions(
    workload_kind: str, code: str = "configmap", workload_name: str | None = None
) -> list[rbac.Permission]:
    """(verb, API group, resource[, name]) that connect and disconnect use for a workload of this kind.

    ``code`` is the code delivery (settings ``code``): "configmap" ships it in a ConfigMap. What the
    guard's Role grants is here too: Kubernetes lets us grant only what we hold. No Secrets: the
    restore record is a ConfigMap and the env is imported from the agent (see bridge-user.yaml).
    """
    workload = {"Deployment": "deployments", "StatefulSet": "statefulsets"}.get(workload_kind)
    needed: list[rbac.Permission] = [
        ("get", "", "pods"),
        ("list", "", "pods"),
        ("get", "", "pods/portforward"),  # the WebSocket upgrade is a GET
        ("create", "", "pods/portforward"),
        ("list", "discovery.k8s.io", "endpointslices"),
        ("create", "batch", "jobs"),
        ("get", "batch", "jobs"),  # the guard's Role: its own Job
        ("patch", "batch", "jobs"),
        ("delete", "batch", "jobs"),
        ("create", "", "configmaps"),  # the restore record
        ("get", "", "configmaps"),  # the guard's Role: its record
        ("list", "", "configmaps"),  # records of dead sessions
        ("create", "", "serviceaccounts"),
        ("create", "rbac.authorization.k8s.io", "roles"),
        ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ]
    if workload is None:
        needed += [("create", "", "pods"), ("delete", "", "pods")]
    elif workload_name:
        needed += [("get", "apps", workload, workload_name), ("patch", "apps", workload, workload_name)]
    else:
        needed += [("get", "apps", workload), ("patch", "apps", workload)]
    return needed


@timing.timed("permission checks")
def required_permissions_check(k: kube.Kube, needed: Iterable[rbac.Permission], *, what: str, hint: str = "") -> None:
    """ForbiddenError naming every permission of ``needed`` that we may not use, and which shipped
    Role grants it (``hint`` is added to the message); else nothing."""
    missing = [permission for permission in needed if not allowed(k, *permission)]
    if not missing:
        return
    sources: dict[str, list[str]] = {}
    for permission in missing:
        sources.setdefault(rbac.source_of(permission) or "no Role pytest-bridge ships", []).append(
            rbac.describe(permission)
        )
    granted = "; ".join(f"{', '.join(names)}: granted by {source}" for source, names in sources.items())
    raise ForbiddenError(
        f"missing permissions in namespace {k.namespace!r} to {what}: "
        f"{', '.join(rbac.describe(p) for p in missing)}; nothing was changed. {granted}" + (f". {hint}" if hint else ""),
        verb=missing[0][0], resource=missing[0][2], namespace=k.namespace,
    )  # fmt: skip


def allowed(k: kube.Kube, verb: str, group: str, resource: str, name: str | None = None) -> bool:
    from kubernetes import client  # noqa: PLC0415

    resource, _, sub = resource.partition("/")
    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                namespace=k.namespace, verb=verb, group=group, resource=resource, subresource=sub or None, name=name
            )
        )
    )
    result: Any = kube.call("check permissions", k.authz.create_self_subject_access_review, review)
    return bool(result.status.allowed)
