"""How much each benchmark measures: the full run (BENCHMARKS.md) and the quick smoke (``--quick``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["FULL", "QUICK", "Profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    connect_reps: int  # separate connect/close cycles (quick: the transport session is the one sample)
    pytest_reps: int
    transfer_bytes: int
    transfer_reps: int
    latency_keepalive: int
    latency_newconn: int
    latency_reps: int
    concurrency: tuple[int, ...]
    concurrency_bytes: int
    concurrency_reps: int
    baseline_concurrency: bool  # also load the baselines with N connections
    diagnostics: bool  # the python port-forward (no mux) path
    quiet_wait_s: float  # before each transfer, wait up to this long for other processes to go quiet
    route_cold_reps: int = 3  # sessions with isolate=True, each deploying the routing manager afresh
    route_warm_reps: int = 5  # per-test routes opened and closed in each of those sessions
    route_pool_rounds: int = 12  # route-pool: rounds of one warm and one cold per-test route
    pool_scale_sessions: int = 5  # pool-scale: sessions at once (xdist workers, parallel runs)...
    pool_scale_routes: int = 10  # ...each opening this many per-test routes, all kept open
    pool_scale_pool: int = int(os.environ.get("BENCH_POOL_SCALE_POOL", "10"))  # ...each with this many warm pods
    # ...filled before the routes are opened (steady state); 0 (BENCH_POOL_SCALE_PREFILL=0): routes
    # opened while the pools refill
    pool_scale_prefill: bool = os.environ.get("BENCH_POOL_SCALE_PREFILL", "1") != "0"
    router_transfer_bytes: int = 256 * 2**20
    router_transfer_reps: int = 3
    route_scale: tuple[int, ...] = (1, 10, 50)  # the Nth route's time to live is reported for these N


FULL = Profile(
    name="full", connect_reps=5, pytest_reps=3, transfer_bytes=256 * 2**20, transfer_reps=5,
    latency_keepalive=1000, latency_newconn=300, latency_reps=5, concurrency=(100, 1000),
    concurrency_bytes=32 * 1024, concurrency_reps=2, baseline_concurrency=True, diagnostics=True,
    quiet_wait_s=30.0,
)  # fmt: skip
QUICK = Profile(
    name="quick", connect_reps=0, pytest_reps=0, transfer_bytes=8 * 2**20, transfer_reps=1,
    latency_keepalive=200, latency_newconn=50, latency_reps=1, concurrency=(100, 1000),
    concurrency_bytes=4 * 1024, concurrency_reps=1, baseline_concurrency=False, diagnostics=False,
    quiet_wait_s=0.0,
)  # fmt: skip
