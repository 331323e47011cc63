"""pytest plugin entry point: options, markers, fixtures and reporting — wiring only.

The work lives in ``session`` (connect/disconnect), ``settings`` (one resolver), and the
modules under them; this module only calls them at the right hooks and keeps state in
the config stash.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from pytest_bridge import settings as settings_mod
from pytest_bridge.core.errors import BridgeError
from pytest_bridge.local.localproc import LocalProcess, start_local_process
from pytest_bridge.orchestration import artifacts, handoff, propagation
from pytest_bridge.orchestration.connection import BridgedService
from pytest_bridge.orchestration.isolation import ROUTE_HEADER, Route
from pytest_bridge.orchestration.propagation import PropagationResult
from pytest_bridge.orchestration.session import BridgeSession

__all__ = ["BridgeFactory", "IsolatedRoute", "LocalService"]

_settings_key = pytest.StashKey[settings_mod.BridgeSettings]()
_session_key = pytest.StashKey[BridgeSession]()
_route_times_key = pytest.StashKey[list[float]]()
_checks_key = pytest.StashKey[list[PropagationResult]]()
# Per test: the per-test bridges (bridge_factory) and routes (isolated_route) it used, for its report.
_test_bridges_key = pytest.StashKey[list[BridgeSession]]()
_test_routes_key = pytest.StashKey[list[Route]]()
_reported_key = pytest.StashKey[bool]()  # the test's report has its pytest-bridge section


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_mod.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bridge(service=None, namespace=None, container=None, local_port=None): per-test bridge settings "
        "(marker > CLI > env > ini)",
    )
    config.addinivalue_line(
        "markers",
        "isolated(service=None): give the test its own generated route of a bridged service (default: the "
        "first); only requests with its kubernetes-route-as header reach it (the isolated_route fixture)",
    )
    config.stash[_settings_key] = settings_mod.resolve(config)
    if config.pluginmanager.hasplugin("xdist"):
        # Only with xdist installed: pytest rejects hook implementations it has no spec for.
        config.pluginmanager.register(_XdistHandoff(), "pytest-bridge-xdist")


class _XdistHandoff:
    """Connect once in the xdist controller; every worker gets the bridge through ``workerinput``."""

    def pytest_configure_node(self, node: Any) -> None:
        bridge = node.config.stash.get(_session_key, None)
        # Isolated routes are opened per worker (their names carry the worker id).
        if bridge is not None and bridge.services and not bridge.settings.isolate:
            node.workerinput[handoff.WORKERINPUT_KEY] = handoff.encode(bridge.handoff())


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller that will start workers (``-n N``, N > 0)."""
    try:
        return bool(config.getoption("numprocesses", None)) and config.getoption("dist", "no") != "no"
    except ValueError:
        return False


def _worker_id(config: pytest.Config) -> str | None:
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.isolated`` tests get the ``isolated_route`` fixture even if they don't ask."""
    for item in items:
        if item.get_closest_marker("isolated") is not None:
            names = getattr(item, "fixturenames", None)
            if isinstance(names, list) and "isolated_route" not in names:
                names.insert(0, "isolated_route")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    bridge_settings = config.stash[_settings_key]
    if not bridge_settings.services:
        return
    terminal = config.pluginmanager.get_plugin("terminalreporter")

    def report(line: str) -> None:
        if terminal is not None and config.getoption("verbose") >= 0:
            terminal.write_line(f"pytest-bridge: {line}")

    def progress(line: str) -> None:  # connect's phases as they start: -v only
        if terminal is not None and config.getoption("verbose") > 0:
            terminal.write_line(f"pytest-bridge: connect: {line}")

    bridge = BridgeSession(bridge_settings, report=report, worker=_worker_id(config), progress=progress)
    config.stash[_session_key] = bridge
    if bridge_settings.isolate and not _is_xdist_worker(config) and _xdist_controller(config):
        return  # isolated under xdist: every worker opens its own route; the controller needs none
    handed_over = getattr(config, "workerinput", {}).get(handoff.WORKERINPUT_KEY)
    if handed_over is not None:
        bridge.attach(handoff.decode(handed_over))  # the controller connected; its tunnel serves us
        return
    _install_signal_handlers()
    atexit.register(_close_quietly, bridge)
    try:
        bridge.connect()
    except BridgeError as exc:
        raise pytest.UsageError(f"pytest-bridge could not connect: {exc}") from exc
    except Exception as exc:  # a bug of ours: one clear line, not an INTERNALERROR (the cluster is restored)
        logging.getLogger(__name__).exception("connect failed")
        raise pytest.UsageError(
            f"pytest-bridge could not connect: unexpected {type(exc).__name__}: {exc} (a bug of pytest-bridge; "
            "the cluster was restored)"
        ) from exc


