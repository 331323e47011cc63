"""Parse and evaluate KubernetesLocalProcessConfig.yaml (Bridge to Kubernetes format).

::

    version: 0.1
    enableFeatures: [Probes, LifecycleHooks, ManagedIdentity]
    volumeMounts:
      - name: secret-*            # glob on the volume name
        localPath: ./secrets      # where its files go locally
    env:
      - name: INVENTORY_URL
        value: http://$(services:inventory)/api
      - name: PAYMENTS
        value: $(services:payments.billing)
      - name: CERTS
        value: $(volumeMounts:tls-certs)/ca.crt
      - name: DB_HOST
        value: $(externalendpoints:db.example.com:5432)

Tokens are validated when the file is parsed, so a typo stops the run before anything
touches the cluster. ``$$(`` is a literal ``$(``. Evaluation is a pure function of
resolvers supplied by the caller. This module parses text; it must not read files,
resolve names or contact the cluster.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pytest_bridge.core.errors import ConfigError

__all__ = [
    "KNOWN_FEATURES",
    "EnvEntry",
    "ExternalEndpointToken",
    "LocalProcessConfig",
    "RequiredEndpoints",
    "Resolvers",
    "ServiceToken",
    "Text",
    "VolumeMountEntry",
    "VolumeMountToken",
    "evaluate_env",
    "parse_config",
    "parse_value",
]

KNOWN_FEATURES: tuple[str, ...] = ("Probes", "LifecycleHooks", "ManagedIdentity")
_SUPPORTED_VERSIONS = ("0.1",)
_TOKEN_START = "$("
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_VOLUME_GLOB = re.compile(r"^[-a-z0-9*?\[\]!.]+$")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ServiceToken:
    """``$(services:NAME)`` or ``$(services:NAME.NAMESPACE)``; ``namespace=None``: the bridged one."""

    name: str
    namespace: str | None = None


@dataclass(frozen=True)
class VolumeMountToken:
    """``$(volumeMounts:NAME)``: the local directory holding that volume's files."""

    name: str


@dataclass(frozen=True)
class ExternalEndpointToken:
    """``$(externalendpoints:HOST:P1,P2)``: an endpoint reached through the agent."""

    host: str
    ports: tuple[int, ...]


Segment = Text | ServiceToken | VolumeMountToken | ExternalEndpointToken


@dataclass(frozen=True)
class EnvEntry:
    name: str
    raw: str
    segments: tuple[Segment, ...]
    entry: str  # "env[2] (DB_URL)", for messages


@dataclass(frozen=True)
class VolumeMountEntry:
    name: str  # glob on the volume name
    local_path: str
    entry: str

    def matches(self, volume_name: str) -> bool:
        return fnmatch.fnmatchcase(volume_name, self.name)


