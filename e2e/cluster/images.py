"""Images for the embedded cluster, built with no registry and imported into containerd.

The cluster runs two stock public images, ``python:3.11.13-slim-bookworm`` and
``nginx:1.28.0``. No registry is reachable here, so the node gets *stand-ins* under those very
names: Debian bookworm root filesystems made by debootstrap (Debian's python3 3.11, and
nginx-light with its stream module), shaped and configured like the official images wherever
a pod can tell (:data:`PYTHON` and :data:`NGINX`; README says what still differs). Next to them
only the cluster's own infrastructure, pause and CoreDNS, under ``localhost/embedded-cluster/``.
No image on the node is the project's own.

Docker Engine (Debian's docker.io; our own daemon instance with its own socket, no iptables
and no bridge, so it leaves nothing on the host network) builds the images; the ``docker``
package drives it. Images are saved and imported into containerd's ``k8s.io`` namespace under
the names kubelet resolves (``docker.io/library/python:...``), so kubelet (``IfNotPresent``)
never pulls. Each stand-in is labelled with the hash of its recipe: debootstrap runs again only
when that changes. Images of earlier versions of the harness (every name containing
``pytest-bridge``) are removed, so a used machine converges to the state of a fresh one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs
from .layout import Layout
from .progress import run_with_progress

__all__ = [
    "COREDNS_IMAGE",
    "NGINX",
    "OBSOLETE_MARK",
    "PAUSE_IMAGE",
    "PYTHON",
    "STAND_INS",
    "StandIn",
    "containerd_refs",
    "ensure_dockerd",
    "ensure_images",
    "node_images",
    "normalized",
    "remove_images",
]

INFRA_PREFIX = "localhost/embedded-cluster"
PAUSE_IMAGE = f"{INFRA_PREFIX}/pause:1.0"
COREDNS_IMAGE = f"{INFRA_PREFIX}/coredns:1.13.1"
# Earlier versions of the harness (and of bench.coldstart) named their images after the project.
OBSOLETE_MARK = "pytest-bridge"
RECIPE_LABEL = "io.embedded-cluster.stand-in-recipe"
STAND_IN_LABEL = "io.embedded-cluster.stand-in-for"


def normalized(name: str) -> str:
    """``name`` as containerd and kubelet store it: Docker Hub's host and ``library/`` made explicit."""
    first, _, rest = name.partition("/")
    if not rest:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    if ":" not in name.rsplit("/", 1)[1] and "@" not in name:
        name += ":latest"
    return name


@dataclass(frozen=True)
class StandIn:
    """A local stand-in for a stock public image: Debian packages by debootstrap, shaped like the original."""

    name: str  # as a pod spec writes it
    packages: tuple[str, ...]  # debootstrap --include, on top of --variant=minbase
    config: tuple[str, ...]  # Dockerfile instructions that make the image config (no layers)
    shape: Callable[[Path], None]  # makes the root filesystem look like the original's

    @property
    def ref(self) -> str:
        """The name on the node (``docker.io/library/...``)."""
        return normalized(self.name)

    def recipe(self) -> str:
        """Hash of everything the image is made from but the Debian archive: a change rebuilds it."""
        parts = [self.name, *self.packages, *self.config, inspect.getsource(self.shape), inspect.getsource(_slim)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _slim(root: Path) -> None:
    """What the official (slim) images do not carry either, and what debootstrap took from this host."""
    for junk in (
        "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
        "usr/share/locale", "usr/share/lintian",
    ):  # fmt: skip
        shutil.rmtree(root / junk, ignore_errors=True)
    (root / "var/cache/apt").mkdir()
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for log in (root / "var/log").rglob("*"):
        if log.is_file():
            log.unlink()
    # This machine's resolver and host name (the runtime mounts the pod's own over them).
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).unlink(missing_ok=True)


