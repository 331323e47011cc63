"""``python3 -m pytest_bridge_agent.guard``: the in-cluster restore guard of one bridge session.

Runs as the Job ``pytest-bridge-guard-<session>`` that ``pytest_bridge.cluster.restore`` creates (it may
start before the plugin has written the record: it waits for it). Every second it reads the
session's restore record (a ConfigMap) and asks the session's agent pods for ``/status``; once no client has been connected for the TTL it undoes the bridge (the record's
reverse JSON Patch, or deleting the agent pod and re-creating a bare Pod from the record), then
deletes its own Job, whose ownerReferences take the ServiceAccount, Role, RoleBinding and ConfigMaps
with it. The record ConfigMap disappearing, once seen, means the plugin restored the workload itself: exit 0.

Configuration (env): GUARD_SESSION, GUARD_NAMESPACE, GUARD_TTL_SECONDS, GUARD_RECORD_CONFIGMAP,
GUARD_JOB, GUARD_SESSION_LABEL, GUARD_STATUS_PORT; for tests GUARD_API_URL (default
``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``), GUARD_TOKEN_FILE, GUARD_CA_FILE
(service-account defaults; an empty GUARD_CA_FILE means plain http) and GUARD_POLL_SECONDS.

Stdlib only. The decision logic (:class:`Watchdog`) and the request builders are pure; :class:`Guard`
does the I/O through two injected callables so it can be driven by fakes.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import labels, merge
from .kubeapi import ApiClient, Request, Response, endpoint_from_env, json_request, quote

__all__ = [
    "IDLE_EXIT_PREFIX",
    "AgentPod",
    "AgentStatus",
    "Guard",
    "GuardConfig",
    "Record",
    "Watchdog",
    "agent_pods",
    "config_from_env",
    "main",
    "parse_record",
    "parse_status",
]

log = logging.getLogger("pytest_bridge_guard")

# The guard's own pod carries the session label too (with role=guard) and is not an agent.
ROLE_LABEL = labels.ROLE_LABEL
JSON_PATCH = "application/json-patch+json"
KINDS = {"Deployment": "deployments", "StatefulSet": "statefulsets", "Pod": "pods"}
# Objects other than the workload that a bridge may change (pytest_bridge.cluster.workloads): undone first.
RELATED_KINDS = {
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}"
}
MAX_BACKOFF = 30.0
# How an agent that exits for want of a client begins its termination message (pytest_bridge_agent.__main__).
IDLE_EXIT_PREFIX = "pytest-bridge: no client for"
POD_GONE_TIMEOUT = 60.0
EXIT_TERMINATED = 143  # 128 + SIGTERM: the Job replaces a pod that failed, not one that succeeded


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardConfig:
    session: str
    namespace: str
    ttl: float
    record_configmap: str
    job: str
    session_label: str
    status_port: int
    api_url: str
    token_file: str
    ca_file: str  # "" = no TLS (plain http, tests only)
    poll_interval: float = 1.0
    status_timeout: float = 1.0
    api_timeout: float = 10.0
    own_pod: str = ""  # $HOSTNAME: never probed as an agent


def config_from_env(env: Mapping[str, str]) -> GuardConfig:
    """The configuration from ``env``; ValueError naming what is missing or malformed."""
    required = [
        "GUARD_SESSION",
        "GUARD_NAMESPACE",
        "GUARD_TTL_SECONDS",
        "GUARD_RECORD_CONFIGMAP",
        "GUARD_JOB",
        "GUARD_SESSION_LABEL",
        "GUARD_STATUS_PORT",
    ]
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise ValueError(f"missing environment variable(s): {', '.join(missing)}")
    ttl = float(env["GUARD_TTL_SECONDS"])
    port = int(env["GUARD_STATUS_PORT"])
    poll = float(env.get("GUARD_POLL_SECONDS") or 1.0)
    if not (ttl >= 0 and poll > 0 and 0 < port < 65536):
        raise ValueError("GUARD_TTL_SECONDS must be >= 0, GUARD_POLL_SECONDS > 0, GUARD_STATUS_PORT a port")
    endpoint = endpoint_from_env(env, "GUARD_")
    return GuardConfig(
        session=env["GUARD_SESSION"],
        namespace=env["GUARD_NAMESPACE"],
        ttl=ttl,
        record_configmap=env["GUARD_RECORD_CONFIGMAP"],
        job=env["GUARD_JOB"],
        session_label=env["GUARD_SESSION_LABEL"],
        status_port=port,
        api_url=endpoint.api_url,
        token_file=endpoint.token_file,
        ca_file=endpoint.ca_file,
        poll_interval=poll,
        own_pod=env.get("HOSTNAME", ""),
    )


# --- the restore record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """``pytest_bridge.cluster.restore.RestoreRecord`` as the guard reads it."""

    session: str
    namespace: str
    kind: str
    name: str
    reverse_patch: list[dict[str, Any]]
    original: dict[str, Any]
    owner: str = ""
    created: float = 0.0
    related: list[dict[str, Any]] = field(default_factory=list)  # [{kind, name, reverse_patch}]
    roll_pods: list[str] = field(default_factory=list)  # deleted after the restore (StatefulSet OnDelete)
    forward: list[dict[str, Any]] = field(default_factory=list)  # what the bridge set: see merge.py


def parse_record(record_map: Any, config: GuardConfig) -> Record:
    """The record in a ConfigMap (API JSON); ValueError if it is missing, malformed or not ours."""
    try:
        raw = base64.b64decode(record_map["binaryData"]["record.json"], validate=True)
        data = json.loads(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"ConfigMap {config.record_configmap!r} has no readable binaryData key 'record.json': {e}"
        ) from e
    if not isinstance(data, dict):
        raise ValueError("record.json is not a JSON object")  # noqa: TRY004 - callers catch ValueError
    try:
        record = Record(
            session=str(data["session"]),
            namespace=str(data["namespace"]),
            kind=str(data["kind"]),
            name=str(data["name"]),
            reverse_patch=list(data.get("reverse_patch") or []),
            original=dict(data.get("original") or {}),
            owner=str(data.get("owner", "")),
            created=float(data.get("created", 0.0)),
            related=[dict(r) for r in data.get("related") or []],
            roll_pods=[str(p) for p in data.get("roll_pods") or []],
            forward=[dict(op) for op in data.get("forward") or []],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"record.json lacks or mistypes a field: {e}") from e
    if record.kind not in KINDS:
        raise ValueError(f"record kind {record.kind!r} is not one of {sorted(KINDS)}")
    for related in record.related:
        if related.get("kind") not in RELATED_KINDS or not related.get("name") or not related.get("reverse_patch"):
            raise ValueError(f"record names a related object it cannot restore: {related!r}")
    if (record.session, record.namespace) != (config.session, config.namespace):
        raise ValueError(
            f"record is for session {record.session!r} in {record.namespace!r}, "
            f"this guard for {config.session!r} in {config.namespace!r}"
        )
    if record.kind != "Pod" and not record.reverse_patch:
        raise ValueError(f"record for {record.kind} {record.name!r} has no reverse_patch")
    if record.kind == "Pod" and not record.original:
        raise ValueError(f"record for Pod {record.name!r} has no original manifest")
    return record


# --- requests --------------------------------------------------------------------------------


def record_request(config: GuardConfig) -> Request:
    return Request("GET", f"/api/v1/namespaces/{quote(config.namespace)}/configmaps/{quote(config.record_configmap)}")


def pods_request(config: GuardConfig) -> Request:
    selector = f"{config.session_label}={config.session}"
    query = urllib.parse.urlencode({"labelSelector": selector})
    return Request("GET", f"/api/v1/namespaces/{quote(config.namespace)}/pods?{query}")


def object_path(kind: str, namespace: str, name: str) -> str:
    group = "/api/v1" if kind == "Pod" else "/apis/apps/v1"
    return f"{group}/namespaces/{quote(namespace)}/{KINDS[kind]}/{quote(name)}"


def related_path(record: Record, related: Mapping[str, Any]) -> str:
    return RELATED_KINDS[str(related["kind"])].format(
        namespace=quote(record.namespace), name=quote(str(related["name"]))
    )


def get_request(record: Record) -> Request:
    return Request("GET", object_path(record.kind, record.namespace, record.name))


def reverse_patch_request(record: Record) -> Request:
    return json_request(
        "PATCH", object_path(record.kind, record.namespace, record.name), record.reverse_patch, JSON_PATCH
    )


def delete_pod_request(record: Record, uid: str | None) -> Request:
    options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    if uid:  # delete exactly the agent pod that was checked, not a pod re-created meanwhile
        options["preconditions"] = {"uid": uid}
    return json_request("DELETE", object_path("Pod", record.namespace, record.name), options)


def create_pod_request(record: Record) -> Request:
    return json_request("POST", f"/api/v1/namespaces/{quote(record.namespace)}/pods", record.original)


def job_request(config: GuardConfig) -> Request:
    return Request("GET", f"/apis/batch/v1/namespaces/{quote(config.namespace)}/jobs/{quote(config.job)}")


def delete_job_request(config: GuardConfig) -> Request:
    path = f"/apis/batch/v1/namespaces/{quote(config.namespace)}/jobs/{quote(config.job)}"
    return Request("DELETE", f"{path}?propagationPolicy=Background")


def fetch_status(ip: str, port: int, timeout: float) -> Any:
    """``GET http://ip:port/status`` of an agent; OSError or ValueError on failure."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)  # explicit port: IPv6 literals work
    try:
        conn.request("GET", "/status", headers={"User-Agent": "pytest-bridge-guard"})
        response = conn.getresponse()
        data = response.read()
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP answer: {e!r}") from e
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"HTTP {response.status}")
    return json.loads(data)


