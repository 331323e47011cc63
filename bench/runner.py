"""Run the benchmarks against the cluster and collect the figures (``python -m bench``).

Orchestration only: the load itself is :mod:`bench.loadtool` (run as subprocesses, so the load
client and the local service never share the GIL with the tunnel, as in real use), the cluster
objects come from :mod:`bench.cluster`, and :mod:`bench.report` turns the result into tables.
Every bridge session, port-forward, local server and bench pod started here is stopped in
``finally``; the sample app in the bench namespace is left in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_bridge.core.plan import LocalPortSpec
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings, NameMappingMode
from pytest_bridge.transport.kubectl_forward import lane_pool

from . import cluster as kc
from .loadtool import pattern_digest
from .procstat import (
    CpuMeter,
    RssSampler,
    find_pids,
    listen_drops,
    memory_kib,
    pids_in_pod,
    reset_peak_rss,
    system_cpu,
)
from .profiles import Profile
from .routes import Routes
from .stats import summarize

__all__ = ["BENCHMARKS", "ROUTING", "Bench"]

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
SERVICE = "orders"
TARGET_PORT = 8080  # orders' Service port 80 -> targetPort `http` -> containerPort 8080 (fixtures/manifests)
AGENT_STATUS_PORT = 47101
BENCHMARKS = (
    "connect", "pytest", "throughput", "latency", "concurrency", "isolated-route", "router", "route-scale", "route-pool",
    "pool-scale",
)  # fmt: skip
TRANSPORT = ("throughput", "latency", "concurrency")
ROUTING = (
    "isolated-route",
    "router",
    "route-scale",
    "route-pool",
    "pool-scale",
)  # bench/routes.py; --quick: the route smoke only


@dataclass
class LoadPath:
    """One way for a load client on this machine to reach a load server."""

    name: str
    host: str
    port: int
    server: str  # "local" (the bridged local service) or "pod" (the bench server pod)
    bridge: bool  # integrity failures on this path fail the run
    role: str  # what it stands for, for the report

    def direction(self, op: str) -> str:
        """Which way the data of ``op`` travels: ``to local`` (pod -> host) or ``to cluster``."""
        toward_server = op == "sink"
        return ("to local" if toward_server else "to cluster") if self.server == "local" else (
            "to cluster" if toward_server else "to local"
        )  # fmt: skip

    def op_for(self, direction: str) -> str:
        """The load tool's op whose data travels ``direction`` on this path (:meth:`direction` inverted)."""
        return next(op for op in ("sink", "source") if self.direction(op) == direction)


