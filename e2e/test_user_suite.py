"""End to end: a user's suite that turns every warning into an error passes with a bridge and a route.

``filterwarnings = error`` makes an unclosed socket of ours (a ``ResourceWarning`` reported by
pytest's unraisable-exception hook) fail the user's run; both tunnel transports are covered.
pytest-asyncio is not one of our dependencies; this environment has it for our own tests, so the
inner run leaves it out, as a user's environment would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.conftest import NAMESPACE

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parents[1] / "fixtures" / "sampleapp" / "app.py"

SUITE = f"""
import json, sys, urllib.request

import pytest


def start(service, name):
    service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(service.local_port),
             "LISTEN_PORT_2": str(service.local_ports[9091]), "HOSTNAME": name, "DOWNSTREAM": "http://inventory/api"}},
    )


def get(headers=None):
    request = urllib.request.Request("http://frontend.{NAMESPACE}/api", headers=headers or {{}})
    with urllib.request.urlopen(request, timeout=20) as reply:
        return json.load(reply)["downstream"][0]


def test_bridge(bridged_service):
    start(bridged_service, "local-orders")
    assert get()["pod"] == "local-orders"


@pytest.mark.isolated
def test_route(isolated_route):
    start(isolated_route, "local-route")
    assert get(isolated_route.header)["pod"] == "local-route"
"""


@pytest.mark.parametrize("transport", ["kubectl", "websocket"])
def test_a_suite_with_filterwarnings_error_passes(transport: str, tmp_path: Path, sample_app: object) -> None:
    if transport == "kubectl" and not os.environ.get("PYTEST_BRIDGE_KUBECTL"):
        pytest.skip("no kubectl handed to the tests (PYTEST_BRIDGE_KUBECTL)")
    (tmp_path / "test_user.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error",
         "--bridge-service=orders", f"--bridge-namespace={NAMESPACE}", f"--bridge-transport={transport}",
         "-rA", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "2 passed" in out, out
    assert "Warning" not in out, out
