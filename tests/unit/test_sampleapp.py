"""The sample app (fixtures/sampleapp) and its manifests, checked without a cluster.

Three real `app.py` processes run on loopback, chained the way the manifests chain them
(frontend -> orders -> inventory), so what the e2e suite later relies on in the cluster is
already proven here. The manifest checks pin what a bridge must be able to import.
"""

from __future__ import annotations

import http.client
import json
import os
import runpy
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.images import PYTHON

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
MANIFESTS = REPO / "fixtures" / "manifests"
CODE_MANIFEST = MANIFESTS / "sample-app-code.yaml"
COMMAND = ["python3", "-u", "/app/app.py"]
ROUTE_HEADER = "kubernetes-route-as"
START_TIMEOUT = 10.0
PART_OF = {"app.kubernetes.io/part-of": "bridge-demo"}


@dataclass
class RunningApp:
    """One app.py process and everything it has printed so far."""

    name: str
    process: subprocess.Popen[str]
    ports: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def drain(self, expected_ports: int) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if " listening on " in line:
                self.ports.append(int(line.rsplit(":", 1)[1]))
                if len(self.ports) == expected_ports:
                    self.ready.set()


@contextmanager
def run_app(name: str, extra_env: Mapping[str, str]) -> Iterator[RunningApp]:
    # A clean environment: no proxy variables or stray settings from the developer's shell.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SERVICE_NAME": name,
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": "0",
        "HOSTNAME": f"{name}-local",
        **extra_env,
    }
    expected_ports = 2 if "LISTEN_PORT_2" in env else 1
    process = subprocess.Popen(
        [sys.executable, "-u", str(APP)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    app = RunningApp(name, process)
    reader = threading.Thread(target=app.drain, args=(expected_ports,), daemon=True)
    reader.start()
    try:
        if not app.ready.wait(START_TIMEOUT):
            pytest.fail(f"{name} did not start within {START_TIMEOUT}s; output: {app.lines}")
        yield app
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(5)
        assert process.stdout is not None
        process.stdout.close()


@dataclass(frozen=True)
class Chain:
    frontend: RunningApp
    orders: RunningApp
    inventory: RunningApp
    nopropagate: RunningApp
    files_root: Path


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    files_root = tmp_path_factory.mktemp("etc-sample")
    (files_root / "config").mkdir()
    (files_root / "config" / "settings.json").write_text('{"currency": "EUR"}\n')
    (files_root / "outside-secret.txt").write_text("not reachable through ..\n")
    with ExitStack() as stack:
        inventory = stack.enter_context(run_app("inventory", {"REPORT_ENV": "SERVICE_NAME"}))
        orders = stack.enter_context(
            run_app(
                "orders",
                {
                    "LISTEN_PORT_2": "0",
                    "DOWNSTREAM": inventory.api_url,
                    "GREETING": "hello from orders",
                    "REPORT_ENV": "SERVICE_NAME, GREETING,UNSET_VARIABLE",
                    "SAMPLE_FILES_ROOT": str(files_root / "config"),
                },
            )
        )
        frontend = stack.enter_context(run_app("frontend", {"DOWNSTREAM": orders.api_url}))
        nopropagate = stack.enter_context(
            run_app("nopropagate", {"DOWNSTREAM": inventory.api_url, "DROP_ROUTE_HEADER": "1"})
        )
        yield Chain(frontend, orders, inventory, nopropagate, files_root)


def request(
    app: RunningApp,
    method: str,
    path: str,
    *,
    port: int | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port or app.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def get_json(app: RunningApp, path: str, **kwargs: Any) -> Any:
    response, body = request(app, "GET", path, **kwargs)
    assert response.status == 200, body
    assert response.getheader("Content-Type") == "application/json"
    return json.loads(body)


# --- the running app -------------------------------------------------------------------


def test_chain_reports_every_hop(chain: Chain) -> None:
    reply = get_json(chain.frontend, "/api")

    assert reply["service"] == "frontend"
    assert reply["pod"] == "frontend-local"
    assert reply["route"] is None
    [orders] = reply["downstream"]
    assert orders["service"] == "orders"
    assert orders["env"] == {
        "SERVICE_NAME": "orders",
        "GREETING": "hello from orders",
        "UNSET_VARIABLE": None,
    }
    [inventory] = orders["downstream"]
    assert inventory["service"] == "inventory"
    assert inventory["downstream"] == []


def test_route_header_propagates_through_the_chain(chain: Chain) -> None:
    reply = get_json(chain.frontend, "/api", headers={ROUTE_HEADER: "alice-7f3a"})

    hops = [reply, reply["downstream"][0], reply["downstream"][0]["downstream"][0]]
    assert [hop["service"] for hop in hops] == ["frontend", "orders", "inventory"]
    assert [hop["route"] for hop in hops] == ["alice-7f3a"] * 3


def test_drop_route_header_stops_propagation(chain: Chain) -> None:
    reply = get_json(chain.nopropagate, "/api", headers={ROUTE_HEADER: "alice-7f3a"})

    assert reply["route"] == "alice-7f3a"
    assert reply["downstream"][0]["service"] == "inventory"
    assert reply["downstream"][0]["route"] is None


def test_unreachable_downstream_is_reported_not_raised() -> None:
    with run_app("lonely", {"DOWNSTREAM": "http://127.0.0.1:9/api", "DOWNSTREAM_TIMEOUT": "2"}) as app:
        reply = get_json(app, "/api")

    [failure] = reply["downstream"]
    assert failure["url"] == "http://127.0.0.1:9/api"
    assert "error" in failure


def test_request_lines_are_logged_with_route(chain: Chain) -> None:
    get_json(chain.inventory, "/api?probe=log-check", headers={ROUTE_HEADER: "bob"})

    deadline = time.monotonic() + 5
    while not any("GET /api?probe=log-check" in line for line in chain.inventory.lines):
        assert time.monotonic() < deadline, chain.inventory.lines
        time.sleep(0.05)
    [line] = [line for line in chain.inventory.lines if "probe=log-check" in line]
    assert "inventory" in line
    assert " 200 " in line
    assert "route=bob" in line


def test_healthz_and_keep_alive(chain: Chain) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", chain.orders.port, timeout=10)
    try:
        sockets = []
        for _ in range(3):
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == b"ok\n"
            assert response.version == 11
            assert not response.will_close
            sockets.append(connection.sock)
        # One socket served all three: the server kept the connection alive.
        assert sockets[0] is not None
        assert sockets == [sockets[0]] * 3
    finally:
        connection.close()


def test_admin_port_serves_the_same_app(chain: Chain) -> None:
    assert len(chain.orders.ports) == 2
    admin_port = chain.orders.ports[1]

    response, _ = request(chain.orders, "GET", "/healthz", port=admin_port)
    reply = get_json(chain.orders, "/api", port=admin_port)

    assert response.status == 200
    assert reply["service"] == "orders"
    assert reply["port"] == admin_port


def test_env_endpoint_reports_named_variables(chain: Chain) -> None:
    assert get_json(chain.orders, "/env") == {
        "SERVICE_NAME": "orders",
        "GREETING": "hello from orders",
        "UNSET_VARIABLE": None,
    }


def test_file_endpoint_reads_under_root_only(chain: Chain) -> None:
    response, body = request(chain.orders, "GET", "/file?path=settings.json")
    assert response.status == 200
    assert body == b'{"currency": "EUR"}\n'

    missing, _ = request(chain.orders, "GET", "/file?path=nope.txt")
    escape, _ = request(chain.orders, "GET", "/file?path=../outside-secret.txt")
    no_path, _ = request(chain.orders, "GET", "/file")
    assert (missing.status, escape.status, no_path.status) == (404, 403, 403)


def test_chunked_response(chain: Chain) -> None:
    response, body = request(chain.inventory, "GET", "/chunked?n=3")

    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert body.decode().splitlines() == [f"chunk {i} from inventory" for i in range(3)]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked-request"])
def test_echo(chain: Chain, chunked: bool) -> None:
    payload = bytes(range(256)) * 40
    body: bytes | Iterator[bytes] = payload
    headers = {"Content-Type": "application/x-test"}
    connection = http.client.HTTPConnection("127.0.0.1", chain.inventory.port, timeout=10)
    try:
        if chunked:
            connection.request(
                "POST",
                "/echo",
                body=iter([payload[:1000], payload[1000:]]),
                headers=headers,
                encode_chunked=True,
            )
        else:
            connection.request("POST", "/echo", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/x-test"
        assert response.read() == payload
    finally:
        connection.close()


def test_unknown_route_is_404_json(chain: Chain) -> None:
    response, body = request(chain.inventory, "GET", "/nope")

    assert response.status == 404
    assert "error" in json.loads(body)


def test_bad_request_line_is_answered_and_logged(chain: Chain) -> None:
    with socket.create_connection(("127.0.0.1", chain.frontend.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        # A one-word request line is answered HTTP/0.9 style (no status line), then closed.
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
    assert b"Error code: 400" in reply
    deadline = time.monotonic() + 5
    while not any('"GARBAGE" 400' in line for line in chain.frontend.lines):
        assert time.monotonic() < deadline, chain.frontend.lines
        time.sleep(0.05)

    assert get_json(chain.frontend, "/env") == {}


# --- the manifests ---------------------------------------------------------------------


def load_manifests(*paths: Path) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in paths:
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return documents


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    documents = load_manifests(*(MANIFESTS / name for name in kustomization["resources"]))
    by_kind_and_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    assert len(by_kind_and_name) == len(documents), "duplicate objects in fixtures/manifests"
    return by_kind_and_name


def test_kustomization_lists_every_manifest_file() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())

    on_disk = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["resources"][0] == "namespace.yaml"
    assert kustomization["namespace"] == "bridge-demo"


def test_every_object_is_labelled_and_namespaced(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in manifests.items():
        assert doc["metadata"]["labels"].items() >= PART_OF.items(), (kind, name)
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "bridge-demo", (kind, name)
        if kind == "Deployment":
            template = doc["spec"]["template"]
            assert template["metadata"]["labels"].items() >= PART_OF.items(), name


@pytest.mark.parametrize("service", ["frontend", "orders", "inventory"])
def test_deployments_are_quick_and_probed(manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    deployment = manifests[("Deployment", service)]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]

    assert deployment["spec"]["replicas"] == 1
    assert pod["terminationGracePeriodSeconds"] == 2
    assert pod.get("enableServiceLinks", True) is True
    assert container["image"] == PYTHON.name  # the stock image; the embedded cluster has a stand-in
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == COMMAND
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert ("Service", service) in manifests


def _sample_pod_specs(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    variants = load_manifests(*sorted((MANIFESTS / "variants").glob("*.yaml")))
    deployments = [doc for doc in [*manifests.values(), *variants] if doc["kind"] == "Deployment"]
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in deployments}


def test_the_code_configmap_is_app_py_byte_for_byte() -> None:
    [configmap] = load_manifests(CODE_MANIFEST)
    assert configmap["data"]["app.py"].encode() == APP.read_bytes()
    # ... and is exactly what the generator writes, so regenerating changes nothing.
    render = runpy.run_path(str(REPO / "fixtures" / "sampleapp" / "configmap.py"))["render"]
    assert CODE_MANIFEST.read_text() == render(APP.read_text()), "run: python fixtures/sampleapp/configmap.py"


def test_every_sample_pod_runs_app_py_from_the_configmap(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    [configmap] = load_manifests(CODE_MANIFEST)
    for name, pod in _sample_pod_specs(manifests).items():
        [container] = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert container["image"] == PYTHON.name, name
        assert container["command"] == COMMAND, name
        assert mounts["/app"]["readOnly"] is True, name
        assert volumes[mounts["/app"]["name"]]["configMap"]["name"] == configmap["metadata"]["name"], name


def test_every_sample_pod_meets_pod_security_restricted(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The checks of the "restricted" Pod Security Standard (v1.34) that a pod spec can fail."""
    allowed_volumes = {"configMap", "secret", "emptyDir", "projected", "downwardAPI", "csi", "ephemeral",
                       "persistentVolumeClaim", "name"}  # fmt: skip
    for name, pod in _sample_pod_specs(manifests).items():
        pod_context = pod.get("securityContext", {})
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), name
        for volume in pod.get("volumes", []):
            assert set(volume) <= allowed_volumes, (name, volume)
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            context = container.get("securityContext", {})
            effective = {**pod_context, **context}  # the container's settings win
            assert effective.get("runAsNonRoot") is True, name
            assert effective.get("runAsUser") not in (0, None), name  # restricted forbids 0; ours names one
            assert effective.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
            assert context.get("allowPrivilegeEscalation") is False, name
            assert not context.get("privileged"), name
            assert "ALL" in context.get("capabilities", {}).get("drop", []), name
            assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name
            assert not any(port.get("hostPort") for port in container.get("ports", [])), name
            assert context.get("readOnlyRootFilesystem") is True, name  # not required; it works for the app


def test_chain_is_wired_by_service_name(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    def downstream(service: str) -> str | None:
        [container] = manifests[("Deployment", service)]["spec"]["template"]["spec"]["containers"]
        values = {env["name"]: env.get("value") for env in container["env"]}
        return values.get("DOWNSTREAM")

    assert downstream("frontend") == "http://orders/api"
    assert downstream("orders") == "http://inventory/api"
    assert downstream("inventory") is None


def test_orders_uses_every_configuration_source(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = manifests[("Deployment", "orders")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    value_from = [item["valueFrom"] for item in env.values() if "valueFrom" in item]

    assert env["SERVICE_NAME"]["value"] == "orders"
    assert any("configMapKeyRef" in source for source in value_from)
    assert any("secretKeyRef" in source for source in value_from)
    field_paths = {source["fieldRef"]["fieldPath"] for source in value_from if "fieldRef" in source}
    assert {"metadata.namespace", "status.podIP"} <= field_paths
    env_from_kinds = {key for source in container["envFrom"] for key in source}
    assert {"configMapRef", "secretRef"} <= env_from_kinds

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volume_kinds = {key for volume in volumes.values() for key in volume if key != "name"}
    assert {"configMap", "secret"} <= volume_kinds
    assert mounts.pop("code") == "/app"  # the app itself, as in every sample pod
    assert all(path.startswith("/etc/sample/") for path in mounts.values())
    assert set(mounts) == set(volumes) - {"code"}

    # Everything referenced exists in the manifests.
    referenced_config_maps = {v["configMap"]["name"] for v in volumes.values() if "configMap" in v}
    referenced_config_maps |= {s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s}
    referenced_secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    referenced_secrets |= {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
    assert all(("ConfigMap", name) in manifests for name in referenced_config_maps)
    assert all(("Secret", name) in manifests for name in referenced_secrets)


def test_orders_service_ports_differ_from_container_ports(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    [container] = manifests[("Deployment", "orders")]["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = manifests[("Service", "orders")]["spec"]["ports"]

    assert container_ports == {"http": 8080, "admin": 9091}
    assert {(p["port"], p["targetPort"]) for p in service_ports} == {(80, "http"), (9090, "admin")}
    for port in service_ports:
        assert isinstance(port["targetPort"], str)
        assert port["port"] != container_ports[port["targetPort"]]


def test_ingress_routes_host_to_frontend(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    ingress = manifests[("Ingress", "frontend")]

    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "shop.bridge-demo.example"
    [path] = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "frontend", "port": {"number": 80}}


def test_nopropagate_variant_is_separate_and_drops_the_header() -> None:
    documents = load_manifests(MANIFESTS / "variants" / "inventory-nopropagate.yaml")
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}

    assert kinds == {("Deployment", "inventory-nopropagate"), ("Service", "inventory-nopropagate")}
    [deployment] = [doc for doc in documents if doc["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "DROP_ROUTE_HEADER", "value": "1"} in container["env"]
