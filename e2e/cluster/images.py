"""Images for the embedded cluster, built with no registry and imported into containerd.

Docker Engine (Debian's docker.io; our own daemon instance with its own socket, no
iptables and no bridge, so it leaves nothing on the host network) builds the images; the
``docker`` package drives it. The Python base image comes from debootstrap of Debian with
python3 (``docker import``), unless ``PYTEST_BRIDGE_BASE_IMAGE`` names one to use instead.
Images are saved and imported into containerd's ``k8s.io`` namespace under fixed
``localhost/pytest-bridge/...`` tags, so kubelet (``IfNotPresent``) never pulls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs
from .layout import Layout

__all__ = [
    "AGENT_IMAGE",
    "BASE_IMAGE",
    "COREDNS_IMAGE",
    "PAUSE_IMAGE",
    "SAMPLE_APP_IMAGE",
    "ensure_images",
    "project_images",
]

PREFIX = "localhost/pytest-bridge"
BASE_IMAGE = f"{PREFIX}/python:3.11-bookworm"
PAUSE_IMAGE = f"{PREFIX}/pause:1.0"
COREDNS_IMAGE = f"{PREFIX}/coredns:1.13.1"
AGENT_IMAGE = f"{PREFIX}/agent:0.1.0"
ROUTING_IMAGE = f"{PREFIX}/routing:0.1.0"
SAMPLE_APP_IMAGE = f"{PREFIX}/sample-app:0.1.0"


# What debootstrap puts into the base image. nginx (with its stream module) is for the
# routing image's router; it costs a few MB in the others and saves a second base image.
BASE_PACKAGES = ("python3", "ca-certificates", "nginx-light", "libnginx-mod-stream")
BASE_LABEL = "io.pytest-bridge.base-packages"


@dataclass(frozen=True)
class ImageSpec:
    tag: str
    context: Path  # folder holding a Dockerfile
    base: str = BASE_IMAGE  # passed as build-arg BASE


def project_images(layout: Layout) -> list[ImageSpec]:
    repo = layout.repo
    specs = [
        ImageSpec(AGENT_IMAGE, repo / "agent"),
        ImageSpec(SAMPLE_APP_IMAGE, repo / "fixtures" / "sampleapp"),
        ImageSpec(ROUTING_IMAGE, repo / "routing", base=AGENT_IMAGE),  # runs the agent's API client too
    ]
    return [s for s in specs if (s.context / "Dockerfile").exists()]


def _docker_socket(layout: Layout) -> Path:
    return layout.run / "docker.sock"


def ensure_dockerd(layout: Layout, timeout: float = 60.0) -> Any:
    """Start our dockerd instance if needed and return a connected ``docker.DockerClient``."""
    import docker  # noqa: PLC0415 - only the harness needs it, and only here

    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("dockerd not found: apt-get install docker.io")
    socket = _docker_socket(layout)
    procs.start(
        layout,
        procs.Component(
            "dockerd",
            (
                dockerd,
                f"--host=unix://{socket}",
                f"--data-root={layout.docker_root}",
                f"--exec-root={layout.state / 'docker-exec'}",
                f"--pidfile={layout.run / 'dockerd.pidfile'}",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=overlay2",
            ),
        ),
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not procs.is_running(layout, "dockerd"):
            raise RuntimeError(f"dockerd exited; see {layout.logs / 'dockerd.log'}")
        try:
            client = docker.DockerClient(base_url=f"unix://{socket}", timeout=600)
            client.ping()
            return client
        except Exception as exc:
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"dockerd did not answer within {timeout:.0f}s ({last}); see {layout.logs / 'dockerd.log'}")


def _debian_mirror() -> str:
    """The Debian mirror apt is configured with (so debootstrap uses what this machine reaches)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in match.group(1):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s", text, re.M):
            if "security" not in match.group(1) and "debian" in match.group(1):
                return match.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt sources; set PYTEST_BRIDGE_BASE_IMAGE")


