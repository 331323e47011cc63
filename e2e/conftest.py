"""Fixtures for the end-to-end suite: a real cluster from $KUBECONFIG and the sample app in it.

Without a reachable cluster every e2e test is skipped with the reason, unless
PYTEST_BRIDGE_REQUIRE_CLUSTER=1 turns that into a failure (CI, where a silent skip would
hide a broken cluster). The sample app is normally deployed by `python -m e2e.cluster up`;
if it is missing, it is server-side applied from fixtures/manifests so the suite also runs
against any cluster that can run the stock Python image (the app's code comes in a ConfigMap).
Nothing here deletes the sample app: other suites share it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from pytest_bridge_agent import labels

from e2e.cluster.images import PYTHON
from pytest_bridge.core.patch import SESSION_LABEL

# The manifests place the sample app in bridge-demo; PYTEST_BRIDGE_E2E_NAMESPACE runs the suites
# against a private copy elsewhere, so several people (or runs) can share one cluster.
SAMPLE_NAMESPACE = "bridge-demo"
NAMESPACE_ENV = "PYTEST_BRIDGE_E2E_NAMESPACE"
NAMESPACE = os.environ.get(NAMESPACE_ENV, "").strip() or SAMPLE_NAMESPACE
SERVICES = ("frontend", "orders", "inventory")
NAME_LABEL = "app.kubernetes.io/name"
PART_OF_SELECTOR = "app.kubernetes.io/part-of=bridge-demo"
MANIFESTS = Path(__file__).resolve().parent.parent / "fixtures" / "manifests"
# The stock image the sample app runs on (the embedded cluster has a stand-in under its name),
# and the ConfigMap its code comes in.
SAMPLE_IMAGE = PYTHON.name
SAMPLE_CODE = MANIFESTS / "sample-app-code.yaml"
SAMPLE_CODE_CONFIGMAP = "sample-app-code"
SAMPLE_COMMAND = ["python3", "-u", "/app/app.py"]
READY_TIMEOUT = 120.0
FIELD_MANAGER = "pytest-bridge-e2e"
REQUIRE_CLUSTER_ENV = "PYTEST_BRIDGE_REQUIRE_CLUSTER"
LOG_TAIL_LINES = 50

_API_CLIENT = pytest.StashKey[client.ApiClient]()


def pytest_configure(config: pytest.Config) -> None:
    """The kubectl the harness built, for the kubectl transport (what scripts/test.sh exports too).

    With it, bridges in these tests (and the pytest runs they start) use --bridge-transport=auto's
    first choice; the websocket transport has its own test.
    """
    if not os.environ.get("PYTEST_BRIDGE_KUBECTL"):
        from e2e.cluster.layout import Layout  # noqa: PLC0415 - only the harness layout, no cluster

        built = Layout.default().bin / "kubectl"
        if built.exists():
            os.environ["PYTEST_BRIDGE_KUBECTL"] = str(built)


def _cluster_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_CLUSTER_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_CLUSTER_ENV}=1, so this is an error, not a skip)", pytrace=False)
    pytest.skip(f"no Kubernetes cluster: {reason}; start one with `python -m e2e.cluster up`")


@pytest.fixture(scope="session")
def kube_api_client(request: pytest.FixtureRequest) -> Iterator[client.ApiClient]:
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        _cluster_unavailable("KUBECONFIG is not set")
    if not Path(kubeconfig.split(os.pathsep)[0]).is_file():
        _cluster_unavailable(f"KUBECONFIG={kubeconfig} does not name a file")
    configuration = client.Configuration()
    try:
        config.load_kube_config(  # the loader has no annotations
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
    except (config.ConfigException, OSError, ValueError) as e:
        _cluster_unavailable(f"cannot load KUBECONFIG={kubeconfig}: {e}")
    # Fail fast when nothing listens; the default retries make an absent cluster take ~20 s.
    configuration.retries = 1
    api = client.ApiClient(configuration)
    try:
        version = client.VersionApi(api).get_code(_request_timeout=10)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        api.close()
        _cluster_unavailable(f"API server {configuration.host} from KUBECONFIG={kubeconfig} is unreachable: {e}")
    request.config.stash[_API_CLIENT] = api
    print(f"e2e cluster: {configuration.host} (Kubernetes {version.git_version})")
    try:
        yield api
    finally:
        del request.config.stash[_API_CLIENT]
        api.close()


@pytest.fixture(scope="session")
def core_v1(kube_api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api_client)


@pytest.fixture(scope="session")
def apps_v1(kube_api_client: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(kube_api_client)


# --- deploying the sample app ----------------------------------------------------------


def manifest_documents(namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The sample app's objects, in the order kustomization.yaml lists their files.

    With another ``namespace`` the same app is placed there (a private copy for suites
    that must not disturb ``bridge-demo``, e.g. benchmarks); the ``part-of`` label stays.
    """
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        documents.extend(doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc)
    if namespace != SAMPLE_NAMESPACE:
        for document in documents:
            if document["kind"] == "Namespace":
                document["metadata"]["name"] = namespace
            else:
                document["metadata"]["namespace"] = namespace
            if document["kind"] == "Ingress":
                for rule in document["spec"].get("rules", []):
                    rule["host"] = rule["host"].replace(SAMPLE_NAMESPACE, namespace)
                for tls in document["spec"].get("tls", []):
                    tls["hosts"] = [h.replace(SAMPLE_NAMESPACE, namespace) for h in tls.get("hosts", [])]
    return documents