_BRIDGE_FIXTURES = frozenset({"bridged_service", "bridged_services", "isolated_route", "bridge_session"})


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that uses the bridge fails at once, saying why, when the bridge is lost."""
    if not _BRIDGE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return
    bridge = item.config.stash.get(_session_key, None)
    problem = bridge.lost() if bridge is not None and bridge.attached_to is None else None
    if problem:
        pytest.fail(problem, pytrace=False)


def _used_by(item: pytest.Item) -> tuple[list[BridgeSession], list[Route]]:
    """The bridges and routes ``item`` used: the session's (through a fixture), its own per-test ones."""
    own: list[BridgeSession] = item.stash.get(_test_bridges_key, [])
    bridges = list(own)
    session_bridge = item.config.stash.get(_session_key, None)
    if (
        session_bridge is not None
        and session_bridge.services
        and _BRIDGE_FIXTURES & set(getattr(item, "fixturenames", ()))
    ):
        bridges.insert(0, session_bridge)
    own_routes: list[Route] = item.stash.get(_test_routes_key, [])
    routes = list(own_routes)
    if bridges and bridges[0] is session_bridge:  # --bridge-isolate: the session's routes carry its traffic
        routes += [r for r in session_bridge.routes.values() if r not in routes]
    return bridges, routes


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used a bridge or route gets a ``pytest-bridge`` report section (logs, route
    state, phase timings); every such test records the phase timings as JUnit properties."""
    if call.when == "teardown":
        bridges, routes = _used_by(item)
        properties = [p for b in bridges for p in artifacts.phase_properties("connect", b.phases)]
        properties += [p for r in routes for p in artifacts.phase_properties("route", r.timings)]
        item.user_properties.extend(properties)  # what record_property does
    report = yield
    if report.failed and not item.stash.get(_reported_key, False):  # once: a failed call and teardown
        bridges, routes = _used_by(item)
        if bridges or routes:
            try:
                text = artifacts.failure_section(bridges, routes)
            except Exception as exc:  # the report must never fail on our account
                text = f"(pytest-bridge could not gather the failure artifacts: {type(exc).__name__}: {exc})"
            item.stash[_reported_key] = True
            report.sections.append((artifacts.SECTION, text))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    bridge = session.config.stash.get(_session_key, None)
    if bridge is None:
        return
    try:
        bridge.close()
    except BridgeError as exc:
        # Not an INTERNALERROR: say it, fail the run; the in-cluster guard restores what was not.
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line(f"pytest-bridge: {exc}", red=True)
        session.exitstatus = max(int(session.exitstatus), int(pytest.ExitCode.TESTS_FAILED))


def _close_quietly(bridge: BridgeSession) -> None:
    with contextlib.suppress(Exception):
        bridge.close()


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP become KeyboardInterrupt, so pytest tears down (and we restore)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, interrupt)


def pytest_report_header(config: pytest.Config) -> list[str]:
    bridge = config.stash.get(_session_key, None)
    if bridge is None or not bridge.services or bridge.attached_to is not None:
        return []  # nothing bridged, or an xdist worker (the controller reports; workers hold no client)
    k = bridge.client
    lines = [f"bridge: session {bridge.session_id}, context {k.context!r}, namespace {k.namespace!r}"]
    for name, svc in bridge.services.items():
        ports = ", ".join(f"{target}->localhost:{local}" for target, local in svc.local_ports.items())
        lines.append(
            f"bridge: {name} (container {svc.plan.container} of {svc.plan.workload.kind} "
            f"{svc.plan.workload.name}) -> {ports}; {len(svc.env)} env vars imported"
        )
    for name, route in bridge.routes.items():
        lines.append(f"bridge: {name} isolated on route {route.name} (send header {ROUTE_HEADER}: {route.name})")
    lines.append(f"bridge: names: {bridge.name_mapping_description()}")
    lines.append(f"bridge: transport: {bridge.transport}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    bridge = config.stash.get(_session_key, None)
    if bridge is None or config.getoption("verbose") < 0:
        return
    timings = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in bridge.timings.items())
    terminalreporter.write_sep("-", "pytest-bridge")
    terminalreporter.write_line(f"session {bridge.session_id}: {timings or 'not connected'}")
    for name, route in bridge.routes.items():
        terminalreporter.write_line(f"{name}: session route {route.name} live in {route.timings.get('live', 0):.1f}s")
    for result in config.stash.get(_checks_key, []):
        terminalreporter.write_line(f"propagation: {'ok' if result.ok else 'BROKEN'}: {result.describe()}")
    per_test = config.stash.get(_route_times_key, [])
    if per_test:
        ordered = sorted(per_test)
        terminalreporter.write_line(
            f"per-test routes: {len(ordered)}, live in median {ordered[len(ordered) // 2]:.1f}s, max {ordered[-1]:.1f}s"
        )


class LocalService:
    """What the ``bridged_service`` fixture returns: the bridge of one service, plus helpers."""

    def __init__(self, bridge: BridgeSession, service: BridgedService) -> None:
        self._bridge = bridge
        self.service = service
        self._processes: list[LocalProcess] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    def __repr__(self) -> str:
        # The env holds the service's secrets: a failing test's locals must not print them.
        return (
            f"<{type(self).__name__} {self.service.name}.{self.service.namespace}: local ports {self.service.local_ports}, "
            f"{len(self.service.env)} env vars (values hidden)>"
        )

    def start(
        self, argv: Sequence[str], *, port: int | None = None, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, timeout: float = 30.0,
    ) -> LocalProcess:  # fmt: skip
        """Start the local service with the imported env and name mapping; wait until it listens."""
        port = port or self.service.local_port
        full_env = self._bridge.subprocess_env({**os.environ, **self.service.env, **(env or {})})
        process = start_local_process(
            argv, port=port, env=full_env, cwd=cwd, timeout=timeout,
            log_path=self.service.session_dir / f"local-{self._bridge.worker or 'main'}-{len(self._processes)}.log",
            wrap=self._bridge.subprocess_wrap(),
        )  # fmt: skip
        self._processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self._processes:
            process.stop()


@pytest.fixture(scope="session")
def bridge_session(request: pytest.FixtureRequest) -> BridgeSession:
    """The session's bridge (connected by ``--bridge-service``)."""
    bridge = request.config.stash.get(_session_key, None)
    if bridge is None:
        pytest.skip("no service is bridged: pass --bridge-service=NAME (or set PYTEST_BRIDGE_SERVICE)")
    return bridge


