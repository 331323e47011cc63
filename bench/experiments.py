"""``python -m bench.experiments NAME``: the what-if runs behind the analysis in BENCHMARKS.md.

Not part of ``python -m bench``: each one changes one thing on the side of a live bridge session
and measures the difference, alternating the variants so that load from other processes on the
machine hits all of them alike. They use the session's token (a private attribute) to open a
second tunnel to the same agent, which the agent allows (the most recent client gets the
cluster -> local streams), so no plugin code is changed to try a variant.

- ``profile``: py-spy on the tunnel client (this process) and the agent, ``perf`` on containerd,
  while 256 MiB transfers run through the bridge (``--direction to-local|to-cluster``);
- ``window``: the tunnel client's receive window, 1 (default), 4 and 8 MiB, for cluster -> local;
- ``transport``: the same agent and multiplexer over ``kubectl port-forward`` (tcp_connector)
  instead of our websocket port-forward (v4.channel.k8s.io);
- ``outbound-target``: new-connection latency when the outbound stream names the Service by FQDN
  (what the session does), by FQDN with a trailing dot, or by its ClusterIP.
- ``hops``: local -> cluster throughput as hops are added to ``kubectl port-forward svc/…``:
  a relay (run with ``kubectl exec``) in the server's own pod, then in the agent pod to the
  server's pod IP and to its ClusterIP, then also a local relay, against the bridge's outbound
  path. The agent-pod relay is the ceiling of any design whose outbound traffic leaves the
  cluster side from the agent (B2K's, ours); ``--pause`` idles before each transfer.
- ``levers``: the session's own tunnel (kubectl transport, lanes) under one lever at a time --
  larger socket buffers, 1 MiB relay reads, ``splice(2)`` instead of ``recv_into``/``sendall``
  in the tunnel client's relay, outbound traffic to the server's pod IP instead of its
  ClusterIP -- each beside raw ``kubectl port-forward`` in the same slot, both directions,
  bridge out and bridge in; the levers are swapped in this process only (``--levers``), the
  plugin's defaults are untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_bridge_agent.lanes as lanes_module
from pytest_bridge_agent.pipes import describe_error

from pytest_bridge.core.plan import LocalPortSpec
from pytest_bridge.orchestration.session import BridgeSession
from pytest_bridge.settings import BridgeSettings, NameMappingMode
from pytest_bridge.transport.portforward import ApiEndpoint, open_portforward
from pytest_bridge.transport.tunnel import Tunnel, tcp_connector
from pytest_bridge.transport.tunnel_thread import BackgroundTunnel

from . import cluster as kc
from .loadtool import pattern_digest
from .procstat import CpuMeter, find_pids, pids_in_pod, system_cpu
from .runner import LoadPath

REPO = Path(__file__).resolve().parent.parent
TARGET_PORT = 8080
CONTROL_PORT = 47100
MIB = 2**20


@dataclass
class Live:
    cluster: kc.Cluster
    session: BridgeSession
    agent: kc.PodInfo
    local_port: int
    bench_pod: kc.PodInfo

    def tunnel(self, connect: Any, window: int | None = None) -> BackgroundTunnel:
        """A second client of the same agent; it gets the cluster -> local streams while it is connected."""
        options = {"window": window} if window else {}
        token = self.session.tunnel_token("orders")  # the experiment's own bridge
        assert token is not None
        tunnel = BackgroundTunnel(connect, token, {TARGET_PORT: self.local_port}, **options)
        tunnel.start()
        time.sleep(0.3)
        return tunnel

    def websocket_connector(self) -> Any:
        endpoint = ApiEndpoint.from_configuration(self.session.client.configuration)

        async def connect() -> Any:
            forward = await open_portforward(endpoint, self.cluster.namespace, self.agent.name, CONTROL_PORT)
            return forward.reader, forward.writer

        return connect


@contextlib.contextmanager
def live_bridge(kubeconfig: str, namespace: str) -> Iterator[Live]:
    c = kc.load(kubeconfig, namespace, kc.default_kubectl())
    kc.ensure_sample_app(c)
    pod = kc.create_bench_server(c)
    reserve = socket.socket()
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]
    settings = BridgeSettings(
        services=("orders",), namespace=namespace, kubeconfig=Path(kubeconfig),
        name_mapping=NameMappingMode.IN_PROCESS, local_ports=(LocalPortSpec(port, TARGET_PORT),),
    )  # fmt: skip
    session = BridgeSession(settings)
    local = None
    try:
        session.connect()
        local = kc.PortProcess(
            [sys.executable, "-m", "bench.loadtool", "server", "--fd", str(reserve.fileno())],
            {**os.environ, "PYTHONPATH": str(REPO)}, "local load server", pass_fds=(reserve.fileno(),),
        )  # fmt: skip
        reserve.close()
        agent = kc.pod_info(c, session.services["orders"].agent_pod)
        yield Live(c, session, agent, port, pod)
    finally:
        reserve.close()
        if local is not None:
            local.close()
        session.close()
        kc.delete_bench_server(c)
        kc.wait_settled(c, "orders")
        c.api.close()  # type: ignore[no-untyped-call]


def _load(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadtool", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _transfer(
    host: str, port: int, direction: str, size: int = 256 * MIB, *, server_in_cluster: bool = False
) -> dict[str, Any]:
    """One transfer ``direction`` (``to-local`` or ``to-cluster``) to a load server, local or in a pod."""
    path = LoadPath(direction, host, port, "pod" if server_in_cluster else "local", False, "")
    op = path.op_for(direction.replace("-", " "))
    return _load("throughput", "--host", host, "--port", str(port), "--op", op, "--bytes", str(size),
                 "--expect", pattern_digest(1, size))  # fmt: skip


def _busy(fn: Any) -> tuple[Any, float]:
    busy0, total0 = system_cpu()
    result = fn()
    busy1, total1 = system_cpu()
    return result, (busy1 - busy0) / (total1 - total0)


def window(live: Live, rounds: int) -> None:
    results: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for i in range(rounds):
        for size in (1, 4, 8):
            tunnel = live.tunnel(live.websocket_connector(), window=size * MIB)
            try:
                for direction in ("to-local", "to-cluster"):
                    r, busy = _busy(lambda d=direction: _transfer(live.agent.ip, TARGET_PORT, d))
                    results[(size, direction)].append(r["mib_per_s"])
                    print(
                        f"round {i + 1}: window {size} MiB {direction:<10} {r['mib_per_s']:6.1f} MiB/s busy {busy:.0%}"
                    )
            finally:
                tunnel.stop()
    for (size, direction), values in sorted(results.items()):
        print(
            f"tunnel window {size} MiB, {direction}: median {statistics.median(values):.1f} MiB/s {[round(v) for v in values]}"
        )


def transport(live: Live, rounds: int) -> None:
    results: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    forward = kc.kubectl_port_forward(live.cluster, f"pod/{live.agent.name}", CONTROL_PORT)
    try:
        for i in range(rounds):
            for name in ("websocket v4 (ours)", "kubectl port-forward"):
                if name.startswith("kubectl"):
                    connect = tcp_connector("127.0.0.1", forward.port)
                else:
                    connect = live.websocket_connector()
                tunnel = live.tunnel(connect)
                try:
                    for direction in ("to-local", "to-cluster"):
                        meter = CpuMeter({
                            "tunnel client": [os.getpid()], "kubectl": [forward.pid],
                            "agent": pids_in_pod(live.agent.uid, "pytest_bridge_agent"),
                            "kube-apiserver": find_pids("kube-apiserver"), "kubelet": find_pids("kubelet"),
                            "containerd": find_pids("containerd"),
                        })  # fmt: skip
                        meter.start()
                        r = _transfer(live.agent.ip, TARGET_PORT, direction)
                        cpu = meter.stop()
                        per_gib = {k: v / (256 / 1024) for k, v in cpu.items() if k != "machine capacity"}
                        results[(name, direction)].append({"mib_s": r["mib_per_s"], **per_gib})
                        print(f"round {i + 1}: {name:<22} {direction:<10} {r['mib_per_s']:6.1f} MiB/s "
                              f"containerd {per_gib['containerd']:.2f} CPU-s/GiB")  # fmt: skip
                finally:
                    tunnel.stop()
    finally:
        forward.close()
    for (name, direction), runs in sorted(results.items()):
        keys = runs[0].keys()
        medians = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
        print(f"{name}, {direction}: medians (MiB/s, CPU-s/GiB): {medians}")


def outbound_target(live: Live, rounds: int) -> None:
    service: Any = live.cluster.core.read_namespaced_service(kc.BENCH_SERVER, live.cluster.namespace)
    service_ip = str(service.spec.cluster_ip)
    fqdn = f"{kc.BENCH_SERVER}.{live.cluster.namespace}.svc.cluster.local"
    tunnel = live.tunnel(live.websocket_connector())
    try:
        targets = {"FQDN (as the session does)": fqdn, "FQDN with trailing dot": fqdn + ".", "ClusterIP": service_ip}
        ports = {name: tunnel.serve_outbound("127.0.0.1", 0, host, kc.BENCH_PORT)[1] for name, host in targets.items()}
        results: dict[str, list[float]] = collections.defaultdict(list)
        for i in range(rounds):
            for name, port in ports.items():
                r = _load("latency", "--host", "127.0.0.1", "--port", str(port), "--mode", "newconn", "--count", "300")
                results[name].append(r["p50_ms"])
                print(f"round {i + 1}: {name:<28} new connection p50 {r['p50_ms']:.3f} ms")
    finally:
        tunnel.stop()
    for name, values in results.items():
        print(f"{name}: new-connection p50, median of {len(values)} runs: {statistics.median(values):.3f} ms")


# A relay like the agent's lanes.relay (asyncio, recv_into/sendall, 256 KiB), self-contained so
# that it runs in any pod with a python3: the agent's and the bench server's.
_RELAY = """
import asyncio, socket, sys

