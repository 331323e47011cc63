"""The kubectl transport: parsing kubectl's announcement, and the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_bridge_agent.lanes import LANE_POOL

from pytest_bridge.core.errors import ConnectError
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings
from pytest_bridge.transport.kubectl_forward import find_kubectl, lane_pool, parse_forwarding_port


def test_the_local_port_is_read_from_kubectls_first_line() -> None:
    assert parse_forwarding_port(b"Forwarding from 127.0.0.1:39127 -> 47100\n") == 39127
    assert parse_forwarding_port(b"error: unable to forward port because pod is not running\n") is None
    assert parse_forwarding_port(b"") is None


def test_a_missing_kubectl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_BRIDGE_KUBECTL", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConnectError, match="PYTEST_BRIDGE_KUBECTL"):
        find_kubectl()


def test_lane_pool_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_BRIDGE_LANES", raising=False)
    assert lane_pool() == LANE_POOL
    monkeypatch.setenv("PYTEST_BRIDGE_LANES", "0")
    assert lane_pool() == 0  # streams only
    monkeypatch.setenv("PYTEST_BRIDGE_LANES", " 12 ")
    assert lane_pool() == 12
    for bad in ("many", "-1", "65"):
        monkeypatch.setenv("PYTEST_BRIDGE_LANES", bad)
        with pytest.raises(ConnectError, match="PYTEST_BRIDGE_LANES"):
            lane_pool()


def _transport(settings: BridgeSettings) -> str:
    with BridgeSession(settings) as session:  # never connected: only resolves "auto"
        return session.transport


def test_auto_transport_is_kubectl_when_one_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_BRIDGE_KUBECTL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _transport(BridgeSettings()) == "websocket"
    assert _transport(BridgeSettings(transport="kubectl")) == "kubectl"  # fails at connect, clearly
    kubectl = tmp_path / "kubectl"
    kubectl.write_text("#!/bin/sh\n")
    kubectl.chmod(0o755)
    assert _transport(BridgeSettings()) == "kubectl"
    assert _transport(BridgeSettings(transport="websocket")) == "websocket"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("PYTEST_BRIDGE_KUBECTL", str(kubectl))
    assert _transport(BridgeSettings()) == "kubectl"