def _shape_python(root: Path) -> None:
    # The official image's interpreter is built from source into /usr/local; Debian's is
    # /usr/bin/python3.11. Link it where the official one is and drop /usr/bin/python3, so a pod
    # that names the interpreter by a path the official image lacks fails here as it would there.
    local = root / "usr/local/bin"
    local.mkdir(parents=True, exist_ok=True)
    for name, target in (("python3.11", "/usr/bin/python3.11"), ("python3", "python3.11"), ("python", "python3")):
        (local / name).symlink_to(target)
    (root / "usr/bin/python3").unlink()


def _shape_nginx(root: Path) -> None:
    # Load the stream module only (the official build has it built in; Debian's nginx-light also
    # enables the echo module, which the official image lacks), and by absolute path: Debian's
    # snippet names it relative to the prefix, which `nginx -p <dir>/` moves.
    enabled = root / "etc/nginx/modules-enabled"
    for snippet in enabled.iterdir():
        snippet.unlink()
    (enabled / "50-mod-stream.conf").write_text("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n")
    # As in the official image: default logs go to the container's output, an nginx user and
    # group 101, an entrypoint that runs the command.
    for name, target in (("access.log", "/dev/stdout"), ("error.log", "/dev/stderr")):
        (root / "var/log/nginx" / name).symlink_to(target)
    for table, line in (
        ("passwd", "nginx:x:101:101:nginx user:/nonexistent:/bin/false"),
        ("shadow", "nginx:!:::::::"),
        ("group", "nginx:x:101:"),
        ("gshadow", "nginx:!::"),
    ):
        with (root / "etc" / table).open("a") as f:
            f.write(line + "\n")
    (root / "docker-entrypoint.d").mkdir()
    entrypoint_script = """#!/bin/sh
# Stand-in for the official image's entrypoint. That one runs the scripts in
# /docker-entrypoint.d (tweaks of the default configuration) when the command is nginx;
# the stand-in has none to run. Either way it ends by running the command.
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
    [ -n "${NGINX_ENTRYPOINT_QUIET_LOGS:-}" ] || echo "$0: No files found in /docker-entrypoint.d/, skipping configuration"
fi
exec "$@"
"""
    entrypoint = root / "docker-entrypoint.sh"
    entrypoint.write_text(entrypoint_script)
    entrypoint.chmod(0o755)


PYTHON = StandIn(
    "python:3.11.13-slim-bookworm",
    packages=("python3", "ca-certificates", "netbase", "tzdata"),
    config=(
        # The official image's environment, verbatim (its PATH names /usr/local/bin twice).
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        "ENV GPG_KEY=A035C8C19219BA821ECEA86B64E628F8D684696D",
        "ENV PYTHON_VERSION=3.11.13",
        "ENV PYTHON_SHA256=8fb5f9fbc7609fa822cb31549884575db7fd9657cbffb89510b5d7975963a83a",
        'CMD ["python3"]',
    ),
    shape=_shape_python,
)
NGINX = StandIn(
    "nginx:1.28.0",
    packages=("nginx-light", "libnginx-mod-stream", "ca-certificates"),
    config=(
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV NGINX_VERSION=1.28.0",
        "ENV NJS_VERSION=0.8.10",
        "ENV NJS_RELEASE=1~bookworm",
        "ENV PKG_RELEASE=1~bookworm",
        "ENV DYNPKG_RELEASE=1~bookworm",
        'ENTRYPOINT ["/docker-entrypoint.sh"]',
        "EXPOSE 80/tcp",
        "STOPSIGNAL SIGQUIT",
        'CMD ["nginx", "-g", "daemon off;"]',
    ),
    shape=_shape_nginx,
)
STAND_INS = (PYTHON, NGINX)


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
    raise RuntimeError("no Debian mirror found in /etc/apt sources")


def _labels(client: Any, tag: str) -> dict[str, str] | None:
    """The labels of image ``tag`` in our dockerd, or None if it has no such image."""
    import docker  # noqa: PLC0415

    try:
        return dict(client.images.get(tag).labels or {})
    except docker.errors.ImageNotFound:
        return None