def _has_image(client: Any, tag: str) -> bool:
    import docker  # noqa: PLC0415

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _ensure_base(layout: Layout, client: Any, report: Callable[[str], None]) -> None:
    override = os.environ.get("PYTEST_BRIDGE_BASE_IMAGE")
    if override:
        if not _has_image(client, override):
            client.images.pull(override)
        client.images.get(override).tag(BASE_IMAGE)
        return
    wanted = ",".join(BASE_PACKAGES)
    if _has_image(client, BASE_IMAGE):
        labels = client.images.get(BASE_IMAGE).labels or {}
        if labels.get(BASE_LABEL) == wanted:
            return
        report(f"base image {BASE_IMAGE} has packages {labels.get(BASE_LABEL)!r}, wants {wanted!r}: rebuilding")
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap not found: apt-get install debootstrap")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=layout.cache) as tmp:
        rootfs = Path(tmp) / "rootfs"
        log = layout.logs / "debootstrap.log"
        with log.open("ab") as out:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={wanted}", "bookworm", str(rootfs), _debian_mirror()],
                stdout=out, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed (exit {result.returncode}); see {log}")
        # Slim it: apt lists and caches are not needed at run time.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        repo, tag = BASE_IMAGE.rsplit(":", 1)
        client.api.import_image_from_stream(
            tar.stdout,
            repository=repo,
            tag=tag,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                'CMD ["/usr/bin/python3"]',
                f"LABEL {BASE_LABEL}={wanted}",
            ],
        )
        tar.wait()
    report(f"base image {BASE_IMAGE} built by debootstrap in {time.monotonic() - started:.0f}s")


def _build(client: Any, tag: str, context: Path, buildargs: dict[str, str] | None = None) -> str:
    image, _ = client.images.build(path=str(context), tag=tag, rm=True, buildargs=buildargs or {}, network_mode="none")
    return str(image.id)


def _scratch_image(layout: Layout, client: Any, tag: str, binary: Path, argv: list[str]) -> str:
    with tempfile.TemporaryDirectory(dir=layout.cache) as tmp:
        shutil.copy2(binary, Path(tmp) / binary.name)
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM scratch\nCOPY {binary.name} /{binary.name}\nENTRYPOINT {json.dumps(argv)}\n"
        )
        return _build(client, tag, Path(tmp))


def _ctr(layout: Layout, *args: str, stdin: Any = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ctr", "--address", str(layout.containerd_socket), "-n", "k8s.io", *args],
        stdin=stdin, capture_output=True, check=False,
    )  # fmt: skip


def _import(layout: Layout, client: Any, tag: str, image_id: str) -> bool:
    """Import ``tag`` into containerd unless the same image id is already there."""
    stamps = layout.cache / "imported"
    stamps.mkdir(parents=True, exist_ok=True)
    stamp = stamps / tag.replace("/", "_").replace(":", "_")
    listed = _ctr(layout, "images", "ls", "-q").stdout.decode().split()
    if tag in listed and stamp.exists() and stamp.read_text() == image_id:
        return False
    with tempfile.TemporaryFile(dir=layout.cache) as archive:
        for chunk in client.images.get(tag).save(named=True):
            archive.write(chunk)
        archive.seek(0)
        result = _ctr(layout, "images", "import", "-", stdin=archive)
    if result.returncode != 0:
        raise RuntimeError(f"importing {tag} into containerd failed: {result.stderr.decode().strip()}")
    stamp.write_text(image_id)
    return True


def ensure_images(layout: Layout, report: Callable[[str], None] = print) -> dict[str, str]:
    """Build every image and import it into containerd; return tag → image id."""
    client = ensure_dockerd(layout)
    try:
        _ensure_base(layout, client, report)
        built: dict[str, str] = {
            PAUSE_IMAGE: _scratch_image(layout, client, PAUSE_IMAGE, layout.bin / "pause", ["/pause"]),
            COREDNS_IMAGE: _scratch_image(layout, client, COREDNS_IMAGE, layout.bin / "coredns", ["/coredns"]),
        }
        for spec in project_images(layout):
            built[spec.tag] = _build(client, spec.tag, spec.context, {"BASE": spec.base})
        for tag, image_id in built.items():
            started = time.monotonic()
            if _import(layout, client, tag, image_id):
                report(f"imported {tag} into containerd in {time.monotonic() - started:.1f}s")
        return built
    finally:
        client.close()
