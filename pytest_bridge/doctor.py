"""``pytest-bridge doctor SERVICE``: can this kube context bridge (or route) SERVICE? Asked, never tried.

Each check answers before anything changes, with what connect itself would ask:

* **service**: the Service, its pods and their workload, and the container and ports a bridge
  would use (the plan); whether another session bridges it now;
* **workload**: what its own controllers would do (paused, partitioned, OnDelete, an HPA);
* **permissions**: a SelfSubjectAccessReview per verb a bridge needs, and per verb a route needs;
* **policy**: the agent's pod (the patched template) and the restore guard's pod, and the code
  ConfigMap, created with ``dryRun=All`` (Pod Security, webhooks, ValidatingAdmissionPolicies);
* **images**: whether a node already has the agent and routing images, or a pod runs them;
* **names**: which name mapping ``--bridge-name-mapping`` gives on this machine; the transport.

Nothing in the cluster changes: reads, access reviews and dry-run creates only (the e2e test
compares every object of the namespace before and after). Locally a session directory is made
and removed, as a session does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_bridge.cluster import bundle, kube, restore, workloads
from pytest_bridge.cluster.permissions import allowed, required_permissions
from pytest_bridge.core.errors import BridgeError, ForbiddenError
from pytest_bridge.core.patch import AgentSpec, agent_pod, bridged_session, token_sha256
from pytest_bridge.local import hosts
from pytest_bridge.orchestration import isolation
from pytest_bridge.orchestration.connection import Connection
from pytest_bridge.orchestration.session import BridgeSession, session_liveness
from pytest_bridge.settings import BridgeSettings, NameMappingMode
from pytest_bridge.transport.kubectl_forward import kubectl_or_none

__all__ = ["Finding", "diagnose", "render"]

OK, FAIL, UNKNOWN = "ok", "FAIL", "?"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # OK, FAIL or UNKNOWN (could not tell without a change)
    detail: str


def _missing(k: kube.Kube, needed: list[Any]) -> list[str]:
    return [f"{p[0]} {(p[1] + '/') if p[1] else ''}{p[2]}" for p in needed if not allowed(k, *p)]


def _images(k: kube.Kube, wanted: dict[str, str]) -> list[Finding]:
    """Whether each image is already on a node (nodes' status lists them) or runs in a pod here."""
    present: set[str] = set()
    readable = True
    try:
        nodes: Any = kube.call("list nodes", k.core.list_node, verb="list", resource="nodes")
        for node in nodes.items:
            for image in node.status.images or []:
                present.update(image.names or [])
    except BridgeError:
        readable = False
    try:
        pods: Any = kube.call("list pods", k.core.list_namespaced_pod, k.namespace)
        for pod in pods.items:
            for status in pod.status.container_statuses or []:
                if status.image_id:
                    present.add(status.image)
    except BridgeError:
        pass
    findings = []
    for what, image in wanted.items():
        variants = {image, f"docker.io/library/{image}", f"docker.io/{image}"}
        if variants & present:
            findings.append(Finding(f"image {what}", OK, f"{image} is present on the cluster's nodes"))
        else:
            where = "" if readable else " (nodes are not readable here)"
            detail = (
                f"{image} is on no node yet{where}: the first pod pulls it; if nodes cannot reach its registry, "
                "mirror it and pass --bridge-agent-image / --bridge-routing-image"
            )
            findings.append(Finding(f"image {what}", UNKNOWN, detail))
    return findings


def diagnose(settings: BridgeSettings, service: str, *, k: kube.Kube | None = None) -> list[Finding]:
    """Every check for ``service`` (see the module docstring); never raises for a failed check."""
    found: list[Finding] = []

    def check(name: str, run: Callable[[], str]) -> bool:
        try:
            found.append(Finding(name, OK, run()))
            return True
        except BridgeError as exc:
            found.append(Finding(name, FAIL, str(exc)))
            return False

    with BridgeSession(settings) as session:
        if k is not None:
            session.use_client(k)
        try:
            client = session.client
        except BridgeError as exc:
            return [Finding("kubeconfig", FAIL, str(exc))]
        found.append(Finding("context", OK, f"context {client.context!r}, namespace {client.namespace!r}"))

        def namespace() -> str:
            session.check_namespace(client)
            return f"{client.namespace!r} exists"

        if not check("namespace", namespace):
            return found
        plan_holder: list[Any] = []

        def plan() -> str:
            plan_holder.append(session.plan_service(client, service))
            p = plan_holder[0]
            ports = ", ".join(f"{b.target_port}" for b in p.port_bindings)
            return f"{p.workload.kind} {p.workload.name}, container {p.container!r}, target ports {ports}"

        if not check("service", plan):
            return found
        the_plan = plan_holder[0]
        workload = session.read_workload(client, the_plan)
        other = bridged_session(workload)
        if other:
            found.append(_in_use(client, the_plan, other))

        def workload_check() -> str:
            workloads.check(client, the_plan, workload)
            return f"{the_plan.workload.kind} {the_plan.workload.name} can be swapped and restored"

        check("workload", workload_check)
        missing = _missing(client, required_permissions(the_plan.workload.kind, settings.code, the_plan.workload.name))
        found.append(
            Finding("permissions (bridge)", FAIL, "missing: " + ", ".join(missing) + "; see `pytest-bridge rbac`")
            if missing
            else Finding("permissions (bridge)", OK, "every verb connect and restore use is allowed")
        )
        route_missing = _missing(client, isolation.required_permissions())
        found.append(
            Finding("permissions (isolated routes)", FAIL, "missing: " + ", ".join(route_missing))
            if route_missing
            else Finding("permissions (isolated routes)", OK, "every verb a route uses is allowed")
        )
        found += _policy(session, client, the_plan, workload, settings)
        found += _images(client, {"agent": settings.agent_image, "routing": settings.routing_image})
    found.append(names_finding(settings))
    kubectl = kubectl_or_none()
    transport = settings.transport if settings.transport != "auto" else ("kubectl" if kubectl else "websocket")
    found.append(Finding("transport", OK, transport + (f" ({kubectl})" if transport == "kubectl" else "")))
    return found


def _in_use(k: kube.Kube, plan: Any, other: str) -> Finding:
    """The workload is marked as bridged by session ``other``: by a live one (connect refuses), else
    left by a dead one (connect restores it first)."""
    what = f"{plan.workload.kind} {plan.workload.name}"
    liveness = session_liveness(k, other)
    if liveness in ("alive", "starting"):
        return Finding("in use", FAIL, f"{what} is bridged by live session {other}; wait, or use --bridge-isolate")
    if liveness == "unknown":
        return Finding("in use", UNKNOWN, f"{what} is bridged by session {other}, whose liveness cannot be told")
    return Finding("in use", OK, f"{what} was left bridged by dead session {other}: connect restores it first")


def names_finding(settings: BridgeSettings, *, hosts_writable: Callable[[Path], bool] | None = None) -> Finding:
    """The name mapping ``--bridge-name-mapping`` gives here; FAIL when it needs a hosts file we cannot write."""
    mechanisms = hosts.choose_mechanisms(settings.name_mapping)
    described = f"{settings.name_mapping.value}: {hosts.describe(mechanisms)}"
    target = mechanisms.system_hosts_file
    writable = hosts_writable or (lambda path: os.access(path, os.W_OK))
    if target is not None and not writable(target):
        return Finding("names", FAIL, f"{described}, but {target} is not writable here: run as root or use auto")
    if settings.name_mapping is NameMappingMode.OFF:
        return Finding("names", OK, f"{described}: cluster names do not resolve here; use bridged_service.url()")
    return Finding("names", OK, described)


def _policy(
    session: BridgeSession, k: kube.Kube, plan: Any, workload: dict[str, Any], settings: BridgeSettings
) -> list[Finding]:
    """The admission checks connect makes before any change, as dry runs."""
    if not allowed(k, "create", "", "pods"):
        return [Finding("policy", UNKNOWN, "may not create pods, so the admission dry run cannot be made")]
    findings = []
    conn = Connection(plan.service, plan, key=session.session_id)
    code = bundle.build()
    pod_code = bundle.code_for(settings.code, code, restore.code_configmap_name(conn.key, code))
    agent = AgentSpec(
        image=settings.agent_image, session=conn.key, token_sha256=token_sha256(conn.token),
        exit_when_idle=settings.restore_ttl, code=pod_code,
    )  # fmt: skip
    replacement = agent_pod(workload, plan, agent) if plan.workload.kind == "Pod" else None
    try:
        session.check_policy(k, conn, workload, replacement, agent=agent, pod_code=pod_code)
        findings.append(Finding("policy", OK, "the agent's and the guard's pods are admitted (dry run)"))
    except BridgeError as exc:
        findings.append(Finding("policy", FAIL, str(exc)))
    if pod_code.configmap is not None:
        manifest = bundle.configmap(code, pod_code.configmap, k.namespace, labels={})
        try:
            kube.call(
                "create the code ConfigMap (dry run)", k.core.create_namespaced_config_map, k.namespace, manifest,
                dry_run="All", verb="create", resource="configmaps", namespace=k.namespace,
            )  # fmt: skip
            findings.append(Finding("code ConfigMap", OK, f"{len(code.data) // 1024} KiB admitted (dry run)"))
        except ForbiddenError as exc:
            findings.append(Finding("code ConfigMap", FAIL, f"{exc}; --bridge-code=image avoids it"))
        except BridgeError as exc:
            findings.append(Finding("code ConfigMap", FAIL, str(exc)))
    return findings


def render(findings: list[Finding]) -> str:
    width = max((len(f.check) for f in findings), default=0)
    lines = [f"{f.status:<4} {f.check:<{width}}  {f.detail}" for f in findings]
    failed = [f.check for f in findings if f.status == FAIL]
    lines.append(
        f"cannot bridge: {', '.join(failed)}"
        if failed
        else "can bridge: nothing in the cluster was changed to find out"
    )
    return "\n".join(lines) + "\n"