# --- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentStatus:
    """One agent's ``/status``, as far as the guard cares."""

    pod: str
    connected_clients: int
    idle_seconds: float | None = None
    sessions_total: int | None = None


def parse_status(pod: str, body: Any) -> AgentStatus:
    if not isinstance(body, dict) or not isinstance(body.get("connected_clients"), int):
        raise ValueError(f"not an agent status: {body!r}")  # noqa: TRY004 - callers catch ValueError
    idle = body.get("idle_seconds")
    total = body.get("sessions_total")
    return AgentStatus(
        pod=pod,
        connected_clients=int(body["connected_clients"]),
        idle_seconds=float(idle) if isinstance(idle, int | float) and not isinstance(idle, bool) else None,
        sessions_total=int(total) if isinstance(total, int) and not isinstance(total, bool) else None,
    )


@dataclass(frozen=True)
class AgentPod:
    """What the pod list says of one agent pod (no network needed to know it)."""

    name: str
    ip: str
    ready: bool  # every container Ready: the kubelet reaches the agent's /healthz
    restarts: int  # restarts of containers, summed
    idle_exit: str | None  # the agent's last "no client" termination message, if it left one


def _idle_exit(container_statuses: Any) -> str | None:
    for status in container_statuses if isinstance(container_statuses, list) else []:
        if not isinstance(status, dict):
            continue
        for key in ("state", "lastState"):
            terminated = (status.get(key) or {}).get("terminated") or {}
            message = str(terminated.get("message") or "")
            if message.startswith(IDLE_EXIT_PREFIX):
                return message.strip()
    return None


