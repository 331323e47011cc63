"""What a failed test that used a bridge or a route gets in its report, and its JUnit properties.

:func:`failure_section` gathers, for the bridges and routes one test used: the phase timings of
connect (and of each route), the state of each route (its pod, and what the routing manager's
status ConfigMap says about it) and the last lines of the logs of the agent pods, the route pods,
the routers of the routed services and the routing manager. The plugin puts the text in a report
section (``pytest-bridge``), next to the captured output.

Read-only and best effort: each read has a short timeout, and a read that fails (the pod is gone,
the API server is slow, the logs are forbidden) becomes a line saying so, never an error of the
test. :func:`phase_properties` is pure: ``(name, value)`` pairs for ``record_property``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_bridge_routing import objects as ro

from pytest_bridge.cluster import kube
from pytest_bridge.core.errors import BridgeError

if TYPE_CHECKING:
    from pytest_bridge.orchestration.isolation import Route
    from pytest_bridge.orchestration.session import BridgeSession

__all__ = ["LOG_LINES", "SECTION", "failure_section", "phase_properties", "timings_text"]

SECTION = "pytest-bridge"
LOG_LINES = 40  # per container: enough for the last requests and an error, short enough to read
_TIMEOUT = (3.0, 5.0)  # connect, read: a failing test must not wait long for its report


def phase_properties(prefix: str, phases: Mapping[str, float]) -> list[tuple[str, str]]:
    """``[("pytest-bridge connect: orders: agent pod", "2.10"), ...]`` for ``record_property``."""
    return [(f"pytest-bridge {prefix}: {name}", f"{seconds:.2f}") for name, seconds in phases.items()]


def timings_text(phases: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items()) or "none recorded"


def _logs(k: kube.Kube, namespace: str, pod: str, container: str | None = None) -> str:
    try:
        text: Any = kube.call(
            f"logs of pod {pod}", k.core.read_namespaced_pod_log, pod, namespace,
            container=container, tail_lines=LOG_LINES, _request_timeout=_TIMEOUT,
        )  # fmt: skip
    except BridgeError as exc:
        return f"  (logs unavailable: {exc})"
    lines = str(text or "").rstrip("\n").splitlines()
    return "\n".join(f"  {line}" for line in lines) if lines else "  (no output)"


def _pods(k: kube.Kube, namespace: str, selector: str) -> list[Any]:
    try:
        listed: Any = kube.call(
            "list pods", k.core.list_namespaced_pod, namespace, label_selector=selector, _request_timeout=_TIMEOUT
        )
    except BridgeError:
        return []
    return list(listed.items)


def _pod_state(pod: Any) -> str:
    statuses = []
    for status in pod.status.container_statuses or []:
        state = status.state
        if state.waiting is not None:
            statuses.append(f"{status.name} waiting ({state.waiting.reason})")
        elif state.terminated is not None:
            statuses.append(f"{status.name} terminated ({state.terminated.reason}, exit {state.terminated.exit_code})")
        else:
            statuses.append(f"{status.name} running, {status.restart_count} restarts")
    return f"{pod.status.phase}; " + ", ".join(statuses) if statuses else str(pod.status.phase)


def _pod_logs(k: kube.Kube, namespace: str, pods: Iterable[Any], what: str) -> list[str]:
    out = []
    for pod in pods:
        name = pod.metadata.name
        containers = [c.name for c in pod.spec.containers]
        for container in containers:
            label = f"{what} {name}" + (f" [{container}]" if len(containers) > 1 else "")
            out += [f"{label} ({_pod_state(pod)}), last {LOG_LINES} log lines:", _logs(k, namespace, name, container)]
    return out


def _routing_status(k: kube.Kube, namespace: str, service: str, route: str) -> str:
    try:
        status: Any = kube.call(
            "read the routing status", k.core.read_namespaced_config_map, ro.STATUS_CONFIGMAP, namespace,
            _request_timeout=_TIMEOUT,
        )  # fmt: skip
    except BridgeError:
        return "the routing manager reports no problem"  # the manager deletes its ConfigMap when empty
    blocking, notes = ro.problems_for(status.data, service, route)
    parts = [f"blocked: {'; '.join(blocking)}"] if blocking else ["nothing blocks it"]
    if notes:
        parts.append(f"notes: {'; '.join(notes)}")
    return "the routing manager says " + "; ".join(parts)


def failure_section(bridges: Sequence[BridgeSession], routes: Sequence[Route]) -> str:
    """The report section of a failed test that used ``bridges`` and ``routes`` (see the module doc)."""
    out: list[str] = []
    for bridge in bridges:
        out.append(f"session {bridge.session_id}: connect phases: {timings_text(bridge.phases)}")
    for route in routes:
        out.append(f"route {route.name} of {route.service}: {timings_text(route.timings)}")
    if not bridges:
        return "\n".join(out)
    try:
        k = bridges[0].client
    except Exception as exc:  # no kubeconfig in this process (an xdist worker without one): timings only
        out.append(f"(no cluster access for logs: {exc})")
        return "\n".join(out)
    for bridge in bridges:
        for service in bridge.services.values():
            if any(r.bridged is service for r in routes) or service.agent_pod in {r.pod for r in routes}:
                continue  # a route's pod, below
            try:
                pod = kube.call(
                    f"agent pod {service.agent_pod}", k.core.read_namespaced_pod, service.agent_pod,
                    service.namespace, _request_timeout=_TIMEOUT,
                )  # fmt: skip
            except BridgeError as exc:
                out.append(f"agent of {service.name}: pod {service.agent_pod}: {exc}")
                continue
            out += _pod_logs(k, service.namespace, [pod], f"agent of {service.name}:")
    routed: set[tuple[str, str]] = set()
    for route in routes:
        out.append(
            f"route {route.name}: pod {route.pod}; {_routing_status(k, route.namespace, route.service, route.name)}"
        )
        pods = _pods(k, route.namespace, f"{ro.LABEL_ROUTE}={route.name}")
        out += _pod_logs(k, route.namespace, pods, f"route pod of {route.service}:")
        routed.add((route.namespace, route.service))
    for namespace, routed_service in sorted(routed):
        routers = _pods(k, namespace, f"{ro.COMPONENT}=router,{ro.LABEL_ROUTER}={routed_service}")
        out += _pod_logs(k, namespace, routers, f"router of {routed_service}:")
    for namespace in sorted({ns for ns, _ in routed}):
        managers = _pods(k, namespace, f"{ro.COMPONENT}=routing-manager")
        out += _pod_logs(k, namespace, managers, "routing manager")
    return "\n".join(out)
