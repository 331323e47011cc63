"""``python -m bench.codeship``: the code shipped at connect against the prebuilt agent image.

By default (``--bridge-code=configmap``) the plugin ships its in-cluster code, one zipapp, in a
ConfigMap at connect and runs it on the stock Python image; with ``--bridge-code=image`` its pods
run the agent image ``pytest-bridge images push`` built (the Python base plus the zipapp) and no
ConfigMap is created. Both are measured side by side in interleaved rounds (the order flips every
round), so both see the same noise of this shared machine:

- ``warm``: ``BridgeSession.connect()`` of ``orders``, every image on the node (an uncounted
  warm-up connect of each mode comes first; the image mode's one pulls the agent image);
- ``cold``: the same with the image not on the node, pulled by kubelet from the loopback
  registry, by the method of :mod:`bench.coldstart`: each round pushes the image under a new name
  with a salted bottom layer and removes earlier cold images from containerd first, so every
  layer is fetched (the registry's log checks it). The configmap mode pulls the stand-in for the
  stock Python image, the image mode the agent image ``images push`` built (saved from dockerd,
  salted the same way: the same layers plus its own, the zipapp);
- ``route``: per-test routes (``open_route(per_test=True)`` until live, then ``close_route``) beside
  the session's route (``connect()`` with ``isolate=True``, as ``--bridge-isolate`` runs them), in
  blocks of one code delivery each, blocks alternating. A routing manager of the other delivery
  is replaced, so each block waits until the last one's manager is gone; its session route
  (which deploys the manager and the router) is the warm-up, the per-test routes are measured.

For each connect it keeps ``session.timings``, the session's report lines, the plugin's steps
(:class:`bench.coldstart.ConnectPhases`) and the agent's and guard's pods as a watch saw them;
for each route the breakdown of :mod:`bench.routes`.

Everything runs in the namespace ``bridge-bench-code`` (the sample app is applied there; the
namespace is deleted at the end unless ``--keep-namespace``). The registry
(:mod:`e2e.cluster.registry`) lives for the run's length. At the end every session is closed,
the registry stopped, and every image of the run removed from containerd and from the harness's
dockerd (where ``images push`` built them). Exit status: 0, or 1 when a run was not what it
claims (a warm connect pulled, a cold one fetched fewer than all layers, a route failed), or 2
when the benchmark could not run. The target is reported, never a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from e2e.cluster.images import _docker_socket, containerd_refs, ensure_dockerd
from e2e.cluster.layout import Layout
from e2e.cluster.registry import Registry, crane, ensure_tools
from pytest_bridge.cluster import bundle, images
from pytest_bridge.core.patch import SESSION_LABEL
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings

from . import cluster as kc
from .coldstart import (
    AGENT_COLD_REPO,
    COLD_REF,
    COLD_REPO,
    PHASES,
    connect_once,
    push,
    remove_cold_images,
    remove_settled,
    salted_tarball,
    save_image,
)
from .procstat import machine_info
from .profiles import QUICK
from .routes import ROUTED, PhaseRecorder, Routes, Timeline, route_breakdown
from .runner import Bench
from .stats import Summary, summarize

log = logging.getLogger("bench.codeship")

MODES = ("configmap", "image")
STEPS = ("warm", "cold", "route")
DEFAULT_NAMESPACE = "bridge-bench-code"
REGISTRY_PATH = "bench-codeship"  # images push --registry <host>/bench-codeship
OUR_REFS = re.compile(rf"^(?:localhost|127\.0\.0\.1):\d+/{REGISTRY_PATH}/")
COLD_REPOS = {"configmap": COLD_REPO, "image": AGENT_COLD_REPO}
WARM_TARGET_S = 0.5  # the zero-build path may be at most this much slower than the prebuilt image, warm
POD_MARKS = ("seen", "scheduled", "running", "ready")
ROUTE_MARKS = (
    "at: route pod seen", "at: route pod scheduled", "at: route pod running", "at: pod_ready",
    "at: route in the router config", "at: router runs that config", "at: live", "at: total",
)  # fmt: skip


@dataclasses.dataclass
class Lab:
    """The registry on loopback, the images of the image mode, and where the run keeps its files."""

    layout: Layout
    tools: dict[str, Path]
    registry: Registry
    workdir: Path
    agent_image: str = ""
    routing_image: str = ""


def order(n: int) -> tuple[str, ...]:
    """The modes in round ``n`` (0-based): the first goes second in the next round."""
    return MODES if n % 2 == 0 else MODES[::-1]


def mode_changes(lab: Lab, mode: str) -> dict[str, Any]:
    """The settings that select ``mode``: the plugin's defaults, or the prebuilt images."""
    if mode == "configmap":
        return {"code": "configmap"}
    return {"code": "image", "agent_image": lab.agent_image, "routing_image": lab.routing_image}


