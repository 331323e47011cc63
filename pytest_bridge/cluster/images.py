"""``pytest-bridge images build|push|load``: prebuilt images for ``--bridge-code=image``.

By default nothing needs an image of its own: the plugin ships its in-cluster code at connect
and runs it on stock images. Clusters that refuse a ConfigMap of code, or pull only from one
registry, run prebuilt images instead:

* the **agent image**: the Python base plus the zipapp of :mod:`pytest_bridge.cluster.bundle` at
  :data:`~pytest_bridge_agent.runtime.CODE_PATH`, tagged ``<prefix>/pytest-bridge-agent:<version>-<code>``;
* the **routing image**: the nginx base, labelled, tagged ``<prefix>/pytest-bridge-routing:<version>``.

A tag changes with the code (its digest is in it) and with a base other than the default (a
short hash of it is appended), so a node never runs a stale image under a current name.

The Dockerfiles are package data (``pytest_bridge/data/*.Dockerfile``, usable by hand); the
build context is a temporary folder holding the Dockerfile and the zipapp. The ``docker``,
``kind`` and ``ctr`` programs are driven as subprocesses (``docker`` honours ``DOCKER_HOST``
and its contexts). Pure parts — tags, argv, the context's files, the settings text — are
separate from :class:`Runner`, which runs them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.resources
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pytest_bridge_agent.runtime import BUNDLE_FILE, DEFAULT_NGINX_IMAGE, DEFAULT_PYTHON_IMAGE

from pytest_bridge.cluster.bundle import Bundle
from pytest_bridge.core.errors import BridgeError

__all__ = [
    "AGENT_REPOSITORY",
    "DEFAULT_PREFIX",
    "ROUTING_REPOSITORY",
    "Image",
    "ImageToolError",
    "Runner",
    "agent_ref",
    "build_argv",
    "dockerfile",
    "kind_load_argv",
    "plan",
    "push_argv",
    "registry_host",
    "routing_ref",
    "run",
    "settings_text",
    "summary",
    "write_context",
]

AGENT_REPOSITORY = "pytest-bridge-agent"
ROUTING_REPOSITORY = "pytest-bridge-routing"
# Local names: never pulled from anywhere by mistake (``localhost`` is a registry host no node has).
DEFAULT_PREFIX = "localhost"
CONTAINERD_NAMESPACE = "k8s.io"  # where kubelet's CRI looks for images
LABEL_VERSION = "io.pytest-bridge.version"
LABEL_CODE = "io.pytest-bridge.code"

_HOST = re.compile(r"^(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9.-]+:\d+|\[[0-9a-fA-F:]+\](?::\d+)?)$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ImageToolError(BridgeError):
    """docker, kind or ctr is missing or failed; the message says what to install or fix."""


# ----------------------------------------------------------------------------- names (pure)


def check_prefix(prefix: str, option: str = "--prefix") -> str:
    """``prefix`` without a trailing slash, or ImageToolError saying what a valid one looks like."""
    cleaned = prefix.strip().rstrip("/")
    parts = cleaned.split("/")
    first_is_host = bool(parts[0]) and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost")
    path = parts[1:] if first_is_host else parts
    valid = bool(cleaned) and "://" not in cleaned and "@" not in cleaned
    valid = valid and (not first_is_host or bool(_HOST.match(parts[0])))
    valid = valid and all(_PATH_COMPONENT.match(part) for part in path)
    if not valid:
        raise ImageToolError(
            f"{option} {prefix!r} is not an image name prefix: a registry host (with a port if needed) and an "
            "optional lowercase path, no scheme and no tag, e.g. localhost:5000/team"
        )
    return cleaned


def registry_host(prefix: str) -> str:
    """The registry a name under ``prefix`` is pushed to (Docker Hub's when the prefix names no host)."""
    first = prefix.split("/", 1)[0]
    if "." in first or ":" in first or first == "localhost":
        return first
    return "docker.io"


def _tag_text(text: str) -> str:
    return _TAG_UNSAFE.sub("-", text)[:80]


def _base_suffix(base: str, default: str) -> str:
    """``-<6 hex>`` naming a non-default base image, so different bases never share a tag."""
    return "" if base == default else "-" + hashlib.sha256(base.encode()).hexdigest()[:6]


def agent_ref(prefix: str, code: Bundle, python_image: str = DEFAULT_PYTHON_IMAGE) -> str:
    """``<prefix>/pytest-bridge-agent:<version>-<code digest>[-<base hash>]``."""
    tag = f"{_tag_text(code.version)}-{code.short}{_base_suffix(python_image, DEFAULT_PYTHON_IMAGE)}"
    return f"{prefix}/{AGENT_REPOSITORY}:{tag}"


def routing_ref(prefix: str, version: str, nginx_image: str = DEFAULT_NGINX_IMAGE) -> str:
    """``<prefix>/pytest-bridge-routing:<version>[-<base hash>]`` (no code in it: only the base and labels)."""
    return f"{prefix}/{ROUTING_REPOSITORY}:{_tag_text(version)}{_base_suffix(nginx_image, DEFAULT_NGINX_IMAGE)}"


# ----------------------------------------------------------------------------- images (pure)


@dataclass(frozen=True)
class Image:
    """One image to build: its name, the packaged Dockerfile, build args and the context's other files."""

    role: str  # "agent" or "routing"
    ref: str
    dockerfile: str  # name under pytest_bridge/data
    build_args: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)


