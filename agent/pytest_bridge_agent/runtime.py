"""How pytest-bridge's programs run in the cluster: images, code, pod security. Pure, stdlib only.

Nothing of ours needs an image of its own. The agent, the restore guard, the routing manager
and the router's control process are one zipapp (``pytest-bridge.pyz``, built by the plugin:
``pytest_bridge.cluster.bundle``) that runs on a stock Python image as
``python3 -I /opt/pytest-bridge/pytest-bridge.pyz <role>``; the router's data plane is a stock
nginx image. The zipapp reaches the pod in one of two ways (:class:`Code`):

* from a ConfigMap the plugin creates at connect (the default: a plain ``pip install`` is all a
  user needs), mounted read-only at :data:`CODE_DIR`;
* from the image itself (``pytest-bridge images build`` copies it to the same path), for
  clusters where a ConfigMap of code is unwelcome.

Every pod we create ourselves (guard, manager, router) passes Pod Security ``restricted``: non-root
(:data:`RUN_AS`), no privilege escalation, all capabilities dropped, seccomp ``RuntimeDefault``, a
read-only root filesystem with an ``emptyDir`` at ``/tmp``, requests and limits. The agent in a
bridged workload keeps that workload's own security context (see :func:`agent_security_context`).

Used by the plugin (which builds the guard, the workload patch, route pods and the manager) and
by the manager (which builds routers); both sides must agree, hence one module.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUNDLE_FILE",
    "CODE_DIR",
    "CODE_PATH",
    "CODE_VOLUME",
    "DEFAULT_NGINX_IMAGE",
    "DEFAULT_PYTHON_IMAGE",
    "ROLES",
    "RUN_AS",
    "TMP_VOLUME",
    "Code",
    "agent_security_context",
    "command",
    "container_security",
    "pod_security",
    "resources",
    "running_code",
]

# The two public images a cluster must be able to pull (or mirror: --bridge-agent-image and
# --bridge-routing-image). Pinned: a moving tag would change what runs under a given plugin.
DEFAULT_PYTHON_IMAGE = "python:3.11.13-slim-bookworm"
DEFAULT_NGINX_IMAGE = "nginx:1.28.0"

CODE_DIR = "/opt/pytest-bridge"
BUNDLE_FILE = "pytest-bridge.pyz"
CODE_PATH = f"{CODE_DIR}/{BUNDLE_FILE}"
CODE_VOLUME = "pytest-bridge-code"
TMP_VOLUME = "pytest-bridge-tmp"
# Any uid without a name works with a read-only root filesystem; 65532 is the usual "nonroot".
RUN_AS = 65532

# role -> the module run as __main__ (``python3 -I pytest-bridge.pyz <role> [args]``).
ROLES: dict[str, str] = {
    "agent": "pytest_bridge_agent.__main__",
    "guard": "pytest_bridge_agent.guard",
    "manager": "pytest_bridge_routing.manager",
    "router": "pytest_bridge_routing.router",
}


def command(role: str) -> list[str]:
    """The container command that runs ``role`` from the zipapp (``python3`` from the image's PATH)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return ["python3", "-I", CODE_PATH, role]


@dataclass(frozen=True)
class Code:
    """Where the zipapp comes from: ``configmap`` names a ConfigMap holding it, None = the image has it."""

    configmap: str | None = None
    digest: str = ""  # of the code the plugin expects (pytest_bridge.cluster.bundle); "" when unknown

    def volumes(self) -> list[dict[str, Any]]:
        if self.configmap is None:
            return []
        return [
            {
                "name": CODE_VOLUME,
                "configMap": {"name": self.configmap, "items": [{"key": BUNDLE_FILE, "path": BUNDLE_FILE}]},
            }
        ]

    def mounts(self) -> list[dict[str, Any]]:
        if self.configmap is None:
            return []
        return [{"name": CODE_VOLUME, "mountPath": CODE_DIR, "readOnly": True}]


def running_code() -> tuple[str, str]:
    """(version, digest) of the code this process runs: the zipapp's, or ("source", "source")."""
    try:
        info: Any = importlib.import_module("pytest_bridge_agent._bundle")
    except ImportError:
        return "source", "source"
    return str(info.VERSION), str(info.DIGEST)


def pod_security() -> dict[str, Any]:
    """Pod-level securityContext of our own pods (Pod Security ``restricted``)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """Container-level securityContext of our own containers (Pod Security ``restricted``)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}}


def tmp_mount() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "mountPath": "/tmp"}


def agent_security_context(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    """The agent container's securityContext in a workload's pod: the original one, made to run.

    The agent takes the place of the app's container and keeps its security context, so a
    workload that passes the namespace's policy still does. One thing cannot carry over: a
    ``runAsNonRoot`` with no ``runAsUser`` relies on the app image's non-root USER, and the
    stock Python image runs as root, so the kubelet would refuse to start it. Then the agent
    gets :data:`RUN_AS` (the pod's ``fsGroup`` still applies to mounted volumes). Returns None
    when the original container has no securityContext and none is needed.
    """
    pod_sc = pod_spec.get("securityContext") or {}
    original = container.get("securityContext")
    result = copy.deepcopy(dict(original)) if original else {}
    non_root = result.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = result.get("runAsUser", pod_sc.get("runAsUser"))
    if non_root and user is None:
        result["runAsUser"] = RUN_AS
    return result or None
