"""Isolated routes: only requests tagged with a route reach this machine; the workload is untouched.

For a route R of service S the plugin

1. makes sure the namespace's routing manager runs (:func:`ensure_manager`; idempotent);
2. creates a **route pod**: S's pod template with the target container swapped for the agent,
   labelled with R and S but not with S's own labels (the Service must not select it), with
   ``restartPolicy: Never`` and an agent that exits once no client has been connected for the
   restore TTL (so a killed session's route pod ends and the manager deletes it);
3. opens the tunnel to it, proves the route live with a canary — an HTTP request carrying
   ``kubernetes-route-as: R``, dialled in-cluster to S, that must come back through the router
   to this route's tunnel — and imports the environment.

The manager reacts to route pods appearing and going (see ``pytest_bridge_routing.manager``).
Closing a route deletes its pod; the manager then restores S once its last route is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import getpass
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pytest_bridge_agent.runtime import Code
from pytest_bridge_routing import nginxconf
from pytest_bridge_routing import objects as ro

from pytest_bridge.cluster import bundle, kube, policy
from pytest_bridge.cluster.permissions import required_permissions_check
from pytest_bridge.core import timing
from pytest_bridge.core.errors import ConflictError, ConnectError, ForbiddenError, NotFoundError
from pytest_bridge.core.patch import (
    CONTAINER_ANNOTATION,
    SESSION_ANNOTATION,
    SESSION_LABEL,
    AgentSpec,
    add_code_volumes,
    agent_container,
    token_sha256,
)
from pytest_bridge.core.plan import BridgePlan, pod_template_spec, workload_template_container
from pytest_bridge.core.rbac import INSTALLED_LABEL, Permission, describe, missing_from
from pytest_bridge.local.ports import free_port, port_free
from pytest_bridge.orchestration.connection import PULL_FAILURES, AgentStartCheck, BridgedService, Connection
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

if TYPE_CHECKING:
    from pytest_bridge.core.bridgesettings import BridgeSettings

T = TypeVar("T")

__all__ = [
    "ROUTE_HEADER",
    "Route",
    "RouteHost",
    "RoutePool",
    "claim_patch",
    "close_pools",
    "close_route",
    "ensure_manager",
    "open_route",
    "pool_pod",
    "route_name",
    "route_pod",
    "sweep_stale_routes",
]


class RouteHost(Protocol):
    """What isolated routes need of the session that opens them (``BridgeSession`` is one).

    Declared here, by the side that uses it, so this module never imports the session: the
    session imports this one to open routes, and hands itself over as the host.
    """

    session_id: str
    route_permissions_checked: bool  # the route permissions are checked once per session
    route_pools: dict[str, RoutePool]  # warm route pods per service, guarded by ``lock``
    lock: threading.Lock
    closed: bool

    @property
    def settings(self) -> BridgeSettings: ...

    @property
    def client(self) -> kube.Kube: ...

    def plan_service(self, k: kube.Kube, service: str, *, claimed: set[int] | None = None) -> BridgePlan:
        """The plan of ``service`` as the cluster has it now."""
        ...

    def read_workload(self, k: kube.Kube, plan: BridgePlan) -> dict[str, Any]:
        """The live workload ``plan`` bridges."""
        ...

    def open_tunnel(
        self, k: kube.Kube, ns: str, pod: str, plan: BridgePlan, token: str, *, follow: str | None = None
    ) -> BackgroundTunnel:
        """The tunnel to the agent in ``pod``, connected and proven to run this plugin's code."""
        ...

    def import_environment(
        self,
        k: kube.Kube,
        conn: Connection,
        pod_name: str,
        template_container: dict[str, Any],
        dir_name: str | None = None,
    ) -> BridgedService:
        """The environment and volume files of ``conn``'s agent pod, imported into the session directory."""
        ...


ROUTE_HEADER = ro.ROUTE_HEADER
_PREFIX_ENV = ("PYTEST_BRIDGE_ROUTE_PREFIX", "CI_JOB_NAME", "GITHUB_JOB", "BUILD_TAG")
MAX_HOST = 253
ROUTE_CANARY_CONNECTIONS = 8  # tagged canaries at once that must all come back for a route to be live
STALE_AFTER = 300.0  # seconds: a route pod this old without a client has outlived any restore TTL we set


# --- route names (pure) ------------------------------------------------------------------------


def _clean(text: str, limit: int) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:limit].strip("-")


def route_name(
    prefix: str | None = None,
    worker: str | None = None,
    environ: Mapping[str, str] | None = None,
    token: Callable[[int], str] = secrets.token_hex,
) -> str:
    """``<prefix>[-<worker>]-<random>``: a DNS label of at most 30 characters, distinct per call.

    The prefix is the given one, else the CI job or user name (cut to 12 characters); the
    xdist worker id (``gw3`` → ``w3``) keeps workers apart even in their prefix; 6 random hex
    characters keep sessions and tests apart.
    """
    env = os.environ if environ is None else environ
    base = prefix or next((env[name] for name in _PREFIX_ENV if env.get(name)), "") or _user()
    parts = [_clean(base, 12) or "route"]
    if worker:
        parts.append(_clean(worker.replace("gw", "w"), 6))
    parts.append(token(3))
    return ro.check_route_name("-".join(p for p in parts if p))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "route"


def check_hosts_fit(route: str, hosts: Iterable[str]) -> None:
    """ValueError if ``<route>.<host>`` is not a valid host name for some ingress host."""
    for host in hosts:
        if len(route) + 1 + len(host) > MAX_HOST:
            raise ValueError(f"route {route!r} makes host {route}.{host} longer than {MAX_HOST} characters")


# --- the route pod (pure) ----------------------------------------------------------------------


def route_pod_name(service: str, route: str) -> str:
    return ro.dns_label(service, route)


def route_labels(service: str, route: str, session: str) -> dict[str, str]:
    return ro.labels("route", **{ro.LABEL_ROUTE: route, ro.LABEL_ROUTE_SERVICE: service, SESSION_LABEL: session})


def route_pod(
    workload: Mapping[str, Any],
    plan: BridgePlan,
    agent: AgentSpec,
    route: str,
    *,
    exit_when_idle: float,
    observe: Sequence[str] = (),
) -> dict[str, Any]:
    """The Pod that serves ``route``: the workload's pod spec with the agent in the target container."""
    ro.check_route_name(route)
    if workload.get("kind") == "Pod":
        spec = copy.deepcopy(dict(workload["spec"]))
        for key in ("nodeName", "ephemeralContainers"):
            spec.pop(key, None)
    else:
        spec = copy.deepcopy(dict(pod_template_spec(workload)))
    original = spec["containers"][plan.container_index]
    container = agent_container(original, plan, replace(agent, exit_when_idle=exit_when_idle), spec)
    add_code_volumes(spec, agent.code)
    if "readinessProbe" in container:  # a route counts from Ready: probe often, the agent starts fast
        container["readinessProbe"]["periodSeconds"] = 1
    spec["containers"][plan.container_index] = container
    spec["restartPolicy"] = "Never"
    annotations = {
        ro.ANN_ROUTE_ON_HEADER: f"{ROUTE_HEADER}={route}",
        SESSION_ANNOTATION: agent.session,
        CONTAINER_ANNOTATION: plan.container,
    }
    if observe:
        annotations[ro.ANN_OBSERVE] = ",".join(observe)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": route_pod_name(plan.service, route),
            "namespace": plan.namespace,
            "labels": route_labels(plan.service, route, agent.session),
            "annotations": annotations,
        },
        "spec": spec,
    }