def connect_settings(bench: Bench, lab: Lab, mode: str, **changes: Any) -> BridgeSettings:
    return dataclasses.replace(bench.settings(), **{**mode_changes(lab, mode), **changes})


# ----------------------------------------------------------------------------- images


def docker_env(layout: Layout) -> dict[str, str]:
    return {**os.environ, "DOCKER_HOST": f"unix://{_docker_socket(layout)}"}


def push_images(lab: Lab) -> dict[str, Any]:
    """``pytest-bridge images push`` to the loopback registry, with the harness's dockerd (FROM its stand-ins)."""
    ensure_dockerd(lab.layout).close()
    prefix = f"{lab.registry.host}/{REGISTRY_PATH}"
    cli = Path(sys.executable).with_name("pytest-bridge")
    argv = [str(cli), "images", "push", "--quiet", "--registry", prefix]
    started = time.monotonic()
    done = subprocess.run(argv, env=docker_env(lab.layout), capture_output=True, text=True, timeout=900, check=False)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"pytest-bridge images push failed (exit {done.returncode}): {done.stderr[-1500:]}")
    found = {
        name: re.search(rf"--bridge-{name}-image=(\S+)", done.stdout) for name in ("agent", "routing")
    }  # fmt: skip
    if not found["agent"] or not found["routing"]:
        raise RuntimeError(f"pytest-bridge images push printed no images: {done.stdout[-800:]}")
    lab.agent_image, lab.routing_image = found["agent"][1], found["routing"][1]
    # The plugin in this process ships what bundle.build() returned first (it is cached): the image
    # must hold the same code, or every image-mode connect is refused by the handshake check.
    code = bundle.build()
    if lab.agent_image != images.agent_ref(prefix, code):
        raise RuntimeError(
            f"images push built {lab.agent_image}, but this process ships code {code.short}: the in-cluster "
            "code changed during the build; run again"
        )
    steps = dict(re.findall(r"pytest-bridge images: (\w+ \S+): ([\d.]+)s", done.stderr))
    return {
        "command": shlex.join(argv[1:]),
        "took_s": round(took, 1),
        "steps_s": {k: float(v) for k, v in steps.items()},
        "agent": _manifest_sizes(lab, lab.agent_image),
        "routing": _manifest_sizes(lab, lab.routing_image),
    }


def _manifest_sizes(lab: Lab, ref: str) -> dict[str, Any]:
    manifest = json.loads(crane(lab.tools, "manifest", ref))
    layers = [layer["size"] for layer in manifest["layers"]]
    return {"layers": len(layers), "compressed_bytes": sum(layers), "layer_bytes": layers}


def remove_our_images(layout: Layout, settle_s: float) -> list[str]:
    """Every image of this benchmark (any run's) from containerd, then the built ones from dockerd."""
    removed = remove_settled(layout, lambda ref: bool(OUR_REFS.match(ref) or COLD_REF.match(ref)), settle_s)
    client = ensure_dockerd(layout)
    try:
        for image in client.images.list():
            for tag in image.tags:
                if OUR_REFS.match(tag):
                    client.images.remove(tag)
                    removed.append(f"{tag} (docker)")
    finally:
        client.close()
    return removed


# ----------------------------------------------------------------------------- the measurements