async def copy(loop, src, dst):
    buffer = bytearray(262144)
    view = memoryview(buffer)
    while n := await loop.sock_recv_into(src, buffer):
        await loop.sock_sendall(dst, view[:n])
    dst.shutdown(socket.SHUT_WR)

async def pipe(loop, near, host, port):
    far = socket.socket()
    far.setblocking(False)
    await loop.sock_connect(far, (host, port))
    await asyncio.gather(copy(loop, near, far), copy(loop, far, near))
    near.close()
    far.close()

async def serve(listen_port, host, port):
    loop = asyncio.get_running_loop()
    server = socket.create_server(("127.0.0.1", listen_port), backlog=64)
    server.setblocking(False)
    print("listening 127.0.0.1", server.getsockname()[1], flush=True)
    while True:
        near, _ = await loop.sock_accept(server)
        near.setblocking(False)
        asyncio.ensure_future(pipe(loop, near, host, port))

asyncio.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""
POD_RELAY_PORTS = (47190, 47191)


def _pod_relay(c: kc.Cluster, pod: str, listen_port: int, host: str, port: int) -> subprocess.Popen[str]:
    """``_RELAY`` run in ``pod`` with ``kubectl exec``, once it listens on ``listen_port``."""
    process = subprocess.Popen(
        [c.kubectl, "exec", "-n", c.namespace, pod, "--", "python3", "-c", _RELAY, str(listen_port), host, str(port)],
        env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening" not in line:
        kc.stop_process_group(process)
        raise RuntimeError(f"relay in pod {pod} did not start: {line.strip()}")
    return process


def hops(live: Live, rounds: int, size: int = 256 * MIB, pause: float = 0.0, inbound: bool = False) -> None:
    """Local -> cluster, one hop at a time from ``kubectl port-forward svc/…`` to the bridge's outbound path."""
    c = live.cluster
    service: Any = c.core.read_namespaced_service(kc.BENCH_SERVER, c.namespace)
    service_ip = str(service.spec.cluster_ip)
    server = live.bench_pod
    outbound = live.session.services["orders"].mapping.service(kc.BENCH_SERVER)
    pod_ip_port, cluster_ip_port = POD_RELAY_PORTS
    with contextlib.ExitStack() as stack:
        for pod, listen, host in (
            (server.name, pod_ip_port, "127.0.0.1"),  # in the server's own pod: no pod network
            (live.agent.name, pod_ip_port, server.ip),  # agent pod -> server pod, over the pod network
            (live.agent.name, cluster_ip_port, service_ip),  # ... through the Service (iptables DNAT)
        ):
            stack.callback(kc.stop_process_group, _pod_relay(c, pod, listen, host, kc.BENCH_PORT))

        def forward(target: str, port: int) -> int:
            process = kc.kubectl_port_forward(c, target, port)
            stack.callback(process.close)
            return process.port

        via_agent = forward(f"pod/{live.agent.name}", cluster_ip_port)
        local_relay = kc.PortProcess(
            [sys.executable, "-c", _RELAY, "0", "127.0.0.1", str(via_agent)], dict(os.environ), "local relay"
        )
        stack.callback(local_relay.close)
        paths = {
            "kubectl pf svc (baseline)": ("127.0.0.1", forward(f"svc/{kc.BENCH_SERVER}", kc.BENCH_PORT)),
            "kubectl pf server pod, relay in it to localhost": (
                "127.0.0.1", forward(f"pod/{server.name}", pod_ip_port),
            ),
            "kubectl pf agent pod, relay to the pod IP": ("127.0.0.1", forward(f"pod/{live.agent.name}", pod_ip_port)),
            "kubectl pf agent pod, relay to the ClusterIP": ("127.0.0.1", via_agent),
            "the same + a local relay": ("127.0.0.1", local_relay.port),
            "bridge out (ours)": (outbound.ip, outbound.local_port(kc.BENCH_PORT)),
        }  # fmt: skip
        meter = CpuMeter({
            "tunnel client": [os.getpid()], "agent pod": pids_in_pod(live.agent.uid),
            "server pod": pids_in_pod(server.uid), "kubectl": find_pids("kubectl"),
            "kube-apiserver": find_pids("kube-apiserver"), "kubelet": find_pids("kubelet"),
            "containerd": find_pids("containerd"),
        })  # fmt: skip
        mib_s: dict[str, list[float]] = collections.defaultdict(list)
        breakdown: dict[str, list[dict[str, float]]] = collections.defaultdict(list)  # CPU-s/GiB by process
        for i in range(rounds):
            for name, (host, port) in paths.items():
                if inbound:  # as in `python -m bench`, where bridge-in transfers come first
                    for direction in ("to-local", "to-cluster"):
                        time.sleep(pause)
                        _transfer(live.agent.ip, TARGET_PORT, direction, size)
                time.sleep(pause)  # the previous transfer's after-work (GC, ...) must not land on this one
                meter.start()
                r = _transfer(host, port, "to-cluster", size, server_in_cluster=True)
                cpu = meter.stop()
                assert r["ok"], r
                mib_s[name].append(r["mib_per_s"])
                breakdown[name].append({k: v / (size / 2**30) for k, v in cpu.items() if k != "machine capacity"})
                busy = cpu["machine busy"] / cpu["machine capacity"]
                print(f"round {i + 1}: {name:<48} {r['mib_per_s']:6.1f} MiB/s, "
                      f"machine {breakdown[name][-1]['machine busy']:5.2f} CPU-s/GiB, {busy:.0%} busy")  # fmt: skip
    base = statistics.median(mib_s["kubectl pf svc (baseline)"])
    print(f"\n{rounds} rounds of {size // MIB} MiB each, {pause:g} s idle before each")
    print("| path, local -> cluster | MiB/s (median) | % of kubectl pf svc | whole machine, CPU-s/GiB (median) |")
    print("|---|---|---|---|")
    for name, values in mib_s.items():
        mib = statistics.median(values)
        machine = statistics.median(r["machine busy"] for r in breakdown[name])
        print(f"| {name} | {mib:.1f} | {100 * mib / base:.0f} % | {machine:.2f} |")
    keys = list(next(iter(breakdown.values()))[0])
    print("\nCPU-s per GiB by process (medians)\n")
    print(f"| path | {' | '.join(keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    for name, by_process in breakdown.items():
        print(f"| {name} | {' | '.join(f'{statistics.median(r[k] for r in by_process):.2f}' for k in keys)} |")


# ---- levers: swapped in this process only, in the tunnel client's relay ----
_ORIGINAL_RELAY = lanes_module.relay
LEVER_BUFFER = 4 * MIB  # net.core.{r,w}mem_max here; the kernel doubles what it grants
SPLICE_CHUNK = MIB


async def _splice_relay(
    a: socket.socket, b: socket.socket, *, stats: Any = None, idle_timeout: float | None = None
) -> lanes_module.RelayResult:
    """``lanes.relay`` with ``splice(2)`` through a pipe: the bytes never enter this process.

    Same contract: half-close forwarded, any error aborts both sockets with RST. No idle
    watchdog (a benchmark transfer is never idle).
    """
    loop = asyncio.get_running_loop()
    result = lanes_module.RelayResult()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

    async def ready(sock: socket.socket, write: bool) -> None:
        future = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
        add(sock.fileno(), _resolve, future)
        try:
            await future
        finally:
            remove(sock.fileno())

    async def copy(src: socket.socket, dst: socket.socket, forward: bool) -> None:
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, SPLICE_CHUNK)
            while True:
                try:
                    n = os.splice(src.fileno(), pipe_w, SPLICE_CHUNK, flags=flags)
                except BlockingIOError:  # the pipe is empty here, so: nothing to read yet
                    await ready(src, False)
                    continue
                if n == 0:
                    break
                left = n
                while left:
                    try:
                        left -= os.splice(pipe_r, dst.fileno(), left, flags=flags)
                    except BlockingIOError:
                        await ready(dst, True)
                if forward:
                    result.bytes_ab += n
                else:
                    result.bytes_ba += n
            dst.shutdown(socket.SHUT_WR)
        finally:
            os.close(pipe_r)
            os.close(pipe_w)

    clean = False
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(copy(a, b, True))
            tg.create_task(copy(b, a, False))
        clean = True
    except ExceptionGroup as eg:
        result.error = describe_error(eg.exceptions[0])
    finally:
        for sock in (a, b):
            if clean:
                sock.close()
            else:
                lanes_module.abort_socket(sock)
    return result


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the fd may fire again before the waiter removes it
        future.set_result(None)


_relays_seen: collections.Counter[str] = collections.Counter()  # lane relays run per lever


def _counted(name: str, relay: Any, prepare: Any = None) -> Any:
    async def wrapped(a: socket.socket, b: socket.socket, **kw: Any) -> lanes_module.RelayResult:
        _relays_seen[name] += 1
        if prepare is not None:
            prepare(a)
            prepare(b)
        result: lanes_module.RelayResult = await relay(a, b, **kw)
        return result

    return wrapped


def _big_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LEVER_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LEVER_BUFFER)


