"""``python3 -m pytest_bridge_routing.manager``: the routing manager of one namespace.

Reconciles the namespace towards what its route pods ask for (see :mod:`.objects`). All state
lives in the cluster — route pods, labelled objects and the original-selector annotation on
each switched Service — so a restarted manager carries on where the last one stopped.

Per routed service S (a service with live route pods or unclaimed warm ones — a session's pool,
``objects.LABEL_POOL`` — one a route pod asks to observe, or the backend of an Ingress while any
route or pool exists):

1. the default Service ``<S>-pbr-default`` (S's original selector) exists;
2. the router Deployment and its ConfigMap (nginx.conf rendered from the route pods' IPs) exist;
3. once the router is Ready, S's selector is switched to the router, recording the original
   selector in an annotation in the same patch.

Warm pods of a pool are in no router's config until a claim gives them a route label (the pool
keeps the routers, so a claimed route waits only for a config reload). Right after it changes a
router's ConfigMap the manager sends the router pods ``POST /wake`` so they read it at once rather
than at their next poll. A claim need not wait for a pass at all: the manager's watch on route
pods re-renders the routers whose routes it changes straight away (``Manager.quick_step``), from
the last pass's list and the watched changes newer than it; the passes then go on as before, and
never render a watched claim away. When S needs no router any more, its selector is restored first and then the router and the
default Service are deleted. Each Ingress gets one copy per route with ``<route>.``-prefixed
hosts (only its rules whose host can carry a route: no wildcard, no host-less rule).

Objects that cannot be routed as they are — a wildcard or missing Ingress host, a backend naming
a missing Service or port, a Service with no selector, an ExternalName, a malformed
original-selector annotation, a route pod with a malformed route label or route-on-header
annotation — never stop the pass or other services' routes: each is skipped, logged once (and
once more when it is gone), and listed in the status ConfigMap ``pytest-bridge-routing-status``
(``objects.routing_status``) by the service or route it blocks, where the plugin reads it to
name the cause in the route's error. A switched Service whose recorded selector is unreadable is
left exactly as it is. Finished route pods (the agent exits when its session has been gone for a while) are
deleted. After ``MANAGER_IDLE_SECONDS`` with nothing to manage, the manager deletes its own
Deployment; ownerReferences take its ServiceAccounts, Roles and RoleBindings with it.

Environment: MANAGER_NAMESPACE; MANAGER_IMAGE, MANAGER_NGINX_IMAGE, MANAGER_CODE_CONFIGMAP and
MANAGER_CODE_DIGEST (what routers run: ``objects.RoutingRuntime``); MANAGER_IDLE_SECONDS (0 = never),
MANAGER_POLL_SECONDS; MANAGER_WAKE_ROUTERS (0: no ``POST /wake``); MANAGER_QUICK (0: routes follow the
passes only, not the watch's quick path); MANAGER_API_URL / MANAGER_TOKEN_FILE / MANAGER_CA_FILE for tests.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pytest_bridge_agent.kubeapi import ApiClient, ApiTarget, Request, Response, endpoint_from_env

from . import nginxconf
from . import objects as o

log = logging.getLogger("pytest_bridge_routing.manager")

JSON_PATCH = "application/json-patch+json"
WATCH_SECONDS = 60


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


class ApiError(RuntimeError):
    pass


@dataclass
class Api:
    """The few REST calls the manager makes, on top of the agent's stdlib client."""

    client: ApiClient
    namespace: str
    mutations: int = 0  # create/replace/patch/delete calls so far: a pass that made any is "settling"

    def _path(self, group: str, resource: str, name: str = "") -> str:
        base = "/api/v1" if group == "" else f"/apis/{group}/v1"  # apps/v1, networking.k8s.io/v1
        path = f"{base}/namespaces/{_q(self.namespace)}/{resource}"
        return f"{path}/{_q(name)}" if name else path

    def _send(self, request: Request, ok: tuple[int, ...] = (200, 201)) -> Response:
        if request.method != "GET":
            self.mutations += 1
        response = self.client.send(request)
        if response.status not in ok:
            raise ApiError(f"{request.method} {request.path}: {response.message()}")
        return response

    def items(self, group: str, resource: str, selector: str = "") -> list[dict[str, Any]]:
        query = f"?{urllib.parse.urlencode({'labelSelector': selector})}" if selector else ""
        body = self._send(Request("GET", self._path(group, resource) + query)).body
        return list(body.get("items") or []) if isinstance(body, dict) else []

    def create(self, group: str, resource: str, obj: Mapping[str, Any]) -> bool:
        """Create; False if it already exists."""
        request = Request("POST", self._path(group, resource), json.dumps(obj).encode(), "application/json")
        return self._send(request, (200, 201, 409)).status != 409

    def replace(self, group: str, resource: str, name: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace; the object as stored (its new resourceVersion)."""
        request = Request("PUT", self._path(group, resource, name), json.dumps(obj).encode(), "application/json")
        body = self._send(request).body
        return body if isinstance(body, dict) else {}

    def patch(self, group: str, resource: str, name: str, ops: list[dict[str, Any]]) -> None:
        self._send(Request("PATCH", self._path(group, resource, name), json.dumps(ops).encode(), JSON_PATCH))

    def delete(self, group: str, resource: str, name: str) -> None:
        path = self._path(group, resource, name) + "?propagationPolicy=Background"
        self._send(Request("DELETE", path), (200, 202, 404))

    def watch_route_pods(self, resource_version: str) -> Any:
        query = urllib.parse.urlencode(
            {
                "watch": "1",
                "labelSelector": f"{o.COMPONENT}=route",  # as observe(): claimed route pods and the pool
                "resourceVersion": resource_version,
                "timeoutSeconds": str(WATCH_SECONDS),
                "allowWatchBookmarks": "false",
            }
        )
        return self.client.watch(self._path("", "pods") + "?" + query, timeout=WATCH_SECONDS + 10)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name"))


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _selector_string(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _version(obj: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as a number, None if it is not one.

    The API server's are etcd revisions; an API that hands out others turns the watch's quick
    updates off (:meth:`Manager.pod_event`), and the passes alone route.
    """
    try:
        return int(_meta_rv(obj))
    except (TypeError, ValueError):
        return None


def _meta_rv(obj: Mapping[str, Any]) -> Any:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _spec(
    service: str,
    namespace: str,
    *,
    ports: tuple[nginxconf.RouterPort, ...],
    routes: Mapping[str, str],
    hosts: tuple[str, ...],
    generation: int,
) -> nginxconf.RouterSpec:
    return nginxconf.RouterSpec(
        service=service, namespace=namespace, ports=ports, routes=dict(routes),
        hosts=hosts, stats_port=o.STATS_PORT, generation=generation,
    )  # fmt: skip


@dataclass
class Rendered:
    """What a router's ConfigMap was last rendered from, so a watched claim can re-render it at once."""

    ports: tuple[nginxconf.RouterPort, ...]
    hosts: tuple[str, ...]
    config_map: dict[str, Any]  # as stored: its resourceVersion and generation
    routes: dict[str, str]  # route -> pod IP


@dataclass
class Observed:
    route_pods: list[dict[str, Any]]
    services: dict[str, dict[str, Any]]
    ingresses: list[dict[str, Any]]
    routers: dict[str, dict[str, Any]]  # service -> router Deployment
    config_maps: dict[str, dict[str, Any]]  # service -> router ConfigMap
    router_pods: list[dict[str, Any]]
    status: dict[str, Any] | None = None  # the status ConfigMap, if there is one
    manager_uid: str | None = None  # of the manager's Deployment: the status ConfigMap's owner


@dataclass
class Problems:
    """What one pass found it cannot route: by the service or route it blocks, or a note (blocks nothing)."""

    services: dict[str, set[str]] = field(default_factory=dict)
    routes: dict[str, set[str]] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)

    def service(self, name: str, problem: str) -> None:
        self.services.setdefault(name, set()).add(problem)

    def route(self, name: str, problem: str) -> None:
        self.routes.setdefault(name, set()).add(problem)

    def note(self, problem: str) -> None:
        self.notes.add(problem)

    def lines(self) -> set[str]:
        return {p for per in (*self.services.values(), *self.routes.values()) for p in per} | self.notes

    def status(self) -> dict[str, Any]:
        return o.routing_status(
            {k: sorted(v) for k, v in self.services.items()},
            {k: sorted(v) for k, v in self.routes.items()},
            sorted(self.notes),
        )


