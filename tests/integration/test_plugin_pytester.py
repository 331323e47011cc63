"""The plugin as users run it, without a cluster: options, markers, fixtures, reporting, xdist.

Each test writes a small suite with ``pytester`` and runs pytest on it in a subprocess (the
real entry point, like a user). Where a connected session is needed, the suite's conftest
replaces ``BridgeSession.connect`` with a fake that fills in what a connection would (services,
env, session dir, a name mapping) without a cluster; everything above it — settings, hooks,
fixtures, the report, the xdist handoff, the name mapping in workers and their subprocesses —
is the real code. Subprocess runs also keep the fake out of this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_bridge.local.ports import free_port

pytest_plugins = ["pytester"]

# Keep unrelated plugins' start-up warnings out of the inner runs' output.
QUIET = ("-p", "no:asyncio", "-p", "no:cacheprovider", "-p", "no:benchmark")

FAKE_CONFTEST = '''
import os

from pytest_bridge.core import names
from pytest_bridge.core.errors import ConnectError
from pytest_bridge.core.plan import BridgePlan, PortBinding, ServicePort, WorkloadRef
from pytest_bridge.orchestration.connection import BridgedService
from pytest_bridge.orchestration.session import BridgeSession


class FakeKube:
    context = "fake-context"
    namespace = "shop"

    def close(self):
        pass


def fake_connect(self):
    """What a connection leaves behind, without a cluster."""
    log = os.environ.get("FAKE_CONNECT_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {','.join(self.settings.services)}\\n")
    if os.environ.get("FAKE_CONNECT_FAIL"):
        raise ConnectError("the fake cluster is down")
    self._kube = FakeKube()
    endpoints = [names.Endpoint("inventory", "shop", (names.EndpointPort(80, "http"),))]
    mapping = names.map_endpoints(endpoints, "shop", allocate_port=lambda remote: 18080)
    first_port = int(os.environ.get("FAKE_LOCAL_PORT", "18000"))
    for n, service in enumerate(self.settings.services):
        local = first_port + n
        plan = BridgePlan(
            service=service, namespace="shop", workload=WorkloadRef("Deployment", service, "shop"),
            container="app", container_index=0, service_ports=(ServicePort(80, 8080, "http"),),
            target_ports=(8080,), port_bindings=(PortBinding(8080, local),),
        )
        service_dir = self.session_dir / service
        service_dir.mkdir()
        self.services[service] = BridgedService(
            name=service, namespace="shop", plan=plan, local_ports={8080: local},
            env={"GREETING": f"hello from {service}", "DB_HOST": "db.shop"}, session_dir=service_dir,
            mapping=mapping, agent_pod=f"{service}-agent",
        )
    self._map_names()
    self.timings["connect"] = 0.0
    return self.services


BridgeSession.connect = fake_connect
'''

# Run by bridged_service.start(): resolves a cluster name, reports what it sees, then listens.
LOCAL_SERVICE = (
    "import os, socket, time\n"
    "seen = {'inventory': socket.gethostbyname('inventory'), 'GREETING': os.environ['GREETING']}\n"
    "open(os.environ['OUT'], 'w').write(repr(seen))\n"
    "server = socket.socket()\n"
    "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "server.bind(('127.0.0.1', int(os.environ['PORT'])))\n"
    "server.listen()\n"
    "time.sleep(60)\n"
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PYTEST_BRIDGE_* from the outer environment leaks into the inner runs."""
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("PYTEST_BRIDGE_") or name.startswith("FAKE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_cluster(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(FAKE_CONFTEST)
    return pytester


# --- options and markers ---------------------------------------------------------------------


def test_help_lists_every_option_with_its_env_and_ini_names(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help", *QUIET)
    assert result.ret == 0
    out = result.stdout.str()
    for flag, env, ini in [
        ("--bridge-service=NAME", "PYTEST_BRIDGE_SERVICE", "bridge_service"),
        ("--bridge-namespace=NS", "PYTEST_BRIDGE_NAMESPACE", "bridge_namespace"),
        ("--bridge-local-port=[SVC:][TARGET=]LOCAL", "PYTEST_BRIDGE_LOCAL_PORT", "bridge_local_port"),
        ("--bridge-name-mapping=MODE", "PYTEST_BRIDGE_NAME_MAPPING", "bridge_name_mapping"),
    ]:
        assert flag in out
        assert f"[env {env}, ini {ini}]" in " ".join(out.split())  # help text is wrapped


def test_markers_are_registered_with_their_signatures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers", *QUIET)
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.bridge(service=None, namespace=None, container=None, local_port=None):*",
            "@pytest.mark.isolated(service=None):*",
        ]
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.bridge(service="orders")
        def test_marked():
            pass
        """
    )
    pytester.runpytest_subprocess("--strict-markers", *QUIET).assert_outcomes(passed=1)


# --- one precedence, surfaced through pytest -------------------------------------------------

PRECEDENCE_SUITE = """
def test_settings(bridge_session):
    settings = bridge_session.settings
    assert (settings.namespace, settings.sources["namespace"]) == ({namespace!r}, {source!r})
    assert settings.services == ("orders",)
"""


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"ini"}, ("from-ini", "ini bridge_namespace")),
        ({"ini", "env"}, ("from-env", "PYTEST_BRIDGE_NAMESPACE")),
        ({"ini", "env", "cli"}, ("from-cli", "--bridge-namespace")),
    ],
)
def test_cli_beats_env_beats_ini(
    fake_cluster: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, given: set[str], expected: tuple[str, str]
) -> None:
    fake_cluster.makeini("[pytest]\nbridge_service = orders\nbridge_namespace = from-ini\n")
    fake_cluster.makepyfile(PRECEDENCE_SUITE.format(namespace=expected[0], source=expected[1]))
    if "env" in given:
        monkeypatch.setenv("PYTEST_BRIDGE_NAMESPACE", "from-env")
    args = ["--bridge-namespace=from-cli"] if "cli" in given else []
    fake_cluster.runpytest_subprocess(*args, *QUIET).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("cli", "invalid value 'Bad_NS' from --bridge-namespace; expected a namespace name"),
        ("env", "invalid value 'soon' from PYTEST_BRIDGE_CONNECT_TIMEOUT; expected a number of seconds"),
        ("ini", "invalid value 'magic' from ini bridge_name_mapping; expected one of 'auto', 'in-process'"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_value_and_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str, message: str
) -> None:
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError\n")
    args: list[str] = []
    if where == "cli":
        args.append("--bridge-namespace=Bad_NS")
    elif where == "env":
        monkeypatch.setenv("PYTEST_BRIDGE_CONNECT_TIMEOUT", "soon")
    else:
        pytester.makeini("[pytest]\nbridge_name_mapping = magic\n")
    result = pytester.runpytest_subprocess(*args, *QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "never_runs" not in result.stdout.str()


# --- fixtures --------------------------------------------------------------------------------


def test_bridged_service_without_a_service_skips_and_says_how(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_needs_it(bridged_service):\n    pass\n")
    result = pytester.runpytest_subprocess("-rs", *QUIET)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no service is bridged: pass --bridge-service=NAME*PYTEST_BRIDGE_SERVICE*"])


def test_a_failed_connect_stops_the_session_with_the_reason(
    fake_cluster: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cluster.makepyfile("def test_never_runs(bridged_service):\n    raise AssertionError\n")
    monkeypatch.setenv("FAKE_CONNECT_FAIL", "1")
    result = fake_cluster.runpytest_subprocess("--bridge-service=orders", *QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "pytest-bridge could not connect: the fake cluster is down" in result.stderr.str()


def test_header_and_summary_say_what_is_bridged(fake_cluster: pytest.Pytester) -> None:
    fake_cluster.makepyfile("def test_ok(bridged_service):\n    pass\n")
    result = fake_cluster.runpytest_subprocess("--bridge-service=orders", "--bridge-name-mapping=in-process", *QUIET)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "bridge: session *, context 'fake-context', namespace 'shop'",
            "bridge: orders (container app of Deployment orders) -> 8080->localhost:18000; 2 env vars imported",
            "bridge: names: in-process resolver*",
            "*- pytest-bridge -*",
            "session *: connect 0.0s, disconnect *s",
        ]
    )
    quiet = fake_cluster.runpytest_subprocess("--bridge-service=orders", "-q", *QUIET)
    quiet.assert_outcomes(passed=1)
    assert "pytest-bridge" not in quiet.stdout.str()


FIXTURE_SUITE = f"""
import ast, socket, sys
from pathlib import Path

LOCAL_SERVICE = {LOCAL_SERVICE!r}


def test_the_fixture_gives_ports_env_urls_and_names(bridged_service, bridged_services):
    assert set(bridged_services) == {{"orders"}}
    assert bridged_service.local_port == bridged_service.local_ports[8080] == 18000
    assert bridged_service.env["GREETING"] == "hello from orders"
    assert bridged_service.session_dir.is_dir()
    assert bridged_service.url("inventory", path="/api") == "http://inventory.shop:18080/api"
    assert socket.gethostbyname("inventory.shop.svc.cluster.local") == "127.1.1.1"  # in-process resolver


def test_start_runs_the_local_service_with_env_and_names(bridged_service, tmp_path):
    out = tmp_path / "seen"
    process = bridged_service.start(
        [sys.executable, "-c", LOCAL_SERVICE], env={{"OUT": str(out), "PORT": str(bridged_service.local_port)}}
    )
    try:
        seen = ast.literal_eval(out.read_text())
    finally:
        process.stop()
    assert seen == {{"inventory": "127.1.1.1", "GREETING": "hello from orders"}}
"""


def test_fixtures_of_a_connected_session(fake_cluster: pytest.Pytester) -> None:
    fake_cluster.makepyfile(FIXTURE_SUITE)
    fake_cluster.runpytest_subprocess("--bridge-service=orders", *QUIET).assert_outcomes(passed=2)


# --- per-test bridging -----------------------------------------------------------------------

FACTORY_SUITE = """
import socket
import pytest


@pytest.mark.bridge(service="payments", namespace="other")
def test_marker_then_arguments(bridge_factory):
    payments = bridge_factory()
    assert payments.name == "payments" and payments.env["GREETING"] == "hello from payments"
    assert payments._bridge.settings.namespace == "other"
    assert socket.gethostbyname("inventory") == "127.1.1.1"
    third = bridge_factory("shipping", namespace="third")
    assert third._bridge.settings.namespace == "third"
    assert third._bridge is not payments._bridge


def test_names_are_gone_after_the_test():
    with pytest.raises(OSError):
        socket.gethostbyname("inventory.shop.svc.cluster.local")


def test_a_service_is_needed(bridge_factory):
    bridge_factory()


def test_the_sessions_service_is_refused(bridge_factory, bridged_service):
    bridge_factory("orders")
"""


def test_bridge_factory_bridges_per_test_and_restores_at_teardown(
    fake_cluster: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "connects"
    monkeypatch.setenv("FAKE_CONNECT_LOG", str(log))
    fake_cluster.makepyfile(FACTORY_SUITE)
    result = fake_cluster.runpytest_subprocess("--bridge-name-mapping=in-process", "-k", "not refused", *QUIET)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*bridge_factory needs a service*"])
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["payments", "shipping"]
    refused = fake_cluster.runpytest_subprocess("--bridge-service=orders", "-k", "refused", *QUIET)
    refused.assert_outcomes(failed=1)
    refused.stdout.fnmatch_lines(["*'orders' is bridged for the whole session already*use bridged_service*"])


# --- xdist: connect once in the controller ---------------------------------------------------

XDIST_SUITE = f"""
import ast, json, os, socket, sys
from pathlib import Path

LOCAL_SERVICE = {LOCAL_SERVICE!r}
OUT = Path(os.environ["VIEWS"])


def test_worker_view(bridged_service, worker_id, tmp_path):
    seen_file = tmp_path / "seen"
    process = bridged_service.start(
        [sys.executable, "-c", LOCAL_SERVICE], port=int(os.environ["PORT_" + worker_id]),
        env={{"OUT": str(seen_file), "PORT": os.environ["PORT_" + worker_id]}},
    )
    try:
        seen = ast.literal_eval(seen_file.read_text())
    finally:
        process.stop()
    view = {{
        "local_ports": {{str(k): v for k, v in bridged_service.local_ports.items()}},
        "env": bridged_service.env,
        "session_dir": str(bridged_service.session_dir),
        "url": bridged_service.url("inventory"),
        "in_process": socket.gethostbyname("inventory"),
        "subprocess": seen,
    }}
    (OUT / f"{{worker_id}}.json").write_text(json.dumps({{"pid": os.getpid(), "view": view}}))
"""


def test_xdist_workers_get_the_controllers_bridge(
    fake_cluster: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    log, views = tmp_path / "connects", tmp_path / "views"
    views.mkdir()
    monkeypatch.setenv("FAKE_CONNECT_LOG", str(log))
    monkeypatch.setenv("VIEWS", str(views))
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv(f"PORT_{worker}", str(free_port()))
    fake_cluster.makepyfile(XDIST_SUITE)
    result = fake_cluster.runpytest_subprocess("-n", "2", "--dist=each", "--bridge-service=orders", *QUIET)
    result.assert_outcomes(passed=2)
    connects = log.read_text().splitlines()
    assert len(connects) == 1, connects  # the controller only
    records = {path.stem: json.loads(path.read_text()) for path in views.glob("*.json")}
    assert sorted(records) == ["gw0", "gw1"]
    assert {record["pid"] for record in records.values()}.isdisjoint({int(connects[0].split()[0])})
    first, second = (record["view"] for record in records.values())
    assert first == second
    assert first["local_ports"] == {"8080": 18000}
    assert first["env"] == {"GREETING": "hello from orders", "DB_HOST": "db.shop"}
    assert first["url"] == "http://inventory.shop:18080"
    assert first["in_process"] == "127.1.1.1"
    assert first["subprocess"] == {"inventory": "127.1.1.1", "GREETING": "hello from orders"}


def test_the_handoff_survives_the_trip_to_a_worker(tmp_path: Path) -> None:
    """What goes into ``workerinput`` comes back equal (execnet carries only a string)."""
    from pytest_bridge.core import names  # noqa: PLC0415
    from pytest_bridge.core.plan import BridgePlan, PortBinding, ServicePort, WorkloadRef  # noqa: PLC0415
    from pytest_bridge.local.hosts import Mechanisms  # noqa: PLC0415
    from pytest_bridge.orchestration import handoff  # noqa: PLC0415
    from pytest_bridge.orchestration.connection import BridgedService  # noqa: PLC0415

    mapping = names.map_endpoints([names.Endpoint("inventory", "shop", (names.EndpointPort(80),))], "shop")
    plan = BridgePlan(
        service="orders", namespace="shop", workload=WorkloadRef("Deployment", "orders", "shop"), container="app",
        container_index=0, service_ports=(ServicePort(80, 8080),), target_ports=(8080,),
        port_bindings=(PortBinding(8080, 18000),),
    )  # fmt: skip
    service = BridgedService(
        name="orders", namespace="shop", plan=plan, local_ports={8080: 18000}, env={"A": "1"},
        session_dir=tmp_path, mapping=mapping, agent_pod="orders-agent",
    )  # fmt: skip
    original = handoff.Handoff("s-1", {"orders": service}, Mechanisms(in_process=True), "xdist controller pid 1")
    text = handoff.encode(original)
    assert isinstance(text, str)
    assert handoff.decode(text) == original
    with pytest.raises(TypeError, match="not a pytest-bridge handoff"):
        handoff.decode(handoff.base64.b64encode(handoff.pickle.dumps({"x": 1})).decode())
