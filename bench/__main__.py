"""``python -m bench [--quick] [--only NAME] [--out results.json] [--markdown FILE]``.

Exit status: 0 when every bridge transfer arrived intact; 1 when the bridge lost or corrupted
bytes, a bridged connection failed, a routed request reached the wrong side, or isolated routing
was left in the namespace (in any mode); 2 when the benchmark itself could not run
(no cluster, setup failed). Missed speed targets are reported, never a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from pytest_bridge.orchestration.session import BridgeSession

from .cluster import default_kubectl, start_run
from .loadtool import raise_nofile
from .procstat import machine_info
from .profiles import FULL, QUICK
from .report import evaluate, render
from .runner import BENCHMARKS, Bench

DEFAULT_NAMESPACE = "bridge-bench"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="pytest-bridge benchmarks (see BENCHMARKS.md)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 8 MiB transfers, one repetition, one isolated route; about 25 s; fails only on errors",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument(
        "--transfer-mib", type=int, metavar="MIB",
        help="MiB per throughput transfer (default: 256 full, 8 quick)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the full results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown tables here (they are printed anyway)")
    parser.add_argument("--namespace", default=os.environ.get("PYTEST_BRIDGE_BENCH_NAMESPACE", DEFAULT_NAMESPACE))
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    parser.add_argument("--kubectl", default=default_kubectl())
    args = parser.parse_args(argv)
    args.only = tuple(name.strip() for item in args.only for name in item.split(",") if name.strip())
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.namespace == "bridge-demo":
        parser.error("the benchmarks never run in bridge-demo (the e2e suites use it); pick another --namespace")
    if not args.kubeconfig:
        parser.error("no cluster: set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    start_run("bench", args.kubectl)
    nofile = raise_nofile()
    profile = QUICK if args.quick else FULL
    if args.transfer_mib:
        profile = dataclasses.replace(profile, transfer_bytes=args.transfer_mib * 2**20)
    bench = Bench(
        profile,
        args.only,
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        kubectl=args.kubectl,
    )
    results = bench.results
    results["command"] = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["machine"] = {**machine_info(args.kubectl, args.kubeconfig), "RLIMIT_NOFILE": nofile}
    with BridgeSession(bench.settings()) as probe:  # never connected: only resolves "auto"
        results["machine"]["bridge transport"] = probe.transport
    results["machine"]["bridge lanes"] = os.environ.get("PYTEST_BRIDGE_LANES", "default (4 each way)")
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        results["failures"].append("interrupted")
        status = 2
    except Exception as exc:
        traceback.print_exc()
        results["failures"].append(f"the benchmark could not run: {type(exc).__name__}: {exc}")
        status = 2
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["targets"] = evaluate(results)
    if status == 0 and results["failures"]:
        status = 1
    text = render(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    missed = [t["target"] for t in results["targets"] if t["met"] is False]
    logging.getLogger("bench").info(
        "done in %ss: %d failure(s); %d speed target(s) missed (reported, not a failure)",
        results.get("duration_s"), len(results["failures"]), len(missed),
    )  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
