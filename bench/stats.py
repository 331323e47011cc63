"""Medians and spreads over repeated runs (pure)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["Summary", "summarize"]


class Summary(dict[str, float | int]):
    """``median``, ``min``, ``max``, ``n`` (and ``stdev`` with two or more values)."""

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        if not self.get("n"):
            return "n/a"
        median = f"{self['median']:.{digits}f}{unit}"
        if self["n"] == 1:
            return f"{median} (n=1)"
        return f"{median} ({self['min']:.{digits}f}-{self['max']:.{digits}f}, n={self['n']})"


def summarize(values: Sequence[float]) -> Summary:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return Summary(n=0)
    result = Summary(median=statistics.median(finite), min=min(finite), max=max(finite), n=len(finite))
    if len(finite) > 1:
        result["stdev"] = statistics.stdev(finite)
    return result
