"""Build the patches that swap a workload's container for the agent, and back.

Deployments and StatefulSets are changed with an RFC 6902 JSON Patch (send it as
``application/json-patch+json``; the Python client does so for a list body). JSON Patch
was chosen over strategic/JSON merge patches because:

* ``test`` operations make it fail safely: the forward patch tests the object's uid and
  resourceVersion (the exact version that was recorded as "original"), the reverse patch
  tests that the object still carries this session's agent, so neither overwrites a
  concurrent change;
* it is exact: the reverse patch is computed operation by operation against the
  forward result, so ``apply(apply(w, forward), reverse) == w`` including absent keys,
  whereas merge patches cannot express "remove this list item" or "this key was absent"
  on containers reliably.

Bare Pods cannot change command/args in place, so they are re-created from a recorded
clone: :func:`agent_pod` and :func:`pod_for_recreate` build both manifests.

Pure: no I/O, no cluster calls. Inputs are plain dicts in API JSON shape and are never
mutated.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_bridge_agent import labels
from pytest_bridge_agent.runtime import Code, agent_security_context, command

from pytest_bridge.core.errors import PatchError
from pytest_bridge.core.jsonpatch import apply_patch, pointer
from pytest_bridge.core.plan import BridgePlan, pod_template_spec

__all__ = [
    "AGENT_CONTROL_PORT",
    "AGENT_STATUS_PORT",
    "DEFAULT_AGENT_COMMAND",
    "SESSION_ANNOTATION",
    "SESSION_LABEL",
    "AgentSpec",
    "WorkloadPatches",
    "add_code_volumes",
    "agent_container",
    "agent_pod",
    "bridged_session",
    "pod_for_recreate",
    "strip_server_fields",
    "token_sha256",
    "workload_patches",
]

AGENT_CONTROL_PORT = 47100
AGENT_STATUS_PORT = 47101
DEFAULT_AGENT_COMMAND: tuple[str, ...] = tuple(command("agent"))
SESSION_LABEL = labels.SESSION_LABEL
SESSION_ANNOTATION = labels.SESSION_ANNOTATION
CONTAINER_ANNOTATION = labels.CONTAINER_ANNOTATION

_SESSION_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_AGENT_ENV_PREFIX = "PYTEST_BRIDGE_"
# Removed from the target container while bridged (kept when the feature is enabled):
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
# The agent has its own entry point; the app's working directory may not exist in its image.
_DROPPED = ("command", "args", "workingDir")
_SERVER_METADATA = (
    "resourceVersion",
    "uid",
    "generation",
    "managedFields",
    "creationTimestamp",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_SERVER_ANNOTATIONS = ("deployment.kubernetes.io/revision",)
JsonOps = list[dict[str, Any]]


@dataclass(frozen=True)
class AgentSpec:
    """What the agent container runs with."""

    image: str
    session: str
    token_sha256: str  # of the client's token (hex): the pod never carries the token itself
    command: tuple[str, ...] = DEFAULT_AGENT_COMMAND
    args: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    keep_probes: bool = False  # KubernetesLocalProcessConfig enableFeatures: Probes
    keep_lifecycle: bool = False  # enableFeatures: LifecycleHooks
    exit_when_idle: float = 0.0  # the agent exits after this long without a client (0: never)
    code: Code = field(default_factory=Code)  # where the agent's code comes from (a ConfigMap volume, or the image)


@dataclass(frozen=True)
class WorkloadPatches:
    """RFC 6902 patches: ``forward`` bridges the workload, ``reverse`` restores it exactly."""

    forward: JsonOps
    reverse: JsonOps


def _check_session(session: str) -> None:
    if not _SESSION_RE.match(session):
        raise PatchError(
            f"session id {session!r} is not a valid label value; use a lowercase DNS label "
            "(a-z, 0-9, '-', at most 63 characters)"
        )


def token_sha256(token: str) -> str:
    """What an agent is given of its client's token: the SHA-256 (hex). Anyone who may read the
    pod spec may read this; only the client, which made the token, can present it."""
    return hashlib.sha256(token.encode()).hexdigest()


def agent_container(
    original: Mapping[str, Any], plan: BridgePlan, agent: AgentSpec, pod_spec: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The agent container that takes ``original``'s place.

    Keeps name, env, envFrom, volumeMounts, volumeDevices, ports, resources and
    securityContext (so the agent sees the real environment and files, and the Service
    still selects and reaches the pod; ``pod_spec``, the pod's spec, says whether the
    security context needs a user for the stock image: see ``agent_security_context``);
    replaces image, command and args; mounts the agent's code; removes probes and
    lifecycle hooks unless kept by the agent spec.
    """
    _check_session(agent.session)
    clash = {AGENT_CONTROL_PORT, AGENT_STATUS_PORT} & set(plan.target_ports)
    if clash:
        raise PatchError(
            f"target port(s) {sorted(clash)} of service {plan.service!r} collide with the agent's "
            f"control/status ports {AGENT_CONTROL_PORT}/{AGENT_STATUS_PORT}"
        )
    container = copy.deepcopy(dict(original))
    for key in _DROPPED:
        container.pop(key, None)
    if not agent.keep_probes:
        for key in _PROBES:
            container.pop(key, None)
        container["readinessProbe"] = {
            "httpGet": {"path": "/healthz", "port": AGENT_STATUS_PORT, "scheme": "HTTP"},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        }
    if not agent.keep_lifecycle:
        container.pop("lifecycle", None)
    container["image"] = agent.image
    container["imagePullPolicy"] = agent.image_pull_policy
    container["command"] = list(agent.command)
    if agent.args:
        container["args"] = list(agent.args)
    # The agent's own start errors (a port it may not bind, a bad token) reach the pod's status.
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    code_mounts = agent.code.mounts()
    if code_mounts:
        taken = {m["name"] for m in code_mounts} | {m["mountPath"] for m in code_mounts}
        mounts = [m for m in container.get("volumeMounts") or [] if not {m.get("name"), m.get("mountPath")} & taken]
        container["volumeMounts"] = mounts + code_mounts
    security = agent_security_context(pod_spec or {}, original)
    if security is not None:
        container["securityContext"] = security
    env = [e for e in container.get("env") or [] if not str(e.get("name", "")).startswith(_AGENT_ENV_PREFIX)]
    env += [
        {"name": "PYTEST_BRIDGE_TOKEN_SHA256", "value": agent.token_sha256},
        {"name": "PYTEST_BRIDGE_LISTEN_PORTS", "value": ",".join(map(str, plan.target_ports))},
        {"name": "PYTEST_BRIDGE_CONTROL_PORT", "value": str(AGENT_CONTROL_PORT)},
        {"name": "PYTEST_BRIDGE_STATUS_PORT", "value": str(AGENT_STATUS_PORT)},
        {"name": "PYTEST_BRIDGE_SESSION", "value": agent.session},
        # Where the kubelet reads the termination message: the agent says there why it left.
        {
            "name": "PYTEST_BRIDGE_TERMINATION_LOG",
            "value": container.get("terminationMessagePath") or "/dev/termination-log",
        },
    ]
    if agent.exit_when_idle > 0:
        env.append({"name": "PYTEST_BRIDGE_EXIT_WHEN_IDLE", "value": f"{agent.exit_when_idle:g}"})
    container["env"] = env
    return container


