"""Isolated routes and the routing proxy (issue 5, items 1b, 4 and 5), and the route smoke of ``--quick``.

- ``isolated-route``: the first route of a namespace without a routing manager ("cold": the
  manager and the routers are deployed; a fresh ``BridgeSession(isolate=True).connect()`` each
  time, after the manager of the previous one has removed itself), then per-test routes
  (``open_route(..., per_test=True)``, each closed again) while manager and routers run ("warm"),
  each broken down into phases: the plugin's steps timed in this process (:class:`PhaseRecorder`),
  the route pod's status seen by a watch, and the router config seen by a ConfigMap watch and by
  polling the router's ``/healthz`` (:class:`Timeline`);
- ``router``: latency and throughput through the router, default and header-routed traffic,
  against the same server reached without it (:data:`bench.cluster.BENCH_HTTP` runs the load
  server over HTTP on a port named ``http``, so the manager routes it);
- ``route-scale``: N routes of one service open at once: the Nth route's time to live;
- ``--quick`` (:meth:`Routes.smoke`): one route, one request with the header that must reach a
  local server, one without that must reach the cluster's pod, close, namespace clean again.

Every session is closed (its routes with it) in ``finally``, every local server stopped, and the
namespace waited for until the manager has restored every Service, deleted the routers and
removed itself (``routing_idle`` of :data:`ROUTING_IDLE` seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from kubernetes import watch
from pytest_bridge_agent import labels

from pytest_bridge.core import timing
from pytest_bridge.orchestration import isolation
from pytest_bridge.orchestration.isolation import Route
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings

from . import cluster as kc
from .procstat import memory_kib, pids_in_pod
from .profiles import Profile
from .stats import summarize

__all__ = ["PER_TEST_TARGET_S", "ROUTING_IDLE", "BenchRun", "PhaseRecorder", "Routes", "Timeline"]

log = logging.getLogger("bench")

ROUTED = "orders"  # the sample app's service routed by item 1 and 5 (as the e2e suites do)
ROUTING_IDLE = 3.0  # the manager removes itself this long after its last route (cold runs wait for it)
PER_TEST_TARGET_S = 2.0
SAMPLE_APP_REPS, SAMPLE_APP_COUNT = 2, 100  # router latency to orders' sample app (see Routes.router)
COMPONENT = labels.COMPONENT_LABEL
ROUTER_LABEL = labels.ROUTER_LABEL
ROUTE_LABEL = labels.ROUTE_LABEL
ROUTER_STATS_PORT = 47180
REPO = kc.LOADTOOL.resolve().parent.parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchRun(Protocol):
    """What the route benchmarks need of the run that holds them (``bench.runner.Bench`` is one).

    Declared here so this module does not import the runner, which imports it.
    """

    profile: Profile
    results: dict[str, Any]

    @property
    def cluster(self) -> kc.Cluster: ...

    def settings(self) -> BridgeSettings: ...

    def progress(self, line: str) -> None: ...

    def fail(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the run cleans up (last deferred first)."""
        ...

    def loadtool(self, *args: str, timeout: float) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- instrumentation


class PhaseRecorder:
    """Times the plugin's steps of ``open_route`` through its timing hook, in this process only.

    Nothing in the plugin changes: it reports each timed step (``pytest_bridge.core.timing``) and
    this keeps the ones below as (label, start, end).
    """

    STEPS: tuple[str, ...] = (
        "stale-route sweep", "ensure manager", "permission checks", "wait for the route pod (plugin polls)",
        "open the tunnel", "canary through the router", "import env and files", "stop the tunnel",
    )  # fmt: skip
    KUBE_CALLS: tuple[str, ...] = (
        "create route pod", "create the route token", "tie the token", "list ingresses", "delete the route pod",
        "delete the route token",
    )  # fmt: skip

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self._observing = contextlib.ExitStack()

    def __enter__(self) -> PhaseRecorder:
        self._observing.enter_context(timing.observe(self._note))
        return self

    def __exit__(self, *exc: object) -> None:
        self._observing.close()

    def _note(self, label: str, started: float, ended: float) -> None:
        if label not in self.STEPS:
            label = next((prefix for prefix in self.KUBE_CALLS if label.startswith(prefix)), "")
        if label:
            self.events.append((label, started, ended))

    def between(self, start: float, end: float) -> list[tuple[str, float, float]]:
        return [e for e in self.events if e[1] >= start - 1e-6 and e[2] <= end + 1e-6]


