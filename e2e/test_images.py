"""End to end: prebuilt images (`pytest-bridge images push`) and ``--bridge-code=image``.

The embedded cluster has no registry, so this brings one (:mod:`e2e.cluster.registry`, on
loopback) and builds with the harness's own dockerd (``DOCKER_HOST``), FROM its stand-in for
the stock Python image. The images are new to the node, so kubelet must pull them; the bridge
then runs on the code baked into the agent image, ships no ConfigMap of code, and restores the
workload. A second agent image whose zipapp names another version and digest is refused by the
handshake check, and the cluster is left as it was.

Everything runs in a namespace of its own (``<e2e namespace>-images``, the sample app applied
there, deleted at the end); the images pulled into containerd and built into dockerd are removed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.cluster.images import _docker_socket, containerd_refs, ensure_dockerd, remove_images
from e2e.cluster.layout import Layout
from e2e.cluster.registry import Registry, ensure_tools
from e2e.conftest import NAMESPACE, SERVICES, apply_sample_app, pod_is_ready
from pytest_bridge.cluster import bundle, images
from pytest_bridge.cluster.bundle import Bundle
from pytest_bridge.core.patch import SESSION_LABEL, strip_server_fields
from pytest_bridge.local.ports import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "fixtures" / "sampleapp" / "app.py"
IMAGES_NAMESPACE = f"{NAMESPACE}-images"
REGISTRY_PATH = "e2e-images"  # under the registry: <host>/e2e-images/pytest-bridge-agent:...
# Any run's images in containerd, on any port of this machine's registry.
OUR_REFS = re.compile(rf"^(?:localhost|127\.0\.0\.1):\d+/{REGISTRY_PATH}/")
MANAGED = "app.kubernetes.io/managed-by=pytest-bridge"
SETTLE_TIMEOUT = 120.0
PULLED = re.compile(r'Successfully pulled image "(?P<image>[^"]+)" in (?P<took>\S+)')

INNER_SUITE = f"""
import json, os, sys, urllib.request

from kubernetes import client, config

NAMESPACE = {IMAGES_NAMESPACE!r}


def test_no_code_configmap_and_the_agent_runs_the_image(bridged_service):
    config.load_kube_config()
    core = client.CoreV1Api()
    shipped = core.list_namespaced_config_map(NAMESPACE, label_selector={bundle.CODE_LABEL!r}).items
    assert [c.metadata.name for c in shipped] == []
    pod = core.read_namespaced_pod(bridged_service.agent_pod, NAMESPACE)
    container = [c for c in pod.spec.containers if c.image == os.environ["AGENT_IMAGE"]]
    assert container, [c.image for c in pod.spec.containers]
    assert all(v.config_map is None or "pytest-bridge-code" not in v.config_map.name for v in pod.spec.volumes or [])


def test_frontend_reaches_the_local_orders(bridged_service):
    assert bridged_service.env["GREETING"] == "hello from orders"
    bridged_service.start(
        [sys.executable, {str(APP)!r}],
        env={{"SERVICE_NAME": "orders", "LISTEN_PORT": str(bridged_service.local_port),
             "LISTEN_PORT_2": str(bridged_service.local_ports[9091]), "HOSTNAME": "local-orders",
             "DOWNSTREAM": "http://inventory/api"}},
    )
    reply = json.load(urllib.request.urlopen("http://frontend.{IMAGES_NAMESPACE}/api", timeout=20))
    orders = reply["downstream"][0]
    assert orders.get("pod") == "local-orders", orders
    assert orders["downstream"][0]["pod"].startswith("inventory-"), orders
"""

NOTHING_SUITE = "def test_never_runs():\n    raise AssertionError('the session must not start')\n"


# --- fixtures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    """The harness's dockerd (``docker_env`` names it) and a registry on loopback."""

    layout: Layout
    docker_env: dict[str, str]
    registry: Registry

    @property
    def prefix(self) -> str:
        return f"{self.registry.host}/{REGISTRY_PATH}"


@pytest.fixture(scope="module")
def lab(core_v1: client.CoreV1Api) -> Iterator[Lab]:
    """For this module; at the end every image of ours leaves containerd and dockerd."""
    layout = Layout.default()
    nodes = [node.metadata.name for node in core_v1.list_node().items if node.metadata]
    if nodes != [layout.node_name]:
        pytest.skip(f"needs the embedded cluster, whose node pulls from a registry on this machine (nodes: {nodes})")
    ensure_dockerd(layout).close()
    docker_env = {**os.environ, "DOCKER_HOST": f"unix://{_docker_socket(layout)}"}
    tools = ensure_tools()
    with tempfile.TemporaryDirectory(prefix="e2e-images-", dir=layout.cache) as workdir:
        _remove_our_images(layout, docker_env)  # an interrupted earlier run's
        registry = Registry(tools["registry"], Path(workdir), port=0)
        try:
            yield Lab(layout, docker_env, registry)
        finally:
            # The registry stops first: a pull still running for a failed test fails instead of landing later.
            registry.stop()
            removed = _remove_our_images(layout, docker_env)
            print(f"removed: {', '.join(removed) or 'nothing'}")