def pool_pod_name(service: str, token: Callable[[int], str] = secrets.token_hex) -> str:
    return ro.dns_label(service, "pool", token(3))


def pool_pod(
    workload: Mapping[str, Any], plan: BridgePlan, agent: AgentSpec, name: str, *, exit_when_idle: float
) -> dict[str, Any]:
    """A warm route pod nobody has claimed: the route pod without a route.

    Labelled with the pool (its service) instead of a route, and without the route-on-header
    annotation: the Service does not select it (no app labels) and no router sends it anything
    (routers only know pods with a route label). :func:`claim_patch` turns it into a route pod.
    """
    pod = route_pod(workload, plan, agent, "pool", exit_when_idle=exit_when_idle)
    meta = pod["metadata"]
    meta["name"] = name
    meta["labels"] = ro.labels(
        "route", **{ro.LABEL_POOL: plan.service, ro.LABEL_ROUTE_SERVICE: plan.service, SESSION_LABEL: agent.session}
    )
    meta["annotations"].pop(ro.ANN_ROUTE_ON_HEADER)
    return pod


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def claim_patch(service: str, route: str) -> list[dict[str, Any]]:
    """The JSON Patch that makes a warm pod of ``service``'s pool the pod of ``route``.

    The ``test`` makes a claim atomic: a pod someone else claimed (or that is not in the pool)
    fails the patch as a whole, so a pod is never routed twice.
    """
    ro.check_route_name(route)
    pool = "/metadata/labels/" + _pointer(ro.LABEL_POOL)
    return [
        {"op": "test", "path": pool, "value": service},
        {"op": "remove", "path": pool},
        {"op": "add", "path": "/metadata/labels/" + _pointer(ro.LABEL_ROUTE), "value": route},
        {
            "op": "add",
            "path": "/metadata/annotations/" + _pointer(ro.ANN_ROUTE_ON_HEADER),
            "value": f"{ROUTE_HEADER}={route}",
        },
    ]


def unclaim_patch(service: str, route: str) -> list[dict[str, Any]]:
    """The JSON Patch that gives the pod of ``route`` back to ``service``'s pool (:func:`claim_patch` undone).

    The ``test`` makes it apply only to the pod that still serves ``route``.
    """
    ro.check_route_name(route)
    route_label = "/metadata/labels/" + _pointer(ro.LABEL_ROUTE)
    return [
        {"op": "test", "path": route_label, "value": route},
        {"op": "remove", "path": route_label},
        {"op": "remove", "path": "/metadata/annotations/" + _pointer(ro.ANN_ROUTE_ON_HEADER)},
        {"op": "add", "path": "/metadata/labels/" + _pointer(ro.LABEL_POOL), "value": service},
    ]


def http_port(plan: BridgePlan) -> int | None:
    """The first service port the router treats as HTTP (where a canary can carry the header)."""
    for port in plan.service_ports:
        spec = {"name": port.name or "", "appProtocol": port.app_protocol or ""}
        with contextlib.suppress(ValueError):
            if nginxconf.protocol_for(spec) == "http":
                return port.port
    return None


def canary_request(host: str, route: str) -> bytes:
    return (
        f"GET /.pytest-bridge/canary HTTP/1.1\r\nHost: {host}\r\n{ROUTE_HEADER}: {route}\r\n"
        "User-Agent: pytest-bridge-canary\r\nConnection: close\r\n\r\n"
    ).encode()


# --- the route ---------------------------------------------------------------------------------


@dataclass
class Route:
    """One isolated route: what a test needs to send its own traffic to its own local process."""

    name: str
    service: str
    namespace: str
    pod: str
    bridged: BridgedService
    ingress_hosts: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    tunnel: BackgroundTunnel | None = field(default=None, repr=False)
    # Claimed from the session's pool: closing it gives the pod back instead of deleting it.
    warm: _Warm | None = field(default=None, repr=False, compare=False)
    pool: RoutePool | None = field(default=None, repr=False, compare=False)

    @property
    def header(self) -> dict[str, str]:
        """The header to send so a request takes this route: ``{"kubernetes-route-as": name}``."""
        return {ROUTE_HEADER: self.name}

    @property
    def headers(self) -> dict[str, str]:
        return self.header

    @property
    def hosts(self) -> list[str]:
        """``<route>.<host>`` for each ingress host of the namespace."""
        return [f"{self.name}.{host}" for host in self.ingress_hosts]

    @property
    def urls(self) -> list[str]:
        """``http://<route>.<host>/`` for each ingress host of the namespace."""
        return [f"http://{host}/" for host in self.hosts]

    @property
    def local_ports(self) -> dict[int, int]:
        return dict(self.bridged.local_ports)

    @property
    def local_port(self) -> int:
        return self.bridged.local_port

    @property
    def env(self) -> dict[str, str]:
        return dict(self.bridged.env)

    @property
    def session_dir(self) -> Path:
        return self.bridged.session_dir

    def url(self, service: str, port: int | None = None, path: str = "") -> str:
        """URL of a cluster service by name (as the local process reaches it)."""
        return self.bridged.url(service, port, path)


# --- cluster operations ------------------------------------------------------------------------


def required_permissions() -> list[Permission]:
    """(verb, API group, resource[, name]) that routes use (on top of reading services and pods).

    Not the routing manager's RBAC: an admin installs it (routing-manager.yaml), or
    :func:`ensure_manager` checks that the user holds what it grants before creating it.
    """
    return [
        ("get", "", "pods"),
        ("list", "", "pods"),
        ("create", "", "pods"),
        ("delete", "", "pods"),
        ("patch", "", "pods"),  # the propagation check's "observe" annotation
        ("get", "", "pods/proxy"),  # router stats, and whether another session is alive
        ("list", "networking.k8s.io", "ingresses"),
        ("get", "", "pods/portforward"),  # the WebSocket upgrade is a GET
        ("create", "", "pods/portforward"),
        ("get", "", "configmaps"),  # the manager's code ConfigMap (--bridge-code=configmap)
        ("create", "", "configmaps"),
        ("patch", "", "configmaps"),
        ("get", "apps", "deployments", ro.MANAGER_NAME),
        ("list", "apps", "deployments"),  # the manager's and routers' Deployments, for refused pods
        ("create", "apps", "deployments"),  # the routing manager
        ("delete", "apps", "deployments", ro.MANAGER_NAME),  # replacing an idle manager of another version
        ("get", "rbac.authorization.k8s.io", "roles", ro.MANAGER_NAME),  # installed by an admin?
        ("get", "rbac.authorization.k8s.io", "roles", ro.ROUTER_SA),
    ]


def _create_or_exists(what: str, create: Callable[..., Any], *args: Any) -> bool:
    try:
        kube.call(what, create, *args)
    except ConflictError:
        return False
    return True


