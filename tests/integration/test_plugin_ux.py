"""What a user sees around the bridge, without a cluster: failure sections, JUnit properties, progress.

Like ``test_plugin_pytester.py``, each suite runs through the real entry point in a subprocess,
with ``BridgeSession.connect`` replaced by a fake; here the fake client also answers the reads a
failure report makes (the agent pod and its logs), and the fake connect records phase timings.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_plugin_pytester import FAKE_CONFTEST, QUIET

from pytest_bridge import plugin
from pytest_bridge.core.errors import ConnectError
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings

pytest_plugins = ["pytester"]

UX_CONFTEST = (
    FAKE_CONFTEST.replace("BridgeSession.connect = fake_connect\n", "")
    + """

class FakePod:
    class metadata:
        name = "orders-agent"

    class spec:
        class _container:
            name = "app"

        containers = [_container]

    class status:
        phase = "Running"

        class _status:
            name = "app"
            restart_count = 0

            class state:
                waiting = None
                terminated = None

        container_statuses = [_status]


class FakeCore:
    def read_namespaced_pod(self, name, namespace, **kwargs):
        assert name.endswith("-agent"), name
        return FakePod

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None, **kwargs):
        return "agent: listening on 8080\\nagent: connection from 10.244.0.7 reset\\n"


FakeKube.core = FakeCore()


def connect_with_phases(self):
    services = fake_connect(self)
    self.phases.update({"plan": 0.25, "orders: agent pod": 2.5, "orders: tunnel and canaries": 0.5})
    return services


BridgeSession.connect = connect_with_phases
"""
)

SUITE = """
def test_passes(bridged_service):
    pass


def test_fails(bridged_service):
    assert bridged_service.local_port == 1, "the local service did not answer"


def test_fails_without_the_bridge():
    assert False
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("PYTEST_BRIDGE_") or name.startswith("FAKE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def ux_cluster(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(UX_CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_a_failed_test_that_used_the_bridge_gets_its_logs_and_timings(ux_cluster: pytest.Pytester) -> None:
    result = ux_cluster.runpytest_subprocess("--bridge-service=orders", *QUIET)
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails _*",
            "*- pytest-bridge -*",
            "session *: connect phases: plan 0.2s, orders: agent pod 2.5s, orders: tunnel and canaries 0.5s",
            "agent of orders: orders-agent (Running; app running, 0 restarts), last 40 log lines:",
            "  agent: listening on 8080",
            "  agent: connection from 10.244.0.7 reset",
            "*_ test_fails_without_the_bridge _*",
        ]
    )
    # one section, in the failure that used the bridge only
    assert out.count("connect phases:") == 1
    assert out.index("connect phases:") < out.index("_ test_fails_without_the_bridge _")


def test_the_section_survives_xdist(ux_cluster: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    result = ux_cluster.runpytest_subprocess(
        "--bridge-service=orders", "-n", "2", "-p", "no:asyncio", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=2)
    # a worker's report carries the controller's phases (handoff); the logs it reads with its own
    # client (here it has no kubeconfig: a line says so, the report is still made)
    result.stdout.fnmatch_lines(
        ["*connect phases: plan 0.2s, orders: agent pod 2.5s*", "(no cluster access for logs: *"]
    )


def test_phase_timings_are_junit_properties(ux_cluster: pytest.Pytester) -> None:
    junit = ux_cluster.path / "junit.xml"
    result = ux_cluster.runpytest_subprocess("--bridge-service=orders", f"--junitxml={junit}", *QUIET)
    result.assert_outcomes(passed=1, failed=2)
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    properties = {name: {p.get("name"): p.get("value") for p in case.iter("property")} for name, case in cases.items()}
    assert properties["test_passes"] == {
        "pytest-bridge connect: plan": "0.25",
        "pytest-bridge connect: orders: agent pod": "2.50",
        "pytest-bridge connect: orders: tunnel and canaries": "0.50",
    }
    assert properties["test_fails"] == properties["test_passes"]
    assert properties["test_fails_without_the_bridge"] == {}


def test_a_per_test_bridge_is_in_its_tests_report_and_properties(ux_cluster: pytest.Pytester) -> None:
    ux_cluster.makepyfile(
        test_factory="""
def test_factory_fails(bridge_factory):
    bridge_factory("inventory")
    raise AssertionError("the per-test bridge did not help")
"""
    )
    junit = ux_cluster.path / "junit.xml"
    result = ux_cluster.runpytest_subprocess("test_factory.py", f"--junitxml={junit}", *QUIET)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- pytest-bridge -*",
            "session *: connect phases: plan 0.2s, orders: agent pod 2.5s*",
            "agent of inventory: *",
        ]
    )
    (case,) = ET.parse(junit).getroot().iter("testcase")
    assert {p.get("name") for p in case.iter("property")} >= {"pytest-bridge connect: plan"}


def test_logs_that_cannot_be_read_are_a_line_not_an_error(ux_cluster: pytest.Pytester) -> None:
    ux_cluster.makeconftest(
        UX_CONFTEST
        + """
def broken(self, *args, **kwargs):
    raise ConnectError("the API server does not answer")


FakeCore.read_namespaced_pod = broken
"""
    )
    result = ux_cluster.runpytest_subprocess("--bridge-service=orders", *QUIET)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["agent of orders: pod orders-agent: the API server does not answer"])


def test_connect_records_and_announces_its_phases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(BridgeSession, "_load_config", lambda self: None)

    def unreachable(self: BridgeSession) -> None:
        raise ConnectError("no cluster here")

    monkeypatch.setattr(BridgeSession, "client", property(unreachable))
    with BridgeSession(BridgeSettings(services=("orders",)), progress=lines.append) as session:
        with pytest.raises(ConnectError):
            session.connect()
        assert lines == ["plan (+0.0s)"]
        assert list(session.phases) == ["plan"]  # the phase that failed keeps its time
        session._mark("orders: agent pod")
        session._mark(None)
        assert list(session.phases) == ["plan", "orders: agent pod"]
        assert lines[-1].startswith("orders: agent pod (+")


def test_progress_shows_with_verbose_only(ux_cluster: pytest.Pytester) -> None:
    ux_cluster.makeconftest(
        UX_CONFTEST
        + """
def announcing(self):
    self._mark("plan")
    self._mark("orders: agent pod")
    self._mark(None)
    return connect_with_phases(self)


BridgeSession.connect = announcing
"""
    )
    verbose = ux_cluster.runpytest_subprocess("--bridge-service=orders", "-v", "-k", "passes", *QUIET)
    verbose.stdout.fnmatch_lines(
        ["pytest-bridge: connect: plan (+0.0s)", "pytest-bridge: connect: orders: agent pod (+*s)"]
    )
    plain = ux_cluster.runpytest_subprocess("--bridge-service=orders", "-k", "passes", *QUIET)
    assert "pytest-bridge: connect:" not in plain.stdout.str()


def test_an_isolated_sessions_routes_are_in_the_report_of_a_test_using_it(pytester: pytest.Pytester) -> None:
    session = SimpleNamespace(services={"orders": object()}, routes={"orders": "the session's route"})

    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")  # no start-up warning
    item, plain = pytester.getitems("def test_uses(bridged_service): pass\n\ndef test_plain(): pass\n")
    item.config.stash[plugin._session_key] = session  # type: ignore[assignment]
    bridges, routes = plugin._used_by(item)
    assert len(bridges) == 1 and routes == ["the session's route"]
    assert plugin._used_by(plain) == ([], [])
