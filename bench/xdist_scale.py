"""``python -m bench.xdist_scale``: per-test routes from real pytest runs with xdist, side by side.

Issue 13 item 4 as users run it: ``--runs`` pytest runs at once (parallel CI jobs on one shared
cluster), each with ``-n --workers`` xdist workers and a warm route pool, each run with
``--tests`` tests marked ``@pytest.mark.isolated`` on ``orders``. Every test starts its local
``orders`` (the sample app), then waits until every worker of every run has a route live at
the same moment (a barrier across runs; it gives up after ``--barrier`` seconds and the run
reports the concurrency it reached), then checks its own traffic: requests through ``frontend``
with its route's header must reach its local process, untagged ones an original pod.

Reported: every route's live time (warm: claimed from the pool; cold: the first per worker,
which has no pool yet), how many exceed 1 s, the peak number of routes live at once, and
misrouted requests (a tagged request answered by anyone but its local process, or an untagged
one answered by any local process). Exit status 1 when a run failed or a request was misrouted.

Needs a cluster with the sample app (``python -m bench`` sets one up in its namespace) and
KUBECONFIG. Nothing here is timed in a unit test; figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import cluster as kc
from .procstat import CpuByKind

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
DEFAULT_NAMESPACE = "bridge-bench"

SUITE = """
import json, os, sys, time, urllib.request
from pathlib import Path

import pytest

SHARED = Path(os.environ["SCALE_SHARED"])
NS = os.environ["SCALE_NAMESPACE"]
WANT = int(os.environ["SCALE_CONCURRENT"])
BARRIER = float(os.environ["SCALE_BARRIER"])
CHECKS = int(os.environ["SCALE_CHECKS"])
RUN = os.environ["SCALE_RUN"]
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def get(headers):
    request = urllib.request.Request(f"http://frontend.{NS}/api", headers=headers)
    return json.load(urllib.request.urlopen(request, timeout=30))["downstream"][0]


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(int(os.environ["SCALE_TESTS"])))
def test_route(isolated_route, n):
    route = isolated_route.route
    opened = time.time()
    isolated_route.start(
        [sys.executable, __APP__],
        env={"SERVICE_NAME": "orders", "LISTEN_PORT": str(isolated_route.local_port),
             "LISTEN_PORT_2": str(isolated_route.local_ports[9091]), "HOSTNAME": f"local-{route.name}",
             "DOWNSTREAM": "http://inventory/api"},
    )
    live = SHARED / f"{route.name}.live"
    live.write_text(WORKER)
    waited = time.monotonic()
    peak = 0
    try:
        while True:
            now = len(list(SHARED.glob("*.live")))
            peak = max(peak, now)
            if now >= WANT or (SHARED / "go").exists() or time.monotonic() - waited > BARRIER:
                if now >= WANT:
                    (SHARED / "go").write_text("all live")
                break
            time.sleep(0.1)
        tagged_wrong, untagged_wrong = [], []
        for _ in range(CHECKS):
            mine = get(isolated_route.header).get("pod")
            if mine != f"local-{route.name}":
                tagged_wrong.append(mine)
            other = get({}).get("pod", "")
            if not other.startswith("orders-"):
                untagged_wrong.append(other)
    finally:
        live.unlink()
    (SHARED / f"{route.name}.json").write_text(json.dumps({
        "route": route.name, "run": RUN, "worker": WORKER, "opened_at": opened,
        "live_s": route.timings.get("live"), "warm": route.timings.get("warm") == 1.0,
        "timings": route.timings, "peak_seen": peak, "checks": CHECKS,
        "tagged_misrouted": tagged_wrong, "untagged_misrouted": untagged_wrong,
    }))
    assert not tagged_wrong and not untagged_wrong, (tagged_wrong, untagged_wrong)
