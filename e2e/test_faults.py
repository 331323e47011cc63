"""End to end: nothing lost or left behind under faults (issue "Reliability", items 1-3).

Each test drives an inner ``pytest --bridge-service=orders`` as a user runs it, in a namespace of
its own (``<e2e namespace>-faults``, with the sample app), and injects faults through the plugin's
test hook ``PYTEST_BRIDGE_FAULT=<point>=<action>`` (:mod:`pytest_bridge.core.faults`). Afterwards the
Deployment must equal what it was and nothing of ours may be left
(:func:`e2e.conftest.objects_of_ours`: jobs, suspended or not, configmaps, secrets, service
accounts, roles, role bindings, our pods and agent pods).

- Ctrl-C, SIGTERM or a lost API answer while connecting: one clear message, restored at once.
- SIGKILL at representative phases of connect and close, restore TTL 10 s: restored and clean
  within TTL + 30 s (the loop over every phase is ``python -m bench.chaos``).
- A NetworkPolicy between the guard (and the API server) and the agent: a live session is never
  restored for want of proof, a second session refuses, a killed one is still restored.
- Two sessions on one service at once: one connects, the other is refused, the winner is never
  restored while it lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pytest_bridge_agent import labels
from pytest_bridge_agent.guard import IDLE_EXIT_PREFIX

from e2e.cluster.layout import Layout
from e2e.conftest import (
    NAMESPACE,
    apply_sample_app,
    ensure_namespace,
    objects_of_ours,
    wait_app_settled,
)
from pytest_bridge.core.patch import AGENT_STATUS_PORT, SESSION_ANNOTATION, SESSION_LABEL, strip_server_fields

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
FAULTS = f"{NAMESPACE}-faults"
TTL = 10  # --bridge-restore-ttl of the killed sessions
BOUND = TTL + 30  # the promise: restored, and nothing left, this long after a SIGKILL
ROLE_LABEL = labels.ROLE_LABEL
NETPOL_COMMENT = "pytest-bridge-e2e-netpol"  # marks our iptables rules, so a later run can remove them

INNER_SUITE = f"""
import json, os, sys, time, urllib.request
from pathlib import Path

NAMESPACE = os.environ["E2E_NAMESPACE"]


def orders_pod():
    reply = json.load(urllib.request.urlopen(f"http://frontend.{{NAMESPACE}}/api", timeout=30))
    return reply["downstream"][0]["pod"]


def test_bridged(bridged_service):
    bridged_service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(bridged_service.local_port),
             "LISTEN_PORT_2": str(bridged_service.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    assert orders_pod() == "local-orders"
    connected = os.environ.get("E2E_CONNECTED")
    if connected:
        Path(connected + ".tmp").write_text("connected")
        os.replace(connected + ".tmp", connected)
    release = os.environ.get("E2E_RELEASE")
    if release:
        deadline = time.monotonic() + 300
        while not Path(release).exists():
            assert time.monotonic() < deadline, "never released"
            time.sleep(0.2)
        assert orders_pod() == "local-orders"  # still ours: never restored while alive
"""

# Holds the session at a barrier before the plugin connects (this conftest's hook runs first:
# registered after the plugin, and both try first), so two sessions connect at the same moment.
INNER_CONFTEST = """
import os, time
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    barrier = os.environ.get("E2E_BARRIER")
    if not barrier:
        return
    Path(barrier, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not Path(barrier, "go").exists():
        if time.monotonic() > deadline:
            raise pytest.UsageError("the e2e barrier never opened")
        time.sleep(0.001)
"""


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults_ns(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> str:
    """Our namespace with the sample app (kept between runs); an interrupted earlier run's leftovers gone."""
    ensure_namespace(core_v1, FAULTS, {})
    _wait_clean(kube_api_client, FAULTS, timeout=120)  # re-applying over a bridged Deployment breaks its restore
    apply_sample_app(kube_api_client, FAULTS)
    wait_app_settled(core_v1, FAULTS)
    return FAULTS


def _inner(suite: Path, namespace: str, *args: str, **env: str) -> subprocess.Popen[str]:
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "test_inner.py").write_text(INNER_SUITE)
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(suite / "test_inner.py"),
         "--bridge-service=orders", f"--bridge-namespace={namespace}", *args],
        cwd=suite, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_NAMESPACE": namespace, **env},
    )  # fmt: skip


def _orders(apps: client.AppsV1Api, namespace: str) -> dict[str, Any]:
    obj = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("orders", namespace))
    return strip_server_fields(obj)


