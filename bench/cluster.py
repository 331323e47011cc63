"""The cluster side of the benchmarks: the private namespace, the bench server pod, port-forwards.

Everything lives in its own namespace (``bridge-bench`` by default), never in ``bridge-demo``
where the e2e suites run. Objects created here carry ``app.kubernetes.io/managed-by=pytest-bridge-bench``
and are deleted by :func:`delete_bench_server`; the sample app itself is left in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pytest_bridge_agent import labels

from e2e.conftest import SAMPLE_IMAGE, apply_sample_app
from pytest_bridge.core.patch import SESSION_ANNOTATION

log = logging.getLogger("bench")

__all__ = [
    "BENCH_HTTP",
    "BENCH_LABELS",
    "BENCH_PORT",
    "BENCH_SERVER",
    "Cluster",
    "PodInfo",
    "PortProcess",
    "create_bench_server",
    "default_kubectl",
    "delete_bench_http",
    "delete_bench_server",
    "ensure_bench_http",
    "ensure_sample_app",
    "kubectl_port_forward",
    "load",
    "pod_info",
    "reachable",
    "routing_leftovers",
    "wait_routing_clean",
    "wait_settled",
    "wait_unbridged",
]

BENCH_SERVER = "bench-echo"
BENCH_PORT = 9000
BENCH_LABELS = {
    "app.kubernetes.io/name": BENCH_SERVER,
    "app.kubernetes.io/part-of": "pytest-bridge-bench",
    "app.kubernetes.io/managed-by": "pytest-bridge-bench",
}
SAMPLE_DEPLOYMENTS = ("frontend", "orders", "inventory")
# A Deployment + Service of the load server speaking HTTP on a port named `http`, so the routing
# manager can put a router in front of it (router overhead: the same server software on every path).
BENCH_HTTP = "bench-http"
BENCH_HTTP_PORT = 8080
LOADTOOL = Path(__file__).with_name("loadtool.py")


CLUSTER_KUBECTL = Path("/var/cache/pytest-bridge/bin/kubectl")


def default_kubectl() -> str:
    """$KUBECTL, else the embedded cluster's own kubectl (same version as the server), else PATH's."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    if CLUSTER_KUBECTL.exists():
        return str(CLUSTER_KUBECTL)
    return shutil.which("kubectl") or "kubectl"


def hand_kubectl_to_bridge(kubectl: str) -> None:
    """Let the bridge's auto transport use the bench's kubectl (unless PYTEST_BRIDGE_KUBECTL says otherwise)."""
    if kubectl and Path(kubectl).exists():
        os.environ.setdefault("PYTEST_BRIDGE_KUBECTL", kubectl)


def start_run(prefix: str, kubectl: str) -> None:
    """What every bench command does first: progress lines on stderr (``prefix``), clean-up on
    SIGTERM and SIGHUP as on Ctrl-C, and the bench's kubectl handed to the bridge.

    The plugin's own log is kept to errors: its canary reports "local app not reachable"
    before the bench's load server runs.
    """
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {prefix}: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    logging.getLogger("pytest_bridge").setLevel(logging.ERROR)
    interrupt_on_termination()  # so every session, forwarder and registry is cleaned up
    hand_kubectl_to_bridge(kubectl)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so the same clean-up runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def stop_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM the process's group, SIGKILL it after 10 s, and reap the process."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@dataclass
class Cluster:
    api: client.ApiClient
    kubeconfig: str
    namespace: str
    kubectl: str

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}


@dataclass(frozen=True)
class PodInfo:
    name: str
    ip: str
    uid: str
    image_id: str = ""


def load(kubeconfig: str, namespace: str, kubectl: str) -> Cluster:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration, persist_config=False
    )
    return Cluster(client.ApiClient(configuration), kubeconfig, namespace, kubectl)


def pod_info(cluster: Cluster, name: str) -> PodInfo:
    pod: Any = cluster.core.read_namespaced_pod(name, cluster.namespace)
    image_id = next((s.image_id for s in pod.status.container_statuses or []), "")
    return PodInfo(pod.metadata.name, pod.status.pod_ip, pod.metadata.uid, image_id)


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def wait_settled(cluster: Cluster, deployment: str, timeout: float = 180.0) -> float:
    """Until the Deployment is rolled out and Available with exactly its pods Ready, none terminating."""
    started = time.monotonic()
    last = "?"
    while time.monotonic() - started < timeout:
        dep: Any = cluster.apps.read_namespaced_deployment(deployment, cluster.namespace)
        status, want = dep.status, dep.spec.replicas or 0
        available = any(c.type == "Available" and c.status == "True" for c in status.conditions or [])
        selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
        pods: list[Any] = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector).items
        if (
            available
            and (status.observed_generation or 0) >= dep.metadata.generation
            and status.updated_replicas == want
            and status.ready_replicas == want
            and len(pods) == want
            and all(_ready(p) and not p.metadata.deletion_timestamp for p in pods)
        ):
            return time.monotonic() - started
        last = f"available={available} updated={status.updated_replicas} ready={status.ready_replicas} pods={len(pods)}"
        time.sleep(0.2)
    raise TimeoutError(f"deployment {cluster.namespace}/{deployment} not settled after {timeout:.0f}s ({last})")


