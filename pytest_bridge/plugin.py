"""pytest plugin entry point: options, markers, fixtures and reporting — wiring only.

The work lives in ``session`` (connect/disconnect), ``settings`` (one resolver), and the
modules under them; this module only calls them at the right hooks and keeps state in
the config stash.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from . import settings as settings_mod
from .errors import BridgeError
from .localproc import LocalProcess, start_local_process
from .session import BridgedService, BridgeSession

__all__ = ["LocalService"]

_settings_key = pytest.StashKey[settings_mod.BridgeSettings]()
_session_key = pytest.StashKey[BridgeSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_mod.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bridge(service=None, namespace=None, container=None, local_port=None): per-test bridge settings "
        "(marker > CLI > env > ini)",
    )
    config.addinivalue_line("markers", "isolated: give the test its own generated route (kubernetes-route-as header)")
    config.stash[_settings_key] = settings_mod.resolve(config)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


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

    bridge = BridgeSession(bridge_settings, report=report)
    config.stash[_session_key] = bridge
    _install_signal_handlers()
    atexit.register(_close_quietly, bridge)
    try:
        bridge.connect()
    except BridgeError as exc:
        raise pytest.UsageError(f"pytest-bridge could not connect: {exc}") from exc


def pytest_sessionfinish(session: pytest.Session) -> None:
    bridge = session.config.stash.get(_session_key, None)
    if bridge is not None:
        bridge.close()


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
    if bridge is None or not bridge.services:
        return []
    k = bridge.client
    lines = [f"bridge: session {bridge.session_id}, context {k.context!r}, namespace {k.namespace!r}"]
    for name, svc in bridge.services.items():
        ports = ", ".join(f"{target}->localhost:{local}" for target, local in svc.local_ports.items())
        lines.append(
            f"bridge: {name} (container {svc.plan.container} of {svc.plan.workload.kind} "
            f"{svc.plan.workload.name}) -> {ports}; {len(svc.env)} env vars imported"
        )
    lines.append(f"bridge: names: {bridge.name_mapping_description()}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    bridge = config.stash.get(_session_key, None)
    if bridge is None or config.getoption("verbose") < 0:
        return
    timings = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in bridge.timings.items())
    terminalreporter.write_sep("-", "pytest-bridge")
    terminalreporter.write_line(f"session {bridge.session_id}: {timings or 'not connected'}")


class LocalService:
    """What the ``bridged_service`` fixture returns: the bridge of one service, plus helpers."""

    def __init__(self, bridge: BridgeSession, service: BridgedService) -> None:
        self._bridge = bridge
        self.service = service
        self._processes: list[LocalProcess] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    def start(
        self, argv: Sequence[str], *, port: int | None = None, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, timeout: float = 30.0,
    ) -> LocalProcess:  # fmt: skip
        """Start the local service with the imported env and name mapping; wait until it listens."""
        port = port or self.service.local_port
        full_env = self._bridge.subprocess_env({**os.environ, **self.service.env, **(env or {})})
        process = start_local_process(
            argv, port=port, env=full_env, cwd=cwd, timeout=timeout,
            log_path=self.service.session_dir / f"local-{len(self._processes)}.log",
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