@pytest.fixture(scope="session")
def bridged_service(bridge_session: BridgeSession) -> Iterator[LocalService]:
    """The bridged service (the first one if several): local ports, env, session dir, helpers."""
    name = next(iter(bridge_session.services))
    local = LocalService(bridge_session, bridge_session.services[name])
    yield local
    local.stop_all()


@pytest.fixture(scope="session")
def bridged_services(bridge_session: BridgeSession) -> Iterator[dict[str, LocalService]]:
    """Every bridged service by name."""
    services = {name: LocalService(bridge_session, svc) for name, svc in bridge_session.services.items()}
    yield services
    for local in services.values():
        local.stop_all()


BridgeFactory = Callable[..., LocalService]


@pytest.fixture
def bridge_factory(request: pytest.FixtureRequest) -> Iterator[BridgeFactory]:
    """Bridge a service for this test only: ``bridge_factory("orders")`` connects now, restores at teardown.

    Keyword arguments are settings as for the ``bridge`` marker (``namespace=``, ``container=``,
    ``local_port=``, ...); they win over the test's ``bridge`` marker, which wins over CLI, env
    and ini. Returns the same helper as ``bridged_service``. Each call is a session of its own
    (own agent, guard and name mapping); a service already bridged for the whole session, or
    by another xdist worker at the same time, is refused.
    """
    config = request.config
    opened: list[tuple[BridgeSession, LocalService]] = []

    def bridge(service: str | None = None, **overrides: object) -> LocalService:
        marker = request.node.get_closest_marker("bridge")
        kwargs: dict[str, object] = {**(marker.kwargs if marker else {}), **overrides}
        if service is not None:
            kwargs["service"] = service
        if "service" not in kwargs:
            pytest.fail("bridge_factory needs a service: bridge_factory('orders') or @pytest.mark.bridge(service=...)")
        resolved = settings_mod.resolve(config, kwargs)
        if len(resolved.services) != 1:
            pytest.fail(f"bridge_factory bridges one service per call, got {', '.join(resolved.services)}")
        name = resolved.services[0]
        session_bridge = config.stash.get(_session_key, None)
        if session_bridge is not None and name in session_bridge.services:
            pytest.fail(f"{name!r} is bridged for the whole session already (--bridge-service): use bridged_service")
        bridge = BridgeSession(resolved, worker=_worker_id(config))
        atexit.register(bridge.close)  # pytest killed mid-test: still restore (the guard is the backstop)
        try:
            bridge.connect()
        except BridgeError as exc:
            atexit.unregister(bridge.close)
            pytest.fail(f"pytest-bridge could not bridge {name!r} for this test: {exc}", pytrace=False)
        local = LocalService(bridge, bridge.services[name])
        opened.append((bridge, local))
        request.node.stash.setdefault(_test_bridges_key, []).append(bridge)
        return local

    yield bridge
    errors = []
    for per_test, local in reversed(opened):
        local.stop_all()
        atexit.unregister(per_test.close)
        try:
            per_test.close()
        except BridgeError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


