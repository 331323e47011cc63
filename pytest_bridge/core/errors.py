"""The plugin's own exception hierarchy.

Every error a user can meet derives from :class:`BridgeError`, and its message says
what to do next. This module must stay free of pytest and of the Kubernetes client:
layers above wrap foreign exceptions into these (``raise PlanError(...) from e``).
"""

from __future__ import annotations

__all__ = [
    "ApiUnreachableError",
    "BridgeError",
    "ClusterError",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "ForbiddenError",
    "JsonPatchError",
    "NameMappingError",
    "NotFoundError",
    "PatchConflictError",
    "PatchError",
    "PlanError",
    "PolicyError",
]


class BridgeError(Exception):
    """Base of every pytest-bridge error."""


class PlanError(BridgeError):
    """The Service, its pods or its workload cannot be bridged as they are."""


class ConfigError(BridgeError):
    """KubernetesLocalProcessConfig.yaml (or an equivalent source) is malformed.

    ``source`` is the file, ``entry`` the offending entry (e.g. ``env[2] (DB_URL)``)
    and ``token`` the offending ``$(...)`` token, when there is one.
    """

    def __init__(self, message: str, *, source: str = "", entry: str = "", token: str = "") -> None:
        where = ", ".join(part for part in (source, entry) if part)
        full = f"{where}: {message}" if where else message
        if token:
            full = f"{full} (token {token!r})"
        super().__init__(full)
        self.source = source
        self.entry = entry
        self.token = token


class PatchError(BridgeError):
    """A workload patch could not be built or applied."""


class JsonPatchError(PatchError):
    """An RFC 6902 operation is malformed or its path does not exist."""


class PatchConflictError(JsonPatchError):
    """A JSON Patch ``test`` operation failed: the object changed since it was read."""


class NameMappingError(BridgeError):
    """Local addresses or host names cannot be assigned, or a hosts file is malformed."""


class ClusterError(BridgeError):
    """The Kubernetes API answered with an error we can't work around."""


class ApiUnreachableError(ClusterError):
    """The API server did not answer (down, unreachable, too slow): the call timed out or failed."""


class NotFoundError(ClusterError):
    """An object (service, namespace, pod, context) does not exist."""


class ForbiddenError(ClusterError):
    """RBAC denies a verb on a resource; the message names both and how to grant them."""

    def __init__(self, message: str, *, verb: str = "", resource: str = "", namespace: str = "") -> None:
        super().__init__(message)
        self.verb = verb
        self.resource = resource
        self.namespace = namespace


class PolicyError(ClusterError):
    """Admission refuses a pod or object we need: Pod Security, an admission webhook or policy."""


class ConflictError(ClusterError):
    """An object changed under us (resourceVersion / JSON Patch test failed) or already exists."""


class ConnectError(BridgeError):
    """Connecting the session failed: agent not ready, image can't be pulled, port-forward down."""
