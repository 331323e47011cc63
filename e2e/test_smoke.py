"""Smoke tests that prove the cluster is real and the sample app works in it.

Everything the bridge later depends on is exercised once here with the plain Kubernetes
client: node readiness, Service DNS (short and full names), header propagation through the
chain, exec, port-forward through the API server, pod logs and a Deployment rollout. If one
of these fails, the bridge tests cannot be trusted either.

Run: `KUBECONFIG=... .venv/bin/pytest e2e -m e2e` (skips without a cluster).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream

from e2e.conftest import NAMESPACE, pod_is_ready, pod_name

pytestmark = pytest.mark.e2e

ROUTE_HEADER = "kubernetes-route-as"
PYTHON = "python3"  # on PATH: the stock image has it in /usr/local/bin, not /usr/bin
EXEC_TIMEOUT = 60.0
ROLLOUT_TIMEOUT = 120.0
RESTARTED_AT = "pytest-bridge.e2e/restarted-at"

# Runs inside a pod: GET a URL with the given headers, print the body, exit non-zero on errors.
_HTTP_GET = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(request, timeout=20) as response:
    sys.stdout.write(response.read().decode())
"""

ReadyPod = Callable[[str], str]


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str
    returncode: int | None


def exec_in_pod(core_v1: client.CoreV1Api, pod: str, argv: Sequence[str]) -> ExecResult:
    ws: Any = stream(
        core_v1.connect_get_namespaced_pod_exec,
        pod,
        NAMESPACE,
        command=list(argv),
        container="app",
        stdin=False,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
    )
    try:
        ws.run_forever(timeout=EXEC_TIMEOUT)
        assert not ws.is_open(), f"exec {argv} in {pod} still running after {EXEC_TIMEOUT}s"
        return ExecResult(ws.read_stdout(), ws.read_stderr(), ws.returncode)
    finally:
        ws.close()
        release_websocket(ws.sock)


def release_websocket(websocket: Any) -> None:
    """Close a websocket-client connection's TLS socket now.

    ``WebSocket.close()`` returns at once when the server closed first (answering its close
    frame marked the client disconnected), so the socket was left to the garbage collector,
    whose ResourceWarning surfaced as an unraisable exception at exit. ``shutdown()`` closes it.
    """
    if websocket is not None:
        websocket.shutdown()


def exec_in_pod_json(core_v1: client.CoreV1Api, pod: str, code: str) -> Any:
    """Run ``python3 -c 'import json; <code>'`` in ``pod`` and parse what it prints as JSON."""
    result = exec_in_pod(core_v1, pod, [PYTHON, "-c", f"import json\n{code}"])
    assert result.returncode == 0 and result.stdout, f"exec in {pod} failed: {result.stderr}"
    return json.loads(result.stdout)


def http_get_from_pod(core_v1: client.CoreV1Api, pod: str, url: str, headers: Mapping[str, str] | None = None) -> str:
    """GET `url` from inside `pod` (with the pod's DNS and network) and return the body."""
    result = exec_in_pod(core_v1, pod, [PYTHON, "-c", _HTTP_GET, url, json.dumps(dict(headers or {}))])
    assert result.returncode == 0, (
        f"GET {url} from {pod} failed (exit {result.returncode}):\n{result.stderr}"
        "\n(a Service that only fails when a pod calls itself points at CNI hairpin mode)"
    )
    return result.stdout


def get_json_from_pod(core_v1: client.CoreV1Api, pod: str, url: str, headers: Mapping[str, str] | None = None) -> Any:
    return json.loads(http_get_from_pod(core_v1, pod, url, headers))