@dataclass
class Manager:
    api: Api
    runtime: o.RoutingRuntime
    idle_seconds: float = 300.0
    clock: Any = time.monotonic
    _idle_since: float | None = None
    _waiting: bool = False
    _ports: dict[str, tuple[str, list[dict[str, Any]]]] = field(default_factory=dict)
    _logged: set[str] = field(default_factory=set)  # problems logged already: each once while it lasts
    _manager_uid: str | None = None
    _problems: Problems = field(default_factory=Problems)
    wake: Any = field(default=None)  # (router pod IP) -> None; None: POST /wake in a thread
    _calls: ThreadPoolExecutor | None = field(default=None, repr=False)  # API calls side by side (own connections)
    # The watch's quick path (pod_event, quick_step) beside the passes, under _lock: the route
    # pods of the last pass's list, the watched changes newer than it, and each router's last render.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listed: dict[str, dict[str, Any]] = field(default_factory=dict)
    _watched: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # name -> (event type, pod)
    _rendered: dict[str, Rendered] = field(default_factory=dict)
    _router_pods: list[dict[str, Any]] = field(default_factory=list)
    quick: bool = True  # False once a resourceVersion is not a number: passes only

    def __post_init__(self) -> None:
        if self.wake is None:
            self.wake = wake_router

    def observe(self) -> Observed:
        """What the pass works on: eight lists, sent side by side (each thread keeps its own connection)."""
        a = self.api
        wanted = {
            "services": ("", "services", ""),
            "routers": ("apps", "deployments", f"{o.COMPONENT}=router"),
            "config_maps": ("", "configmaps", f"{o.COMPONENT}=router"),
            "status": ("", "configmaps", f"{o.COMPONENT}={o.STATUS_COMPONENT}"),
            # Route pods and unclaimed warm ones (the pool): a claim adds LABEL_ROUTE.
            "route_pods": ("", "pods", f"{o.COMPONENT}=route"),
            "ingresses": ("networking.k8s.io", "ingresses", ""),
            "router_pods": ("", "pods", f"{o.COMPONENT}=router"),
        }
        if self._manager_uid is None:  # the status ConfigMap's owner: read until found
            wanted["managers"] = ("apps", "deployments", f"{o.COMPONENT}=routing-manager")
        pending = {key: self._executor().submit(a.items, *args) for key, args in wanted.items()}
        got = {key: future.result() for key, future in pending.items()}
        if self._manager_uid is None:
            self._manager_uid = next(
                ((m.get("metadata") or {}).get("uid") for m in got["managers"] if _name(m) == o.MANAGER_NAME), None
            )
        return Observed(
            route_pods=got["route_pods"],
            services={_name(s): s for s in got["services"]},
            ingresses=got["ingresses"],
            routers={_labels(d).get(o.LABEL_ROUTER, ""): d for d in got["routers"]},
            config_maps={_labels(c).get(o.LABEL_ROUTER, ""): c for c in got["config_maps"]},
            router_pods=got["router_pods"],
            status=next((c for c in got["status"] if _name(c) == o.STATUS_CONFIGMAP), None),
            manager_uid=self._manager_uid,
        )

    def _executor(self) -> ThreadPoolExecutor:
        if self._calls is None:
            self._calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="api")
        return self._calls

    def wanted(self, seen: Observed, problems: Problems | None = None) -> set[str]:
        """The services to put behind a router; what keeps others from it goes into ``problems``."""
        problems = problems if problems is not None else Problems()
        routes = o.live_routes(seen.route_pods)
        wanted: set[str] = set()
        pooled = o.pool_services(seen.route_pods)
        for name in sorted(set(routes) | o.observed_services(seen.route_pods) | pooled):
            service = seen.services.get(name)
            problem = (
                f"service {name} does not exist" if service is None
                else None if o.is_ours(service)
                else o.service_problem(service)
            )  # fmt: skip
            if problem:
                problems.service(name, problem)
            elif service is not None and not o.is_ours(service):
                wanted.add(name)
        if routes or pooled:  # a pool keeps the Ingress backends' routers too: a claim must not wait for one
            for ingress in seen.ingresses:
                if o.is_ours(ingress):
                    continue
                for problem in o.ingress_problems(ingress, seen.services):
                    problems.note(problem)
                for name in o.ingress_backends(ingress):
                    service = seen.services.get(name)
                    if service is not None and not o.is_ours(service) and not o.service_problem(service):
                        wanted.add(name)
        return wanted

    def reconcile(self) -> tuple[bool, bool]:
        """One pass: (busy: there is something to manage, settling: it changed or waits for something).

        Each service, route pod and Ingress is handled on its own: what fails for one is recorded
        in the pass's :class:`Problems` and the others go on.
        """
        before = self.api.mutations
        self._waiting = False
        problems = self._problems = Problems()
        seen = self.observe()
        self._listed_now(seen)
        for pod in seen.route_pods:
            if o.is_finished(pod) and not (pod.get("metadata") or {}).get("deletionTimestamp"):
                log.info("deleting finished route pod %s", _name(pod))
                try:
                    self.api.delete("", "pods", _name(pod))
                except (ApiError, OSError) as e:
                    problems.note(f"route pod {_name(pod)}: cannot delete it: {e}")
                continue
            if o.LABEL_ROUTE not in _labels(pod):
                continue  # a warm pod of the pool: no route yet, nothing to check
            problem = o.route_pod_problem(pod)
            if problem and not (pod.get("metadata") or {}).get("deletionTimestamp"):
                route = _labels(pod).get(o.LABEL_ROUTE, "")
                if nginxconf.is_route_name(route):
                    problems.route(route, problem)
                else:
                    problems.note(problem)
        wanted = self.wanted(seen, problems)
        routes = o.live_routes(seen.route_pods)
        hosts = o.ingress_hosts(i for i in seen.ingresses if not o.is_ours(i))
        for service in sorted(wanted):
            try:
                self._route_service(seen, service, routes.get(service, {}), hosts)
            except (ApiError, OSError, ValueError) as e:
                problems.service(service, f"service {service}: {e}")
        for service in sorted(self._managed_services(seen) - wanted):
            service_obj = seen.services.get(service)
            record_problem = o.record_problem(service_obj) if service_obj is not None else None
            if record_problem:
                problems.service(service, f"{record_problem} (the service is left as it is)")
                continue
            self._unroute_service(seen, service)
        self._ingress_copies(seen, sorted({r for per in routes.values() for r in per}))
        self._report(seen, problems)
        busy = bool(wanted or seen.route_pods or self._managed_services(seen))
        return busy, self._waiting or self.api.mutations != before

    def _report(self, seen: Observed, problems: Problems) -> None:
        """Log each problem once while it lasts, and keep the status ConfigMap equal to the pass's problems."""
        lines = problems.lines()
        for line in sorted(lines - self._logged):
            log.warning("%s", line)
        for line in sorted(self._logged - lines):
            log.info("no longer a problem: %s", line)
        self._logged = lines
        try:
            self._write_status(seen, problems.status())
        except (ApiError, OSError) as e:
            log.warning("status ConfigMap %s: %s", o.STATUS_CONFIGMAP, e)

    def _write_status(self, seen: Observed, status: dict[str, Any]) -> None:
        current = seen.status
        if not any(status.values()):
            if current is not None:
                self.api.delete("", "configmaps", o.STATUS_CONFIGMAP)
            return
        manifest = o.status_config_map(self.api.namespace, status, seen.manager_uid)
        if current is None:
            self.api.create("", "configmaps", manifest)
        elif (current.get("data") or {}) != manifest["data"]:
            manifest["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
            self.api.replace("", "configmaps", o.STATUS_CONFIGMAP, manifest)

    def _managed_services(self, seen: Observed) -> set[str]:
        managed = {s for s in seen.routers if s} | {s for s in seen.config_maps if s}
        # Switched: recorded by us, or (its record unreadable) still pointing at its router.
        managed |= {
            name
            for name, svc in seen.services.items()
            if o.is_switched(svc)
            and (not o.record_problem(svc) or (svc.get("spec") or {}).get("selector") == o.router_selector(name))
        }
        managed |= {
            _labels(svc).get(o.LABEL_ROUTER, "")
            for svc in seen.services.values()
            if _labels(svc).get(o.COMPONENT) == "default-service"
        }
        return managed - {""}

    def _resolved_ports(self, service_obj: Mapping[str, Any]) -> list[dict[str, Any]]:
        name = _name(service_obj)
        version = json.dumps([(service_obj.get("spec") or {}).get("ports"), o.original_selector(service_obj)])
        cached = self._ports.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        selector = o.original_selector(service_obj) or {}
        pods = self.api.items("", "pods", _selector_string(selector))
        ports = o.resolve_target_ports(service_obj, pods)
        if ports:  # none yet (no pods to name the target ports): ask again on the next pass
            self._ports[name] = (version, ports)
        return ports

    def _route_service(self, seen: Observed, service: str, routes: Mapping[str, str | None], hosts: list[str]) -> None:
        a, ns = self.api, self.api.namespace
        service_obj = seen.services[service]
        ports = self._resolved_ports(service_obj)
        resolved = {port["port"] for port in ports}
        for port in (service_obj.get("spec") or {}).get("ports") or []:
            if (port.get("protocol") or "TCP") == "TCP" and port.get("port") not in resolved:
                self._problems.note(
                    f"service {service} port {port.get('name') or port.get('port')} targets the named port "
                    f"{port.get('targetPort')!r}, which none of its pods declares: not routed"
                )
        if not ports:
            raise ValueError("none of its TCP ports reaches a port its pods declare: there is nothing to route")
        default_name = o.default_service_name(service)
        default = seen.services.get(default_name)
        if default is None:
            log.info("service %s: creating default service %s", service, default_name)
            a.create("", "services", o.default_service(service_obj))
            return  # its ClusterIP is read on the next pass
        cluster_ip = (default.get("spec") or {}).get("clusterIP")
        router_ports = []
        listening: set[int] = set()
        for port in ports:
            if port["target"] in listening:
                continue
            listening.add(port["target"])
            router_ports.append(
                nginxconf.RouterPort(
                    name=port["name"],
                    listen=port["target"],
                    protocol=nginxconf.protocol_for({"name": port["name"], "appProtocol": port["appProtocol"]}),
                    default_upstream=f"{cluster_ip}:{port['port']}",
                )
            )
        with self._lock:
            # The freshest view: a claim the watch saw after this pass's list is already in a
            # config the quick path wrote, and must not be rendered away by this pass.
            ready_routes = self._ready_routes(service, routes)
            cm = self._newest_config_map(service, seen.config_maps.get(service))
            if cm is None:
                log.info("service %s: creating router config (routes %s)", service, sorted(ready_routes))
                spec = _spec(
                    service, ns, ports=tuple(router_ports), routes=ready_routes, hosts=tuple(hosts), generation=1
                )
                a.create("", "configmaps", o.router_config_map(service, ns, nginxconf.render(spec), 1))
            elif self._write_config(service, Rendered(tuple(router_ports), tuple(hosts), cm, ready_routes)):
                self._wake_routers(seen.router_pods, service)
        router = seen.routers.get(service)
        if router is None:
            log.info("service %s: creating router", service)
            a.create(
                "apps", "deployments", o.router_deployment(service, ns, ports, self.runtime, o.router_name(service))
            )
            return
        if ((router.get("metadata") or {}).get("annotations") or {}).get(o.ANN_RUNTIME) != self.runtime.key:
            # Left by a manager of another version: roll it to this one's code and images.
            log.info("service %s: updating router to this manager's code and images", service)
            updated = o.router_deployment(service, ns, ports, self.runtime, o.router_name(service))
            updated["metadata"]["resourceVersion"] = router["metadata"]["resourceVersion"]
            a.replace("apps", "deployments", o.router_name(service), updated)
        current = (service_obj.get("spec") or {}).get("selector")
        if current == o.router_selector(service):
            return
        if o.is_switched(service_obj):
            # Someone re-applied the service while it was switched: keep their selector as the original.
            log.info("service %s: selector changed to %s while routed; recording it", service, current)
            a.patch(
                "",
                "services",
                service,
                [{"op": "remove", "path": "/metadata/annotations/" + _esc(o.ANN_ORIGINAL_SELECTOR)}],
            )
            return
        if not self._router_ready(seen, service):
            self._waiting = True
            return
        log.info("service %s: switching selector %s -> router", service, current)
        a.patch("", "services", service, o.switch_patch(service_obj))

    def _listed_now(self, seen: Observed) -> None:
        """A pass's list of route pods: watched changes it already holds are dropped."""
        with self._lock:
            self._listed = {_name(pod): pod for pod in seen.route_pods}
            self._router_pods = seen.router_pods
            for name, (kind, pod) in list(self._watched.items()):
                listed = self._listed.get(name)
                if (listed is None and kind == "DELETED") or not self._newer(pod, listed):
                    del self._watched[name]

    @staticmethod
    def _newer(pod: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
        if than is None:
            return True
        version, known = _version(pod), _version(than)
        return version is not None and known is not None and version > known

    def pod_event(self, kind: str, pod: Mapping[str, Any]) -> bool:
        """A route pod event from the watch; True if it may change a route (``quick_step`` then)."""
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not _name(pod) or not self.quick:
            return False
        if _version(pod) is None:
            log.info("resourceVersion %r is not a number: routes follow the passes only", _meta_rv(pod))
            self.quick = False
            return False
        with self._lock:
            name = _name(pod)
            known = self._watched.get(name, (None, self._listed.get(name)))[1]
            if not self._newer(pod, known):
                return False
            self._watched[name] = (kind, dict(pod))
            return o.LABEL_ROUTE in _labels(pod) or (known is not None and o.LABEL_ROUTE in _labels(known))

    def _route_pods(self) -> list[dict[str, Any]]:
        """The last list's route pods with the newer watched changes (under _lock)."""
        pods = dict(self._listed)
        for name, (kind, pod) in self._watched.items():
            if kind == "DELETED":
                pods.pop(name, None)
            else:
                pods[name] = pod
        return list(pods.values())

    def _ready_routes(self, service: str, listed: Mapping[str, str | None]) -> dict[str, str]:
        routes = o.live_routes(self._route_pods()).get(service, {}) if self.quick else listed
        return {route: ip for route, ip in routes.items() if ip}

    def _newest_config_map(self, service: str, listed: dict[str, Any] | None) -> dict[str, Any] | None:
        """The listed router ConfigMap, or the quick path's write if that is newer (under _lock)."""
        rendered = self._rendered.get(service)
        if listed is None:
            self._rendered.pop(service, None)
            return None
        if rendered is not None and self._newer(rendered.config_map, listed):
            return rendered.config_map
        return listed

    def _write_config(self, service: str, want: Rendered) -> bool:
        """Make the router's ConfigMap ``want`` (under _lock); True if it was replaced."""
        cm = want.config_map
        generation = int(((cm.get("metadata") or {}).get("annotations") or {}).get(o.ANN_GENERATION, "0") or 0)
        ns = self.api.namespace
        spec = _spec(service, ns, ports=want.ports, routes=want.routes, hosts=want.hosts, generation=generation)
        if (cm.get("data") or {}).get("nginx.conf") == nginxconf.render(spec):
            self._rendered[service] = want
            return False
        generation += 1
        log.info("service %s: router config generation %d (routes %s)", service, generation, sorted(want.routes))
        spec = dataclasses.replace(spec, generation=generation)
        updated = o.router_config_map(service, ns, nginxconf.render(spec), generation)
        updated["metadata"]["resourceVersion"] = (cm.get("metadata") or {}).get("resourceVersion")
        stored = self.api.replace("", "configmaps", o.router_name(service), updated)
        self._rendered[service] = dataclasses.replace(want, config_map=stored or updated)
        return True

    def quick_step(self) -> int:
        """Re-render the routers whose routes the watch changed, without waiting for a pass.

        A claimed warm pod is the common case: its router's ConfigMap is written, and the router
        woken, within one API call of the claim. A failure (a conflicting write, say) is left to
        the next pass, which lists everything. Returns how many ConfigMaps were written.
        """
        written = 0
        with self._lock:
            if not self.quick:
                return 0
            routes = o.live_routes(self._route_pods())
            for service, last in list(self._rendered.items()):
                ready = {route: ip for route, ip in routes.get(service, {}).items() if ip}
                if ready == last.routes:
                    continue
                try:
                    if self._write_config(service, dataclasses.replace(last, routes=ready)):
                        written += 1
                        self._wake_routers(self._router_pods, service)
                except (ApiError, OSError) as e:
                    log.info("service %s: quick config update: %s (the next pass retries)", service, e)
                    self._rendered.pop(service, None)
        return written

    def _wake_routers(self, router_pods: list[dict[str, Any]], service: str) -> None:
        """Tell ``service``'s router pods their ConfigMap changed (``POST /wake``), so they read it now.

        Best effort and off the reconcile thread: a router we cannot reach (a NetworkPolicy) still
        reads the ConfigMap at its next poll.
        """
        for pod in router_pods:
            ip = (pod.get("status") or {}).get("podIP")
            if (
                _labels(pod).get(o.LABEL_ROUTER) == service
                and ip
                and not (pod.get("metadata") or {}).get("deletionTimestamp")
            ):
                self.wake(str(ip))

    def _router_ready(self, seen: Observed, service: str) -> bool:
        return any(_labels(pod).get(o.LABEL_ROUTER) == service and o.is_ready(pod) for pod in seen.router_pods)

    def _unroute_service(self, seen: Observed, service: str) -> None:
        a = self.api
        try:
            service_obj = seen.services.get(service)
            if service_obj is not None and o.is_switched(service_obj):
                log.info("service %s: restoring selector %s", service, o.original_selector(service_obj))
                a.patch("", "services", service, o.restore_patch(service_obj))
            if service in seen.routers:
                log.info("service %s: deleting router", service)
                a.delete("apps", "deployments", o.router_name(service))
            if service in seen.config_maps:
                a.delete("", "configmaps", o.router_name(service))
            if o.default_service_name(service) in seen.services:
                a.delete("", "services", o.default_service_name(service))
            self._ports.pop(service, None)
            with self._lock:
                self._rendered.pop(service, None)
        except (ApiError, OSError) as e:
            log.warning("service %s: cleanup: %s", service, e)

    def _ingress_copies(self, seen: Observed, routes: list[str]) -> None:
        wanted: dict[str, dict[str, Any]] = {}
        for ingress in seen.ingresses:
            if o.is_ours(ingress):
                continue
            for route in routes:
                copy = o.ingress_copy(ingress, route)
                if copy is not None:
                    wanted[copy["metadata"]["name"]] = copy
        existing = {_name(i) for i in seen.ingresses if _labels(i).get(o.COMPONENT) == "ingress-copy"}

        def create(name: str) -> None:
            log.info("creating ingress %s", name)
            self.api.create("networking.k8s.io", "ingresses", wanted[name])

        def delete(name: str) -> None:
            log.info("deleting ingress %s", name)
            self.api.delete("networking.k8s.io", "ingresses", name)

        # Side by side: with a route opened and one closed per test, a pass has several, and the
        # next claim's pass waits for this one.
        calls = [(create, name) for name in sorted(set(wanted) - existing)]
        calls += [(delete, name) for name in sorted(existing - set(wanted))]
        pending = [(name, self._executor().submit(call, name)) for call, name in calls]
        for name, future in pending:
            try:
                future.result()
            except (ApiError, OSError) as e:
                log.warning("ingress %s: %s", name, e)

    def idle_expired(self, busy: bool) -> bool:
        now = self.clock()
        if busy or self.idle_seconds <= 0:
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return bool(now - self._idle_since >= self.idle_seconds)


def wake_router(ip: str, port: int = o.STATS_PORT, timeout: float = 0.5) -> None:
    """``POST http://ip:port/wake`` in a daemon thread; failures are only logged (the router polls too)."""

    def send() -> None:
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            conn.request("POST", "/wake", body=b"", headers={"User-Agent": "pytest-bridge-routing-manager"})
            conn.getresponse().read()
        except (OSError, http.client.HTTPException) as e:
            log.debug("wake router %s: %s", ip, e)
        finally:
            conn.close()

    threading.Thread(target=send, name=f"wake-{ip}", daemon=True).start()


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class Wakeup:
    """Wakes the reconcile loop when a route pod changes (a watch), else after the poll interval.

    With a ``manager``, each watched change is also handed to it (:meth:`Manager.pod_event`), and
    one that may change a route runs :meth:`Manager.quick_step` in a thread of its own: a claim
    then reaches its router without waiting for the pass in progress and the next one's lists.
    """

    def __init__(self, api: Api, manager: Manager | None = None) -> None:
        self.event = threading.Event()
        self.api = api
        self.manager = manager
        self.stopped = False
        self._quick = threading.Event()
        threading.Thread(target=self._run, name="route-pod-watch", daemon=True).start()
        if manager is not None:
            threading.Thread(target=self._run_quick, args=(manager,), name="quick-routes", daemon=True).start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                for event in self.api.watch_route_pods(""):
                    pod = event.get("object") if isinstance(event, dict) else None
                    if (
                        self.manager is not None
                        and isinstance(pod, dict)
                        and self.manager.pod_event(event["type"], pod)
                    ):
                        self._quick.set()
                    self.event.set()
            except OSError as e:
                log.debug("watch: %s", e)
                time.sleep(1)

    def _run_quick(self, manager: Manager) -> None:
        while not self.stopped:
            self._quick.wait()
            self._quick.clear()
            try:
                manager.quick_step()
            except Exception:  # the passes route on; this only makes them faster
                log.exception("quick config update")

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)
        self.event.clear()


def main(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    if "--help" in sys.argv[1:]:
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    target: ApiTarget = endpoint_from_env(env, "MANAGER_")
    api = Api(ApiClient(target), env["MANAGER_NAMESPACE"])
    # MANAGER_WAKE_ROUTERS=0: routers only poll (the benchmark's "before" of the wake, bench.routes).
    wake = (lambda ip: None) if env.get("MANAGER_WAKE_ROUTERS", "1") == "0" else None
    manager = Manager(api, o.RoutingRuntime.from_env(env), float(env.get("MANAGER_IDLE_SECONDS") or 300), wake=wake)
    poll = float(env.get("MANAGER_POLL_SECONDS") or 2.0)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    manager.quick = env.get("MANAGER_QUICK", "1") != "0"
    wakeup = Wakeup(api, manager if manager.quick else None)
    log.info("routing manager for namespace %s (idle exit after %gs)", api.namespace, manager.idle_seconds)
    last_error = ""
    while not stop.is_set():
        try:
            busy, settling = manager.reconcile()
            last_error = ""
        except Exception as e:  # a manager that crash-loops routes nothing for anyone
            error = f"{type(e).__name__}: {e}"
            if error != last_error:
                log.warning("reconcile: %s", error, exc_info=not isinstance(e, ApiError | OSError))
            last_error = error
            busy, settling = True, False  # retry at the poll interval, not in a tight loop
        if manager.idle_expired(busy):
            log.info("nothing to route for %gs: removing the routing manager", manager.idle_seconds)
            try:
                api.delete("apps", "deployments", o.MANAGER_NAME)
            except (ApiError, OSError) as e:
                log.warning("self-removal: %s", e)
                continue
            # Stay until the pod is deleted with its Deployment: exiting would only restart it.
            stop.wait()
            return 0
        # Fast while something is settling, slow otherwise; route pod changes wake it at once.
        wakeup.wait(0.2 if settling else poll)
    wakeup.stopped = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
