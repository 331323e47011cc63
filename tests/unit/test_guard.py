"""The restore guard's pure parts: configuration, record, requests, the restore decision; the loop with fakes."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pytest_bridge_agent import guard as g
from pytest_bridge_agent import kubeapi

from pytest_bridge.cluster.restore import ROLE_LABEL, RestoreRecord, guard_job
from pytest_bridge.core.patch import SESSION_LABEL

SESSION = "s-1a2b3c"
NS = "shop"
ENV = {
    "GUARD_SESSION": SESSION,
    "GUARD_NAMESPACE": NS,
    "GUARD_TTL_SECONDS": "600.0",
    "GUARD_RECORD_CONFIGMAP": f"pytest-bridge-restore-{SESSION}",
    "GUARD_JOB": f"pytest-bridge-guard-{SESSION}",
    "GUARD_SESSION_LABEL": SESSION_LABEL,
    "GUARD_STATUS_PORT": "47101",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
}
REVERSE = [
    {"op": "test", "path": "/spec/template/metadata/annotations/pytest-bridge.io~1session", "value": SESSION},
    {"op": "replace", "path": "/spec/replicas", "value": 3},
]


def config(**overrides: str) -> g.GuardConfig:
    return g.config_from_env({**ENV, **overrides})


def record(kind: str = "Deployment", **changes: Any) -> RestoreRecord:
    fields: dict[str, Any] = {
        "session": SESSION,
        "namespace": NS,
        "kind": kind,
        "name": "orders",
        "reverse_patch": REVERSE if kind != "Pod" else [],
        "original": {"kind": "Pod", "metadata": {"name": "orders"}} if kind == "Pod" else {"kind": kind},
        "owner": "dev@laptop pid 1",
        "created": 1700000000.0,
        **changes,
    }
    return RestoreRecord(**fields)


def record_map(rec: RestoreRecord | str) -> dict[str, Any]:
    text = rec if isinstance(rec, str) else rec.to_json()
    return {"binaryData": {"record.json": base64.b64encode(text.encode()).decode()}}


# ---------------------------------------------------------------- contract with the plugin


def test_guard_job_env_is_a_valid_configuration() -> None:
    job = guard_job(SESSION, NS, "agent:dev", 600.0, 47101)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    cfg = g.config_from_env({**env, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert cfg == config()
    assert container["command"] == ["python3", "-I", "/opt/pytest-bridge/pytest-bridge.pyz", "guard"]


def test_constants_match_the_plugin() -> None:
    assert g.ROLE_LABEL == ROLE_LABEL
    guard_labels = guard_job(SESSION, NS, "agent:dev", 1, 47101)["spec"]["template"]["metadata"]["labels"]
    assert guard_labels[ROLE_LABEL] == "guard"


# ---------------------------------------------------------------- configuration


def test_config_defaults_in_cluster() -> None:
    cfg = config()
    assert cfg.api_url == "https://10.96.0.1:443"
    assert cfg.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert cfg.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert (cfg.ttl, cfg.status_port, cfg.poll_interval, cfg.session_label) == (600.0, 47101, 1.0, SESSION_LABEL)


def test_config_overrides_for_tests() -> None:
    assert config(KUBERNETES_SERVICE_HOST="fd00::1").api_url == "https://[fd00::1]:443"
    assert config(GUARD_CA_FILE="").api_url == "http://10.96.0.1:443"
    cfg = config(GUARD_API_URL="http://127.0.0.1:8080/", GUARD_TOKEN_FILE="/tmp/t", GUARD_POLL_SECONDS="0.2")
    assert (cfg.api_url, cfg.token_file, cfg.poll_interval) == ("http://127.0.0.1:8080", "/tmp/t", 0.2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"GUARD_JOB": ""}, "GUARD_JOB"),
        ({"GUARD_TTL_SECONDS": "soon"}, "could not convert"),
        ({"GUARD_STATUS_PORT": "0"}, "GUARD_STATUS_PORT"),
        ({"KUBERNETES_SERVICE_HOST": ""}, "no API server"),
    ],
)
def test_config_errors(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**changes)


def test_main_refuses_bad_configuration(caplog: pytest.LogCaptureFixture) -> None:
    assert g.main({}) == 2
    assert "missing environment variable(s): GUARD_SESSION" in caplog.text


# ---------------------------------------------------------------- record


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "Pod"])
def test_record_round_trip_from_the_plugin(kind: str) -> None:
    rec = record(kind)
    parsed = g.parse_record(record_map(rec), config())
    assert vars(parsed) == vars(rec)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"binaryData": {}}, "no readable binaryData key"),
        ({"binaryData": {"record.json": "!!"}}, "no readable binaryData key"),
        (record_map("[1]"), "not a JSON object"),
        (record_map(json.dumps({"session": SESSION})), "lacks or mistypes"),
        (record_map(record(session="other")), "session 'other'"),
        (record_map(record(namespace="other")), "in 'other'"),
        (record_map(record(kind="DaemonSet")), "DaemonSet"),
        (record_map(record(reverse_patch=[])), "no reverse_patch"),
        (record_map(record("Pod", original={})), "no original"),
    ],
)
def test_bad_records(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        g.parse_record(body, config())


# ---------------------------------------------------------------- requests


def parsed(rec: RestoreRecord) -> g.Record:
    return g.parse_record(record_map(rec), config())


def test_read_requests() -> None:
    cfg = config()
    assert g.record_request(cfg) == kubeapi.Request(
        "GET", f"/api/v1/namespaces/shop/configmaps/pytest-bridge-restore-{SESSION}"
    )
    assert g.pods_request(cfg) == kubeapi.Request(
        "GET", f"/api/v1/namespaces/shop/pods?labelSelector=pytest-bridge.io%2Fsession%3D{SESSION}"
    )
    assert g.job_request(cfg).path == f"/apis/batch/v1/namespaces/shop/jobs/pytest-bridge-guard-{SESSION}"


@pytest.mark.parametrize(("kind", "plural"), [("Deployment", "deployments"), ("StatefulSet", "statefulsets")])
def test_reverse_patch_request(kind: str, plural: str) -> None:
    request = g.reverse_patch_request(parsed(record(kind)))
    assert request.method == "PATCH"
    assert request.path == f"/apis/apps/v1/namespaces/shop/{plural}/orders"
    assert request.content_type == "application/json-patch+json"
    assert request.body is not None
    assert json.loads(request.body) == REVERSE


def test_bare_pod_requests() -> None:
    rec = parsed(record("Pod"))
    delete = g.delete_pod_request(rec, "uid-1")
    assert (delete.method, delete.path, delete.content_type) == (
        "DELETE",
        "/api/v1/namespaces/shop/pods/orders",
        "application/json",
    )
    assert delete.body is not None
    assert json.loads(delete.body) == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "gracePeriodSeconds": 0,
        "preconditions": {"uid": "uid-1"},
    }
    assert delete.body is not None
    assert "preconditions" not in json.loads(g.delete_pod_request(rec, None).body or b"{}")
    create = g.create_pod_request(rec)
    assert (create.method, create.path) == ("POST", "/api/v1/namespaces/shop/pods")
    assert create.body is not None
    assert json.loads(create.body) == rec.original


def test_delete_job_request() -> None:
    request = g.delete_job_request(config())
    assert request == kubeapi.Request(
        "DELETE", f"/apis/batch/v1/namespaces/shop/jobs/pytest-bridge-guard-{SESSION}?propagationPolicy=Background"
    )


# ---------------------------------------------------------------- status and pods


def test_parse_status() -> None:
    body = {"connected_clients": 0, "idle_seconds": 12.5, "sessions_total": 2, "streams_open": 0}
    assert g.parse_status("p", body) == g.AgentStatus("p", 0, 12.5, 2)
    assert g.parse_status("p", {"connected_clients": 1}) == g.AgentStatus("p", 1, None, None)
    bad_bodies: list[Any] = [[], {"connected_clients": "1"}, {"idle_seconds": 1}]
    for bad in bad_bodies:
        with pytest.raises(ValueError, match="not an agent status"):
            g.parse_status("p", bad)


def pod(name: str, phase: str = "Running", ip: str | None = "10.0.0.5", **labels: str) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, "labels": {SESSION_LABEL: SESSION, **labels}}, "status": status}


def test_agent_pods_skip_the_guard_and_pods_not_running() -> None:
    cfg = config(HOSTNAME="guard-pod-0")
    items = [
        pod("agent", ip="10.0.0.5"),
        pod("agent-v6", ip="fd00::5"),
        pod("pending", phase="Pending", ip=None),
        pod("no-ip", ip=None),
        pod("guard-by-role", **{ROLE_LABEL: "guard"}),
        pod("guard-by-job", **{"job-name": cfg.job}),
        pod("guard-pod-0"),
    ]
    assert [(p.name, p.ip) for p in g.agent_pods({"items": items}, cfg)] == [
        ("agent", "10.0.0.5"),
        ("agent-v6", "fd00::5"),
    ]
    assert [(p.name, p.ip) for p in g.agent_pods({"items": None}, cfg)] == []
    assert [(p.name, p.ip) for p in g.agent_pods({"items": ["garbage", None]}, cfg)] == []
    assert [(p.name, p.ip) for p in g.agent_pods("garbage", cfg)] == []


# ---------------------------------------------------------------- the decision


def alive(clients: int = 1) -> g.AgentStatus:
    return g.AgentStatus("agent", clients, 0.0, 1)


def idle(seconds: float, sessions_total: int = 1) -> g.AgentStatus:
    return g.AgentStatus("agent", 0, seconds, sessions_total)


def test_a_session_has_a_full_ttl_to_connect() -> None:
    dog = g.Watchdog(ttl=10, last_alive=100.0)
    dog.observe(105.0, [])
    assert not dog.expired(110.0)
    dog.observe(110.5, [idle(110.5 - 3, sessions_total=0)])  # a fresh agent: idle since it started
    assert dog.expired(110.5)


def test_connected_clients_keep_it_alive() -> None:
    dog = g.Watchdog(ttl=10, last_alive=0.0)
    for now in range(5, 60, 5):
        dog.observe(float(now), [idle(30), alive()])
        assert not dog.expired(float(now))
    assert dog.last_alive == 55.0
    dog.observe(60.0, [idle(1)])  # disconnected one second ago
    assert dog.last_alive == 59.0
    assert not dog.expired(69.0)
    dog.observe(69.5, [idle(10.5)])
    assert dog.idle_for(69.5) == 10.5
    assert dog.expired(69.5)


def test_idle_seconds_fill_the_gap_between_polls() -> None:
    dog = g.Watchdog(ttl=10, last_alive=0.0)
    dog.observe(5.0, [idle(0.5)])  # the client was connected between the start and this poll
    assert dog.last_alive == 4.5
    dog.observe(6.0, [idle(50)])  # never moves back
    assert dog.last_alive == 4.5
    dog.observe(7.0, [idle(-3)])  # a clock oddity cannot put it in the future
    assert dog.last_alive == 7.0


def test_unreachable_or_missing_agents_do_not_keep_it_alive() -> None:
    dog = g.Watchdog(ttl=1, last_alive=0.0)
    dog.observe(0.5, [])
    dog.observe(1.5, [])
    assert dog.expired(1.5)


def test_zero_ttl_restores_as_soon_as_nobody_is_connected() -> None:
    dog = g.Watchdog(ttl=0, last_alive=0.0)
    dog.observe(0.0, [alive()])
    assert not dog.expired(0.0)
    assert dog.expired(0.1)


# ---------------------------------------------------------------- the loop, with fakes


@dataclass
class Cluster:
    """Scripted API answers: handlers by (method, path without query) return a Response or raise."""

    routes: dict[tuple[str, str], Callable[[kubeapi.Request], kubeapi.Response]] = field(default_factory=dict)
    log: list[kubeapi.Request] = field(default_factory=list)
    now: float = 1000.0

    def send(self, request: kubeapi.Request) -> kubeapi.Response:
        self.log.append(request)
        handler = self.routes.get((request.method, request.path.split("?")[0]))
        if handler is None:
            return kubeapi.Response(404, {"message": "no route"})
        return handler(request)

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds
        if self.now > 10_000:
            raise AssertionError("the guard loops forever")

    def methods(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.log]


def answer(status: int, body: Any = None) -> Callable[[kubeapi.Request], kubeapi.Response]:
    return lambda request: kubeapi.Response(status, body)


def make_guard(cluster: Cluster, statuses: Callable[[], Any] | None = None, **env: str) -> g.Guard:
    cfg = config(GUARD_TTL_SECONDS="5", **env)
    rec = record()
    cluster.routes.setdefault(("GET", g.record_request(cfg).path), answer(200, record_map(rec)))
    pods = {"items": [pod("agent", ip="10.0.0.5")]}
    cluster.routes.setdefault(("GET", g.pods_request(cfg).path.split("?")[0]), answer(200, pods))
    cluster.routes.setdefault(("DELETE", g.delete_job_request(cfg).path.split("?")[0]), answer(200, {}))

    def fetch(ip: str, port: int, timeout: float) -> Any:
        assert (ip, port, timeout) == ("10.0.0.5", 47101, 1.0)
        if statuses is None:
            raise ConnectionRefusedError("refused")
        return statuses()

    return g.Guard(cfg, cluster.send, fetch, clock=lambda: cluster.now, sleep=cluster.sleep)


DEPLOY = "/apis/apps/v1/namespaces/shop/deployments/orders"
JOB = f"/apis/batch/v1/namespaces/shop/jobs/pytest-bridge-guard-{SESSION}"


def test_loop_restores_after_the_ttl_then_deletes_its_job(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(200, {})
    connected = {"until": 1010.0}

    def status() -> Any:
        if cluster.now < connected["until"]:
            return {"connected_clients": 1, "idle_seconds": 0.0, "sessions_total": 1}
        return {"connected_clients": 0, "idle_seconds": cluster.now - connected["until"], "sessions_total": 1}

    caplog.set_level("INFO", "pytest_bridge_guard")
    assert make_guard(cluster, status).run() == 0
    patches = [r for r in cluster.log if r.method == "PATCH"]
    assert len(patches) == 1
    assert 1015.0 < cluster.now <= 1016.0  # the TTL (5 s) after the client left, plus a poll
    assert cluster.methods()[-2:] == [f"PATCH {DEPLOY}", f"DELETE {JOB}?propagationPolicy=Background"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("session alive") for m in messages)
    assert any(m.startswith("session idle for") for m in messages)
    assert any(m.startswith("restoring Deployment orders") for m in messages)
    assert messages[-1] == f"exiting: session {SESSION} restored"


def test_loop_waits_for_the_record_then_exits_when_it_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    """The guard starts before the plugin writes the record: missing at first means "not yet"."""
    cluster = Cluster()
    reads = iter([404, 404, 404, 200, 200, 404])
    cluster.routes["GET", f"/api/v1/namespaces/shop/configmaps/pytest-bridge-restore-{SESSION}"] = lambda request: (
        kubeapi.Response(code, record_map(record()) if code == 200 else {"message": "not found"})
        for code in [next(reads)]
    ).__next__()
    caplog.set_level("INFO", "pytest_bridge_guard")
    assert make_guard(cluster, lambda: {"connected_clients": 1, "idle_seconds": 0, "sessions_total": 1}).run() == 0
    assert not [r for r in cluster.log if r.method in ("PATCH", "DELETE")]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("restore record pytest-bridge-restore-") and "read: guarding" in m for m in messages)
    assert "is gone" in messages[-1]


def ready_pod(name: str = "agent", restarts: int = 0, idle_exit: str | None = None) -> dict[str, Any]:
    """An agent pod the kubelet finds Ready, with its restarts and its last termination message."""
    container: dict[str, Any] = {"name": "app", "ready": True, "restartCount": restarts, "state": {"running": {}}}
    if idle_exit:
        container["lastState"] = {"terminated": {"exitCode": 0, "message": idle_exit}}
    result = pod(name)
    result["status"]["containerStatuses"] = [container]
    return result


def test_an_agent_that_serves_but_cannot_be_reached_is_never_taken_for_dead(caplog: pytest.LogCaptureFixture) -> None:
    """A NetworkPolicy between guard and agent: liveness unknown is not death, however long."""
    cluster = Cluster()
    pods_path = g.pods_request(config()).path.split("?")[0]
    cluster.routes["GET", pods_path] = answer(200, {"items": [ready_pod()]})
    guard = make_guard(cluster)  # fetch: connection refused / timed out
    caplog.set_level("INFO", "pytest_bridge_guard")
    with pytest.raises(AssertionError, match="loops forever"):
        guard.run()
    assert not [r for r in cluster.log if r.method == "PATCH"]
    assert any("liveness unknown" in r.getMessage() for r in caplog.records)


def test_an_agent_that_left_for_want_of_a_client_is_proof_even_out_of_reach() -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(200, {})
    pods_path = g.pods_request(config()).path.split("?")[0]
    states = iter([ready_pod(restarts=1, idle_exit=f"{g.IDLE_EXIT_PREFIX} 9s (session old)")] * 3)

    def pods(request: kubeapi.Request) -> kubeapi.Response:
        current = next(states, None)
        if current is None:  # the agent left idle since: one more restart, its message
            current = ready_pod(restarts=2, idle_exit=f"{g.IDLE_EXIT_PREFIX} 5s (session {SESSION})")
        return kubeapi.Response(200, {"items": [current]})

    cluster.routes["GET", pods_path] = pods
    assert make_guard(cluster).run() == 0
    patches = [r for r in cluster.log if r.method == "PATCH"]
    assert len(patches) == 1
    assert cluster.now < 1005.0, "restored on the proof, before the TTL"


def test_unknown_liveness_keeps_it_alive_and_proof_of_idleness_expires_it() -> None:
    dog = g.Watchdog(ttl=10, last_alive=0.0)
    dog.observe(50.0, [], unknown=True)
    assert dog.last_alive == 50.0 and not dog.expired(55.0)
    dog.gone(56.0)
    assert dog.expired(56.0)


def test_loop_retries_api_errors_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    path = f"/api/v1/namespaces/shop/configmaps/pytest-bridge-restore-{SESSION}"
    script: list[kubeapi.Response | OSError] = [
        OSError("connection refused"),
        kubeapi.Response(403, {"message": "forbidden"}),
        kubeapi.Response(500),
    ]
    answers = iter([*script * 3, kubeapi.Response(200, record_map(record()))])  # then gone: the plugin restored
    sleeps: list[float] = []

    def flaky(request: kubeapi.Request) -> kubeapi.Response:
        item = next(answers, kubeapi.Response(404))
        if isinstance(item, OSError):
            raise item
        return item

    cluster.routes["GET", path] = flaky
    guard = make_guard(cluster)
    guard.sleep = sleeps.append
    assert guard.run() == 0
    assert sleeps == [1, 2, 4, 8, 16, 30, 30, 30, 30, 1]  # backing off, then one poll with the record
    assert "forbidden" in caplog.text


def test_conflict_on_an_already_restored_workload_is_fine() -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(422, {"message": "test failed"})
    cluster.routes["GET", DEPLOY] = answer(200, {"spec": {"template": {"metadata": {"annotations": {}}}}})
    assert make_guard(cluster).run() == 0
    assert cluster.methods()[-3:] == [f"PATCH {DEPLOY}", f"GET {DEPLOY}", f"DELETE {JOB}?propagationPolicy=Background"]


def test_conflict_while_still_bridged_without_a_forward_patch_is_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(422, {"message": "test failed: image"})
    bridged = {"spec": {"template": {"metadata": {"annotations": {SESSION_LABEL: SESSION}}}}}
    cluster.routes["GET", DEPLOY] = answer(200, bridged)
    guard = make_guard(cluster)
    reads = iter([kubeapi.Response(200, record_map(record()))] * 12)
    cluster.routes["GET", g.record_request(guard.config).path] = lambda request: next(reads, kubeapi.Response(404))
    assert guard.run() == 0  # exits when someone deletes the record (pytest-bridge cleanup)
    assert "RESTORE ABANDONED, no more retries" in caplog.text
    assert [r.method for r in cluster.log].count("PATCH") == 1, "never retried"
    assert f"DELETE {JOB}?propagationPolicy=Background" not in cluster.methods(), "the record stays for a person"


ORIGINAL = {
    "kind": "Deployment",
    "metadata": {"name": "orders", "labels": {"app": "orders"}},
    "spec": {
        "replicas": 2,
        "template": {
            "metadata": {"labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "orders", "image": "orders:v1", "command": ["serve"]}]},
        },
    },
}
AGENT = {"name": "orders", "image": "python:3", "command": ["agent"], "args": ["--port", "80"]}
FORWARD = [
    {"op": "test", "path": "/metadata/uid", "value": "u1"},
    {"op": "replace", "path": "/spec/template/spec/containers/0", "value": AGENT},
    {"op": "replace", "path": "/spec/replicas", "value": 1},
    {"op": "add", "path": "/metadata/labels/pytest-bridge.io~1session", "value": SESSION},
    {"op": "add", "path": "/spec/template/metadata/annotations", "value": {SESSION_LABEL: SESSION}},
    {"op": "add", "path": "/spec/template/spec/volumes", "value": [{"name": "pytest-bridge-code"}]},
]


def _set_image_during_the_session() -> dict[str, Any]:
    """The bridged Deployment after ``kubectl set image deploy/orders orders=orders:v2`` and a scale to 3."""
    return {
        "kind": "Deployment",
        "metadata": {"name": "orders", "resourceVersion": "77", "labels": {"app": "orders", SESSION_LABEL: SESSION}},
        "spec": {
            "replicas": 3,
            "template": {
                "metadata": {"labels": {"app": "orders"}, "annotations": {SESSION_LABEL: SESSION}},
                "spec": {
                    "containers": [{**AGENT, "image": "orders:v2"}],
                    "volumes": [{"name": "pytest-bridge-code"}],
                },
            },
        },
    }


def test_conflict_while_still_bridged_restores_keeping_their_change(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    patches: list[Any] = []

    def patch(request: kubeapi.Request) -> kubeapi.Response:
        patches.append(json.loads(request.body or b"null"))
        return kubeapi.Response(422, {"message": "test failed"}) if len(patches) == 1 else kubeapi.Response(200, {})

    cluster.routes["PATCH", DEPLOY] = patch
    cluster.routes["GET", DEPLOY] = answer(200, _set_image_during_the_session())
    guard = make_guard(cluster)
    rec = record(original=ORIGINAL, forward=FORWARD)
    cluster.routes["GET", g.record_request(guard.config).path] = answer(200, record_map(rec))
    assert guard.run() == 0
    merged = patches[1]
    assert merged[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "77"}
    spec = next(op["value"] for op in merged if op["path"] == "/spec")
    assert spec["template"]["spec"]["containers"] == [{"name": "orders", "image": "orders:v2", "command": ["serve"]}]
    assert spec["replicas"] == 3 and "volumes" not in spec["template"]["spec"]
    assert spec["template"]["metadata"] == {"labels": {"app": "orders"}}
    assert {"op": "replace", "path": "/metadata/labels", "value": {"app": "orders"}} in merged
    assert "keeping what was changed during the session" in caplog.text
    assert cluster.methods()[-1] == f"DELETE {JOB}?propagationPolicy=Background"


def test_a_merged_restore_the_server_finds_invalid_is_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    answers = iter(
        [
            kubeapi.Response(422, {"message": "test failed"}),
            kubeapi.Response(422, {"code": 422, "message": "invalid", "details": {"causes": [{"field": "x"}]}}),
        ]
    )
    cluster.routes["PATCH", DEPLOY] = lambda request: next(answers)
    cluster.routes["GET", DEPLOY] = answer(200, _set_image_during_the_session())
    guard = make_guard(cluster)
    reads = iter([kubeapi.Response(200, record_map(record(original=ORIGINAL, forward=FORWARD)))] * 8)
    cluster.routes["GET", g.record_request(guard.config).path] = lambda request: next(reads, kubeapi.Response(404))
    assert guard.run() == 0
    assert "RESTORE ABANDONED" in caplog.text and "invalid" in caplog.text
    assert [r.method for r in cluster.log].count("PATCH") == 2


def test_missing_workload_counts_as_restored() -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(404, {"message": "not found"})
    assert make_guard(cluster).run() == 0
    assert cluster.methods()[-1] == f"DELETE {JOB}?propagationPolicy=Background"


def test_bare_pod_already_restored_is_not_deleted() -> None:
    cluster = Cluster()
    cfg = config()
    cluster.routes["GET", g.record_request(cfg).path] = answer(200, record_map(record("Pod")))
    cluster.routes["GET", "/api/v1/namespaces/shop/pods/orders"] = answer(200, {"metadata": {"labels": {}}})
    assert make_guard(cluster).run() == 0
    assert not [r for r in cluster.log if r.method in ("POST", "DELETE") and "/pods" in r.path]


def test_job_delete_failure_still_exits_zero() -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(200, {})
    cluster.routes["DELETE", JOB] = answer(403, {"message": "forbidden"})
    assert make_guard(cluster).run() == 0
    assert [r.method for r in cluster.log].count("DELETE") == 3


@pytest.mark.parametrize(
    ("job", "code"),
    [
        (kubeapi.Response(404), 0),
        (kubeapi.Response(200, {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}), 0),
        (kubeapi.Response(200, {"metadata": {}}), 143),
        (OSError("unreachable"), 143),
    ],
)
def test_exit_code_on_terminate(job: kubeapi.Response | OSError, code: int) -> None:
    def send(request: kubeapi.Request) -> kubeapi.Response:
        assert request == g.job_request(config())
        if isinstance(job, OSError):
            raise job
        return job

    guard = g.Guard(config(), send)
    assert guard.exit_code_on_terminate() == code


def test_signal_is_deferred_during_a_restore() -> None:
    guard = g.Guard(config(), Cluster().send)
    with pytest.raises(g.Terminated):
        guard.on_signal(signal.SIGTERM, None)
    guard.critical = True
    guard.on_signal(signal.SIGTERM, None)  # remembered, not raised
    assert guard.stop_requested


def test_unexpected_errors_do_not_crash_the_guard(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    cluster.routes["PATCH", DEPLOY] = answer(200, {})
    calls = {"n": 0}
    rec = record_map(record())

    def buggy(request: kubeapi.Request) -> kubeapi.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return kubeapi.Response(200, rec)

    cluster.routes["GET", f"/api/v1/namespaces/shop/configmaps/pytest-bridge-restore-{SESSION}"] = buggy
    assert make_guard(cluster).run() == 0
    assert "unexpected error" in caplog.text
    assert [r.method for r in cluster.log].count("PATCH") == 1


def test_signal_during_a_failed_restore_terminates_after_it() -> None:
    cluster = Cluster()
    guard = make_guard(cluster)

    def patch(request: kubeapi.Request) -> kubeapi.Response:
        guard.on_signal(signal.SIGTERM, None)  # arrives mid-restore: deferred
        return kubeapi.Response(500, {"message": "etcd is sad"})

    cluster.routes["PATCH", DEPLOY] = patch
    with pytest.raises(g.Terminated):
        guard.run()
    assert [r.method for r in cluster.log].count("PATCH") == 1


def test_signal_during_a_successful_restore_still_cleans_up() -> None:
    cluster = Cluster()
    guard = make_guard(cluster)

    def patch(request: kubeapi.Request) -> kubeapi.Response:
        guard.on_signal(signal.SIGTERM, None)
        return kubeapi.Response(200, {})

    def delete_job(request: kubeapi.Request) -> kubeapi.Response:
        guard.on_signal(signal.SIGTERM, None)  # a second one: still not raised
        return kubeapi.Response(200, {})

    cluster.routes["PATCH", DEPLOY] = patch
    cluster.routes["DELETE", JOB] = delete_job
    assert guard.run() == 0
    assert cluster.methods()[-1] == f"DELETE {JOB}?propagationPolicy=Background"