def _set_ops(doc: Any, tokens: Sequence[str | int], value: Any) -> tuple[JsonOps, JsonOps]:
    """Ops setting ``tokens`` to ``value`` in ``doc`` (creating missing maps), and their inverse."""
    node = doc
    for depth, token in enumerate(tokens):
        last = depth == len(tokens) - 1
        present = (isinstance(node, Mapping) and token in node) or (
            isinstance(node, list) and isinstance(token, int) and token < len(node)
        )
        if present:
            if last:
                path = pointer(*tokens)
                old = node[token]
                return (
                    [{"op": "replace", "path": path, "value": copy.deepcopy(value)}],
                    [{"op": "replace", "path": path, "value": copy.deepcopy(old)}],
                )
            node = node[token]
            continue
        nested = copy.deepcopy(value)
        for inner in reversed(tokens[depth + 1 :]):
            nested = {inner: nested}
        path = pointer(*tokens[: depth + 1])
        return [{"op": "add", "path": path, "value": nested}], [{"op": "remove", "path": path}]
    raise PatchError("empty path")  # pragma: no cover - tokens is never empty


def _container_path(plan: BridgePlan) -> tuple[str | int, ...]:
    if plan.workload.kind == "Pod":
        return ("spec", "containers", plan.container_index)
    return ("spec", "template", "spec", "containers", plan.container_index)


def _original_container(workload: Mapping[str, Any], plan: BridgePlan) -> Mapping[str, Any]:
    containers = pod_template_spec(workload).get("containers") or []
    index = plan.container_index
    if index >= len(containers) or containers[index].get("name") != plan.container:
        raise PatchError(
            f"{plan.workload.kind} {plan.workload.name!r} no longer has container {plan.container!r} at "
            f"index {index}; it changed since it was planned. Re-run to plan again"
        )
    return containers[index]  # type: ignore[no-any-return]


