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
  service-account token), under the session directory unless the config says otherwise;
* by default also every other mount of a ConfigMap, Secret, projected or downwardAPI volume
  (:func:`plan_mounted_volumes`); other kinds (emptyDir, PVC, hostPath, ...) are listed as
  skipped, with why: they hold data of their own, not configuration, and may be large.

Pure: paths are computed, not created; nothing is downloaded or written here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from pytest_bridge_agent.runtime import CODE_DIR

from pytest_bridge.core.config import (
    ExternalEndpointToken,
    LocalProcessConfig,
    Resolvers,
    ServiceToken,
    VolumeMountToken,
    evaluate_env,
)
from pytest_bridge.core.errors import ConfigError
from pytest_bridge.core.names import AddressMode, NameMapping, env_name, service_link_env

__all__ = [
    "AGENT_IMAGE_ENV",
    "IMPORTED_VOLUME_KINDS",
    "NEVER_IMPORTED",
    "SERVICE_ACCOUNT_MOUNT_PATH",
    "LocalEnvironment",
    "SkippedVolume",
    "VolumeDownload",
    "build_environment",
    "local_volume_paths",
    "plan_downloads",
    "plan_mounted_volumes",
    "volume_kind",
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


# Volume kinds whose files are the service's configuration, small by construction (a ConfigMap
# or Secret holds at most 1 MiB): imported by default.
IMPORTED_VOLUME_KINDS = ("configMap", "secret", "projected", "downwardAPI")
_SKIP_NOTES = {
    "emptyDir": "scratch space of the pod, empty at start",
    "persistentVolumeClaim": "a persistent volume: data, possibly large",
    "hostPath": "a folder of the node",
    "ephemeral": "a per-pod volume: data, possibly large",
}


@dataclass(frozen=True)
class SkippedVolume:
    """A mount not imported by default (``--bridge-import-volumes`` imports only configuration)."""

    volume_name: str
    mount_path: str
    kind: str

    def describe(self) -> str:
        note = _SKIP_NOTES.get(self.kind, "not configuration")
        return f"{self.mount_path} ({self.kind} {self.volume_name}: {note})"


def volume_kind(volume: Mapping[str, Any]) -> str:
    """``configMap``, ``secret``, ``emptyDir``, ...: the volume source a pod's volume names."""
    return next((str(key) for key in volume if key != "name"), "unknown")


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


def plan_mounted_volumes(
    container: Mapping[str, Any],
    pod_volumes: Sequence[Mapping[str, Any]],
    config: LocalProcessConfig | None,
    session_dir: PurePath,
    *,
    planned: Sequence[VolumeDownload] = (),
    only: Iterable[str] | None = None,
) -> tuple[tuple[VolumeDownload, ...], tuple[SkippedVolume, ...]]:
    """Every other mount of ``container`` to import by default, and the mounts skipped.

    ``pod_volumes`` are the pod's ``spec.volumes``; ``planned`` what :func:`plan_downloads`
    already fetches (its mount paths are not fetched twice); ``only`` the volume names of the
    workload's own container, so volumes the plugin adds to the agent's pod (its code) are left
    out (and its code mount wherever it shows up). A volume mounted twice (two ``subPath`` files, say) gets a folder per mount.
    """
    kinds = {str(v.get("name")): volume_kind(v) for v in pod_volumes}
    wanted = set(only) if only is not None else None
    fetched = {d.mount_path.rstrip("/") for d in planned}
    used_dirs = {d.local_dir for d in planned}
    downloads: list[VolumeDownload] = []
    skipped: list[SkippedVolume] = []
    for mount in container.get("volumeMounts") or []:
        name, path = str(mount.get("name") or ""), str(mount.get("mountPath") or "")
        if not name or not path or path.rstrip("/") in fetched or (wanted is not None and name not in wanted):
            continue
        if path.rstrip("/") == CODE_DIR:  # the plugin's own code (in a bridged workload's template too)
            continue
        kind = kinds.get(name, "unknown")
        if kind not in IMPORTED_VOLUME_KINDS:
            skipped.append(SkippedVolume(name, path, kind))
            continue
        local_dir = _local_dir(name, config, session_dir)
        n = 2
        while local_dir in used_dirs:
            local_dir = session_dir / "volumes" / f"{name}.{n}"
            n += 1
        used_dirs.add(local_dir)
        fetched.add(path.rstrip("/"))
        downloads.append(VolumeDownload(name, path, local_dir, f"mounted {kind} volume"))
    return tuple(downloads), tuple(skipped)


def local_volume_paths(
    container: Mapping[str, Any], downloads: Sequence[VolumeDownload], *, is_file: Any = None
) -> dict[str, str]:
    """``mountPath -> local path`` of what was downloaded (the ``volumes`` attribute of the fixtures).

    A ``subPath`` mount of one file lands as that file in its folder, so it maps to the file
    (``is_file(path) -> bool`` tells; None: always the folder).
    """
    sub_paths = {str(m.get("mountPath")) for m in container.get("volumeMounts") or [] if m.get("subPath")}
    paths: dict[str, str] = {}
    for download in downloads:
        local = download.local_dir
        if download.mount_path in sub_paths and is_file is not None:
            candidate = local / PurePath(download.mount_path).name
            if is_file(candidate):
                local = candidate
        paths[download.mount_path] = str(local)
    return paths


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
