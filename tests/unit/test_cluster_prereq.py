"""The embedded cluster's prerequisite checks: each refusal is clear and fast."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from e2e.cluster import prereq
from e2e.cluster.layout import Layout, Ports

REPO = Path(__file__).resolve().parents[2]
GOOD = prereq.Facts(
    system="Linux", is_root=True, go="/usr/local/go/bin/go", missing_tools={}, cni_plugins=True, cgroups=True
)


def _with(**changes: object) -> prereq.Facts:
    return prereq.Facts(**{**vars(GOOD), **changes})  # type: ignore[arg-type]


def test_a_ready_machine_has_no_problems() -> None:
    assert prereq.problems(GOOD) == []


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (_with(system="Darwin"), "only on Linux"),
        (_with(is_root=False), "needs root"),
        (_with(go=None), "Go is not installed"),
        (_with(missing_tools={"containerd": "containerd", "ctr": "containerd"}), "apt-get install containerd"),
        (_with(cni_plugins=False), "containernetworking-plugins"),
        (_with(ports_in_use={"apiserver": 6443}), "port 6443 (apiserver) is already in use"),
    ],
)
def test_each_problem_says_what_to_do(facts: prereq.Facts, expected: str) -> None:
    found = prereq.problems(facts)
    assert any(expected in message for message in found), found


def test_unsupported_os_mentions_the_alternatives() -> None:
    (message,) = prereq.problems(_with(system="Windows", is_root=False))
    assert "kind" in message
    assert "--kubeconfig" in message


def test_a_port_in_use_is_found(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache", repo=REPO, ports=Ports(apiserver=port))
        facts = prereq.gather(layout)
    assert facts.ports_in_use.get("apiserver") == port


def _cli_up(
    tmp_path: Path, env: dict[str, str], user: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    full_env = {
        "PATH": os.environ["PATH"],
        "PYTEST_BRIDGE_CLUSTER_STATE": str(tmp_path / "state"),
        "PYTEST_BRIDGE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
        **env,
    }
    started = time.monotonic()
    result = subprocess.run(
        [*(user or []), sys.executable, "-m", "e2e.cluster", "up", "--embedded"],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


def test_cli_refuses_without_go_quickly(tmp_path: Path) -> None:
    result, took = _cli_up(tmp_path, {"PYTEST_BRIDGE_GO": str(tmp_path / "no-such-go")})
    assert result.returncode == 2, result.stderr
    assert "Go is not installed" in result.stderr
    assert took < 30
    assert not (tmp_path / "state").exists(), "nothing is changed before the checks pass"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_cli_refuses_when_not_root(tmp_path: Path) -> None:
    # The checkout and its venv may not be readable by another user (CI clones into a private
    # folder): run a copy of the harness with the system interpreter from a world-readable place.
    import yaml  # noqa: PLC0415

    shared = Path(tempfile.mkdtemp(prefix="prereq-nobody-"))
    try:
        shutil.copytree(REPO / "e2e", shared / "e2e", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(Path(yaml.__file__).parent, shared / "yaml", ignore=shutil.ignore_patterns("*.so"))
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-m", "e2e.cluster", "up",
             "--embedded"],
            cwd=shared, capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(shared),
                 "PYTEST_BRIDGE_CLUSTER_STATE": str(shared / "state"), "PYTEST_BRIDGE_CACHE": str(shared / "cache")},
        )  # fmt: skip
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert result.returncode == 2, result.stderr
    assert "needs root" in result.stderr


def test_cli_refuses_a_taken_api_server_port(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        result, _ = _cli_up(tmp_path, {"PYTEST_BRIDGE_APISERVER_PORT": str(port)})
    assert result.returncode == 2, result.stderr
    assert f"port {port} (apiserver) is already in use" in result.stderr
