"""The pytest-bridge CLI: arguments and errors (its cluster side runs in e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_bridge.cli import main


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "status" in capsys.readouterr().err


def test_an_unreadable_kubeconfig_is_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config").write_text("not: [a kubeconfig")
    assert main(["--kubeconfig", str(tmp_path / "config"), "status"]) == 2
    assert capsys.readouterr().err.startswith("pytest-bridge: ")
