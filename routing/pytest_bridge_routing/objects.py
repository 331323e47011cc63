"""Names, labels and manifests of everything isolated routing puts into a namespace (pure, stdlib).

Shared by the routing manager (in the cluster) and the plugin (which deploys the manager and
creates route pods), so both sides agree on one vocabulary:

* a **route pod** (created by the plugin) runs the agent for one route of one service and is
  labelled ``pytest-bridge.io/route=<route>`` and ``pytest-bridge.io/route-service=<service>``;
* per routed service the manager keeps a **default Service** (``<svc>-pbr-default``, the
  service's original selector: "everyone else"), a **router** Deployment and its ConfigMap
  (``<svc>-pbr-router``), and the service's original selector in an annotation on the service;
* per Ingress and route, an **ingress copy** whose hosts are ``<route>.<host>``.

Everything carries ``app.kubernetes.io/managed-by=pytest-bridge`` and a component label, so
cleanup and "what did we leave behind" are label queries.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_bridge_agent import labels as bridge_labels
from pytest_bridge_agent.runtime import (
    DEFAULT_NGINX_IMAGE,
    DEFAULT_PYTHON_IMAGE,
    Code,
    command,
    container_security,
    pod_security,
    resources,
    tmp_mount,
    tmp_volume,
)

from . import nginxconf

__all__ = [
    "ANN_GENERATION",
    "ANN_OBSERVE",
    "ANN_ORIGINAL_SELECTOR",
    "ANN_ROUTE_ON_HEADER",
    "ANN_RUNTIME",
    "ANN_SOURCE",
    "COMPONENT",
    "LABEL_POOL",
    "LABEL_ROUTE",
    "LABEL_ROUTER",
    "LABEL_ROUTE_SERVICE",
    "MANAGED_BY",
    "MANAGER_NAME",
    "ROUTER_SA",
    "ROUTE_HEADER",
    "STATS_PORT",
    "STATUS_CONFIGMAP",
    "RoutingRuntime",
    "check_route_name",
    "dns_label",
    "manager_objects",
    "problems_for",
    "routing_status",
]

ROUTE_HEADER = "kubernetes-route-as"
MANAGED_BY = (bridge_labels.MANAGED_BY_LABEL, bridge_labels.MANAGED_BY_VALUE)
COMPONENT = bridge_labels.COMPONENT_LABEL
LABEL_ROUTE = bridge_labels.ROUTE_LABEL
LABEL_ROUTE_SERVICE = bridge_labels.ROUTE_SERVICE_LABEL
# On a warm route pod nobody has claimed yet (value: its service). It has no LABEL_ROUTE, so no
# router sends it anything; claiming it swaps this label for LABEL_ROUTE in one JSON Patch.
LABEL_POOL = bridge_labels.POOL_LABEL
LABEL_ROUTER = bridge_labels.ROUTER_LABEL
ANN_ORIGINAL_SELECTOR = bridge_labels.ORIGINAL_SELECTOR_ANNOTATION
ANN_ROUTE_ON_HEADER = bridge_labels.ROUTE_ON_HEADER_ANNOTATION
ANN_OBSERVE = bridge_labels.OBSERVE_ANNOTATION
ANN_GENERATION = bridge_labels.GENERATION_ANNOTATION
ANN_SOURCE = bridge_labels.SOURCE_ANNOTATION
ANN_RUNTIME = bridge_labels.RUNTIME_ANNOTATION

MANAGER_NAME = "pytest-bridge-routing-manager"
STATUS_CONFIGMAP = "pytest-bridge-routing-status"  # what the manager cannot route, for the plugin's errors
STATUS_COMPONENT = "routing-status"
STATUS_KEY = "status.json"
ROUTER_SA = "pytest-bridge-router"
STATS_PORT = 47180

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class RoutingRuntime:
    """What the manager and routers run: the Python image (manager, router control), the nginx
    image (router data plane) and where the code comes from (a ConfigMap, or the Python image)."""

    python_image: str = DEFAULT_PYTHON_IMAGE
    nginx_image: str = DEFAULT_NGINX_IMAGE
    code: Code = field(default_factory=Code)

    @property
    def key(self) -> str:
        """One string for "same code, same images": a manager with another key is another version."""
        return hashlib.sha256(
            json.dumps([self.code.digest, self.code.configmap, self.python_image, self.nginx_image]).encode()
        ).hexdigest()[:16]

    def env(self) -> list[dict[str, str]]:
        """How the plugin tells the manager its runtime (read back by :meth:`from_env`)."""
        return [
            {"name": "MANAGER_IMAGE", "value": self.python_image},
            {"name": "MANAGER_NGINX_IMAGE", "value": self.nginx_image},
            {"name": "MANAGER_CODE_CONFIGMAP", "value": self.code.configmap or ""},
            {"name": "MANAGER_CODE_DIGEST", "value": self.code.digest},
        ]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RoutingRuntime:
        code = Code(configmap=env.get("MANAGER_CODE_CONFIGMAP") or None, digest=env.get("MANAGER_CODE_DIGEST", ""))
        return cls(
            python_image=env.get("MANAGER_IMAGE") or DEFAULT_PYTHON_IMAGE,
            nginx_image=env.get("MANAGER_NGINX_IMAGE") or DEFAULT_NGINX_IMAGE,
            code=code,
        )


def labels(component: str, **extra: str) -> dict[str, str]:
    return {MANAGED_BY[0]: MANAGED_BY[1], COMPONENT: component, **extra}


def dns_label(*parts: str, limit: int = 63) -> str:
    """``parts`` joined by '-', lower-cased, cut to ``limit`` with a hash suffix when too long."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def check_route_name(route: str) -> str:
    """``route`` if it is a DNS label (it becomes a host prefix and label value); else ValueError."""
    if not _LABEL.match(route) or len(route) > 63:
        raise ValueError(f"route name {route!r} is not a DNS label (a-z, 0-9 and '-', at most 63 characters)")
    return route


