"""Local port choices of a session: distinct across services, and a port in use refused before any change."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pytest_bridge.errors import PlanError
from pytest_bridge.localproc import PortInUseError
from pytest_bridge.plan import BridgePlan, PortBinding, ServicePort, WorkloadRef
from pytest_bridge.session import _check_local_ports, _same_or_free_port


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
