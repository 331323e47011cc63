"""Targets and Markdown tables from a benchmark result (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from .stats import Summary

__all__ = ["evaluate", "render"]

# (bridge path, the baseline it is held against): inbound rides a port-forward to a pod, the
# outbound path is what `kubectl port-forward svc/...` would be used for instead.
BASELINES = {"bridge in": "kubectl pf pod", "bridge out": "kubectl pf svc"}
THROUGHPUT_SHARE = 0.90
ADDED_P50_MS = 1.0
WARM_CONNECT_S = 5.0
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