@dataclass
class Bench:
    profile: Profile
    only: tuple[str, ...]
    kubeconfig: str
    namespace: str
    kubectl: str
    progress: Callable[[str], None] = field(default=lambda line: log.info("%s", line))

    def __post_init__(self) -> None:
        self.results: dict[str, Any] = {"profile": asdict(self.profile), "failures": [], "warnings": []}
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._cluster: kc.Cluster | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def cluster(self) -> kc.Cluster:
        if self._cluster is None:
            self._cluster = kc.load(self.kubeconfig, self.namespace, self.kubectl)
        return self._cluster

    def selected(self, name: str) -> bool:
        return not self.only or name in self.only

    def fail(self, message: str) -> None:
        self.progress(f"FAILURE: {message}")
        self.results["failures"].append(message)

    def warn(self, message: str) -> None:
        self.progress(f"warning: {message}")
        self.results["warnings"].append(message)

    def settings(self) -> BridgeSettings:
        return BridgeSettings(
            services=(SERVICE,),
            namespace=self.namespace,
            kubeconfig=Path(self.kubeconfig),
            name_mapping=NameMappingMode.IN_PROCESS,  # never the system hosts file from a benchmark
            connect_timeout=120.0,
            # The plugin's default (auto: kubectl port-forward with lanes, as the bench's kubectl is
            # handed to it); PYTEST_BRIDGE_TRANSPORT=websocket measures our own port-forward client.
            transport=os.environ.get("PYTEST_BRIDGE_TRANSPORT", "auto"),
        )

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def cleanup(self) -> None:
        """Undo everything, newest first; one failing step does not stop the others."""
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                fn()
            except Exception as exc:
                self.warn(f"cleanup {what}: {type(exc).__name__}: {exc}")

    def loadtool(self, *args: str, timeout: float) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.loadtool", *args]
        try:
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"load client timed out after {timeout:.0f}s", "errors": 1}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            return {
                "ok": False,
                "error": f"load client exit {done.returncode}: {done.stderr.strip()[-500:]}",
                "errors": 1,
            }
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self._setup()
            if self.selected("connect") and self.profile.connect_reps:
                self._connect_cycles()
            if self.selected("pytest") and self.profile.pytest_reps:
                self._pytest_runs()
            elif self.only and "pytest" in self.only:
                self.progress("pytest: not run in --quick (BridgeSession.connect is timed instead)")
            quick_connect = self.selected("connect") and not self.profile.connect_reps
            if any(self.selected(name) for name in TRANSPORT) or quick_connect:
                self._transport(time_connect=quick_connect)
            self._routing()
        finally:
            self.cleanup()
            if self._cluster is not None:
                self._cluster.api.close()  # type: ignore[no-untyped-call]
            self.results["duration_s"] = round(time.monotonic() - started, 1)
        return self.results

    def _routing(self) -> None:
        routes = Routes(self)
        if self.profile.name == "quick":
            if self.selected("isolated-route"):
                routes.smoke()
            for name in ("router", "route-scale", "route-pool", "pool-scale"):
                if self.only and name in self.only:
                    self.progress(f"{name}: not run in --quick (the route smoke is)")
            return
        if self.selected("isolated-route"):
            routes.isolated_route()
        if self.selected("router"):
            routes.router()
        if self.selected("route-scale"):
            routes.scale()
        if self.selected("route-pool"):
            routes.route_pool()
        if self.selected("pool-scale"):
            routes.pool_scale()

    def _setup(self) -> None:
        c = self.cluster
        if any(self.selected(name) for name in ROUTING):
            # Re-applying the sample app would reset a routed Service's selector under the manager.
            Routes(self).ensure_clean_before()
        self.progress(f"sample app in namespace {self.namespace}: applying and waiting until Available")
        self.results["setup"] = {
            "sample_app_ready_s": round(kc.ensure_sample_app(c), 2),
            "agent_image": self.settings().agent_image,
        }
        needs_pod = any(self.selected(name) for name in TRANSPORT)
        if needs_pod:
            started = time.monotonic()
            # Before any bridge connects: the session maps the namespace's Services at connect time.
            self.defer("delete the bench server pod", lambda: kc.delete_bench_server(c))
            self.bench_pod = kc.create_bench_server(c)
            self.results["setup"]["bench_pod_ready_s"] = round(time.monotonic() - started, 2)
            self.progress(f"bench server pod {self.bench_pod.name} at {self.bench_pod.ip}:{kc.BENCH_PORT}")
            self.pod_network = kc.reachable(self.bench_pod.ip, kc.BENCH_PORT)
            self.results["setup"]["pod_network_reachable_from_host"] = self.pod_network
            if not self.pod_network:
                self.warn("pod IPs are not reachable from this machine: no `direct pod IP` row; `bridge in` goes "
                          "through kubectl port-forward to the agent")  # fmt: skip

    # ------------------------------------------------------------------ connect / disconnect

    def _one_cycle(self) -> dict[str, float]:
        c = self.cluster
        settle = kc.wait_settled(c, SERVICE)
        marks: list[tuple[float, str]] = []
        session = BridgeSession(self.settings(), report=lambda line: marks.append((time.monotonic(), line)))
        started = time.monotonic()
        try:
            session.connect()
            connected = time.monotonic()
        finally:
            closing = time.monotonic()
            session.close()
            closed = time.monotonic()
        restored = kc.wait_settled(c, SERVICE)
        sample = {
            "connect_s": connected - started,
            "disconnect_s": closed - closing,
            "restored_s": closed - closing + restored,
            "waited_before_s": settle,
        }
        sample.update(_agent_ready(marks, started))
        return sample

    def _connect_cycles(self) -> None:
        samples = []
        for i in range(self.profile.connect_reps):
            sample = self._one_cycle()
            self.progress(
                f"connect {i + 1}/{self.profile.connect_reps}: connect {sample['connect_s']:.2f}s "
                f"(agent ready at {sample.get('agent_pod_ready_s', float('nan')):.2f}s), "
                f"close {sample['disconnect_s']:.2f}s, restored {sample['restored_s']:.2f}s"
            )
            samples.append(sample)
        self._record_connect(samples)

    def _record_connect(self, samples: list[dict[str, float]]) -> None:
        keys = ("connect_s", "agent_pod_ready_s", "disconnect_s", "restored_s")
        self.results["connect"] = {
            "samples": [{k: round(v, 3) for k, v in s.items()} for s in samples],
            "summary": {k: summarize([s[k] for s in samples if k in s]) for k in keys},
        }

    def _pytest_runs(self) -> None:
        samples = []
        with tempfile.TemporaryDirectory(prefix="bench-pytest-") as tmp:
            test = Path(tmp) / "test_bench_trivial.py"
            test.write_text("def test_bridged(bridged_service):\n    assert bridged_service.local_port > 0\n")
            argv = [
                sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                str(test), f"--bridge-service={SERVICE}", f"--bridge-namespace={self.namespace}",
                f"--bridge-kubeconfig={self.kubeconfig}", "--bridge-name-mapping=in-process",
            ]  # fmt: skip
            for i in range(self.profile.pytest_reps):
                kc.wait_settled(self.cluster, SERVICE)
                started = time.monotonic()
                done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=300, check=False)
                wall = time.monotonic() - started
                restored = kc.wait_settled(self.cluster, SERVICE)
                match = re.search(r"session \S+: connect ([\d.]+)s, disconnect ([\d.]+)s", done.stdout)
                if done.returncode != 0 or match is None:
                    self.fail(
                        f"pytest --bridge-service run {i + 1} failed (exit {done.returncode}): {done.stdout[-800:]}"
                    )
                    continue
                sample = {
                    "wall_s": wall,
                    "connect_s": float(match.group(1)),
                    "disconnect_s": float(match.group(2)),
                    "restored_after_exit_s": restored,
                }
                self.progress(
                    f"pytest {i + 1}/{self.profile.pytest_reps}: wall {wall:.2f}s, connect {sample['connect_s']:.1f}s, "
                    f"disconnect {sample['disconnect_s']:.1f}s (terminal summary)"
                )
                samples.append(sample)
        keys = ("wall_s", "connect_s", "disconnect_s", "restored_after_exit_s")
        self.results["pytest"] = {
            "command": " ".join(["pytest", *argv[6:]]),
            "samples": [{k: round(v, 3) for k, v in s.items()} for s in samples],
            "summary": {k: summarize([s[k] for s in samples]) for k in keys},
        }

    # ------------------------------------------------------------------ transport

    def _transport(self, time_connect: bool) -> None:
        c = self.cluster
        kc.wait_settled(c, SERVICE)
        marks: list[tuple[float, str]] = []

        def report(line: str) -> None:
            marks.append((time.monotonic(), line))
            self.progress(line)

        # The local service's port is reserved before connect (bound, not yet listening, so the
        # session's "is the port free" check passes) and the socket is inherited by the load server,
        # which listens on it: no other process on this shared machine can take the port in between.
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self._local_listener = listener
        local_port = LocalPortSpec(local_port=listener.getsockname()[1], target_port=TARGET_PORT)
        session = BridgeSession(dataclasses.replace(self.settings(), local_ports=(local_port,)), report=report)
        closing: dict[str, float] = {}

        def close_session() -> None:
            started = time.monotonic()
            session.close()
            closing["disconnect_s"] = time.monotonic() - started
            closing["restored_s"] = closing["disconnect_s"] + kc.wait_settled(c, SERVICE)

        with contextlib.ExitStack() as stack:
            stack.callback(close_session)  # registered first: runs last, after every forwarder is gone
            stack.callback(listener.close)
            started = time.monotonic()
            session.connect()
            connect_s = time.monotonic() - started
            self.progress(f"bridge session {session.session_id} connected in {connect_s:.2f}s")
            self._run_transport(session, stack)
        self.results["transport_session"] = {
            "connect_s": round(connect_s, 3),
            **{k: round(v, 3) for k, v in closing.items()},
        }
        if time_connect:
            sample = {"connect_s": connect_s, **closing}
            sample.update(_agent_ready(marks, started))
            self._record_connect([sample])

    def _run_transport(self, session: BridgeSession, stack: contextlib.ExitStack) -> None:
        c = self.cluster
        svc = session.services[SERVICE]
        target_port = svc.plan.target_ports[0]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        listener = self._local_listener
        assert svc.local_ports[target_port] == listener.getsockname()[1], svc.local_ports
        local = kc.PortProcess(
            [sys.executable, "-m", "bench.loadtool", "server", "--fd", str(listener.fileno())],
            env, "local load server", pass_fds=(listener.fileno(),),
        )  # fmt: skip
        listener.close()
        stack.callback(local.close)
        agent = kc.pod_info(c, svc.agent_pod)
        self.results["setup"]["agent_image_id"] = agent.image_id
        outbound = svc.mapping.service(kc.BENCH_SERVER)
        forwards: dict[str, kc.PortProcess] = {}
        if self.pod_network:
            paths = [LoadPath("bridge in", agent.ip, target_port, "local", True,
                              f"client -> agent pod :{target_port} -> tunnel -> local server")]  # fmt: skip
        else:
            # Pods are not routable from here (e.g. kind): reach the agent's port through kubectl instead.
            # Two port-forwards in a row, so not comparable with the baselines, but still an integrity check.
            via = kc.kubectl_port_forward(c, f"pod/{agent.name}", target_port)
            stack.callback(via.close)
            paths = [LoadPath("bridge in", "127.0.0.1", via.port, "local", True,
                              f"client -> kubectl port-forward -> agent :{target_port} -> tunnel -> local server")]  # fmt: skip
        paths.append(
            LoadPath("bridge out", outbound.ip, outbound.local_port(kc.BENCH_PORT), "pod", True,
                     f"local client -> {outbound.ip} ({kc.BENCH_SERVER} mapped) -> tunnel -> agent -> Service -> pod")
        )  # fmt: skip
        for name, target in (
            ("kubectl pf pod", f"pod/{kc.BENCH_SERVER}"),
            ("kubectl pf svc", f"svc/{kc.BENCH_SERVER}"),
        ):
            forwards[name] = kc.kubectl_port_forward(c, target, kc.BENCH_PORT)
            stack.callback(forwards[name].close)
            paths.append(
                LoadPath(name, "127.0.0.1", forwards[name].port, "pod", False, f"kubectl port-forward {target} :9000")
            )
        if self.pod_network:
            paths.append(
                LoadPath("direct pod IP", self.bench_pod.ip, kc.BENCH_PORT, "pod", False, "host -> pod IP (no tunnel)")
            )
        if self.profile.diagnostics:
            name = "python pf (no mux)"
            forwards[name] = kc.PortProcess(
                [sys.executable, "-m", "bench.pyforward", "--kubeconfig", self.kubeconfig, "--namespace",
                 self.namespace, "--pod", kc.BENCH_SERVER, "--port", str(kc.BENCH_PORT)],
                env, "python port-forward",
            )  # fmt: skip
            stack.callback(forwards[name].close)
            paths.append(LoadPath(name, "127.0.0.1", forwards[name].port, "pod", False,
                                  "pytest_bridge.transport.portforward, one websocket per connection, no agent"))  # fmt: skip
        self.results["paths"] = {p.name: {"target": f"{p.host}:{p.port}", "role": p.role} for p in paths}
        agent_pid = next(iter(pids_in_pod(agent.uid, "pytest_bridge_agent")), None)
        self.context = TransportContext(
            paths=paths, agent=agent, agent_pid=agent_pid, local_server_pid=local.pid, forwards=forwards,
            bench_pod_pids=pids_in_pod(self.bench_pod.uid),
        )  # fmt: skip
        if agent_pid is None:
            self.warn("the agent's process is not visible from this host (not the node?): no agent CPU/RSS figures")
        if self.selected("throughput"):
            self._throughput()
        if self.selected("latency"):
            self._latency()
        if self.selected("concurrency"):
            self._concurrency()
        stats = session.tunnel_stats(SERVICE)
        if stats is not None:
            self.results["tunnel"] = {
                "transport": session.transport, "connections": stats.streams_total, "on lanes": stats.lanes_used,
            }  # fmt: skip
            self.progress(
                f"tunnel ({session.transport}): {stats.lanes_used} of {stats.streams_total} connections on lanes"
            )
            if session.transport == "kubectl" and lane_pool() and self.selected("throughput") and not stats.lanes_used:
                self.fail("the kubectl transport carried no connection on a lane (lanes are broken or off)")

    def _cpu_meter(self) -> CpuMeter:
        ctx = self.context
        pids = {
            "bench process (tunnel client)": [os.getpid()],
            "agent": [ctx.agent_pid] if ctx.agent_pid else [],
            "kube-apiserver": find_pids("kube-apiserver"),
            "kubelet": find_pids("kubelet"),
            "containerd": find_pids("containerd"),
            "kubectl port-forward": [f.pid for name, f in ctx.forwards.items() if name.startswith("kubectl")],
            "python pf (no mux)": [f.pid for name, f in ctx.forwards.items() if name.startswith("python")],
            "local load server": [ctx.local_server_pid],
            "pod load server": ctx.bench_pod_pids,
        }
        return CpuMeter(pids)

    def _throughput(self) -> None:
        ctx, size = self.context, self.profile.transfer_bytes
        out: dict[str, Any] = {}
        digests = [pattern_digest(rep + 1, size) for rep in range(self.profile.transfer_reps)]
        for rep in range(self.profile.transfer_reps):
            for path in ctx.paths:
                for op in ("sink", "source"):
                    waited, others = self._wait_quiet()
                    meter = self._cpu_meter()
                    meter.start()
                    result = self.loadtool(
                        "throughput", "--host", path.host, "--port", str(path.port), "--op", op, "--bytes", str(size),
                        "--seed", str(rep + 1), "--expect", digests[rep], timeout=max(120.0, size / 2**20),
                    )  # fmt: skip
                    cpu = meter.stop({"load client": result.get("client_cpu_seconds_total", 0.0)})
                    cpu["waited for quiet s"], cpu["machine busy before %"] = waited, others
                    direction = path.direction(op)
                    entry = out.setdefault(path.name, {}).setdefault(
                        direction, {"mib_s": [], "cpu_s": [], "errors": []}
                    )
                    if result.get("ok"):
                        entry["mib_s"].append(result["mib_per_s"])
                        entry["cpu_s"].append(cpu)
                    else:
                        entry["errors"].append(result.get("error"))
                        self._integrity(path, f"throughput {direction} ({op}, {size} bytes): {result.get('error')}")
                    self.progress(
                        f"throughput {rep + 1}/{self.profile.transfer_reps} {path.name:<20} {direction:<10} "
                        f"{result.get('mib_per_s', 0):8.1f} MiB/s  CPU busy {cpu['machine busy']:.1f}s of {cpu['machine capacity']:.1f}s, "
                        f"other processes {cpu['other processes']:.1f}s (waited {waited:.0f}s for quiet)"
                    )
        for entries in out.values():
            for entry in entries.values():
                entry["summary"] = summarize(entry["mib_s"])
        self.results["throughput"] = {"bytes": size, "reps": self.profile.transfer_reps, "paths": out}

    def _wait_quiet(self, window: float = 1.0, threshold: float = 0.15) -> tuple[float, float]:
        """Other people's test runs share this machine: wait (bounded) until it is nearly idle.

        Returns the seconds waited and how busy the machine was (share of all cores) in the last
        window before the measurement started.
        """
        if self.profile.quiet_wait_s <= 0:
            return 0.0, float("nan")
        started = time.monotonic()
        while True:
            busy0, total0 = system_cpu()
            time.sleep(window)
            busy1, total1 = system_cpu()
            share = (busy1 - busy0) / max(total1 - total0, 1e-9)
            if share <= threshold or time.monotonic() - started >= self.profile.quiet_wait_s:
                return round(time.monotonic() - started, 1), round(100 * share, 1)

    def _integrity(self, path: LoadPath, message: str) -> None:
        if path.bridge:
            self.fail(f"{path.name}: {message}")
        else:
            self.warn(f"{path.name} (baseline): {message}")

    def _latency(self) -> None:
        ctx = self.context
        out: dict[str, Any] = {}
        counts = {"keepalive": self.profile.latency_keepalive, "newconn": self.profile.latency_newconn}
        for rep in range(self.profile.latency_reps):
            for path in ctx.paths:
                for mode, count in counts.items():
                    result = self.loadtool(
                        "latency", "--host", path.host, "--port", str(path.port), "--mode", mode,
                        "--count", str(count), "--size", "100", timeout=300,
                    )  # fmt: skip
                    entry = out.setdefault(path.name, {}).setdefault(mode, {"runs": [], "errors": 0})
                    entry["runs"].append({k: result.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "count")})
                    entry["errors"] += int(result.get("errors", 1))
                    if not result.get("ok"):
                        self._integrity(
                            path,
                            f"latency {mode}: {result.get('errors')} errors {result.get('first_errors') or result.get('error')}",
                        )
                    self.progress(
                        f"latency {rep + 1}/{self.profile.latency_reps} {path.name:<20} {mode:<9} "
                        f"p50 {result.get('p50_ms', float('nan')):7.3f} ms  p99 {result.get('p99_ms', float('nan')):7.3f} ms"
                    )
        for modes in out.values():
            for entry in modes.values():
                for q in ("p50_ms", "p99_ms"):
                    entry[q] = summarize([r[q] for r in entry["runs"] if isinstance(r.get(q), float)])
        self.results["latency"] = {"size": 100, "counts": counts, "reps": self.profile.latency_reps, "paths": out}

    def _concurrency(self) -> None:
        ctx = self.context
        out: dict[str, Any] = {}
        paths = [p for p in ctx.paths if p.bridge or (self.profile.baseline_concurrency and "python" not in p.name)]
        for rep in range(self.profile.concurrency_reps):
            for path in paths:
                for n in self.profile.concurrency:
                    result = self._concurrency_once(path, n, seed=rep + 1)
                    out.setdefault(path.name, {}).setdefault(str(n), []).append(result)
        self.results["concurrency"] = {
            "bytes_per_connection": self.profile.concurrency_bytes, "reps": self.profile.concurrency_reps, "paths": out,
        }  # fmt: skip

    def _concurrency_once(self, path: LoadPath, n: int, seed: int) -> dict[str, Any]:
        ctx = self.context
        me = os.getpid()
        watched: dict[str, int | None] = {"local (bench process, tunnel client)": me}
        if path.bridge:
            watched["agent"] = ctx.agent_pid
        if path.name in ctx.forwards:
            watched[path.name] = ctx.forwards[path.name].pid
        # Which network namespace holds the socket the clients connect to: its listen-queue drops.
        listener_pid = {
            "bridge in": ctx.agent_pid if self.pod_network else me,
            "direct pod IP": next(iter(ctx.bench_pod_pids), None),
        }.get(path.name, me)
        drops_before = listen_drops(listener_pid) if listener_pid else None
        before = {name: memory_kib(pid).get("VmRSS", 0) for name, pid in watched.items() if pid}
        reset = {name: reset_peak_rss(pid) for name, pid in watched.items() if pid}
        with RssSampler(lambda: watched) as sampler:
            result = self.loadtool(
                "concurrency", "--host", path.host, "--port", str(path.port), "--connections", str(n),
                "--bytes", str(self.profile.concurrency_bytes), "--seed", str(seed), "--timeout", "180", timeout=240,
            )  # fmt: skip
        peak = {}
        for name, pid in watched.items():
            if not pid:
                continue
            hwm = memory_kib(pid).get("VmHWM", 0) if reset.get(name) else 0
            peak[name] = max(hwm, sampler.peak.get(name, 0))
        drops_after = listen_drops(listener_pid) if listener_pid else None
        if drops_before is not None and drops_after is not None:
            result["listen_drops"] = drops_after - drops_before
        result["rss_before_kib"] = before
        result["rss_peak_kib"] = peak
        if path.bridge:
            result["agent_streams_left_open"] = self._agent_streams_settled()
        errors, lost = int(result.get("errors", 1)), int(result.get("bytes_lost", 0))
        corrupt = int(result.get("corrupt_connections", 0))
        if errors or lost or corrupt or not result.get("ok"):
            detail = result.get("first_errors") or result.get("error")
            self._integrity(path, f"{n} concurrent: {errors} errors, {corrupt} corrupt, {lost} bytes lost {detail}")
        if path.bridge and result.get("agent_streams_left_open"):
            self.fail(f"{path.name}: {result['agent_streams_left_open']} agent streams still open after {n} concurrent")
        rss = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in peak.items())
        self.progress(
            f"concurrency {path.name:<20} {n:>5} conns: errors {errors}, bytes lost {lost}, "
            f"{result.get('seconds', float('nan')):.2f}s, connect max {result.get('connect_max_ms', float('nan')):.0f} ms "
            f"(listen drops {result.get('listen_drops', '?')}); "
            f"peak RSS {rss}"
        )
        return result

    def _agent_streams_settled(self, timeout: float = 10.0) -> int | None:
        """The agent's open streams once the load is gone (a leak check), via its /status port."""
        url = f"http://{self.context.agent.ip}:{AGENT_STATUS_PORT}/status"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                with opener.open(url, timeout=5) as reply:
                    status = json.load(reply)
            except (OSError, ValueError):
                return None
            if not status.get("streams_open"):
                return 0
            time.sleep(0.2)
        return int(status.get("streams_open", 0))


def _agent_ready(marks: list[tuple[float, str]], started: float) -> dict[str, float]:
    """When the session reported its agent pod Ready, counted from the start of connect()."""
    for at, line in marks:
        if re.search(r"agent pod \S+ ready in", line):
            return {"agent_pod_ready_s": at - started}
    return {}


@dataclass
class TransportContext:
    paths: list[LoadPath]
    agent: kc.PodInfo
    agent_pid: int | None
    local_server_pid: int
    forwards: dict[str, kc.PortProcess]
    bench_pod_pids: list[int]