def _bridged_by(apps: client.AppsV1Api, namespace: str) -> str | None:
    template = _orders(apps, namespace)["spec"]["template"]
    return ((template.get("metadata") or {}).get("annotations") or {}).get(SESSION_ANNOTATION)


def _wait_clean(api: client.ApiClient, namespace: str, timeout: float) -> float:
    """Seconds until nothing of ours is left in ``namespace``; AssertionError naming what is left."""
    started = time.monotonic()
    while left := objects_of_ours(api, namespace):
        assert time.monotonic() - started < timeout, f"left after {timeout:.0f}s: {left}"
        time.sleep(0.25)
    return time.monotonic() - started


def _settle(api: client.ApiClient, namespace: str) -> None:
    """Nothing of ours left and the sample app's pods settled (an earlier test's restore done)."""
    _wait_clean(api, namespace, timeout=90)
    wait_app_settled(client.CoreV1Api(api), namespace)


def _watch_restore(
    api: client.ApiClient,
    namespace: str,
    before: dict[str, Any],
    since: float,
    on_poll: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Seconds from ``since`` until the Deployment equals ``before`` and until nothing of ours is
    left; AssertionError if either takes longer than TTL + 30 s."""
    apps = client.AppsV1Api(api)
    restored = clean = None
    while True:
        now = time.monotonic() - since
        on_poll()
        if restored is None and _orders(apps, namespace) == before:
            restored = now
        left = objects_of_ours(api, namespace)
        if clean is None and not left:
            clean = now
        if restored is not None and clean is not None:
            return restored, clean
        assert now < BOUND, (
            f"{now:.0f}s after the kill: {'restored' if restored is not None else 'NOT restored'}, left: {left}"
        )
        time.sleep(0.25)


def _wait_for(path: Path, run: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def _clear_message(out: str) -> None:
    assert "INTERNALERROR" not in out and "Traceback" not in out, out


# --- item 1: interrupted while connecting ---------------------------------------------------------

INTERRUPTS = [
    ("workload-patched", "interrupt", "KeyboardInterrupt: PYTEST_BRIDGE_FAULT: interrupt at workload-patched"),
    ("workload-patched", "sigterm", "KeyboardInterrupt: signal 15"),
    ("workload-patched", "lost-response", "could not connect: PYTEST_BRIDGE_FAULT: the call before workload-patched"),
    ("guard-record", "interrupt", "KeyboardInterrupt: PYTEST_BRIDGE_FAULT: interrupt at guard-record"),
    ("guard-job", "lost-response", "could not connect: PYTEST_BRIDGE_FAULT: the call before guard-job"),
]


@pytest.mark.parametrize("fault", INTERRUPTS, ids=[f"{action}@{point}" for point, action, _ in INTERRUPTS])
def test_an_interrupted_connect_restores_at_once_and_leaves_nothing(
    fault: tuple[str, str, str], faults_ns: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    point, action, message = fault
    apps = client.AppsV1Api(kube_api_client)
    _settle(kube_api_client, faults_ns)
    before = _orders(apps, faults_ns)
    run = _inner(tmp_path, faults_ns, PYTEST_BRIDGE_FAULT=f"{point}={action}")
    out, _ = run.communicate(timeout=120)
    assert run.returncode > 0, out  # it exits (not killed, not passed)
    assert _orders(apps, faults_ns) == before, f"the session did not restore the Deployment itself\n{out}"
    took = _wait_clean(kube_api_client, faults_ns, timeout=30)  # the guard's pod goes with its Job
    print(json.dumps({"fault": f"{point}={action}", "clean_s": round(took, 1)}))
    _clear_message(out)
    assert message in out, out
    assert "a bug of pytest-bridge" not in out, out  # a lost answer is the network's doing, not ours


# --- item 2: SIGKILL at representative phases -------------------------------------------------------


@pytest.mark.parametrize("point", ["guard-job", "workload-patched", "connected", "close-restored"])
def test_sigkill_at_a_phase_is_restored_and_cleaned_within_ttl_plus_30s(
    point: str, faults_ns: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    apps = client.AppsV1Api(kube_api_client)
    _settle(kube_api_client, faults_ns)
    before = _orders(apps, faults_ns)
    run = _inner(tmp_path, faults_ns, f"--bridge-restore-ttl={TTL}", PYTEST_BRIDGE_FAULT=f"{point}=sigkill")
    out, _ = run.communicate(timeout=120)
    killed = time.monotonic()
    assert run.returncode == -signal.SIGKILL, out
    restored, clean = _watch_restore(kube_api_client, faults_ns, before, killed)
    print(json.dumps({"sigkill": point, "ttl_s": TTL, "restored_s": round(restored, 1), "clean_s": round(clean, 1)}))


# --- item 3: a NetworkPolicy between the guard and the agent ---------------------------------------


def _network_policies(namespace: str) -> list[dict[str, Any]]:
    """Default-deny ingress for every pod, and the sample app's own traffic allowed (its Services'
    target ports, from any pod of the namespace), as a namespace with default-deny has it. The
    agent's status port is not among them."""
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "e2e-default-deny", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "e2e-allow-the-app", "namespace": namespace},
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "bridge-demo"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [{"podSelector": {}}], "ports": [{"port": 8080}, {"port": 9091}]},
                ],
            },
        },
    ]