def sample_app_code(namespace: str) -> dict[str, Any]:
    """The ConfigMap with the sample app's code (app.py), placed in ``namespace``."""
    document: dict[str, Any] = yaml.safe_load(SAMPLE_CODE.read_text())
    assert document["metadata"]["name"] == SAMPLE_CODE_CONFIGMAP, SAMPLE_CODE
    document["metadata"]["namespace"] = namespace
    return document


def _sample_app_missing(core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api) -> str | None:
    try:
        namespace = core_v1.read_namespace(NAMESPACE)
    except ApiException as e:
        if e.status == 404:
            return f"namespace {NAMESPACE} does not exist"
        raise
    if namespace.status is not None and namespace.status.phase == "Terminating":
        _wait_for_namespace_gone(core_v1)
        return f"namespace {NAMESPACE} was being deleted"
    present = {d.metadata.name for d in apps_v1.list_namespaced_deployment(NAMESPACE).items if d.metadata}
    missing = sorted(set(SERVICES) - present)
    return f"deployments {missing} are missing" if missing else None


def _wait_for_namespace_gone(core_v1: client.CoreV1Api) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            core_v1.read_namespace(NAMESPACE)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1)
    pytest.fail(f"namespace {NAMESPACE} is still terminating after {READY_TIMEOUT:.0f}s", pytrace=False)


def apply_sample_app(api: client.ApiClient, namespace: str = NAMESPACE) -> None:
    """Server-side apply fixtures/manifests; idempotent, so concurrent xdist workers are harmless."""
    dynamic: Any = DynamicClient(api)
    for document in manifest_documents(namespace):
        resource = dynamic.resources.get(api_version=document["apiVersion"], kind=document["kind"])
        dynamic.server_side_apply(resource, body=document, field_manager=FIELD_MANAGER, force_conflicts=True)


def pod_name(pod: client.V1Pod) -> str:
    assert pod.metadata is not None and pod.metadata.name is not None, pod
    return pod.metadata.name


def pod_is_ready(pod: client.V1Pod) -> bool:
    if pod.metadata is None or pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def describe_pod(pod: client.V1Pod) -> str:
    """One line saying why a pod is (not) ready: phase and each container's state."""
    name = pod.metadata.name if pod.metadata else "?"
    status = pod.status or client.V1PodStatus()
    states = []
    for container in status.container_statuses or []:
        state = container.state
        if state is not None and state.waiting is not None:
            states.append(f"{container.name}: waiting {state.waiting.reason}: {state.waiting.message or ''}")
        elif state is not None and state.terminated is not None:
            states.append(f"{container.name}: terminated {state.terminated.reason}")
        else:
            states.append(f"{container.name}: running, ready={container.ready}")
    deleting = " (deleting)" if pod.metadata and pod.metadata.deletion_timestamp else ""
    return f"{name}{deleting} phase={status.phase} {'; '.join(states) or 'no container status yet'}"


def pods_of(core_v1: client.CoreV1Api, service: str) -> list[client.V1Pod]:
    return list(core_v1.list_namespaced_pod(NAMESPACE, label_selector=f"{NAME_LABEL}={service}").items)


