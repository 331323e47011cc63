"""The fault hook: what PYTEST_BRIDGE_FAULT accepts, what each action does, and that the plugin passes every point."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import urllib3

from pytest_bridge.core import faults
from pytest_bridge.core.errors import ApiUnreachableError, BridgeError

PACKAGE = Path(faults.__file__).parent.parent  # pytest_bridge


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment is read once per process: read it again for each test."""
    monkeypatch.delenv(faults.ENV, raising=False)
    faults._faults.cache_clear()
    yield
    faults._faults.cache_clear()


def _set(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(faults.ENV, value)
    faults._faults.cache_clear()


def test_parse_points_and_actions() -> None:
    assert faults.parse("") == {}
    assert faults.parse(" guard-job=sigkill , connected=interrupt,") == {
        "guard-job": "sigkill",
        "connected": "interrupt",
    }


@pytest.mark.parametrize("text", ["nowhere=sigkill", "guard-job=explode", "guard-job", "=sigkill"])
def test_parse_names_what_is_wrong_and_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))) as error:
        faults.parse(text)
    assert "guard-job" in str(error.value) and "lost-response" in str(error.value)


def test_unset_does_nothing() -> None:
    for point in faults.POINTS:
        faults.checkpoint(point)


def test_another_point_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _set(monkeypatch, "connected=interrupt")
    faults.checkpoint("guard-job")
    with pytest.raises(KeyboardInterrupt, match="interrupt at connected"):
        faults.checkpoint("connected")


def test_lost_response_is_what_the_api_layer_raises_for_a_lost_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ApiUnreachableError from the client's ProtocolError, as kube.call raises it: the plugin's
    path for a lost answer, not its path for an unexpected error."""
    _set(monkeypatch, "workload-patched=lost-response")
    with pytest.raises(ApiUnreachableError, match="the API server did not answer") as error:
        faults.checkpoint("workload-patched")
    assert isinstance(error.value, BridgeError)
    assert isinstance(error.value.__cause__, urllib3.exceptions.ProtocolError)
    assert "workload-patched" in str(error.value)


def test_sigterm_signals_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        _set(monkeypatch, "close-start=sigterm")
        faults.checkpoint("close-start")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]


def test_sigkill_kills_on_the_spot() -> None:
    code = "from pytest_bridge.core import faults; faults.checkpoint('guard-armed'); print('survived')"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
        env={"PYTEST_BRIDGE_FAULT": "guard-armed=sigkill", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL and "survived" not in run.stdout, run


def test_every_point_is_passed_once_and_no_other() -> None:
    """The chaos run and the e2e tests draw from POINTS: each must be a real place in connect or close."""
    called = [
        match.group(1)
        for path in sorted(PACKAGE.rglob("*.py"))
        for match in re.finditer(r"faults\.checkpoint\(\"([^\"]+)\"\)", path.read_text())
    ]
    assert sorted(called) == sorted(faults.POINTS)