def wait_unbridged(cluster: Cluster, timeout: float = 360.0) -> None:
    """Until no Deployment of the namespace is bridged (an interrupted run's guard restores it after its TTL).

    Re-applying the sample app over a bridged Deployment would make the guard's reverse patch fail.
    """
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        deployments: Any = cluster.apps.list_namespaced_deployment(cluster.namespace)
        bridged = sorted(
            d.metadata.name for d in deployments.items if SESSION_ANNOTATION in (d.metadata.annotations or {})
        )
        if not bridged:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(bridged)} in {cluster.namespace} still bridged after {timeout:.0f}s")
        if not logged:
            log.info("%s still bridged by an earlier session: waiting for its guard to restore it", ", ".join(bridged))
            logged = True
        time.sleep(1)


def ensure_sample_app(cluster: Cluster) -> float:
    """Server-side apply the sample app into the bench namespace (idempotent) and wait until it is Available.

    Waits first for a Deployment an interrupted run left bridged to be restored by its guard.
    """
    started = time.monotonic()
    wait_unbridged(cluster)
    apply_sample_app(cluster.api, namespace=cluster.namespace)
    for deployment in SAMPLE_DEPLOYMENTS:
        wait_settled(cluster, deployment)
    return time.monotonic() - started


def _bench_pod(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": BENCH_SERVER, "namespace": namespace, "labels": dict(BENCH_LABELS)},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "enableServiceLinks": False,
            "containers": [_load_server_container(BENCH_PORT, "bench")],
        },
    }


def _load_server_container(port: int, port_name: str, *args: str) -> dict[str, Any]:
    """The load tool's server on ``port`` on the sample app's image (the stock Python image)."""
    return {
        "name": "server",
        "image": SAMPLE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        # Nothing of ours is in the image: the load tool runs from its source.
        "command": ["python3", "-u", "-c", LOADTOOL.read_text()],
        "args": ["server", "--port", str(port), *args],
        "ports": [{"name": port_name, "containerPort": port}],
        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
    }


def _bench_service(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": BENCH_SERVER, "namespace": namespace, "labels": dict(BENCH_LABELS)},
        "spec": {
            "selector": {"app.kubernetes.io/name": BENCH_SERVER},
            "ports": [{"name": "bench", "port": BENCH_PORT, "targetPort": BENCH_PORT}],
        },
    }


def delete_bench_server(cluster: Cluster, wait: bool = True) -> None:
    core = cluster.core
    with contextlib.suppress(ApiException):
        core.delete_namespaced_service(BENCH_SERVER, cluster.namespace)
    with contextlib.suppress(ApiException):
        core.delete_namespaced_pod(BENCH_SERVER, cluster.namespace, grace_period_seconds=0)
    deadline = time.monotonic() + 60
    while wait and time.monotonic() < deadline:
        try:
            core.read_namespaced_pod(BENCH_SERVER, cluster.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.2)


def create_bench_server(cluster: Cluster, timeout: float = 120.0) -> PodInfo:
    """A pod of the sample app's image running the load server on :9000, and a Service for it."""
    delete_bench_server(cluster)
    core = cluster.core
    service: Any = _bench_service(cluster.namespace)  # the client takes plain dicts as bodies too
    pod_body: Any = _bench_pod(cluster.namespace)
    core.create_namespaced_service(cluster.namespace, service)
    core.create_namespaced_pod(cluster.namespace, pod_body)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod: Any = core.read_namespaced_pod(BENCH_SERVER, cluster.namespace)
        if _ready(pod):
            return PodInfo(pod.metadata.name, pod.status.pod_ip, pod.metadata.uid)
        time.sleep(0.2)
    raise TimeoutError(f"bench server pod {cluster.namespace}/{BENCH_SERVER} not Ready after {timeout:.0f}s")


class PortProcess:
    """A forwarder subprocess (``kubectl port-forward`` or ``bench.pyforward``) and the local port it printed."""

    def __init__(
        self, argv: list[str], env: dict[str, str], what: str, timeout: float = 30.0, pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.what = what
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            pass_fds=pass_fds, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        self.port = self._wait_for_port(timeout)
        self.stderr_tail: list[str] = []
        assert self.process.stderr is not None
        # Drain both pipes so the forwarder never blocks on a full pipe buffer.
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()

    def _wait_for_port(self, timeout: float) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"(?:Forwarding from|listening) 127\.0\.0\.1[: ](\d+)")
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                err = self.process.stderr.read() if self.process.stderr else ""
                raise RuntimeError(f"{self.what} exited: {err.strip()}")
            match = pattern.search(line)
            if match:
                return int(match.group(1))
        raise TimeoutError(f"{self.what} printed no port within {timeout:.0f}s")

    def _drain(self, pipe: Any) -> None:
        for line in pipe:
            if len(self.stderr_tail) < 50:
                self.stderr_tail.append(line.rstrip())

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        stop_process_group(self.process)


