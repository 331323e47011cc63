"""``python -m e2e.packaging``: the wheel, installed where the repository cannot help, bridges a service.

What a user gets from ``pip install pytest-bridge``, checked the way they would meet it:

1. the wheel is built (``pip wheel --no-deps``) from a copy of the source tree, so the
   checkout gets no ``build/`` or ``*.egg-info`` of its own, and it must hold ``pytest_bridge/py.typed``;
2. a fresh virtualenv in a temporary folder installs it, its dependencies from the package
   index (what was downloaded is kept in a wheelhouse, ``<harness cache>/packaging-wheelhouse``,
   so a rerun needs no download: :class:`Wheelhouse`);
3. from a temporary folder, without ``PYTHONPATH``: ``pytest-bridge --help`` runs,
   ``pytest-bridge rbac`` prints exactly the repository's ``deploy/rbac/bridge-user.yaml``,
   ``pytest-bridge images build --dry-run`` finds its Dockerfiles, the three packages load from
   the virtualenv, nothing of the repository (``e2e``, ``bench``, ``tests``, ``fixtures``) is
   importable, and the development tools (pytest-asyncio, docker) were not installed;
4. a small bridged suite written into that folder runs with
   ``pytest --bridge-service=orders --bridge-namespace=<ns>`` against the cluster in
   ``$KUBECONFIG``: a local HTTP server started through ``bridged_service`` answers a request
   sent to ``frontend`` by its cluster name, with the imported env; exit 0, every test passed,
   and the workload is as before.

The sample app runs in a namespace of its own (``bridge-packaging``; applied when missing and
kept, like the benchmarks' namespaces, so a rerun needs no rollout). Exit 0 when every check
passed, 1 when one failed (it is named), 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("e2e.packaging")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NAMESPACE = "bridge-packaging"
SERVICES = ("frontend", "orders", "inventory")
PACKAGES = ("pytest_bridge", "pytest_bridge_agent", "pytest_bridge_routing")
REPOSITORY_ONLY = ("e2e", "bench", "tests", "fixtures", "demo")
NOT_INSTALLED = ("pytest_asyncio", "docker")  # development tools, not runtime dependencies
TESTS = 3
WHEELHOUSE_DAYS = 7
# Not part of the source a wheel is built from (and large, or someone else's state).
_NOT_COPIED = (".git", ".venv", ".tox", "*.egg-info", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache",
               ".pytest_cache", ".state", ".benchmarks")  # fmt: skip

LOCAL_SERVER = """\
import json, os, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        # The local service reaches the cluster's inventory by its cluster name, as in the pod.
        inventory = json.load(urllib.request.urlopen("http://inventory/api", timeout=10))
        body = json.dumps({
            "service": "orders", "pod": "packaged-local", "greeting": os.environ.get("GREETING"),
            "downstream": [inventory],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

SUITE = """\
import json, sys, urllib.request
from pathlib import Path

from pytest_bridge import BridgeError, IsolatedRoute, LocalService

NAMESPACE = {namespace!r}
SERVER = Path(__file__).with_name("local_server.py")


def test_the_env_of_the_pod_is_imported(bridged_service: LocalService) -> None:
    # the fixture types are public (pytest_bridge.__all__, py.typed)
    assert isinstance(bridged_service, LocalService) and issubclass(IsolatedRoute, LocalService)
    assert issubclass(BridgeError, Exception)
    assert bridged_service.env["GREETING"] == "hello from orders"
    assert bridged_service.env["POD_NAMESPACE"] == NAMESPACE


def test_a_request_to_the_cluster_reaches_the_local_process(bridged_service):
    bridged_service.start([sys.executable, str(SERVER)], env={{"PORT": str(bridged_service.local_port)}})
    reply = json.load(urllib.request.urlopen(f"http://frontend.{{NAMESPACE}}/api", timeout=20))
    orders = reply["downstream"][0]
    assert orders["pod"] == "packaged-local", reply
    assert orders["greeting"] == "hello from orders", orders
    assert orders["downstream"][0]["service"] == "inventory", orders


def test_cluster_names_resolve_in_the_test(bridged_service):
    reply = json.load(urllib.request.urlopen("http://inventory/api", timeout=20))
    assert reply["service"] == "inventory"
"""

CHECK_IMPORTS = """\
import importlib.util, json, sys
packages = {packages!r}
absent = {absent!r}
print(json.dumps({{
    "files": {{name: importlib.util.find_spec(name).origin for name in packages}},
    "importable": [name for name in absent if importlib.util.find_spec(name) is not None],
    "sys_path": sys.path,
}}))
"""


class CheckFailed(Exception):
    """A check of the installed package failed; the message names it."""


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment less what would let the repository or its virtualenv leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    repo_bins = {str(REPO / ".venv" / "bin"), str(Path(sys.executable).parent)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in repo_bins)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def _run(argv: Sequence[str], what: str, *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout}{done.stderr}")
    log.info("%s: %.1fs", what, time.monotonic() - started)
    return done.stdout


class Wheelhouse:
    """Downloaded wheels kept between runs: pip's own HTTP cache cannot be relied on (an index may
    answer ``no-store``), so what the package index gave once is installed with ``--no-index``.

    A step first runs against the wheelhouse alone; if that fails (a new or changed dependency),
    what it needs is downloaded from the index into the wheelhouse and the step runs again. The
    wheelhouse is emptied when older than :data:`WHEELHOUSE_DAYS`, so dependencies do not stay
    stale for ever (``--refresh`` empties it now).
    """

    def __init__(self, folder: Path, refresh: bool = False) -> None:
        self.folder = folder
        stamp = folder / ".created"
        if folder.exists() and (
            refresh or not stamp.exists() or time.time() - stamp.stat().st_mtime > WHEELHOUSE_DAYS * 86400
        ):
            shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            stamp.touch()

    def pip(
        self, args: Sequence[str], what: str, *, needs: Sequence[str], cwd: Path, python: str | None = None
    ) -> None:
        """``pip ARGS`` from the wheelhouse; on failure ``pip download NEEDS`` into it from the index, then again."""
        pip = [sys.executable, "-m", "pip", *(["--python", python] if python else [])]
        offline = [*pip, *args[:1], "--no-index", "--find-links", str(self.folder), *args[1:]]
        env = _clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(self.folder))  # also for build isolation
        try:
            _run(offline, what, cwd=cwd, env=env)
            return
        except CheckFailed as exc:
            log.info("%s: not from the wheelhouse alone (%s); downloading from the package index", what,
                     str(exc).strip().splitlines()[-1][:200])  # fmt: skip
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(self.folder), *needs],
             f"download for: {what}", cwd=cwd, env=_clean_env())  # fmt: skip
        for own in self.folder.glob("pytest_bridge-*"):
            own.unlink()  # the wheel under test is always the one just built
        _run(offline, what, cwd=cwd, env=env)