def default_service_name(service: str) -> str:
    return dns_label(service, "pbr-default")


def router_name(service: str) -> str:
    return dns_label(service, "pbr-router")


def ingress_copy_name(ingress: str, route: str) -> str:
    return dns_label(ingress, "pbr", route, limit=253)


# --- route pods --------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def is_ready(pod: Mapping[str, Any]) -> bool:
    if _meta(pod).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def is_serving(pod: Mapping[str, Any]) -> bool:
    """Ready, or running with every container started: a route pod's agent listens within
    moments of starting, so routes do not wait for the next readiness probe (up to a second)."""
    if is_ready(pod):
        return True
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    return (
        not _meta(pod).get("deletionTimestamp")
        and status.get("phase") == "Running"
        and bool(containers)
        and all("running" in (c.get("state") or {}) and c.get("started") for c in containers)
    )


def is_finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def route_pod_problem(pod: Mapping[str, Any]) -> str | None:
    """Why a route pod cannot be served (its labels or route-on-header annotation are malformed), or None.

    The route label names the route (a DNS label: it becomes a host prefix and an nginx map key);
    the route-on-header annotation, when present, must say ``kubernetes-route-as=<that route>``.
    """
    meta = _meta(pod)
    pod_labels = meta.get("labels") or {}
    name = meta.get("name")
    route, service = pod_labels.get(LABEL_ROUTE), pod_labels.get(LABEL_ROUTE_SERVICE)
    if not isinstance(route, str) or not nginxconf.is_route_name(route):
        return f"route pod {name}: label {LABEL_ROUTE}={route!r} is not a route name (a DNS label)"
    if not isinstance(service, str) or not _LABEL.match(service):
        return f"route pod {name}: label {LABEL_ROUTE_SERVICE}={service!r} does not name a service"
    header = (meta.get("annotations") or {}).get(ANN_ROUTE_ON_HEADER)
    if header is not None and header != f"{ROUTE_HEADER}={route}":
        return (
            f"route pod {name}: annotation {ANN_ROUTE_ON_HEADER}={header!r} does not match its route "
            f"(expected {ROUTE_HEADER}={route})"
        )
    return None