@dataclass(frozen=True)
class RequiredEndpoints:
    """What the config needs reachable on top of the bridged namespace's services."""

    services: tuple[ServiceToken, ...] = ()
    namespaces: tuple[str, ...] = ()  # namespaces other than the bridged one
    external: tuple[ExternalEndpointToken, ...] = ()
    volume_mounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class LocalProcessConfig:
    source: str
    version: str = "0.1"
    features: tuple[str, ...] = ()
    volume_mounts: tuple[VolumeMountEntry, ...] = ()
    env: tuple[EnvEntry, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def has_feature(self, feature: str) -> bool:
        return feature in self.features

    def local_path_for(self, volume_name: str) -> str | None:
        """``localPath`` of the first ``volumeMounts`` entry whose glob matches, if any."""
        for mount in self.volume_mounts:
            if mount.matches(volume_name):
                return mount.local_path
        return None

    def required_endpoints(self) -> RequiredEndpoints:
        services: dict[ServiceToken, None] = {}
        external: dict[tuple[str, tuple[int, ...]], ExternalEndpointToken] = {}
        volumes: dict[str, None] = {}
        for entry in self.env:
            for segment in entry.segments:
                if isinstance(segment, ServiceToken):
                    services[segment] = None
                elif isinstance(segment, ExternalEndpointToken):
                    external[(segment.host, segment.ports)] = segment
                elif isinstance(segment, VolumeMountToken):
                    volumes[segment.name] = None
        namespaces = dict.fromkeys(s.namespace for s in services if s.namespace)
        # Several tokens for one host with different ports: merge them into one endpoint.
        merged: dict[str, tuple[int, ...]] = {}
        for token in external.values():
            merged[token.host] = tuple(sorted(set(merged.get(token.host, ())) | set(token.ports)))
        return RequiredEndpoints(
            services=tuple(services),
            namespaces=tuple(n for n in namespaces if n),
            external=tuple(ExternalEndpointToken(host, ports) for host, ports in merged.items()),
            volume_mounts=tuple(volumes),
        )


@dataclass(frozen=True)
class Resolvers:
    """How tokens become text: the caller knows the local mapping."""

    service: Callable[[ServiceToken], str]
    volume_mount: Callable[[str], str]
    external_endpoint: Callable[[ExternalEndpointToken], str]


def _parse_token(body: str, token: str, fail: Callable[[str, str], ConfigError]) -> Segment:
    kind, sep, arg = body.partition(":")
    if not sep or not arg:
        raise fail(
            "malformed token; expected $(services:NAME[.NAMESPACE]), $(volumeMounts:NAME) or "
            "$(externalendpoints:HOST:PORT[,PORT...])",
            token,
        )
    lowered = kind.lower()
    if lowered == "services":
        name, _, namespace = arg.partition(".")
        if not _DNS1035.match(name) or ("." in arg and not _DNS1123.match(namespace)):
            raise fail("expected $(services:NAME) or $(services:NAME.NAMESPACE) with lowercase DNS names", token)
        return ServiceToken(name, namespace or None)
    if lowered == "volumemounts":
        if not _DNS1123.match(arg):
            raise fail("expected $(volumeMounts:NAME) with a volume name (lowercase DNS label)", token)
        return VolumeMountToken(arg)
    if lowered == "externalendpoints":
        host, sep, port_list = arg.rpartition(":")
        ports: list[int] = []
        for text in port_list.split(","):
            if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
                ports = []
                break
            ports.append(int(text))
        if not sep or not _HOSTNAME.match(host) or not ports:
            raise fail("expected $(externalendpoints:HOST:PORT[,PORT...]) with ports 1-65535", token)
        return ExternalEndpointToken(host.lower(), tuple(dict.fromkeys(ports)))
    raise fail(f"unknown token kind {kind!r}; known: services, volumeMounts, externalendpoints", token)


def parse_value(raw: str, *, source: str = "", entry: str = "") -> tuple[Segment, ...]:
    """Split an env value into text and tokens; :class:`ConfigError` on a bad token."""

    def fail(message: str, token: str) -> ConfigError:
        return ConfigError(message, source=source, entry=entry, token=token)

    segments: list[Segment] = []
    text: list[str] = []
    i = 0
    while i < len(raw):
        if raw.startswith("$$(", i):
            text.append("$(")
            i += 3
            continue
        if raw.startswith(_TOKEN_START, i):
            end = raw.find(")", i)
            if end < 0:
                raise fail("unterminated token: '$(' without ')'", raw[i:])
            token = raw[i : end + 1]
            if text:
                segments.append(Text("".join(text)))
                text = []
            segments.append(_parse_token(raw[i + 2 : end], token, fail))
            i = end + 1
            continue
        text.append(raw[i])
        i += 1
    if text:
        segments.append(Text("".join(text)))
    return tuple(segments)


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _list(doc: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key!r} must be a list", source=source, entry=key)
    return value


def parse_config(text: str, *, source: str | Path = "KubernetesLocalProcessConfig.yaml") -> LocalProcessConfig:
    """Parse and validate the YAML text of a config file named ``source``."""
    src = str(source)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=src) from e
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError("the top level must be a mapping (version, enableFeatures, volumeMounts, env)", source=src)
    warnings: list[str] = []
    unknown_keys = sorted(set(doc) - {"version", "enableFeatures", "volumeMounts", "env"})
    if unknown_keys:
        warnings.append(f"{src}: ignoring unknown key(s) {', '.join(map(str, unknown_keys))}")
    version = _scalar_text(doc.get("version", "0.1"))
    if version not in _SUPPORTED_VERSIONS:
        raise ConfigError(
            f"unsupported version {doc.get('version')!r}; supported: {', '.join(_SUPPORTED_VERSIONS)}",
            source=src,
            entry="version",
        )
    features: list[str] = []
    canonical = {f.lower(): f for f in KNOWN_FEATURES}
    for index, item in enumerate(_list(doc, "enableFeatures", src)):
        name = _scalar_text(item)
        if name is None:
            raise ConfigError("each feature must be a string", source=src, entry=f"enableFeatures[{index}]")
        if name.lower() in canonical:
            features.append(canonical[name.lower()])
        else:
            features.append(name)
            warnings.append(
                f"{src}: enableFeatures[{index}]: unknown feature {name!r} kept but ignored; known: "
                f"{', '.join(KNOWN_FEATURES)}"
            )
    mounts: list[VolumeMountEntry] = []
    for index, item in enumerate(_list(doc, "volumeMounts", src)):
        entry = f"volumeMounts[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError("each entry must be a mapping with 'name' and 'localPath'", source=src, entry=entry)
        name, local_path = _scalar_text(item.get("name")), _scalar_text(item.get("localPath"))
        if not name or not _VOLUME_GLOB.match(name):
            raise ConfigError(
                f"'name' must be a volume name or glob, got {item.get('name')!r}", source=src, entry=entry
            )
        if not local_path:
            raise ConfigError("'localPath' is required", source=src, entry=f"{entry} ({name})")
        mounts.append(VolumeMountEntry(name=name, local_path=local_path, entry=f"{entry} ({name})"))
    env: list[EnvEntry] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(_list(doc, "env", src)):
        entry = f"env[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError("each entry must be a mapping with 'name' and 'value'", source=src, entry=entry)
        name = _scalar_text(item.get("name"))
        if not name or not _ENV_NAME.match(name):
            raise ConfigError(
                f"'name' must be an environment variable name, got {item.get('name')!r}",
                source=src,
                entry=entry,
            )
        entry = f"{entry} ({name})"
        if name in seen:
            raise ConfigError(f"duplicate variable, first defined at {seen[name]}", source=src, entry=entry)
        seen[name] = entry
        value = _scalar_text(item.get("value", ""))
        if value is None:
            raise ConfigError("'value' must be a string", source=src, entry=entry)
        env.append(EnvEntry(name=name, raw=value, segments=parse_value(value, source=src, entry=entry), entry=entry))
    return LocalProcessConfig(
        source=src,
        version=version,
        features=tuple(dict.fromkeys(features)),
        volume_mounts=tuple(mounts),
        env=tuple(env),
        warnings=tuple(warnings),
    )


