"""``python -m bench.coldstart [--reps N] [--out results.json]``: cold connect, the Python image pulled by the node.

``BridgeSession.connect()`` when the image its in-cluster pods run on (the stock Python image) is
not on the node and kubelet must pull it (``IfNotPresent``), against a warm connect with the image
present. The embedded cluster has no registry and its images are imported, never pulled, so this
brings its own: go-containerregistry's in-memory ``registry`` and ``crane``
(:mod:`e2e.cluster.registry`, shared with the e2e suite), the registry on ``localhost:5000`` (or a
free port) as a child process for the run's length.

The embedded cluster's stand-in for the stock Python image is exported from the harness's dockerd
(``docker save``) and pushed under a new name, ``localhost:<port>/bench/python-cold:<run>-<rep>``;
the stand-in on the node is never touched. Each repetition pushes its own image whose bottom layer
carries one extra file (a salt): containerd skips fetching every layer whose chain id it already
has a snapshot of, and the unsalted layers are exactly those of the imported stand-in, which the
sample app runs on, so an unsalted "cold" pull would fetch the manifest and config only. The
earlier repetitions' images are removed before each one too (``ctr images rm --sync``): the upper
layers (if any) are byte-identical across repetitions, and containerd fetches no blob its content
store has. The registry's request log tells how many layers each pull really fetched; a
repetition that fetched fewer than all is a failure (exit 1; 2 when the run itself failed).

Per repetition: the cold image absent from containerd's ``k8s.io`` namespace, a bridge of
``orders`` in ``bridge-bench-cold`` (the sample app applied there, as ``python -m bench`` does in
``bridge-bench``) with ``agent_image`` set to it, timed; the session's report timeline; kubelet's
``Pulled`` events (``Successfully pulled image ... in Xs``) of the agent pod and of the restore
guard's pod, which runs on the same image and starts pulling first; then the session closed and
the Deployment waited for until it is restored. The plugin's steps of connect() are timed by
wrapping them (:class:`ConnectPhases`). One warm connect with the last image follows.
At the end the registry is stopped and the cold images are removed from containerd.

The same method, with the prebuilt agent image (``--bridge-code=image``) salted the same way next
to the Python image, is part of ``python -m bench.codeship``, which reuses these functions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from e2e.cluster.images import PYTHON, containerd_refs, ensure_dockerd, remove_images
from e2e.cluster.layout import Layout
from e2e.cluster.registry import Registry, crane, ensure_tools
from pytest_bridge.cluster import bundle, restore
from pytest_bridge.core.patch import SESSION_LABEL
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings, NameMappingMode

from . import cluster as kc
from .routes import PhaseRecorder, Timeline

log = logging.getLogger("bench.coldstart")

DEFAULT_NAMESPACE = "bridge-bench-cold"
SERVICE = "orders"
REGISTRY_PORT = 5000
COLD_REPO = "bench/python-cold"
AGENT_COLD_REPO = "bench/agent-cold"  # the prebuilt agent image, salted the same way (python -m bench.codeship)
SALT_FILE = ".pytest-bridge-bench-cold"
# A cold image ref in containerd, on any port of this machine's registry.
COLD_REF = re.compile(rf"^(?:localhost|127\.0\.0\.1):\d+/(?:{re.escape(COLD_REPO)}|{re.escape(AGENT_COLD_REPO)})[:@]")
_PULLED = re.compile(
    r'Successfully pulled image "(?P<image>[^"]+)" in (?P<took>\S+) \((?P<waiting>\S+) including waiting\)'
    r"(?:\. Image size: (?P<size>\d+) bytes)?"
)
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go duration as kubelet prints it (``850ms``, ``2.31s``, ``1m4.2s``)."""
    return sum(float(n) * _GO_UNITS[unit] for n, unit in _GO_DURATION.findall(text))


# ----------------------------------------------------------------------------- the cold images


@dataclass
class SavedImage:
    """An image as ``docker save`` wrote it: config and layer tarballs (uncompressed) in a folder."""

    config: dict[str, Any]
    layers: list[Path]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.layers)


