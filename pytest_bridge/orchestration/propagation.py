"""Header-propagation check: which hop of a call chain dropped ``kubernetes-route-as``?

While a check runs, every observed service of the namespace sits behind a router (the route
pod asks the routing manager for that with an annotation), and each router counts requests by
(effective route, header received or not, caller address). The check sends one request with
the route header into the entry service and compares the counts before and after:

* a service *received the header* if its router saw requests for the route (or it is the
  entry, which we called with it);
* a caller *dropped it* towards service Y if Y's router saw requests without any route from
  the caller's pod address in that window, while the caller itself received the header.

Callers are named by pod address: a pod of a Service (by the Service's original selector), or
a route pod / agent of this session (the local process's calls leave through those).
:func:`analyse` is pure; :func:`check` does the cluster part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_bridge_agent.labels import SESSION_LABEL
from pytest_bridge_routing import objects as ro

from pytest_bridge.cluster import kube
from pytest_bridge.core.errors import BridgeError, ConnectError
from pytest_bridge.orchestration.isolation import endpoints_are_router

if TYPE_CHECKING:
    from pytest_bridge.orchestration.isolation import Route
    from pytest_bridge.orchestration.session import BridgeSession

__all__ = ["Drop", "PropagationResult", "analyse", "check"]

StatsKey = tuple[str, bool, str]  # (effective route, header received, caller address)


@dataclass(frozen=True)
class Drop:
    caller: str
    callee: str
    requests: int

    def describe(self) -> str:
        return f"service {self.caller} received the request with the header, but its call to {self.callee} did not carry it"


@dataclass
class PropagationResult:
    route: str
    entry: str
    reached: list[str] = field(default_factory=list)  # services that received the route, in chain order
    dropped: list[Drop] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)
    status: int | None = None  # the entry's HTTP status

    @property
    def ok(self) -> bool:
        return not self.dropped

    def describe(self) -> str:
        head = f"route {self.route} from {self.entry}: header reached {', '.join(self.reached) or 'nothing'}"
        if self.ok:
            return head + "; no hop dropped it"
        return head + "; " + "; ".join(d.describe() for d in self.dropped)


def counts(stats: Mapping[str, Any]) -> dict[StatsKey, int]:
    """A router's ``/stats`` answer as counts by key."""
    result: dict[StatsKey, int] = {}
    for entry in stats.get("entries") or []:
        key = (str(entry.get("route") or ""), bool(entry.get("header")), str(entry.get("remote_addr") or ""))
        result[key] = result.get(key, 0) + int(entry.get("count") or 0)
    return result


def delta(before: Mapping[StatsKey, int], after: Mapping[StatsKey, int]) -> dict[StatsKey, int]:
    return {key: n - before.get(key, 0) for key, n in after.items() if n - before.get(key, 0) > 0}


def analyse(
    route: str, entry: str, deltas: Mapping[str, Mapping[StatsKey, int]], owner_of: Mapping[str, str]
) -> PropagationResult:
    """What the routers saw during one probe, as "reached" services and dropping hops."""
    received = {entry} | {svc for svc, seen in deltas.items() if any(key[0] == route for key in seen)}
    # The local process of a routed service received what its router sent to the route.
    with_header = received | {f"{service} (local)" for service in received}
    dropped: dict[tuple[str, str], int] = {}
    for callee, seen in deltas.items():
        for (effective, _header, address), n in seen.items():
            if effective:
                continue
            caller = owner_of.get(address, address)
            if caller in with_header and caller != callee:
                dropped[(caller, callee)] = dropped.get((caller, callee), 0) + n
    order = _chain_order(entry, deltas, owner_of)
    reached = sorted(received, key=lambda s: (order.get(s, len(order)), s))
    drops = [Drop(caller, callee, n) for (caller, callee), n in dropped.items()]
    drops.sort(key=lambda d: (order.get(d.caller, len(order)), d.callee))
    return PropagationResult(route=route, entry=entry, reached=reached, dropped=drops, observed=sorted(deltas))


def _chain_order(
    entry: str, deltas: Mapping[str, Mapping[StatsKey, int]], owner_of: Mapping[str, str]
) -> dict[str, int]:
    """Breadth-first order of services from ``entry`` along observed caller -> callee edges."""
    edges: dict[str, set[str]] = {}
    for callee, seen in deltas.items():
        for _route, _header, address in seen:
            edges.setdefault(owner_of.get(address, address), set()).add(callee)
    order, queue = {entry: 0}, [entry]
    while queue:
        node = queue.pop(0)
        for callee in sorted(edges.get(node, ())):
            if callee not in order:
                order[callee] = len(order)
                queue.append(callee)
    return order


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_owners(
    services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], session: str
) -> dict[str, str]:
    """Pod IP -> the service it belongs to (original selectors), or ``<svc> (local)`` for our agents."""
    selectors = {str(s["metadata"]["name"]): ro.original_selector(s) or {} for s in services if not ro.is_ours(s)}
    owners: dict[str, str] = {}
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if not ip:
            continue
        if labels.get(SESSION_LABEL) == session:
            service = labels.get(ro.LABEL_ROUTE_SERVICE) or next(
                (name for name, sel in selectors.items() if _matches(sel, labels)), "agent"
            )
            owners[ip] = f"{service} (local)"
            continue
        for name, selector in sorted(selectors.items()):
            if _matches(selector, labels):
                owners[ip] = name
                break
    return owners


