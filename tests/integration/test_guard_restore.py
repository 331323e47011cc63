"""The restore guard as a real process against a fake API server and a real agent, all on loopback.

(Not named test_guard.py: without __init__.py files that basename would clash with
tests/unit/test_guard.py.)
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_bridge.cluster.restore import RestoreRecord, guard_name, record_configmap_name
from pytest_bridge.core.errors import PatchConflictError
from pytest_bridge.core.jsonpatch import apply_patch
from pytest_bridge.core.patch import SESSION_LABEL
from pytest_bridge.local.ports import free_port
from pytest_bridge.transport.tunnel import tcp_connector
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

LOOPBACK = "127.0.0.1"
TOKEN = "agent-token-0123456789"
API_TOKEN = "sa-token-abc"
NS = "shop"
SESSION = "s-1a2b3c"
JOB = guard_name(SESSION)
RECORD = record_configmap_name(SESSION)
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/orders"
POD_PATH = f"/api/v1/namespaces/{NS}/pods/orders-pod"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"


# ------------------------------------------------------------------ fake API server


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeApi:
    """Just enough of the Kubernetes API for the guard; records every request."""

    record_map: dict[str, Any] | None = None
    deployment: dict[str, Any] | None = None
    pod: dict[str, Any] | None = None  # the bare pod at POD_PATH
    agent_pods: list[dict[str, Any]] = field(default_factory=list)
    job_exists: bool = True
    pod_lingers: int = 0  # GETs that still find a deleted pod
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def seen(self, method: str, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def handle(self, seen: Seen) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(seen)
            if seen.headers.get("authorization") != f"Bearer {API_TOKEN}":
                return 401, {"kind": "Status", "message": "Unauthorized"}
            key = (seen.method, seen.path)
            if key == ("GET", f"/api/v1/namespaces/{NS}/configmaps/{RECORD}"):
                return (200, self.record_map) if self.record_map else (404, {"kind": "Status", "message": "not found"})
            if key == ("GET", f"/api/v1/namespaces/{NS}/pods"):
                assert seen.query["labelSelector"] == [f"{SESSION_LABEL}={SESSION}"]
                return 200, {"kind": "PodList", "items": self.agent_pods}
            if key == ("PATCH", DEPLOY_PATH) and self.deployment is not None:
                if seen.headers.get("content-type") != "application/json-patch+json":
                    return 415, {"message": "unsupported media type"}
                try:
                    self.deployment = apply_patch(self.deployment, seen.body)
                except PatchConflictError as e:
                    return 422, {"kind": "Status", "message": str(e)}
                return 200, self.deployment
            if key == ("GET", DEPLOY_PATH) and self.deployment is not None:
                return 200, self.deployment
            if key == ("GET", POD_PATH):
                if self.pod is None and self.pod_lingers > 0:
                    self.pod_lingers -= 1
                    return 200, {"metadata": {"name": "orders-pod", "deletionTimestamp": "now"}}
                return (200, self.pod) if self.pod else (404, {"message": "not found"})
            if key == ("DELETE", POD_PATH) and self.pod is not None:
                self.pod = None
                return 200, {}
            if key == ("POST", f"/api/v1/namespaces/{NS}/pods"):
                self.pod = seen.body
                return 201, seen.body
            if key == ("GET", JOB_PATH):
                return (200, {"metadata": {"name": JOB}}) if self.job_exists else (404, {"message": "not found"})
            if key == ("DELETE", JOB_PATH):
                self.job_exists = False
                return 200, {}
            return 404, {"kind": "Status", "message": f"fake API: no route {key}"}


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = Seen(
                self.command, url.path, urllib.parse.parse_qs(url.query), headers, json.loads(raw) if raw else None
            )
            status, body = fake.handle(seen)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_DELETE = do_POST = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


def record_configmap(record: RestoreRecord) -> dict[str, Any]:
    return {"kind": "ConfigMap", "binaryData": {"record.json": base64.b64encode(record.to_json().encode()).decode()}}


def agent_pod(name: str = "orders-7d9f-abcde", ip: str = LOOPBACK) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {SESSION_LABEL: SESSION, "app": "orders"}},
        "status": {"phase": "Running", "podIP": ip},
    }


def guard_pod() -> dict[str, Any]:
    labels = {SESSION_LABEL: SESSION, "pytest-bridge.io/role": "guard", "job-name": JOB}
    return {"metadata": {"name": f"{JOB}-xyz", "labels": labels}, "status": {"phase": "Running", "podIP": "127.0.0.2"}}


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    logs: list[str] = field(default_factory=list)

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.logs):
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}; logs:\n" + "".join(self.logs))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("process still running; logs:\n" + "".join(self.logs)) from None


def _drain(proc: Proc) -> None:
    assert proc.proc.stderr is not None
    for line in proc.proc.stderr:
        proc.logs.append(line.decode())


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str], dict[str, str]], Proc]]:
    procs: list[Proc] = []

    def start(argv: list[str], env: dict[str, str]) -> Proc:
        popen = subprocess.Popen(
            [sys.executable, *argv],
            env={"PATH": os.environ.get("PATH", ""), **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        proc = Proc(popen)
        threading.Thread(target=_drain, args=(proc,), daemon=True).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.kill()
        proc.proc.wait(5)
        if proc.proc.stderr:
            proc.proc.stderr.close()


@pytest.fixture
def run_guard(
    api: FakeApi, tmp_path: Path, spawn: Callable[[list[str], dict[str, str]], Proc]
) -> Callable[[int], Proc]:
    token_file = tmp_path / "token"
    token_file.write_text(API_TOKEN + "\n")

    def start(status_port: int) -> Proc:
        env = {
            "GUARD_SESSION": SESSION,
            "GUARD_NAMESPACE": NS,
            "GUARD_TTL_SECONDS": "1",
            "GUARD_RECORD_CONFIGMAP": RECORD,
            "GUARD_JOB": JOB,
            "GUARD_SESSION_LABEL": SESSION_LABEL,
            "GUARD_STATUS_PORT": str(status_port),
            "GUARD_API_URL": f"http://{LOOPBACK}:{api.port}",
            "GUARD_TOKEN_FILE": str(token_file),
            "GUARD_CA_FILE": "",
            "GUARD_POLL_SECONDS": "0.2",
            "HOSTNAME": f"{JOB}-xyz",
        }
        guard = spawn(["-m", "pytest_bridge_agent.guard"], env)
        guard.wait_for_log("started: session")
        return guard

    return start


def start_agent(spawn: Callable[[list[str], dict[str, str]], Proc]) -> tuple[Proc, int, int]:
    env = {
        "PYTEST_BRIDGE_TOKEN": TOKEN,
        "PYTEST_BRIDGE_CONTROL_PORT": "0",
        "PYTEST_BRIDGE_STATUS_PORT": "0",
        "PYTEST_BRIDGE_BIND_HOST": LOOPBACK,
    }
    agent = spawn(["-m", "pytest_bridge_agent"], env)
    line = agent.wait_for_log(r"ready control=")
    match = re.search(r"ready control=[\d.]+:(\d+) status=[\d.]+:(\d+)", line)
    assert match, line
    return agent, int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------ records


REVERSE = [
    {"op": "test", "path": "/spec/template/metadata/annotations/pytest-bridge.io~1session", "value": SESSION},
    {"op": "remove", "path": "/spec/template/metadata/annotations/pytest-bridge.io~1session"},
    {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "shop/orders:1.4"},
]
BRIDGED_DEPLOYMENT: dict[str, Any] = {
    "kind": "Deployment",
    "metadata": {"name": "orders", "namespace": NS},
    "spec": {
        "template": {
            "metadata": {"annotations": {SESSION_LABEL: SESSION}},
            "spec": {"containers": [{"name": "orders", "image": "pytest-bridge/agent:dev"}]},
        }
    },
}


def deployment_record() -> RestoreRecord:
    return RestoreRecord(
        session=SESSION, namespace=NS, kind="Deployment", name="orders", reverse_patch=REVERSE,
        original={}, owner="dev@laptop pid 42", created=time.time(),
    )  # fmt: skip


# ------------------------------------------------------------------ tests


def test_no_restore_while_connected_then_restore_after_ttl(
    api: FakeApi, spawn: Callable[[list[str], dict[str, str]], Proc], run_guard: Callable[[int], Proc]
) -> None:
    agent, control_port, status_port = start_agent(spawn)
    api.record_map = record_configmap(deployment_record())
    api.deployment = copy.deepcopy(BRIDGED_DEPLOYMENT)
    api.agent_pods = [agent_pod(), guard_pod()]
    tunnel = BackgroundTunnel(tcp_connector(LOOPBACK, control_port), TOKEN, {})
    tunnel.start(timeout=10)
    try:
        guard = run_guard(status_port)
        guard.wait_for_log("session alive")
        time.sleep(2.0)  # twice the TTL, with a client connected
        assert not api.seen("PATCH", DEPLOY_PATH)
        assert not api.seen("DELETE", JOB_PATH)
        assert guard.proc.poll() is None
    finally:
        tunnel.stop()
    disconnected = time.monotonic()
    assert guard.wait(8) == 0
    assert time.monotonic() - disconnected < 5
    (patch,) = api.seen("PATCH", DEPLOY_PATH)
    assert patch.headers["content-type"] == "application/json-patch+json"
    assert patch.body == REVERSE
    assert api.deployment is not None
    template = api.deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {}
    assert template["spec"]["containers"][0]["image"] == "shop/orders:1.4"
    (delete,) = api.seen("DELETE", JOB_PATH)
    assert delete.query == {"propagationPolicy": ["Background"]}
    # Only the agent was asked for /status, never the guard's own pod (127.0.0.2 would time out).
    assert not any("unreachable" in line for line in guard.logs), guard.logs
    assert any("session idle" in line for line in guard.logs)
    guard.wait_for_log("exiting: session")
    assert agent.proc.poll() is None


def test_record_gone_exits_without_restoring(api: FakeApi, run_guard: Callable[[int], Proc]) -> None:
    api.deployment = copy.deepcopy(BRIDGED_DEPLOYMENT)
    guard = run_guard(free_port())  # started before the plugin wrote the record: it waits
    time.sleep(1.5)
    assert guard.proc.poll() is None, "a record not written yet is not a record gone"
    api.record_map = record_configmap(deployment_record())
    guard.wait_for_log("restore record .* read: guarding")
    api.record_map = None  # the plugin restored and deletes the session's objects
    assert guard.wait(5) == 0
    guard.wait_for_log("restore record .* is gone")
    assert {r.method for r in api.requests} == {"GET"}
    assert api.deployment == BRIDGED_DEPLOYMENT


def test_already_restored_deployment_is_left_alone(api: FakeApi, run_guard: Callable[[int], Proc]) -> None:
    api.record_map = record_configmap(deployment_record())
    restored = apply_patch(BRIDGED_DEPLOYMENT, REVERSE)
    api.deployment = copy.deepcopy(restored)
    guard = run_guard(free_port())  # no agent pods at all: the TTL runs out
    assert guard.wait(6) == 0
    assert len(api.seen("PATCH", DEPLOY_PATH)) == 1  # refused: 422
    assert api.seen("GET", DEPLOY_PATH)
    assert api.deployment == restored
    guard.wait_for_log("already restored")
    assert api.seen("DELETE", JOB_PATH)


def test_bare_pod_is_deleted_then_recreated(api: FakeApi, run_guard: Callable[[int], Proc]) -> None:
    original = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orders-pod", "namespace": NS}, "spec": {}}
    record = RestoreRecord(
        session=SESSION, namespace=NS, kind="Pod", name="orders-pod", reverse_patch=[],
        original=original, owner="dev", created=time.time(),
    )  # fmt: skip
    api.record_map = record_configmap(record)
    bridged = {"metadata": {"name": "orders-pod", "uid": "uid-agent", "labels": {SESSION_LABEL: SESSION}}}
    api.pod = bridged
    api.pod_lingers = 2
    unreachable = free_port()  # the agent pod's status port answers nothing: idle
    api.agent_pods = [agent_pod("orders-pod")]
    guard = run_guard(unreachable)
    assert guard.wait(8) == 0
    guard.wait_for_log("unreachable")
    methods = [(r.method, r.path) for r in api.requests if r.path.startswith(f"/api/v1/namespaces/{NS}/pods/")]
    delete_at = methods.index(("DELETE", POD_PATH))
    assert methods[delete_at + 1 :] == [("GET", POD_PATH)] * 3  # lingering twice, then 404
    (delete,) = api.seen("DELETE", POD_PATH)
    assert delete.body["gracePeriodSeconds"] == 0
    assert delete.body["preconditions"] == {"uid": "uid-agent"}
    (create,) = api.seen("POST", f"/api/v1/namespaces/{NS}/pods")
    assert create.body == original
    assert api.pod == original
    (job_delete,) = api.seen("DELETE", JOB_PATH)
    assert job_delete.query == {"propagationPolicy": ["Background"]}
    order = [r.method + " " + r.path for r in api.requests]
    assert order.index(f"POST /api/v1/namespaces/{NS}/pods") < order.index(f"DELETE {JOB_PATH}")


@pytest.mark.parametrize(("job_exists", "code"), [(False, 0), (True, 143)])
def test_sigterm_exits_promptly(api: FakeApi, run_guard: Callable[[int], Proc], job_exists: bool, code: int) -> None:
    """0 when the plugin deleted the Job; 143 (a failure: the Job starts a new guard) on an eviction."""
    api.record_map = record_configmap(deployment_record())
    api.deployment = copy.deepcopy(BRIDGED_DEPLOYMENT)
    api.job_exists = job_exists
    guard = run_guard(free_port())
    guard.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert guard.wait(3) == code
    assert time.monotonic() - started < 2
    assert not api.seen("PATCH", DEPLOY_PATH)