def _debootstrap(
    layout: Layout, stand_in: StandIn, root: Path, mirror: str, report: Callable[[str], None] = lambda line: None
) -> None:
    log = layout.logs / f"debootstrap-{stand_in.name.split(':')[0]}.log"
    returncode = run_with_progress(
        ["debootstrap", "--variant=minbase", f"--include={','.join(stand_in.packages)}", "bookworm", str(root), mirror],
        log=log, what=f"debootstrap of {stand_in.name}", report=report,
    )  # fmt: skip
    if returncode != 0:
        raise RuntimeError(f"debootstrap for {stand_in.name} failed (exit {returncode}); see {log}")
    _slim(root)
    stand_in.shape(root)


def _import_rootfs(layout: Layout, client: Any, stand_in: StandIn, root: Path) -> None:
    # `docker import --change` knows no STOPSIGNAL: the root filesystem goes in as one untagged
    # layer, and a Dockerfile of metadata only (no new layer) gives it the image config.
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    reply = client.api.import_image_from_stream(tar.stdout)
    if tar.wait() != 0:
        raise RuntimeError(f"tar of the {stand_in.name} root filesystem failed")
    rootfs = re.findall(r"sha256:[0-9a-f]{64}", reply)
    if not rootfs:
        raise RuntimeError(f"docker import of the {stand_in.name} root filesystem said {reply!r}")
    labels = [f"LABEL {RECIPE_LABEL}={stand_in.recipe()}", f"LABEL {STAND_IN_LABEL}={stand_in.ref}"]
    with tempfile.TemporaryDirectory(dir=layout.cache) as tmp:
        (Path(tmp) / "Dockerfile").write_text("\n".join([f"FROM {rootfs[-1]}", *stand_in.config, *labels]) + "\n")
        _build(client, stand_in.name, Path(tmp))


def _ensure_stand_ins(layout: Layout, client: Any, report: Callable[[str], None]) -> None:
    stale = [s for s in STAND_INS if (_labels(client, s.name) or {}).get(RECIPE_LABEL) != s.recipe()]
    if not stale:
        return
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap not found: apt-get install debootstrap")
    mirror = _debian_mirror()
    started = time.monotonic()
    with ExitStack() as stack:
        roots = [Path(stack.enter_context(tempfile.TemporaryDirectory(dir=layout.cache))) / "rootfs" for _ in stale]
        # Side by side: each is mostly waiting for dpkg, and together they take little more than one.
        with ThreadPoolExecutor(len(stale)) as pool:
            report(f"building stand-in images {', '.join(s.name for s in stale)} by debootstrap (about a minute)")
            builds = [
                pool.submit(_debootstrap, layout, s, root, mirror, report) for s, root in zip(stale, roots, strict=True)
            ]
            for build in builds:
                build.result()
        for stand_in, root in zip(stale, roots, strict=True):
            _import_rootfs(layout, client, stand_in, root)
    client.images.prune(filters={"dangling": True})  # the root filesystems of earlier builds
    names = ", ".join(s.name for s in stale)
    report(f"stand-in images {names} built by debootstrap in {time.monotonic() - started:.0f}s")


def _build(client: Any, tag: str, context: Path) -> str:
    image, _ = client.images.build(path=str(context), tag=tag, rm=True, network_mode="none")
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


def containerd_refs(layout: Layout) -> dict[str, str]:
    """ref -> manifest digest of every image in containerd's ``k8s.io`` namespace (``sha256:`` ids included)."""
    done = _ctr(layout, "images", "ls")
    if done.returncode != 0:
        raise RuntimeError(f"ctr images ls failed: {done.stderr.decode().strip()}")
    refs = {}
    for line in done.stdout.decode().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            refs[fields[0]] = fields[2]
    return refs


