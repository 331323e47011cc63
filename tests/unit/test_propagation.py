"""Which hop dropped the route header: the analysis of router counts (pure)."""

from __future__ import annotations

from pytest_bridge.orchestration.propagation import analyse, counts, delta, pod_owners

R = "alice-1a2b3c"
OWNERS = {"10.0.0.1": "frontend", "10.0.0.2": "inventory-nopropagate", "10.0.0.9": "orders (local)"}


def test_a_chain_that_propagates_has_no_drop() -> None:
    deltas = {
        "frontend": {(R, True, "10.0.0.9"): 1},
        "orders": {(R, True, "10.0.0.1"): 1},
        "inventory": {(R, True, "10.0.0.9"): 1},
    }
    result = analyse(R, "frontend", deltas, OWNERS)
    assert result.ok
    assert result.reached == ["frontend", "orders", "inventory"]
    assert "no hop dropped it" in result.describe()


def test_the_dropping_hop_is_named() -> None:
    deltas = {
        "frontend": {(R, True, "10.0.0.9"): 1},
        "orders": {(R, True, "10.0.0.1"): 1},
        "inventory-nopropagate": {(R, True, "10.0.0.9"): 1},
        "inventory": {("", False, "10.0.0.2"): 1},
    }
    result = analyse(R, "frontend", deltas, OWNERS)
    assert not result.ok
    assert [d.describe() for d in result.dropped] == [
        "service inventory-nopropagate received the request with the header, but its call to inventory did not carry it"
    ]
    assert "inventory" not in result.reached


def test_headerless_traffic_from_a_service_without_the_header_is_not_blamed() -> None:
    deltas = {"frontend": {(R, True, "10.0.0.9"): 1}, "inventory": {("", False, "10.0.0.77"): 3}}
    assert analyse(R, "frontend", deltas, OWNERS).ok


def test_host_routed_requests_count_as_received() -> None:
    deltas = {"frontend": {(R, False, "10.0.0.50"): 1}, "orders": {("", False, "10.0.0.1"): 1}}
    result = analyse(R, "frontend", deltas, OWNERS)
    assert [d.describe() for d in result.dropped] == [
        "service frontend received the request with the header, but its call to orders did not carry it"
    ]


def test_counts_and_delta() -> None:
    stats = {
        "entries": [
            {"route": R, "header": True, "remote_addr": "10.0.0.1", "count": 3},
            {"route": "", "header": False, "remote_addr": "10.0.0.2", "count": 1},
        ]
    }
    before = counts(stats)
    stats["entries"][1]["count"] = 4
    assert delta(before, counts(stats)) == {("", False, "10.0.0.2"): 3}


def test_pod_owners_by_original_selector_and_session() -> None:
    services = [
        {"metadata": {"name": "orders", "annotations": {"pytest-bridge.io/original-selector": '{"app": "orders"}'}},
         "spec": {"selector": {"pytest-bridge.io/router": "orders"}}},
        {"metadata": {"name": "frontend"}, "spec": {"selector": {"app": "frontend"}}},
    ]  # fmt: skip
    pods = [
        {"metadata": {"labels": {"app": "orders"}}, "status": {"podIP": "10.0.0.5"}},
        {"metadata": {"labels": {"app": "frontend"}}, "status": {"podIP": "10.0.0.1"}},
        {"metadata": {"labels": {"pytest-bridge.io/session": "s1", "pytest-bridge.io/route-service": "orders"}},
         "status": {"podIP": "10.0.0.9"}},
        {"metadata": {"labels": {"app": "other"}}, "status": {}},
    ]  # fmt: skip
    assert pod_owners(services, pods, "s1") == {
        "10.0.0.5": "orders",
        "10.0.0.1": "frontend",
        "10.0.0.9": "orders (local)",
    }


def test_the_local_process_dropping_the_header_is_named() -> None:
    deltas = {
        "frontend": {(R, True, "10.0.0.9"): 1},
        "orders": {(R, True, "10.0.0.1"): 1},
        "inventory": {("", False, "10.0.0.9"): 1},
    }
    result = analyse(R, "frontend", deltas, OWNERS)
    assert [d.describe() for d in result.dropped] == [
        "service orders (local) received the request with the header, but its call to inventory did not carry it"
    ]
