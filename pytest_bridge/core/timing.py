"""Timed steps: the hook through which a caller learns how long the plugin's steps take.

The plugin marks its steps (``@timed("open the tunnel")``, ``with step(label):``); a caller
that wants the times (the benchmarks) registers an observer with :func:`observe` and receives
``(label, start, end)`` in ``time.monotonic()`` seconds, from whatever thread ran the step.
With no observer a step costs one list check. No I/O here.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["Observer", "observe", "step", "timed"]

Observer = Callable[[str, float, float], None]
P = ParamSpec("P")
R = TypeVar("R")

_observers: list[Observer] = []


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call ``observer(label, start, end)`` after each step that ends inside the ``with`` block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    """Time the ``with`` block as the step ``label`` (it counts even if it raises)."""
    if not _observers:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        ended = time.monotonic()
        for observer in list(_observers):
            observer(label, started, ended)


def timed(label: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so each call is timed as the step ``label``."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with step(label):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
