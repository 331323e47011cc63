"""The cold bring-up is never silent: long harness steps report what they do while they run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from e2e.cluster import gobuild
from e2e.cluster.layout import Layout
from e2e.cluster.progress import elapsed, go_activity, last_line, run_with_progress

# What a slow build writes: module downloads, then package names (go build -v), then nothing.
SLOW_BUILD = (
    "import sys, time\n"
    "for line in ['go: downloading k8s.io/api v0.34.4', 'k8s.io/apimachinery/pkg/util/sets', '# k8s.io/kubelet']:\n"
    "    print(line, flush=True); time.sleep(0.25)\n"
    "time.sleep(0.3)\n"
    "sys.exit(int(sys.argv[1]))\n"
)


def test_go_activity_reads_what_go_build_does() -> None:
    assert go_activity("$ go build\ngo: downloading k8s.io/api v0.34.4\n") == "downloading modules (k8s.io/api v0.34.4)"
    assert go_activity("k8s.io/apiserver/pkg/server\n\n") == "compiling k8s.io/apiserver/pkg/server"
    assert go_activity("# k8s.io/kubernetes/cmd/kubelet\n") == "compiling k8s.io/kubernetes/cmd/kubelet"
    assert go_activity("go: finding module for package x\n") == "finding module for package x"
    assert go_activity("$ /usr/bin/go build -v -o bin/\n") == "starting"
    assert go_activity("") == "starting"
    assert last_line("I: Retrieving Packages\nI: Validating python3\n") == "I: Validating python3"
    assert (elapsed(42.9), elapsed(185)) == ("42s", "3m05s")


def test_a_long_step_reports_while_it_runs(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    lines: list[str] = []
    code = run_with_progress(
        [sys.executable, "-c", SLOW_BUILD, "0"], log=log, what="building kubernetes", report=lines.append,
        activity=go_activity, every=0.2,
    )  # fmt: skip
    assert code == 0
    assert len(lines) >= 3, lines
    assert all(re.match(r"building kubernetes: \ds so far, ", line) for line in lines), lines
    assert any(line.endswith("downloading modules (k8s.io/api v0.34.4)") for line in lines), lines
    assert lines[-1].endswith("compiling k8s.io/kubelet")
    assert log.read_text().splitlines()[0] == "go: downloading k8s.io/api v0.34.4"  # the log keeps everything


def test_a_failed_build_names_its_log_and_reported_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    monkeypatch.setattr(gobuild, "run_with_progress", _fast(run_with_progress))
    with pytest.raises(gobuild.BuildError, match=r"building kubernetes failed \(exit 3\); log .*build.log"):
        gobuild._run_logged(
            [sys.executable, "-c", SLOW_BUILD, "3"], tmp_path, {}, tmp_path / "build.log", "kubernetes",
            report=lines.append,
        )  # fmt: skip
    assert lines and lines[0].startswith("building kubernetes: "), lines


def test_build_all_announces_each_build_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = {"kubernetes"}

    def fake_build_go(layout: Layout, build: gobuild.Build, go: str, log: Path, report: object = None) -> bool:
        assert callable(report)
        if build.name in built:
            report(f"building {build.name} from Go modules (...)")
        return build.name in built

    monkeypatch.setattr(gobuild, "build_go", fake_build_go)
    monkeypatch.setattr(gobuild, "build_pause", lambda layout, log: False)
    lines: list[str] = []
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache", repo=tmp_path)
    gobuild.build_all(layout, "go", tmp_path / "log", lines.append)
    assert lines[0] == "building kubernetes from Go modules (...)"
    assert lines[1].startswith("built kubernetes in ")
    assert len(lines) == 2


def _fast(run: object) -> object:
    def fast(*args: object, **kwargs: object) -> int:
        return run(*args, **{**kwargs, "every": 0.2})  # type: ignore[operator, no-any-return]

    return fast
