"""Decide what bridging a Service means: which workload, which container, which ports.

Pure: Kubernetes objects come in as plain dicts in the API's camelCase JSON shape, a
:class:`BridgePlan` comes out. Nothing here reads the cluster, binds a socket or looks
at the local machine; whatever depends on the machine (is a local port free?) is
passed in as a function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pytest_bridge_routing.objects import record_problem

from pytest_bridge.core.errors import PlanError

__all__ = [
    "KNOWN_SIDECARS",
    "BridgePlan",
    "LocalPortSpec",
    "PortBinding",
    "ServicePort",
    "WorkloadRef",
    "check_local_port_specs",
    "check_plans_disjoint",
    "make_plan",
    "pod_template_spec",
    "workload_template_container",
]

Obj = Mapping[str, Any]
WorkloadKind = Literal["Deployment", "StatefulSet", "Pod"]

# Containers injected by meshes and platforms: never the service's own code.
KNOWN_SIDECARS: frozenset[str] = frozenset(
    {
        "istio-proxy",
        "linkerd-proxy",
        "daprd",
        "jaeger-agent",
        "nginx-proxy",
        "envoy",
        "envoy-sidecar",
        "consul-dataplane",
        "consul-connect-envoy-sidecar",
        "cloud-sql-proxy",
        "cloudsql-proxy",
        "vault-agent",
        "aws-xray-daemon",
        "datadog-agent",
        "otel-collector",
        "fluent-bit",
        "fluentd",
        "kuma-sidecar",
        "traefik-mesh-proxy",
    }
)

_UNSUPPORTED_OWNERS = {
    "DaemonSet": "a DaemonSet runs one pod per node; swapping its container would replace the service on "
    "every node at once. Bridge a Deployment-backed service instead",
    "Job": "a Job's pods run to completion and are not restarted as a long-lived server, so there is "
    "nothing stable to swap",
    "CronJob": "a CronJob's pods run to completion on a schedule, so there is nothing stable to swap",
    "ReplicaSet": "the ReplicaSet has no Deployment above it; patching a bare ReplicaSet does not roll "
    "its pods. Manage it with a Deployment",
    "ReplicationController": "ReplicationControllers are not supported; migrate the workload to a Deployment",
}


@dataclass(frozen=True)
class LocalPortSpec:
    """A requested local port: ``target_port=None`` takes the next unmapped target port.

    ``service=None`` applies to every bridged service.
    """

    local_port: int
    target_port: int | None = None
    service: str | None = None


@dataclass(frozen=True)
class WorkloadRef:
    kind: WorkloadKind
    name: str
    namespace: str
    uid: str | None = None


@dataclass(frozen=True)
class ServicePort:
    """One TCP port of the Service, its target port resolved to a number."""

    port: int
    target_port: int
    name: str | None = None
    protocol: str = "TCP"
    target_port_name: str | None = None  # set when the Service names the target port
    app_protocol: str | None = None


@dataclass(frozen=True)
class PortBinding:
    target_port: int
    local_port: int


@dataclass(frozen=True)
class BridgePlan:
    service: str
    namespace: str
    workload: WorkloadRef
    container: str
    container_index: int
    service_ports: tuple[ServicePort, ...]
    target_ports: tuple[int, ...]
    port_bindings: tuple[PortBinding, ...]
    ignored_ports: tuple[Mapping[str, Any], ...] = ()  # non-TCP Service ports, as given
    replicas: int | None = None  # the workload's spec.replicas before the bridge (None: unset)
    pod_names: tuple[str, ...] = ()

    def local_port(self, target_port: int) -> int:
        for binding in self.port_bindings:
            if binding.target_port == target_port:
                return binding.local_port
        raise KeyError(target_port)


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _name(obj: Obj) -> str:
    return str(_meta(obj).get("name", ""))


def _controller_ref(obj: Obj) -> Mapping[str, Any] | None:
    refs = _meta(obj).get("ownerReferences") or []
    controllers = [ref for ref in refs if ref.get("controller")]
    if controllers:
        return controllers[0]  # type: ignore[no-any-return]
    return refs[0] if refs else None


def pod_template_spec(workload: Obj) -> Mapping[str, Any]:
    """The pod spec inside a Deployment/StatefulSet template, or a Pod's own spec."""
    if workload.get("kind") == "Pod":
        return workload.get("spec") or {}
    return ((workload.get("spec") or {}).get("template") or {}).get("spec") or {}


