"""Targets and Markdown tables from a benchmark result (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from .stats import Summary, summarize

__all__ = ["evaluate", "render"]

# (bridge path, the baseline it is held against): inbound rides a port-forward to a pod, the
# outbound path is what `kubectl port-forward svc/...` would be used for instead.
BASELINES = {"bridge in": "kubectl pf pod", "bridge out": "kubectl pf svc"}
THROUGHPUT_SHARE = 0.90
ADDED_P50_MS = 1.0
WARM_CONNECT_S = 5.0
PER_TEST_ROUTE_S = 2.0
GIB = 2**30


def _summary(value: Any) -> Summary:
    return Summary(value or {})


def _median(value: Any) -> float | None:
    s = _summary(value)
    return float(s["median"]) if s.get("n") else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and met / not met (None: not measured in this run)."""
    targets: list[dict[str, Any]] = []
    connect = _median(results.get("connect", {}).get("summary", {}).get("connect_s"))
    targets.append({
        "target": f"warm connect <= {WARM_CONNECT_S:g} s (median)",
        "measured": f"{connect:.2f} s" if connect is not None else "not measured",
        "met": None if connect is None else connect <= WARM_CONNECT_S,
    })  # fmt: skip
    paths = results.get("throughput", {}).get("paths", {})
    for bridge, baseline in BASELINES.items():
        for direction in ("to local", "to cluster"):
            ours = _median(paths.get(bridge, {}).get(direction, {}).get("summary"))
            theirs = _median(paths.get(baseline, {}).get(direction, {}).get("summary"))
            if ours is None or not theirs:
                measured, met = "not measured", None
            else:
                measured, met = (
                    f"{ours:.1f} vs {theirs:.1f} MiB/s = {ours / theirs:.0%}",
                    ours >= THROUGHPUT_SHARE * theirs,
                )
            targets.append({
                "target": f"{bridge} throughput {direction} >= {THROUGHPUT_SHARE:.0%} of {baseline}",
                "measured": measured,
                "met": met,
            })  # fmt: skip
    latency = results.get("latency", {}).get("paths", {})
    for bridge, baseline in BASELINES.items():
        for mode in ("keepalive", "newconn"):
            ours = _median(latency.get(bridge, {}).get(mode, {}).get("p50_ms"))
            theirs = _median(latency.get(baseline, {}).get(mode, {}).get("p50_ms"))
            if ours is None or theirs is None:
                measured, met = "not measured", None
            else:
                measured, met = f"{ours:.3f} - {theirs:.3f} = {ours - theirs:+.3f} ms", ours - theirs <= ADDED_P50_MS
            label = "kept-alive connection" if mode == "keepalive" else "new connection per request"
            targets.append({
                "target": f"{bridge} added p50 latency over {baseline} <= {ADDED_P50_MS:g} ms ({label})",
                "measured": measured,
                "met": met,
            })  # fmt: skip
    concurrency = results.get("concurrency", {}).get("paths", {})
    for bridge in BASELINES:
        runs = concurrency.get(bridge, {}).get("1000", [])
        if not runs:
            targets.append({"target": f"{bridge}: 0 errors, 0 bytes lost at 1,000 connections",
                            "measured": "not measured", "met": None})  # fmt: skip
            continue
        errors = sum(int(r.get("errors", 1)) for r in runs)
        lost = sum(int(r.get("bytes_lost", 0)) for r in runs)
        corrupt = sum(int(r.get("corrupt_connections", 0)) for r in runs)
        targets.append({
            "target": f"{bridge}: 0 errors, 0 bytes lost at 1,000 concurrent connections",
            "measured": f"{errors} errors, {lost} bytes lost, {corrupt} corrupt ({len(runs)} runs)",
            "met": errors == 0 and lost == 0 and corrupt == 0,
        })  # fmt: skip
    warm = _median(results.get("isolated_route", {}).get("warm", {}).get("summary", {}).get("route_live_s"))
    targets.append({
        "target": f"per-test isolated route live <= {PER_TEST_ROUTE_S:g} s (median, warm: manager and router running)",
        "measured": f"{warm:.2f} s" if warm is not None else "not measured",
        "met": None if warm is None else warm <= PER_TEST_ROUTE_S,
    })  # fmt: skip
    return targets