def plan(
    code: Bundle,
    prefix: str,
    *,
    python_image: str = DEFAULT_PYTHON_IMAGE,
    nginx_image: str = DEFAULT_NGINX_IMAGE,
) -> tuple[Image, Image]:
    """The agent and routing images for ``code`` under ``prefix``."""
    agent = Image(
        "agent",
        agent_ref(prefix, code, python_image),
        "agent.Dockerfile",
        {"PYTHON_IMAGE": python_image, "PYTEST_BRIDGE_VERSION": code.version, "PYTEST_BRIDGE_CODE": code.digest},
        {BUNDLE_FILE: code.data},
    )
    routing = Image(
        "routing",
        routing_ref(prefix, code.version, nginx_image),
        "routing.Dockerfile",
        {"NGINX_IMAGE": nginx_image, "PYTEST_BRIDGE_VERSION": code.version},
    )
    return agent, routing


def dockerfile(name: str) -> str:
    """A Dockerfile shipped with the package (``agent.Dockerfile``, ``routing.Dockerfile``)."""
    return importlib.resources.files("pytest_bridge").joinpath("data", name).read_text()


def write_context(image: Image, directory: Path) -> Path:
    """Fill ``directory`` with ``image``'s build context: the Dockerfile and its files, world-readable."""
    (directory / "Dockerfile").write_text(dockerfile(image.dockerfile))
    for name, content in {"Dockerfile": None, **image.files}.items():
        path = directory / name
        if content is not None:
            path.write_bytes(content)
        path.chmod(0o644)  # COPY keeps the mode: readable by the uid a pod runs as
    return directory


def build_argv(docker: str, image: Image, context: Path, *, platform: str | None = None) -> list[str]:
    # No network for RUN: the build only checks the code runs (and a daemon without a bridge
    # network, like the test cluster's, has nothing else to give it).
    argv = [docker, "build", "--network=none", "--tag", image.ref]
    for name, value in image.build_args.items():
        argv += ["--build-arg", f"{name}={value}"]
    if platform:
        argv += ["--platform", platform]
    return [*argv, str(context)]


def push_argv(docker: str, ref: str) -> list[str]:
    return [docker, "push", ref]


def kind_load_argv(kind: str, cluster: str, refs: Sequence[str]) -> list[str]:
    return [kind, "load", "docker-image", "--name", cluster, *refs]


def save_argv(docker: str, refs: Sequence[str]) -> list[str]:
    return [docker, "save", *refs]


def ctr_import_argv(ctr: str, socket: str, namespace: str = CONTAINERD_NAMESPACE) -> list[str]:
    return [ctr, "--address", socket, "--namespace", namespace, "images", "import", "-"]


def settings_text(agent: str, routing: str) -> str:
    """What to give pytest to run on the images: the options, and the same as ini lines."""
    options = ["--bridge-code=image", f"--bridge-agent-image={agent}", f"--bridge-routing-image={routing}"]
    return "\n".join(
        [
            "Run the bridge on these images:",
            f"  pytest {shlex.join(options)}",
            "or in the pytest configuration ([pytest] in pytest.ini or tox.ini; in pyproject.toml's",
            '[tool.pytest.ini_options] quote the values: bridge_code = "image"):',
            "  bridge_code = image",
            f"  bridge_agent_image = {agent}",
            f"  bridge_routing_image = {routing}",
        ]
    )