def save_image(layout: Layout, workdir: Path, name: str = PYTHON.name) -> SavedImage:
    """``docker save`` an image of the harness's dockerd (by default the stand-in for the stock Python
    image) and unpack what a push needs into a new folder of ``workdir``."""
    client = ensure_dockerd(layout)
    archive = workdir / "image-save.tar"
    try:
        with archive.open("wb") as out:
            for chunk in client.images.get(name).save(named=True):
                out.write(chunk)
    finally:
        client.close()
    folder = Path(tempfile.mkdtemp(prefix="saved-", dir=workdir))
    with tarfile.open(archive) as tar:
        manifest = json.load(_member(tar, "manifest.json"))[0]
        config = json.load(_member(tar, manifest["Config"]))
        layers = []
        for n, member in enumerate(manifest["Layers"]):
            path = folder / f"layer{n}.tar"
            with path.open("wb") as out:
                shutil.copyfileobj(_member(tar, member), out, 1 << 20)
            layers.append(path)
    archive.unlink()
    if len(layers) != len(config["rootfs"]["diff_ids"]):
        raise RuntimeError(f"docker save of {name}: {len(layers)} layers but {config['rootfs']['diff_ids']}")
    return SavedImage(config, layers)


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tar.extractfile(name)
    if f is None:
        raise RuntimeError(f"docker save output has no file {name!r}")
    return f


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def salted_tarball(saved: SavedImage, salt: str, ref: str, workdir: Path) -> Path:
    """A docker-save tarball of the image whose bottom layer has one more file (new chain ids throughout)."""
    layer0 = workdir / "layer0-salted.tar"
    shutil.copyfile(saved.layers[0], layer0)
    with tarfile.open(layer0, "a") as tar:  # appends after the last member, before the end blocks
        data = f"{salt}\n".encode()
        info = tarfile.TarInfo(SALT_FILE)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
    config = json.loads(json.dumps(saved.config))
    config["rootfs"]["diff_ids"][0] = _sha256(layer0)
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config))
    layers = [layer0, *saved.layers[1:]]
    manifest = [{"Config": "config.json", "RepoTags": [ref], "Layers": [f"layer{n}.tar" for n in range(len(layers))]}]
    out = workdir / "cold.tar"
    with tarfile.open(out, "w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(config_path, arcname="config.json")
        for n, path in enumerate(layers):
            tar.add(path, arcname=f"layer{n}.tar")
    layer0.unlink()
    return out


@dataclass
class Pushed:
    ref: str
    digest: str  # the manifest's
    config_digest: str
    layers: list[str]  # compressed layer digests, as pulled
    compressed_size: int  # layers + config, what a pull downloads
    push_s: float


def push(tools: dict[str, Path], tarball: Path, ref: str) -> Pushed:
    started = time.monotonic()
    crane(tools, "push", str(tarball), ref)
    took = time.monotonic() - started
    manifest = json.loads(crane(tools, "manifest", ref))
    layers = [layer["digest"] for layer in manifest["layers"]]
    size = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    digest = crane(tools, "digest", ref).strip()
    return Pushed(ref, digest, manifest["config"]["digest"], layers, size, took)


# ----------------------------------------------------------------------------- containerd


def remove_cold_images(layout: Layout) -> list[str]:
    """Remove every cold image (any run's) and the ``sha256:<id>`` refs CRI added for them; nothing else."""
    doomed = remove_images(layout, lambda ref: bool(COLD_REF.match(ref)))
    if PYTHON.ref in doomed:  # never: it is not a cold ref
        raise AssertionError(f"removed {PYTHON.ref}")
    return doomed


def remove_settled(layout: Layout, doomed: Callable[[str], bool], settle_s: float) -> list[str]:
    """Remove the images ``doomed`` accepts, then any that show up within ``settle_s`` of the last removal.

    Interrupted mid-pull, kubelet's pull goes on without the pod; one already unpacking stores the
    image a moment later. Call it after the registry has stopped, so no new pull can succeed.
    """
    removed = remove_images(layout, doomed)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_s:
        time.sleep(0.5)
        if late := remove_images(layout, doomed):
            removed += late
            quiet_since = time.monotonic()
    return removed


# ----------------------------------------------------------------------------- one connect


def _pulled_events(cluster: kc.Cluster, image: str, since: float) -> list[dict[str, Any]]:
    """Kubelet's ``Pulled`` events for ``image`` in the namespace, newer than ``since`` (epoch seconds)."""
    events: Any = cluster.core.list_namespaced_event(cluster.namespace, field_selector="reason=Pulled")
    found = []
    for event in events.items:
        message = event.message or ""
        if f'"{image}"' not in message:
            continue
        when = event.last_timestamp or event.event_time or event.first_timestamp
        if when is not None and when.timestamp() < since - 1:  # whole seconds
            continue
        entry: dict[str, Any] = {"pod": event.involved_object.name, "message": message}
        match = _PULLED.search(message)
        if match:
            entry["pull_s"] = go_duration(match["took"])
            entry["pull_including_waiting_s"] = go_duration(match["waiting"])
            if match["size"]:
                entry["image_size"] = int(match["size"])
        found.append(entry)
    return found


class ConnectPhases(PhaseRecorder):
    """The plugin's steps of ``connect()`` (and the tunnel stop of ``close()``), timed by wrapping them
    in this process (nothing in the plugin changes; :class:`bench.routes.PhaseRecorder` for routes)."""

    WRAPPED = (
        (BridgeSession, "_plan", "plan: the Service, its pods and owners"),
        (BridgeSession, "_preflight", "permission checks"),
        (BridgeSession, "_check_policy", "admission dry run (agent and guard pods)"),
        (restore, "create_guard", "guard: Job, RBAC, code ConfigMap, secrets, armed"),
        (bundle, "ship", "create the code ConfigMap"),
        (BridgeSession, "_wait_for_agent", "agent pod Ready (pull + start)"),
        (BridgeSession, "_wait_for_endpoints", "endpoints = agent only"),
        (BridgeSession, "_open_tunnel", "open the tunnel"),
        (BridgeSession, "_prove_routed", "canaries through the Service"),
        (BridgeSession, "_map_names", "map names"),
    )
    KUBE_CALLS = ("swap Deployment",)  # the workload patch


# In the order connect() runs them (the recorder adds "import env and files").
PHASES = (
    "plan: the Service, its pods and owners",
    "permission checks",
    "admission dry run (agent and guard pods)",
    "guard: Job, RBAC, code ConfigMap, secrets, armed",
    "create the code ConfigMap",
    "swap Deployment",
    "agent pod Ready (pull + start)",
    "endpoints = agent only",
    "open the tunnel",
    "canaries through the Service",
    "import env and files",
    "map names",
)
AGENT_READY = "agent pod Ready (pull + start)"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (then raise KeyboardInterrupt)."""
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}")


def _uninterruptible_close(session: BridgeSession) -> None:
    """A signal during ``close()`` (connect() calls it too when it fails) must not leave the workload swapped."""
    original = session.close

    def close() -> None:
        with _signals_deferred():
            original()

    session.close = close  # type: ignore[method-assign]


def _spans(events: list[tuple[str, float, float]], started: float) -> dict[str, tuple[float, float]]:
    """label -> (first start, last end), seconds from ``started``."""
    spans: dict[str, tuple[float, float]] = {}
    for label, a, b in events:
        first = spans.get(label, (a - started, b - started))
        spans[label] = (round(min(first[0], a - started), 3), round(max(first[1], b - started), 3))
    return spans


def pod_marks(timeline: Timeline, session: str, started: float) -> dict[str, dict[str, float]]:
    """The session's agent and guard pods as the watch saw them: seen, scheduled, running, ready (from ``started``)."""
    out: dict[str, dict[str, float]] = {}
    for name, marks in list(timeline.pods.items()):
        labels = timeline.pod_labels.get(name, {})
        if labels.get(SESSION_LABEL) != session:
            continue
        role = labels.get(restore.ROLE_LABEL) or "agent"
        out[f"{role} pod"] = {k: round(v - started, 3) for k, v in marks.items() if k != "deleted"}
    return out


def connect_once(
    cluster: kc.Cluster, settings: BridgeSettings, *, events_wait: float, timeline: Timeline | None = None
) -> dict[str, Any]:
    """One connect/close cycle of ``orders`` with ``settings``; the Deployment restored after.

    ``events_wait``: how long to wait for kubelet's ``Pulled`` event of the agent pod (0: look once).
    ``timeline``: a pod watch on the session label (:func:`pod_marks`), or None.
    """
    settle = kc.wait_settled(cluster, SERVICE)
    marks: list[tuple[float, str]] = []
    session = BridgeSession(settings, report=lambda line: marks.append((time.monotonic(), line)))
    _uninterruptible_close(session)
    wall = time.time()
    agent_pod = ""
    with ConnectPhases() as recorder:
        started = time.monotonic()
        try:
            services = session.connect()
            connected = time.monotonic()
            agent_pod = services[SERVICE].agent_pod
        finally:
            closing = time.monotonic()
            session.close()
            closed = time.monotonic()
    restored = kc.wait_settled(cluster, SERVICE)
    sample: dict[str, Any] = {
        "connect_s": connected - started,
        "disconnect_s": closed - closing,
        "restored_s": closed - closing + restored,
        "waited_before_s": settle,
        "agent_pod": agent_pod,
        "session_timings": {k: round(v, 3) for k, v in session.timings.items()},
        "timeline": [(round(at - started, 3), line) for at, line in marks],
        "phases": _spans(recorder.between(started, connected), started),
        "close_phases": _spans(recorder.between(closing, closed), closing),
    }
    if timeline is not None:
        sample["pods"] = pod_marks(timeline, session.session_id, started)
    wait = sample["phases"].get(AGENT_READY)
    if wait:  # the plugin saw the pod Ready (it polls every 0.25 s)
        sample["agent_ready_polled_s"] = wait[1]
    for at, line in marks:
        if re.search(r"agent pod \S+ ready in", line):  # after the endpoints wait too (python -m bench's figure)
            sample["agent_pod_ready_s"] = at - started
            break
    # The events are recorded asynchronously; they outlive the pods.
    deadline = time.monotonic() + events_wait
    while True:
        events = _pulled_events(cluster, settings.agent_image, wall)
        if any(e["pod"] == agent_pod for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    sample["pulled_events"] = events
    for event in events:
        if "pull_s" in event:
            key = "agent_pull" if event["pod"] == agent_pod else "guard_pull"
            sample.setdefault(f"{key}_s", event["pull_s"])
            sample.setdefault(f"{key}_including_waiting_s", event["pull_including_waiting_s"])
            if "image_size" in event:
                sample.setdefault("kubelet_image_size", event["image_size"])
    return sample


# ----------------------------------------------------------------------------- report


def _median(samples: list[dict[str, Any]], key: str) -> float:
    values = [s[key] for s in samples if isinstance(s.get(key), float | int)]
    return statistics.median(values) if values else float("nan")


def _s(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float | int) else "-"


def render(results: dict[str, Any]) -> str:
    cold: list[dict[str, Any]] = results.get("cold", [])
    warm: dict[str, Any] = results.get("warm") or {}
    image = results.get("image", {})
    lines = [
        f"### Cold connect ({results.get('namespace')}, service {SERVICE})",
        "",
        "| rep | cold connect s | agent pod Ready s | session reports ready s | image pull s (agent pod) "
        "| image pull s (guard pod) | layers fetched | warm connect s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, sample in enumerate(cold, 1):
        lines.append(
            f"| {n} | {_s(sample.get('connect_s'))} | {_s(sample.get('agent_ready_polled_s'))} "
            f"| {_s(sample.get('agent_pod_ready_s'))} "
            f"| {_s(sample.get('agent_pull_s'))} | {_s(sample.get('guard_pull_s'))} "
            f"| {sample.get('layers_fetched', '?')}/{sample.get('layers', '?')} "
            f"| {_s(warm.get('connect_s')) if n == 1 else ''} |"
        )
    if cold:
        lines.append(
            f"| **median** | **{_s(_median(cold, 'connect_s'))}** | **{_s(_median(cold, 'agent_ready_polled_s'))}** "
            f"| **{_s(_median(cold, 'agent_pod_ready_s'))}** "
            f"| **{_s(_median(cold, 'agent_pull_s'))}** | **{_s(_median(cold, 'guard_pull_s'))}** | "
            f"| **{_s(warm.get('connect_s'))}** |"
        )
    lines += [
        "",
        "Seconds from the start of connect(). agent pod Ready: the plugin's poll saw it Ready; session reports "
        "ready: its report line, after the Service's endpoints are the agent only (python -m bench's figure). "
        "Image pull: kubelet's Pulled event; the restore guard's pod runs on the same image and pulls it at "
        "the same time.",
        "",
    ]
    if warm:
        lines.append(
            f"Warm connect (same image, present on the node): connect {_s(warm.get('connect_s'))} s, "
            f"agent pod Ready at {_s(warm.get('agent_ready_polled_s'))} s "
            f"(session reports it at {_s(warm.get('agent_pod_ready_s'))} s), "
            f"{warm.get('layers_fetched', '?')} blobs fetched from the registry."
        )
    if "compressed_bytes" in image:
        mib = 2**20
        lines.append(
            f"Image: {image['layers']} layers, {image['uncompressed_bytes'] / mib:.1f} MiB uncompressed, "
            f"{image['compressed_bytes'] / mib:.1f} MiB as pulled (gzip, crane push); "
            f"kubelet's image size {image.get('kubelet_image_size', '?')} bytes; "
            f"push {_s(image.get('push_s_median'))} s (median, not part of the connect)."
        )
    if cold and warm:
        lines += ["", "| connect() step | cold s (median) | warm s |", "| --- | ---: | ---: |"]
        for label in PHASES:
            spans = [s["phases"][label][1] - s["phases"][label][0] for s in cold if label in s.get("phases", {})]
            span = warm.get("phases", {}).get(label)
            lines.append(
                f"| {label} | {_s(statistics.median(spans) if spans else None)} | {_s(span[1] - span[0] if span else None)} |"
            )
    for failure in results.get("failures", []):
        lines.append(f"FAILURE: {failure}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _settings(namespace: str, kubeconfig: str, image: str) -> BridgeSettings:
    return BridgeSettings(
        services=(SERVICE,),
        namespace=namespace,
        kubeconfig=Path(kubeconfig),
        name_mapping=NameMappingMode.IN_PROCESS,  # never the system hosts file from a benchmark
        connect_timeout=180.0,
        transport=os.environ.get("PYTEST_BRIDGE_TRANSPORT", "auto"),
        agent_image=image,
    )


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    layout = Layout.default()
    tools = ensure_tools()
    cluster = kc.load(args.kubeconfig, args.namespace, args.kubectl)
    run_id = secrets.token_hex(3)
    stack = contextlib.ExitStack()
    with stack:
        stack.callback(cluster.api.close)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-coldstart-", dir=layout.cache)))
        finished = False

        def cleanup_images() -> None:
            removed = remove_settled(layout, lambda ref: bool(COLD_REF.match(ref)), 0 if finished else 5)
            log.info("removed from containerd: %s", ", ".join(removed) or "nothing")

        # Last in, first out: the registry stops first, so a pull still running for an interrupted
        # connect fails instead of storing the image after it was removed.
        stack.callback(cleanup_images)
        registry = Registry(tools["registry"], workdir, args.port)
        stack.callback(registry.stop)
        log.info("registry on %s (pid %d); run %s", registry.host, registry.process.pid, run_id)
        leftovers = remove_cold_images(layout)
        if leftovers:
            log.info("removed cold images of earlier runs: %s", ", ".join(leftovers))
        log.info("sample app in namespace %s: applying and waiting until Available", args.namespace)
        results["sample_app_ready_s"] = round(kc.ensure_sample_app(cluster), 2)
        saved = save_image(layout, workdir)
        results["image"] = {
            "source": PYTHON.ref,
            "layers": len(saved.layers),
            "uncompressed_bytes": saved.size,
        }
        pushes: list[Pushed] = []
        ref = ""
        for rep in range(1, args.reps + 1):
            ref = f"{registry.host}/{COLD_REPO}:{run_id}-{rep}"
            pushed = push(tools, salted_tarball(saved, f"{run_id}-{rep}", ref, workdir), ref)
            (workdir / "cold.tar").unlink()
            pushes.append(pushed)
            # The earlier reps' images too: their small upper layers are byte-identical to this one's, and
            # containerd fetches no blob its content store has (the salt only makes every snapshot new).
            remove_cold_images(layout)
            if ref in containerd_refs(layout):
                raise RuntimeError(f"{ref} is still in containerd")
            log.info("rep %d/%d: %s pushed in %.1fs; connecting (cold)", rep, args.reps, ref, pushed.push_s)
            mark = registry.mark()
            sample = connect_once(cluster, _settings(args.namespace, args.kubeconfig, ref), events_wait=20)
            sample.update(
                image=ref,
                layers=len(pushed.layers),
                layers_fetched=registry.blobs_fetched(mark, COLD_REPO, pushed.layers),
            )
            results["cold"].append(sample)
            log.info(
                "rep %d: connect %.2fs, agent pod Ready at %ss, pull %ss (agent pod) %ss (guard), %d/%d layers fetched",
                rep, sample["connect_s"], _s(sample.get("agent_ready_polled_s")), _s(sample.get("agent_pull_s")),
                _s(sample.get("guard_pull_s")), sample["layers_fetched"], sample["layers"],
            )  # fmt: skip
            if sample["layers_fetched"] != sample["layers"]:
                results["failures"].append(
                    f"rep {rep}: only {sample['layers_fetched']}/{sample['layers']} layers were fetched: not cold"
                )
        results["image"].update(
            compressed_bytes=pushes[-1].compressed_size,
            push_s_median=statistics.median(p.push_s for p in pushes),
            kubelet_image_size=next(
                (s["kubelet_image_size"] for s in results["cold"] if "kubelet_image_size" in s), None
            ),
        )
        log.info("warm connect with %s (present on the node)", ref)
        mark = registry.mark()
        warm = connect_once(cluster, _settings(args.namespace, args.kubeconfig, ref), events_wait=5)
        warm.update(image=ref, layers_fetched=registry.blobs_fetched(mark, COLD_REPO, pushes[-1].layers))
        results["warm"] = warm
        finished = True
        log.info("warm: connect %.2fs, agent pod Ready at %ss", warm["connect_s"], _s(warm.get("agent_ready_polled_s")))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=3, help="cold connects, each with a freshly pushed image")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--port", type=int, default=REGISTRY_PORT, help="registry port (a free one if taken)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    parser.add_argument("--kubectl", default=kc.default_kubectl())
    args = parser.parse_args(argv)
    if args.namespace in ("bridge-demo", "bridge-bench"):
        parser.error(f"{args.namespace} is used by the e2e suites or python -m bench; pick another --namespace")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if not args.kubeconfig:
        parser.error("no cluster: set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    kc.start_run("coldstart", args.kubectl)  # SIGTERM: the sessions, the registry and the cold images are cleaned up
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.coldstart", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "namespace": args.namespace,
        "reps": args.reps,
        "cold": [],
        "warm": None,
        "failures": [],
    }
    started = time.monotonic()
    status = 0
    try:
        run(args, results)
    except KeyboardInterrupt:
        results["failures"].append("interrupted")
        status = 2
    except Exception as exc:
        log.exception("the benchmark could not run")
        results["failures"].append(f"the benchmark could not run: {type(exc).__name__}: {exc}")
        status = 2
    results["duration_s"] = round(time.monotonic() - started, 1)
    if status == 0 and results["failures"]:
        status = 1
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
