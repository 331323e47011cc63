"""Build the embedded cluster's binaries from pinned Go modules (and the pause binary), cached.

A build is skipped when its stamp — a hash of the module's files, the Go version and the
flags — matches and every output exists; so a warm ``up`` builds nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .layout import KUBERNETES_VERSION, Layout
from .progress import elapsed, go_activity, run_with_progress

__all__ = ["BUILDS", "Build", "BuildError", "build_all"]


class BuildError(RuntimeError):
    """A build failed; the message names the component and the log to read."""


def _version_ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


@dataclass(frozen=True)
class Build:
    name: str
    module: str  # folder under e2e/cluster/gomod
    packages: tuple[str, ...]
    outputs: tuple[str, ...]
    ldflags: str = "-s -w"
    static: bool = False


BUILDS: tuple[Build, ...] = (
    Build(
        name="kubernetes",
        module="kubernetes",
        packages=tuple(
            f"k8s.io/kubernetes/cmd/{c}"
            for c in (
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
                "kube-proxy",
                "kubectl",
            )
        ),
        outputs=(
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
            "kubectl",
        ),
        ldflags=_version_ldflags(),
    ),
    Build(name="etcd", module="etcd", packages=(".",), outputs=("etcd",)),
    # Static: it runs in a FROM-scratch image inside the cluster.
    Build(name="coredns", module="coredns", packages=(".",), outputs=("coredns",), static=True),
    Build(
        name="crictl",
        module="crictl",
        packages=("sigs.k8s.io/cri-tools/cmd/crictl",),
        outputs=("crictl",),
    ),
)


# What a cold build takes on a 2-core VM (README, "Bring-up times"), for the line that starts it.
_EXPECTED = {"kubernetes": "about 4-5 minutes", "coredns": "about a minute"}


def _go_version(go: str) -> str:
    return subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()


def _stamp(files: list[Path], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()


def _up_to_date(stamp_file: Path, stamp: str, outputs: list[Path]) -> bool:
    return stamp_file.exists() and stamp_file.read_text() == stamp and all(o.exists() for o in outputs)


def _run_logged(
    cmd: list[str], cwd: Path, env: dict[str, str], log: Path, what: str, *, report: Callable[[str], None] | None = None
) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
    # With a report: a line every few seconds (elapsed, what go is doing), so a cold build of several
    # minutes is never silent.
    returncode = run_with_progress(
        cmd, cwd=cwd, env=env, log=log, what=f"building {what}", report=report or (lambda line: None),
        activity=go_activity,
    )  # fmt: skip
    if returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BuildError(f"building {what} failed (exit {returncode}); log {log}:\n" + "\n".join(tail))


def build_go(layout: Layout, build: Build, go: str, log: Path, report: Callable[[str], None] | None = None) -> bool:
    """Build one Go target; return True if it was (re)built, False if it was up to date.

    ``report`` gets a line when the build starts and then every few seconds while it runs."""
    module_dir = layout.repo / "e2e" / "cluster" / "gomod" / build.module
    files = [p for p in module_dir.iterdir() if p.suffix in {".go", ".mod", ".sum"}]
    stamp = _stamp(files, _go_version(go), build.ldflags, str(build.static), *build.packages)
    outputs = [layout.bin / o for o in build.outputs]
    stamp_file = layout.bin / f".stamp-{build.name}"
    if _up_to_date(stamp_file, stamp, outputs):
        return False
    layout.bin.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-mod=readonly")
    if build.static:
        env["CGO_ENABLED"] = "0"
    target = ["-o", str(outputs[0])] if len(build.packages) == 1 else ["-o", str(layout.bin) + "/"]
    # -v: go names each package as it compiles it, which the progress lines show
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", build.ldflags, *target, *build.packages]
    if report is not None:
        report(f"building {build.name} from Go modules ({_EXPECTED.get(build.name, 'under a minute')} cold; log {log})")
    _run_logged(cmd, module_dir, env, log, build.name, report=report)
    stamp_file.write_text(stamp)
    return True


def build_pause(layout: Layout, log: Path) -> bool:
    source = layout.repo / "e2e" / "cluster" / "pause.c"
    output = layout.bin / "pause"
    stamp = _stamp([source])
    stamp_file = layout.bin / ".stamp-pause"
    if _up_to_date(stamp_file, stamp, [output]):
        return False
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler to build the pause binary: apt-get install gcc libc6-dev")
    layout.bin.mkdir(parents=True, exist_ok=True)
    _run_logged(
        [cc, "-static", "-Os", "-s", "-o", str(output), str(source)],
        layout.bin,
        dict(os.environ),
        log,
        "pause",
    )
    stamp_file.write_text(stamp)
    return True


def build_all(layout: Layout, go: str, log: Path, report: Callable[[str], None] = print) -> None:
    for build in BUILDS:
        started = time.monotonic()
        if build_go(layout, build, go, log, report):
            report(f"built {build.name} in {elapsed(time.monotonic() - started)}")
    if build_pause(layout, log):
        report("built pause")