def live_routes(pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str | None]]:
    """service -> route -> pod IP (None until the route pod is Ready) for route pods not going away.

    Route pods with a :func:`route_pod_problem` are left out.
    """
    result: dict[str, dict[str, str | None]] = {}
    for pod in pods:
        meta = _meta(pod)
        pod_labels = meta.get("labels") or {}
        service, route = pod_labels.get(LABEL_ROUTE_SERVICE), pod_labels.get(LABEL_ROUTE)
        if not service or not route or meta.get("deletionTimestamp") or is_finished(pod) or route_pod_problem(pod):
            continue
        ip = (pod.get("status") or {}).get("podIP") if is_serving(pod) else None
        routes = result.setdefault(service, {})
        if routes.get(route) is None:
            routes[route] = ip
    return result


def is_pool_pod(pod: Mapping[str, Any]) -> bool:
    """An unclaimed warm route pod: labelled for the pool and not (yet) with a route."""
    pod_labels = _meta(pod).get("labels") or {}
    return LABEL_POOL in pod_labels and LABEL_ROUTE not in pod_labels


def pool_services(pods: Iterable[Mapping[str, Any]]) -> set[str]:
    """Services with unclaimed route pods that are not going away: their router stays, so a claim
    only has to wait for a config reload, never for a new router pod."""
    result: set[str] = set()
    for pod in pods:
        service = (_meta(pod).get("labels") or {}).get(LABEL_POOL)
        live = is_pool_pod(pod) and not _meta(pod).get("deletionTimestamp") and not is_finished(pod)
        if live and isinstance(service, str) and _LABEL.match(service):
            result.add(service)
    return result


def observed_services(pods: Iterable[Mapping[str, Any]]) -> set[str]:
    """Services a live route pod asks to observe (for propagation checks)."""
    result: set[str] = set()
    for pod in pods:
        if _meta(pod).get("deletionTimestamp") or is_finished(pod):
            continue
        value = (_meta(pod).get("annotations") or {}).get(ANN_OBSERVE, "")
        result.update(name.strip() for name in value.split(",") if name.strip())
    return result


# --- ingresses --------------------------------------------------------------------------------


def is_ours(obj: Mapping[str, Any]) -> bool:
    return (_meta(obj).get("labels") or {}).get(MANAGED_BY[0]) == MANAGED_BY[1]


def ingress_backends(ingress: Mapping[str, Any]) -> set[str]:
    """Names of the Services an Ingress (networking.k8s.io/v1) sends traffic to."""
    spec = ingress.get("spec") or {}
    names: set[str] = set()
    default = ((spec.get("defaultBackend") or {}).get("service") or {}).get("name")
    if default:
        names.add(default)
    for rule in spec.get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            name = ((path.get("backend") or {}).get("service") or {}).get("name")
            if name:
                names.add(name)
    return names


def can_carry_routes(host: Any) -> bool:
    """Whether ``<route>.<host>`` is a host name: not a wildcard (``*.shop.example``), not an IP."""
    labels = host.split(".") if isinstance(host, str) else []
    return (
        bool(host)
        and len(host) <= 253
        and all(_LABEL.match(label) for label in labels)
        and not all(label.isdigit() for label in labels)
    )