@pytest.fixture(scope="module")
def images_namespace(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> Iterator[str]:
    """The sample app in a namespace of its own, settled; deleted at the end."""
    _delete_namespace(core_v1, IMAGES_NAMESPACE)
    apply_sample_app(kube_api_client, IMAGES_NAMESPACE)
    try:
        apps = client.AppsV1Api(kube_api_client)
        for name in SERVICES:
            _settled(apps, core_v1, name)
        yield IMAGES_NAMESPACE
    finally:
        _delete_namespace(core_v1, IMAGES_NAMESPACE)


# --- helpers -----------------------------------------------------------------------------------


def _remove_our_images(layout: Layout, docker_env: dict[str, str]) -> list[str]:
    removed = remove_images(layout, lambda ref: bool(OUR_REFS.match(ref)))
    listed = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        env=docker_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    tags = [tag for tag in listed.stdout.split() if OUR_REFS.match(tag)]
    if tags:
        subprocess.run(["docker", "rmi", *tags], env=docker_env, capture_output=True, check=True)
    return removed + [f"{tag} (docker)" for tag in tags]


def _delete_namespace(core: client.CoreV1Api, namespace: str) -> None:
    try:
        core.delete_namespace(namespace)
    except ApiException as e:
        if e.status != 404:
            raise
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1)
    raise AssertionError(f"namespace {namespace} is still there after {SETTLE_TIMEOUT:.0f}s")


def _settled(apps: client.AppsV1Api, core: client.CoreV1Api, name: str, namespace: str = IMAGES_NAMESPACE) -> None:
    """Wait until ``name`` is rolled out: generation observed, every pod Ready, nothing terminating."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        d: Any = apps.read_namespaced_deployment(name, namespace)
        selector = ",".join(f"{k}={v}" for k, v in d.spec.selector.match_labels.items())
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        wanted = d.spec.replicas if d.spec.replicas is not None else 1
        if (
            d.status.observed_generation == d.metadata.generation
            and (d.status.updated_replicas or 0) == (d.status.ready_replicas or 0) == wanted
            and len(pods) == wanted
            and all(pod_is_ready(p) for p in pods)
        ):
            return
        time.sleep(0.3)
    raise AssertionError(f"deployment {namespace}/{name} did not settle")


def _deployment(apps: client.AppsV1Api, name: str = "orders") -> dict[str, Any]:
    obj = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment(name, IMAGES_NAMESPACE))
    return strip_server_fields(obj)


def _cluster_state(api: client.ApiClient) -> dict[str, Any]:
    """What a session may change in the namespace: the workload, its objects, code ConfigMaps."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    labelled = []
    for selector in (MANAGED, SESSION_LABEL, bundle.CODE_LABEL):
        found: list[tuple[str, Any]] = [
            ("configmap", core.list_namespaced_config_map(IMAGES_NAMESPACE, label_selector=selector)),
            ("secret", core.list_namespaced_secret(IMAGES_NAMESPACE, label_selector=selector)),
            ("sa", core.list_namespaced_service_account(IMAGES_NAMESPACE, label_selector=selector)),
            ("pod", core.list_namespaced_pod(IMAGES_NAMESPACE, label_selector=selector)),
            ("job", batch.list_namespaced_job(IMAGES_NAMESPACE, label_selector=selector)),
        ]
        labelled += [f"{kind}/{item.metadata.name}" for kind, listed in found for item in listed.items]
    return {"orders": _deployment(client.AppsV1Api(api)), "labelled": sorted(set(labelled))}


