"""End to end: someone changes the bridged workload during the session (issue "Reliability", item 6).

In a namespace of its own (``<e2e namespace>-edits``, with the sample app), an inner
``pytest --bridge-service=orders`` runs while the test changes the ``orders`` Deployment the
way people do: ``kubectl set image`` (the same image under its fully qualified name, so the
node has it) and ``kubectl set env``. The restore keeps their changes on the original container
(no agent command, env or code volume left, no session marks) instead of overwriting them or
retrying for ever; normally at close, and by the guard after a SIGKILL. A Deployment deleted
during the session counts as restored: the close reports no error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import NAMESPACE, apply_sample_app, ensure_namespace, objects_of_ours, wait_app_settled
from pytest_bridge.core.patch import SESSION_ANNOTATION, SESSION_LABEL

pytestmark = pytest.mark.e2e

EDITS = f"{NAMESPACE}-edits"
TTL = 10
REPO = Path(__file__).resolve().parents[1]

INNER = """
import os, subprocess, time
from pathlib import Path

def kubectl(*argv):
    subprocess.run([os.environ["PYTEST_BRIDGE_KUBECTL"], "--kubeconfig", os.environ["KUBECONFIG"],
                    "-n", os.environ["E2E_NAMESPACE"], *argv], check=True)

def test_edit_while_bridged(bridged_service):
    for argv in os.environ["E2E_EDITS"].split(";"):
        kubectl(*argv.split())
    marker = os.environ.get("E2E_EDITED")
    if marker:
        Path(marker).write_text("edited")
        time.sleep(600)  # killed here
"""


@pytest.fixture(scope="module")
def edits_ns(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api) -> str:
    ensure_namespace(core_v1, EDITS, {})
    apply_sample_app(kube_api_client, EDITS)
    wait_app_settled(core_v1, EDITS)
    return EDITS


@pytest.fixture
def fresh_app(kube_api_client: client.ApiClient, core_v1: client.CoreV1Api, edits_ns: str) -> Any:
    """The sample app as its manifests say (an earlier test's edits undone), before and after."""
    _reset(kube_api_client, core_v1, edits_ns)
    yield client.AppsV1Api(kube_api_client).read_namespaced_deployment("orders", edits_ns)
    _reset(kube_api_client, core_v1, edits_ns)


def _reset(api: client.ApiClient, core: client.CoreV1Api, namespace: str) -> None:
    apps = client.AppsV1Api(api)
    try:
        apps.delete_namespaced_deployment("orders", namespace)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                apps.read_namespaced_deployment("orders", namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    break
            time.sleep(0.3)
    except client.ApiException as exc:
        assert exc.status == 404, exc
    apply_sample_app(api, namespace)
    wait_app_settled(core, namespace)


def _inner(tmp_path: Path, edits: str, *args: str, **env: str) -> subprocess.Popen[str]:
    (tmp_path / "test_inner.py").write_text(INNER)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-rA", str(tmp_path / "test_inner.py"),
         "--bridge-service=orders", f"--bridge-namespace={EDITS}", f"--bridge-restore-ttl={TTL}", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "E2E_NAMESPACE": EDITS, "E2E_EDITS": edits, **env},
    )  # fmt: skip


def _edits(original: Any) -> tuple[str, str]:
    """(the kubectl edits, the image they set): the same image under its fully qualified name."""
    name, image = original.spec.template.spec.containers[0].name, original.spec.template.spec.containers[0].image
    qualified = image if image.count("/") >= 2 else f"docker.io/library/{image}" if "/" not in image else image
    assert qualified != image, f"{image} is already fully qualified: pick another spelling for this test"
    return f"set image deployment/orders {name}={qualified};set env deployment/orders E2E_EDIT=kept", qualified


def _assert_restored_with_their_edits(apps: client.AppsV1Api, original: Any, image: str) -> None:
    now: Any = apps.read_namespaced_deployment("orders", EDITS)
    container, before = now.spec.template.spec.containers[0], original.spec.template.spec.containers[0]
    assert container.image == image, "their kubectl set image is kept"
    assert container.command == before.command and container.args == before.args, "the agent's command is gone"
    rest, rest_before = container.to_dict(), before.to_dict()
    for key in ("image", "env"):
        rest.pop(key), rest_before.pop(key)
    assert rest == rest_before, "all but their edits is as before the session (probes, ports, security context)"
    env = {e.name: e.value for e in container.env or []}
    assert env == {**{e.name: e.value for e in before.env or []}, "E2E_EDIT": "kept"}
    assert not any(name.startswith("PYTEST_BRIDGE") for name in env)
    assert [v.name for v in now.spec.template.spec.volumes or []] == [
        v.name for v in original.spec.template.spec.volumes or []
    ]
    marks = {**(now.metadata.labels or {}), **(now.spec.template.metadata.annotations or {})}
    assert SESSION_LABEL not in marks and SESSION_ANNOTATION not in marks
    assert now.spec.replicas == original.spec.replicas


def test_edits_during_the_session_are_kept_by_the_restore_at_close(
    tmp_path: Path, kube_api_client: client.ApiClient, core_v1: client.CoreV1Api, fresh_app: Any
) -> None:
    edits, image = _edits(fresh_app)
    inner = _inner(tmp_path, edits)
    out, _ = inner.communicate(timeout=400)
    assert inner.returncode == 0, out
    assert "restored with those changes kept" in out and "/image" in out and "env[E2E_EDIT]" in out, out
    _assert_restored_with_their_edits(client.AppsV1Api(kube_api_client), fresh_app, image)
    wait_app_settled(core_v1, EDITS)
    assert objects_of_ours(kube_api_client, EDITS) == []


def test_edits_during_the_session_are_kept_by_the_guard_after_sigkill(
    tmp_path: Path, kube_api_client: client.ApiClient, core_v1: client.CoreV1Api, fresh_app: Any
) -> None:
    edits, image = _edits(fresh_app)
    marker = tmp_path / "edited"
    inner = _inner(tmp_path, edits, E2E_EDITED=str(marker))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert inner.poll() is None and time.monotonic() < deadline, inner.communicate()[0]
        time.sleep(0.2)
    inner.send_signal(signal.SIGKILL)
    inner.communicate(timeout=30)
    killed = time.monotonic()
    apps = client.AppsV1Api(kube_api_client)
    while True:
        now: Any = apps.read_namespaced_deployment("orders", EDITS)
        if SESSION_ANNOTATION not in (now.spec.template.metadata.annotations or {}):
            break
        assert time.monotonic() - killed < TTL + 30, "not restored within TTL + 30 s"
        time.sleep(0.5)
    _assert_restored_with_their_edits(apps, fresh_app, image)
    wait_app_settled(core_v1, EDITS)
    while objects_of_ours(kube_api_client, EDITS) and time.monotonic() - killed < TTL + 30:
        time.sleep(0.5)
    assert objects_of_ours(kube_api_client, EDITS) == []


def test_a_deployment_deleted_during_the_session_counts_as_restored(
    tmp_path: Path, kube_api_client: client.ApiClient, fresh_app: Any
) -> None:
    inner = _inner(tmp_path, "delete deployment orders --wait=true")
    out, _ = inner.communicate(timeout=400)
    assert inner.returncode == 0, out
    assert "restoring the cluster failed" not in out and "INTERNALERROR" not in out, out
    deadline = time.monotonic() + 60  # the agent pod goes with its Deployment, in the background
    while objects_of_ours(kube_api_client, EDITS) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert objects_of_ours(kube_api_client, EDITS) == []