def _big_send_buffer(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LEVER_BUFFER)


LEVERS = {
    "baseline": "defaults: recv_into/sendall, 16 KiB reads growing to 256 KiB, kernel-tuned buffers",
    "sndbuf": f"SO_SNDBUF {LEVER_BUFFER // MIB} MiB on both sockets of each client-side lane relay",
    "bufs": f"SO_SNDBUF and SO_RCVBUF {LEVER_BUFFER // MIB} MiB on both (fixes the receive window: no autotuning)",
    "chunk1m": "1 MiB relay reads from the first read on (RELAY_CHUNK, RELAY_FIRST_CHUNK)",
    "splice": f"splice(2) through a {SPLICE_CHUNK // MIB} MiB pipe instead of recv_into/sendall",
    "podip": "bridge out only: the outbound listener names the server's pod IP instead of its ClusterIP",
}


def _set_lever(tunnel: Tunnel, name: str) -> None:
    """Swap ``tunnel``'s lane relay (its public ``lane_relay``) for the one of lever ``name``."""
    relay = _counted(name, _ORIGINAL_RELAY)
    if name == "sndbuf":
        relay = _counted(name, _ORIGINAL_RELAY, _big_send_buffer)
    elif name == "bufs":
        relay = _counted(name, _ORIGINAL_RELAY, _big_buffers)
    elif name == "chunk1m":
        relay = _counted(name, functools.partial(_ORIGINAL_RELAY, chunk=MIB, first_chunk=MIB))
    elif name == "splice":
        relay = _counted(name, _splice_relay)
    tunnel.lane_relay = relay