def wait_for_ready_pods(core_v1: client.CoreV1Api, timeout: float = READY_TIMEOUT) -> dict[str, list[str]]:
    """Wait until every sample service has pods, all Ready and none terminating."""
    deadline = time.monotonic() + timeout
    while True:
        pods = {service: pods_of(core_v1, service) for service in SERVICES}
        if all(found and all(pod_is_ready(pod) for pod in found) for found in pods.values()):
            return {service: [pod_name(p) for p in found] for service, found in pods.items()}
        if time.monotonic() > deadline:
            lines = [describe_pod(pod) for found in pods.values() for pod in found]
            empty = [service for service, found in pods.items() if not found]
            pytest.fail(
                f"sample app pods in {NAMESPACE} not Ready after {timeout:.0f}s"
                + (f"; no pods at all for {empty}" if empty else "")
                + "".join(f"\n  {line}" for line in lines)
                + f"\n(can the node run {SAMPLE_IMAGE}? The embedded cluster imports a stand-in under that name:"
                + " `python -m e2e.cluster status` lists the images on the node)",
                pytrace=False,
            )
        time.sleep(1)


@pytest.fixture(scope="session")
def sample_app(
    kube_api_client: client.ApiClient, core_v1: client.CoreV1Api, apps_v1: client.AppsV1Api
) -> dict[str, list[str]]:
    """The sample app, deployed if needed and Ready; maps service to pod names at start."""
    missing = _sample_app_missing(core_v1, apps_v1)
    if missing is not None:
        print(f"{missing}: applying {MANIFESTS}")
        apply_sample_app(kube_api_client, NAMESPACE)
    return wait_for_ready_pods(core_v1)


@pytest.fixture
def ready_pod(core_v1: client.CoreV1Api, sample_app: dict[str, list[str]]) -> Callable[[str], str]:
    """Look up a Ready pod of a service now (pods change, e.g. after the rollout test)."""

    def find(service: str) -> str:
        ready = [pod for pod in pods_of(core_v1, service) if pod_is_ready(pod)]
        assert ready, f"no Ready pod for {service}"
        return pod_name(ready[0])

    return find


# --- pod logs on failure ---------------------------------------------------------------


def _pod_logs(api: client.ApiClient) -> list[tuple[str, str]]:
    core_v1 = client.CoreV1Api(api)
    sections = []
    for pod in core_v1.list_namespaced_pod(NAMESPACE, label_selector=PART_OF_SELECTOR, _request_timeout=10).items:
        if pod.metadata is None or pod.spec is None:
            continue
        for container in pod.spec.containers:
            try:
                text = core_v1.read_namespaced_pod_log(
                    pod_name(pod),
                    NAMESPACE,
                    container=container.name,
                    tail_lines=LOG_TAIL_LINES,
                    _request_timeout=10,
                )
            except ApiException as e:
                text = f"(logs unavailable: {e.status} {e.reason})"
            sections.append((f"{NAMESPACE}/{pod.metadata.name}[{container.name}] last {LOG_TAIL_LINES} lines", text))
    return sections


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    api = item.config.stash.get(_API_CLIENT, None)
    if report.failed and api is not None:
        try:
            for title, text in _pod_logs(api):
                report.sections.append((title, text))
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            # Collecting logs must never hide the failure being reported.
            report.sections.append((f"{NAMESPACE} pod logs", f"(could not list pods: {e})"))
    if report.failed:
        report.sections += _component_logs()
    return report


def _component_logs(lines: int = 30) -> list[tuple[str, str]]:
    """The tail of each embedded-cluster component's log (one folder: `python -m e2e.cluster logs`)."""
    from e2e.cluster.layout import Layout  # noqa: PLC0415

    sections = []
    for log in sorted(Layout.default().logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        sections.append((f"cluster component log {log.name} (last {lines} lines)", "\n".join(tail)))
    return sections


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop and restart the cluster go last, so they can't pull it from under others.
    items.sort(key=lambda item: item.get_closest_marker("cluster_cycle") is not None)


# --- a user with only a given Role --------------------------------------------------------------


@contextlib.contextmanager
def role_user_kubeconfig(api: client.ApiClient, name: str, role: dict[str, Any], path: Path) -> Iterator[Path]:
    """A kubeconfig at ``path`` for a ServiceAccount ``name`` bound only to ``role`` in NAMESPACE.

    The ServiceAccount, Role and RoleBinding exist while the context is open; the token is a
    10-minute one from the TokenRequest API (a token kubeconfig, as CI users have).
    """
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    named: Any = {**role, "metadata": {"name": name}}
    binding: Any = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
    }
    account: Any = {"metadata": {"name": name}}
    core.create_namespaced_service_account(NAMESPACE, account)
    rbac.create_namespaced_role(NAMESPACE, named)
    rbac.create_namespaced_role_binding(NAMESPACE, binding)
    try:
        request: Any = {"spec": {"expirationSeconds": 600}}
        token: Any = core.create_namespaced_service_account_token(name, NAMESPACE, request)
        configuration = api.configuration
        path.write_text(
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "user",
                "clusters": [{"name": "c", "cluster": {"server": configuration.host,
                                                       "certificate-authority": configuration.ssl_ca_cert}}],
                "users": [{"name": "u", "user": {"token": token.status.token}}],
                "contexts": [{"name": "user", "context": {"cluster": "c", "user": "u", "namespace": NAMESPACE}}],
            })
        )  # fmt: skip
        yield path
    finally:
        rbac.delete_namespaced_role_binding(name, NAMESPACE)
        rbac.delete_namespaced_role(name, NAMESPACE)
        core.delete_namespaced_service_account(name, NAMESPACE)