def _progress_connect(what: str, sample: dict[str, Any]) -> None:
    phases = sample.get("phases", {})
    ship = phases.get("create the code ConfigMap")
    agent = sample.get("pods", {}).get("agent pod", {})
    log.info(
        "%s: connect %.2fs (agent pod Ready seen at %.2fs; pod scheduled %s running %s; ConfigMap %s)",
        what, sample["connect_s"], sample.get("agent_ready_polled_s", float("nan")),
        agent.get("scheduled", "-"), agent.get("running", "-"),
        f"{ship[1] - ship[0]:.3f}s" if ship else "none",
    )  # fmt: skip


def warm(bench: Bench, lab: Lab, rounds: int, results: dict[str, Any]) -> None:
    c = bench.cluster
    out: dict[str, Any] = {"rounds": rounds, "warm_up": {}, "samples": {m: [] for m in MODES}}
    results["warm"] = out
    with Timeline(c, pods=SESSION_LABEL, routing=False) as timeline:
        for mode in MODES:  # not counted: the image mode pulls its image here
            sample = connect_once(
                c, connect_settings(bench, lab, mode), events_wait=10 if mode == "image" else 0, timeline=timeline
            )
            out["warm_up"][mode] = sample
            _progress_connect(f"warm-up {mode}", sample)
        if lab.agent_image not in containerd_refs(lab.layout):
            raise RuntimeError(f"{lab.agent_image} is not on the node after the warm-up connect")
        for n in range(rounds):
            for mode in order(n):
                sample = connect_once(c, connect_settings(bench, lab, mode), events_wait=0, timeline=timeline)
                sample.update(round=n + 1, mode=mode)
                out["samples"][mode].append(sample)
                if any("pull_s" in event for event in sample["pulled_events"]):
                    bench.fail(f"warm {mode} round {n + 1}: kubelet pulled {sample['pulled_events']}")
                _progress_connect(f"warm {n + 1}/{rounds} {mode}", sample)


def cold(bench: Bench, lab: Lab, rounds: int, results: dict[str, Any]) -> None:
    c = bench.cluster
    saved = {
        "configmap": save_image(lab.layout, lab.workdir),
        "image": save_image(lab.layout, lab.workdir, lab.agent_image),
    }
    run_id = secrets.token_hex(3)
    out: dict[str, Any] = {
        "rounds": rounds,
        "images": {
            mode: {"layers": len(s.layers), "uncompressed_bytes": s.size, "layer_bytes": [p.stat().st_size for p in s.layers]}
            for mode, s in saved.items()
        },
        "samples": {m: [] for m in MODES},
    }  # fmt: skip
    results["cold"] = out
    with Timeline(c, pods=SESSION_LABEL, routing=False) as timeline:
        for n in range(rounds):
            for mode in order(n):
                repo = COLD_REPOS[mode]
                ref = f"{lab.registry.host}/{repo}:{run_id}-{n + 1}"
                tarball = salted_tarball(saved[mode], f"{run_id}-{mode}-{n + 1}", ref, lab.workdir)
                pushed = push(lab.tools, tarball, ref)
                tarball.unlink()
                # Every earlier cold image, the other mode's too: their upper layers are the same
                # blobs, and containerd fetches no blob its content store has.
                remove_cold_images(lab.layout)
                if ref in containerd_refs(lab.layout):
                    raise RuntimeError(f"{ref} is still in containerd")
                mark = lab.registry.mark()
                settings = connect_settings(bench, lab, mode, agent_image=ref, connect_timeout=180.0)
                sample = connect_once(c, settings, events_wait=20, timeline=timeline)
                sample.update(
                    round=n + 1, mode=mode, image=ref, layers=len(pushed.layers),
                    layers_fetched=lab.registry.blobs_fetched(mark, repo, pushed.layers),
                    compressed_bytes=pushed.compressed_size, push_s=round(pushed.push_s, 2),
                )  # fmt: skip
                out["samples"][mode].append(sample)
                log.info(
                    "cold %d/%d %s: connect %.2fs, pull %ss (agent pod) %ss (guard), %d/%d layers fetched",
                    n + 1, rounds, mode, sample["connect_s"], sample.get("agent_pull_s", "-"),
                    sample.get("guard_pull_s", "-"), sample["layers_fetched"], sample["layers"],
                )  # fmt: skip
                if sample["layers_fetched"] != sample["layers"]:
                    bench.fail(
                        f"cold {mode} round {n + 1}: only {sample['layers_fetched']}/{sample['layers']} layers fetched"
                    )
    remove_cold_images(lab.layout)