def routing_runtime(settings: BridgeSettings, code: bundle.Bundle) -> ro.RoutingRuntime:
    """What this plugin's routing manager, routers and route pods run (the manager's code ConfigMap)."""
    return ro.RoutingRuntime(
        python_image=settings.agent_image,
        nginx_image=settings.routing_image,
        code=bundle.code_for(settings.code, code, bundle.configmap_name(code)),
    )


@timing.timed("ensure manager")
def ensure_manager(
    k: kube.Kube,
    namespace: str,
    *,
    runtime: ro.RoutingRuntime,
    code: bundle.Bundle,
    idle_seconds: float,
    report: Callable[[str], None] = lambda _: None,
) -> None:
    """The routing manager of ``namespace`` runs ``runtime`` (created with its RBAC if not); idempotent.

    A manager that is removing itself (idle) is waited for, then created afresh. One of another
    version (other code or images) is replaced while it serves no route, and refused with a
    message naming both versions while it does. RBAC objects and the code ConfigMap left from an
    earlier manager are adopted by the new Deployment.
    """
    name = ro.MANAGER_NAME
    deadline = time.monotonic() + 60
    while True:
        try:
            current: Any = kube.call("read the routing manager", k.apps.read_namespaced_deployment, name, namespace)
        except NotFoundError:
            break
        if current.metadata.deletion_timestamp is None:
            annotations = current.metadata.annotations or {}
            if annotations.get(ro.ANN_RUNTIME) == runtime.key:
                _ensure_manager_code(k, namespace, runtime, code, current)
                return
            _retire_other_manager(k, namespace, annotations.get(bundle.VERSION_ANNOTATION), code, report)
        if time.monotonic() > deadline:
            raise ConnectError(f"the routing manager {name} in {namespace} is stuck deleting")
        time.sleep(0.2)
    deployment, *rbac = ro.manager_objects(namespace, runtime, idle_seconds)
    deployment["metadata"]["annotations"][bundle.VERSION_ANNOTATION] = code.version
    # An admin may have installed the manager's RBAC (routing-manager.yaml): then the user needs
    # none of its verbs, and the objects are neither created nor adopted (they outlive the manager).
    installed = _installed_manager_rbac(k, namespace, rbac)
    if not installed:
        _create_manager_rbac(k, namespace, rbac)
    report(f"deploying the routing manager in namespace {namespace}")
    _create_or_exists("create the routing manager", k.apps.create_namespaced_deployment, namespace, deployment)
    created: Any = kube.call("read the routing manager", k.apps.read_namespaced_deployment, name, namespace)
    owner = _manager_owner(created)
    patchers: dict[str, Callable[..., Any]] = {
        "ServiceAccount": k.core.patch_namespaced_service_account,
        "Role": k.rbac.patch_namespaced_role,
        "RoleBinding": k.rbac.patch_namespaced_role_binding,
    }
    for obj in [] if installed else rbac:
        body = {"metadata": {"ownerReferences": [owner]}}
        kube.call(
            f"adopt {obj['kind']} {obj['metadata']['name']}",
            patchers[obj["kind"]],
            obj["metadata"]["name"],
            namespace,
            body,
        )
    _ensure_manager_code(k, namespace, runtime, code, created)


def _installed_manager_rbac(k: kube.Kube, namespace: str, objects: list[dict[str, Any]]) -> bool:
    """Whether an admin installed the manager's and routers' Roles (label ``INSTALLED_LABEL``).

    ForbiddenError, before anything is created, if an installed Role lacks a verb this version's
    manager needs (installed by an older version). Roles we may not read count as not installed.
    """
    lacking: list[str] = []
    for obj in objects:
        if obj["kind"] != "Role":
            continue
        name = obj["metadata"]["name"]
        try:
            role: Any = kube.call(f"read Role {name}", k.rbac.read_namespaced_role, name, namespace)
        except (NotFoundError, ForbiddenError):
            return False
        if (role.metadata.labels or {}).get(INSTALLED_LABEL) != "true":
            return False
        have = [k.to_dict(rule) for rule in role.rules or []]
        lacking += [f"{name}: {describe(p)}" for p in missing_from(have, obj["rules"])]
    if lacking:
        raise ForbiddenError(
            f"the routing manager's RBAC installed in namespace {namespace!r} lacks what this version's manager "
            f"needs ({', '.join(lacking)}); nothing was changed. Ask an admin to re-apply "
            f"`pytest-bridge rbac --routing-manager | kubectl -n {namespace} apply -f -`",
            namespace=namespace,
        )
    return True