def _rules(ingress: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rules = (ingress.get("spec") or {}).get("rules") or []
    return [rule for rule in rules if isinstance(rule, Mapping)] if isinstance(rules, list) else []


def ingress_hosts(ingresses: Iterable[Mapping[str, Any]]) -> list[str]:
    """The hosts of the Ingresses' rules that can carry routes (see :func:`can_carry_routes`)."""
    return sorted(
        {str(rule["host"]) for ing in ingresses for rule in _rules(ing) if can_carry_routes(rule.get("host"))}
    )


def ingress_problems(ingress: Mapping[str, Any], services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What in an Ingress cannot take part in routing, for the log and the status (nothing blocks a route).

    ``services`` are the namespace's Services by name (to check backends and their ports).
    """
    name = _meta(ingress).get("name")
    problems = []
    for index, rule in enumerate(_rules(ingress)):
        host = rule.get("host")
        if not host:
            problems.append(f"ingress {name}: rule {index} has no host: <route>.<host> requests cannot reach it")
        elif not can_carry_routes(host):
            problems.append(f"ingress {name}: host {host!r} cannot carry routes (<route>.{host} is no host name)")
    for backend in _ingress_service_backends(ingress):
        service = services.get(str(backend.get("name")))
        port = backend.get("port") or {}
        if service is None:
            problems.append(f"ingress {name}: backend service {backend.get('name')!r} does not exist")
            continue
        ports = (service.get("spec") or {}).get("ports") or []
        if port.get("name") and port["name"] not in {p.get("name") for p in ports}:
            problems.append(f"ingress {name}: backend service {backend.get('name')} has no port named {port['name']!r}")
        elif port.get("number") and port["number"] not in {p.get("port") for p in ports}:
            problems.append(f"ingress {name}: backend service {backend.get('name')} has no port {port['number']}")
        problem = service_problem(service)
        if problem:
            problems.append(f"ingress {name}: backend {problem}: requests on <route>.<host> go straight to it")
    return sorted(set(problems))


def _ingress_service_backends(ingress: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = ingress.get("spec") or {}
    backends = [(spec.get("defaultBackend") or {}).get("service")]
    for rule in _rules(ingress):
        for path in (rule.get("http") or {}).get("paths") or []:
            backends.append((path.get("backend") or {}).get("service"))
    return [b for b in backends if isinstance(b, Mapping) and b.get("name")]


def ingress_copy(ingress: Mapping[str, Any], route: str) -> dict[str, Any] | None:
    """The Ingress for ``route``: the rules whose host can carry routes, that host prefixed with ``<route>.``
    (TLS hosts too); None if there are none.

    Rules without a host and the default backend are not copied: the original already serves
    them, and a second Ingress claiming them would conflict with it.
    """
    meta = _meta(ingress)
    spec = json.loads(json.dumps(ingress.get("spec") or {}))
    spec.pop("defaultBackend", None)
    spec["rules"] = [rule for rule in _rules({"spec": spec}) if can_carry_routes(rule.get("host"))]
    if not spec["rules"]:
        return None
    for rule in spec["rules"]:
        rule["host"] = f"{route}.{rule['host']}"
    for tls in spec.get("tls") or []:
        tls["hosts"] = [f"{route}.{host}" for host in tls.get("hosts") or [] if can_carry_routes(host)]
    copied_annotations = {
        key: value
        for key, value in (meta.get("annotations") or {}).items()
        if key != "kubectl.kubernetes.io/last-applied-configuration"
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": ingress_copy_name(str(meta.get("name")), route),
            "namespace": meta.get("namespace"),
            "labels": labels("ingress-copy", **{LABEL_ROUTE: route}),
            "annotations": {**copied_annotations, ANN_SOURCE: str(meta.get("name"))},
        },
        "spec": spec,
    }


# --- routed services ---------------------------------------------------------------------------


def _recorded_selector(service: Mapping[str, Any]) -> dict[str, str]:
    """The selector recorded in the annotation; ValueError naming what is wrong with it."""
    recorded = (_meta(service).get("annotations") or {}).get(ANN_ORIGINAL_SELECTOR)
    try:
        value = json.loads(recorded) if isinstance(recorded, str) else None
    except ValueError:
        value = None
        why = "is not JSON"
    else:
        why = "is not a JSON object of strings (a selector)"
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        name = _meta(service).get("name")
        raise ValueError(
            f"service {name}: annotation {ANN_ORIGINAL_SELECTOR}={recorded!r} {why}; it should record the selector "
            f"isolated routes switched the service away from. If the selector is {LABEL_ROUTER}={name}, set it "
            f"back by hand; then remove the annotation (`kubectl annotate service {name} {ANN_ORIGINAL_SELECTOR}-`)"
        )
    return {str(k): v for k, v in value.items()}


def record_problem(service: Mapping[str, Any]) -> str | None:
    """What is wrong with a service's original-selector annotation, if it has a malformed one."""
    if not is_switched(service):
        return None
    try:
        _recorded_selector(service)
    except ValueError as e:
        return str(e)
    return None


def service_problem(service: Mapping[str, Any]) -> str | None:
    """Why a service cannot be put behind a router, or None."""
    spec = service.get("spec") or {}
    name = _meta(service).get("name")
    if spec.get("type") == "ExternalName":
        return f"service {name} is an ExternalName alias for {spec.get('externalName')!r}: it has no pods to route"
    problem = record_problem(service)
    if problem:
        return problem
    if not original_selector(service):
        return f"service {name} has no selector (its endpoints are managed by hand): it cannot be routed"
    return None


def original_selector(service: Mapping[str, Any]) -> dict[str, str] | None:
    """The selector to restore: the recorded one if the service is switched, else its current one.

    None if there is none, and if the record is malformed (see :func:`record_problem`).
    """
    if is_switched(service):
        try:
            return _recorded_selector(service)
        except ValueError:
            return None
    selector = (service.get("spec") or {}).get("selector")
    return dict(selector) if selector else None


def is_switched(service: Mapping[str, Any]) -> bool:
    return ANN_ORIGINAL_SELECTOR in (_meta(service).get("annotations") or {})


def router_selector(service: str) -> dict[str, str]:
    return {LABEL_ROUTER: service}


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def switch_patch(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch: record the original selector and point the service at its router, in one step.

    Guarded by a ``test`` of the current selector, so a concurrent change fails instead of being
    recorded wrongly.
    """
    name = str(_meta(service).get("name"))
    current = (service.get("spec") or {}).get("selector")
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/spec/selector", "value": current}]
    if not (_meta(service).get("annotations")):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops += [
        {
            "op": "add",
            "path": f"/metadata/annotations/{_escape(ANN_ORIGINAL_SELECTOR)}",
            "value": json.dumps(current, sort_keys=True),
        },
        {"op": "replace", "path": "/spec/selector", "value": router_selector(name)},
    ]
    return ops


def restore_patch(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch: the recorded selector back, the record removed; ValueError if the record is malformed."""
    selector = _recorded_selector(service)
    return [
        {"op": "replace", "path": "/spec/selector", "value": selector},
        {"op": "remove", "path": f"/metadata/annotations/{_escape(ANN_ORIGINAL_SELECTOR)}"},
    ]


def default_service(service: Mapping[str, Any]) -> dict[str, Any]:
    """A ClusterIP clone of ``service`` with its original selector: where unrouted traffic goes."""
    meta, spec = _meta(service), service.get("spec") or {}
    ports = []
    for port in spec.get("ports") or []:
        copied = {k: port[k] for k in ("name", "port", "targetPort", "protocol", "appProtocol") if k in port}
        ports.append(copied)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": default_service_name(str(meta.get("name"))),
            "namespace": meta.get("namespace"),
            "labels": labels("default-service", **{LABEL_ROUTER: str(meta.get("name"))}),
        },
        "spec": {"type": "ClusterIP", "selector": original_selector(service), "ports": ports},
    }


def resolve_target_ports(service: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each TCP port of ``service`` with its target port resolved to a number on the original pods.

    Returns dicts with ``name`` (service port name), ``port``, ``target`` (number), ``target_name``
    (the named targetPort, or '') and ``appProtocol``. A named target port that no pod declares is
    left out (the Service itself cannot route it either).
    """
    numbers: dict[str, int] = {}
    for pod in pods:
        for container in (pod.get("spec") or {}).get("containers") or []:
            for cport in container.get("ports") or []:
                if cport.get("name") and (cport.get("protocol") or "TCP") == "TCP":
                    numbers.setdefault(cport["name"], int(cport["containerPort"]))
    result = []
    for port in (service.get("spec") or {}).get("ports") or []:
        if (port.get("protocol") or "TCP") != "TCP":
            continue
        target = port.get("targetPort", port["port"])
        if isinstance(target, str) and not target.isdigit():
            if target not in numbers:
                continue
            number, target_name = numbers[target], target
        else:
            number, target_name = int(target), ""
        result.append(
            {
                "name": port.get("name") or "",
                "port": int(port["port"]),
                "target": number,
                "target_name": target_name,
                "appProtocol": port.get("appProtocol") or "",
            }
        )
    return result


def router_deployment(
    service: str, namespace: str, ports: Sequence[Mapping[str, Any]], runtime: RoutingRuntime, config_map: str
) -> dict[str, Any]:
    """The router for ``service``: nginx listening on the service's target ports (same names).

    Two containers sharing the process namespace and ``/tmp``: the router process (Python image,
    our code) reads the ConfigMap, writes ``nginx.conf`` and reloads nginx; nginx (the stock image)
    starts once that file exists. See ``router.SidecarNginx``.
    """
    container_ports: list[dict[str, Any]] = []
    seen: set[int] = set()
    for port in ports:
        if port["target"] in seen:
            continue
        seen.add(port["target"])
        entry: dict[str, Any] = {"containerPort": port["target"], "protocol": "TCP"}
        if port["target_name"]:
            entry["name"] = port["target_name"]
        container_ports.append(entry)
    pod_labels = labels("router", **router_selector(service))
    code = runtime.code
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": router_name(service),
            "namespace": namespace,
            "labels": pod_labels,
            "annotations": {ANN_RUNTIME: runtime.key},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": router_selector(service)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": ROUTER_SA,
                    "enableServiceLinks": False,
                    "shareProcessNamespace": True,
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": pod_security(),
                    "volumes": [*code.volumes(), tmp_volume()],
                    "containers": [
                        {
                            "name": "router",
                            "image": runtime.python_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": command("router"),
                            "env": [
                                {"name": "ROUTER_CONFIGMAP", "value": config_map},
                                {"name": "ROUTER_NAMESPACE", "value": namespace},
                                {"name": "ROUTER_STATS_PORT", "value": str(STATS_PORT)},
                                {"name": "ROUTER_NGINX_MODE", "value": "sidecar"},
                                {"name": "ROUTER_RUNTIME_DIR", "value": nginxconf.DEFAULT_RUNTIME_DIR},
                            ],
                            "ports": [{"containerPort": STATS_PORT, "name": "pbr-stats", "protocol": "TCP"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": STATS_PORT},
                                "periodSeconds": 1,
                                "failureThreshold": 2,
                            },
                            "volumeMounts": [*code.mounts(), tmp_mount()],
                            "securityContext": container_security(),
                            "resources": resources("10m", "32Mi", "500m", "256Mi"),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        },
                        {
                            "name": "nginx",
                            "image": runtime.nginx_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": nginxconf.sidecar_command(),
                            "ports": container_ports,
                            "volumeMounts": [tmp_mount()],
                            "securityContext": container_security(),
                            "resources": resources("10m", "16Mi", "1", "128Mi"),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        },
                    ],
                },
            },
        },
    }


def router_config_map(service: str, namespace: str, conf: str, generation: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": router_name(service),
            "namespace": namespace,
            "labels": labels("router", **router_selector(service)),
            "annotations": {ANN_GENERATION: str(generation)},
        },
        "data": {"nginx.conf": conf},
    }


# --- what the manager cannot route ------------------------------------------------------------


def routing_status(
    services: Mapping[str, list[str]], routes: Mapping[str, list[str]], notes: list[str]
) -> dict[str, Any]:
    """The manager's status: problems that block a service's routes, a route, and notes that block nothing."""
    return {"services": dict(services), "routes": dict(routes), "notes": list(notes)}


def status_config_map(namespace: str, status: Mapping[str, Any], owner_uid: str | None) -> dict[str, Any]:
    """The status ConfigMap, owned by the manager's Deployment (it goes when the manager does)."""
    meta: dict[str, Any] = {
        "name": STATUS_CONFIGMAP,
        "namespace": namespace,
        "labels": labels(STATUS_COMPONENT),
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": MANAGER_NAME, "uid": owner_uid}
        ]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {STATUS_KEY: json.dumps(status, sort_keys=True, indent=1)},
    }


def problems_for(config_map_data: Mapping[str, str] | None, service: str, route: str) -> tuple[list[str], list[str]]:
    """From the status ConfigMap's data: (what blocks ``route`` of ``service``, the notes). Never raises."""
    try:
        status = json.loads((config_map_data or {}).get(STATUS_KEY) or "{}")
    except ValueError:
        return [], []
    if not isinstance(status, dict):
        return [], []

    def strings(value: Any, key: str | None = None) -> list[str]:
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        return [str(v) for v in value] if isinstance(value, list) else []

    blocking = strings(status.get("services"), service) + strings(status.get("routes"), route)
    return blocking, strings(status.get("notes"))


# --- the manager itself (created by the plugin) ------------------------------------------------


def _rule(group: str, resource: str, *verbs: str) -> dict[str, Any]:
    return {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}


def manager_objects(namespace: str, runtime: RoutingRuntime, idle_seconds: float) -> list[dict[str, Any]]:
    """The routing manager of a namespace: its Deployment first, then its and the routers' RBAC.

    The plugin creates them in this order and sets each RBAC object's ownerReference to the
    Deployment (and the code ConfigMap's, when the code is shipped), so deleting the Deployment
    (as the idle manager does itself) removes them all. Least privilege: the manager reads route
    pods and deletes finished ones, manages the objects above and patches Services' selectors;
    routers may only read ConfigMaps.
    """
    manager_labels = labels("routing-manager")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": MANAGER_NAME,
            "namespace": namespace,
            "labels": manager_labels,
            "annotations": {ANN_RUNTIME: runtime.key},
        },
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {COMPONENT: "routing-manager"}},
            "template": {
                "metadata": {"labels": manager_labels},
                "spec": {
                    "serviceAccountName": MANAGER_NAME,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": pod_security(),
                    "volumes": runtime.code.volumes(),
                    "containers": [
                        {
                            "name": "manager",
                            "image": runtime.python_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": command("manager"),
                            "env": [
                                {"name": "MANAGER_NAMESPACE", "value": namespace},
                                *runtime.env(),
                                {"name": "MANAGER_IDLE_SECONDS", "value": f"{idle_seconds:g}"},
                            ],
                            "volumeMounts": runtime.code.mounts(),
                            "securityContext": container_security(),
                            "resources": resources("10m", "32Mi", "500m", "128Mi"),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                },
            },
        },
    }
    manager_rules = [
        _rule("", "pods", "get", "list", "watch", "delete"),
        _rule("", "services", "get", "list", "create", "patch", "delete"),
        _rule("", "configmaps", "get", "list", "create", "update", "delete"),
        _rule("apps", "deployments", "get", "list", "create", "update", "patch", "delete"),
        _rule("networking.k8s.io", "ingresses", "get", "list", "create", "delete"),
    ]
    router_rules = [_rule("", "configmaps", "get")]
    objects: list[dict[str, Any]] = [deployment]
    for name, rules in ((MANAGER_NAME, manager_rules), (ROUTER_SA, router_rules)):
        meta = {"name": name, "namespace": namespace, "labels": manager_labels}
        objects += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta), "rules": rules},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": dict(meta),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        ]
    return objects
