"""kube.deadline: a block of API calls ends in bounded time whatever the API server does."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pytest_bridge.cluster import kube
from pytest_bridge.core.errors import ApiUnreachableError


def _seen_timeout(**kwargs: Any) -> Any:
    return kwargs["_request_timeout"]


def test_without_a_deadline_a_call_gets_the_default_or_its_own_timeout() -> None:
    assert kube.call("read", _seen_timeout) == kube.REQUEST_TIMEOUT
    assert kube.call("read", _seen_timeout, _request_timeout=(3.0, 5.0)) == (3.0, 5.0)


def test_within_a_deadline_each_attempt_gets_at_most_half_of_what_is_left() -> None:
    with kube.deadline(10):
        connect, read = kube.call("read", _seen_timeout)
    assert 4.9 < connect <= 5.0 and 4.9 < read <= 5.0  # 30 s cut to half of 10: a retried connection tries twice
    with kube.deadline(60):
        assert kube.call("read", _seen_timeout, _request_timeout=2.0) == (2.0, 2.0)


def test_a_call_after_the_deadline_fails_at_once_naming_what_it_was_for() -> None:
    with kube.deadline(0.01):
        time.sleep(0.02)
        with pytest.raises(ApiUnreachableError, match="restore Deployment orders: not tried, the time"):
            kube.call("restore Deployment orders", _seen_timeout)
    assert kube.call("read", _seen_timeout) == kube.REQUEST_TIMEOUT  # the deadline ended with its block
