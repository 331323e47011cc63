"""``python -m bench.apicalls``: what one API call of the in-cluster code costs, kept connection vs a new one each.

The guard, the routing manager and the routers talk to the API server through
``pytest_bridge_agent.kubeapi.ApiClient`` (stdlib). A router polls its ConfigMap five times a
second and the manager makes about eight calls a reconcile pass, so the cost of one call is
what they cost the cluster. This sends ``--calls`` GETs per block through that client, with a
ServiceAccount token (``kubectl create token``) and the cluster's CA, alternating blocks that
open a new TLS connection for every call (``keep_idle=0``: the client before it kept one) with blocks that
keep one; it reports wall time, the client's CPU and, when the API server runs on this machine
(the embedded cluster), the API server's CPU per call, as medians over ``--rounds``.

The path is ``/version``: any authenticated caller may read it, so no Role is needed, and the
connection's cost (TCP and TLS handshake) is the same for any path.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pytest_bridge_agent import kubeapi

from . import cluster as kc

REPO = Path(__file__).resolve().parents[1]


def _apiserver_cpu() -> float | None:
    """CPU seconds of a kube-apiserver process on this machine, or None."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "kube-apiserver":
            fields = stat[stat.rindex(")") + 2 :].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def _endpoint(kubeconfig: str, namespace: str, kubectl: str, work: Path) -> kubeapi.ApiEndpoint:
    raw = yaml.safe_load(Path(kubeconfig).read_text())
    current = raw.get("current-context")
    context = next(c["context"] for c in raw["contexts"] if c["name"] == current)
    entry = next(c["cluster"] for c in raw["clusters"] if c["name"] == context["cluster"])
    ca = work / "ca.crt"
    if entry.get("certificate-authority-data"):
        ca.write_bytes(base64.b64decode(entry["certificate-authority-data"]))
    else:
        ca.write_bytes((Path(kubeconfig).parent / entry["certificate-authority"]).read_bytes())
    token = subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "-n", namespace, "create", "token", "default"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (work / "token").write_text(token)
    return kubeapi.ApiEndpoint(entry["server"], str(work / "token"), str(ca))


def _block(api: kubeapi.ApiClient, calls: int, keep: bool) -> dict[str, float | None]:
    api.keep_idle = kubeapi.KEEP_IDLE if keep else 0.0  # 0: every call finds its kept connection too old
    request = kubeapi.Request("GET", "/version")
    server0, cpu0, wall0 = _apiserver_cpu(), time.process_time(), time.perf_counter()
    for _ in range(calls):
        if api.send(request).status != 200:
            raise SystemExit("GET /version did not answer 200")
    server1 = _apiserver_cpu()
    per = 1000.0 / calls
    return {
        "wall_ms": (time.perf_counter() - wall0) * per,
        "client_cpu_ms": (time.process_time() - cpu0) * per,
        "apiserver_cpu_ms": (server1 - server0) * per if server0 is not None and server1 is not None else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise SystemExit("set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    kubectl = kc.default_kubectl()
    with tempfile.TemporaryDirectory(prefix="pytest-bridge-apicalls-") as tmp:
        endpoint = _endpoint(kubeconfig, args.namespace, kubectl, Path(tmp))
        api = kubeapi.ApiClient(endpoint)
        blocks: dict[str, list[dict[str, float | None]]] = {"new": [], "kept": []}
        try:
            for round_ in range(args.rounds):
                order = ("new", "kept") if round_ % 2 == 0 else ("kept", "new")
                for mode in order:
                    blocks[mode].append(_block(api, args.calls, keep=mode == "kept"))
        finally:
            api.close()
    summary: dict[str, Any] = {
        "command": "python -m bench.apicalls " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "calls_per_block": args.calls, "rounds": args.rounds, "load_1m": os.getloadavg()[0],
        "blocks": blocks,
    }  # fmt: skip
    for mode, rows in blocks.items():
        for key in ("wall_ms", "client_cpu_ms", "apiserver_cpu_ms"):
            values = [v for r in rows if (v := r[key]) is not None]
            summary[f"{mode}_{key}"] = round(statistics.median(values), 3) if values else None
    return summary


def markdown(s: dict[str, Any]) -> str:
    def cell(mode: str, key: str) -> str:
        value = s[f"{mode}_{key}"]
        return "n/a" if value is None else f"{value:.2f} ms"

    lines = [
        f"`{s['command']}` ({s['when']}, {s['rounds']} rounds of {s['calls_per_block']} calls per mode, "
        f"1-minute load {s['load_1m']:.1f})",
        "",
        "| per API call, median of rounds | new TLS connection each call | kept connection |",
        "|---|---|---|",
    ]
    for key, label in (
        ("wall_ms", "wall time"),
        ("client_cpu_ms", "client CPU"),
        ("apiserver_cpu_ms", "API server CPU"),
    ):
        lines.append(f"| {label} | {cell('new', key)} | {cell('kept', key)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apicalls", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="GETs per block (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per mode, alternating (default 5)")
    parser.add_argument("--namespace", default=os.environ.get("BENCH_NAMESPACE", "bridge-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "apicalls.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "apicalls.md")
    args = parser.parse_args(argv)
    summary = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    args.markdown.write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