# --- the cluster part ----------------------------------------------------------------------------


def _http_port(service: Mapping[str, Any]) -> int | None:
    from pytest_bridge_routing import nginxconf  # noqa: PLC0415

    for port in (service.get("spec") or {}).get("ports") or []:
        try:
            if nginxconf.protocol_for(port) == "http":
                return int(port["port"])
        except ValueError:
            continue
    return None


def _router_pod(k: kube.Kube, service: str) -> str | None:
    selector = f"{ro.COMPONENT}=router,{ro.LABEL_ROUTER}={service}"
    pods: Any = kube.call("list routers", k.core.list_namespaced_pod, k.namespace, label_selector=selector)
    for pod in pods.items:
        if pod.metadata.deletion_timestamp is None and any(
            c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
        ):
            return str(pod.metadata.name)
    return None


def _stats(k: kube.Kube, pod: str) -> dict[StatsKey, int]:
    body = kube.pod_proxy_json(k, pod, ro.STATS_PORT, "stats")
    return counts(body if isinstance(body, dict) else {})


def _probe(route: Route, host: str, port: int, path: str, timeout: float) -> int | None:
    """One request with the route header into ``host:port``, dialled in-cluster; the HTTP status."""
    import asyncio  # noqa: PLC0415

    assert route.tunnel is not None
    t = route.tunnel.tunnel
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{ro.ROUTE_HEADER}: {route.name}\r\n"
        "User-Agent: pytest-bridge-propagation-check\r\nConnection: close\r\n\r\n"
    ).encode()

    async def go() -> bytes:
        reader, writer = await t.open_stream(host, port)
        try:
            writer.write(request)
            async with asyncio.timeout(timeout):
                return await reader.read_all()
        finally:
            writer.close()

    reply = route.tunnel._call(go(), timeout + 5)
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def check(
    bs: BridgeSession,
    route: Route,
    entry: str,
    *,
    path: str = "/",
    port: int | None = None,
    services: Sequence[str] | None = None,
    timeout: float = 60.0,
    report: Callable[[str], None] = lambda _: None,
) -> PropagationResult:
    """Observe the namespace's HTTP services, send one request with the route into ``entry``, analyse."""
    k = bs.client
    ns = k.namespace
    listed: Any = kube.call("list services", k.core.list_namespaced_service, ns)
    all_services = {s["metadata"]["name"]: s for s in (k.to_dict(x) for x in listed.items) if not ro.is_ours(s)}
    if entry not in all_services:
        raise BridgeError(f"propagation check: entry service {entry!r} not found in namespace {ns!r}")
    observe = (
        sorted(services)
        if services is not None
        else sorted(name for name, s in all_services.items() if _http_port(s) is not None and ro.original_selector(s))
    )
    observe = [name for name in observe if name != route.service]
    entry_port = port or _http_port(all_services[entry])
    if entry_port is None:
        raise BridgeError(f"propagation check: service {entry!r} has no HTTP port; pass port=")
    annotation = {"metadata": {"annotations": {ro.ANN_OBSERVE: ",".join(observe)}}}
    kube.call("ask the routing manager to observe", k.core.patch_namespaced_pod, route.pod, ns, annotation)
    watched = sorted({*observe, route.service})
    deadline = time.monotonic() + timeout
    routers: dict[str, str] = {}
    while True:
        current: Any = kube.call("list services", k.core.list_namespaced_service, ns)
        switched = {
            s.metadata.name for s in current.items if (s.spec.selector or {}) == ro.router_selector(s.metadata.name)
        }
        routers = {name: pod for name in watched if name in switched and (pod := _router_pod(k, name))}
        if set(routers) == set(watched) and all(endpoints_are_router(k, name) for name in watched):
            break
        if time.monotonic() > deadline:
            missing = sorted(set(watched) - set(routers))
            raise ConnectError(
                f"propagation check: no router became ready for {', '.join(missing)} within {timeout:.0f}s"
            )
        time.sleep(0.2)
    time.sleep(1.0)  # kube-proxy follows the endpoints within about a second
    before = {name: _stats(k, pod) for name, pod in routers.items()}
    host = f"{entry}.{ns}.svc.cluster.local"
    status = _probe(route, host, entry_port, path, timeout=30)
    time.sleep(0.5)  # routers read nginx's access log a few times a second
    after = {name: _stats(k, pod) for name, pod in routers.items()}
    pods: Any = kube.call("list pods", k.core.list_namespaced_pod, ns)
    owners = pod_owners(all_services.values(), [k.to_dict(p) for p in pods.items], bs.session_id)
    deltas = {name: delta(before[name], after[name]) for name in routers}
    result = analyse(route.name, entry, deltas, owners)
    result.status = status
    report(result.describe())
    return result