def route(bench: Bench, lab: Lab, blocks: int, per_block: int, results: dict[str, Any]) -> None:
    c = bench.cluster
    routes = Routes(bench)
    out: dict[str, Any] = {
        "blocks": blocks, "per_block": per_block, "first": {m: [] for m in MODES}, "samples": {m: [] for m in MODES},
        "clean": [],
    }  # fmt: skip
    results["route"] = out
    with PhaseRecorder() as recorder, Timeline(c) as timeline:
        for n in range(blocks):
            for mode in order(n):
                kc.wait_settled(c, ROUTED)
                routes.ensure_clean_before()  # the other mode's manager is gone
                what = f"route block {n + 1}/{blocks} {mode}"
                with routes.session(routes.settings(**mode_changes(lab, mode)), what) as session:
                    # The session's own route (--bridge-isolate) stays open, as in a bridged test run:
                    # with no route left, the manager deletes the router and the next route waits for
                    # a new one (the first route's time, not a per-test route's).
                    started = time.monotonic()
                    session.connect()
                    connected = time.monotonic()
                    first = session.routes[ROUTED]
                    out["first"][mode].append({
                        "block": n + 1, "connect_s": round(connected - started, 4),
                        **{f"route_{k}_s": round(v, 4) for k, v in first.timings.items()},
                        "breakdown": route_breakdown(recorder, timeline, first, started, connected),
                    })  # fmt: skip
                    log.info("%s: session route (manager and router deployed) live %.2fs", what, first.timings["live"])
                    for i in range(per_block):
                        sample = routes.per_test_route(session, recorder, timeline, i)
                        sample.update(block=n + 1, mode=mode)
                        out["samples"][mode].append(sample)
                    session.close()
                out["clean"].append({"block": n + 1, "mode": mode, **routes.wait_clean(what)})


# ----------------------------------------------------------------------------- summary (pure)


def _values(samples: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if isinstance(s.get(key), float | int)]


def _span(sample: dict[str, Any], label: str) -> float | None:
    span = sample.get("phases", {}).get(label)
    return span[1] - span[0] if span else None


def _paired(samples: dict[str, list[dict[str, Any]]], key: str) -> Summary:
    """configmap - image, round by round (each round ran both, back to back)."""
    image = {s["round"]: s.get(key) for s in samples["image"]}
    diffs = [
        s[key] - image[s["round"]]
        for s in samples["configmap"]
        if isinstance(s.get(key), float | int) and isinstance(image.get(s["round"]), float | int)
    ]
    return summarize(diffs)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for step in ("warm", "cold"):
        samples = (results.get(step) or {}).get("samples")
        if not samples:
            continue
        entry: dict[str, Any] = {
            mode: {
                key: summarize(_values(samples[mode], key))
                for key in ("connect_s", "agent_ready_polled_s", "agent_pod_ready_s", "agent_pull_s", "guard_pull_s",
                            "disconnect_s", "restored_s")
            }
            for mode in MODES
        }  # fmt: skip
        entry["difference_connect_s"] = _paired(samples, "connect_s")
        entry["phases"] = {
            label: {mode: summarize([v for s in samples[mode] if (v := _span(s, label)) is not None]) for mode in MODES}
            for label in PHASES
        }
        entry["pods"] = {
            f"{role} {mark}": {
                mode: summarize([s["pods"][role][mark] for s in samples[mode] if mark in s.get("pods", {}).get(role, {})])
                for mode in MODES
            }
            for role in ("guard pod", "agent pod")
            for mark in POD_MARKS
        }  # fmt: skip
        out[step] = entry
    routed = results.get("route")
    if routed:
        keys = ("route_live_s", "route_pod_ready_s", "open_s", "close_s")
        out["route"] = {mode: {key: summarize(_values(routed["samples"][mode], key)) for key in keys} for mode in MODES}
        out["route"]["first"] = {mode: summarize(_values(routed["first"][mode], "route_live_s")) for mode in MODES}
        out["route"]["breakdown"] = {
            mark: {
                mode: summarize([s["breakdown"][mark] for s in routed["samples"][mode] if mark in s["breakdown"]])
                for mode in MODES
            }
            for mark in ROUTE_MARKS
        }
    if "warm" in out:
        a, b = out["warm"]["configmap"]["connect_s"], out["warm"]["image"]["connect_s"]
        if a.get("n") and b.get("n"):
            slower = a["median"] - b["median"]
            out["target"] = {
                "target": f"warm connect, configmap no slower than image by more than {WARM_TARGET_S} s (medians)",
                "measured_s": round(slower, 3),
                "paired_median_s": out["warm"]["difference_connect_s"].get("median"),
                "met": slower <= WARM_TARGET_S,
            }
    return out