def _selector_matches(selector: Mapping[str, str], pod: Obj) -> bool:
    labels = _meta(pod).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def _find_owner(ref: Mapping[str, Any], owners: Sequence[Obj]) -> Obj | None:
    for owner in owners:
        meta = _meta(owner)
        if ref.get("uid") and meta.get("uid"):
            if ref["uid"] == meta["uid"]:
                return owner
        elif owner.get("kind") == ref.get("kind") and meta.get("name") == ref.get("name"):
            return owner
    return None


def _workload_for_pod(pod: Obj, owners: Sequence[Obj], service: str) -> Obj:
    """Walk the controller chain Pod → ReplicaSet → Deployment (or StatefulSet, or the bare Pod)."""
    ref = _controller_ref(pod)
    if ref is None:
        return pod
    kind = str(ref.get("kind"))
    if kind == "ReplicaSet":
        replica_set = _find_owner(ref, owners)
        if replica_set is None:
            raise PlanError(
                f"pod {_name(pod)!r} of service {service!r} is owned by ReplicaSet {ref.get('name')!r}, "
                "which was not provided; the cluster layer must pass the owner chain"
            )
        rs_ref = _controller_ref(replica_set)
        if rs_ref is None:
            raise PlanError(f"cannot bridge service {service!r}: {_UNSUPPORTED_OWNERS['ReplicaSet']}")
        if rs_ref.get("kind") != "Deployment":
            ref, kind = rs_ref, str(rs_ref.get("kind"))
        else:
            deployment = _find_owner(rs_ref, owners)
            if deployment is None:
                raise PlanError(
                    f"ReplicaSet {_name(replica_set)!r} is owned by Deployment {rs_ref.get('name')!r}, "
                    "which was not provided; the cluster layer must pass the owner chain"
                )
            return deployment
    if kind == "StatefulSet":
        stateful_set = _find_owner(ref, owners)
        if stateful_set is None:
            raise PlanError(
                f"pod {_name(pod)!r} is owned by StatefulSet {ref.get('name')!r}, which was not provided; "
                "the cluster layer must pass the owner chain"
            )
        return stateful_set
    reason = _UNSUPPORTED_OWNERS.get(
        kind, f"pods owned by a {kind} are not supported (only Deployments, StatefulSets and bare Pods)"
    )
    raise PlanError(f"cannot bridge service {service!r}: its pods are owned by {kind} {ref.get('name')!r}; {reason}")