# ----------------------------------------------------------------------------- routing (isolated routes)


def _bench_http_objects(namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    labels = {**BENCH_LABELS, "app.kubernetes.io/name": BENCH_HTTP}
    selector = {"app.kubernetes.io/name": BENCH_HTTP}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": BENCH_HTTP, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "enableServiceLinks": False,
                    "containers": [_load_server_container(BENCH_HTTP_PORT, "http", "--name", "pod")],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": BENCH_HTTP, "namespace": namespace, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return deployment, service


def ensure_bench_http(cluster: Cluster) -> PodInfo:
    """The HTTP load server as a Deployment + Service (server-side applied, so re-runs reuse it)."""
    deployment, service = _bench_http_objects(cluster.namespace)
    body: Any = deployment
    cluster.apps.patch_namespaced_deployment(
        BENCH_HTTP, cluster.namespace, body, field_manager="pytest-bridge-bench", force=True,
        _content_type="application/apply-patch+yaml",
    )  # fmt: skip
    body = service
    cluster.core.patch_namespaced_service(
        BENCH_HTTP, cluster.namespace, body, field_manager="pytest-bridge-bench", force=True,
        _content_type="application/apply-patch+yaml",
    )  # fmt: skip
    wait_settled(cluster, BENCH_HTTP)
    pods: Any = cluster.core.list_namespaced_pod(
        cluster.namespace, label_selector=f"app.kubernetes.io/name={BENCH_HTTP}"
    )
    pod = next(p for p in pods.items if not p.metadata.deletion_timestamp)
    return PodInfo(pod.metadata.name, pod.status.pod_ip, pod.metadata.uid)


def delete_bench_http(cluster: Cluster) -> None:
    with contextlib.suppress(ApiException):
        cluster.core.delete_namespaced_service(BENCH_HTTP, cluster.namespace)
    with contextlib.suppress(ApiException):
        cluster.apps.delete_namespaced_deployment(BENCH_HTTP, cluster.namespace, propagation_policy="Background")


ROUTING_COMPONENT = labels.COMPONENT_LABEL
MANAGER = "pytest-bridge-routing-manager"


def routing_leftovers(cluster: Cluster, manager: bool = True) -> list[str]:
    """What isolated routing still has in the namespace: route pods, routers, switched Services, the manager."""
    core, apps = cluster.core, cluster.apps
    ns = cluster.namespace
    left: list[str] = []
    pods: Any = core.list_namespaced_pod(ns, label_selector=ROUTING_COMPONENT)
    for pod in pods.items:
        component = (pod.metadata.labels or {}).get(ROUTING_COMPONENT)
        if component == "routing-manager" and not manager:
            continue
        left.append(f"pod {pod.metadata.name} ({component})")
    deployments: Any = apps.list_namespaced_deployment(ns, label_selector=ROUTING_COMPONENT)
    for dep in deployments.items:
        if dep.metadata.name == MANAGER and not manager:
            continue
        left.append(f"deployment {dep.metadata.name}")
    services: Any = core.list_namespaced_service(ns)
    for svc in services.items:
        if labels.ORIGINAL_SELECTOR_ANNOTATION in (svc.metadata.annotations or {}):
            left.append(f"service {svc.metadata.name} switched to its router")
        elif (svc.metadata.labels or {}).get(ROUTING_COMPONENT):
            left.append(f"service {svc.metadata.name}")
    return left


def wait_routing_clean(cluster: Cluster, timeout: float = 90.0, manager: bool = True) -> tuple[float, list[str]]:
    """Seconds until nothing of isolated routing is left (``manager``: the manager gone too) and what is left."""
    started = time.monotonic()
    while True:
        left = routing_leftovers(cluster, manager=manager)
        if not left or time.monotonic() - started > timeout:
            return time.monotonic() - started, left
        time.sleep(0.2)


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether this machine can open a TCP connection to host:port (pod IPs: yes on the embedded cluster)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def kubectl_port_forward(cluster: Cluster, target: str, remote_port: int) -> PortProcess:
    argv = [cluster.kubectl, "port-forward", "-n", cluster.namespace, "--address", "127.0.0.1", target]
    return PortProcess([*argv, f":{remote_port}"], cluster.env(), f"kubectl port-forward {target}")
