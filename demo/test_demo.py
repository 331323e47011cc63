"""The demo suite: integration tests of `orders`, run locally, bridged into the cluster.

    pytest demo --bridge-service=orders --bridge-namespace=bridge-demo

The cluster's `frontend` calls our local `orders`, which calls the cluster's `inventory`
by its cluster name, with the pod's environment and files. (scripts/demo.sh runs this.)
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

APP = Path(__file__).resolve().parents[1] / "fixtures" / "sampleapp" / "app.py"


@pytest.fixture(scope="module")
def local_orders(bridged_service: Any) -> Iterator[Any]:
    process = bridged_service.start(
        [sys.executable, str(APP)],
        env={
            "SERVICE_NAME": "orders",
            "LISTEN_PORT": str(bridged_service.local_port),
            "LISTEN_PORT_2": str(bridged_service.local_ports[9091]),
            "HOSTNAME": "my-laptop",
        },
    )
    yield bridged_service
    process.stop()


def _get(url: str, route: str | None = None) -> Any:
    headers = {"kubernetes-route-as": route} if route else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as response:
        return json.load(response)


def test_the_cluster_frontend_reaches_my_local_orders(local_orders: Any) -> None:
    reply = _get("http://frontend.bridge-demo/api")
    assert [reply["service"], reply["downstream"][0]["pod"]] == ["frontend", "my-laptop"]


def test_local_orders_reaches_the_cluster_inventory_by_name(local_orders: Any) -> None:
    inventory = _get("http://frontend.bridge-demo/api", route="demo")["downstream"][0]["downstream"][0]
    assert inventory["pod"].startswith("inventory-")
    assert inventory["route"] == "demo", "the header was propagated through the local service"


def test_local_orders_runs_with_the_pods_configuration(local_orders: Any) -> None:
    env = local_orders.env
    assert env["GREETING"] == "hello from orders"  # literal
    assert env["ORDERS_REGION"] == "eu-demo-1"  # ConfigMap via envFrom
    assert env["API_TOKEN"]  # Secret via secretKeyRef
    assert env["POD_NAMESPACE"] == "bridge-demo"  # fieldRef


@pytest.mark.isolated
def test_my_isolated_route_gets_only_my_traffic(isolated_route: Any, local_orders: Any) -> None:
    """A route of its own for this test: only requests with its header reach this second local orders."""
    isolated_route.start(
        [sys.executable, str(APP)],
        env={
            "SERVICE_NAME": "orders",
            "LISTEN_PORT": str(isolated_route.local_port),
            "LISTEN_PORT_2": str(isolated_route.local_ports[9091]),
            "HOSTNAME": "my-route",
        },
    )
    assert _get("http://frontend.bridge-demo/api", route=isolated_route.name)["downstream"][0]["pod"] == "my-route"
    assert _get("http://frontend.bridge-demo/api")["downstream"][0]["pod"] == "my-laptop", "everyone else: the bridge"
    result = isolated_route.assert_propagates("frontend", "/api")
    assert result.reached[:2] == ["frontend", "orders"]