# ----------------------------------------------------------------------------- running the tools


def _which(program: str, install: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise ImageToolError(f"{program} not found on PATH: {install}")
    return found


DOCKER_INSTALL = (
    "install Docker's command-line client (Debian/Ubuntu: apt-get install docker.io; or Docker Desktop); "
    "it uses the daemon named by DOCKER_HOST or the current docker context"
)
KIND_INSTALL = "install kind (go install sigs.k8s.io/kind@latest, or your package manager)"
CTR_INSTALL = "it comes with containerd (apt-get install containerd): run this on the node, usually as root"


_REFUSED = ("unauthorized", "denied", "authentication required", "no basic auth", "403 forbidden")


def _push_hint(output: str, ref: str) -> str:
    host = registry_host(ref)
    text = output.lower()
    if any(word in text for word in _REFUSED):
        return (
            f"log in to the registry first: `docker login {host}` (and check you may push to {ref.rsplit(':', 1)[0]})"
        )
    if "http response to https client" in text:
        return (
            f"{host} speaks plain HTTP: list it in the Docker daemon's insecure-registries "
            "(registries on localhost are allowed by default)"
        )
    if any(word in text for word in ("connection refused", "no such host", "i/o timeout", "dial tcp")):
        return f"the Docker daemon cannot reach {host}: is the registry up, and reachable from where the daemon runs?"
    return f"check that the registry is up and that you may push to it (`docker login {host}`)"


class Runner:
    """Runs the tools, relaying their output to ``log`` (unless quiet) and keeping its tail for errors.

    ``dry_run`` prints each command instead of running it.
    """

    def __init__(self, *, quiet: bool = False, dry_run: bool = False, log: IO[str] | None = None) -> None:
        self.quiet = quiet
        self.dry_run = dry_run
        self.log = log if log is not None else sys.stderr
        self.timings: dict[str, float] = {}
        self._docker = ""

    def say(self, line: str) -> None:
        print(f"pytest-bridge images: {line}", file=self.log, flush=True)

    def tool(self, program: str, install: str) -> str:
        """``program``'s path; in a dry run its bare name when it is missing."""
        if self.dry_run:
            return shutil.which(program) or program
        return _which(program, install)

    def docker(self) -> str:
        """The docker program, once checked to reach a daemon."""
        if self._docker:
            return self._docker
        docker = self.tool("docker", DOCKER_INSTALL)
        if not self.dry_run:
            done = subprocess.run(
                [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                where = os.environ.get("DOCKER_HOST") or "the current docker context"
                raise ImageToolError(
                    f"docker cannot reach a Docker daemon ({where}): {done.stderr.strip()[-300:]}; start Docker, or "
                    "point DOCKER_HOST at a daemon"
                )
        self._docker = docker
        return docker

    def run(self, argv: Sequence[str], what: str, hint: Callable[[str], str] | None = None) -> str:
        """Run ``argv``; its output (stdout and stderr) goes to the log and is returned."""
        if self.dry_run:
            print(shlex.join(argv), file=self.log)
            return ""
        started = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=400)
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line)
                if not self.quiet:
                    self.log.write(line)
                    self.log.flush()
        output = "".join(tail)
        if process.returncode != 0:
            last = "\n".join(f"  {line}" for line in output.strip().splitlines()[-12:])
            advice = f"\n{hint(output)}" if hint else ""
            raise ImageToolError(f"{what} failed (exit {process.returncode}): {shlex.join(argv)}\n{last}{advice}")
        self.timings[what] = time.monotonic() - started
        self.say(f"{what}: {self.timings[what]:.1f}s")
        return output

    def pipe(self, producer: Sequence[str], consumer: Sequence[str], what: str, hint: str = "") -> None:
        """``producer | consumer``; either failing is an error naming it."""
        if self.dry_run:
            print(f"{shlex.join(producer)} | {shlex.join(consumer)}", file=self.log)
            return
        started = time.monotonic()
        with (
            tempfile.TemporaryFile() as producer_err,
            subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=producer_err) as first,
        ):
            assert first.stdout is not None
            second = subprocess.run(consumer, stdin=first.stdout, capture_output=True, text=True, check=False)
            first.stdout.close()
            first.wait()
            producer_err.seek(0)
            errors = producer_err.read().decode(errors="replace").strip()
        for argv, code, output in ((producer, first.returncode, errors), (consumer, second.returncode, second.stderr)):
            if code != 0:
                advice = f"\n{hint}" if hint and argv is consumer else ""
                raise ImageToolError(
                    f"{what} failed: {shlex.join(argv)} (exit {code}): {output.strip()[-600:]}{advice}"
                )
        if not self.quiet and second.stdout.strip():
            self.log.write(second.stdout)
        self.timings[what] = time.monotonic() - started
        self.say(f"{what}: {self.timings[what]:.1f}s")