def _wait_state(api: client.ApiClient, expected: dict[str, Any], timeout: float = SETTLE_TIMEOUT) -> None:
    """The namespace as ``expected`` once the agent pods of the restored workload are gone."""
    deadline = time.monotonic() + timeout
    while (state := _cluster_state(api)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state == expected


def _pulled(core: client.CoreV1Api, image: str) -> list[tuple[str, str]]:
    """(pod, pull time) of kubelet's "Successfully pulled" events for ``image`` in the namespace."""
    events: Any = core.list_namespaced_event(IMAGES_NAMESPACE, field_selector="reason=Pulled")
    found = []
    for event in events.items:
        match = PULLED.search(event.message or "")
        if match and match["image"] == image:
            found.append((event.involved_object.name, match["took"]))
    return found


def _bridged_pytest(suite: Path, agent: str, routing: str, *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(suite),
         "--bridge-service=orders", f"--bridge-namespace={IMAGES_NAMESPACE}", "--bridge-code=image",
         f"--bridge-agent-image={agent}", f"--bridge-routing-image={routing}",
         # Explicit free ports: other sessions on this machine may hold the defaults (8080).
         f"--bridge-local-port=8080={free_port()}", f"--bridge-local-port=9091={free_port()}"],
        cwd=suite, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "AGENT_IMAGE": agent},
    )  # fmt: skip


def _option(output: str, name: str) -> str:
    match = re.search(rf"--{name}=(\S+)", output)
    assert match, output
    return match.group(1)


def _other_identity(code: Bundle, version: str) -> Bundle:
    """``code`` with another version and digest in its ``_bundle.py``: what another plugin version would build."""
    digest = hashlib.sha256(f"{version} {code.digest}".encode()).hexdigest()
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(code.data)) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            content = source.read(info)
            if info.filename == "pytest_bridge_agent/_bundle.py":
                content = f"VERSION = {version!r}\nDIGEST = {digest!r}\n".encode()
            out.writestr(info, content)
    return Bundle(buffer.getvalue(), digest, version)


# --- tests -------------------------------------------------------------------------------------


def test_pushed_images_are_pulled_and_bridge_without_shipping_code(
    tmp_path: Path,
    lab: Lab,
    images_namespace: str,
    kube_api_client: client.ApiClient,
    core_v1: client.CoreV1Api,
) -> None:
    cli = Path(sys.executable).with_name("pytest-bridge")
    started = time.monotonic()
    pushed = subprocess.run(
        [str(cli), "images", "push", "--registry", lab.prefix],
        env=lab.docker_env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    timings = re.findall(r"pytest-bridge images: (\w+) \S+: ([\d.]+s)", pushed.stderr)
    print(f"images push: {took:.1f}s ({', '.join(f'{what} {s}' for what, s in timings)})")
    agent, routing = _option(pushed.stdout, "bridge-agent-image"), _option(pushed.stdout, "bridge-routing-image")
    code = bundle.build()
    assert agent == images.agent_ref(lab.prefix, code)
    assert routing == images.routing_ref(lab.prefix, code.version)
    assert "bridge_agent_image = " + agent in pushed.stdout  # the ini lines too
    assert agent not in containerd_refs(lab.layout), "the agent image is on the node already: nothing would be pulled"

    before = _cluster_state(kube_api_client)
    assert before["labelled"] == []
    mark = lab.registry.mark()
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    run = _bridged_pytest(tmp_path, agent, routing)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "2 passed" in out, out

    # kubelet pulled it from our registry (the guard's pod runs on it too and may pull first).
    deadline = time.monotonic() + 20  # events are recorded asynchronously
    while not (pulls := _pulled(core_v1, agent)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pulls, f"no Pulled event for {agent}"
    print(f"kubelet pulled {agent}: {pulls}")
    assert lab.registry.manifests_fetched(mark, f"{REGISTRY_PATH}/{images.AGENT_REPOSITORY}") >= 1
    assert agent in containerd_refs(lab.layout)
    _wait_state(kube_api_client, before)


def test_an_agent_image_of_another_version_is_refused_and_the_cluster_restored(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lab: Lab,
    images_namespace: str,
    kube_api_client: client.ApiClient,
) -> None:
    code = bundle.build()
    other = _other_identity(code, "0.0.1+e2e")
    monkeypatch.setenv("DOCKER_HOST", lab.docker_env["DOCKER_HOST"])
    agent, routing = images.plan(other, lab.prefix)
    runner = images.Runner(quiet=True)
    images.build(runner, [agent])
    images.push(runner, [agent])
    assert agent.ref != images.agent_ref(lab.prefix, code)

    before = _cluster_state(kube_api_client)
    (tmp_path / "test_inner.py").write_text(NOTHING_SUITE)
    run = _bridged_pytest(tmp_path, agent.ref, routing.ref)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "passed" not in out, out
    assert f"runs pytest-bridge 0.0.1+e2e (code {other.short})" in out, out
    assert f"this plugin is {code.version} (code {code.short})" in out, out
    assert "pytest-bridge images push --registry" in out, out  # what to do
    _wait_state(kube_api_client, before)
