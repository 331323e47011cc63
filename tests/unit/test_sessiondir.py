"""Session directories: private, owned by a pid, and swept once that process is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytest_bridge.local import sessiondir
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions and pids")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _session_dir(root: Path, name: str, owner: int | None) -> Path:
    path = root / name
    path.mkdir()
    if owner is not None:
        (path / sessiondir.OWNER_FILE).write_text(f"{owner}\n")
        (path / "env").write_text("API_TOKEN=secret\n")
    return path


def test_a_new_session_dir_is_private_and_names_its_owner(tmp_path: Path) -> None:
    path = sessiondir.create("root-abc123", root=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("pytest-bridge-root-abc123-")
    assert path.stat().st_mode & 0o777 == 0o700
    assert (path / sessiondir.OWNER_FILE).read_text().strip() == str(os.getpid())


def test_the_dir_of_a_dead_session_is_swept_and_live_ones_stay(tmp_path: Path) -> None:
    dead = _session_dir(tmp_path, "pytest-bridge-root-0a0a0a-aaaaaaaa", _dead_pid())
    alive = _session_dir(tmp_path, "pytest-bridge-root-0b0b0b-bbbbbbbb", os.getppid())
    mine = _session_dir(tmp_path, "pytest-bridge-root-0c0c0c-cccccccc", os.getpid())
    sessiondir.create("root-abc123", root=tmp_path)  # sweeps first
    assert not dead.exists()
    assert alive.exists() and mine.exists()


def test_only_old_empty_dirs_of_earlier_versions_are_swept(tmp_path: Path) -> None:
    old_empty = _session_dir(tmp_path, "pytest-bridge-root-0d0d0d-dddddddd", None)
    new_empty = _session_dir(tmp_path, "pytest-bridge-root-0e0e0e-eeeeeeee", None)
    old_full = _session_dir(tmp_path, "pytest-bridge-root-0f0f0f-ffffffff", None)
    (old_full / "env").write_text("X=1\n")
    long_ago = time.time() - 2 * sessiondir.LEGACY_GRACE_S
    for path in (old_empty, old_full):
        os.utime(path, (long_ago, long_ago))
    assert sessiondir.sweep(tmp_path) == [old_empty]
    assert new_empty.exists() and old_full.exists()


def test_other_names_and_files_are_never_touched(tmp_path: Path) -> None:
    other = _session_dir(tmp_path, "pytest-bridge-bench-results", _dead_pid())
    plain = tmp_path / "pytest-bridge-root-0a0a0a-aaaaaaab"
    plain.write_text("a file, not a session dir")
    sessiondir.sweep(tmp_path)
    assert other.exists() and plain.exists()


def test_a_session_removes_its_directory_on_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with BridgeSession(BridgeSettings()) as session:  # never connected
        assert session.session_dir.parent == tmp_path
        assert (session.session_dir / sessiondir.OWNER_FILE).exists()
    assert not session.session_dir.exists()