def _iptables(*argv: str, check: bool = True) -> str:
    result = subprocess.run(["iptables", *argv], capture_output=True, text=True, check=False)
    assert not check or result.returncode == 0, f"iptables {' '.join(argv)}: {result.stderr}"
    return result.stdout


def _remove_emulation() -> None:
    """Every rule of ours (by its comment), an interrupted earlier run's too."""
    for chain in ("FORWARD", "OUTPUT"):
        for line in _iptables("-S", chain).splitlines():
            if NETPOL_COMMENT in line and line.startswith("-A "):
                _iptables("-D", *shlex.split(line)[1:], check=False)  # -S quotes the matched string


@contextlib.contextmanager
def _status_port_blocked(agent_ip: str) -> Iterator[None]:
    """Enforce, on this node, what the NetworkPolicy would for the agent's status port.

    The embedded cluster's CNI (the plain bridge plugin) does not enforce NetworkPolicy, so two
    iptables rules emulate it, for the agent pod's address and port 47101 only:

    - FORWARD: any pod (the guard among them; pod-to-pod traffic crosses the node's bridge, and
      bridge-nf-call-iptables is on) -> agent:47101 is dropped, as the default-deny would;
    - OUTPUT: the node's own requests for ``GET /status`` on agent:47101 are dropped. On this
      node the API server (whose pod proxy `pytest-bridge status` and a second session use) and
      the kubelet (whose readiness probe asks ``GET /healthz`` on the same port) both connect
      from the node's bridge address, so the rule tells them apart by the request: the
      kubelet's probe passes, as probes do under every NetworkPolicy implementation, and the
      proxy's request is never answered (its connection opens; under a real policy it would not:
      both end in a timeout for the caller).

    The port-forward to the agent's control port runs inside the pod's network namespace and the
    app's ports are untouched, so the session itself keeps working.
    """
    _remove_emulation()
    rules = [
        f"FORWARD -d {agent_ip}/32 -p tcp --dport {AGENT_STATUS_PORT}",
        f"OUTPUT -d {agent_ip}/32 -p tcp --dport {AGENT_STATUS_PORT} -m string --algo bm --string 'GET /status'",
    ]
    try:
        for rule in rules:
            chain, *match = shlex.split(rule)
            _iptables("-I", chain, "1", *match, "-m", "comment", "--comment", NETPOL_COMMENT, "-j", "DROP")
        yield
    finally:
        _remove_emulation()


def _agent_pod(core: client.CoreV1Api, namespace: str, session: str) -> Any:
    pods: Any = core.list_namespaced_pod(namespace, label_selector=f"{SESSION_LABEL}={session},!{ROLE_LABEL}").items
    running = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
    assert len(running) == 1, [p.metadata.name for p in pods]
    return running[0]


def _guard_log(core: client.CoreV1Api, namespace: str, session: str) -> str:
    pods: Any = core.list_namespaced_pod(
        namespace, label_selector=f"{SESSION_LABEL}={session},{ROLE_LABEL}=guard"
    ).items
    logs = []
    for pod in pods:
        with contextlib.suppress(ApiException):
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace, container="guard")
            # A container being removed answers with this line instead of its log: no log to read.
            if not text.startswith("unable to retrieve container logs"):
                logs.append(text)
    return "\n".join(logs)


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


@pytest.fixture
def on_this_node(core_v1: client.CoreV1Api) -> None:
    nodes = [node.metadata.name for node in core_v1.list_node().items if node.metadata]
    if nodes != [Layout.default().node_name] or os.geteuid() != 0:
        pytest.skip(f"emulates NetworkPolicy with iptables on the embedded cluster's node, as root (nodes: {nodes})")