def node_images(layout: Layout) -> list[str]:
    """The names of the images on the node (what kubelet can run without pulling), sorted; ids left out."""
    return sorted(ref for ref in containerd_refs(layout) if not ref.startswith("sha256:"))


def remove_images(layout: Layout, doomed: Callable[[str], bool]) -> list[str]:
    """Remove from containerd every image whose name ``doomed`` accepts, and the ``sha256:<id>`` refs
    CRI added for them; return what was removed.

    An id ref goes only when its manifest is a doomed image's and no other image's.
    """
    refs = containerd_refs(layout)
    names = {ref for ref in refs if not ref.startswith("sha256:")}
    gone = {ref for ref in names if doomed(ref)}
    kept_digests = {refs[ref] for ref in names - gone}
    ids = {ref for ref, digest in refs.items() if ref.startswith("sha256:") and digest in {refs[g] for g in gone}}
    removed = sorted(gone | {ref for ref in ids if refs[ref] not in kept_digests})
    if removed:
        done = _ctr(layout, "images", "rm", "--sync", *removed)
        if done.returncode != 0:
            raise RuntimeError(f"ctr images rm failed: {done.stderr.decode().strip()}")
    return removed


def _import(layout: Layout, client: Any, tag: str, image_id: str) -> bool:
    """Import ``tag`` into containerd unless the same image id is already there."""
    stamps = layout.cache / "imported"
    stamps.mkdir(parents=True, exist_ok=True)
    ref = normalized(tag)
    stamp = stamps / ref.replace("/", "_").replace(":", "_")
    if ref in containerd_refs(layout) and stamp.exists() and stamp.read_text() == image_id:
        return False
    with tempfile.TemporaryFile(dir=layout.cache) as archive:
        for chunk in client.images.get(tag).save(named=True):
            archive.write(chunk)
        archive.seek(0)
        result = _ctr(layout, "images", "import", "-", stdin=archive)
    if result.returncode != 0:
        raise RuntimeError(f"importing {tag} into containerd failed: {result.stderr.decode().strip()}")
    if ref not in containerd_refs(layout):
        raise RuntimeError(f"{tag} was imported into containerd, but not as {ref}")
    stamp.write_text(image_id)
    return True


def _remove_obsolete(layout: Layout, client: Any, report: Callable[[str], None]) -> None:
    """Images of earlier versions of the harness, from containerd and from our dockerd."""
    removed = remove_images(layout, lambda ref: OBSOLETE_MARK in ref)
    for image in client.images.list():
        for tag in image.tags:
            if OBSOLETE_MARK in tag:
                client.images.remove(tag)
                removed.append(f"{tag} (docker)")
    if removed:
        client.images.prune(filters={"dangling": True})
        report(f"removed images of earlier versions: {', '.join(removed)}")
    for stamp in (layout.cache / "imported").glob(f"*{OBSOLETE_MARK}*"):
        stamp.unlink()


def ensure_images(layout: Layout, report: Callable[[str], None] = print) -> dict[str, str]:
    """Build every image, import it into containerd, remove obsolete ones; return tag -> image id."""
    client = ensure_dockerd(layout)
    try:
        _ensure_stand_ins(layout, client, report)
        built: dict[str, str] = {s.name: str(client.images.get(s.name).id) for s in STAND_INS}
        built[PAUSE_IMAGE] = _scratch_image(layout, client, PAUSE_IMAGE, layout.bin / "pause", ["/pause"])
        built[COREDNS_IMAGE] = _scratch_image(layout, client, COREDNS_IMAGE, layout.bin / "coredns", ["/coredns"])
        for tag, image_id in built.items():
            started = time.monotonic()
            if _import(layout, client, tag, image_id):
                report(f"imported {tag} into containerd in {time.monotonic() - started:.1f}s")
        _remove_obsolete(layout, client, report)
        return built
    finally:
        client.close()