# ----------------------------------------------------------------------------- report (pure)


def _f(s: dict[str, Any] | None, digits: int = 2) -> str:
    return Summary(s or {}).fmt(digits)


def _d(a: dict[str, Any], b: dict[str, Any], digits: int = 2) -> str:
    """Difference of two medians, configmap - image."""
    if not a.get("n") or not b.get("n"):
        return "-"
    return f"{a['median'] - b['median']:+.{digits}f}"


def render(results: dict[str, Any]) -> str:
    s = results.get("summary") or summary(results)
    lines = [
        f"### Code shipped at connect (configmap) vs prebuilt agent image (image), namespace {results.get('namespace')}",
        "",
    ]
    machine = results.get("machine") or {}
    if machine:
        lines += [
            f"`{results.get('command')}`, {results.get('started')}, {results.get('duration_s')} s; git {machine.get('git')}; "
            f"{machine.get('cpus')} CPUs, kubernetes {machine.get('kubernetes_server')}, {machine.get('containerd')}; "
            f"tunnel transport {machine.get('bridge transport', '?')}; load average "
            f"{' '.join(machine.get('loadavg_at_start', []))} at the start, {' '.join(machine.get('loadavg_at_end', []))} "
            "at the end.",
            "",
        ]
    lines += [
        "Seconds, median (min-max, n). Difference: configmap - image, of the medians; for connects also the median "
        "of the per-round differences (both modes ran back to back in every round, the order flipping).",
        "",
        "| what | --bridge-code=configmap | --bridge-code=image | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    for step, what in (("warm", "warm connect"), ("cold", "cold connect (image pulled by kubelet)")):
        if step in s:
            a, b = s[step]["configmap"]["connect_s"], s[step]["image"]["connect_s"]
            paired = s[step]["difference_connect_s"]
            lines.append(f"| **{what}** | **{_f(a)}** | **{_f(b)}** | **{_d(a, b)}** (paired: {_f(paired)}) |")
    if "cold" in s:
        for key, what in (
            ("agent_pull_s", "… image pull, agent pod (kubelet)"),
            ("guard_pull_s", "… image pull, guard pod"),
        ):
            a, b = s["cold"]["configmap"][key], s["cold"]["image"][key]
            lines.append(f"| {what} | {_f(a)} | {_f(b)} | {_d(a, b)} |")
    if "route" in s:
        r = s["route"]
        lines.append(
            f"| **per-test route live** | **{_f(r['configmap']['route_live_s'])}** | **{_f(r['image']['route_live_s'])}** "
            f"| **{_d(r['configmap']['route_live_s'], r['image']['route_live_s'])}** |"
        )
        for key, what in (("route_pod_ready_s", "… route pod serving"), ("open_s", "… `open_route` returned"),
                          ("close_s", "`close_route()`")):  # fmt: skip
            lines.append(
                f"| {what} | {_f(r['configmap'][key])} | {_f(r['image'][key])} | {_d(r['configmap'][key], r['image'][key])} |"
            )
        lines.append(
            f"| session route, first of a block (manager and router deployed) | {_f(r['first']['configmap'])} "
            f"| {_f(r['first']['image'])} | {_d(r['first']['configmap'], r['first']['image'])} |"
        )
    target = s.get("target")
    if target:
        lines += [
            "",
            f"Target: {target['target']}: configmap - image = {target['measured_s']:+.2f} s "
            f"(paired {target['paired_median_s']:+.2f} s): **{'met' if target['met'] else 'not met'}**.",
        ]
    for step in ("warm", "cold"):
        if step not in s:
            continue
        lines += ["", f"**{step.capitalize()} connect, step by step**: seconds each step took (the steps overlap "
                  "nothing: they run one after another), then when the pods got there (from the start of connect(), "
                  "seen by a watch)", "",
                  "| step | configmap | image | difference |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for label, by_mode in s[step]["phases"].items():
            a, b = by_mode["configmap"], by_mode["image"]
            if a.get("n") or b.get("n"):
                lines.append(f"| {label} | {_f(a, 3)} | {_f(b, 3)} | {_d(a, b, 3)} |")
        for label, by_mode in s[step]["pods"].items():
            a, b = by_mode["configmap"], by_mode["image"]
            if a.get("n") or b.get("n"):
                lines.append(f"| at: {label} | {_f(a)} | {_f(b)} | {_d(a, b)} |")
    if "route" in s:
        lines += ["", "**Per-test route, step by step**: seconds from the start of `open_route`", "",
                  "| at | configmap | image | difference |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for mark, by_mode in s["route"]["breakdown"].items():
            a, b = by_mode["configmap"], by_mode["image"]
            if a.get("n") or b.get("n"):
                lines.append(f"| {mark[4:]} | {_f(a)} | {_f(b)} | {_d(a, b)} |")
    pushed = results.get("images")
    if pushed:
        mib = 2**20
        agent = pushed["agent"]
        lines += [
            "",
            f"Agent image (`{pushed['command']}`, {pushed['took_s']} s for both images): {agent['layers']} layers, "
            f"{agent['compressed_bytes'] / mib:.1f} MiB compressed; its top layers "
            f"{', '.join(f'{b / 1024:.0f} KiB' for b in agent['layer_bytes'][-2:])}. The code: "
            f"{results.get('code', {}).get('zipapp_bytes', 0) / 1024:.0f} KiB zipapp.",
        ]
    images_cold = (results.get("cold") or {}).get("images")
    if images_cold:
        mib = 2**20
        lines.append(
            "Cold images (docker save, uncompressed): "
            + "; ".join(
                f"{mode} {i['layers']} layers, {i['uncompressed_bytes'] / mib:.1f} MiB"
                for mode, i in images_cold.items()
            )
            + "."
        )
    for failure in results.get("failures", []):
        lines.append(f"FAILURE: {failure}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _delete_namespace(cluster: kc.Cluster, timeout: float = 180.0) -> None:
    try:
        cluster.core.delete_namespace(cluster.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cluster.core.read_namespace(cluster.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(1)
    log.warning("namespace %s still there after %.0fs", cluster.namespace, timeout)


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    layout = Layout.default()
    bench = Bench(QUICK, (), kubeconfig=args.kubeconfig, namespace=args.namespace, kubectl=args.kubectl)
    with contextlib.ExitStack() as stack:

        def collect() -> None:  # last: the clean-up's warnings too
            results["failures"] += bench.results["failures"]
            results["warnings"] += bench.results["warnings"]

        stack.callback(collect)
        if not args.keep_namespace:
            stack.callback(_delete_namespace, bench.cluster)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-codeship-", dir=layout.cache)))
        finished = False

        def cleanup_images() -> None:
            removed = remove_our_images(layout, 0 if finished else 5)
            log.info("removed: %s", ", ".join(removed) or "nothing")

        stack.callback(cleanup_images)
        tools = ensure_tools()
        registry = Registry(tools["registry"], workdir, args.port)
        results["_registry"] = registry.host  # not written out: see main
        stack.callback(registry.stop)  # first, so a pull still running fails instead of landing later
        stack.callback(bench.cleanup)  # before that: every session closed
        lab = Lab(layout, tools, registry, workdir)
        log.info("registry on loopback (pid %d); namespace %s", registry.process.pid, args.namespace)
        if leftovers := remove_our_images(layout, 0):
            log.info("removed images of earlier runs: %s", ", ".join(leftovers))
        with BridgeSession(bench.settings()) as probe:  # never connected: only resolves "auto"
            results["machine"]["bridge transport"] = probe.transport
        code = bundle.build()
        results["code"] = {"version": code.version, "digest": code.short, "zipapp_bytes": len(code.data)}
        log.info("sample app in namespace %s: applying and waiting until Available", args.namespace)
        results["sample_app_ready_s"] = round(kc.ensure_sample_app(bench.cluster), 2)
        log.info("pytest-bridge images push (code %s)", code.short)
        results["images"] = push_images(lab)
        log.info("agent image %s, routing image %s", lab.agent_image, lab.routing_image)
        if "warm" in args.only:
            warm(bench, lab, args.warm_rounds, results)
        if "cold" in args.only:
            cold(bench, lab, args.cold_rounds, results)
        if "route" in args.only:
            route(bench, lab, args.route_blocks, args.routes_per_block, results)
        finished = True


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.codeship",
        description="Connect time (warm and cold) and per-test route time with the code shipped at connect "
        "(--bridge-code=configmap) against the prebuilt agent image (--bridge-code=image), in interleaved rounds.",
        epilog=f"Runs in its own namespace ({DEFAULT_NAMESPACE}) with a registry on loopback; leaves nothing behind. "
        "See BENCHMARKS.md, 'Code shipped at connect'.",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help=f"run only these (repeatable or comma-separated): {', '.join(STEPS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--warm-rounds", type=int, default=10, help="warm connects per mode (default 10)")
    parser.add_argument("--cold-rounds", type=int, default=5, help="cold connects per mode (default 5)")
    parser.add_argument("--route-blocks", type=int, default=2, help="route blocks per mode (default 2)")
    parser.add_argument(
        "--routes-per-block", type=int, default=6, help="per-test routes measured per block (default 6)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown tables here (they are printed anyway)")
    parser.add_argument("--port", type=int, default=0, help="registry port on loopback (default: a free one)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--keep-namespace", action="store_true", help="leave the namespace and its sample app")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    parser.add_argument("--kubectl", default=kc.default_kubectl())
    args = parser.parse_args(argv)
    args.only = tuple(name.strip() for item in args.only for name in item.split(",") if name.strip()) or STEPS
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.namespace in ("bridge-demo", "bridge-bench", "bridge-bench-cold"):
        parser.error(f"{args.namespace} is used by the e2e suites or another benchmark; pick another --namespace")
    if min(args.warm_rounds, args.cold_rounds, args.route_blocks, args.routes_per_block) < 1:
        parser.error("rounds, blocks and routes per block must be at least 1")
    if not args.kubeconfig:
        parser.error("no cluster: set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    kc.start_run("codeship", args.kubectl)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.codeship", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "namespace": args.namespace,
        "machine": machine_info(args.kubectl, args.kubeconfig),
        "failures": [],
        "warnings": [],
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
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if status == 0 and results["failures"]:
        status = 1
    results["summary"] = summary(results)
    # The loopback registry's address changes every run and says nothing: written as <registry>.
    host = results.pop("_registry", None)
    text, data = render(results), json.dumps(results, indent=2, default=str) + "\n"
    if host:
        text, data = text.replace(host, "<registry>"), data.replace(host, "<registry>")
    print(text)
    if args.out:
        args.out.write_text(data)
    if args.markdown:
        args.markdown.write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