@contextmanager
def _context(image: Image, dry_run: bool) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"pytest-bridge-{image.role}-image-") as tmp:
        yield write_context(image, Path(tmp)) if not dry_run else Path(tmp)


def build(runner: Runner, images: Sequence[Image], *, platform: str | None = None) -> None:
    """Build ``images`` with docker (the Dockerfiles are read even in a dry run: they must be installed)."""
    docker = runner.docker()
    for image in images:
        dockerfile(image.dockerfile)
        with _context(image, runner.dry_run) as context:
            runner.run(build_argv(docker, image, context, platform=platform), f"build {image.ref}")


def push(runner: Runner, images: Sequence[Image]) -> None:
    docker = runner.docker()
    for image in images:
        runner.run(push_argv(docker, image.ref), f"push {image.ref}", hint=functools.partial(_push_hint, ref=image.ref))


def load_kind(runner: Runner, images: Sequence[Image], cluster: str) -> None:
    kind = runner.tool("kind", KIND_INSTALL)
    runner.run(
        kind_load_argv(kind, cluster, [image.ref for image in images]),
        f"load into kind cluster {cluster!r}",
        hint=lambda _: f"is there a kind cluster named {cluster!r}? (`kind get clusters`)",
    )


def load_containerd(runner: Runner, images: Sequence[Image], socket: str) -> None:
    docker = runner.docker()
    ctr = runner.tool("ctr", CTR_INSTALL)
    runner.pipe(
        save_argv(docker, [image.ref for image in images]),
        ctr_import_argv(ctr, socket),
        f"import into containerd at {socket}",
        hint=f"is containerd listening on {socket}, and may you use it (usually root only)?",
    )


def run(
    action: str,
    runner: Runner,
    code: Bundle,
    prefix: str,
    *,
    python_image: str = DEFAULT_PYTHON_IMAGE,
    nginx_image: str = DEFAULT_NGINX_IMAGE,
    platform: str | None = None,
    kind_cluster: str | None = None,
    containerd_socket: str | None = None,
) -> tuple[Image, Image]:
    """``build``, ``push`` (build, then push) or ``load`` (build, then into kind or containerd)."""
    images = plan(code, prefix, python_image=python_image, nginx_image=nginx_image)
    if action == "load":  # a missing tool is named before the build, not after it
        runner.tool("kind", KIND_INSTALL) if kind_cluster is not None else runner.tool("ctr", CTR_INSTALL)
    build(runner, images, platform=platform)
    if action == "push":
        push(runner, images)
    elif action == "load":
        if kind_cluster is not None:
            load_kind(runner, images, kind_cluster)
        elif containerd_socket is not None:
            load_containerd(runner, images, containerd_socket)
        else:
            raise ValueError("load needs a kind cluster or a containerd socket")
    elif action != "build":
        raise ValueError(f"unknown action {action!r}")
    return images


def summary(action: str, images: Sequence[Image]) -> str:
    """The closing text: the images, where they are, and the pytest settings that use them."""
    agent, routing = images
    where = {
        "build": "built into the local Docker only: nodes must pull them from a registry "
        "(`pytest-bridge images push --registry REGISTRY/PATH`) or get them loaded "
        "(`pytest-bridge images load --kind` or `--containerd SOCKET`)",
        "push": "pushed: the cluster's nodes must be able to pull from that registry (the plugin's own pods name "
        "no imagePullSecrets)",
        "load": "loaded onto the node(s): pods use them without pulling (imagePullPolicy IfNotPresent)",
    }[action]
    return "\n".join(
        [
            f"agent image:   {agent.ref}",
            f"routing image: {routing.ref}",
            f"({where})",
            settings_text(agent.ref, routing.ref),
        ]
    )