def agent_pods(pod_list: Any, config: GuardConfig) -> list[AgentPod]:
    """The Running agent pods of the session (not the guard's own pod), from a pod list."""
    pods = []
    items = pod_list.get("items") if isinstance(pod_list, dict) else None
    for pod in items if isinstance(items, list) else []:
        if not isinstance(pod, dict):
            continue
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        labels = meta.get("labels") or {}
        name = str(meta.get("name", ""))
        if (
            labels.get(ROLE_LABEL) == "guard"
            or config.job in (labels.get("job-name"), labels.get("batch.kubernetes.io/job-name"))
            or name == config.own_pod
        ):
            continue
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        containers = status.get("containerStatuses") or []
        containers = [c for c in containers if isinstance(c, dict)] if isinstance(containers, list) else []
        pods.append(
            AgentPod(
                name=name,
                ip=str(status["podIP"]),
                ready=bool(containers) and all(c.get("ready") is True for c in containers),
                restarts=sum(int(c.get("restartCount") or 0) for c in containers),
                idle_exit=_idle_exit(containers),
            )
        )
    return pods


@dataclass
class Watchdog:
    """When was a client last connected, and is that longer ago than the TTL? (Pure.)

    ``last_alive`` starts at the guard's start, so a session has a full TTL to connect. An agent
    with a client makes "now" the last-alive time. An agent without one that did have a client
    (``sessions_total > 0``) tells how long ago that client left (``idle_seconds``); a fresh
    agent's ``idle_seconds`` counts from its own start, which says nothing about the session, so a
    crash-looping agent pod cannot keep the bridge alive forever.
    """

    ttl: float
    last_alive: float

    def observe(self, now: float, statuses: Iterable[AgentStatus], *, unknown: bool = False) -> None:
        """``unknown``: an agent serves (the kubelet says so) but its status cannot be read: liveness
        that cannot be disproven counts as alive (a NetworkPolicy must not get a live session restored)."""
        best = now if unknown else self.last_alive
        for status in statuses:
            if status.connected_clients > 0:
                best = max(best, now)
            elif status.idle_seconds is not None and status.sessions_total:
                best = max(best, now - max(0.0, status.idle_seconds))
        self.last_alive = best

    def gone(self, now: float) -> None:
        """Proof that no client is coming back (the agent left for want of one): restore now."""
        self.last_alive = min(self.last_alive, now - self.ttl - 1.0)

    def idle_for(self, now: float) -> float:
        return max(0.0, now - self.last_alive)

    def expired(self, now: float) -> bool:
        return self.idle_for(now) > self.ttl