def levers(live: Live, rounds: int, names: list[str], size: int = 256 * MIB, out: Path | None = None) -> None:
    """Each lever beside raw ``kubectl port-forward``, slot by slot, both directions."""
    c = live.cluster
    tunnel = live.session.tunnel_of("orders")
    assert tunnel is not None
    outbound = live.session.services["orders"].mapping.service(kc.BENCH_SERVER)
    bridge_out = (outbound.ip, outbound.local_port(kc.BENCH_PORT))
    pod_ip_out = tunnel.serve_outbound("127.0.0.1", 0, live.bench_pod.ip, kc.BENCH_PORT)
    forwards = {name: kc.kubectl_port_forward(c, target, kc.BENCH_PORT)
                for name, target in (("pf svc", f"svc/{kc.BENCH_SERVER}"), ("pf pod", f"pod/{live.bench_pod.name}"))}  # fmt: skip
    # (path, baseline): bridge out against kubectl pf svc (the Service, as the app names it),
    # bridge in against kubectl pf pod, as in `python -m bench`.
    pairs = [("out", "pf svc"), ("in", "pf pod")]
    mib_s: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)  # (lever, path, direction)
    ratios: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    loads: list[float] = []
    log_lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    def run(path: str, direction: str) -> float:
        if path == "in":
            r = _transfer(live.agent.ip, TARGET_PORT, direction, size)
        else:
            host, port = {"pf svc": ("127.0.0.1", forwards["pf svc"].port),
                          "pf pod": ("127.0.0.1", forwards["pf pod"].port),
                          "out": bridge_out, "podip": pod_ip_out}[path]  # fmt: skip
            r = _transfer(host, port, direction, size, server_in_cluster=True)
        assert r["ok"], r
        return float(r["mib_per_s"])

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    say(f"levers {names}, {rounds} rounds of {size // MIB} MiB, started {started}, load {os.getloadavg()}")
    try:
        for i in range(rounds):
            order = names[i % len(names) :] + names[: i % len(names)]  # each lever leads once in a while
            for lever in order:
                _set_lever(tunnel.tunnel, lever)
                for path, base in pairs:
                    bridge_path = "podip" if lever == "podip" else path
                    if lever == "podip" and path == "in":
                        continue
                    for direction in ("to-cluster", "to-local"):
                        first_kubectl = i % 2 == 0  # alternate which of the two goes first
                        a, b = (base, bridge_path) if first_kubectl else (bridge_path, base)
                        got = {a: run(a, direction), b: run(b, direction)}
                        key = (lever, path, direction)
                        mib_s[key].append(got[bridge_path])
                        mib_s[("kubectl", base + f" ({lever})", direction)].append(got[base])
                        ratios[key].append(got[bridge_path] / got[base])
                        say(f"round {i + 1}: {lever:<8} bridge {path:<3} {direction:<10} {got[bridge_path]:6.1f} "
                            f"vs kubectl {base} {got[base]:6.1f} MiB/s = {100 * got[bridge_path] / got[base]:5.1f} %")  # fmt: skip
            load = os.getloadavg()[0]
            loads.append(load)
            say(f"round {i + 1} done, load average (1 min) {load:.2f}")
    finally:
        tunnel.tunnel.lane_relay = _ORIGINAL_RELAY
        for forward in forwards.values():
            forward.close()
    say(f"\nlane relays run per lever in this process: {dict(_relays_seen)}")
    say(
        f"load average (1 min) after each round: {[round(x, 2) for x in loads]}; finished {time.strftime('%H:%M:%S UTC', time.gmtime())}"
    )
    say("\n| lever | bridge out, to cluster | bridge out, to local | bridge in, to cluster | bridge in, to local |")
    say("|---|---|---|---|---|")
    for lever in names:
        cells = []
        for path in ("out", "in"):
            for direction in ("to-cluster", "to-local"):
                values = ratios.get((lever, path, direction))
                if not values:
                    cells.append("—")
                    continue
                runs = ", ".join(f"{100 * v:.0f}" for v in values)
                cells.append(f"**{100 * statistics.median(values):.1f} %** ({runs}); "
                             f"{statistics.median(mib_s[(lever, path, direction)]):.0f} MiB/s")  # fmt: skip
        say(f"| {lever} | {' | '.join(cells)} |")
    if out is not None:
        out.write_text("\n".join(log_lines) + "\n")


