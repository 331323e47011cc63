"""Connect and disconnect a bridge session: the orchestration over plan, patch, restore, tunnel.

``BridgeSession.connect()`` for each service: read the Service, its pods and owner chain;
plan; refuse early (config errors, stale or concurrent sessions) before any change;
record the original and start the guard; swap the container for the agent; wait for the
agent pod (failing fast on image-pull errors); port-forward and open the tunnel; import
the environment and volume files; serve the namespace's services on loopback addresses.
``close()`` undoes all of it, in reverse, and is safe to call at any point of a failed
connect, twice, or from a signal handler's ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import getpass
import io
import logging
import os
import secrets
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_bridge_agent.labels import ROLE_LABEL
from pytest_bridge_agent.runtime import Code
from pytest_bridge_routing.objects import original_selector

from pytest_bridge.cluster import bundle, kube, policy, restore, workloads
from pytest_bridge.cluster.permissions import required_permissions, required_permissions_check
from pytest_bridge.core import faults, names, timing
from pytest_bridge.core.bridgesettings import BridgeSettings
from pytest_bridge.core.config import LocalProcessConfig, VolumeMountToken, parse_config
from pytest_bridge.core.envimport import (
    SkippedVolume,
    build_environment,
    local_volume_paths,
    plan_downloads,
    plan_mounted_volumes,
)
from pytest_bridge.core.errors import (
    BridgeError,
    ConfigError,
    ConflictError,
    ConnectError,
    ForbiddenError,
    NotFoundError,
    PlanError,
    PolicyError,
)
from pytest_bridge.core.jsonpatch import apply_patch
from pytest_bridge.core.patch import (
    AGENT_CONTROL_PORT,
    AGENT_STATUS_PORT,
    SESSION_LABEL,
    AgentSpec,
    agent_pod,
    bridged_session,
    pod_for_recreate,
    strip_server_fields,
    token_sha256,
    workload_patches,
)
from pytest_bridge.core.plan import (
    BridgePlan,
    check_local_port_specs,
    check_plans_disjoint,
    make_plan,
    workload_template_container,
)
from pytest_bridge.local import hosts, sessiondir
from pytest_bridge.local.localproc import PortInUseError
from pytest_bridge.local.ports import free_port, port_free, who_listens
from pytest_bridge.orchestration import isolation
from pytest_bridge.orchestration.connection import AgentStartCheck, BridgedService, Connection
from pytest_bridge.orchestration.handoff import Handoff
from pytest_bridge.transport.kubectl_forward import KubectlForward, kubectl_or_none, lane_pool
from pytest_bridge.transport.portforward import ApiEndpoint, open_portforward
from pytest_bridge.transport.tunnel import TunnelStats
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

__all__ = ["BridgeSession", "new_session_id"]

log = logging.getLogger(__name__)

# Fresh connections per canary burst: with one stale endpoint beside the agent, all of them
# reaching the agent by chance has probability 2**-16.
CANARY_CONNECTIONS = 16
_SA_MOUNT = "kube-api-access"  # the service-account token volume admission adds (kube-api-access-xxxxx)
# Seconds an agent that never had a client counts as starting (its session connecting) before
# another session takes that session for dead: longer than a connect needs from agent start to tunnel.
IDLE_PROOF = 20.0
# Seconds the API calls of close() may take together: a stopped API server must not hold pytest's exit
# for minutes (each call alone may take REQUEST_TIMEOUT twice); the guard restores after the TTL.
CLOSE_API_SECONDS = 30.0
LOST_AFTER = 15.0  # seconds a tunnel may be down (reconnecting) before the bridge counts as lost


def new_session_id(prefix: str | None = None) -> str:
    """``<user or CI job>-<random>``: a lowercase DNS label, unique per run."""
    base = prefix or os.environ.get("CI_JOB_ID") or os.environ.get("GITHUB_RUN_ID") or getpass.getuser()
    clean = "".join(c if c.isalnum() else "-" for c in base.lower()).strip("-")[:12] or "session"
    return f"{clean}-{secrets.token_hex(3)}"


@dataclass
class BridgeSession:
    settings: BridgeSettings
    session_id: str = field(default_factory=new_session_id)
    report: Callable[[str], None] = field(default=lambda line: None)
    root_dir: Path | None = None
    worker: str | None = None  # xdist worker id: part of generated route names
    # Connect's phases as they start ("orders: agent pod (+2.1s)"); the plugin shows them with -v.
    progress: Callable[[str], None] = field(default=lambda line: None)

    def __post_init__(self) -> None:
        self.services: dict[str, BridgedService] = {}
        self.timings: dict[str, float] = {}
        self.phases: dict[str, float] = {}  # seconds per phase of connect ("orders: agent pod"), in order
        self._phase: tuple[str, float] | None = None
        self._connect_started = time.monotonic()
        self._connections: list[Connection] = []
        self._kube: kube.Kube | None = None
        self._config: LocalProcessConfig | None = None
        self._transport_fallback: str | None = None  # "auto" resolved once per session
        self.lock = threading.Lock()
        self.closed = False
        self.session_dir = sessiondir.create(self.session_id)
        self.mechanisms = hosts.choose_mechanisms(self.settings.name_mapping)
        self._resolver_token: object | None = None
        self._hosts_block: hosts.SystemHostsBlock | None = None
        self._mapping: names.NameMapping | None = None
        self.routes: dict[str, isolation.Route] = {}  # --bridge-isolate: the session's route per service
        self._open_routes: list[isolation.Route] = []  # every route still open (session and per-test)
        self._swept = False
        self.route_permissions_checked = False
        self.route_pools: dict[str, isolation.RoutePool] = {}  # warm route pods per service (isolation.py)
        self.attached_to: str | None = None  # set by attach(): who holds the connection

    # ------------------------------------------------------------------ connect

    @property
    def client(self) -> kube.Kube:
        if self._kube is None:
            s = self.settings
            self._kube = kube.load(str(s.kubeconfig) if s.kubeconfig else None, s.context, s.namespace)
        return self._kube

    def lost(self, after: float = LOST_AFTER) -> str | None:
        """Why the bridge counts as lost ("bridge lost: ..."), else None.

        A tunnel that is down gets until ``after`` seconds from when it went down to come back
        (it reconnects by itself, to a replacement agent pod too); one that does not fails the
        tests that use the bridge at once, instead of letting them time out one by one.
        """
        tunnels = [(c.service, c.tunnel) for c in self._connections if c.tunnel is not None]
        tunnels += [(f"{r.service} (route {r.name})", r.tunnel) for r in self._open_routes if r.tunnel is not None]
        for what, background in tunnels:
            try:
                tunnel = background.tunnel
            except BridgeError:
                continue  # stopped
            while tunnel.down_since is not None and time.monotonic() - tunnel.down_since < after:
                time.sleep(0.1)
            if tunnel.down_since is not None:
                return (
                    f"bridge lost: {what}: the tunnel to the agent has been down for "
                    f"{time.monotonic() - tunnel.down_since:.0f}s ({tunnel.last_error}); is the agent pod still "
                    f"there (`kubectl -n {self.client.namespace} get pods -l {SESSION_LABEL}={self.session_id}`)?"
                )
        return None

    def use_client(self, k: kube.Kube) -> None:
        """Talk to the cluster through ``k`` instead of loading the kubeconfig (``pytest-bridge doctor``)."""
        self._kube = k

    def tunnel_of(self, service: str) -> BackgroundTunnel | None:
        """The tunnel carrying ``service`` (None before it is connected); the benchmarks drive it directly."""
        return next((c.tunnel for c in self._connections if c.service == service and c.tunnel is not None), None)

    def tunnel_token(self, service: str) -> str | None:
        """The secret a client presents to ``service``'s agent (a second client, e.g. the benchmarks')."""
        return next((conn.token for conn in self._connections if conn.service == service), None)

    def tunnel_stats(self, service: str) -> TunnelStats | None:
        """Counters of the tunnel carrying ``service`` (None before it is connected)."""
        for conn in self._connections:
            if conn.service == service and conn.tunnel is not None:
                return conn.tunnel.stats
        return None

    def _mark(self, phase: str | None) -> None:
        """End the phase under way (its time goes to ``phases``) and start ``phase`` (None: none)."""
        now = time.monotonic()
        if self._phase is not None:
            name, since = self._phase
            self.phases[name] = self.phases.get(name, 0.0) + (now - since)
        self._phase = (phase, now) if phase else None
        if phase:
            self.progress(f"{phase} (+{now - self._connect_started:.1f}s)")

    def connect(self) -> dict[str, BridgedService]:
        started = time.monotonic()
        self._connect_started = started
        try:
            self._mark("plan")
            self._config = self._load_config()
            k = self.client
            self.check_namespace(k)
            claimed: set[int] = set()  # local ports handed out to earlier services of this session
            plans = {svc: self.plan_service(k, svc, claimed=claimed) for svc in self.settings.services}
            check_plans_disjoint(list(plans.values()))
            check_local_port_specs(list(plans.values()), self.settings.local_ports)
            _check_local_ports(plans.values())
            if self.settings.isolate:
                for svc in plans:
                    self._mark(f"{svc}: route")
                    route = self.open_route(svc)
                    self.routes[svc] = route
                    self.services[svc] = route.bridged
            else:
                self._mark("permissions and workload checks")
                for plan in plans.values():
                    self._preflight(k, plan)
                for plan in plans.values():
                    self._refuse_or_recover_existing(k, plan)
                for n, (svc, plan) in enumerate(plans.items()):
                    conn = Connection(svc, plan, key=f"{self.session_id}-{n}" if n else self.session_id)
                    self._connections.append(conn)
                    self._bridge(k, conn)
            self._mark("name mapping")
            self._map_names()
            self._mark(None)
            faults.checkpoint("connected")
        except BaseException:
            self._mark(None)  # the phase that failed keeps its time (the failure report shows it)
            self.close()
            raise
        self.timings["connect"] = time.monotonic() - started
        return self.services

    # ------------------------------------------------------------------ isolated routes

    def open_route(self, service: str, route: str | None = None, *, per_test: bool = False) -> isolation.Route:
        """A new isolated route of ``service`` (generated name unless given), live when this returns.

        Per-test routes get free local ports, so they never clash with the session's.
        """
        k = self.client
        if not self._swept:
            self._swept = True
            isolation.sweep_stale_routes(
                k, k.namespace, lambda other: _session_alive(k, other, starting_counts=False), self.report
            )
        name = route or isolation.route_name(self.settings.route_prefix, self.worker)
        # Concurrent sessions on this machine must not pick the same local port before their
        # local services listen: routes take free ports unless the user chose them.
        free_ports = per_test or not self.settings.local_ports_for(service)
        opened = isolation.open_route(self, service, name, free_ports=free_ports, report=self.report)
        self._open_routes.append(opened)
        return opened

    def close_route(self, route: isolation.Route) -> None:
        if route in self._open_routes:
            self._open_routes.remove(route)
        if self._kube is not None:
            isolation.close_route(self._kube, route)

    def _load_config(self) -> LocalProcessConfig | None:
        path = self.settings.config_file
        if path is None:
            return None
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BridgeError(f"cannot read the bridge config file {path}: {exc}") from exc
        return parse_config(text, source=str(path))

    def check_namespace(self, k: kube.Kube) -> None:
        try:
            kube.call(
                f"namespace {k.namespace!r}", k.core.read_namespace, k.namespace, verb="get", resource="namespaces"
            )
        except ForbiddenError:
            return  # namespaces are cluster-scoped: a namespaced Role can't read them; the next call tells
        except NotFoundError as exc:
            raise NotFoundError(
                f"namespace {k.namespace!r} does not exist in context {k.context!r}; pass --bridge-namespace"
            ) from exc

    def plan_service(self, k: kube.Kube, service: str, *, claimed: set[int] | None = None) -> BridgePlan:
        ns = k.namespace
        try:
            svc = kube.call(
                f"service {service!r}", k.core.read_namespaced_service, service, ns,
                verb="get", resource="services", namespace=ns,
            )  # fmt: skip
        except NotFoundError as exc:
            listed_services: Any = kube.call("list services", k.core.list_namespaced_service, ns)
            known = [s.metadata.name for s in listed_services.items]
            raise NotFoundError(
                f"service {service!r} not found in namespace {ns!r} (context {k.context!r}); "
                f"services there: {', '.join(sorted(known)) or 'none'}"
            ) from exc
        service_obj = k.to_dict(svc)
        # A service switched to a router (isolated routes) keeps its own selector in an annotation.
        selector = original_selector(service_obj) or {}
        if selector:
            service_obj["spec"]["selector"] = selector
        pods: list[dict[str, Any]] = []
        if selector:
            label_selector = ",".join(f"{key}={value}" for key, value in selector.items())
            listed: Any = kube.call(
                "list the service's pods", k.core.list_namespaced_pod, ns, label_selector=label_selector,
                verb="list", resource="pods", namespace=ns,
            )  # fmt: skip
            pods = [k.to_dict(p) for p in listed.items if not p.metadata.deletion_timestamp]
        owners = self._owner_chain(k, pods)
        return make_plan(
            service_obj,
            pods,
            owners,
            container=self.settings.container_for(service),
            local_ports=self.settings.local_ports_for(service),
            choose_local_port=lambda target: _same_or_free_port(target, claimed if claimed is not None else set()),
        )

    def _owner_chain(self, k: kube.Kube, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        owners: dict[tuple[str, str], dict[str, Any]] = {}
        frontier = [ref for pod in pods for ref in pod["metadata"].get("ownerReferences") or []]
        readers = {
            "ReplicaSet": k.apps.read_namespaced_replica_set,
            "Deployment": k.apps.read_namespaced_deployment,
            "StatefulSet": k.apps.read_namespaced_stateful_set,
        }
        while frontier:
            ref = frontier.pop()
            key = (ref["kind"], ref["name"])
            if key in owners or ref["kind"] not in readers:
                continue
            obj = k.to_dict(kube.call(f"{ref['kind']} {ref['name']}", readers[ref["kind"]], ref["name"], k.namespace))
            obj.setdefault("kind", ref["kind"])
            obj.setdefault("apiVersion", "apps/v1")
            owners[key] = obj
            frontier += obj["metadata"].get("ownerReferences") or []
        return list(owners.values())

    def read_workload(self, k: kube.Kube, plan: BridgePlan) -> dict[str, Any]:
        w = plan.workload
        reader = {
            "Deployment": k.apps.read_namespaced_deployment,
            "StatefulSet": k.apps.read_namespaced_stateful_set,
            "Pod": k.core.read_namespaced_pod,
        }[w.kind]
        obj: dict[str, Any] = k.to_dict(kube.call(f"{w.kind} {w.name}", reader, w.name, w.namespace))
        obj.setdefault("kind", w.kind)
        obj.setdefault("apiVersion", "v1" if w.kind == "Pod" else "apps/v1")
        return obj

    def _preflight(self, k: kube.Kube, plan: BridgePlan) -> None:
        """Ask the API server whether we may do everything connect does, before doing any of it."""
        required_permissions_check(
            k,
            required_permissions(plan.workload.kind, self.settings.code, plan.workload.name),
            what=f"bridge {plan.service!r}",
        )
        workload = self.read_workload(k, plan)
        workloads.check(k, plan, workload)  # paused, OnDelete, an HPA: see workloads.py
        self._check_config_names(k, plan, workload)

    def _check_config_names(self, k: kube.Kube, plan: BridgePlan, workload: dict[str, Any]) -> None:
        """The config's ``$(volumeMounts:X)`` and ``$(services:X)`` name what exists: ConfigError before any change."""
        config = self._config
        if config is None:
            return
        container = workload_template_container(workload, plan)
        template_mounts = {str(m.get("name")) for m in container.get("volumeMounts") or []}
        # Admission adds the service-account token's mount to pods, not to templates.
        if any(
            isinstance(seg, VolumeMountToken) and seg.name not in template_mounts and not seg.name.startswith(_SA_MOUNT)
            for entry in config.env
            for seg in entry.segments
        ):
            plan_downloads(container, config, Path(self.session_dir), service_account_token=False)
        for token in config.required_endpoints().services:
            ns = token.namespace or k.namespace
            try:
                kube.call(f"service {token.name!r} named in the config", k.core.read_namespaced_service, token.name, ns)
            except NotFoundError as exc:
                raise ConfigError(
                    f"$(services:{token.name}{'.' + token.namespace if token.namespace else ''}) names service "
                    f"{token.name!r}, which does not exist in namespace {ns!r}; nothing was changed",
                    source=config.source,
                ) from exc

    def _refuse_or_recover_existing(self, k: kube.Kube, plan: BridgePlan) -> None:
        """A workload still bridged by another session: recover it if that session is dead, else refuse."""
        workload = self.read_workload(k, plan)
        other = bridged_session(workload)
        if other is None:
            return
        rejected: list[str] = []
        records = {r.session: r for r in restore.read_records(k, k.namespace, rejected)}
        record = records.get(other)
        if record is None:
            unusable = [why for why in rejected if other in why]
            raise ConflictError(
                f"{plan.workload.kind} {plan.workload.name} is marked as bridged by session {other!r}, but its restore "
                + ("record is not usable (" + "; ".join(unusable) + ")" if unusable else "record is gone")
                + "; restore it by hand (kubectl rollout undo) and run again"
            )
        liveness = session_liveness(k, other, recorded=record.created)
        if liveness == "starting":
            raise ConflictError(
                f"service {plan.service!r} is being bridged by session {other!r} ({record.owner}) right now; "
                "wait for it to end, or use an isolated route (--bridge-isolate). Nothing was changed"
            )
        if liveness == "alive":
            raise ConflictError(
                f"service {plan.service!r} is already bridged by a live session {other!r} ({record.owner}); "
                "wait for it to end, or use an isolated route (--bridge-isolate)"
            )
        if liveness == "unknown":
            raise ConflictError(
                f"service {plan.service!r} is bridged by session {other!r} ({record.owner}), and whether it is "
                "alive cannot be told: its agent runs but does not answer through the API server (a "
                "NetworkPolicy?). If that session is gone, its guard restores the workload within "
                f"--bridge-restore-ttl of its last client; `pytest-bridge cleanup --force -n {k.namespace}` "
                "restores it now. Nothing was changed"
            )
        self.report(f"restoring {plan.workload.kind} {plan.workload.name} left bridged by dead session {other}")
        restore.apply_restore(k, record)
        restore.delete_session_objects(k, k.namespace, other)

    def _bridge(self, k: kube.Kube, conn: Connection) -> None:
        assert conn.plan is not None
        plan = conn.plan
        ns = plan.namespace
        started = time.monotonic()
        self._mark(f"{plan.service}: admission dry run")
        workload = self.read_workload(k, plan)
        code = bundle.build()
        pod_code = bundle.code_for(self.settings.code, code, restore.code_configmap_name(conn.key, code))
        agent = AgentSpec(
            image=self.settings.agent_image,
            session=conn.key,
            token_sha256=token_sha256(conn.token),
            keep_probes=bool(self._config and self._config.has_feature("Probes")),
            keep_lifecycle=bool(self._config and self._config.has_feature("LifecycleHooks")),
            # Without a client for the TTL the agent leaves, and says so in its pod's status: the
            # guard's proof that the session is gone even where it cannot reach the agent.
            exit_when_idle=self.settings.restore_ttl,
            code=pod_code,
        )
        original_container = dict(workload_template_container(workload, plan))
        replacement: dict[str, Any] = {}
        if plan.workload.kind == "Pod":
            reverse: list[dict[str, Any]] = []
            forward: list[dict[str, Any]] = []
            original = pod_for_recreate(workload)
            replacement = agent_pod(workload, plan, agent)
        else:
            patches = workload_patches(workload, plan, agent)
            reverse, forward, original = patches.reverse, patches.forward, strip_server_fields(workload)
        self.check_policy(
            k, conn, workload, replacement if plan.workload.kind == "Pod" else None, agent=agent, pod_code=pod_code
        )
        extras = workloads.prepare(k, plan, workload, conn.key)
        conn.record = restore.RestoreRecord(
            session=conn.key, namespace=ns, kind=plan.workload.kind, name=plan.workload.name,
            reverse_patch=reverse, original=original, owner=_owner(), created=time.time(),
            related=[r.record() for r in extras.related], roll_pods=list(extras.roll_pods),
            forward=forward,
        )  # fmt: skip
        # Record before change: the guard and the record exist before the workload is touched.
        self._mark(f"{plan.service}: restore guard")
        conn.guard = True  # set first: a guard created halfway is cleaned up too
        restore.create_guard(
            k, conn.record, image=self.settings.agent_image, ttl=self.settings.restore_ttl,
            status_port=AGENT_STATUS_PORT, code=code, pod_code=pod_code,
        )  # fmt: skip
        self._mark(f"{plan.service}: swap {plan.workload.kind} {plan.workload.name} to the agent")
        if plan.workload.kind == "Pod":
            conn.patched = True
            kube.call(
                "delete the pod to replace",
                k.core.delete_namespaced_pod,
                plan.workload.name,
                ns,
                grace_period_seconds=0,
            )
            _wait_gone(k, plan.workload.name, ns)
            kube.call("create the agent pod", k.core.create_namespaced_pod, ns, replacement)
        else:
            patcher = {
                "Deployment": k.apps.patch_namespaced_deployment,
                "StatefulSet": k.apps.patch_namespaced_stateful_set,
            }[plan.workload.kind]
            # Set before the call: a PATCH whose answer is lost, or interrupted while under way, may
            # have landed. Undoing one that did not is a no-op (the reverse patch tests our session).
            conn.patched = True
            try:
                kube.call(
                    f"swap {plan.workload.kind} {plan.workload.name} to the agent", patcher, plan.workload.name, ns,
                    forward, verb="patch", resource=plan.workload.kind.lower() + "s", namespace=ns,
                )  # fmt: skip
            except ConflictError as exc:
                raise self._patch_conflict(k, conn, exc) from exc
            workloads.after_patch(k, plan, extras, conn.key, self.report)
        faults.checkpoint("workload-patched")
        self._mark(f"{plan.service}: agent pod")
        pod = self._wait_for_agent(k, ns, plan, conn.key)
        self._mark(f"{plan.service}: endpoints")
        self._wait_for_endpoints(k, ns, plan, pod)
        self.report(f"{plan.service}: agent pod {pod} ready in {time.monotonic() - started:.1f}s")
        faults.checkpoint("agent-ready")
        self._mark(f"{plan.service}: tunnel and canaries")
        conn.tunnel = self.open_tunnel(k, ns, pod, plan, conn.token, follow=conn.key)
        self._prove_routed(conn.tunnel, plan)
        faults.checkpoint("tunnel-open")
        self._mark(f"{plan.service}: import env and volumes")
        conn.bridged = self.import_environment(k, conn, pod, original_container)
        self.services[plan.service] = conn.bridged

    def _patch_conflict(self, k: kube.Kube, conn: Connection, exc: ConflictError) -> ConflictError:
        """Why the forward PATCH was refused: another session bridged the workload just now, or
        someone changed it since it was read. Either way nothing of the workload is ours."""
        assert conn.plan is not None
        plan = conn.plan
        what = f"{plan.workload.kind} {plan.workload.name}"
        try:
            other = bridged_session(self.read_workload(k, plan))
        except BridgeError:
            other = None
        if other and other != conn.key:
            return ConflictError(
                f"service {plan.service!r}: {what} was bridged by session {other!r} at the same moment; one "
                "session at a time can bridge a workload (concurrent sessions: --bridge-isolate). This session "
                "changed nothing"
            )
        return ConflictError(f"service {plan.service!r}: {what} changed while connecting ({exc}); run again")

    def check_policy(
        self,
        k: kube.Kube,
        conn: Connection,
        workload: dict[str, Any],
        replacement: dict[str, Any] | None,
        *,
        agent: AgentSpec,
        pod_code: Code,
    ) -> None:
        """Before any change: the cluster admits the agent's pod and the guard's (server-side dry run)."""
        assert conn.plan is not None
        plan, ns = conn.plan, conn.plan.namespace
        if replacement is not None:
            template: dict[str, Any] = {"metadata": replacement["metadata"], "spec": replacement["spec"]}
        else:
            template = apply_patch(workload, workload_patches(workload, plan, agent).forward)["spec"]["template"]
        check_name = f"pytest-bridge-admission-check-{conn.key}"[:63].rstrip("-")
        agent_pod_check = policy.pod_from_template(template, check_name, ns)
        guard_template = restore.guard_job(
            conn.key, ns, self.settings.agent_image, self.settings.restore_ttl, AGENT_STATUS_PORT, code=pod_code
        )["spec"]["template"]
        guard_pod_check = policy.pod_from_template(guard_template, check_name, ns)
        # The guard's own ServiceAccount does not exist yet, and admission refuses a pod whose
        # account is missing; the workload's exists and is as good for what policies look at.
        guard_pod_check["spec"]["serviceAccountName"] = template["spec"].get("serviceAccountName") or "default"
        advice = (
            "The agent keeps the workload's own security context; our other pods run as non-root with "
            "Pod Security 'restricted' settings on the images --bridge-agent-image and --bridge-routing-image"
        )
        policy.dry_run_pods(
            k,
            [
                (f"the agent pod for {plan.workload.kind} {plan.workload.name}", agent_pod_check),
                ("the restore guard's pod", guard_pod_check),
            ],
            advice,
        )

    def _wait_for_agent(self, k: kube.Kube, ns: str, plan: BridgePlan, key: str) -> str:
        deadline = time.monotonic() + self.settings.connect_timeout
        selector = f"{SESSION_LABEL}={key}"
        last = "no agent pod yet"
        start_check = AgentStartCheck(self.settings.agent_image, "the agent container")
        next_status = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if plan.workload.kind == "Deployment" and time.monotonic() > next_status:
                next_status = time.monotonic() + 1.0
                refused = policy.replica_failure(self.read_workload(k, plan).get("status"))
                if refused:
                    raise PolicyError(
                        f"the cluster refuses the agent pod of Deployment {plan.workload.name}: {refused}"
                    )
            pods: Any = kube.call("list agent pods", k.core.list_namespaced_pod, ns, label_selector=selector).items
            for pod in pods:
                if pod.metadata.deletion_timestamp or (pod.metadata.labels or {}).get(ROLE_LABEL):
                    continue
                start_check.check(pod)
                conditions = {c.type: c.status for c in pod.status.conditions or []}
                if conditions.get("Ready") == "True":
                    return str(pod.metadata.name)
                last = f"pod {pod.metadata.name} phase {pod.status.phase}"
            time.sleep(0.25)
        raise ConnectError(
            f"the agent for {plan.service!r} was not ready within {self.settings.connect_timeout:.0f}s ({last}); "
            "raise --bridge-connect-timeout or check `kubectl describe pod`"
        )

    def _wait_for_endpoints(self, k: kube.Kube, ns: str, plan: BridgePlan, pod_name: str) -> None:
        """Wait until the Service's endpoints are the agent pod only: old pods may still be draining."""
        pod: Any = kube.call("read the agent pod", k.core.read_namespaced_pod, pod_name, ns)
        agent_ip = pod.status.pod_ip
        discovery = client_discovery(k)
        deadline = time.monotonic() + self.settings.connect_timeout
        addresses: set[str] = set()
        while time.monotonic() < deadline:
            slices: Any = kube.call(
                "list the service's endpoints", discovery.list_namespaced_endpoint_slice, ns,
                label_selector=f"kubernetes.io/service-name={plan.service}",
            )  # fmt: skip
            addresses = {
                address
                for item in slices.items
                for endpoint in item.endpoints or []
                if not endpoint.conditions or endpoint.conditions.serving is not False
                for address in endpoint.addresses
            }
            if addresses == {agent_ip}:
                return
            time.sleep(0.2)
        raise ConnectError(
            f"service {plan.service!r} still routes to {sorted(addresses - {agent_ip})} besides the agent "
            f"({agent_ip}) after {self.settings.connect_timeout:.0f}s; are old pods stuck terminating?"
        )

    def _prove_routed(self, tunnel: BackgroundTunnel, plan: BridgePlan) -> None:
        """Canaries through the Service must all come back to us before the bridge counts as live.

        The EndpointSlices naming only the agent is the API's view; kube-proxy programs the
        node some time later and, until then, still load-balances at random between the old
        (dead) pod and the agent. A single canary passes half the time in that window and the
        first real request then times out on the old pod's address, so each port gets a burst
        of fresh connections, all of which must reach the agent.
        """
        host = f"{plan.service}.{plan.namespace}.svc.cluster.local"
        deadline = time.monotonic() + self.settings.connect_timeout
        pending = list(plan.service_ports)
        while pending and time.monotonic() < deadline:
            if tunnel.canary(host, pending[0].port, timeout=0.3, count=CANARY_CONNECTIONS):
                pending.pop(0)
            else:
                time.sleep(0.1)
        if pending:
            raise ConnectError(
                f"canaries to {host}:{pending[0].port} did not all reach the agent within "
                f"{self.settings.connect_timeout:.0f}s: the Service does not (only) route to the agent pod "
                "(kube-proxy lagging, or a network policy?)"
            )

    @property
    def transport(self) -> str:
        """The tunnel transport in use: the setting, with ``auto`` resolved (kubectl when found)."""
        if self.settings.transport != "auto":
            return self.settings.transport
        if self._transport_fallback is None:
            self._transport_fallback = "kubectl" if kubectl_or_none() else "websocket"
        return self._transport_fallback

    def open_tunnel(
        self, k: kube.Kube, ns: str, pod: str, plan: BridgePlan, token: str, *, follow: str | None = None
    ) -> BackgroundTunnel:
        """The tunnel to the agent in ``pod``, connected, and the agent proven to run this plugin's code.

        ``follow`` (a session key): when the tunnel reconnects, it goes to the Ready agent pod of
        that session then, not necessarily ``pod`` (a Deployment replaces a deleted or evicted one).
        """
        current = _AgentPod(k, ns, pod, follow)
        tunnel = self._start_tunnel(k, ns, current, plan, token)
        problem = agent_code_mismatch(tunnel.tunnel.agent_info, bundle.build(), self.settings)
        if problem:
            tunnel.stop(grace=0)
            raise ConnectError(f"pod {ns}/{pod}: {problem}")
        return tunnel

    def _start_tunnel(self, k: kube.Kube, ns: str, pod: _AgentPod, plan: BridgePlan, token: str) -> BackgroundTunnel:
        local_ports = {b.target_port: b.local_port for b in plan.port_bindings}
        if self.transport == "kubectl":
            forward = KubectlForward(
                pod.name, ns, AGENT_CONTROL_PORT, kubeconfig=str(self.settings.kubeconfig) if self.settings.kubeconfig else None,
                context=k.context, timeout=self.settings.connect_timeout,
            )  # fmt: skip
            tunnel = BackgroundTunnel(
                forward.connect, token, local_ports, lane_connect=forward.connect_socket, lanes=lane_pool()
            )
            tunnel.cleanups.append(forward.stop)
            try:
                tunnel.start(timeout=self.settings.connect_timeout)
            except ConnectError as e:
                if self.settings.transport != "auto" or "did not start" not in str(e):
                    raise
                # auto: a kubectl that cannot port-forward (old, or without this kubeconfig's auth
                # plugin) must not fail the session; our own WebSocket client needs neither.
                log.warning("%s; using the websocket transport instead", e)
                self._transport_fallback = "websocket"
            else:
                return tunnel

        async def connect() -> Any:
            # Built per connection: a token that expired meanwhile is read again (exec plugins).
            endpoint = ApiEndpoint.from_configuration(k.configuration)
            forward = await open_portforward(endpoint, ns, await asyncio.to_thread(pod.name), AGENT_CONTROL_PORT)
            return forward.reader, forward.writer

        tunnel = BackgroundTunnel(connect, token, local_ports)
        tunnel.start(timeout=self.settings.connect_timeout)
        return tunnel

    @timing.timed("import env and files")
    def import_environment(
        self,
        k: kube.Kube,
        conn: Connection,
        pod_name: str,
        template_container: dict[str, Any],
        dir_name: str | None = None,
    ) -> BridgedService:
        assert conn.plan is not None and conn.tunnel is not None
        plan, tunnel, ns = conn.plan, conn.tunnel, conn.plan.namespace
        service_dir = self.session_dir / (dir_name or plan.service)
        service_dir.mkdir(mode=0o700)
        pod = k.to_dict(kube.call("read the agent pod", k.core.read_namespaced_pod, pod_name, ns))
        pod_container = pod["spec"]["containers"][plan.container_index]
        downloads = plan_downloads(pod_container, self._config, service_dir)
        skipped: tuple[SkippedVolume, ...] = ()
        if self.settings.import_volumes:
            # The workload's own mounts only: the agent's pod also mounts the plugin's code.
            own = {str(m.get("name")) for m in template_container.get("volumeMounts") or []}
            mounted, skipped = plan_mounted_volumes(
                pod_container, pod["spec"].get("volumes") or [], self._config, service_dir, planned=downloads, only=own
            )
            downloads += mounted
        for download in downloads:
            _extract(tunnel.fetch_files(download.mount_path), Path(download.local_dir))
        if skipped:
            self.report(f"{plan.service}: volumes not imported: " + "; ".join(v.describe() for v in skipped))
        services: Any = kube.call("list services", k.core.list_namespaced_service, ns).items
        endpoints = [e for e in (names.Endpoint.from_service(k.to_dict(s)) for s in services) if e is not None]
        if self._config is not None:
            endpoints += _config_endpoints(k, self._config)
        mapping = self._serve_outbound(tunnel, endpoints, ns)
        reported = tunnel.get_env()
        environment = build_environment(
            reported, template_container, mapping, config=self._config, downloads=downloads,
            namespace_services=[s.metadata.name for s in services],
        )  # fmt: skip
        env_file = service_dir / "env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in sorted(environment.env.items())))
        env_file.chmod(0o600)
        return BridgedService(
            name=plan.service, namespace=ns, plan=plan,
            local_ports={b.target_port: b.local_port for b in plan.port_bindings},
            env=environment.env, session_dir=service_dir, mapping=mapping, agent_pod=pod_name,
            dropped_env=environment.dropped,
            volumes=local_volume_paths(pod_container, downloads, is_file=lambda path: Path(path).is_file()),
            skipped_volumes=tuple(v.describe() for v in skipped),
        )  # fmt: skip

    def _serve_outbound(self, tunnel: BackgroundTunnel, endpoints: list[names.Endpoint], ns: str) -> names.NameMapping:
        """Map every endpoint to a loopback address and listen there, forwarding through the tunnel.

        Addresses another bridge session on this machine already serves are skipped; two
        sessions starting at the same moment can still pick the same one, so a bind that
        fails with EADDRINUSE is retried from a random block of 127.1.0.0/16.
        """
        first_ip = names.FIRST_LOOPBACK_IP
        for attempt in range(8):
            mapping = names.map_endpoints(
                endpoints, ns, allocate_port=_loopback_port, address_free=lambda ip, port: port_free(port, ip),
                first_ip=first_ip,
            )  # fmt: skip
            try:
                for entry in mapping.entries:
                    remote_host = entry.endpoint.name
                    if entry.endpoint.cluster_ip:  # no DNS lookup in the agent per connection
                        remote_host = entry.endpoint.cluster_ip
                    elif entry.endpoint.namespace:
                        remote_host = f"{entry.endpoint.name}.{entry.endpoint.namespace}.svc.cluster.local"
                    for port in entry.ports:
                        tunnel.serve_outbound(entry.ip, port.local_port, remote_host, port.remote_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 7:
                    raise
                first_ip = f"127.1.{secrets.randbelow(240) + 10}.1"
                continue
            return mapping
        raise AssertionError("unreachable")

    def _map_names(self) -> None:
        if not self.services:
            return
        mapping = next(iter(self.services.values())).mapping
        if self.mechanisms.system_hosts_file is not None:
            hosts.remove_stale_blocks(self.mechanisms.system_hosts_file)
            self._hosts_block = hosts.SystemHostsBlock(mapping, self.session_id, self.mechanisms.system_hosts_file)
            self._hosts_block.apply()
        if self.mechanisms.in_process:
            self._resolver_token = hosts.install_resolver(mapping)
        self._mapping = mapping

    def subprocess_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus what makes cluster names resolve in a Python subprocess (PYTHONPATH sitecustomize)."""
        if self._mapping is None or not self.mechanisms.python_subprocesses:
            return dict(base)
        return hosts.subprocess_env(self._mapping, self.session_dir, base=base, session_id=self.session_id)

    def subprocess_wrap(self) -> list[str]:
        """An argv prefix giving subprocesses a private /etc/hosts with our names, where possible."""
        if self._mapping is None or not self.mechanisms.isolated_subprocesses:
            return []
        hosts_file = hosts.write_session_hosts_file(self._mapping, self.session_dir, self.session_id)
        return hosts.wrap_argv([], hosts_file)

    def name_mapping_description(self) -> str:
        return hosts.describe(self.mechanisms)

    # ------------------------------------------------------------------ xdist: one connection, many workers

    def handoff(self) -> Handoff:
        """What an xdist worker needs to use this (connected) bridge: see :mod:`pytest_bridge.orchestration.handoff`."""
        return Handoff(
            session_id=self.session_id, services=dict(self.services), mechanisms=self.mechanisms,
            owner=f"xdist controller pid {os.getpid()}", phases=dict(self.phases),
        )  # fmt: skip

    def attach(self, handoff: Handoff) -> None:
        """Use a bridge another process connected (the xdist controller) without touching the cluster.

        Services, env and session dirs are the controller's, and so are the tunnel and the
        listeners behind the mapped addresses; here only the name mapping is installed for
        this process and its subprocesses (a system hosts block is the controller's).
        ``close()`` then restores nothing: that stays with the controller.
        """
        self.session_id = handoff.session_id
        self.services = dict(handoff.services)
        self.mechanisms = dataclasses.replace(handoff.mechanisms, system_hosts_file=None)
        self.attached_to = handoff.owner
        self.phases = dict(handoff.phases)  # the controller's connect, for reports and JUnit properties
        self._map_names()

    # ------------------------------------------------------------------ disconnect

    def __enter__(self) -> BridgeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        # Bounded whatever the API server does: what close cannot undo in time, the guard does.
        with kube.deadline(CLOSE_API_SECONDS):
            self._close()

    def _close(self) -> None:
        started = time.monotonic()
        faults.checkpoint("close-start")
        errors: list[str] = []
        if self._resolver_token is not None:
            hosts.uninstall_resolver(self._resolver_token)
        if self._hosts_block is not None:
            with contextlib.suppress(Exception):
                self._hosts_block.remove()
        isolation.close_pools(self)
        for route in reversed(self._open_routes):
            try:
                self.close_route(route)
            except Exception as exc:
                errors.append(f"route {route.name}: {exc}")
        for conn in reversed(self._connections):
            if conn.tunnel is not None:
                with contextlib.suppress(Exception):
                    conn.tunnel.stop()
            if conn.record is not None and self._kube is not None and (conn.patched or conn.guard):
                try:
                    if conn.patched:
                        kept = restore.apply_restore(self._kube, conn.record)
                        faults.checkpoint("close-restored")
                        if kept:
                            self.report(
                                f"{conn.service}: {conn.record.kind} {conn.record.name} was changed during the "
                                f"session; restored with those changes kept: {', '.join(kept)}"
                            )
                    restore.delete_session_objects(self._kube, conn.record.namespace, conn.key)
                except Exception as exc:
                    errors.append(f"{conn.service}: {exc}")
        shutil.rmtree(self.session_dir, ignore_errors=True)
        if self._kube is not None:
            self._kube.close()
            self._kube = None
        self.timings["disconnect"] = time.monotonic() - started
        if errors:
            raise BridgeError(
                "restoring the cluster failed for "
                + "; ".join(errors)
                + f" — the in-cluster guard will retry within {self.settings.restore_ttl:.0f}s"
            )


class _AgentPod:
    """The agent pod a tunnel goes to: the first one, or, when it is gone, its replacement.

    Called when the tunnel (re)connects. With a session key to ``follow``, a pod that is gone or
    going is replaced by the session's newest Ready agent pod (the Deployment made a new one
    after a deletion or an eviction); without, or with none Ready yet, the last name stands and
    the tunnel keeps retrying.
    """

    def __init__(self, k: kube.Kube, namespace: str, first: str, follow: str | None) -> None:
        self._k, self._ns, self._follow = k, namespace, follow
        self.current = first

    def name(self) -> str:
        if self._follow is None:
            return self.current
        try:
            pods: Any = kube.call(
                "find the agent pod", self._k.core.list_namespaced_pod, self._ns,
                label_selector=f"{SESSION_LABEL}={self._follow}", _request_timeout=(3.0, 5.0),
            )  # fmt: skip
        except BridgeError:
            return self.current
        ready = [
            p
            for p in pods.items
            if p.metadata.deletion_timestamp is None
            and (p.metadata.labels or {}).get(restore.ROLE_LABEL) != "guard"
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        if ready and self.current not in {p.metadata.name for p in ready}:
            newest = max(ready, key=lambda p: p.metadata.creation_timestamp)
            log.warning(
                "agent pod %s is gone; the tunnel follows its replacement %s", self.current, newest.metadata.name
            )
            self.current = str(newest.metadata.name)
        return self.current


def agent_code_mismatch(agent_info: Mapping[str, Any], code: bundle.Bundle, settings: BridgeSettings) -> str | None:
    """Why the agent that answered the handshake does not run ``code``, or None if it does.

    Code shipped in a ConfigMap named by its digest cannot differ; a prebuilt agent image can
    (built by another version of the plugin), and would fail later in some protocol detail.
    An agent run from a source tree (tests) reports "source" and is accepted.
    """
    digest = str(agent_info.get("code") or "")
    if digest in ("source", code.digest):
        return None
    version = agent_info.get("code_version") or "an unknown version (older than 0.1.0)"
    fix = (
        "rebuild and push it with this version: `pytest-bridge images push --registry REGISTRY`"
        if settings.code == "image"
        else "it should have run the code this plugin shipped; is --bridge-agent-image an image with its own entry point?"
    )
    return (
        f"the agent image {settings.agent_image!r} runs pytest-bridge {version} (code {digest[:10] or 'unknown'}), "
        f"this plugin is {code.version} (code {code.short}); {fix}"
    )


def client_discovery(k: kube.Kube) -> Any:
    from kubernetes import client  # noqa: PLC0415 - only here; the rest goes through kube.Kube

    return client.DiscoveryV1Api(k.api_client)


def session_liveness(k: kube.Kube, session: str, *, recorded: float | None = None) -> str:
    """Whether ``session`` is "alive", "starting", "unknown" or "dead".

    Asked of its agents through the API server's pod proxy. "alive": an agent has a client.
    "starting": an agent pod is still starting, or its agent has never had a client and started
    less than :data:`IDLE_PROOF` seconds ago, or (``recorded``: when its restore record was
    written) no agent pod exists yet that soon after — a session between its PATCH and its
    tunnel must not be restored under its feet. "unknown": an agent the kubelet finds Ready that
    the proxy cannot reach (a NetworkPolicy, the proxy down). "dead": its agents answer with no
    client (one that had a client and lost it, or never had one for IDLE_PROOF), or none is left.
    Only "dead" is death: liveness that cannot be disproven is not.
    """
    pods: Any = kube.call(
        "list agent pods", k.core.list_namespaced_pod, k.namespace, label_selector=f"{SESSION_LABEL}={session}"
    )
    unknown = starting = False
    agents = 0
    for pod in pods.items:
        if (pod.metadata.labels or {}).get(restore.ROLE_LABEL) == "guard" or pod.metadata.deletion_timestamp:
            continue
        agents += 1
        if pod.status.phase == "Pending":
            starting = True
            continue
        if pod.status.phase != "Running":
            continue
        try:
            status = kube.pod_proxy_json(k, pod.metadata.name, AGENT_STATUS_PORT, "status", timeout=3)
        except Exception:
            containers = pod.status.container_statuses or []
            ready = bool(containers) and all(c.ready for c in containers)
            unknown = unknown or ready
            starting = starting or not ready  # running, not ready yet: the agent is starting
            continue
        if not isinstance(status, dict):
            continue
        if int(status.get("connected_clients", 0)) > 0:
            return "alive"
        never_connected = int(status.get("sessions_total", 0)) == 0
        if never_connected and float(status.get("idle_seconds", IDLE_PROOF)) < IDLE_PROOF:
            starting = True
    if unknown:
        return "unknown"
    if not agents and recorded is not None and time.time() - recorded < IDLE_PROOF:
        starting = True  # patched a moment ago: the controller has not made its agent pod yet
    return "starting" if starting else "dead"


def _session_alive(k: kube.Kube, session: str, *, starting_counts: bool = True) -> bool:
    """Whether ``session`` may be alive (see :func:`session_liveness`; "unknown" counts as alive, and
    "starting" too unless ``starting_counts`` is false: route pods, which change no workload, of a
    session that never connected them are swept at once)."""
    liveness = session_liveness(k, session)
    return liveness not in ("dead",) + (() if starting_counts else ("starting",))


def _owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def _wait_gone(k: kube.Kube, name: str, ns: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kube.call("wait for the pod to go", k.core.read_namespaced_pod, name, ns)
        except NotFoundError:
            return
        time.sleep(0.2)
    raise ConnectError(f"pod {ns}/{name} did not go away within {timeout:.0f}s")


def _same_or_free_port(target: int, claimed: set[int]) -> int:
    """``target`` if free, else a free port; never one in ``claimed`` (which gets the answer)."""
    port = target if target not in claimed and port_free(target) else free_port(exclude=claimed)
    claimed.add(port)
    return port


def _check_local_ports(plans: Iterable[BridgePlan]) -> None:
    """Before any change: every local port is free and serves one target port of one service."""
    owners: dict[int, str] = {}
    for plan in plans:
        for binding in plan.port_bindings:
            owner = f"{plan.service} target port {binding.target_port}"
            if binding.local_port in owners:
                raise PlanError(
                    f"local port {binding.local_port} is asked for both {owners[binding.local_port]} and {owner}; "
                    "give each its own with --bridge-local-port=SERVICE:TARGET=LOCAL; nothing was changed"
                )
            owners[binding.local_port] = owner
            if not port_free(binding.local_port):
                holder = who_listens(binding.local_port) or "another process"
                raise PortInUseError(
                    f"local port {binding.local_port} (for {owner}) is already in use by {holder}, so "
                    f"bridged traffic would reach it; nothing was changed. Stop it "
                    f"(`ss -ltnp 'sport = :{binding.local_port}'`) or choose another port with --bridge-local-port"
                )


def _loopback_port(remote: int) -> int:
    # Ports below 1024 need privileges to bind; keep the number only when we have them.
    if remote < 1024 and os.geteuid() != 0:
        return free_port()
    return remote


def _config_endpoints(k: kube.Kube, config: LocalProcessConfig) -> list[names.Endpoint]:
    required = config.required_endpoints()
    endpoints: list[names.Endpoint] = []
    for token in required.services:
        ns = token.namespace or k.namespace
        if ns == k.namespace:
            continue  # every service of the namespace is mapped already
        svc = kube.call(f"service {token.name!r} named in the config", k.core.read_namespaced_service, token.name, ns)
        endpoint = names.Endpoint.from_service(k.to_dict(svc))
        if endpoint is not None:
            endpoints.append(endpoint)
    for external in required.external:
        endpoints.append(names.Endpoint.external(external.host, external.ports))
    return endpoints


def _extract(archive: bytes, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    for path in [target, *target.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
