"""bench.codeship's pure parts: the order of the modes, the paired differences, the summary and the report.

The comparison is only fair when both modes see the same noise: each round runs both, the order
flipping, and the difference is taken round by round. Pinned here without a cluster.
"""

from __future__ import annotations

from typing import Any

from bench import codeship


def _connect(round_: int, mode: str, seconds: float, ship: float | None = None) -> dict[str, Any]:
    phases: dict[str, tuple[float, float]] = {"agent pod Ready (pull + start)": (0.2, seconds - 0.5)}
    if ship is not None:
        phases["create the code ConfigMap"] = (0.1, 0.1 + ship)
    return {
        "round": round_,
        "mode": mode,
        "connect_s": seconds,
        "phases": phases,
        "pods": {"agent pod": {"seen": 0.15, "running": 0.9}},
    }


def _results() -> dict[str, Any]:
    samples = {
        "configmap": [_connect(1, "configmap", 2.6, 0.02), _connect(2, "configmap", 3.0, 0.03)],
        "image": [_connect(1, "image", 2.5), _connect(2, "image", 2.4)],
    }
    return {"namespace": "bridge-bench-code", "warm": {"samples": samples}, "failures": []}


def test_the_modes_take_turns_going_first() -> None:
    assert [codeship.order(n) for n in range(3)] == [
        ("configmap", "image"),
        ("image", "configmap"),
        ("configmap", "image"),
    ]


def test_differences_are_configmap_minus_image_round_by_round() -> None:
    paired = codeship._paired(_results()["warm"]["samples"], "connect_s")
    assert paired["n"] == 2
    assert round(paired["min"], 3) == 0.1
    assert round(paired["max"], 3) == 0.6


def test_the_warm_target_is_the_difference_of_the_medians() -> None:
    target = codeship.summary(_results())["target"]
    assert target["measured_s"] == 0.35  # medians 2.8 - 2.45
    assert target["met"] is True
    slow = _results()
    slow["warm"]["samples"]["configmap"][0]["connect_s"] = 3.4
    assert codeship.summary(slow)["target"]["met"] is False  # medians 3.2 - 2.45


def test_the_report_shows_steps_only_one_mode_has() -> None:
    text = codeship.render(_results())
    assert "| **warm connect** | **2.80 (2.60-3.00, n=2)** | **2.45 (2.40-2.50, n=2)** | **+0.35**" in text
    assert "| create the code ConfigMap | 0.025 (0.020-0.030, n=2) | n/a | - |" in text
    assert "**met**" in text


def test_a_run_that_measured_nothing_still_reports() -> None:
    text = codeship.render({"namespace": "x", "failures": ["the benchmark could not run: boom"]})
    assert "FAILURE: the benchmark could not run: boom" in text