def _create_manager_rbac(k: kube.Kube, namespace: str, objects: list[dict[str, Any]]) -> None:
    """The manager's and routers' ServiceAccounts, Roles and RoleBindings, created by the user.

    Kubernetes lets us grant only what we hold ourselves: ask first, so a missing permission is
    named, with the alternative (an admin installs them), before anything is created.
    """
    granted: list[Permission] = sorted(
        {
            (verb, group, resource)
            for obj in objects
            if obj["kind"] == "Role"
            for rule in obj["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    )
    granted += [(verb, "", "serviceaccounts") for verb in ("create", "patch")] + [
        (verb, "rbac.authorization.k8s.io", kind) for kind in ("roles", "rolebindings") for verb in ("create", "patch")
    ]
    required_permissions_check(
        k, granted, what="deploy the routing manager (it gets these permissions)",
        hint=f"Or have an admin install the routing manager's RBAC in the namespace once (`pytest-bridge rbac "
        f"--routing-manager | kubectl -n {namespace} apply -f -`): then the Role of `pytest-bridge rbac` is enough",
    )  # fmt: skip
    creators: dict[str, Callable[..., Any]] = {
        "ServiceAccount": k.core.create_namespaced_service_account,
        "Role": k.rbac.create_namespaced_role,
        "RoleBinding": k.rbac.create_namespaced_role_binding,
    }
    for obj in objects:
        _create_or_exists(f"create {obj['kind']} {obj['metadata']['name']}", creators[obj["kind"]], namespace, obj)


def _manager_owner(deployment: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": ro.MANAGER_NAME, "uid": deployment.metadata.uid}


def _ensure_manager_code(
    k: kube.Kube, namespace: str, runtime: ro.RoutingRuntime, code: bundle.Bundle, deployment: Any
) -> None:
    """The code ConfigMap the manager, its routers and route pods mount exists and is the manager's.

    Created after the Deployment (the kubelet retries the mount meanwhile). One left by an earlier
    manager of the same code may still be waiting for the garbage collector: adopting it keeps it.
    """
    name = runtime.code.configmap
    if name is None:
        return
    owner = _manager_owner(deployment)
    key = (namespace, name, str(owner["uid"]))
    if key in _CODE_ENSURED:  # for this very Deployment, which owns it: the next route need not read ~100 KB
        return
    try:
        existing: Any = kube.call("read the routing code", k.core.read_namespaced_config_map, name, namespace)
    except NotFoundError:
        manifest = bundle.configmap(code, name, namespace, labels=ro.labels("code"), owner=owner)
        bundle.ship(k, manifest, code, exist_ok=True)
        _CODE_ENSURED.add(key)
        return
    if not any(ref.uid == owner["uid"] for ref in existing.metadata.owner_references or []):
        kube.call(
            "adopt the routing code", k.core.patch_namespaced_config_map, name, namespace,
            {"metadata": {"ownerReferences": [owner]}},
        )  # fmt: skip
    _CODE_ENSURED.add(key)


_CODE_ENSURED: set[tuple[str, str, str]] = set()  # (namespace, code ConfigMap, manager Deployment uid) seen right


def _retire_other_manager(
    k: kube.Kube, namespace: str, their_version: str | None, code: bundle.Bundle, report: Callable[[str], None]
) -> None:
    """Delete a routing manager of another version, unless it still serves routes (then ConflictError)."""
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, namespace, label_selector=ro.LABEL_ROUTE)
    live = sorted(
        p.metadata.name
        for p in pods.items
        if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")
    )
    theirs = f"pytest-bridge {their_version}" if their_version else "another pytest-bridge version"
    if live:
        raise ConflictError(
            f"the routing manager in namespace {namespace!r} runs {theirs} (or other images) and serves "
            f"{len(live)} route(s) ({', '.join(live[:3])}{', ...' if len(live) > 3 else ''}); this plugin is "
            f"pytest-bridge {code.version} with --bridge-agent-image/--bridge-routing-image as set. Wait for those "
            "routes to end, or run the same version and images; nothing was changed"
        )
    report(f"replacing the idle routing manager in namespace {namespace} ({theirs}) with this version's")
    with contextlib.suppress(NotFoundError):
        kube.call(
            "delete the routing manager of another version", k.apps.delete_namespaced_deployment,
            ro.MANAGER_NAME, namespace, propagation_policy="Background",
        )  # fmt: skip


@timing.timed("stale-route sweep")
def sweep_stale_routes(
    k: kube.Kube, namespace: str, alive: Callable[[str], bool], report: Callable[[str], None]
) -> None:
    """Delete route pods of sessions that are gone (the agent has no client).

    Routes have no token Secrets any more (pods carry only the token's SHA-256), so none are swept:
    users need no access to Secrets.
    """
    selector = f"{ro.COMPONENT}=route"
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, namespace, label_selector=selector)
    for pod in pods.items:
        session = (pod.metadata.labels or {}).get(SESSION_LABEL, "")
        if pod.metadata.deletion_timestamp:
            continue
        finished = pod.status.phase in ("Succeeded", "Failed")
        # A young pod may belong to a session that is still connecting (no client yet): only
        # finished pods, or ones old enough that their agent should have exited, are stale.
        if not finished and (_age(pod) < STALE_AFTER or alive(session)):
            continue
        report(f"removing stale route pod {pod.metadata.name} (session {session})")
        with contextlib.suppress(NotFoundError):
            kube.call(
                "delete a stale route pod",
                k.core.delete_namespaced_pod,
                pod.metadata.name,
                namespace,
                grace_period_seconds=0,
            )


def _age(obj: Any) -> float:
    created = obj.metadata.creation_timestamp
    return time.time() - created.timestamp() if created is not None else 0.0


@timing.timed("wait for the route pod (plugin polls)")
def _wait_for_pod(k: kube.Kube, namespace: str, name: str, image: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    start_check = AgentStartCheck(image, f"the route pod {name}")
    last = "not created yet"
    while time.monotonic() < deadline:
        try:
            pod: Any = kube.call("read the route pod", k.core.read_namespaced_pod, name, namespace)
        except NotFoundError:
            time.sleep(0.1)
            continue
        start_check.check(pod)
        if pod.status.phase in ("Succeeded", "Failed"):
            raise ConnectError(f"the route pod {name} ended ({pod.status.phase}) before it was ready")
        if ro.is_serving(k.to_dict(pod)):
            return pod
        last = f"phase {pod.status.phase}"
        time.sleep(0.1)
    raise ConnectError(
        f"the route pod {name} was not ready within {timeout:.0f}s ({last}); check `kubectl describe pod {name}`"
    )


@timing.timed("open the tunnel")
def _open_tunnel(
    bs: RouteHost, k: kube.Kube, pod: str, plan: BridgePlan, *, token: str, timeout: float
) -> BackgroundTunnel:
    """The tunnel to a route pod that has just started: its agent may need a moment to listen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return bs.open_tunnel(k, k.namespace, pod, plan, token)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _canary_burst(
    t: Any, plan: BridgePlan, port: int, route: str, count: int, *, until_arrived: bool
) -> tuple[list[bytes], int] | None:
    """``count`` canaries tagged with ``route``, dialled in-cluster to the Service's ``port`` side by side.

    Returns (the first bytes each got back, b"" for none; how many reached this tunnel), or None
    when the burst failed or took over 2 s. Waits until every canary was answered, or, with
    ``until_arrived``, until all ``count`` reached this tunnel (a canary that reaches us is
    answered only when the local side is, if ever).
    """
    host = f"{plan.service}.{plan.namespace}.svc.cluster.local"
    before = t.reverse_total
    streams: list[Any] = []
    answers: list[asyncio.Future[bytes]] = []

    async def send_one() -> None:
        _, stream = await t.open_stream(host, port)
        streams.append(stream)
        stream.write(canary_request(f"{plan.service}:{port}", route))
        answers.append(asyncio.ensure_future(stream.read(1)))

    try:
        async with asyncio.timeout(2.0):
            async with asyncio.TaskGroup() as group:  # side by side; one failure cancels the others
                for _ in range(count):
                    group.create_task(send_one())
            while not all(a.done() for a in answers):
                if until_arrived and t.reverse_total - before >= count:
                    break
                await asyncio.sleep(0.005)
        got = [a.result() if a.done() and not a.cancelled() and a.exception() is None else b"" for a in answers]
        return got, t.reverse_total - before
    except Exception:
        return None
    finally:
        for answer in answers:
            answer.cancel()
        for stream in streams:
            stream.close()


@timing.timed("canary through the router")
def prove_live(
    tunnel: BackgroundTunnel,
    plan: BridgePlan,
    route: str,
    timeout: float,
    diagnose: Callable[[], str | None] = lambda: None,
    *,
    notes: Callable[[], list[str]] = lambda: [],
) -> None:
    """Requests tagged with ``route``, dialled in-cluster to the Service, must come back to us.

    One canary at a time until one comes back (cheap to repeat while the router reloads), then
    a burst of :data:`ROUTE_CANARY_CONNECTIONS` side by side that must all come back: while
    kube-proxy still lists the original pods beside the router (the EndpointSlice controller
    swaps slices in more than one write), it picks per connection, so one canary can pass while
    the next request goes to the original pod. (A clean-clone CI run failed that way: the first
    tagged request after "live".)

    ``diagnose`` is asked about once a second why not yet (:func:`routing_problem`): a problem
    that will not go away by waiting (an image that cannot be pulled, pods refused by policy,
    an object the routing manager cannot route) fails the route at once instead of at the
    timeout. ``notes`` (what the manager skipped without blocking a route) go into the timeout's
    message.
    """
    port = http_port(plan)
    if port is None:
        raise ConnectError(
            f"service {plan.service!r} has no HTTP port (by name 'http…'/'grpc…' or appProtocol), "
            "so it cannot be routed on the kubernetes-route-as header"
        )
    host = f"{plan.service}.{plan.namespace}.svc.cluster.local"

    async def probe(count: int) -> bool:
        burst = await _canary_burst(tunnel.tunnel, plan, port, route, count, until_arrived=True)
        return burst is not None and burst[1] >= count

    deadline = time.monotonic() + timeout
    next_diagnosis = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if _scout_then_burst(tunnel, probe):
            return
        if time.monotonic() > next_diagnosis:
            next_diagnosis = time.monotonic() + 1.0
            problem = diagnose()
            if problem:
                raise ConnectError(f"route {route!r} cannot go live: {problem}")
        time.sleep(0.02)
    found = notes()
    raise ConnectError(
        f"route {route!r}: a canary to {host}:{port} with {ROUTE_HEADER}: {route} never reached the route pod "
        f"within {timeout:.0f}s; is the routing manager running (`kubectl -n {plan.namespace} logs "
        f"deploy/{ro.MANAGER_NAME}`)?" + (f" It notes: {'; '.join(found)}" if found else "")
    )


def prove_unrouted(
    tunnel: BackgroundTunnel,
    plan: BridgePlan,
    route: str,
    timeout: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Whether requests tagged with ``route`` no longer reach this tunnel's pod, within ``timeout``.

    The inverse of :func:`prove_live`, for a route pod given back to the pool: one canary, then a
    burst of them, with the old route's header, dialled in-cluster to the Service, must all be
    answered by someone else (the original pods) while not one reaches this tunnel. Until then the router still has the
    old route, and the pod must not serve a new one: a late request of the old test would reach the
    next test's local process.
    """
    port = http_port(plan)
    if port is None:
        return False

    async def probe(count: int) -> bool:
        burst = await _canary_burst(tunnel.tunnel, plan, port, route, count, until_arrived=False)
        return burst is not None and all(burst[0]) and burst[1] == 0  # every one answered elsewhere, none here

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cancelled():
        if _scout_then_burst(tunnel, probe):
            return True
        time.sleep(0.05)
    return False


def _scout_then_burst(tunnel: BackgroundTunnel, probe: Callable[[int], Coroutine[Any, Any, bool]]) -> bool:
    """``probe`` with one canary (cheap to repeat while the router reloads), then, once that passed, the burst."""
    return bool(tunnel._call(probe(1), 6)) and bool(tunnel._call(probe(ROUTE_CANARY_CONNECTIONS), 6))


def manager_findings(k: kube.Kube, service: str, route: str) -> tuple[list[str], list[str]]:
    """What the routing manager says blocks ``route`` of ``service``, and its notes (its status ConfigMap)."""
    try:
        status: Any = kube.call(
            "read the routing status", k.core.read_namespaced_config_map, ro.STATUS_CONFIGMAP, k.namespace
        )
    except (NotFoundError, ForbiddenError):
        return [], []  # no problems (the manager deletes it when there are none), or not ours to read
    return ro.problems_for(status.data, service, route)


def routing_problem(k: kube.Kube, service: str, settings: BridgeSettings, route: str = "") -> str | None:
    """Why the routing manager or ``service``'s router cannot run, if that is visible in the cluster.

    First what the manager itself found it cannot route (a malformed object it names; see
    ``pytest_bridge_routing.manager``). Then the pods: made by Deployments, a refusal (policy) is a
    ``ReplicaFailure`` condition and an image that cannot be pulled is a container waiting in
    ``ErrImagePull``; each is named with the setting that chooses the image.
    """
    blocking, _ = manager_findings(k, service, route)
    if blocking:
        return f"the routing manager cannot route it: {'; '.join(blocking)}"
    ns = k.namespace
    deployments: Any = kube.call(
        "list routing deployments", k.apps.list_namespaced_deployment, ns, label_selector=ro.COMPONENT
    )
    watched = {ro.MANAGER_NAME: "the routing manager", ro.router_name(service): f"the router of {service!r}"}
    for deployment in deployments.items:
        what = watched.get(deployment.metadata.name)
        refused = what and policy.replica_failure(k.to_dict(deployment).get("status"))
        if refused:
            return f"the cluster refuses the pods of {what} ({refused}); nothing of the workload was changed"
    pods: Any = kube.call(
        "list routing pods", k.core.list_namespaced_pod, ns,
        label_selector=f"{ro.COMPONENT} in (routing-manager,router)",
    )  # fmt: skip
    images = {"router": settings.agent_image, "manager": settings.agent_image, "nginx": settings.routing_image}
    flags = {"router": "--bridge-agent-image", "manager": "--bridge-agent-image", "nginx": "--bridge-routing-image"}
    for pod in pods.items:
        labels = pod.metadata.labels or {}
        if labels.get(ro.COMPONENT) == "router" and labels.get(ro.LABEL_ROUTER) != service:
            continue
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting and waiting.reason in PULL_FAILURES:
                return (
                    f"pod {pod.metadata.name} cannot pull the image {status.image or images.get(status.name)!r} "
                    f"({waiting.reason}: {waiting.message or ''}); make it pullable from the cluster (mirror it) "
                    f"and pass {flags.get(status.name, '--bridge-agent-image')}"
                )
    return None


def endpoints_are_router(k: kube.Kube, service: str) -> bool:
    """Whether the Service's endpoints are its router pods only (the selector switch has landed)."""
    from kubernetes import client  # noqa: PLC0415

    slices: Any = kube.call(
        "list endpoints", client.DiscoveryV1Api(k.api_client).list_namespaced_endpoint_slice, k.namespace,
        label_selector=f"kubernetes.io/service-name={service}",
    )  # fmt: skip
    addresses = {a for item in slices.items for e in item.endpoints or [] for a in e.addresses}
    pods: Any = kube.call(
        "list routers", k.core.list_namespaced_pod, k.namespace,
        label_selector=f"{ro.COMPONENT}=router,{ro.LABEL_ROUTER}={service}",
    )  # fmt: skip
    router_ips = {p.status.pod_ip for p in pods.items if p.status.pod_ip}
    return bool(addresses) and addresses <= router_ips


def wait_host_routers(
    k: kube.Kube,
    tunnel: BackgroundTunnel,
    services: Iterable[str],
    deadline: float,
    proven: dict[str, str] | None = None,
) -> list[str]:
    """Until every Service behind an Ingress answers through its router (header injected for ``<route>.`` hosts).

    The route's own Service is proven by the canary; the others (a frontend behind the Ingress)
    get their routers at the same time but are switched to them one reconcile later, so a
    request on ``<route>.<host>`` right after the canary could still reach the frontend's pods
    directly and lose the route. Proven as the route is: first the EndpointSlices (the API's
    view), then a burst of requests dialled in-cluster that the router answers itself
    (:data:`nginxconf.ROUTER_PROBE_PATH`): kube-proxy lags the API, and a clean-clone CI run had
    a ``<route>.<host>`` request reach the frontend's pod right after the slices had switched.
    Only Services the manager can route are waited for. Returns those still not served by their
    router at the deadline.

    ``proven`` (service -> its resourceVersion when last proven here; updated) skips a Service
    proven before and not changed since: its selector still names its router, so the next route
    of a session does not prove it again.
    """
    existing: Any = kube.call("list services", k.core.list_namespaced_service, k.namespace)
    # What the manager routes: no ExternalName, none without a selector or with a damaged record.
    selecting = {s.metadata.name: k.to_dict(s) for s in existing.items if ro.service_problem(k.to_dict(s)) is None}
    versions = {name: str((obj.get("metadata") or {}).get("resourceVersion") or "") for name, obj in selecting.items()}
    known = proven if proven is not None else {}
    pending = sorted(
        name for name in set(services) & set(selecting) if not versions[name] or known.get(name) != versions[name]
    )
    proving = list(pending)
    while pending:
        pending = [
            name
            for name in pending
            if not (endpoints_are_router(k, name) and router_answers(tunnel, name, k.namespace, selecting[name]))
        ]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if proven is not None:
        proven.update({name: versions[name] for name in proving if name not in pending and versions[name]})
    return pending


def router_probe_request(host: str) -> bytes:
    return (
        f"GET {nginxconf.ROUTER_PROBE_PATH} HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: pytest-bridge-canary\r\nConnection: close\r\n\r\n"
    ).encode()


def is_router_answer(head: bytes, service: str) -> bool:
    """Whether a response head is ``service``'s router answering :func:`router_probe_request` itself."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 204"):
        return False
    wanted = f"{nginxconf.ROUTER_PROBE_HEADER}: {service}".lower().encode()
    return any(line.strip().lower() == wanted for line in lines[1:])


def router_answers(tunnel: BackgroundTunnel, service: str, namespace: str, service_obj: Mapping[str, Any]) -> bool:
    """Whether a burst of fresh connections to ``service``'s first HTTP port all reach its router."""
    port = next(
        (int(p["port"]) for p in (service_obj.get("spec") or {}).get("ports") or [] if _is_http(p)),
        None,
    )
    if port is None:
        return True  # nothing carries <route>.<host> requests through it: nothing to wait for
    host = f"{service}.{namespace}.svc.cluster.local"
    t = tunnel.tunnel

    async def one() -> bool:
        _, stream = await t.open_stream(host, port)
        try:
            stream.write(router_probe_request(host))
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = await stream.read(4096)
                if not chunk:
                    break
                head += chunk
            return is_router_answer(head, service)
        finally:
            stream.close()

    async def burst() -> bool:
        try:
            async with asyncio.timeout(2.0):
                answers = await asyncio.gather(*(one() for _ in range(ROUTE_CANARY_CONNECTIONS)))
            return all(answers)
        except Exception:
            return False

    return bool(tunnel._call(burst(), 6))


def _is_http(port: Mapping[str, Any]) -> bool:
    try:
        return nginxconf.protocol_for(port) == "http"
    except ValueError:
        return False


# --- the warm pool -------------------------------------------------------------------------------


@dataclass
class _Warm:
    """A warm route pod of the pool: serving, its tunnel open (so its agent never idles out)."""

    pod: str
    conn: Connection
    workload: dict[str, Any]


@dataclass
class _Recipe:
    """What a warm pod is made of (taken from the last route opened cold or warm)."""

    plan: BridgePlan
    workload: dict[str, Any]
    code: Code


class RoutePool:
    """Warm route pods of one service for one session, kept at ``size`` by a background thread.

    Per session, because a route pod's tunnel token is the session's secret. A warm pod is the
    route pod without a route (:func:`pool_pod`); taking one is one JSON Patch
    (:func:`claim_patch`), so a route only waits for its router to reload, not for the kubelet to
    start a pod. Its tunnel stays open while it waits: the agent then never counts as idle, and
    when pytest is killed it exits after the restore TTL like any route pod (the manager deletes
    finished ones; ``sweep_stale_routes`` and ``pytest-bridge cleanup`` find them by the same
    labels). After ``idle`` seconds without a route the pool deletes its pods and makes new ones
    only when the next route is opened.

    A claimed pod is on loan: the pool does not replace it, and closing its route gives it back
    (:meth:`give_back`): its labels are patched back to the pool's, and once the router is proven
    to send the old route's requests elsewhere (:func:`prove_unrouted`) it is ready for the next
    route. A run of tests then reuses the same few pods, with no pod started or deleted per test.
    A pod that cannot be given back (local ports still held, the proof failing) is deleted and
    replaced as before. Its tunnel and token stay with the session that made it.
    """

    def __init__(self, bs: RouteHost, service: str, size: int, idle: float, report: Callable[[str], None]):
        self.bs, self.service, self.size, self.idle, self.report = bs, service, size, idle, report
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a pod became ready or stopped starting
        self._ready: list[_Warm] = []
        self._recipe: _Recipe | None = None
        self._last_used = time.monotonic()
        self._closed = False
        self._wake = threading.Event()
        self._failures = 0
        self._starting = 0  # pods being made
        self._loaned = 0  # pods claimed by a route that may still come back
        self._returning = 0  # pods given back, not proven free of their old route yet
        self.proven_hosts: dict[str, str] = {}  # Ingress backends served by their routers: wait_host_routers
        self._thread = threading.Thread(target=self._run, name=f"pytest-bridge-pool-{service}", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready)

    def feed(self, recipe: _Recipe) -> None:
        """A route was opened: what to make warm pods of, and the pool counts as in use."""
        with self._lock:
            self._recipe = recipe
            self._last_used = time.monotonic()
        self._wake.set()

    def take(self, wait: float = 0.0) -> _Warm | None:
        """A warm pod (the caller claims it); the pool then makes another.

        With none ready but some starting, waits up to ``wait`` seconds for one: a pod that is
        already starting is serving sooner than one the route would start now (routes opened
        faster than the pool refills, as in a burst of tests).
        """
        deadline = time.monotonic() + wait
        with self._lock:
            self._last_used = time.monotonic()
            while not self._ready and (self._starting > 0 or self._returning > 0) and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            warm = self._ready.pop(0) if self._ready else None
            if warm is not None:
                self._loaned += 1
        self._wake.set()
        return warm

    def loan_ended(self) -> None:
        """A claimed pod will not come back (claim failed, route closed without giving it back)."""
        with self._lock:
            self._loaned = max(0, self._loaned - 1)
        self._wake.set()

    def give_back(self, warm: _Warm, route: str) -> bool:
        """Take back the pod of ``route`` (closed): False if the pool cannot, and the caller deletes it.

        The pod is made ready again in the background (unclaim patch, then :func:`prove_unrouted`).
        """
        plan = warm.conn.plan
        if plan is None or not _tunnel_up(warm):
            return False
        if not all(port_free(b.local_port) for b in plan.port_bindings):
            return False  # something still listens there: it would get the next route's requests
        with self._lock:
            if self._closed:
                return False
            self._loaned = max(0, self._loaned - 1)
            self._returning += 1
        threading.Thread(
            target=self._recycle, args=(warm, route), name="pytest-bridge-pool-return", daemon=True
        ).start()
        return True

    def _recycle(self, warm: _Warm, route: str) -> None:
        k = self.bs.client
        keep = False
        try:
            kube.call(
                f"give route pod {warm.pod} back to the pool", k.core.patch_namespaced_pod, warm.pod, k.namespace,
                unclaim_patch(self.service, route),
            )  # fmt: skip
            assert warm.conn.tunnel is not None and warm.conn.plan is not None
            keep = prove_unrouted(
                warm.conn.tunnel, warm.conn.plan, route, self.bs.settings.connect_timeout, cancelled=self._is_closed
            )
        except Exception:
            keep = False
        with self._lock:
            keep = keep and not self._closed and len(self._ready) < self.size
            if keep:
                self._ready.append(warm)
                self._returning -= 1
                self._changed.notify_all()
        if not keep:
            self.discard(warm)
            with self._lock:  # only now: close() waits for returning pods to be ready or deleted
                self._returning -= 1
                self._changed.notify_all()
        self._wake.set()

    def discard(self, warm: _Warm) -> None:
        """A warm pod that could not be claimed: its tunnel stopped, the pod deleted."""
        if warm.conn.tunnel is not None:
            with contextlib.suppress(Exception):
                warm.conn.tunnel.stop(grace=0)
        with contextlib.suppress(Exception):
            _delete(self.bs.client, self.bs.client.namespace, [("pod", warm.pod)])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
            self._changed.notify_all()
        self._wake.set()
        self._thread.join(timeout=30)
        for warm in ready:
            self.discard(warm)
        # Pods still starting are deleted by their makers when they see the pool closed.
        deadline = time.monotonic() + self.bs.settings.connect_timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._starting <= 0 and self._returning <= 0:
                    break
            time.sleep(0.05)

    def _run(self) -> None:
        """Keep ``size`` pods ready or starting (started side by side: one pod start each), drain when idle."""
        while True:
            with self._lock:
                if self._closed:
                    return
                idle = time.monotonic() - self._last_used > self.idle
                drained = self._ready if idle else []
                if idle:
                    self._ready = []
                missing = (
                    0 if idle or self._recipe is None
                    else self.size - len(self._ready) - self._starting - self._loaned - self._returning
                )  # fmt: skip
                recipe = self._recipe
                self._starting += max(missing, 0)
            for warm in drained:
                self.discard(warm)
            for _ in range(missing):
                assert recipe is not None
                threading.Thread(
                    target=self._make_one, args=(recipe,), name="pytest-bridge-pool-pod", daemon=True
                ).start()
            self._wake.wait(1.0)
            self._wake.clear()

    def _make_one(self, recipe: _Recipe) -> None:
        try:
            warm = self._make(recipe)
        except Exception as exc:
            self._failures += 1
            if self._failures in (1, 10):  # a pool that cannot fill only costs speed: say so, not more
                self.report(f"{self.service}: warm route pod not made ({exc}); routes start cold meanwhile")
            backoff = time.monotonic() + min(30.0, 2.0 * self._failures)  # holding its slot: retries slowly
            while time.monotonic() < backoff and self._is_open():
                time.sleep(0.1)
            with self._lock:
                self._starting -= 1
                self._changed.notify_all()
            return
        self._failures = 0
        with self._lock:
            keep = self._is_open()
            if keep:
                self._ready.append(warm)
                self._starting -= 1
                self._changed.notify_all()
        if not keep:  # closed while it started
            self.discard(warm)
            with self._lock:  # only now: close() waits for starting pods to be ready or deleted
                self._starting -= 1
                self._changed.notify_all()
        self._wake.set()

    def _is_open(self) -> bool:
        return not self._closed

    def _is_closed(self) -> bool:
        return self._closed

    def _make(self, recipe: _Recipe) -> _Warm:
        bs, k = self.bs, self.bs.client
        settings = bs.settings
        plan = replace(
            recipe.plan, port_bindings=tuple(replace(b, local_port=free_port()) for b in recipe.plan.port_bindings)
        )
        conn = Connection(self.service, plan)
        agent = AgentSpec(
            image=settings.agent_image, session=bs.session_id, token_sha256=token_sha256(conn.token), code=recipe.code
        )
        name = pool_pod_name(self.service)
        manifest = pool_pod(recipe.workload, plan, agent, name, exit_when_idle=settings.restore_ttl)
        kube.call(f"create warm route pod {name}", k.core.create_namespaced_pod, k.namespace, manifest)
        try:
            _wait_for_pod(k, k.namespace, name, settings.agent_image, settings.connect_timeout)
            conn.tunnel = _open_tunnel(bs, k, name, plan, token=conn.token, timeout=settings.connect_timeout)
        except BaseException:
            if conn.tunnel is not None:
                conn.tunnel.stop(grace=0)
            _delete(k, k.namespace, [("pod", name)])
            raise
        return _Warm(pod=name, conn=conn, workload=recipe.workload)


def _pool(bs: RouteHost, service: str, report: Callable[[str], None]) -> RoutePool | None:
    """The session's pool for ``service`` (started on first use), or None when pools are off."""
    if bs.settings.route_pool <= 0:
        return None
    with bs.lock:
        pool = bs.route_pools.get(service)
        if pool is None and not bs.closed:
            pool = bs.route_pools[service] = RoutePool(
                bs, service, bs.settings.route_pool, bs.settings.route_pool_idle, report
            )
    return pool


def close_pools(bs: RouteHost) -> None:
    """Stop every pool of the session and delete its warm pods (at the session's close)."""
    with bs.lock:
        pools, bs.route_pools = list(bs.route_pools.values()), {}
    for pool in pools:
        pool.close()


def _claim(bs: RouteHost, pool: RoutePool | None, route: str) -> _Warm | None:
    """A warm pod of ``pool`` claimed for ``route`` (labels patched), or None (none ready)."""
    wait = bs.settings.connect_timeout / 2
    while pool is not None and (warm := pool.take(wait)) is not None:
        if _tunnel_up(warm):
            try:
                k = bs.client
                kube.call(
                    f"claim warm route pod {warm.pod}", k.core.patch_namespaced_pod, warm.pod, k.namespace,
                    claim_patch(pool.service, route),
                )  # fmt: skip
            except Exception:  # gone, or not in the pool any more: the next one, or a cold start
                pass
            else:
                return warm
        pool.loan_ended()
        pool.discard(warm)
    return None


def _tunnel_up(warm: _Warm) -> bool:
    try:
        return warm.conn.tunnel is not None and warm.conn.tunnel.tunnel.down_since is None
    except Exception:  # stopped
        return False


def open_route(
    bs: RouteHost,
    service: str,
    route: str,
    *,
    free_ports: bool = False,
    observe: Sequence[str] = (),
    report: Callable[[str], None] = lambda _: None,
) -> Route:
    """Create (or claim from the warm pool), connect and prove route ``route`` of ``service``.

    A route with free local ports and nothing to observe takes a warm pod of the session's pool
    for ``service`` when one is ready (see :class:`RoutePool`), else starts its own pod as before.
    On failure nothing is left.
    """
    started = time.monotonic()
    k = bs.client
    ns = k.namespace
    settings = bs.settings
    if not bs.route_permissions_checked:  # once per session: 19 reviews, ~30 ms
        required_permissions_check(k, required_permissions(), what="isolated routes")
        bs.route_permissions_checked = True
    ingresses: Any = kube.call("list ingresses", k.networking.list_namespaced_ingress, ns)
    theirs = [k.to_dict(i) for i in ingresses.items if not ro.is_ours(k.to_dict(i))]
    hosts = tuple(ro.ingress_hosts(theirs))
    host_backends = set().union(*(ro.ingress_backends(i) for i in theirs)) - {service}
    try:
        check_hosts_fit(route, hosts)
    except ValueError as exc:
        raise ConnectError(str(exc)) from exc
    code = bundle.build()
    runtime = routing_runtime(settings, code)
    ensure_manager(k, ns, runtime=runtime, code=code, idle_seconds=settings.routing_idle, report=report)
    pool = _pool(bs, service, report) if free_ports and not observe else None
    prepared_at = time.monotonic()
    warm = _claim(bs, pool, route)
    created: list[tuple[str, str]] = []
    importing: Future[BridgedService] | None = None
    if warm is not None:
        conn, plan, workload, pod_name = warm.conn, warm.conn.plan, warm.workload, warm.pod
        assert plan is not None
        created.append(("pod", pod_name))
    else:
        plan = bs.plan_service(k, service)
        if free_ports:
            plan = replace(plan, port_bindings=tuple(replace(b, local_port=free_port()) for b in plan.port_bindings))
        workload = bs.read_workload(k, plan)
        conn = Connection(service, plan)  # with its own token: every route's tunnel has its own
    try:
        if warm is None:
            agent = AgentSpec(
                image=settings.agent_image, session=bs.session_id, token_sha256=token_sha256(conn.token),
                code=runtime.code,
            )  # fmt: skip
            pod_manifest = route_pod(workload, plan, agent, route, exit_when_idle=settings.restore_ttl, observe=observe)
            pod_name = pod_manifest["metadata"]["name"]
            try:
                kube.call(f"create route pod {pod_name}", k.core.create_namespaced_pod, ns, pod_manifest)
            except ForbiddenError as exc:
                refused = policy.as_policy_error(
                    f"route pod {pod_name} (the pod template of {plan.workload.kind} {plan.workload.name} "
                    "with the agent)",
                    exc,
                    "The agent keeps the workload's own security context",
                )
                if refused is None:
                    raise
                raise refused from exc
            created.append(("pod", pod_name))
            if pool is not None:  # the pool's pods start beside this one, not after it is live
                pool.feed(_Recipe(plan=plan, workload=workload, code=runtime.code))
            _wait_for_pod(k, ns, pod_name, settings.agent_image, settings.connect_timeout)
            ready_at = time.monotonic()
            conn.tunnel = _open_tunnel(bs, k, pod_name, plan, token=conn.token, timeout=settings.connect_timeout)
        else:
            ready_at = time.monotonic()  # claimed: the pod was serving and its tunnel open already
        assert conn.tunnel is not None
        # The environment comes from the pod through its tunnel, not through the router: imported
        # while the route is being proven, not after (about 0.3 s per route under load).
        original_container = dict(workload_template_container(workload, plan))
        importing = _in_thread(
            lambda: bs.import_environment(k, conn, pod_name, original_container, dir_name=f"{service}-{route}"),
            name=f"pytest-bridge-import-{route}",
        )
        prove_live(
            conn.tunnel, plan, route, settings.connect_timeout,
            diagnose=lambda: routing_problem(k, service, settings, route),
            notes=lambda: manager_findings(k, service, route)[1],
        )  # fmt: skip
        routed_at = time.monotonic()
        late = wait_host_routers(
            k, conn.tunnel, host_backends, time.monotonic() + settings.connect_timeout,
            proven=pool.proven_hosts if pool is not None else None,
        )  # fmt: skip
        if late:  # header routing works; only <route>.<host> requests may still miss the route
            report(
                f"{service}: route {route}: {', '.join(late)} behind an Ingress not served by its router yet; "
                f"`kubectl -n {ns} logs deploy/{ro.MANAGER_NAME}` says why"
            )
        live_at = time.monotonic()
        bridged = importing.result()
    except BaseException:
        if conn.tunnel is not None:
            conn.tunnel.stop(grace=0.05)  # first: an import still running through it then ends at once
        if importing is not None:
            with contextlib.suppress(BaseException):  # waited for: it writes into the session directory
                if importing.exception(timeout=settings.connect_timeout) is None:
                    shutil.rmtree(importing.result().session_dir, ignore_errors=True)
        _delete(k, ns, created)
        if warm is not None and pool is not None:
            pool.loan_ended()
        raise
    if pool is not None:  # make (more) warm pods like this one
        pool.feed(_Recipe(plan=plan, workload=workload, code=runtime.code))
    result = Route(
        name=route, service=service, namespace=ns, pod=pod_name, bridged=bridged, ingress_hosts=hosts,
        tunnel=conn.tunnel, warm=warm, pool=pool if warm is not None else None,
    )  # fmt: skip
    result.timings.update(
        {
            "prepared": prepared_at - started,  # checks, manager ensured: the claim (or pod start) begins
            "pod_ready": ready_at - started,
            "routed": routed_at - ready_at,  # pod serving (or claimed) -> the router sends it the route
            "live": live_at - started,
            "total": time.monotonic() - started,
            "warm": 1.0 if warm is not None else 0.0,
        }
    )
    how = "a warm pod claimed" if warm is not None else f"pod ready after {result.timings['pod_ready']:.1f}s"
    report(f"{service}: route {route} live in {result.timings['live']:.1f}s ({pod_name}: {how})")
    return result


def _in_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """``fn()`` in a daemon thread; its result or exception in the returned future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits for the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _delete(k: kube.Kube, namespace: str, created: list[tuple[str, str]]) -> None:
    for _kind, name in reversed(created):  # only the route pod (the token is in no object of the cluster)
        with contextlib.suppress(NotFoundError, ForbiddenError):
            kube.call("delete the route pod", k.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0)


def close_route(k: kube.Kube, route: Route) -> None:
    """Give a pod claimed from the pool back to it, else disconnect and delete the route pod.

    Either way the route leaves the router (the manager sees the pod's labels change or the pod
    go) and, with the last route, the manager restores the service.

    The pod is deleted right after, so the tunnel does not wait for the agent's goodbye (which
    does not come back through the port-forward in time anyway): about 1 s saved per route.
    """
    warm, pool = route.warm, route.pool
    route.warm = route.pool = None
    if warm is not None and pool is not None:
        if pool.give_back(warm, route.name):
            route.tunnel = None  # the pool's now
            shutil.rmtree(route.bridged.session_dir, ignore_errors=True)
            return
        pool.loan_ended()
    if route.tunnel is not None:
        route.tunnel.stop(grace=0.05)
        route.tunnel = None
    _delete(k, route.namespace, [("pod", route.pod)])
    shutil.rmtree(route.bridged.session_dir, ignore_errors=True)