def evaluate_env(config: LocalProcessConfig, resolvers: Resolvers) -> dict[str, str]:
    """The config's env entries with every token replaced through ``resolvers``."""
    result: dict[str, str] = {}
    for entry in config.env:
        parts: list[str] = []
        for segment in entry.segments:
            try:
                if isinstance(segment, Text):
                    parts.append(segment.text)
                elif isinstance(segment, ServiceToken):
                    parts.append(resolvers.service(segment))
                elif isinstance(segment, VolumeMountToken):
                    parts.append(resolvers.volume_mount(segment.name))
                else:
                    parts.append(resolvers.external_endpoint(segment))
            except LookupError as e:
                raise ConfigError(
                    f"nothing local is mapped for this token ({e}); check the name, or that the service/volume exists",
                    source=config.source,
                    entry=entry.entry,
                    token=_render(segment),
                ) from e
        result[entry.name] = "".join(parts)
    return result


def _render(segment: Segment) -> str:
    if isinstance(segment, ServiceToken):
        return f"$(services:{segment.name}" + (f".{segment.namespace})" if segment.namespace else ")")
    if isinstance(segment, VolumeMountToken):
        return f"$(volumeMounts:{segment.name})"
    if isinstance(segment, ExternalEndpointToken):
        return f"$(externalendpoints:{segment.host}:{','.join(map(str, segment.ports))})"
    return segment.text
