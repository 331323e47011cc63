"""The kubectl transport: parsing kubectl's announcement, and the setting."""

from __future__ import annotations

import pytest

from pytest_bridge.errors import ConnectError
from pytest_bridge.kubectl_forward import find_kubectl, parse_forwarding_port


def test_the_local_port_is_read_from_kubectls_first_line() -> None:
    assert parse_forwarding_port(b"Forwarding from 127.0.0.1:39127 -> 47100\n") == 39127
    assert parse_forwarding_port(b"error: unable to forward port because pod is not running\n") is None
    assert parse_forwarding_port(b"") is None


def test_a_missing_kubectl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_BRIDGE_KUBECTL", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConnectError, match="PYTEST_BRIDGE_KUBECTL"):
        find_kubectl()