def _container_ports(container: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [p for p in container.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]


def _serves(container: Mapping[str, Any], target: int | str) -> bool:
    for port in _container_ports(container):
        if isinstance(target, int) and port.get("containerPort") == target:
            return True
        if isinstance(target, str) and port.get("name") == target:
            return True
    return False


def _describe(containers: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for c in containers:
        ports = ",".join(str(p.get("containerPort")) for p in c.get("ports") or [])
        sidecar = " (sidecar)" if c.get("name") in KNOWN_SIDECARS else ""
        parts.append(f"{c.get('name')}{sidecar}" + (f" [ports {ports}]" if ports else ""))
    return ", ".join(parts)


def _choose_container(
    containers: Sequence[Mapping[str, Any]],
    targets: Sequence[int | str],
    explicit: str | None,
    service: str,
) -> int:
    names = [str(c.get("name")) for c in containers]
    if explicit is not None:
        if explicit not in names:
            raise PlanError(
                f"container {explicit!r} (from --bridge-container) is not in the pods of service "
                f"{service!r}; containers: {_describe(containers)}"
            )
        return names.index(explicit)
    candidates = [i for i, c in enumerate(containers) if c.get("name") not in KNOWN_SIDECARS]
    serving = [i for i in candidates if any(_serves(containers[i], t) for t in targets)]
    if len(serving) > 1:
        # Prefer the one container that serves every target port, if there is exactly one.
        full = [i for i in serving if all(_serves(containers[i], t) for t in targets)]
        serving = full if len(full) == 1 else serving
    if len(serving) == 1:
        return serving[0]
    if not serving and len(candidates) == 1:
        return candidates[0]
    why = "several containers serve its target ports" if serving else "no single container serves its target ports"
    if not candidates:
        why = "every container is a known sidecar"
    raise PlanError(
        f"cannot choose the container to replace for service {service!r}: {why}; containers: "
        f"{_describe(containers)}. Pass --bridge-container={service}=NAME"
    )


def _service_ports(service_obj: Obj, service: str) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    ports = list((service_obj.get("spec") or {}).get("ports") or [])
    if not ports:
        raise PlanError(f"service {service!r} has no ports; there is no traffic to bridge")
    tcp = [p for p in ports if (p.get("protocol") or "TCP") == "TCP"]
    other = [p for p in ports if (p.get("protocol") or "TCP") != "TCP"]
    if not tcp:
        protocols = sorted({str(p.get("protocol")) for p in other})
        raise PlanError(f"service {service!r} has only {'/'.join(protocols)} ports; the bridge tunnels TCP only")
    return tcp, other


def _resolve_targets(
    tcp_ports: Sequence[Mapping[str, Any]], container: Mapping[str, Any], service: str
) -> list[ServicePort]:
    resolved = []
    for port in tcp_ports:
        number = int(port["port"])
        target = port.get("targetPort", number)
        target_name: str | None = None
        if isinstance(target, str) and not target.isdigit():
            target_name = target
            matches = [p for p in _container_ports(container) if p.get("name") == target]
            if not matches:
                raise PlanError(
                    f"service {service!r} port {port.get('name') or number} targets the named port "
                    f"{target!r}, which container {container.get('name')!r} does not declare; declared: "
                    f"{_describe([container])}. Fix the Service or pass --bridge-container"
                )
            target_number = int(matches[0]["containerPort"])
        else:
            target_number = int(target)
        resolved.append(
            ServicePort(
                port=number,
                target_port=target_number,
                name=port.get("name") or None,
                protocol="TCP",
                target_port_name=target_name,
                app_protocol=port.get("appProtocol"),
            )
        )
    return resolved


def _bind_ports(
    service: str,
    target_ports: Sequence[int],
    specs: Iterable[LocalPortSpec],
    choose_local_port: Callable[[int], int],
) -> tuple[PortBinding, ...]:
    bindings: dict[int, int] = {}
    positional: list[LocalPortSpec] = []
    for spec in specs:
        if spec.service not in (None, service):
            continue
        if spec.target_port is None:
            positional.append(spec)
            continue
        if spec.target_port not in target_ports:
            if spec.service is None:
                continue  # an unscoped TARGET=LOCAL may be meant for another bridged service
            raise PlanError(
                f"--bridge-local-port {service}:{spec.target_port}={spec.local_port}: service {service!r} "
                f"has no target port {spec.target_port}; its target ports are "
                f"{', '.join(map(str, target_ports))}"
            )
        bindings[spec.target_port] = spec.local_port
    unmapped = [t for t in target_ports if t not in bindings]
    if len(positional) > len(unmapped):
        raise PlanError(
            f"{len(positional)} positional --bridge-local-port values for service {service!r}, but only "
            f"{len(unmapped)} target port(s) left to map ({', '.join(map(str, unmapped)) or 'none'}); use "
            "TARGET=LOCAL"
        )
    for target, spec in zip(unmapped, positional, strict=False):
        bindings[target] = spec.local_port
    for target in target_ports:
        if target not in bindings:
            bindings[target] = choose_local_port(target)
    by_local: dict[int, int] = {}
    for target in target_ports:
        local = bindings[target]
        if local in by_local:
            raise PlanError(
                f"service {service!r}: target ports {by_local[local]} and {target} both map to local port "
                f"{local}; give each a distinct --bridge-local-port"
            )
        by_local[local] = target
    return tuple(PortBinding(target, bindings[target]) for target in target_ports)


def make_plan(
    service_obj: Obj,
    pods: Sequence[Obj],
    owners: Sequence[Obj] = (),
    *,
    container: str | None = None,
    local_ports: Iterable[LocalPortSpec] = (),
    choose_local_port: Callable[[int], int] = lambda target: target,
) -> BridgePlan:
    """Plan the bridge of ``service_obj``.

    ``pods`` are the pods the Service selects; ``owners`` the objects of their owner
    chain (ReplicaSets, Deployments, StatefulSets), in any order. ``container`` is
    the explicitly requested container. ``choose_local_port(target)`` picks the local
    port for a target port without an explicit mapping: the I/O layer returns the same
    number if it is free, else a free one.
    """
    service = _name(service_obj)
    namespace = str(_meta(service_obj).get("namespace") or "default")
    spec = service_obj.get("spec") or {}
    if spec.get("type") == "ExternalName":
        raise PlanError(
            f"service {service!r} is an ExternalName alias for {spec.get('externalName')!r}; it has no pods "
            "to replace. Bridge the service that actually runs the code"
        )
    problem = record_problem(service_obj)  # isolated routes' record of its selector, damaged
    if problem:
        raise PlanError(f"cannot bridge service {service!r}: {problem}")
    selector = spec.get("selector") or {}
    if not selector:
        raise PlanError(
            f"service {service!r} has no selector: its endpoints are managed by hand, so there is no "
            "workload to replace. Bridge a service with a pod selector"
        )
    tcp_ports, other_ports = _service_ports(service_obj, service)
    selected = [p for p in pods if _selector_matches(selector, p)]
    live = [p for p in selected if not _meta(p).get("deletionTimestamp")] or selected
    if not live:
        raise PlanError(
            f"service {service!r} selects no pods in namespace {namespace!r} (selector {dict(selector)}); "
            "deploy the workload, or check the selector, then retry"
        )
    workloads: dict[tuple[str, str], Obj] = {}
    for pod in live:
        workload = _workload_for_pod(pod, owners, service)
        workloads[(str(workload.get("kind") or "Pod"), _name(workload))] = workload
    if len(workloads) > 1:
        listed = ", ".join(f"{kind}/{name}" for kind, name in sorted(workloads))
        if all(kind == "Pod" for kind, _ in workloads):
            raise PlanError(
                f"service {service!r} selects {len(workloads)} bare pods ({listed}); the bridge can replace "
                "only one. Scale down to one pod or put them under a Deployment"
            )
        raise PlanError(
            f"service {service!r} selects pods of several workloads ({listed}); the bridge replaces one "
            "workload. Narrow the Service's selector"
        )
    ((kind, workload_name), workload) = next(iter(workloads.items()))
    if kind not in ("Deployment", "StatefulSet", "Pod"):
        raise PlanError(f"cannot bridge service {service!r}: unsupported workload kind {kind}")
    containers = list(pod_template_spec(workload).get("containers") or [])
    if not containers:
        raise PlanError(f"{kind} {workload_name!r} has no containers")
    targets: list[int | str] = []
    for port in tcp_ports:
        target = port.get("targetPort", port.get("port"))
        targets.append(target if isinstance(target, str) and not target.isdigit() else int(target))
    index = _choose_container(containers, targets, container, service)
    service_ports = _resolve_targets(tcp_ports, containers[index], service)
    target_ports = tuple(dict.fromkeys(p.target_port for p in service_ports))
    replicas = (workload.get("spec") or {}).get("replicas") if kind != "Pod" else None
    meta = _meta(workload)
    return BridgePlan(
        service=service,
        namespace=namespace,
        workload=WorkloadRef(
            kind=kind,  # type: ignore[arg-type]
            name=workload_name,
            namespace=str(meta.get("namespace") or namespace),
            uid=meta.get("uid"),
        ),
        container=str(containers[index].get("name")),
        container_index=index,
        service_ports=tuple(service_ports),
        target_ports=target_ports,
        port_bindings=_bind_ports(service, target_ports, local_ports, choose_local_port),
        ignored_ports=tuple(other_ports),
        replicas=int(replicas) if replicas is not None else None,
        pod_names=tuple(sorted(_name(p) for p in live)),
    )


def check_plans_disjoint(plans: Sequence[BridgePlan]) -> None:
    """Several bridged services must not share a workload (one agent per workload)."""
    seen: dict[tuple[str, str, str], str] = {}
    for plan in plans:
        key = (plan.workload.namespace, plan.workload.kind, plan.workload.name)
        if key in seen:
            raise PlanError(
                f"services {seen[key]!r} and {plan.service!r} select the same {plan.workload.kind} "
                f"{plan.workload.name!r}; bridge only one of them (its pods serve both)"
            )
        seen[key] = plan.service


def check_local_port_specs(plans: Sequence[BridgePlan], specs: Iterable[LocalPortSpec]) -> None:
    """Every unscoped ``TARGET=LOCAL`` must match a target port of some bridged service.

    :func:`make_plan` skips unscoped mappings it does not recognise (they may be meant for
    another bridged service); this catches the ones no service claims, typos included.
    """
    targets = {port for plan in plans for port in plan.target_ports}
    for spec in specs:
        if spec.service is None and spec.target_port is not None and spec.target_port not in targets:
            listed = "; ".join(f"{p.service}: {', '.join(map(str, p.target_ports))}" for p in plans)
            raise PlanError(
                f"--bridge-local-port {spec.target_port}={spec.local_port}: no bridged service has target "
                f"port {spec.target_port} ({listed or 'no services'}); use one of those target ports"
            )


def workload_template_container(workload: dict[str, Any], plan: BridgePlan) -> dict[str, Any]:
    """The bridged container as ``workload`` (a Deployment, StatefulSet or Pod) declares it."""
    spec = workload["spec"] if workload.get("kind") == "Pod" else workload["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][plan.container_index]
    return container