class IsolatedRoute(LocalService):
    """What ``isolated_route`` returns: a route (name, header, ``<route>.`` URLs) plus the local helpers."""

    def __init__(self, bridge: BridgeSession, route: Route, results: list[PropagationResult] | None = None) -> None:
        super().__init__(bridge, route.bridged)
        self.route = route
        self._results = results if results is not None else []

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def header(self) -> dict[str, str]:
        """``{"kubernetes-route-as": <route>}``: send it and the request takes this route."""
        return self.route.header

    @property
    def headers(self) -> dict[str, str]:
        return self.route.header

    @property
    def hosts(self) -> list[str]:
        return self.route.hosts

    @property
    def urls(self) -> list[str]:
        return self.route.urls

    def __repr__(self) -> str:
        return f"<IsolatedRoute {self.route.name} of {self.route.service}: {len(self.service.env)} env vars (values hidden)>"

    def check_propagation(
        self, entry: str, path: str = "/", *, port: int | None = None, services: Sequence[str] | None = None
    ) -> PropagationResult:
        """Send one request with this route's header into service ``entry`` and say which hop dropped it.

        Every HTTP service of the namespace (or ``services``) is observed through a router while
        this route lives; see :mod:`pytest_bridge.orchestration.propagation`.
        """
        result = propagation.check(self._bridge, self.route, entry, path=path, port=port, services=services)
        self._results.append(result)
        return result

    def assert_propagates(self, entry: str, path: str = "/", **kwargs: Any) -> PropagationResult:
        """:meth:`check_propagation`, failing the test with the dropping hop(s) named."""
        result = self.check_propagation(entry, path, **kwargs)
        if not result.ok:
            raise AssertionError(f"header propagation broken: {result.describe()}")
        return result


@pytest.fixture
def isolated_route(request: pytest.FixtureRequest, bridge_session: BridgeSession) -> Iterator[IsolatedRoute]:
    """This test's isolated route.

    In a test marked ``@pytest.mark.isolated`` (or when the session is not isolated) a new
    route is generated for the test and removed after it; otherwise the session's route
    (``--bridge-isolate``) is returned.
    """
    marker = request.node.get_closest_marker("isolated")
    services = list(bridge_session.services)
    service = None
    if marker is not None:
        service = marker.args[0] if marker.args else marker.kwargs.get("service")
    if marker is None and bridge_session.routes:
        request.node.stash.setdefault(_test_routes_key, []).append(next(iter(bridge_session.routes.values())))
        yield IsolatedRoute(
            bridge_session, next(iter(bridge_session.routes.values())), request.config.stash.setdefault(_checks_key, [])
        )
        return
    service = service or (services[0] if services else None)
    if service is None:
        pytest.fail("isolated_route needs a bridged service: pass --bridge-service=NAME", pytrace=False)
    try:
        route = bridge_session.open_route(service, per_test=True)
    except BridgeError as exc:
        pytest.fail(f"pytest-bridge could not open an isolated route of {service!r}: {exc}", pytrace=False)
    request.config.stash.setdefault(_route_times_key, []).append(route.timings.get("live", 0.0))
    request.node.stash.setdefault(_test_routes_key, []).append(route)
    handle = IsolatedRoute(bridge_session, route, request.config.stash.setdefault(_checks_key, []))
    try:
        yield handle
    finally:
        handle.stop_all()
        bridge_session.close_route(route)