# --- the guard -------------------------------------------------------------------------------


@dataclass
class Observation:
    statuses: list[AgentStatus]
    unknown: bool = False  # an agent serves but cannot be asked (or the pods cannot be listed)
    idle_exit: str | None = None  # an agent left for want of a client since first seen


class Terminated(BaseException):
    """SIGTERM/SIGINT outside a restore: unwind to :func:`main`."""


class Retry(Exception):
    """The restore could not be completed now; try again on a later round."""


class Abandon(Exception):
    """The restore cannot succeed without a person: stop retrying, say why, keep the record."""


Send = Callable[[Request], Response]
FetchStatus = Callable[[str, int, float], Any]


@dataclass
class Guard:
    config: GuardConfig
    send: Send
    fetch: FetchStatus = fetch_status
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    critical: bool = False  # inside a restore: a signal is remembered, not acted on
    abandoned: str = ""  # why the restore needs a person; no more retries
    stop_requested: bool = False
    _pod_errors: dict[str, str] = field(default_factory=dict)
    _restarts: dict[str, int] = field(default_factory=dict)  # per agent pod: restarts when first seen
    _record_seen: bool = False  # a record that is missing before it was ever seen is not written yet
    _alive: bool | None = None
    _last_idle_log: float = 0.0

    # ---- signals ----
    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        if not self.critical:
            raise Terminated(signum)
        log.warning("%s during the restore: finishing it first", signal.Signals(signum).name)

    def exit_code_on_terminate(self, send: Send | None = None) -> int:
        """0 if our Job is gone or going (the plugin's cleanup); else 143 so the Job starts a new guard.

        A pod stopped by a node drain or eviction that exits 0 would complete the Job, whose TTL
        would then delete the restore record with it: the bridge would stay unguarded.
        """
        try:
            response = (send or self.send)(job_request(self.config))
        except OSError as e:
            log.warning(
                "terminated; cannot tell whether the guard Job is being deleted (%s): exit %d", e, EXIT_TERMINATED
            )
            return EXIT_TERMINATED
        body = response.body if isinstance(response.body, dict) else {}
        if response.status == 404 or (response.status == 200 and (body.get("metadata") or {}).get("deletionTimestamp")):
            log.info("terminated: the guard Job is being deleted; exiting")
            return 0
        log.warning("terminated while the session is still guarded (%s): exit %d", response.message(), EXIT_TERMINATED)
        return EXIT_TERMINATED

    # ---- one round ----
    def observe(self) -> Observation:
        """What the session's agent pods say: their statuses, whether one is out of reach while it
        serves, and whether one left for want of a client since the guard first saw it."""
        try:
            response = self.send(pods_request(self.config))
        except OSError as e:
            log.warning("cannot list the session's pods: %s", e)
            return Observation([], unknown=True)  # not knowing is not evidence of death
        if response.status != 200:
            log.warning("cannot list the session's pods: %s", response.message())
            return Observation([], unknown=True)
        result = Observation([])
        seen = set()
        for pod in agent_pods(response.body, self.config):
            seen.add(pod.name)
            baseline = self._restarts.setdefault(pod.name, pod.restarts)
            if pod.idle_exit and pod.restarts > baseline:
                result.idle_exit = f"pod {pod.name}: {pod.idle_exit}"
            try:
                status = parse_status(pod.name, self.fetch(pod.ip, self.config.status_port, self.config.status_timeout))
            except (OSError, ValueError) as e:
                error = str(e) or type(e).__name__
                # The kubelet reaches the agent (Ready) and we do not: the network is in the way
                # (a NetworkPolicy). An agent that is not Ready is not serving anyone.
                result.unknown = result.unknown or pod.ready
                if self._pod_errors.get(pod.name) != error:
                    why = "liveness unknown: waiting for it to leave when idle" if pod.ready else "not serving"
                    log.warning(
                        "agent status of pod %s (%s:%d) unreachable (%s): %s",
                        pod.name, pod.ip, self.config.status_port, error, why,
                    )  # fmt: skip
                self._pod_errors[pod.name] = error
                continue
            if self._pod_errors.pop(pod.name, None) is not None:
                log.info("agent status of pod %s reachable again", pod.name)
            result.statuses.append(status)
        for pod_name in set(self._pod_errors) - seen:
            del self._pod_errors[pod_name]
        return result

    def report(self, watchdog: Watchdog, now: float, statuses: list[AgentStatus]) -> None:
        alive = [s for s in statuses if s.connected_clients > 0]
        if alive:
            if self._alive is not True:
                clients = ", ".join(f"{s.pod}: {s.connected_clients}" for s in alive)
                log.info("session alive: client(s) connected (%s)", clients)
            self._alive = True
            return
        idle = watchdog.idle_for(now)
        if self._alive is not False or now - self._last_idle_log >= max(10.0, self.config.ttl / 10):
            where = ", ".join(s.pod for s in statuses) or "no reachable agent pod"
            log.info(
                "session idle for %.1fs (%s); restore after %.1fs",
                idle, where, max(0.0, self.config.ttl - idle),
            )  # fmt: skip
            self._last_idle_log = now
        self._alive = False

    # ---- restore ----
    def _still_bridged(self, obj: Any, record: Record) -> bool:
        if not isinstance(obj, dict):
            return True  # can't tell: assume ours, retry
        meta = obj.get("metadata") or {}
        if record.kind == "Pod":
            marks = {**(meta.get("annotations") or {}), **(meta.get("labels") or {})}
        else:
            marks = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
            marks = marks.get("annotations") or {}
        return bool(marks.get(self.config.session_label) == self.config.session)

    def restore(self, record: Record) -> None:
        """Undo the bridge; Retry if that is not possible now (OSError: no answer).

        Related objects (an HPA pinned to one replica) first, then the workload, then the pods its
        controller only replaces when deleted (StatefulSet OnDelete). Each step is idempotent: a
        retried restore does again only what is left.
        """
        what = f"{record.kind} {record.namespace}/{record.name}"
        if record.kind == "Pod":
            self._restore_pod(record, what)
            return
        for related in record.related:
            self._restore_related(record, related)
        self._restore_workload(record, what)
        if record.roll_pods:
            self._roll_pods(record, what)

    def _restore_related(self, record: Record, related: Mapping[str, Any]) -> None:
        what = f"{related['kind']} {record.namespace}/{related['name']}"
        path = related_path(record, related)
        response = self.send(Request("PATCH", path, json.dumps(related["reverse_patch"]).encode(), JSON_PATCH))
        if response.status in (200, 201):
            log.info("restored %s (reverse patch applied)", what)
            return
        if response.status == 404:
            log.info("%s no longer exists: nothing to restore", what)
            return
        if response.status not in (409, 422):
            raise Retry(f"reverse patch of {what} failed: {response.message()}")
        current = self.send(Request("GET", path))
        if current.status == 404:
            return
        body = current.body if isinstance(current.body, dict) else None
        if current.status == 200 and body is not None:
            marks = (body.get("metadata") or {}).get("annotations") or {}
            if marks.get(self.config.session_label) != self.config.session:
                log.info("%s no longer carries session %s: already restored", what, record.session)
                return
        raise Retry(f"reverse patch of {what} refused ({response.message()})")

    def _roll_pods(self, record: Record, what: str) -> None:
        """Delete the pods still running the agent, once the controller has seen the restored spec
        (a pod deleted before that would come back from the agent's template)."""
        deadline = self.clock() + POD_GONE_TIMEOUT
        while True:
            current = self.send(get_request(record))
            if current.status == 404:
                return
            body = current.body if isinstance(current.body, dict) else {}
            if current.status != 200:
                raise Retry(f"reading {what} failed: {current.message()}")
            observed = (body.get("status") or {}).get("observedGeneration") or 0
            if observed >= (body.get("metadata") or {}).get("generation", 0):
                break
            if self.clock() > deadline:
                raise Retry(f"the controller of {what} has not taken up the restore")
            self.sleep(0.2)
        for name in record.roll_pods:
            pod = Record(record.session, record.namespace, "Pod", name, [], {})
            current = self.send(get_request(pod))
            if current.status == 404:
                continue
            if current.status != 200:
                raise Retry(f"reading pod {name} failed: {current.message()}")
            meta = (current.body.get("metadata") or {}) if isinstance(current.body, dict) else {}
            if meta.get("deletionTimestamp") or (meta.get("labels") or {}).get(self.config.session_label) != (
                self.config.session
            ):
                continue  # already replaced from the restored template
            deleted = self.send(delete_pod_request(pod, meta.get("uid")))
            if deleted.status not in (200, 202, 404):
                raise Retry(f"deleting pod {name} (it still runs the agent) failed: {deleted.message()}")
            log.info("deleted pod %s: its StatefulSet replaces pods only when they are deleted (OnDelete)", name)

    def _restore_workload(self, record: Record, what: str) -> None:
        response = self.send(reverse_patch_request(record))
        if response.status == 403:
            raise Abandon(f"the guard may not patch {what} ({response.message()}): its Role was changed or removed")
        if response.status in (200, 201):
            log.info("restored %s (reverse patch applied)", what)
            return
        if response.status == 404:
            log.info("%s no longer exists: nothing to restore", what)
            return
        if response.status not in (409, 422):
            raise Retry(f"reverse patch of {what} failed: {response.message()}")
        current = self.send(get_request(record))
        if current.status == 404:
            log.info("%s no longer exists: nothing to restore", what)
            return
        if current.status != 200:
            raise Retry(
                f"reverse patch of {what} refused ({response.message()}); reading it failed: {current.message()}"
            )
        if not self._still_bridged(current.body, record):
            log.info("%s no longer carries session %s: already restored", what, record.session)
            return
        if not record.forward:
            raise Abandon(
                f"{what} was changed while bridged by session {record.session} and its record cannot tell "
                "the bridge's changes from the other ones"
            )
        # Someone changed it while bridged (kubectl set image, scale, apply): keep their change.
        try:
            merged = merge.merge_restore(record.original, current.body, record.forward)
        except ValueError as e:
            raise Abandon(f"{what} was changed while bridged and the record's patch does not fit it: {e}") from e
        answer = self.send(json_request("PATCH", object_path(record.kind, record.namespace, record.name),
                                         merged.patch, JSON_PATCH))  # fmt: skip
        if answer.status in (200, 201):
            log.warning(
                "restored %s, keeping what was changed during the session: %s", what, ", ".join(merged.kept) or "-"
            )
            return
        if answer.status == 404:
            log.info("%s no longer exists: nothing to restore", what)
            return
        if answer.status == 403 or (
            answer.status == 422 and isinstance(answer.body, dict) and merge.refused_as_invalid(answer.body)
        ):
            raise Abandon(f"the restore of {what}, keeping changes made during the session, was refused: "
                          f"{answer.message()}")  # fmt: skip
        raise Retry(f"{what} changed again while restoring it ({answer.message()})")

    def _restore_pod(self, record: Record, what: str) -> None:
        current = self.send(get_request(record))
        if current.status == 200:
            if not self._still_bridged(current.body, record):
                log.info("%s no longer carries session %s: already restored", what, record.session)
                return
            uid = (current.body.get("metadata") or {}).get("uid") if isinstance(current.body, dict) else None
            deleted = self.send(delete_pod_request(record, uid))
            if deleted.status == 409:
                raise Retry(f"{what} was replaced while deleting it ({deleted.message()})")
            if deleted.status not in (200, 202, 404):
                raise Retry(f"deleting the agent pod {what} failed: {deleted.message()}")
            log.info("deleted the agent pod %s; waiting for it to go", what)
            deadline = self.clock() + POD_GONE_TIMEOUT
            while True:
                gone = self.send(get_request(record))
                if gone.status == 404:
                    break
                if self.clock() > deadline:
                    raise Retry(f"the agent pod {what} is still there {POD_GONE_TIMEOUT:.0f}s after deleting it")
                self.sleep(0.2)
        elif current.status != 404:
            raise Retry(f"reading {what} failed: {current.message()}")
        created = self.send(create_pod_request(record))
        if created.status in (200, 201, 202):
            log.info("restored %s (re-created from the record)", what)
            return
        if created.status == 409:
            again = self.send(get_request(record))
            if again.status == 200 and not self._still_bridged(again.body, record):
                log.info("%s was re-created by someone else: already restored", what)
                return
        raise Retry(f"re-creating {what} failed: {created.message()}")

    def delete_job(self) -> None:
        for attempt in range(3):
            try:
                response = self.send(delete_job_request(self.config))
            except OSError as e:
                response = Response(0, {"message": str(e)})
            if response.status in (200, 202, 404):
                log.info(
                    "deleted the guard Job %s (its ServiceAccount, Role, RoleBinding and ConfigMaps follow)",
                    self.config.job,
                )
                return
            log.warning("deleting the guard Job %s failed: %s", self.config.job, response.message())
            if attempt < 2:
                self.sleep(1.0)
        log.warning("leaving the guard Job to its ttlSecondsAfterFinished")

    # ---- the loop ----
    def run(self) -> int:
        cfg = self.config
        log.info(
            "started: session %s in %s, TTL %gs, record %s, agents' status port %d",
            cfg.session, cfg.namespace, cfg.ttl, cfg.record_configmap, cfg.status_port,
        )  # fmt: skip
        watchdog = Watchdog(cfg.ttl, self.clock())
        backoff = cfg.poll_interval
        while True:
            try:
                code = self._round(watchdog)
            except Retry as e:
                log.warning("%s; retrying in %.0fs", e, backoff)
            except Exception:
                # A guard that crashes is restarted by its Job, but only backoffLimit times; then the
                # Job's TTL deletes the record with it. Keep going instead.
                log.exception("unexpected error; retrying in %.0fs", backoff)
            else:
                if code is not None:
                    return code
                backoff = cfg.poll_interval
                self.sleep(cfg.poll_interval)
                continue
            if self.stop_requested:
                raise Terminated(signal.SIGTERM)
            self.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _round(self, watchdog: Watchdog) -> int | None:
        """One poll: the exit code when done, None to poll again; Retry to back off."""
        cfg = self.config
        record = self._read_record()
        if self.abandoned:
            if record is None:
                log.info("restore record %s is gone: someone cleaned up; exiting", cfg.record_configmap)
                return 0
            return None  # waits for a person: `pytest-bridge cleanup` deletes the Job and the record
        if record is None and not self._record_seen:
            # The plugin starts the guard first and writes the record after; if it dies before
            # arming the guard, the Job's setup deadline ends it (pytest_bridge.cluster.restore).
            return None
        if record is None:
            log.info(
                "restore record %s is gone: the session's client restored and is cleaning up; exiting",
                cfg.record_configmap,
            )
            return 0
        if not self._record_seen:
            log.info("restore record %s read: guarding %s %s", cfg.record_configmap, record.kind, record.name)
            self._record_seen = True
            watchdog.last_alive = self.clock()  # the session's full TTL to connect counts from here
        seen = self.observe()
        now = self.clock()
        alive = any(s.connected_clients > 0 for s in seen.statuses)
        if seen.idle_exit and not alive:
            log.info("the agent left for want of a client (%s): restoring now", seen.idle_exit)
            watchdog.gone(now)
        else:
            watchdog.observe(now, seen.statuses, unknown=seen.unknown)
        self.report(watchdog, now, seen.statuses)
        if not watchdog.expired(now):
            return None
        log.info(
            "restoring %s %s: no client for %.1fs (TTL %gs; bridged by %s)",
            record.kind, record.name, watchdog.idle_for(now), cfg.ttl, record.owner or "?",
        )  # fmt: skip
        self.critical = True
        try:
            self.restore(record)
        except Abandon as e:
            self.abandoned = str(e)
            log.error(  # noqa: TRY400 - the message says it all
                "RESTORE ABANDONED, no more retries: %s. The record %s stays; restore the workload by hand, "
                "then run `pytest-bridge cleanup -n %s`", e, cfg.record_configmap, cfg.namespace,
            )  # fmt: skip
            return None
        except OSError as e:
            raise Retry(f"restore not done: {e}") from e
        except Retry as e:
            raise Retry(f"restore not done: {e}") from e
        finally:
            self.critical = self.stop_requested  # done or not: a deferred signal is acted on below
        self.critical = True  # restored: finish cleaning up whatever signal comes
        self.delete_job()
        log.info("exiting: session %s restored", cfg.session)
        return 0

    def _read_record(self) -> Record | None:
        try:
            response = self.send(record_request(self.config))
        except OSError as e:
            raise Retry(f"cannot read the restore record: {e}") from e
        if response.status == 404:
            return None
        if response.status != 200:
            raise Retry(f"cannot read the restore record {self.config.record_configmap}: {response.message()}")
        try:
            return parse_record(response.body, self.config)
        except ValueError as e:
            log.error("UNUSABLE RESTORE RECORD %s: %s", self.config.record_configmap, e)  # noqa: TRY400
            raise Retry("unusable restore record") from e


def main(environ: Mapping[str, str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s pytest-bridge-guard: %(message)s"
    )
    try:
        config = config_from_env(os.environ if environ is None else environ)
        api = ApiClient(config)
    except ValueError as e:
        log.error("bad configuration: %s", e)  # noqa: TRY400 - the message says it all
        return 2
    guard = Guard(config, api.send)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, guard.on_signal)
    try:
        return guard.run()
    except Terminated:
        guard.critical = True  # a second signal must not interrupt the answer
        # The pod has terminationGracePeriodSeconds 2: ask quickly.
        return guard.exit_code_on_terminate(lambda request: api.send(request, timeout=1.0))


if __name__ == "__main__":
    sys.exit(main())
