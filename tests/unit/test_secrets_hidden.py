"""The imported environment (the service's secrets among it) never shows in a repr: tracebacks,
``--showlocals``, assertion messages and reports print reprs."""

from __future__ import annotations

from pathlib import Path

from k8s_samples import orders_deployment, orders_pod, orders_replicaset, orders_service

from pytest_bridge.core.names import AddressMode, NameMapping
from pytest_bridge.core.plan import make_plan
from pytest_bridge.orchestration.connection import BridgedService
from pytest_bridge.plugin import LocalService

SECRET = "s3cr3t-db-password"


def test_reprs_hide_env_values(tmp_path: Path) -> None:
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), orders_deployment()])
    service = BridgedService(
        name="orders", namespace="shop", plan=plan, local_ports={8080: 18080}, env={"DB_PASSWORD": SECRET},
        session_dir=tmp_path, mapping=NameMapping("shop", AddressMode.LOOPBACK_IPS, ()), agent_pod="orders-abc",
    )  # fmt: skip
    local = LocalService(bridge=None, service=service)  # type: ignore[arg-type]
    for text in (repr(service), repr(local), str(local)):
        assert SECRET not in text and "DB_PASSWORD" not in text, text
    assert "1 env vars (values hidden)" in repr(local)
    assert local.env["DB_PASSWORD"] == SECRET, "still there for the test to use"