def workload_patches(workload: Mapping[str, Any], plan: BridgePlan, agent: AgentSpec) -> WorkloadPatches:
    """JSON Patches that bridge a Deployment/StatefulSet and restore it.

    The forward patch sets the target container to :func:`agent_container`, replicas
    to 1, and marks the workload and its pod template with the session (label and
    annotation, so the Service still selects the pods and a sweep finds them).
    """
    if plan.workload.kind not in ("Deployment", "StatefulSet") or workload.get("kind") != plan.workload.kind:
        raise PatchError(
            f"workload_patches() patches Deployments and StatefulSets, got {workload.get('kind')!r} "
            f"(plan: {plan.workload.kind}); re-create bare Pods with agent_pod()/pod_for_recreate()"
        )
    original = _original_container(workload, plan)
    container_path = _container_path(plan)
    meta = workload.get("metadata") or {}
    forward: JsonOps = []
    # generation, not resourceVersion: status updates (a rollout finishing) bump the latter
    # without changing what the reverse patch was computed from.
    for key in ("uid", "generation"):
        if key in meta:
            forward.append({"op": "test", "path": pointer("metadata", key), "value": meta[key]})
    forward.append({"op": "test", "path": pointer(*container_path, "name"), "value": plan.container})
    inverse: list[JsonOps] = []
    working: Any = copy.deepcopy(dict(workload))
    pod_spec = pod_template_spec(workload)
    steps: list[tuple[tuple[str | int, ...], Any]] = [
        (container_path, agent_container(original, plan, agent, pod_spec)),
        (("spec", "replicas"), 1),
        (("metadata", "labels", SESSION_LABEL), agent.session),
        (("metadata", "annotations", SESSION_ANNOTATION), agent.session),
        (("spec", "template", "metadata", "labels", SESSION_LABEL), agent.session),
        (("spec", "template", "metadata", "annotations", SESSION_ANNOTATION), agent.session),
        (("spec", "template", "metadata", "annotations", CONTAINER_ANNOTATION), plan.container),
    ]
    volumes = pod_spec.get("volumes")
    for volume in agent.code.volumes():
        if volumes is None:
            steps.append((("spec", "template", "spec", "volumes"), [volume]))
            volumes = [volume]
        else:
            steps.append((("spec", "template", "spec", "volumes", len(volumes)), volume))
            volumes = [*volumes, volume]
    for tokens, value in steps:
        ops, undo = _set_ops(working, tokens, value)
        working = apply_patch(working, ops)
        forward += ops
        inverse.append(undo)
    reverse: JsonOps = [
        {
            "op": "test",
            "path": pointer("spec", "template", "metadata", "annotations", SESSION_ANNOTATION),
            "value": agent.session,
        },
        {"op": "test", "path": pointer(*container_path, "name"), "value": plan.container},
        {"op": "test", "path": pointer(*container_path, "image"), "value": agent.image},
    ]
    for undo in reversed(inverse):
        reverse += undo
    return WorkloadPatches(forward=forward, reverse=reverse)


def add_code_volumes(pod_spec: dict[str, Any], code: Code) -> None:
    """Add ``code``'s volumes to a pod spec (in place; a volume of the same name is replaced)."""
    wanted = code.volumes()
    names = {v["name"] for v in wanted}
    if wanted:
        pod_spec["volumes"] = [v for v in pod_spec.get("volumes") or [] if v.get("name") not in names] + wanted


def bridged_session(obj: Mapping[str, Any]) -> str | None:
    """The session id a workload or pod is bridged by, if any (from the label this module sets)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    value = labels.get(SESSION_LABEL)
    return str(value) if value else None


def strip_server_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` without fields the API server owns.

    Removes ``status``, metadata resourceVersion/uid/generation/managedFields/
    creationTimestamp/selfLink/deletion*, and server-written annotations such as
    ``deployment.kubernetes.io/revision`` (dropping ``annotations`` if that empties it).
    """
    result = copy.deepcopy(dict(obj))
    result.pop("status", None)
    meta = result.get("metadata")
    if isinstance(meta, dict):
        for key in _SERVER_METADATA:
            meta.pop(key, None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for key in _SERVER_ANNOTATIONS:
                annotations.pop(key, None)
            if not annotations:
                meta.pop("annotations")
    return result


def pod_for_recreate(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A bare Pod's manifest suitable for ``create`` again (the restore of a bare Pod).

    On top of :func:`strip_server_fields`, drops what the scheduler or kubelet set
    (``spec.nodeName``) and what may not be set on create (``spec.ephemeralContainers``).
    """
    if pod.get("kind", "Pod") != "Pod":
        raise PatchError(f"pod_for_recreate() needs a Pod, got {pod.get('kind')!r}")
    result = strip_server_fields(pod)
    result.setdefault("apiVersion", "v1")
    result["kind"] = "Pod"
    spec = result.get("spec")
    if isinstance(spec, dict):
        for key in ("nodeName", "ephemeralContainers"):
            spec.pop(key, None)
    return result


def agent_pod(original_pod: Mapping[str, Any], plan: BridgePlan, agent: AgentSpec) -> dict[str, Any]:
    """The Pod to create in place of a bridged bare Pod (same name, labels and spec but the agent)."""
    if plan.workload.kind != "Pod":
        raise PatchError(f"agent_pod() is for bare Pods; plan targets {plan.workload.kind}")
    original = _original_container(original_pod, plan)
    pod = pod_for_recreate(original_pod)
    pod["spec"]["containers"][plan.container_index] = agent_container(original, plan, agent, pod["spec"])
    add_code_volumes(pod["spec"], agent.code)
    meta = pod.setdefault("metadata", {})
    meta.setdefault("labels", {})[SESSION_LABEL] = agent.session
    annotations = meta.setdefault("annotations", {})
    annotations[SESSION_ANNOTATION] = agent.session
    annotations[CONTAINER_ANNOTATION] = plan.container
    return pod