def build_wheel(workdir: Path, wheelhouse: Wheelhouse) -> Path:
    """``pip wheel --no-deps`` of a copy of the source tree (so the checkout gets no build output)."""
    source = workdir / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    wheels = workdir / "wheels"
    build_requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    wheelhouse.pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)], "build the wheel",
                   needs=build_requires, cwd=workdir)  # fmt: skip
    (wheel,) = wheels.glob("pytest_bridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        if "pytest_bridge/py.typed" not in archive.namelist():
            raise CheckFailed(f"{wheel.name} has no pytest_bridge/py.typed (PEP 561: type checkers ignore the package)")
    return wheel


def install(wheel: Path, venv: Path, workdir: Path, wheelhouse: Wheelhouse) -> None:
    """A fresh virtualenv with the wheel and its dependencies (from the package index, kept in the wheelhouse).

    The virtualenv has no pip of its own: this environment's pip installs into it (``--python``),
    which saves seeding one; ``--no-compile`` leaves bytecode to the first import.
    """
    _run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], "create a virtualenv", cwd=workdir, env=_clean_env()
    )
    python = str(venv / "bin" / "python")
    wheelhouse.pip(["install", "--quiet", "--no-compile", str(wheel)], "install the wheel", needs=[str(wheel)],
                   cwd=workdir, python=python)  # fmt: skip
    _run([sys.executable, "-m", "pip", "--python", python, "check"], "pip check", cwd=workdir, env=_clean_env())


def check_installed(venv: Path, workdir: Path) -> None:
    """The commands, the shipped files, and that only the virtualenv is imported from."""
    env = _clean_env()
    cli = str(venv / "bin" / "pytest-bridge")
    help_text = _run([cli, "--help"], "pytest-bridge --help", cwd=workdir, env=env)
    for command in ("status", "cleanup", "images", "rbac"):
        if command not in help_text:
            raise CheckFailed(f"pytest-bridge --help does not list {command}:\n{help_text}")
    role = _run([cli, "rbac"], "pytest-bridge rbac", cwd=workdir, env=env)
    expected = (REPO / "deploy" / "rbac" / "bridge-user.yaml").read_text()
    if role != expected:
        raise CheckFailed("pytest-bridge rbac does not print deploy/rbac/bridge-user.yaml (is it in the wheel?)")
    settings = _run([cli, "images", "build", "--dry-run"], "pytest-bridge images build --dry-run", cwd=workdir, env=env)
    if "--bridge-code=image --bridge-agent-image=" not in settings:
        raise CheckFailed(f"pytest-bridge images build --dry-run printed no settings:\n{settings}")
    script = CHECK_IMPORTS.format(packages=PACKAGES, absent=REPOSITORY_ONLY + NOT_INSTALLED)
    found = json.loads(_run([str(venv / "bin" / "python"), "-c", script], "imports", cwd=workdir, env=env))
    site = str(venv)
    outside = {name: origin for name, origin in found["files"].items() if not str(origin).startswith(site)}
    if outside:
        raise CheckFailed(f"packages not loaded from the virtualenv {venv}: {outside}")
    if found["importable"]:
        raise CheckFailed(f"importable in the fresh virtualenv but must not be: {found['importable']}")
    leaks = [entry for entry in found["sys_path"] if entry and Path(entry).resolve().is_relative_to(REPO)]
    if leaks:
        raise CheckFailed(f"the repository is on sys.path: {leaks}")