# --- namespaces of our own, and what of ours is left in them ------------------------------------

MANAGED_SELECTOR = "app.kubernetes.io/managed-by=pytest-bridge"


def ensure_namespace(core: client.CoreV1Api, name: str, labels: dict[str, str]) -> None:
    """Create namespace ``name`` with ``labels``, or set them on the one that exists."""
    try:
        body: Any = {"metadata": {"name": name, "labels": labels}}
        core.create_namespace(body)
    except ApiException as e:
        if e.status != 409:
            raise
        core.patch_namespace(name, {"metadata": {"labels": labels}})


def wait_app_settled(core: client.CoreV1Api, namespace: str, timeout: float = 180) -> None:
    """Until the sample app's rollouts are done and its pods, no others, run Ready, none terminating."""
    apps = client.AppsV1Api(core.api_client)
    deadline = time.monotonic() + timeout
    while True:
        deployments: Any = apps.list_namespaced_deployment(namespace).items
        rolled_out = all(
            d.status.observed_generation == d.metadata.generation
            and d.status.updated_replicas == d.status.ready_replicas == d.status.replicas == (d.spec.replicas or 1)
            for d in deployments
        )
        # the routing manager may outlive the routes that started it (it exits when idle): not the app's
        listed: Any = core.list_namespaced_pod(namespace, label_selector=f"{labels.COMPONENT_LABEL}!=routing-manager")
        pods: Any = listed.items
        ready = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        names = sorted(str((p.metadata.labels or {}).get("app.kubernetes.io/name")) for p in ready)
        settled = len(ready) == len(pods) and all(p.metadata.deletion_timestamp is None for p in pods)
        if rolled_out and settled and names == ["frontend", "inventory", "orders"]:
            return
        assert time.monotonic() < deadline, f"sample app in {namespace} not settled: {[p.metadata.name for p in pods]}"
        time.sleep(0.5)


def objects_of_ours(api: client.ApiClient, namespace: str) -> list[str]:
    """Every object of ours left in ``namespace`` as ``kind/name``: pods (ours, and agent pods: the
    workload's pods with a session's label), jobs (suspended or not), deployments, configmaps,
    secrets, service accounts, roles and role bindings."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    rbac, apps = client.RbacAuthorizationV1Api(api), client.AppsV1Api(api)
    pods: set[str] = set()
    for selector in (MANAGED_SELECTOR, SESSION_LABEL):
        listed_pods: Any = core.list_namespaced_pod(namespace, label_selector=selector)
        pods |= {pod.metadata.name for pod in listed_pods.items}
    listed: list[tuple[str, Any]] = [
        ("job", batch.list_namespaced_job(namespace, label_selector=MANAGED_SELECTOR)),
        ("deployment", apps.list_namespaced_deployment(namespace, label_selector=MANAGED_SELECTOR)),
        ("configmap", core.list_namespaced_config_map(namespace, label_selector=MANAGED_SELECTOR)),
        ("secret", core.list_namespaced_secret(namespace, label_selector=MANAGED_SELECTOR)),
        ("serviceaccount", core.list_namespaced_service_account(namespace, label_selector=MANAGED_SELECTOR)),
        ("role", rbac.list_namespaced_role(namespace, label_selector=MANAGED_SELECTOR)),
        ("rolebinding", rbac.list_namespaced_role_binding(namespace, label_selector=MANAGED_SELECTOR)),
    ]
    return [f"pod/{name}" for name in sorted(pods)] + [
        f"{kind}/{item.metadata.name}" for kind, result in listed for item in result.items
    ]