def _collapse(path: Path, only_thread: str | None = None, top: int = 12) -> None:
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if only_thread and only_thread not in stack:
            continue
        total += int(samples)
        leaf[stack.split(";")[-1]] += int(samples)
    print(f"{path.name}: {total} samples, top functions by own time")
    for name, count in leaf.most_common(top):
        print(f"  {100 * count / max(total, 1):5.1f}%  {name}")


def profile(live: Live, rounds: int, direction: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    agent_pid = pids_in_pod(live.agent.uid, "pytest_bridge_agent")[0]
    seconds = max(5, rounds * 4)
    profilers = [
        subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--duration", str(seconds), "--rate", "250",
                          "--format", "raw", "-o", str(out / "tunnel-client.txt"), "--nonblocking"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([py_spy, "record", "--pid", str(agent_pid), "--duration", str(seconds), "--rate", "250",
                          "--format", "raw", "-o", str(out / "agent.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    if shutil.which("perf"):
        pids = ",".join(map(str, find_pids("containerd")))
        profilers.append(subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-o", str(out / "containerd.perf"), "-p", pids, "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    time.sleep(1)
    for _ in range(rounds):
        r = _transfer(live.agent.ip, TARGET_PORT, direction)
        print(f"{direction}: {r['mib_per_s']:.1f} MiB/s (profiled)")
    for profiler in profilers:
        profiler.wait()
    _collapse(out / "tunnel-client.txt", only_thread="BackgroundTunnel._run_loop")
    _collapse(out / "agent.txt", only_thread="run_forever")
    if (out / "containerd.perf").exists():
        print(f"containerd: perf report -i {out / 'containerd.perf'} --stdio --children --sort symbol -g none")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("name", choices=("profile", "window", "transport", "outbound-target", "hops", "levers"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256, help="MiB per transfer (hops)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds idle before each transfer (hops)")
    parser.add_argument("--inbound", action="store_true", help="bridge-in transfers before each path's (hops)")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)} (levers)")
    parser.add_argument("--log", type=Path, help="also write the levers output here")
    parser.add_argument("--direction", choices=("to-local", "to-cluster"), default="to-cluster")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-profile")
    parser.add_argument("--namespace", default="bridge-bench")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pytest_bridge").setLevel(logging.ERROR)
    if args.namespace == "bridge-demo" or not args.kubeconfig:
        parser.error("needs KUBECONFIG and a namespace other than bridge-demo")
    with live_bridge(args.kubeconfig, args.namespace) as live:
        if args.name == "window":
            window(live, args.rounds)
        elif args.name == "transport":
            transport(live, args.rounds)
        elif args.name == "outbound-target":
            outbound_target(live, args.rounds)
        elif args.name == "levers":
            chosen = [x.strip() for x in args.levers.split(",") if x.strip()]
            if unknown := set(chosen) - set(LEVERS):
                parser.error(f"unknown levers {sorted(unknown)}; known: {', '.join(LEVERS)}")
            levers(live, args.rounds, chosen, args.mib * MIB, args.log)
        elif args.name == "hops":
            hops(live, args.rounds, args.mib * MIB, args.pause, args.inbound)
        else:
            profile(live, args.rounds, args.direction, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
