"""The demo suite: what a developer's integration tests look like against the sample app.

Runs against the embedded cluster (or $KUBECONFIG) with the sample app deployed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

KUBECTL = os.environ.get("PYTEST_BRIDGE_KUBECTL", "/var/cache/pytest-bridge/bin/kubectl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def frontend_url() -> Iterator[str]:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("no cluster: run `python -m e2e.cluster up` and export KUBECONFIG")
    port = _free_port()
    forward = subprocess.Popen(
        [KUBECTL, "-n", "bridge-demo", "port-forward", "svc/frontend", f"{port}:80"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        forward.terminate()
        forward.wait(10)


def test_frontend_answers_through_the_whole_chain(frontend_url: str) -> None:
    import urllib.request  # noqa: PLC0415

    request = urllib.request.Request(f"{frontend_url}/api", headers={"kubernetes-route-as": "demo"})
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.load(response)
    chain = [reply["service"], reply["downstream"][0]["service"], reply["downstream"][0]["downstream"][0]["service"]]
    assert chain == ["frontend", "orders", "inventory"]
    assert reply["downstream"][0]["downstream"][0]["route"] == "demo"


def test_demo_runs_from_the_repository_root() -> None:
    assert (Path(__file__).resolve().parents[1] / "fixtures" / "manifests").is_dir()
    assert sys.version_info >= (3, 11)
