"""``python -m bench.chaos``: SIGKILL bridge sessions at random points of connect and close, and
check after each kill that the cluster is restored and nothing of ours is left.

Each kill runs a small victim (``BridgeSession(...).connect()`` then ``close()`` of ``orders``, in
a process of its own) with ``PYTEST_BRIDGE_FAULT=<point>=sigkill``; the point is drawn uniformly
from :data:`pytest_bridge.core.faults.POINTS` (``--seed`` repeats a run). After the victim died, the
Deployment must equal what it was and nothing of ours may be left (jobs, suspended or not,
configmaps, secrets, service accounts, roles, role bindings, our pods and agent pods:
:func:`e2e.conftest.objects_of_ours`) within TTL + 30 s (``--ttl``, the sessions'
``restore_ttl``). A kill that misses the bound is watched for 120 s more, so the report has the
real figure, then cleaned up with ``pytest-bridge cleanup --force`` so the run can go on. Killed
victims' ``kubectl port-forward`` processes still running count as leftovers too.

``--parallel`` sessions run at once, each in a namespace of its own (``<namespace>-<i>``, the sample
app server-side applied there; the namespaces are kept for re-runs). Never ``bridge-demo``.

Exit status: 0 when every kill was restored and left nothing within TTL + 30 s; 1 when one was
late, left something, or did not die where it should have (the run would not prove what it
claims); 2 when the run could not start (no cluster). Ctrl-C or SIGTERM stop it: victims are
killed, and their guards restore within TTL as for any kill.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from e2e.conftest import apply_sample_app, ensure_namespace, objects_of_ours, wait_app_settled
from pytest_bridge.core import faults
from pytest_bridge.core.patch import strip_server_fields

from . import cluster as kc
from .procstat import machine_info

log = logging.getLogger("chaos")

DEFAULT_NAMESPACE = "bridge-chaos"
SLACK = 30.0  # the promise: restored and clean within TTL + this, after a SIGKILL
OVERTIME = 120.0  # how long a late kill is watched further, for the report
POLL = 0.25


@dataclass
class Kill:
    n: int
    point: str
    namespace: str = ""
    exit_code: int | None = None
    connect_s: float | None = None  # victim start to death
    restored_s: float | None = None  # death to the Deployment equal to before (0: never changed)
    clean_s: float | None = None  # death to nothing of ours left
    leftovers: dict[str, int] = field(default_factory=dict)  # by kind, at TTL + 30 s
    error: str = ""

    def ok(self, bound: float) -> bool:
        return (
            not self.error
            and not self.leftovers
            and self.restored_s is not None
            and self.restored_s <= bound
            and self.clean_s is not None
            and self.clean_s <= bound
        )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="SIGKILL bridge sessions at random points of connect and close; check restore and leftovers.",
        epilog=(
            "Exit status: 0 when every kill was restored and left nothing within TTL + 30 s; 1 when one was late, "
            "left something, or did not die where it should have; 2 when the run could not go on."
        ),
    )
    parser.add_argument("--kills", type=int, default=50, help="how many sessions to kill (default 50)")
    parser.add_argument("--ttl", type=float, default=10.0, help="the sessions' restore TTL, seconds (default 10)")
    parser.add_argument("--seed", type=int, help="random seed of the kill points (default: a random one, reported)")
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE,
        help=f"namespace, or prefix of the namespaces with --parallel > 1 (default {DEFAULT_NAMESPACE})",
    )  # fmt: skip
    parser.add_argument("--parallel", type=int, default=3, help="sessions at once, one namespace each (default 3)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown here (it is printed anyway)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""))
    parser.add_argument("--kubectl", default=kc.default_kubectl())
    parser.add_argument("--victim", metavar="NAMESPACE", help=argparse.SUPPRESS)  # the killed session itself
    args = parser.parse_args(argv)
    if not args.kubeconfig:
        parser.error("no cluster: set KUBECONFIG (e.g. `export $(python -m e2e.cluster up | tail -n 1)`)")
    if args.kills < 1 or args.parallel < 1 or args.ttl <= 0:
        parser.error("--kills and --parallel must be at least 1, --ttl positive")
    if args.namespace == "bridge-demo" or args.namespace.startswith("bridge-demo-"):
        parser.error("chaos never runs in bridge-demo or its siblings (the e2e suites use them); pick another")
    return args


# --- the victim: one session, killed where PYTEST_BRIDGE_FAULT says -------------------------------


def _victim(namespace: str, ttl: float, kubeconfig: str) -> int:
    from pytest_bridge.orchestration.session import BridgeSession  # noqa: PLC0415 - only the victim connects
    from pytest_bridge.settings import BridgeSettings, NameMappingMode  # noqa: PLC0415

    settings = BridgeSettings(
        services=("orders",), namespace=namespace, kubeconfig=Path(kubeconfig), restore_ttl=ttl,
        name_mapping=NameMappingMode.IN_PROCESS, connect_timeout=60.0,
    )  # fmt: skip
    session = BridgeSession(settings)
    print(f"session {session.session_id}", flush=True)
    session.connect()
    session.close()
    return 0  # the fault never fired


# --- one kill ---------------------------------------------------------------------------------------


def _orders(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    apps = client.AppsV1Api(api)
    return strip_server_fields(
        apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("orders", namespace))
    )


def _local_forwards(namespace: str) -> list[int]:
    """Pids of ``kubectl port-forward`` processes into ``namespace`` (a killed victim's must die with it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"port-forward" in argv and namespace.encode() in argv:
            found.append(int(proc.name))
    return found


def _kinds(objects: list[str]) -> dict[str, int]:
    return dict(collections.Counter(item.split("/", 1)[0] for item in objects))


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bound = args.ttl + SLACK
        self.stop = threading.Event()
        self.victims: dict[int, subprocess.Popen[str]] = {}  # pid -> victim in flight
        self.lock = threading.Lock()
        self.kills: list[Kill] = []

    def namespaces(self) -> list[str]:
        base = self.args.namespace
        return [base] if self.args.parallel == 1 else [f"{base}-{i}" for i in range(self.args.parallel)]

    def api(self) -> client.ApiClient:
        return kc.load(self.args.kubeconfig, self.namespaces()[0], self.args.kubectl).api

    def prepare(self, api: client.ApiClient, namespace: str) -> None:
        """The namespace with the sample app settled and nothing of ours in it (an earlier run's cleaned up)."""
        core = client.CoreV1Api(api)
        ensure_namespace(core, namespace, {})
        left = self._wait_clean(api, namespace, self.bound)
        if left:
            log.warning("%s: %s left by an earlier run: cleaning up", namespace, ", ".join(left))
            self.force_cleanup(api, namespace)
        apply_sample_app(api, namespace)
        wait_app_settled(core, namespace)

    def _wait_clean(self, api: client.ApiClient, namespace: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := objects_of_ours(api, namespace)) and time.monotonic() < deadline:
            time.sleep(1)
        return left

    def force_cleanup(self, api: client.ApiClient, namespace: str) -> None:
        """``pytest-bridge cleanup --force``, then any Job of ours with no record (a failed setup)."""
        subprocess.run(
            [sys.executable, "-m", "pytest_bridge.cli", "--kubeconfig", self.args.kubeconfig, "-n", namespace,
             "cleanup", "--force"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        batch = client.BatchV1Api(api)
        jobs: Any = batch.list_namespaced_job(namespace, label_selector="app.kubernetes.io/managed-by=pytest-bridge")
        for job in jobs.items:
            with contextlib.suppress(client.exceptions.ApiException):
                batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Background")
        for pid in _local_forwards(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._wait_clean(api, namespace, 60):
            raise RuntimeError(f"{namespace}: cannot clean up: {objects_of_ours(api, namespace)}")

    def kill_once(self, api: client.ApiClient, namespace: str, kill: Kill) -> None:
        kill.namespace = namespace
        wait_app_settled(client.CoreV1Api(api), namespace)
        before = _orders(api, namespace)
        env = {**os.environ, faults.ENV: f"{kill.point}=sigkill", "KUBECONFIG": self.args.kubeconfig}
        argv = [sys.executable, "-m", "bench.chaos", "--victim", namespace, "--ttl", str(self.args.ttl)]
        started = time.monotonic()
        victim = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        with self.lock:
            self.victims[victim.pid] = victim
        try:
            out, _ = victim.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            victim.kill()
            out, _ = victim.communicate()
        finally:
            with self.lock:
                self.victims.pop(victim.pid, None)
        died = time.monotonic()
        kill.exit_code = victim.returncode
        kill.connect_s = round(died - started, 2)
        if victim.returncode != -signal.SIGKILL:
            tail = " | ".join(out.strip().splitlines()[-3:])
            kill.error = f"the victim did not die at {kill.point} (exit {victim.returncode}): {tail}"
        self.watch(api, namespace, before, died, kill)

    def watch(self, api: client.ApiClient, namespace: str, before: dict[str, Any], died: float, kill: Kill) -> None:
        """Times to restored and to clean, from the victim's death; leftovers by kind at the bound."""
        while True:
            now = time.monotonic() - died
            if kill.restored_s is None and _orders(api, namespace) == before:
                kill.restored_s = round(now, 2)
            left = objects_of_ours(api, namespace) + [f"local kubectl/{pid}" for pid in _local_forwards(namespace)]
            if kill.clean_s is None and not left:
                kill.clean_s = round(now, 2)
            if now > self.bound and not kill.leftovers and left:
                kill.leftovers = _kinds(left)
                log.error("kill %d (%s, %s): at %.0fs left %s", kill.n, kill.point, namespace, self.bound, left)
            if kill.restored_s is not None and kill.clean_s is not None:
                return
            if now > self.bound + OVERTIME or self.stop.is_set():
                self.force_cleanup(api, namespace)
                return
            time.sleep(POLL)

    def worker(self, namespace: str, todo: queue.Queue[Kill]) -> None:
        api = self.api()
        try:
            self.prepare(api, namespace)
            while not self.stop.is_set():
                try:
                    kill = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    self.kill_once(api, namespace, kill)
                except Exception as exc:  # one broken kill must not end the run: it is reported
                    kill.error = kill.error or f"{type(exc).__name__}: {exc}"
                    log.exception("kill %d (%s, %s) failed", kill.n, kill.point, namespace)
                with self.lock:
                    self.kills.append(kill)
                log.info(
                    "kill %d/%d at %-16s %s: %s", len(self.kills), self.args.kills, kill.point, namespace,
                    "ok" if kill.ok(self.bound) else f"FAILED {kill.error or kill.leftovers or 'late'}"
                    + f" (restored {kill.restored_s}s, clean {kill.clean_s}s)",
                )  # fmt: skip
        finally:
            api.close()  # type: ignore[no-untyped-call]

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        todo: queue.Queue[Kill] = queue.Queue()
        for n in range(self.args.kills):
            todo.put(Kill(n, rng.choice(faults.POINTS)))
        threads = [
            threading.Thread(target=self.worker, args=(ns, todo), name=ns, daemon=True) for ns in self.namespaces()
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        except KeyboardInterrupt:
            log.warning("interrupted: killing the victims in flight; their guards restore within the TTL")
            self.stop.set()
            with self.lock:
                for victim in self.victims.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(victim.pid, signal.SIGKILL)
            for thread in threads:
                thread.join(timeout=self.bound + OVERTIME + 60)
            raise


# --- report -----------------------------------------------------------------------------------------


def summarize(kills: list[Kill], bound: float) -> list[dict[str, Any]]:
    """Per point, in the order connect passes them: kills, restored in time, max times, leftovers."""
    rows = []
    for point in faults.POINTS:
        mine = [k for k in kills if k.point == point]
        restored = [k.restored_s for k in mine if k.restored_s is not None]
        clean = [k.clean_s for k in mine if k.clean_s is not None]
        leftovers: collections.Counter[str] = collections.Counter()
        for k in mine:
            leftovers.update(k.leftovers)
        rows.append({
            "point": point,
            "kills": len(mine),
            "restored_ok": sum(1 for k in mine if k.restored_s is not None and k.restored_s <= bound),
            "max_restored_s": max(restored, default=None),
            "max_clean_s": max(clean, default=None),
            "leftovers": dict(leftovers),
            "failed": sum(1 for k in mine if not k.ok(bound)),
            "errors": [k.error for k in mine if k.error],
        })  # fmt: skip
    return rows


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: dict[str, Any]) -> str:
    bound = results["bound_s"]
    lines = [
        f"### Chaos: SIGKILL at random points of connect and close, restore TTL {results['ttl_s']:g} s",
        "",
        f"`{results['command']}`, {results['started']}, {results['duration_s']:.0f} s, seed {results['seed']}, "
        f"{results['parallel']} sessions at once; git {results['machine'].get('git', '?')}; "
        f"{results['machine'].get('cpus')} CPUs, Kubernetes {results['machine'].get('kubernetes_server')}.",
        "",
        f"Seconds from the victim's death (SIGKILL); the bound is TTL + {SLACK:.0f} s = {bound:g} s. "
        '"restored": the Deployment equal to what it was before the session (0.0: the kill came before '
        'the PATCH); "clean": nothing of ours left (jobs, configmaps, secrets, service accounts, roles, '
        "role bindings, our pods, agent pods, local kubectl port-forwards).",
        "",
        "| point | kills | restored within the bound | max to restored | max to clean | leftovers at the bound |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in results["points"]:
        left = ", ".join(f"{kind}: {count}" for kind, count in sorted(row["leftovers"].items())) or "0"
        lines.append(
            f"| `{row['point']}` | {row['kills']} | {row['restored_ok']}/{row['kills']} | "
            f"{_seconds(row['max_restored_s'])} | {_seconds(row['max_clean_s'])} | {left} |"
        )
    total = results["totals"]
    lines += [
        f"| **all** | **{total['kills']}** | **{total['restored_ok']}/{total['kills']}** | "
        f"**{_seconds(total['max_restored_s'])}** | **{_seconds(total['max_clean_s'])}** | "
        f"**{total['leftover_objects'] or 0}** |",
        "",
        f"**{total['leftover_objects']} leftovers, {total['late']} late, {total['errors']} kills that did not happen "
        f"as planned.**"
        if total["failed"]
        else f"**0 leftovers, 0 late: every kill restored and clean within {bound:g} s.**",
    ]
    for error in [e for row in results["points"] for e in row["errors"]]:
        lines.append(f"- {error}")
    return "\n".join(lines) + "\n"


def _totals(kills: list[Kill], bound: float) -> dict[str, Any]:
    return {
        "kills": len(kills),
        "restored_ok": sum(1 for k in kills if k.restored_s is not None and k.restored_s <= bound),
        "max_restored_s": max((k.restored_s for k in kills if k.restored_s is not None), default=None),
        "max_clean_s": max((k.clean_s for k in kills if k.clean_s is not None), default=None),
        "leftover_objects": sum(sum(k.leftovers.values()) for k in kills),
        "late": sum(
            1 for k in kills
            if k.restored_s is None or k.restored_s > bound or k.clean_s is None or k.clean_s > bound
        ),
        "errors": sum(1 for k in kills if k.error),
        "failed": sum(1 for k in kills if not k.ok(bound)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.victim:
        return _victim(args.victim, args.ttl, args.kubeconfig)
    kc.start_run("chaos", args.kubectl)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    chaos = Chaos(args)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.chaos", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seed": seed,
        "ttl_s": args.ttl,
        "bound_s": chaos.bound,
        "parallel": args.parallel,
        "namespaces": chaos.namespaces(),
        "machine": machine_info(args.kubectl, args.kubeconfig),
    }
    log.info("%d kills, seed %d, TTL %gs, in %s", args.kills, seed, args.ttl, ", ".join(chaos.namespaces()))
    started = time.monotonic()
    status = 0
    try:
        chaos.run(seed)
    except KeyboardInterrupt:
        status = 2
    except Exception as exc:
        log.exception("the run could not go on")
        results["failure"] = f"{type(exc).__name__}: {exc}"
        status = 2
    results["duration_s"] = round(time.monotonic() - started, 1)
    kills = sorted(chaos.kills, key=lambda k: k.n)
    results["points"] = summarize(kills, chaos.bound)
    results["totals"] = _totals(kills, chaos.bound)
    results["kills"] = [asdict(k) for k in kills]
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = render(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    if status == 0 and (results["totals"]["failed"] or len(kills) < args.kills):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
