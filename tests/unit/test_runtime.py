"""How our code and pods run in the cluster: the zipapp, pod security, the runtime of routing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from k8s_samples import orders_deployment, orders_pod, orders_replicaset, orders_service
from pytest_bridge_agent import runtime
from pytest_bridge_routing import nginxconf
from pytest_bridge_routing import objects as o

from pytest_bridge.cluster import bundle, policy
from pytest_bridge.cluster.restore import guard_job
from pytest_bridge.core.errors import ForbiddenError, PolicyError
from pytest_bridge.core.patch import AgentSpec, agent_container
from pytest_bridge.core.plan import make_plan
from pytest_bridge.orchestration.session import agent_code_mismatch
from pytest_bridge.settings import BridgeSettings

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


# ----------------------------------------------------------------- the zipapp


def test_bundle_is_deterministic_and_names_its_code() -> None:
    built = bundle.build()
    bundle.build.cache_clear()
    again = bundle.build()
    assert again.data == built.data and again.digest == built.digest
    assert len(built.digest) == 64 and built.short == built.digest[:10]
    with zipfile.ZipFile(BytesIO(built.data)) as archive:
        names = set(archive.namelist())
        info = archive.read("pytest_bridge_agent/_bundle.py").decode()
    assert {"__main__.py", "pytest_bridge_agent/server.py", "pytest_bridge_routing/router.py"} <= names
    assert not [n for n in names if "__pycache__" in n or not n.endswith(".py")]
    assert f"DIGEST = {built.digest!r}" in info and f"VERSION = {built.version!r}" in info


@pytest.mark.parametrize("role", sorted(runtime.ROLES))
def test_every_role_runs_from_the_zipapp_in_isolated_mode(role: str, tmp_path: Path) -> None:
    app = tmp_path / runtime.BUNDLE_FILE
    app.write_bytes(bundle.build().data)
    argv = [sys.executable, *runtime.command(role)[1:]]
    argv[argv.index(runtime.CODE_PATH)] = str(app)
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path)
    # --help: argparse roles exit 0; the guard has no flags and refuses to run without its env (2).
    assert done.returncode in (0, 2), done.stderr
    assert "Traceback" not in done.stderr
    unknown = subprocess.run([*argv[:-1], "nope"], capture_output=True, text=True, timeout=30, check=False)
    assert unknown.returncode == 2 and "usage: python3 -I pytest-bridge.pyz" in unknown.stderr


def test_running_code_outside_the_zipapp_is_source() -> None:
    assert runtime.running_code() == ("source", "source")


def test_code_configmap_is_immutable_binary_and_owned() -> None:
    built = bundle.build()
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "g", "uid": "u"}
    manifest = bundle.configmap(built, bundle.configmap_name(built, "s-1"), "ns", labels={"a": "b"}, owner=owner)
    assert manifest["immutable"] is True
    assert manifest["metadata"]["name"] == f"pytest-bridge-code-{built.short}-s-1"
    assert manifest["metadata"]["ownerReferences"] == [owner]
    assert manifest["metadata"]["labels"] == {"a": "b", bundle.CODE_LABEL: built.short}
    assert set(manifest["binaryData"]) == {runtime.BUNDLE_FILE}
    assert len(manifest["binaryData"][runtime.BUNDLE_FILE]) < 512 * 1024, "well inside a ConfigMap's 1 MiB"


# ----------------------------------------------------------------- version check


def test_agent_code_mismatch_names_both_versions() -> None:
    built = bundle.build()
    settings = BridgeSettings(code="image", agent_image="reg/pytest-bridge-agent:old")
    assert agent_code_mismatch({"code": built.digest}, built, settings) is None
    assert agent_code_mismatch({"code": "source"}, built, settings) is None
    problem = agent_code_mismatch({"code": "f" * 64, "code_version": "0.0.9"}, built, settings)
    assert problem is not None
    assert "0.0.9 (code ffffffffff)" in problem and f"{built.version} (code {built.short})" in problem
    assert "pytest-bridge images push" in problem
    old = agent_code_mismatch({}, built, BridgeSettings())
    assert old is not None and "unknown version" in old


# ----------------------------------------------------------------- pod security


def _spec(pod: dict[str, Any] | None = None, container: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", **({"securityContext": container} if container else {})}]}
    if pod:
        spec["securityContext"] = pod
    return spec


@pytest.mark.parametrize(
    ("pod", "container", "expected"),
    [
        (None, None, None),
        (None, {"allowPrivilegeEscalation": False}, {"allowPrivilegeEscalation": False}),
        ({"runAsNonRoot": True}, None, {"runAsUser": runtime.RUN_AS}),
        ({"runAsNonRoot": True, "runAsUser": 1000}, None, None),
        ({"runAsUser": 1000}, {"runAsNonRoot": True}, {"runAsNonRoot": True}),
        (None, {"runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}, {
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}, "runAsUser": runtime.RUN_AS,
        }),
    ],
    ids=["nothing", "kept", "nonroot-by-image-user", "pod-user", "pod-user-container-nonroot", "container-nonroot"],
)  # fmt: skip
def test_agent_security_context(
    pod: dict[str, Any] | None, container: dict[str, Any] | None, expected: dict[str, Any] | None
) -> None:
    spec = _spec(pod, container)
    assert runtime.agent_security_context(spec, spec["containers"][0]) == expected


def test_agent_container_runs_the_stock_image_as_a_user_when_the_workload_needs_one() -> None:
    deployment = orders_deployment()
    spec = deployment["spec"]["template"]["spec"]
    spec["securityContext"] = {"runAsNonRoot": True}
    del spec["containers"][0]["securityContext"]["runAsUser"]  # the app image's USER was non-root
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment])
    agent = AgentSpec(image="python:3", session="s", token_sha256="t")
    container = agent_container(spec["containers"][0], plan, agent, spec)
    assert container["securityContext"]["runAsUser"] == runtime.RUN_AS
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _assert_restricted(pod_spec: dict[str, Any]) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod_spec["containers"]:
        security = container["securityContext"]
        for key, value in RESTRICTED_CONTAINER.items():
            assert security[key] == value, (container["name"], key)
        assert security["readOnlyRootFilesystem"] is True
        assert set(container["resources"]) == {"requests", "limits"}
    for volume in pod_spec.get("volumes", []):
        assert set(volume) & {"configMap", "emptyDir", "secret", "projected"}, volume


def test_guard_pod_is_restricted_and_mounts_the_code() -> None:
    code = runtime.Code(configmap="pytest-bridge-code-x-s")
    spec = guard_job("s", "ns", "python:3", 60, 47101, code=code)["spec"]["template"]["spec"]
    _assert_restricted(spec)
    assert spec["volumes"] == code.volumes()
    assert spec["containers"][0]["volumeMounts"] == code.mounts()
    assert spec["containers"][0]["command"] == runtime.command("guard")
    image_spec = guard_job("s", "ns", "reg/agent:1", 60, 47101)["spec"]["template"]["spec"]
    assert image_spec["volumes"] == [] and image_spec["containers"][0]["volumeMounts"] == []


def test_manager_and_router_pods_are_restricted() -> None:
    rt = o.RoutingRuntime("py:1", "ng:1", runtime.Code(configmap="pytest-bridge-code-x", digest="d"))
    manager = o.manager_objects("ns", rt, 30)[0]["spec"]["template"]["spec"]
    _assert_restricted(manager)
    env = {e["name"]: e["value"] for e in manager["containers"][0]["env"]}
    assert o.RoutingRuntime.from_env(env) == rt
    ports = [{"name": "http", "port": 80, "target": 8080, "target_name": "http", "appProtocol": ""}]
    router = o.router_deployment("orders", "ns", ports, rt, "orders-pbr-router")
    spec = router["spec"]["template"]["spec"]
    _assert_restricted(spec)
    assert spec["shareProcessNamespace"] is True
    control, nginx = spec["containers"]
    assert (control["image"], nginx["image"]) == ("py:1", "ng:1")
    assert nginx["command"] == nginxconf.sidecar_command()
    assert {m["mountPath"] for m in nginx["volumeMounts"]} == {"/tmp"}
    assert {m["mountPath"] for m in control["volumeMounts"]} == {"/tmp", runtime.CODE_DIR}
    assert router["metadata"]["annotations"][o.ANN_RUNTIME] == rt.key
    assert o.RoutingRuntime("py:2", "ng:1", rt.code).key != rt.key


# ----------------------------------------------------------------- policy refusals


def test_admission_refusals_are_told_from_rbac_denials() -> None:
    rbac = ForbiddenError(
        'create: forbidden (pods is forbidden: User "bob" cannot create resource "pods" in API group "" '
        'in the namespace "x"); grant ...'
    )
    assert policy.as_policy_error("the pod", rbac) is None
    pss = ForbiddenError(
        'create: forbidden (pods "p" is forbidden: violates PodSecurity "restricted:latest": '
        "runAsNonRoot != true); grant ..."
    )
    error = policy.as_policy_error("the agent pod", pss, "Fix it")
    assert isinstance(error, PolicyError)
    assert str(error) == (
        'the cluster refuses the agent pod by policy: pods "p" is forbidden: violates PodSecurity '
        '"restricted:latest": runAsNonRoot != true. Fix it; nothing was changed'
    )


def test_replica_failure() -> None:
    assert policy.replica_failure(None) is None
    status = {"conditions": [{"type": "ReplicaFailure", "status": "True", "message": "pods is forbidden: x"}]}
    assert policy.replica_failure(status) == "pods is forbidden: x"