def _met(value: bool | None) -> str:
    return "n/a" if value is None else ("met" if value else "**not met**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(results: dict[str, Any]) -> str:
    out: list[str] = []
    machine = results.get("machine", {})
    out += [f"Command: `{results.get('command', '?')}` — profile {results.get('profile', {}).get('name')}, "
            f"took {results.get('duration_s', '?')} s", ""]  # fmt: skip
    if machine:
        out += [*_table(["machine", "value"], [[k, str(v)] for k, v in machine.items()]), ""]
    out += _connect(results)
    out += _throughput(results)
    out += _cpu(results)
    out += _latency(results)
    out += _concurrency(results)
    out += _isolated(results)
    out += _router(results)
    out += _scale(results)
    out += _smoke(results)
    targets = results.get("targets") or evaluate(results)
    out += ["**Targets**", ""]
    out += _table(
        ["target", "measured (medians)", "result"], [[t["target"], t["measured"], _met(t["met"])] for t in targets]
    )
    out.append("")
    for name, reason in results.get("pending", {}).items():
        out.append(f"- `{name}`: {reason}")
    for failure in results.get("failures", []):
        out.append(f"- FAILURE: {failure}")
    for warning in results.get("warnings", []):
        out.append(f"- warning: {warning}")
    return "\n".join(out).rstrip() + "\n"


def _connect(results: dict[str, Any]) -> list[str]:
    rows = []
    connect = results.get("connect", {}).get("summary", {})
    labels = {
        "connect_s": "`BridgeSession.connect()` (warm)",
        "agent_pod_ready_s": "… of which until the agent pod was Ready",
        "disconnect_s": "`BridgeSession.close()`",
        "restored_s": "close until `orders` is Available again (original pod Ready)",
    }
    for key, label in labels.items():
        if key in connect:
            rows.append([label, _summary(connect[key]).fmt(2, " s")])
    pytest = results.get("pytest", {}).get("summary", {})
    pytest_labels = {
        "wall_s": "`pytest --bridge-service=orders` one trivial test, wall time",
        "connect_s": "… connect, from its terminal summary",
        "disconnect_s": "… disconnect, from its terminal summary",
    }
    for key, label in pytest_labels.items():
        if key in pytest:
            rows.append([label, _summary(pytest[key]).fmt(1, " s")])
    if not rows:
        return []
    return ["**Connect and disconnect** (median (min-max, n))", "", *_table(["what", "time"], rows), ""]


def _throughput(results: dict[str, Any]) -> list[str]:
    data = results.get("throughput")
    if not data:
        return []
    rows = []
    for path, directions in data["paths"].items():
        row = [path]
        for direction in ("to local", "to cluster"):
            entry = directions.get(direction, {})
            text = _summary(entry.get("summary")).fmt(1)
            baseline = BASELINES.get(path)
            ours = _median(entry.get("summary"))
            theirs = _median(data["paths"].get(baseline, {}).get(direction, {}).get("summary")) if baseline else None
            if ours is not None and theirs:
                text += f" = {ours / theirs:.0%} of {baseline}"
            if entry.get("errors"):
                text += f" ({len(entry['errors'])} failed)"
            row.append(text)
        rows.append(row)
    title = f"**Throughput**, MiB/s, one {data['bytes'] / 2**20:.0f} MiB transfer each way, sha256-checked, {data['reps']} runs"
    return [title, "", *_table(["path", "to local (pod → host)", "to cluster (host → pod)"], rows), ""]


def _cpu(results: dict[str, Any]) -> list[str]:
    data = results.get("throughput")
    if not data:
        return []
    components: list[str] = []
    rows_raw: list[tuple[str, dict[str, float]]] = []
    for path, directions in data["paths"].items():
        for direction in ("to local", "to cluster"):
            samples = directions.get(direction, {}).get("cpu_s", [])
            if not samples:
                continue
            per_gib: dict[str, float] = {}
            for key in samples[0]:
                if key in ("waited for quiet s", "machine busy before %"):
                    continue
                values = sorted(s.get(key, 0.0) for s in samples)
                per_gib[key] = values[len(values) // 2] / (data["bytes"] / GIB)
                if key not in components and key != "machine capacity":
                    components.append(key)
            busy = sorted(s["machine busy"] / s["machine capacity"] for s in samples if s.get("machine capacity"))
            per_gib["busy %"] = busy[len(busy) // 2] if busy else float("nan")
            rows_raw.append((f"{path}, {direction}", per_gib))
    shown = [c for c in components if any(r.get(c, 0.0) >= 0.05 for _, r in rows_raw)]
    rows = [[label, *(f"{r.get(c, 0.0):.2f}" for c in shown), f"{r['busy %']:.0%}"] for label, r in rows_raw]
    return [
        "**CPU seconds per GiB moved** (medians over the runs; `busy %`: share of both cores busy during the transfer)",
        "",
        *_table(["path, direction", *shown, "busy %"], rows),
        "",
    ]


def _latency(results: dict[str, Any]) -> list[str]:
    data = results.get("latency")
    if not data:
        return []
    rows = []
    for path, modes in data["paths"].items():
        row = [path]
        for mode in ("keepalive", "newconn"):
            entry = modes.get(mode, {})
            row += [_summary(entry.get("p50_ms")).fmt(3), _summary(entry.get("p99_ms")).fmt(3)]
            baseline = BASELINES.get(path)
            ours = _median(entry.get("p50_ms"))
            theirs = _median(data["paths"].get(baseline, {}).get(mode, {}).get("p50_ms")) if baseline else None
            row.append(f"{ours - theirs:+.3f}" if ours is not None and theirs is not None else "")
        row.append(str(sum(int(modes.get(m, {}).get("errors", 0)) for m in ("keepalive", "newconn"))))
        rows.append(row)
    counts = data["counts"]
    title = (
        f"**Latency**, ms, {data['size']}-byte request and reply; kept-alive: {counts['keepalive']} round trips, "
        f"new connection: {counts['newconn']} connections per run; median of {data['reps']} runs' percentiles"
    )
    header = ["path", "kept-alive p50", "p99", "added p50", "new conn p50", "p99", "added p50", "errors"]
    return [title, "", *_table(header, rows), ""]


def _concurrency(results: dict[str, Any]) -> list[str]:
    data = results.get("concurrency")
    if not data:
        return []
    rows = []
    for path, by_n in data["paths"].items():
        for n, runs in by_n.items():
            for run in runs:
                peak = run.get("rss_peak_kib", {})
                before = run.get("rss_before_kib", {})
                rss = "; ".join(
                    f"{name} {before.get(name, 0) / 1024:.0f} → {kib / 1024:.0f} MiB" for name, kib in peak.items()
                )
                rows.append([
                    path, n, str(run.get("errors")), str(run.get("bytes_lost")), str(run.get("corrupt_connections")),
                    f"{run.get('seconds', float('nan')):.2f}", f"{run.get('connect_max_ms', float('nan')):.0f}",
                    str(run.get("listen_drops", "?")), rss,
                ])  # fmt: skip
    title = (
        f"**Concurrency**: N connections open end to end at once, each echoing {data['bytes_per_connection'] // 1024} KiB "
        "checked by sha256; RSS before → peak"
    )
    header = ["path", "N", "errors", "bytes lost", "corrupt", "seconds", "slowest connect ms", "listen drops", "RSS"]
    return [title, "", *_table(header, rows), ""]


def _isolated(results: dict[str, Any]) -> list[str]:
    data = results.get("isolated_route")
    if not data:
        return []
    cold, warm = data["cold"]["summary"], data["warm"]["summary"]
    rows: list[list[str]] = []
    labels_cold = {
        "connect_s": "`BridgeSession(isolate=True).connect()`, no routing manager in the namespace (cold)",
        "route_pod_ready_s": "… route pod serving (running, containers started)",
        "route_live_s": "… route live (canary with the header back through the router)",
        "close_s": "`close()`",
        "restored_s": "… until the manager restored the Service and deleted the routers",
        "manager_gone_s": f"… until the manager removed itself (routing_idle {data['routing_idle_s']:g} s)",
    }
    labels_warm = {
        "route_live_s": "per-test `open_route(per_test=True)`, manager and router running (warm): route live",
        "route_pod_ready_s": "… route pod serving",
        "open_s": "… `open_route` returned (live + env/file import)",
        "close_s": "`close_route()`",
    }
    for summary, labels in ((cold, labels_cold), (warm, labels_warm)):
        for key, label in labels.items():
            if key in summary:
                rows.append([label, _summary(summary[key]).fmt(2, " s")])
    out = [f"**Isolated route time**, service `{data['service']}` (median (min-max, n))", ""]
    out += [*_table(["what", "time"], rows), ""]
    phases = sorted(
        set(cold.get("breakdown", {})) | set(warm.get("breakdown", {})),
        key=lambda k: (not k.startswith("at:"), _median(warm.get("breakdown", {}).get(k)) or 99.0),
    )

    def step(key: str) -> str:
        if key.startswith("at: "):
            return key.removeprefix("at: ")
        if key.startswith("close: "):
            return f"`close_route`: time in {key.removeprefix('close: ')}"
        return f"time in {key.removeprefix('in: ')}"

    prows = [
        [step(k), _summary(warm.get("breakdown", {}).get(k)).fmt(3), _summary(cold.get("breakdown", {}).get(k)).fmt(3)]
        for k in phases
    ]
    out += [
        "**Where a route's time goes**: seconds from the start of `open_route` until each step was seen "
        "(plugin calls timed in the bench process; pod status by a watch; router config by a ConfigMap "
        "watch and the router's `/healthz` polled every 20 ms), then time spent in each plugin call",
        "",
        *_table(["step", "per-test (warm)", "first route (cold)"], prows),
        "",
    ]
    return out


def _router(results: dict[str, Any]) -> list[str]:
    data = results.get("router")
    if not data or not data.get("latency"):
        return []
    paths = data["paths"]
    rows = []
    for name, modes in data["latency"].items():
        row = [name]
        base = paths.get(name, {}).get("baseline")
        for mode in ("keepalive", "newconn"):
            entry = modes.get(mode, {})
            row += [_summary(entry.get("p50_ms")).fmt(3), _summary(entry.get("p99_ms")).fmt(3)]
            ours = _median(entry.get("p50_ms"))
            theirs = _median(data["latency"].get(base, {}).get(mode, {}).get("p50_ms")) if base else None
            row.append(f"{ours - theirs:+.3f}" if ours is not None and theirs is not None else "")
        row.append(str(sum(int(modes.get(m, {}).get("errors", 0)) for m in ("keepalive", "newconn"))))
        rows.append(row)
    counts = data.get("counts", {})
    out = [
        f"**Router latency**, ms, HTTP/1.1 POST of 100 bytes echoed; kept-alive: {counts.get('keepalive')} requests, "
        f"new connection: {counts.get('newconn')} per run; median of {data.get('latency_reps')} runs' percentiles; "
        "added: over the same server without the router",
        "",
        *_table(["path", "kept-alive p50", "p99", "added p50", "new conn p50", "p99", "added p50", "errors"], rows),
        "",
    ]
    trows = []
    for name, directions in data.get("throughput", {}).items():
        row = [name]
        base = paths.get(name, {}).get("baseline")
        for direction in ("to server", "from server"):
            entry = directions.get(direction, {})
            text = _summary(entry.get("summary")).fmt(1)
            ours = _median(entry.get("summary"))
            theirs = _median(data["throughput"].get(base, {}).get(direction, {}).get("summary")) if base else None
            if ours is not None and theirs:
                text += f" = {ours / theirs:.0%}"
            if entry.get("errors"):
                text += f" ({len(entry['errors'])} failed)"
            row.append(text)
        trows.append(row)
    if trows:
        out += [
            f"**Router throughput**, MiB/s, one {data['bytes'] / 2**20:.0f} MiB HTTP body each way (POST /sink, "
            f"GET /source), sha256-checked, {data.get('transfer_reps')} runs; % of the same path without the router",
            "",
            *_table(["path", "to server (upload)", "from server (download)"], trows),
            "",
        ]
    return out


def _scale(results: dict[str, Any]) -> list[str]:
    data = results.get("route_scale")
    if not data:
        return []
    samples = data.get("samples", [])
    rows = []
    wanted = sorted({1, 10, 50, len(samples)} & {s["n"] for s in samples})
    for n in wanted:
        sample = samples[n - 1]
        rows.append([str(n), f"{sample['live_s']:.2f}", f"{sample['pod_ready_s']:.2f}", f"{sample['open_s']:.2f}"])
    out = [
        f"**Scale**: routes of `{data['service']}` opened one after another and kept open ({data['opened']} of "
        f"{data['wanted']}); seconds for the Nth route (from its `open_route`)",
        "",
        *_table(["N", "route live", "pod serving", "open_route returned"], rows),
        "",
    ]
    if samples:
        decades = []
        for start in range(0, len(samples), 10):
            chunk = samples[start : start + 10]
            live = _summary(summarize([s["live_s"] for s in chunk]))
            decades.append([f"{chunk[0]['n']}-{chunk[-1]['n']}", live.fmt(2, " s")])
        out += ["Route live, median per block of ten:", "", *_table(["routes", "live"], decades), ""]
    memory = data.get("memory", {})
    if memory:
        out += [*_table(["with all routes open", "value"], [[k, str(v)] for k, v in memory.items()]), ""]
    out += [
        f"Closing all: {data.get('close_all_s')} s; Service restored after {data.get('restored_s')} s, "
        f"manager gone after {data.get('manager_gone_s')} s."
        + (f" Stopped early: {data['error']}" if data.get("error") else ""),
        "",
    ]
    return out


def _smoke(results: dict[str, Any]) -> list[str]:
    data = results.get("route_smoke")
    if not data:
        return []
    routed = data.get("with header", {}).get("x-bench-server", "?")
    default = "cluster pod" if "x-bench-server" not in data.get("without header", {}) else "?"
    return [
        f"**Route smoke**: `connect(isolate=True)` {data.get('connect_s')} s (route live {data.get('route_live_s')} s); "
        f"with the header → {routed} server, without → {default}; `close()` {data.get('close_s')} s, Service restored "
        f"after {data.get('restored_s')} s, manager gone after {data.get('manager_gone_s')} s",
        "",
    ]