# --- the bridged suite ---------------------------------------------------------------------------


def ensure_sample_app(namespace: str, kubeconfig: str) -> float:
    """The sample app in ``namespace``, applied if needed and Ready; seconds waited."""
    from kubernetes import client, config  # noqa: PLC0415 - the repository's environment, not the checked one

    from e2e.conftest import apply_sample_app, pod_is_ready  # noqa: PLC0415

    started = time.monotonic()
    api = config.new_client_from_config(config_file=kubeconfig)
    try:
        apply_sample_app(api, namespace)
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        deadline = time.monotonic() + 180
        while True:
            pending = []
            for name in SERVICES:
                d: Any = apps.read_namespaced_deployment(name, namespace)
                pods = core.list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/name={name}").items
                wanted = d.spec.replicas if d.spec.replicas is not None else 1
                if not (
                    d.status.observed_generation == d.metadata.generation
                    and (d.status.ready_replicas or 0) == (d.status.updated_replicas or 0) == wanted == len(pods)
                    and all(pod_is_ready(p) for p in pods)
                ):
                    pending.append(name)
            if not pending:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"sample app in {namespace} not Ready after 180s: {', '.join(pending)}")
            time.sleep(0.5)
    finally:
        api.close()


def _orders(namespace: str, kubeconfig: str) -> dict[str, Any]:
    from kubernetes import client, config  # noqa: PLC0415

    from pytest_bridge.core.patch import strip_server_fields  # noqa: PLC0415

    api = config.new_client_from_config(config_file=kubeconfig)
    try:
        deployment = client.AppsV1Api(api).read_namespaced_deployment("orders", namespace)
        return strip_server_fields(api.sanitize_for_serialization(deployment))
    finally:
        api.close()


def run_bridged_suite(venv: Path, workdir: Path, namespace: str, kubeconfig: str) -> str:
    suite = workdir / "suite"
    suite.mkdir()
    (suite / "local_server.py").write_text(LOCAL_SERVER)
    (suite / "test_bridged.py").write_text(SUITE.format(namespace=namespace))
    before = _orders(namespace, kubeconfig)
    done = subprocess.run(
        [str(venv / "bin" / "pytest"), "-p", "no:cacheprovider", "--bridge-service=orders",
         f"--bridge-namespace={namespace}", str(suite)],
        cwd=suite, env=_clean_env(KUBECONFIG=kubeconfig), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    summary = next((line for line in reversed(out.splitlines()) if " in " in line and "=" in line), "")
    if done.returncode != 0 or f"{TESTS} passed" not in summary:
        raise CheckFailed(f"the bridged suite did not pass ({TESTS} tests; exit {done.returncode}):\n{out}")
    if _orders(namespace, kubeconfig) != before:
        raise CheckFailed(f"deployment {namespace}/orders differs from before the bridged suite")
    return summary.strip("= ")


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, float]:
    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    sample_wait = ensure_sample_app(args.namespace, args.kubeconfig)
    timings["sample app"] = round(sample_wait, 1)
    with tempfile.TemporaryDirectory(prefix="pytest-bridge-packaging-") as tmp:
        workdir = Path(tmp)
        if workdir.resolve().is_relative_to(REPO):
            raise RuntimeError(f"the temporary folder {workdir} is inside the repository: set TMPDIR elsewhere")
        wheelhouse = Wheelhouse(args.wheelhouse, refresh=args.refresh)
        step = time.monotonic()
        wheel = build_wheel(workdir, wheelhouse)
        timed("wheel", step)
        step = time.monotonic()
        install(wheel, workdir / "venv", workdir, wheelhouse)
        timed("venv + install", step)
        step = time.monotonic()
        check_installed(workdir / "venv", workdir)
        timed("installed checks", step)
        step = time.monotonic()
        summary = run_bridged_suite(workdir / "venv", workdir, args.namespace, args.kubeconfig)
        timed("bridged suite", step)
        log.info("bridged suite: %s", summary)
    timed("total", started)
    return timings


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from e2e.cluster.layout import Layout  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m e2e.packaging", description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="where the sample app runs (default: %(default)s)"
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    parser.add_argument(
        "--wheelhouse", type=Path, default=Layout.default().cache / "packaging-wheelhouse",
        help="wheels downloaded from the package index, kept between runs (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--refresh", action="store_true", help="empty the wheelhouse first")
    args = parser.parse_args(argv)
    if not args.kubeconfig:
        parser.error("no cluster: set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    if args.namespace == "bridge-demo":
        parser.error("bridge-demo is the e2e suites' namespace; pick another --namespace")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s packaging: %(message)s", datefmt="%H:%M:%S")
    try:
        timings = run(args)
    except CheckFailed as exc:
        print(f"packaging check FAILED: {exc}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("the packaging check could not run")
        return 2
    print("packaging check passed: " + ", ".join(f"{name} {s:.1f}s" for name, s in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
