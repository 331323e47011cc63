"""Build the local process environment from what the bridged container really sees.

The agent runs in the original container's place with the same env, envFrom and
mounts, and reports its environment (the real values, including secretKeyRef and
fieldRef ones). From that report, the container spec, the name mapping and the
B2K config this module computes:

* the local env: the container's variables (declared names, and everything envFrom may
  have added, minus the agent image's own variables), service-link variables rewritten
  to the local mapping, ``KUBERNETES_SERVICE_*`` pointing at the local mapping of the
  ``kubernetes`` Service when it is mapped, then the config's ``env`` entries on top;
* which volume mounts to download and where to (``$(volumeMounts:NAME)`` mounts and the
  service-account token), under the session directory unless the config says otherwise.

Pure: paths are computed, not created; nothing is downloaded or written here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from pytest_bridge.config import (
    ExternalEndpointToken,
    LocalProcessConfig,
    Resolvers,
    ServiceToken,
    VolumeMountToken,
    evaluate_env,
)
from pytest_bridge.errors import ConfigError
from pytest_bridge.names import AddressMode, NameMapping, env_name, service_link_env

__all__ = [
    "AGENT_IMAGE_ENV",
    "NEVER_IMPORTED",
    "SERVICE_ACCOUNT_MOUNT_PATH",
    "LocalEnvironment",
    "VolumeDownload",
    "build_environment",
    "plan_downloads",
]

SERVICE_ACCOUNT_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# Variables of the process, not of the service: importing them would break the local shell.
NEVER_IMPORTED: frozenset[str] = frozenset({"PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "TERM", "_"})
# Variables the agent image sets for itself; with envFrom we cannot tell them apart otherwise.
AGENT_IMAGE_ENV: frozenset[str] = frozenset(
    {
        "LANG",
        "LC_ALL",
        "GPG_KEY",
        "PYTHON_VERSION",
        "PYTHON_SHA256",
        "PYTHON_PIP_VERSION",
        "PYTHON_GET_PIP_URL",
        "PYTHON_GET_PIP_SHA256",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
    }
)
_AGENT_PREFIX = "PYTEST_BRIDGE_"


@dataclass(frozen=True)
class VolumeDownload:
    volume_name: str
    mount_path: str  # path inside the container; the agent archives it
    local_dir: PurePath
    reason: str


@dataclass(frozen=True)
class LocalEnvironment:
    env: dict[str, str]
    downloads: tuple[VolumeDownload, ...]
    dropped: tuple[str, ...]  # reported names deliberately not imported (for the report)


def _link_pattern(service_names: Iterable[str]) -> re.Pattern[str] | None:
    prefixes = sorted({re.escape(env_name(name)) for name in service_names}, key=len, reverse=True)
    if not prefixes:
        return None
    return re.compile(
        rf"^(?:{'|'.join(prefixes)})_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
        r"|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)$"
    )


def _local_dir(volume_name: str, config: LocalProcessConfig | None, session_dir: PurePath) -> PurePath:
    local_path = config.local_path_for(volume_name) if config else None
    if local_path is None:
        return session_dir / "volumes" / volume_name
    path = PurePath(local_path)
    if path.is_absolute() or config is None:
        return path
    # Relative localPath: relative to the config file, as users write it next to the file.
    return PurePath(config.source).parent / path


def plan_downloads(
    container: Mapping[str, Any],
    config: LocalProcessConfig | None,
    session_dir: PurePath,
    *,
    service_account_token: bool = True,
) -> tuple[VolumeDownload, ...]:
    """Which mounts of ``container`` to download, and where.

    ``container`` should come from a pod (admission adds the service-account mount to
    pods, not to templates); if that mount is absent the token is still downloaded from
    its well-known path when ``service_account_token`` is true. A ``$(volumeMounts:X)``
    token naming no mount of the container is a :class:`ConfigError`.
    """
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") and m.get("mountPath")]
    by_name = {str(m["name"]): m for m in reversed(mounts)}  # first mount of a volume wins
    downloads: dict[str, VolumeDownload] = {}
    if config is not None:
        for entry in config.env:
            for segment in entry.segments:
                if not isinstance(segment, VolumeMountToken) or segment.name in downloads:
                    continue
                mount = by_name.get(segment.name)
                if mount is None:
                    listed = ", ".join(f"{m['name']} ({m['mountPath']})" for m in mounts) or "none"
                    raise ConfigError(
                        f"container {container.get('name')!r} has no volume mount {segment.name!r}; its "
                        f"mounts: {listed}",
                        source=config.source,
                        entry=entry.entry,
                        token=f"$(volumeMounts:{segment.name})",
                    )
                downloads[segment.name] = VolumeDownload(
                    volume_name=segment.name,
                    mount_path=str(mount["mountPath"]),
                    local_dir=_local_dir(segment.name, config, session_dir),
                    reason=f"{entry.entry} uses $(volumeMounts:{segment.name})",
                )
    if service_account_token:
        sa_mounts = [m for m in mounts if str(m["mountPath"]).rstrip("/") == SERVICE_ACCOUNT_MOUNT_PATH]
        name = str(sa_mounts[0]["name"]) if sa_mounts else "kube-api-access"
        if name not in downloads:
            downloads[name] = VolumeDownload(
                volume_name=name,
                mount_path=SERVICE_ACCOUNT_MOUNT_PATH,
                local_dir=_local_dir(name, config, session_dir),
                reason="service-account token",
            )
    return tuple(downloads.values())


def _resolvers(mapping: NameMapping, downloads: Sequence[VolumeDownload], names_resolvable: bool) -> Resolvers:
    def service(token: ServiceToken) -> str:
        return mapping.service(token.name, token.namespace).address

    def volume_mount(name: str) -> str:
        for download in downloads:
            if download.volume_name == name:
                return str(download.local_dir)
        raise KeyError(f"volume mount {name} is not downloaded")

    def external(token: ExternalEndpointToken) -> str:
        entry = mapping.external(token.host)
        # The host name keeps TLS verification working when names resolve locally.
        if names_resolvable and mapping.mode is AddressMode.LOOPBACK_IPS:
            return token.host
        return entry.address

    return Resolvers(service=service, volume_mount=volume_mount, external_endpoint=external)


def build_environment(
    reported_env: Mapping[str, str],
    container: Mapping[str, Any],
    mapping: NameMapping,
    *,
    config: LocalProcessConfig | None = None,
    downloads: Sequence[VolumeDownload] = (),
    namespace_services: Iterable[str] = (),
    names_resolvable: bool = True,
    agent_image_env: Iterable[str] = AGENT_IMAGE_ENV,
) -> LocalEnvironment:
    """The environment for the local process.

    ``reported_env`` is what the agent reports; ``container`` the original container
    spec; ``namespace_services`` the names of all Services of the bridged namespace (their
    service-link variables in the report point at unreachable cluster IPs: mapped ones
    are regenerated, the rest dropped); ``downloads`` from :func:`plan_downloads`.
    ``names_resolvable`` says whether cluster/external host names resolve locally
    (hosts file or in-process resolver) so ``$(externalendpoints:…)`` can stay a name.
    """
    declared = {str(e["name"]) for e in container.get("env") or [] if e.get("name")}
    has_env_from = bool(container.get("envFrom"))
    image_env = set(agent_image_env)
    mapped_here = [
        e.endpoint.name
        for e in mapping.entries
        if not e.endpoint.is_external and e.endpoint.namespace == mapping.namespace
    ]
    link_pattern = _link_pattern([*namespace_services, *mapped_here])
    regenerated = service_link_env(mapping)
    master_pattern = _link_pattern(["kubernetes"])
    assert master_pattern is not None
    master_mapped = "KUBERNETES_SERVICE_HOST" in regenerated

    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in reported_env.items():
        if name in NEVER_IMPORTED or name.startswith(_AGENT_PREFIX):
            dropped.append(name)
            continue
        if name in declared:
            env[name] = value  # declared values win over service links, as in Kubernetes
            continue
        if master_pattern.match(name):
            # Kept as reported unless the kubernetes Service is mapped (then regenerated below).
            if not master_mapped:
                env[name] = value
            continue
        if link_pattern is not None and link_pattern.match(name):
            if name not in regenerated:
                dropped.append(name)  # a link to a service that is not reachable locally
            continue
        if has_env_from and name not in image_env:
            env[name] = value
        else:
            dropped.append(name)
    for name, value in regenerated.items():
        if name not in declared:
            env[name] = value
    if config is not None:
        env.update(evaluate_env(config, _resolvers(mapping, downloads, names_resolvable)))
    return LocalEnvironment(env=env, downloads=tuple(downloads), dropped=tuple(sorted(dropped)))
