"""Local port choices of a session: distinct across services, and a port in use refused before any change."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_bridge.core.errors import PlanError
from pytest_bridge.core.plan import BridgePlan, PortBinding, ServicePort, WorkloadRef
from pytest_bridge.local import ports
from pytest_bridge.local.localproc import PortInUseError
from pytest_bridge.orchestration.session import _check_local_ports, _same_or_free_port


def _plan(service: str, *bindings: tuple[int, int]) -> BridgePlan:
    return BridgePlan(
        service=service, namespace="shop", workload=WorkloadRef("Deployment", service, "shop"), container="app",
        container_index=0, service_ports=tuple(ServicePort(80 + n, target) for n, (target, _) in enumerate(bindings)),
        target_ports=tuple(target for target, _ in bindings),
        port_bindings=tuple(PortBinding(target, local) for target, local in bindings),
    )  # fmt: skip


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_same_number_once_then_another_free_port() -> None:
    claimed: set[int] = set()
    target = _unused_port()
    first = _same_or_free_port(target, claimed)
    second = _same_or_free_port(target, claimed)  # a second service with the same target port
    assert first == target and second != target
    assert claimed == {first, second}


def test_a_busy_target_port_gets_a_free_one(busy_port: int) -> None:
    assert _same_or_free_port(busy_port, set()) != busy_port


def test_a_local_port_in_use_is_refused_by_name(busy_port: int) -> None:
    with pytest.raises(PortInUseError, match=rf"local port {busy_port} \(for orders target port 8080\).*nothing"):
        _check_local_ports([_plan("orders", (8080, busy_port))])


def test_one_local_port_for_two_services_is_refused() -> None:
    port = _unused_port()
    with pytest.raises(PlanError, match=rf"local port {port} is asked for both orders .* and inventory"):
        _check_local_ports([_plan("orders", (8080, port)), _plan("inventory", (8080, port))])


def test_free_distinct_ports_pass() -> None:
    _check_local_ports(
        [_plan("orders", (8080, _unused_port()), (9091, _unused_port())), _plan("inventory", (8080, _unused_port()))]
    )


# --- free_port: below the ephemeral range, so no bind(0) on the machine is handed it meanwhile


def test_a_chosen_port_is_free_and_below_the_ephemeral_range() -> None:
    first, _ = ports.ephemeral_range()
    chosen = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST_CHOSEN <= port < first and ports.port_free(port) for port in chosen)
    assert len(chosen) > 1  # at random: two sessions at once rarely meet


def test_excluded_ports_are_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOWEST_CHOSEN + 1001, 60999))
    taken = set(range(ports.LOWEST_CHOSEN, ports.LOWEST_CHOSEN + 1000))
    assert ports.free_port(exclude=taken) == ports.LOWEST_CHOSEN + 1000


def test_a_range_starting_low_leaves_the_choice_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    assert ports.port_free(ports.free_port())


def test_the_ephemeral_range_is_read_from_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports.sys, "platform", "linux")
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ports.ephemeral_range(tmp_path / "range") == (40000, 50000)
    assert ports.ephemeral_range(tmp_path / "missing") == (49152, 65535)


# --- who_listens: the error names the process that holds the port


def test_who_listens_names_this_process(busy_port: int) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    assert f"(pid {os.getpid()})" in ports.who_listens(busy_port)


def test_who_listens_is_empty_for_a_free_port() -> None:
    assert ports.who_listens(_unused_port()) == ""


def test_the_port_in_use_error_names_the_holder(busy_port: int) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    with pytest.raises(PortInUseError, match=rf"in use by \S+ \(pid {os.getpid()}\)"):
        _check_local_ports([_plan("orders", (8080, busy_port))])