def test_a_network_policy_never_gets_a_live_session_restored(
    on_this_node: None, faults_ns: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    core, apps = client.CoreV1Api(kube_api_client), client.AppsV1Api(kube_api_client)
    networking = client.NetworkingV1Api(kube_api_client)
    _settle(kube_api_client, faults_ns)
    before = _orders(apps, faults_ns)
    policies = _network_policies(faults_ns)
    for policy in policies:
        with contextlib.suppress(ApiException):
            networking.delete_namespaced_network_policy(policy["metadata"]["name"], faults_ns)
        body: Any = policy
        networking.create_namespaced_network_policy(faults_ns, body)
    connected = tmp_path / "connected"
    run = _inner(
        tmp_path / "first", faults_ns, f"--bridge-restore-ttl={TTL}",
        E2E_CONNECTED=str(connected), E2E_RELEASE=str(tmp_path / "never"),
    )  # fmt: skip
    try:
        _wait_for(connected, run)
        session = _bridged_by(apps, faults_ns)
        assert session, "bridged, but by no session"
        agent = _agent_pod(core, faults_ns, session)
        restarts = sum(c.restart_count for c in agent.status.container_statuses)
        with _status_port_blocked(agent.status.pod_ip):
            # The emulation does what it says: the API server's proxy gets no answer.
            with pytest.raises(Exception):  # noqa: B017 - a timeout, in whatever form the client raises it
                core.connect_get_namespaced_pod_proxy_with_path(
                    f"{agent.metadata.name}:{AGENT_STATUS_PORT}", faults_ns, "status", _request_timeout=3
                )
            # Well past 2 x TTL: still bridged by the live session, its agent Ready and never restarted.
            blocked_at = time.monotonic()
            while time.monotonic() - blocked_at < 2 * TTL + 5:
                assert _bridged_by(apps, faults_ns) == session, "a live session was restored"
                pod: Any = core.read_namespaced_pod(agent.metadata.name, faults_ns)
                assert _ready(pod), "the kubelet's probe must still pass"
                assert sum(c.restart_count for c in pod.status.container_statuses) == restarts
                assert run.poll() is None
                time.sleep(1)
            guard_log = _guard_log(core, faults_ns, session)
            assert "liveness unknown" in guard_log, guard_log
            assert "restoring" not in guard_log, guard_log

            status = subprocess.run(
                [sys.executable, "-m", "pytest_bridge.cli", "-n", faults_ns, "status"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert status.returncode == 0, status.stdout + status.stderr
            assert f"by session {session} (unknown;" in status.stdout, status.stdout

            second = _inner(tmp_path / "second", faults_ns, f"--bridge-restore-ttl={TTL}")
            out, _ = second.communicate(timeout=120)
            assert second.returncode == 4, out
            assert f"bridged by session {session!r}" in out and "cannot be told" in out, out
            _clear_message(out)
            assert _bridged_by(apps, faults_ns) == session, "the second session touched the first's bridge"

            run.send_signal(signal.SIGKILL)
            run.communicate(timeout=30)
            killed = time.monotonic()
            seen: dict[str, str] = {}

            def observe() -> None:  # the agent's farewell and the guard's log, before both are gone
                pods: Any = core.list_namespaced_pod(faults_ns, label_selector=f"{SESSION_LABEL}={session}")
                for pod in pods.items:
                    for status in pod.status.container_statuses or []:
                        for state in (status.state, status.last_state):
                            message = (state.terminated.message or "") if state and state.terminated else ""
                            if message.startswith(IDLE_EXIT_PREFIX):
                                seen["agent"] = message
                with contextlib.suppress(ApiException):
                    seen["guard"] = _guard_log(core, faults_ns, session) or seen.get("guard", "")

            restored, clean = _watch_restore(kube_api_client, faults_ns, before, killed, on_poll=observe)
        print(json.dumps({"netpol_restored_s": round(restored, 1), "netpol_clean_s": round(clean, 1)}))
        assert "agent" in seen, "the agent left no idle-exit message in its pod's status"
        assert "the agent left for want of a client" in seen.get("guard", ""), seen.get("guard")
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate(timeout=30)
        for policy in policies:
            with contextlib.suppress(ApiException):
                networking.delete_namespaced_network_policy(policy["metadata"]["name"], faults_ns)


# --- two sessions, one service ---------------------------------------------------------------------


def _session(tmp_path: Path, namespace: str, n: int, release: Path, barrier: Path | None) -> subprocess.Popen[str]:
    """Session ``n``: it holds at ``barrier`` (if given) before connecting, and at ``release`` once connected."""
    return _inner(
        tmp_path / f"s{n}", namespace, f"--bridge-restore-ttl={TTL}", f"--bridge-connect-timeout={TTL}",
        E2E_CONNECTED=str(tmp_path / f"connected-{n}"),
        E2E_RELEASE=str(release), **({"E2E_BARRIER": str(barrier)} if barrier else {}),
    )  # fmt: skip


def _wait_at_barrier(barrier: Path, runs: list[subprocess.Popen[str]], count: int) -> None:
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < count:
        assert all(run.poll() is None for run in runs), [run.communicate()[0] for run in runs]
        assert time.monotonic() < deadline, "the sessions never reached the barrier"
        time.sleep(0.01)


def _one_wins(
    api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    runs: list[subprocess.Popen[str]],
    release: Path,
    *,
    first: int | None = None,
) -> None:
    """Exactly one of ``runs`` connects (``first``, if given) and the other is refused clearly; the
    winner's traffic reaches it and it is never restored while it lives; it ends normally and
    nothing is left."""
    apps = client.AppsV1Api(api)
    before_exit = time.monotonic() + 120
    while True:
        exited = [n for n, run in enumerate(runs) if run.poll() is not None]
        connected = [n for n in range(len(runs)) if (tmp_path / f"connected-{n}").exists()]
        if exited and connected:
            break
        assert len(exited) < 2, [run.communicate()[0] for run in runs]
        assert time.monotonic() < before_exit, "no winner and loser"
        time.sleep(0.1)
    (loser,) = exited
    (winner,) = connected
    assert loser != winner
    session = _bridged_by(apps, namespace)
    out, _ = runs[loser].communicate(timeout=30)
    assert runs[loser].returncode == 4, out
    _clear_message(out)
    refused = (
        f"bridged by session {session!r} at the same moment" in out
        or f"already bridged by a live session {session!r}" in out
        or f"is being bridged by session {session!r} (" in out
    )
    # The winner is never restored while it lives: held past the TTL (and the guard's poll) after the loser left.
    held = time.monotonic()
    while time.monotonic() - held < TTL + 5:
        assert _bridged_by(apps, namespace) == session, "the winner was restored while alive"
        assert runs[winner].poll() is None, runs[winner].communicate()[0]
        time.sleep(1)
    release.touch()  # the winner's traffic must still reach it, then it ends normally
    winner_out, _ = runs[winner].communicate(timeout=120)
    assert runs[winner].returncode == 0 and "1 passed" in winner_out, winner_out
    _wait_clean(api, namespace, timeout=30)
    print(*(line for line in winner_out.splitlines() if line.startswith("pytest-bridge:")), sep="\n")
    # A session still connecting (agent starting, no client yet) is never taken for dead.
    assert "left bridged by dead session" not in winner_out, winner_out
    assert first is None or winner == first, (out, winner_out)
    assert refused, out


def test_two_sessions_at_once_one_connects_the_other_is_refused(
    faults_ns: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    """Released together from a barrier: both find the workload free and race to the PATCH."""
    apps = client.AppsV1Api(kube_api_client)
    _settle(kube_api_client, faults_ns)
    before = _orders(apps, faults_ns)
    barrier, release = tmp_path / "barrier", tmp_path / "release"
    barrier.mkdir()
    runs = [_session(tmp_path, faults_ns, n, release, barrier) for n in (0, 1)]
    try:
        _wait_at_barrier(barrier, runs, 2)
        (barrier / "go").touch()
        _one_wins(kube_api_client, faults_ns, tmp_path, runs, release)
        assert _orders(apps, faults_ns) == before
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate(timeout=30)


def test_a_session_arriving_while_another_connects_is_refused(
    faults_ns: str, tmp_path: Path, kube_api_client: client.ApiClient
) -> None:
    """The second is released the moment the first's PATCH landed, while its agent starts: the
    workload is bridged, by a session with no client yet."""
    apps = client.AppsV1Api(kube_api_client)
    _settle(kube_api_client, faults_ns)
    before = _orders(apps, faults_ns)
    barrier, release = tmp_path / "barrier", tmp_path / "release"
    barrier.mkdir()
    runs = [_session(tmp_path, faults_ns, 1, release, barrier)]  # imported and waiting
    try:
        _wait_at_barrier(barrier, runs, 1)
        runs.insert(0, _session(tmp_path, faults_ns, 0, release, None))
        deadline = time.monotonic() + 60
        while _bridged_by(apps, faults_ns) is None:
            assert runs[0].poll() is None, runs[0].communicate()[0]
            assert time.monotonic() < deadline, "the first session never patched the workload"
            time.sleep(0.02)
        (barrier / "go").touch()
        _one_wins(kube_api_client, faults_ns, tmp_path, runs, release, first=0)
        assert _orders(apps, faults_ns) == before
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate(timeout=30)