def chain_of(reply: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The hops of an /api reply, first to last, following the first downstream each time."""
    hops = [reply]
    while hops[-1].get("downstream"):
        hops.append(hops[-1]["downstream"][0])
    return hops


def test_nodes_are_ready(core_v1: client.CoreV1Api) -> None:
    nodes = core_v1.list_node().items
    assert nodes, "the cluster has no nodes"
    for node in nodes:
        assert node.status is not None and node.metadata is not None
        ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
        assert [c.status for c in ready] == ["True"], f"node {node.metadata.name} not Ready: {ready}"


def test_sample_pods_are_ready(
    sample_app: dict[str, list[str]], core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api
) -> None:
    assert set(sample_app) == {"frontend", "orders", "inventory"}
    for deployment in apps_v1.list_namespaced_deployment(NAMESPACE).items:
        assert deployment.metadata is not None and deployment.status is not None
        if deployment.metadata.name not in sample_app:
            continue
        assert deployment.status.ready_replicas == 1, f"{deployment.metadata.name}: {deployment.status}"
    discovery = client.DiscoveryV1Api(core_v1.api_client)
    for service in sample_app:
        slices = discovery.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={service}"
        ).items
        ready = [
            endpoint
            for endpoint_slice in slices
            for endpoint in endpoint_slice.endpoints or []
            if endpoint.conditions is not None and endpoint.conditions.ready
        ]
        assert ready, f"Service {service} has no ready endpoints"


@pytest.mark.parametrize(
    "url",
    ["http://frontend/api", f"http://frontend.{NAMESPACE}.svc.cluster.local/api"],
    ids=["short-name", "full-name"],
)
def test_chain_answers_through_services(core_v1: client.CoreV1Api, ready_pod: ReadyPod, url: str) -> None:
    reply = get_json_from_pod(core_v1, ready_pod("frontend"), url)

    hops = chain_of(reply)
    assert [hop.get("service") for hop in hops] == ["frontend", "orders", "inventory"], reply
    assert all("error" not in hop for hop in hops), reply
    assert all(hop["pod"].startswith(f"{hop['service']}-") for hop in hops), reply


def test_route_header_reaches_the_end_of_the_chain(core_v1: client.CoreV1Api, ready_pod: ReadyPod) -> None:
    route = f"e2e-{uuid.uuid4().hex[:8]}"

    reply = get_json_from_pod(core_v1, ready_pod("frontend"), "http://frontend/api", {ROUTE_HEADER: route})

    hops = chain_of(reply)
    assert [(hop["service"], hop["route"]) for hop in hops] == [
        ("frontend", route),
        ("orders", route),
        ("inventory", route),
    ]


def test_orders_configuration_reaches_the_process(core_v1: client.CoreV1Api, ready_pod: ReadyPod) -> None:
    frontend, orders_pod = ready_pod("frontend"), ready_pod("orders")
    pod = core_v1.read_namespaced_pod(orders_pod, NAMESPACE)
    assert pod.status is not None

    env = get_json_from_pod(core_v1, frontend, "http://orders/env")
    admin = get_json_from_pod(core_v1, frontend, "http://orders:9090/api")
    settings = http_get_from_pod(core_v1, frontend, "http://orders/file?path=config/settings.json")
    token = http_get_from_pod(core_v1, frontend, "http://orders/file?path=secret/ORDERS_API_TOKEN")

    assert env["GREETING"] == "hello from orders"  # literal
    assert env["DB_HOST"] == env["ORDERS_DB_HOST"] == "orders-db.bridge-demo.svc.cluster.local"  # ConfigMap
    assert env["API_TOKEN"] == env["ORDERS_API_TOKEN"] == "demo-token-not-a-secret"  # Secret
    assert env["POD_NAMESPACE"] == NAMESPACE  # fieldRef
    assert env["POD_IP"] == pod.status.pod_ip
    assert env["INVENTORY_SERVICE_HOST"]  # service links
    assert admin["service"] == "orders" and admin["port"] == 9091  # Service 9090 -> admin
    assert json.loads(settings) == {"currency": "EUR", "max_items": 10}
    assert token == "demo-token-not-a-secret"


def test_port_forward_to_orders(core_v1: client.CoreV1Api, ready_pod: ReadyPod) -> None:
    forward: Any = portforward(
        core_v1.connect_get_namespaced_pod_portforward, ready_pod("orders"), NAMESPACE, ports="8080"
    )
    connection = http.client.HTTPConnection("orders", 8080, timeout=30)
    try:
        # The forwarded stream stands in for the TCP socket http.client would open.
        connection.sock = forward.socket(8080)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
        forward.close()
        # The client's proxy thread closes the websocket once the local side is closed; wait
        # for it, then release the TLS socket its close() may have left open.
        for thread in threading.enumerate():
            if thread.name.startswith("Kubernetes port forward proxy"):
                thread.join(timeout=30)
        release_websocket(forward.websocket)

    assert (response.status, body) == (200, b"ok\n")
    assert forward.error(8080) is None


def test_exec_returns_output_and_exit_code(core_v1: client.CoreV1Api, ready_pod: ReadyPod) -> None:
    script = "import os, sys; print(os.environ['SERVICE_NAME']); print('to stderr', file=sys.stderr); sys.exit(3)"

    result = exec_in_pod(core_v1, ready_pod("frontend"), [PYTHON, "-c", script])

    assert result.stdout == "frontend\n"
    assert "to stderr" in result.stderr
    assert result.returncode == 3


def test_pod_logs_contain_request_lines(core_v1: client.CoreV1Api, ready_pod: ReadyPod) -> None:
    frontend = ready_pod("frontend")
    marker = uuid.uuid4().hex
    http_get_from_pod(core_v1, frontend, f"http://frontend/api?probe={marker}")

    deadline = time.monotonic() + 15
    while True:
        logs = core_v1.read_namespaced_pod_log(frontend, NAMESPACE, container="app", tail_lines=200)
        lines = [line for line in logs.splitlines() if marker in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert lines, f"no request line with {marker} in the logs of {frontend}:\n{logs}"
    assert f'"GET /api?probe={marker} HTTP/1.1" 200' in lines[0]


@pytest.mark.usefixtures("sample_app")
def test_rollout_replaces_the_inventory_pod(core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api) -> None:
    selector = "app.kubernetes.io/name=inventory"
    old_pods = {pod_name(p) for p in core_v1.list_namespaced_pod(NAMESPACE, label_selector=selector).items}
    stamp = datetime.now(UTC).isoformat()
    patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}

    apps_v1.patch_namespaced_deployment(
        "inventory", NAMESPACE, patch, _content_type="application/strategic-merge-patch+json"
    )

    deadline = time.monotonic() + ROLLOUT_TIMEOUT
    while True:
        deployment = apps_v1.read_namespaced_deployment("inventory", NAMESPACE)
        pods = core_v1.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        names = {pod_name(p) for p in pods}
        assert deployment.metadata is not None and deployment.status is not None
        rolled_out = (
            (deployment.status.observed_generation or 0) >= (deployment.metadata.generation or 0)
            and deployment.status.updated_replicas == 1
            and deployment.status.ready_replicas == 1
            and not names & old_pods
            and len(pods) == 1
            and pod_is_ready(pods[0])
        )
        if rolled_out:
            break
        assert time.monotonic() < deadline, (
            f"inventory rollout not finished after {ROLLOUT_TIMEOUT:.0f}s: "
            f"old={sorted(old_pods)} now={sorted(names)} status={deployment.status}"
        )
        time.sleep(1)

    [new_pod] = pods
    assert new_pod.metadata is not None
    assert (new_pod.metadata.annotations or {}).get(RESTARTED_AT) == stamp
    for name in old_pods:
        with pytest.raises(ApiException) as gone:
            core_v1.read_namespaced_pod(name, NAMESPACE)
        assert gone.value.status == 404