"""


_KNOWN = (
    "kube-apiserver", "kubelet", "containerd", "etcd", "kubectl", "kube-proxy", "kube-controller", "kube-scheduler",
    "nginx", "coredns", "runc",
)  # fmt: skip


def process_kind(comm: str, argv: list[str]) -> str:
    """What a process on this machine is, for the CPU table (``comm`` is at most 15 characters)."""
    line = " ".join(argv)
    if "pytest-bridge.pyz" in line:
        after = line.split("pytest-bridge.pyz", 1)[1].split()
        return f"in-cluster {after[0] if after else 'code'}"
    if "exec(eval(sys.stdin.readline()))" in line:
        return "pytest xdist workers"
    if "-m pytest" in line:
        return "pytest controllers"
    if line.endswith(str(APP)) or str(APP) in line:
        return "local orders (sample app)"
    if "/app/app.py" in line:
        return "cluster sample app"
    if comm.startswith("containerd-shim"):
        return "containerd-shim"
    for known in _KNOWN:
        if comm.startswith(known[:15]):
            return known
    return "other"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.xdist_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="pytest runs at once (default 4)")
    parser.add_argument("--workers", type=int, default=4, help="xdist workers per run (-n; default 4)")
    parser.add_argument("--tests", type=int, default=13, help="isolated tests per run (default 13)")
    parser.add_argument("--pool", type=int, default=2, help="--bridge-route-pool per worker (default 2)")
    parser.add_argument("--checks", type=int, default=5, help="tagged + untagged request pairs per test (default 5)")
    parser.add_argument(
        "--barrier", type=float, default=15.0, help="seconds a test waits for all to be live (default 15)"
    )
    parser.add_argument("--namespace", default=os.environ.get("BENCH_NAMESPACE", DEFAULT_NAMESPACE))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "xdist-scale.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "xdist-scale.md")
    return parser.parse_args(argv)


def _summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }


def _output_excerpt(text: str) -> str:
    """A run's output for the report: its failures (the start of pytest's FAILURES section), then its tail."""
    failures = text.find("= FAILURES =")
    head = text[failures : failures + 8000] + "\n[...]\n" if failures >= 0 else ""
    return head + text[-3000:]


def run(args: argparse.Namespace) -> dict[str, Any]:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise SystemExit("set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    cluster = kc.load(kubeconfig, args.namespace, kc.default_kubectl())
    kc.ensure_sample_app(cluster)
    kc.wait_routing_clean(cluster, timeout=180.0, manager=False)
    work = Path(tempfile.mkdtemp(prefix="pytest-bridge-xdist-scale-"))
    shared = work / "shared"
    shared.mkdir()
    (work / "test_scale.py").write_text(SUITE.replace("__APP__", repr(str(APP))))
    concurrent = args.runs * args.workers
    env = {
        **os.environ,
        "SCALE_SHARED": str(shared), "SCALE_NAMESPACE": args.namespace, "SCALE_CONCURRENT": str(concurrent),
        "SCALE_BARRIER": str(args.barrier), "SCALE_CHECKS": str(args.checks), "SCALE_TESTS": str(args.tests),
    }  # fmt: skip
    load = [list(os.getloadavg())]
    cpu = CpuByKind(process_kind).start()
    started = time.monotonic()
    runs = []
    for i in range(args.runs):
        log = (work / f"run{i}.log").open("w")
        runs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pytest",
                        "-p",
                        "no:cacheprovider",
                        "-q",
                        "-n",
                        str(args.workers),
                        str(work / "test_scale.py"),
                        "--bridge-service=orders",
                        "--bridge-isolate",  # parallel runs share the workload: each has its own session route
                        f"--bridge-namespace={args.namespace}",
                        f"--bridge-route-pool={args.pool}",
                        f"--bridge-route-prefix=run{i}",
                    ],
                    cwd=work,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, "SCALE_RUN": str(i)},
                ),
                log,
            )
        )
    codes = []
    for process, log in runs:
        codes.append(process.wait(timeout=1800))
        log.close()
    took = time.monotonic() - started
    cpu_used = cpu.stop()
    load.append(list(os.getloadavg()))
    results = [json.loads(p.read_text()) for p in sorted(shared.glob("*.json"))]
    warm = [r["live_s"] for r in results if r["warm"]]
    cold = [r["live_s"] for r in results if not r["warm"]]
    misrouted = sum(len(r["tagged_misrouted"]) + len(r["untagged_misrouted"]) for r in results)
    clean_s, left = kc.wait_routing_clean(cluster, timeout=180.0, manager=False)
    outputs = {f"run{i}": _output_excerpt((work / f"run{i}.log").read_text()) for i in range(args.runs)}
    summary = {
        "command": "python -m bench.xdist_scale " + " ".join(sys.argv[1:]),
        "runs": args.runs, "workers_per_run": args.workers, "tests_per_run": args.tests, "pool": args.pool,
        "concurrent_wanted": concurrent, "exit_codes": codes, "routes": len(results),
        "peak_live_at_once": max((r["peak_seen"] for r in results), default=0),
        "live_warm": _summary(warm), "live_cold": _summary(cold),
        "warm_over_1s": sum(1 for x in warm if x > 1.0), "all_over_1s": sum(1 for r in results if r["live_s"] > 1.0),
        "requests": sum(2 * r["checks"] for r in results), "misrouted": misrouted,
        "wall_s": round(took, 1), "load_1m_5m_15m": load,
        "clean_after_s": round(clean_s, 1), "left": left, "cpu_seconds_by_kind": cpu_used,
        "samples": results, "outputs": outputs,
    }  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return summary


def markdown(s: dict[str, Any]) -> str:
    lw, lc = s["live_warm"], s["live_cold"]
    rows = [
        ("pytest runs at once x xdist workers", f"{s['runs']} x {s['workers_per_run']} = {s['concurrent_wanted']}"),
        ("per-test routes opened (all runs)", str(s["routes"])),
        ("runs passed", f"{sum(1 for c in s['exit_codes'] if c == 0)} of {s['runs']} (exit codes {s['exit_codes']})"),
        ("routes live at once (peak)", str(s["peak_live_at_once"])),
        ("warm route live: median / p90 / max", f"{lw.get('median')} / {lw.get('p90')} / {lw.get('max')} s (n={lw['n']})"),
        ("cold route live (first per worker)", f"{lc.get('median')} / {lc.get('p90')} / {lc.get('max')} s (n={lc['n']})"),
        ("routes over 1 s: warm / all", f"{s['warm_over_1s']} / {s['all_over_1s']}"),
        ("requests checked / misrouted", f"{s['requests']} / {s['misrouted']}"),
        ("wall time; load 1 min before, after", f"{s['wall_s']} s; {s['load_1m_5m_15m'][0][0]:.1f}, {s['load_1m_5m_15m'][-1][0]:.1f}"),
        ("namespace clean of routing after", f"{s['clean_after_s']} s, left: {s['left'] or 'nothing'}"),
    ]  # fmt: skip
    lines = [f"`{s['command']}`", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    cpu = s.get("cpu_seconds_by_kind") or {}
    if cpu:
        lines += ["", "| CPU seconds during the runs, by process | s |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in cpu.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    summary = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    args.markdown.write_text(markdown(summary))
    print(markdown(summary))
    failed = any(summary["exit_codes"]) or summary["misrouted"] or summary["left"]
    if failed:
        for name, out in summary["outputs"].items():
            print(f"--- {name} (tail)\n{out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