class Timeline:
    """What the cluster did, as seen from here (monotonic clock of this process).

    - pods (watch; our routing pods unless ``pods`` selects others): first seen, scheduled
      (``nodeName``), every container running, Ready;
    - router ConfigMaps (watch): each generation and the routes it contains;
    - routers (``GET <router pod IP>:47180/healthz`` every 20 ms): which generation nginx runs.

    ``routing=False`` watches the pods only.
    """

    def __init__(self, cluster: kc.Cluster, pods: str = COMPONENT, routing: bool = True) -> None:
        self.cluster = kc.load(cluster.kubeconfig, cluster.namespace, cluster.kubectl)  # own client for threads
        self.pod_selector = pods
        self.routing = routing
        self.pods: dict[str, dict[str, float]] = {}
        self.pod_status: dict[str, dict[str, str]] = {}
        self.pod_labels: dict[str, dict[str, str]] = {}
        self.switched: list[tuple[float, str]] = []  # (seen, service) each time a Service's selector went to its router
        self._switched_state: dict[str, bool] = {}
        self.configs: list[tuple[float, str, int, frozenset[str]]] = []  # (seen, service, generation, routes)
        self.loaded: list[tuple[float, str, int]] = []  # (seen, service, generation nginx runs)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Timeline:
        targets = [self._watch_pods]
        if self.routing:
            targets += [self._watch_configs, self._watch_services, self._poll_routers]
        for target in targets:
            thread = threading.Thread(
                target=self._forever, args=(target,), daemon=True, name=f"bench-{target.__name__}"
            )
            thread.start()
            self._threads.append(thread)
        time.sleep(0.3)  # the watches are established
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=7)
        self.cluster.api.close()  # type: ignore[no-untyped-call]

    def _forever(self, target: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                target()
            except Exception as exc:  # a dropped watch: start it again
                log.debug("timeline %s: %s", target.__name__, exc)
                self._stop.wait(0.2)

    def _watch_pods(self) -> None:
        c = self.cluster
        w = watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(  # type: ignore[no-untyped-call]
            c.core.list_namespaced_pod, c.namespace, label_selector=self.pod_selector, timeout_seconds=2
        ):
            now = time.monotonic()
            pod: Any = event["object"]
            self.pod_labels[pod.metadata.name] = dict(pod.metadata.labels or {})
            marks = self.pods.setdefault(pod.metadata.name, {})
            marks.setdefault("seen", now)
            if pod.spec.node_name:
                marks.setdefault("scheduled", now)
            statuses = pod.status.container_statuses or []
            if statuses and all(s.state and s.state.running for s in statuses):
                marks.setdefault("running", now)
            if any(cond.type == "Ready" and cond.status == "True" for cond in pod.status.conditions or []):
                marks.setdefault("ready", now)
            if event["type"] == "DELETED":
                marks.setdefault("deleted", now)
            info = self.pod_status.setdefault(pod.metadata.name, {})
            info["created"] = str(pod.metadata.creation_timestamp)
            for cond in pod.status.conditions or []:
                info[f"condition {cond.type}"] = str(cond.last_transition_time)
            for s in statuses:
                if s.state and s.state.running:
                    info["container started"] = str(s.state.running.started_at)
            if self._stop.is_set():
                w.stop()  # type: ignore[no-untyped-call]

    def _watch_configs(self) -> None:
        c = self.cluster
        w = watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(  # type: ignore[no-untyped-call]
            c.core.list_namespaced_config_map, c.namespace, label_selector=f"{COMPONENT}=router", timeout_seconds=2
        ):
            now = time.monotonic()
            cm: Any = event["object"]
            service = (cm.metadata.labels or {}).get(ROUTER_LABEL, "")
            generation = int((cm.metadata.annotations or {}).get(labels.GENERATION_ANNOTATION, "0") or 0)
            text = (cm.data or {}).get("nginx.conf", "")
            routes = frozenset(line.split()[2] for line in text.splitlines() if line.startswith("#   route "))
            if event["type"] != "DELETED":
                self.configs.append((now, service, generation, routes))
            if self._stop.is_set():
                w.stop()  # type: ignore[no-untyped-call]

    def _watch_services(self) -> None:
        c = self.cluster
        state = self._switched_state  # kept across watch restarts (each one lists every Service again)
        w = watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(c.core.list_namespaced_service, c.namespace, timeout_seconds=2):  # type: ignore[no-untyped-call]
            svc: Any = event["object"]
            switched = labels.ORIGINAL_SELECTOR_ANNOTATION in (svc.metadata.annotations or {})
            if switched and not state.get(svc.metadata.name) and event["type"] != "DELETED":
                self.switched.append((time.monotonic(), svc.metadata.name))
            state[svc.metadata.name] = switched
            if self._stop.is_set():
                w.stop()  # type: ignore[no-untyped-call]

    def _poll_routers(self) -> None:
        c = self.cluster
        routers: dict[str, str] = {}
        listed = 0.0
        last: dict[str, int | None] = {}
        while not self._stop.is_set():
            if time.monotonic() - listed > 1.0:
                pods: Any = c.core.list_namespaced_pod(c.namespace, label_selector=f"{COMPONENT}=router")
                routers = {
                    p.status.pod_ip: (p.metadata.labels or {}).get(ROUTER_LABEL, "")
                    for p in pods.items
                    if p.status.pod_ip and not p.metadata.deletion_timestamp
                }
                listed = time.monotonic()
            for ip, service in routers.items():
                try:
                    with _NO_PROXY.open(f"http://{ip}:{ROUTER_STATS_PORT}/healthz", timeout=0.5) as reply:
                        generation = json.load(reply).get("generation")
                except (OSError, ValueError):
                    continue
                if generation is not None and last.get(ip) != generation:
                    last[ip] = generation
                    self.loaded.append((time.monotonic(), service, int(generation)))
            self._stop.wait(0.02)

    def route_marks(self, service: str, route: str, pod: str, started: float) -> dict[str, float]:
        """Absolute (monotonic) times: route pod seen/scheduled/running/ready, route in the router config,
        router runs it; for a first route also the manager's and router's pods and the selector switch."""
        marks = {f"route pod {k}": v for k, v in self.pods.get(pod, {}).items() if k != "deleted"}
        config = next(((t, g) for t, s, g, routes in self.configs if s == service and route in routes), None)
        if config is not None:
            marks["route in the router config"] = config[0]
            loaded = next(
                (t for t, s, g in self.loaded if s == service and g >= config[1] and t >= config[0] - 0.05), None
            )
            if loaded is not None:
                marks["router runs that config"] = loaded
        for name, pod_marks in self.pods.items():
            labels = self.pod_labels.get(name, {})
            if pod_marks.get("seen", 0.0) < started:
                continue
            if labels.get(COMPONENT) == "routing-manager":
                what = "manager pod"
            elif labels.get(COMPONENT) == "router" and labels.get(ROUTER_LABEL) == service:
                what = "router pod"
            else:
                continue
            for key in ("seen", "running", "ready"):
                if key in pod_marks:
                    marks.setdefault(f"{what} {key}", pod_marks[key])
        switch = next((t for t, name in self.switched if name == service and t >= started), None)
        if switch is not None:
            marks["Service switched to the router"] = switch
        return marks


def route_breakdown(
    recorder: PhaseRecorder, timeline: Timeline | None, route: Route, started: float, ended: float
) -> dict[str, float]:
    """Seconds from the start of ``open_route`` to each step (phases overlap: the tunnel opens while
    the manager updates the router), plus the time spent in each of the plugin's calls."""
    out: dict[str, float] = {}
    for label, t0, t1 in recorder.between(started, ended):
        out[f"in: {label}"] = round(out.get(f"in: {label}", 0.0) + t1 - t0, 4)
        out.setdefault(f"at: {label} done", round(t1 - started, 4))
    if timeline is not None:
        for label, at in timeline.route_marks(route.service, route.name, route.pod, started).items():
            out[f"at: {label}"] = round(at - started, 4)
    for key in ("pod_ready", "live", "total"):
        if key in route.timings:
            out[f"at: {key}"] = round(route.timings[key], 4)
    return out


# ----------------------------------------------------------------------------- the benchmarks


@dataclasses.dataclass
class Routes:
    bench: BenchRun

    @property
    def cluster(self) -> kc.Cluster:
        return self.bench.cluster

    def settings(self, **changes: Any) -> BridgeSettings:
        changes = {"isolate": True, "routing_idle": ROUTING_IDLE, **changes}
        return dataclasses.replace(self.bench.settings(), **changes)

    def progress(self, line: str) -> None:
        self.bench.progress(line)

    # -------------------------------------------------------------- namespace state

    def wait_clean(self, what: str, timeout: float = 90.0, fail: bool = True) -> dict[str, float]:
        """Until the manager restored every Service and deleted its routers, then until it is gone itself."""
        restored, left = kc.wait_routing_clean(self.cluster, timeout=timeout, manager=False)
        if left:
            message = f"{what}: isolated routing still in the namespace after {timeout:.0f}s: {'; '.join(left)}"
            if fail:
                self.bench.fail(message)
            else:
                self.bench.warn(message)
            return {"restored_s": restored}
        gone, left = kc.wait_routing_clean(self.cluster, timeout=max(30.0, ROUTING_IDLE * 10), manager=True)
        if left:
            self.bench.warn(f"{what}: the routing manager did not remove itself: {'; '.join(left)}")
        return {"restored_s": round(restored, 3), "manager_gone_s": round(restored + gone, 3)}

    def ensure_clean_before(self) -> None:
        """Refuse to start on a namespace where routing is still active (another run, or leftovers)."""
        waited, left = kc.wait_routing_clean(self.cluster, timeout=60.0, manager=True)
        if left:
            raise RuntimeError(
                f"isolated routing is still active in {self.cluster.namespace} after {waited:.0f}s: {'; '.join(left)}; "
                f"`pytest-bridge cleanup -n {self.cluster.namespace}` restores what dead sessions left"
            )

    @contextlib.contextmanager
    def session(self, settings: BridgeSettings, what: str) -> Iterator[BridgeSession]:
        """A bridge session that is closed, and the namespace waited for, whatever happens."""
        session = BridgeSession(settings, report=lambda line: log.debug("%s", line))
        done = False

        def close() -> None:
            nonlocal done
            if not done:
                done = True
                session.close()

        self.bench.defer(f"close the {what} session", close)
        try:
            yield session
        except BaseException:  # interrupted or failed: also wait until the manager has restored everything
            close()
            self.wait_clean(f"{what} (clean-up)", fail=False)
            raise
        finally:
            close()

    def local_server(self, port: int) -> kc.PortProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "bench.loadtool", "server", "--host", "127.0.0.1", "--port", str(port)]
        server = kc.PortProcess([*argv, "--name", "local"], env, "local HTTP server")
        self.bench.defer("stop a local HTTP server", server.close)
        return server

    # -------------------------------------------------------------- item 1b: route time

    def isolated_route(self) -> None:
        p = self.bench.profile
        kc.wait_settled(self.cluster, ROUTED)
        cold: list[dict[str, Any]] = []
        warm: list[dict[str, Any]] = []
        with PhaseRecorder() as recorder, Timeline(self.cluster) as timeline:
            for rep in range(p.route_cold_reps):
                self.ensure_clean_before()
                sample: dict[str, Any] = {}
                with self.session(self.settings(), "isolated-route") as session:
                    started = time.monotonic()
                    session.connect()
                    connected = time.monotonic()
                    route = session.routes[ROUTED]
                    sample = {
                        "connect_s": round(connected - started, 4),
                        **{f"route_{k}_s": round(v, 4) for k, v in route.timings.items()},
                        "breakdown": route_breakdown(recorder, timeline, route, started, connected),
                    }
                    self.progress(
                        f"isolated route, cold {rep + 1}/{p.route_cold_reps}: connect(isolate=True) {sample['connect_s']:.2f}s, "
                        f"route live {route.timings['live']:.2f}s (pod serving {route.timings['pod_ready']:.2f}s)"
                    )
                    for i in range(p.route_warm_reps):
                        warm.append(self.per_test_route(session, recorder, timeline, i))
                    closing = time.monotonic()
                    session.close()
                    sample["close_s"] = round(time.monotonic() - closing, 4)
                sample.update(self.wait_clean("isolated-route"))
                cold.append(sample)
                self.progress(
                    f"isolated route: closed in {sample['close_s']:.2f}s; service restored after "
                    f"{sample.get('restored_s', float('nan')):.1f}s, manager gone after {sample.get('manager_gone_s', float('nan')):.1f}s"
                )
        self.results_isolated(cold, warm)

    def per_test_route(
        self, session: BridgeSession, recorder: PhaseRecorder, timeline: Timeline, i: int
    ) -> dict[str, Any]:
        started = time.monotonic()
        route = session.open_route(ROUTED, per_test=True)
        opened = time.monotonic()
        try:
            sample: dict[str, Any] = {
                "open_s": round(opened - started, 4),
                **{f"route_{k}_s": round(v, 4) for k, v in route.timings.items()},
                "breakdown": route_breakdown(recorder, timeline, route, started, opened),
                "pod": route.pod,
            }
        finally:
            closing = time.monotonic()
            session.close_route(route)
            closed = time.monotonic()
            sample["close_s"] = round(closed - closing, 4)
            for label, t0, t1 in recorder.between(closing, closed):
                sample["breakdown"][f"close: {label}"] = round(t1 - t0, 4)
        self.progress(
            f"per-test route {i + 1}: live {route.timings['live']:.2f}s (pod serving {route.timings['pod_ready']:.2f}s, "
            f"open_route returned {sample['open_s']:.2f}s), closed in {sample['close_s']:.2f}s"
        )
        time.sleep(0.5)  # between tests: the manager takes the old route out of the router
        return sample

    def results_isolated(self, cold: list[dict[str, Any]], warm: list[dict[str, Any]]) -> None:
        def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
            keys = [k for k, v in samples[0].items() if isinstance(v, float)] if samples else []
            out: dict[str, Any] = {k: summarize([s[k] for s in samples if k in s]) for k in keys}
            phases = sorted({k for s in samples for k in s.get("breakdown", {})})
            out["breakdown"] = {
                k: summarize([s["breakdown"][k] for s in samples if k in s["breakdown"]]) for k in phases
            }
            return out

        self.bench.results["isolated_route"] = {
            "service": ROUTED,
            "routing_idle_s": ROUTING_IDLE,
            "cold": {"samples": cold, "summary": summary(cold)},
            "warm": {"samples": warm, "summary": summary(warm)},
        }

    # -------------------------------------------------------------- item 4: router overhead

    def router(self) -> None:
        c, p = self.cluster, self.bench.profile
        self.bench.defer("delete the bench-http Deployment and Service", lambda: kc.delete_bench_http(c))
        pod = kc.ensure_bench_http(c)
        kc.wait_settled(c, ROUTED)
        self.ensure_clean_before()
        with self.session(self.settings(), "router") as session:
            route = session.open_route(kc.BENCH_HTTP, per_test=True)
            orders_route = session.open_route(ROUTED, per_test=True)  # a router in front of orders too
            self.local_server(route.local_port)
            router_ip = self._router_ip(kc.BENCH_HTTP)
            orders_router_ip = self._router_ip(ROUTED)
            route_pod = kc.pod_info(c, route.pod)
            svc: Any = c.core.read_namespaced_service(kc.BENCH_HTTP, c.namespace)
            orders_pods: Any = c.core.list_namespaced_pod(c.namespace, label_selector="app.kubernetes.io/name=orders")
            orders_ip = next(x.status.pod_ip for x in orders_pods.items if not x.metadata.deletion_timestamp)
            header = f"kubernetes-route-as:{route.name}"
            # (name, host, port, header, expected X-Bench-Server, throughput too, baseline)
            paths: list[tuple[str, str, int, str | None, str, bool, str | None]] = [
                ("pod direct", pod.ip, 8080, None, "pod", True, None),
                ("router, default", router_ip, 8080, None, "pod", True, "pod direct"),
                ("Service ClusterIP, default", svc.spec.cluster_ip, 80, None, "pod", True, "pod direct"),
                ("route pod direct → tunnel → local", route_pod.ip, 8080, None, "local", True, None),
                ("router + header → route pod → tunnel → local", router_ip, 8080, header, "local", True,
                 "route pod direct → tunnel → local"),
                ("Service ClusterIP + header → … → local", svc.spec.cluster_ip, 80, header, "local", True,
                 "route pod direct → tunnel → local"),
                ("orders pod direct (sample app)", orders_ip, 8080, None, "-", False, None),
                ("orders router, default (sample app)", orders_router_ip, 8080, None, "-", False,
                 "orders pod direct (sample app)"),
            ]  # fmt: skip
            self.bench.results["router"] = {
                "route": route.name,
                "orders_route": orders_route.name,
                "paths": {
                    name: {"target": f"{host}:{port}", "header": hdr, "server": server, "baseline": base}
                    for name, host, port, hdr, server, _, base in paths
                },
                "latency": {},
                "throughput": {},
            }
            out = self.bench.results["router"]
            counts = {"keepalive": p.latency_keepalive, "newconn": p.latency_newconn}
            for rep in range(p.latency_reps):
                for name, host, port, hdr, server, _, _ in paths:
                    # The sample app stalls 40 ms per request on a reused connection (Nagle + delayed ACK:
                    # it writes head and body separately): fewer requests and runs are enough to show it.
                    if server == "-" and rep >= SAMPLE_APP_REPS:
                        continue
                    for mode, full_count in counts.items():
                        count = min(full_count, SAMPLE_APP_COUNT) if server == "-" else full_count
                        args = ["http-latency", "--host", host, "--port", str(port), "--mode", mode, "--count",
                                str(count), "--size", "100", "--expect-server", server]  # fmt: skip
                        if hdr:
                            args += ["--header", hdr]
                        result = self.bench.loadtool(*args, timeout=300)
                        entry = out["latency"].setdefault(name, {}).setdefault(mode, {"runs": [], "errors": 0})
                        entry["runs"].append({k: result.get(k) for k in ("p50_ms", "p99_ms", "count", "servers")})
                        entry["errors"] += int(result.get("errors", 1))
                        if not result.get("ok"):
                            self.bench.fail(
                                f"router latency {name} {mode}: {result.get('first_errors') or result.get('error')}"
                            )
                        self.progress(
                            f"router latency {rep + 1}/{p.latency_reps} {name:<46} {mode:<9} "
                            f"p50 {result.get('p50_ms', float('nan')):7.3f} ms  p99 {result.get('p99_ms', float('nan')):7.3f} ms"
                        )
            for modes in out["latency"].values():
                for entry in modes.values():
                    for q in ("p50_ms", "p99_ms"):
                        entry[q] = summarize([r[q] for r in entry["runs"] if isinstance(r.get(q), float)])
            size = p.router_transfer_bytes
            for rep in range(p.router_transfer_reps):
                for name, host, port, hdr, server, transfer, _ in paths:
                    if not transfer:
                        continue
                    for op in ("sink", "source"):
                        args = ["http-throughput", "--host", host, "--port", str(port), "--op", op, "--bytes",
                                str(size), "--seed", str(rep + 1)]  # fmt: skip
                        if hdr:
                            args += ["--header", hdr]
                        result = self.bench.loadtool(*args, timeout=max(120.0, size / 2**20))
                        # sink: data goes toward the server; source: from it.
                        direction = "to server" if op == "sink" else "from server"
                        entry = (
                            out["throughput"].setdefault(name, {}).setdefault(direction, {"mib_s": [], "errors": []})
                        )
                        if result.get("ok") and result.get("server") == server:
                            entry["mib_s"].append(result["mib_per_s"])
                        else:
                            error = result.get("error") or f"answered by {result.get('server')!r}, not {server!r}"
                            entry["errors"].append(error)
                            self.bench.fail(f"router throughput {name} {direction}: {error}")
                        self.progress(
                            f"router throughput {rep + 1}/{p.router_transfer_reps} {name:<46} {direction:<11} "
                            f"{result.get('mib_per_s', 0):8.1f} MiB/s"
                        )
            for directions in out["throughput"].values():
                for entry in directions.values():
                    entry["summary"] = summarize(entry["mib_s"])
            out["bytes"], out["transfer_reps"], out["latency_reps"], out["counts"] = (
                size, p.router_transfer_reps, p.latency_reps, counts,
            )  # fmt: skip
        out.update(self.wait_clean("router"))

    def _router_ip(self, service: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pods: Any = self.cluster.core.list_namespaced_pod(
                self.cluster.namespace, label_selector=f"{ROUTER_LABEL}={service}"
            )
            for pod in pods.items:
                ready = any(x.type == "Ready" and x.status == "True" for x in pod.status.conditions or [])
                if ready and not pod.metadata.deletion_timestamp:
                    return str(pod.status.pod_ip)
            time.sleep(0.2)
        raise TimeoutError(f"no Ready router for {service} after {timeout:.0f}s")

    # -------------------------------------------------------------- issue 13: warm pool, router wake

    def route_pool(self) -> None:
        """Per-test routes from a warm pool vs started cold, and the router told (wake) vs polling.

        Two sessions side by side in the namespace, neither with a session route: one with
        ``route_pool=2``, one with ``route_pool=0``. Each round opens and closes one per-test route
        in each (the order flips every round; 0.5 s between routes, as between tests). The pool
        keeps the routers, so the cold routes here are today's "beside another route" case. Then
        the manager's ``MANAGER_WAKE_ROUTERS`` is switched off and on in blocks (the manager
        restarts each time) and warm routes are measured in each: "routed" is the time from the
        claim to the canary coming back through the router.
        """
        p = self.bench.profile
        rounds = p.route_pool_rounds
        kc.wait_settled(self.cluster, ROUTED)
        self.ensure_clean_before()
        samples: list[dict[str, Any]] = []
        load: list[list[float]] = []
        with (
            self.session(self.settings(isolate=False, route_pool=2), "route-pool warm") as warm_s,
            self.session(self.settings(isolate=False, route_pool=0), "route-pool cold") as cold_s,
        ):
            first = warm_s.open_route(ROUTED, per_test=True)  # deploys manager and routers; fills the pool
            warm_s.close_route(first)
            pool = warm_s.route_pools[ROUTED]

            def one(session: BridgeSession, mode: str, block: str, n: int) -> None:
                if mode == "warm":
                    deadline = time.monotonic() + 90
                    while len(pool) < 1 and time.monotonic() < deadline:
                        time.sleep(0.1)
                time.sleep(0.5)
                started = time.monotonic()
                route = session.open_route(ROUTED, per_test=True)
                opened = time.monotonic() - started
                session.close_route(route)
                sample = {"mode": mode, "block": block, "round": n, "open_s": round(opened, 4)}
                sample.update({f"{k}_s": round(v, 4) for k, v in route.timings.items()})
                samples.append(sample)
                self.progress(
                    f"route-pool {block} {n + 1}: {mode} route live {route.timings['live']:.3f}s "
                    f"(claimed/pod ready {route.timings['pod_ready']:.3f}s, routed {route.timings['routed']:.3f}s)"
                )

            for n in range(rounds):
                load.append(list(os.getloadavg()))
                order = [(warm_s, "warm"), (cold_s, "cold")]
                for session, mode in order if n % 2 == 0 else order[::-1]:
                    one(session, mode, "pool vs cold", n)
            for i, wake in enumerate([False, True, False, True]):
                self._manager_wake(wake)
                for n in range(max(2, rounds // 2)):
                    one(warm_s, "warm", "wake" if wake else "poll", i * 100 + n)
            load.append(list(os.getloadavg()))

        def stats(mode: str, block: str, key: str) -> dict[str, float]:
            return summarize([s[key] for s in samples if s["mode"] == mode and s["block"] == block and key in s])

        self.bench.results["route_pool"] = {
            "service": ROUTED,
            "rounds": rounds,
            "load_1m_5m_15m": load,
            "samples": samples,
            "summary": {
                "warm live": stats("warm", "pool vs cold", "live_s"),
                "cold live": stats("cold", "pool vs cold", "live_s"),
                "warm open_route": stats("warm", "pool vs cold", "open_s"),
                "cold open_route": stats("cold", "pool vs cold", "open_s"),
                "cold pod ready": stats("cold", "pool vs cold", "pod_ready_s"),
                "cold routed (pod serving -> canary back)": stats("cold", "pool vs cold", "routed_s"),
                "warm routed, wake (claim -> canary back)": stats("warm", "wake", "routed_s"),
                "warm routed, poll only (claim -> canary back)": stats("warm", "poll", "routed_s"),
                "warm live, wake": stats("warm", "wake", "live_s"),
                "warm live, poll only": stats("warm", "poll", "live_s"),
            },
        }
        self.wait_clean("route-pool")

    def pool_scale(self) -> None:
        """Issue 13 item 4, in one process: S sessions at once (threads; xdist workers and parallel
        runs are one session each), each with a warm pool, each opening R per-test routes of
        ``orders`` one after another and keeping them open (0.3 s apart: the test before). Then, with
        all S x R open: untagged requests to the Service must reach none of their tunnels, and every
        route's canary must come back to its own tunnel again."""
        p = self.bench.profile
        n_sessions, per_session, pool = p.pool_scale_sessions, p.pool_scale_routes, p.pool_scale_pool
        kc.wait_settled(self.cluster, ROUTED)
        self.ensure_clean_before()
        samples: list[dict[str, Any]] = []
        errors: list[str] = []
        routes: list[Route] = []
        lock = threading.Lock()
        load = [list(os.getloadavg())]
        with contextlib.ExitStack() as stack:
            sessions = [
                stack.enter_context(
                    self.session(self.settings(isolate=False, route_pool=pool, connect_timeout=90.0), f"pool-scale {i}")
                )
                for i in range(n_sessions)
            ]

            prefilled: list[float] = []
            if p.pool_scale_prefill:  # steady state: every pool full before the burst
                for session in sessions:
                    first = session.open_route(ROUTED, per_test=True)
                    session.close_route(first)
                fill_started = time.monotonic()
                for session in sessions:
                    deadline = time.monotonic() + 300
                    while len(session.route_pools[ROUTED]) < pool and time.monotonic() < deadline:
                        time.sleep(0.2)
                prefilled.append(round(time.monotonic() - fill_started, 2))
                for session in sessions:  # no refills during the burst: 50 more pods would not fit the node
                    session.route_pools[ROUTED].size = 0
                time.sleep(2.0)  # the manager settles
                load.append(list(os.getloadavg()))

            def run(i: int, session: BridgeSession) -> None:
                for n in range(per_session):
                    started = time.monotonic()
                    try:
                        route = session.open_route(ROUTED, per_test=True)
                    except Exception as exc:
                        with lock:
                            errors.append(f"session {i} route {n + 1}: {type(exc).__name__}: {exc}")
                        return
                    with lock:
                        routes.append(route)
                        samples.append({
                            "session": i, "n": n + 1, "open_s": round(time.monotonic() - started, 4),
                            **{f"{k}_s": round(v, 4) for k, v in route.timings.items()},
                        })  # fmt: skip
                    time.sleep(0.3)

            started = time.monotonic()
            threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            all_open_s = time.monotonic() - started
            load.append(list(os.getloadavg()))
            for error in errors:
                self.bench.fail(f"pool-scale: {error}")
            svc: Any = self.cluster.core.read_namespaced_service(ROUTED, self.cluster.namespace)
            before = sum(r.tunnel.tunnel.reverse_total for r in routes if r.tunnel is not None)
            untagged = [_get(f"http://{svc.spec.cluster_ip}/healthz", {}) for _ in range(200)]
            misrouted = sum(r.tunnel.tunnel.reverse_total for r in routes if r.tunnel is not None) - before
            failed = sum(1 for u in untagged if "error" in u)
            if misrouted:
                self.bench.fail(f"pool-scale: {misrouted} untagged requests reached a route's tunnel")
            live = 0
            for r in routes:
                assert r.tunnel is not None
                try:
                    isolation.prove_live(r.tunnel, r.bridged.plan, r.name, 10.0)
                    live += 1
                except Exception as exc:
                    self.bench.fail(f"pool-scale: route {r.name} not live with {len(routes)} open: {exc}")
            closing = time.monotonic()
        close_s = time.monotonic() - closing
        warm = [s["live_s"] for s in samples if s.get("warm_s") == 1.0]
        cold = [s["live_s"] for s in samples if s.get("warm_s") == 0.0]
        self.bench.results["pool_scale"] = {
            "service": ROUTED, "sessions": n_sessions, "routes_per_session": per_session, "pool": pool,
            "opened": len(routes), "errors": errors, "samples": samples, "load_1m_5m_15m": load,
            "all_open_s": round(all_open_s, 2), "untagged requests": len(untagged), "untagged failed": failed,
            "untagged reaching a route tunnel": misrouted, "routes live again at the end": live,
            "live warm": summarize(warm), "live cold": summarize(cold),
            "live all": summarize([s["live_s"] for s in samples]),
            "warm over 1 s": sum(1 for x in warm if x > 1.0), "all over 1 s": sum(1 for s in samples if s["live_s"] > 1.0),
            "close_all_s": round(close_s, 2), "prefill": p.pool_scale_prefill, "pools filled after s": prefilled,
        }  # fmt: skip
        self.progress(
            f"pool-scale: {len(routes)} routes open in {all_open_s:.1f}s; warm {len(warm)}, cold {len(cold)}; "
            f"{misrouted} untagged requests misrouted; {live} live at the end"
        )
        self.wait_clean("pool-scale", timeout=180.0)

    def _manager_wake(self, wake: bool) -> None:
        """Set the manager's MANAGER_WAKE_ROUTERS and wait for its new pod (Recreate) to run."""
        c = self.cluster
        name = "pytest-bridge-routing-manager"
        deployment: Any = c.apps.read_namespaced_deployment(name, c.namespace)
        env = [e for e in deployment.spec.template.spec.containers[0].env if e.name != "MANAGER_WAKE_ROUTERS"]
        env.append({"name": "MANAGER_WAKE_ROUTERS", "value": "1" if wake else "0"})
        body = {"spec": {"template": {"spec": {"containers": [{"name": "manager", "env": env}]}}}}
        c.apps.patch_namespaced_deployment(name, c.namespace, body)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            current: Any = c.apps.read_namespaced_deployment(name, c.namespace)
            status = current.status
            if (
                status.observed_generation == current.metadata.generation
                and status.updated_replicas == status.ready_replicas == status.replicas == 1
            ):
                break
            time.sleep(0.2)
        time.sleep(2.0)  # its first reconcile pass
        self.progress(f"route-pool: routing manager restarted with MANAGER_WAKE_ROUTERS={int(wake)}")

    # -------------------------------------------------------------- item 5: scale

    def scale(self) -> None:
        p = self.bench.profile
        n_max = max(p.route_scale)
        kc.wait_settled(self.cluster, ROUTED)
        self.ensure_clean_before()
        samples: list[dict[str, Any]] = []
        error = None
        mem_before = _mem_available_mib()
        rss_before = memory_kib(os.getpid()).get("VmRSS", 0)
        with self.session(self.settings(connect_timeout=90.0), "route-scale") as session:
            routes: list[Route] = []
            for i in range(n_max):
                started = time.monotonic()
                try:
                    route = session.open_route(ROUTED, per_test=True)
                except Exception as exc:
                    error = f"route {i + 1}: {type(exc).__name__}: {exc}"
                    self.bench.warn(f"route-scale: {error}")
                    break
                routes.append(route)
                samples.append({
                    "n": i + 1, "open_s": round(time.monotonic() - started, 4),
                    **{f"{k}_s": round(v, 4) for k, v in route.timings.items()},
                })  # fmt: skip
                self.progress(
                    f"route-scale: route {i + 1}/{n_max} live {route.timings['live']:.2f}s "
                    f"(pod serving {route.timings['pod_ready']:.2f}s)"
                )
            memory = self._route_memory(routes)
            memory.update({
                "node MemAvailable before MiB": mem_before, "node MemAvailable with all routes MiB": _mem_available_mib(),
                "bench process RSS before MiB": round(rss_before / 1024, 1),
                "bench process RSS with all routes MiB": round(memory_kib(os.getpid()).get("VmRSS", 0) / 1024, 1),
            })  # fmt: skip
            pods: Any = self.cluster.core.list_pod_for_all_namespaces()
            memory["pods on the node (all namespaces)"] = len(pods.items)
            # Every route still live with all of them open: its canary through the router again.
            still, check_started = 0, time.monotonic()
            for r in routes:
                assert r.tunnel is not None
                try:
                    isolation.prove_live(r.tunnel, r.bridged.plan, r.name, 10.0)
                    still += 1
                except Exception as exc:
                    self.bench.fail(f"route-scale: route {r.name} no longer live with {len(routes)} open: {exc}")
            memory["routes live at the end (canary again)"] = still
            memory["canary again, all routes, s"] = round(time.monotonic() - check_started, 2)
            closing = time.monotonic()
            session.close()
            close_s = time.monotonic() - closing
        clean = self.wait_clean("route-scale", timeout=180.0)
        self.bench.results["route_scale"] = {
            "service": ROUTED, "opened": len(samples), "wanted": n_max, "error": error, "samples": samples,
            "memory": memory, "close_all_s": round(close_s, 3), **clean,
        }  # fmt: skip
        self.progress(f"route-scale: {len(samples)} routes; closed all in {close_s:.1f}s; {clean}")

    def _route_memory(self, routes: list[Route]) -> dict[str, Any]:
        rss = []
        for route in routes:
            with contextlib.suppress(Exception):
                info = kc.pod_info(self.cluster, route.pod)
                rss += [memory_kib(pid).get("VmRSS", 0) for pid in pids_in_pod(info.uid)]
        return {
            "route pod processes": len(rss),
            "route pod RSS median MiB": round(float(summarize([r / 1024 for r in rss]).get("median", 0.0)), 1),
            "route pods RSS total MiB": round(sum(rss) / 1024, 1),
        }

    # -------------------------------------------------------------- --quick

    def smoke(self) -> None:
        """One route end to end: with the header to a local server, without to the cluster's pod."""
        c = self.cluster
        kc.wait_settled(c, ROUTED)
        self.ensure_clean_before()
        result: dict[str, Any] = {}
        with self.session(self.settings(), "route smoke") as session:
            started = time.monotonic()
            session.connect()
            result["connect_s"] = round(time.monotonic() - started, 3)
            route = session.routes[ROUTED]
            result.update({f"route_{k}_s": round(v, 3) for k, v in route.timings.items()})
            self.local_server(route.local_port)
            svc: Any = c.core.read_namespaced_service(ROUTED, c.namespace)
            url = f"http://{svc.spec.cluster_ip}/healthz"
            routed = _get(url, {"kubernetes-route-as": route.name})
            default = _get(url, {})
            result["with header"], result["without header"] = routed, default
            if routed.get("x-bench-server") != "local" or routed.get("x-bench-route") != route.name:
                self.bench.fail(
                    f"route smoke: a request with the route header did not reach the local server: {routed}"
                )
            if default.get("status") != 200 or "x-bench-server" in default:
                self.bench.fail(
                    f"route smoke: a request without the header did not reach the cluster's {ROUTED}: {default}"
                )
            closing = time.monotonic()
            session.close()
            result["close_s"] = round(time.monotonic() - closing, 3)
        result.update(self.wait_clean("route smoke", timeout=60.0))
        self.bench.results["route_smoke"] = result
        self.progress(
            f"route smoke: connect(isolate=True) {result['connect_s']:.2f}s (route live {result.get('route_live_s', float('nan')):.2f}s); "
            f"header -> {result['with header'].get('x-bench-server', '?')}, no header -> "
            f"{'cluster' if 'x-bench-server' not in result['without header'] else '?'}; namespace clean after "
            f"{result.get('manager_gone_s', result.get('restored_s', float('nan')))}s"
        )


def _get(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Status and headers (lower-case names) of one GET, or the error."""
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            reply.read()
            return {"status": reply.status, **{k.lower(): v for k, v in reply.headers.items()}}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")
