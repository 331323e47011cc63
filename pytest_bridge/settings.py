"""All pytest-bridge settings, and the one place they are resolved.

Every setting has a CLI flag (``--bridge-…``), an ini key (``bridge_…``) and an
environment variable (``PYTEST_BRIDGE_…``). :func:`resolve` applies one precedence,
``marker > CLI > env > ini > default``, per setting: the first source that sets a
value wins whole (list settings are not merged across sources). A bad value raises
``pytest.UsageError`` naming the value, where it came from
and the valid forms.

This module reads only the pytest config and the (injectable) environment mapping;
it must not talk to the cluster or look at the kubeconfig: ``namespace=None`` means
"the kube context's namespace", decided by the cluster layer.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from pytest_bridge.core.bridgesettings import (
    CODE_DELIVERIES,
    DEFAULT_AGENT_IMAGE,
    DEFAULT_ROUTING_IMAGE,
    BridgeSettings,
    ContainerChoice,
    NameMappingMode,
)
from pytest_bridge.core.plan import LocalPortSpec

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_AGENT_IMAGE",
    "BridgeSettings",
    "ContainerChoice",
    "LocalPortSpec",
    "NameMappingMode",
    "add_options",
    "resolve",
]

CONFIG_FILE_NAME = "KubernetesLocalProcessConfig.yaml"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ROUTE_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]{0,19})$")


# --------------------------------------------------------------------------- parsing

T = TypeVar("T")


def _fail(value: object, origin: str, valid: str) -> pytest.UsageError:
    return pytest.UsageError(f"pytest-bridge: invalid value {value!r} from {origin}; expected {valid}")


def _split_list(raw: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", raw) if part]


def _parse_service(raw: str, origin: str) -> str:
    name = raw.strip()
    if not _DNS1035_LABEL.match(name):
        raise _fail(raw, origin, "a Service name (lowercase DNS-1035 label, e.g. 'orders')")
    return name


def _parse_namespace(raw: str, origin: str) -> str:
    name = raw.strip()
    if not _DNS1123_LABEL.match(name):
        raise _fail(raw, origin, "a namespace name (lowercase DNS-1123 label, e.g. 'shop-dev')")
    return name


def _parse_nonempty(raw: str, origin: str) -> str:
    text = raw.strip()
    if not text:
        raise _fail(raw, origin, "a non-empty string")
    return text


def _parse_path(raw: str, origin: str) -> Path:
    return Path(_parse_nonempty(raw, origin)).expanduser()


def _parse_container(raw: str, origin: str) -> ContainerChoice:
    valid = "'CONTAINER' or 'SERVICE=CONTAINER' (e.g. 'app' or 'orders=app')"
    service, sep, container = raw.strip().rpartition("=")
    if not sep:
        service = ""
    if not _DNS1123_LABEL.match(container) or (sep and not _DNS1035_LABEL.match(service)):
        raise _fail(raw, origin, valid)
    return ContainerChoice(container=container, service=service or None)


def _port_number(text: str) -> int | None:
    if not text.isdigit():
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None


def _parse_local_port(raw: str, origin: str) -> LocalPortSpec:
    valid = (
        "'LOCAL', 'TARGET=LOCAL' or 'SERVICE:TARGET=LOCAL' with ports 1-65535 "
        "(e.g. '8080', '9090=8080', 'orders:9090=8080')"
    )
    text = raw.strip()
    service: str | None = None
    if ":" in text:
        service, _, text = text.partition(":")
        if not _DNS1035_LABEL.match(service):
            raise _fail(raw, origin, valid)
    target_text, sep, local_text = text.partition("=")
    if not sep:
        target_text, local_text = "", target_text
    local = _port_number(local_text)
    target = _port_number(target_text) if sep else None
    if local is None or (sep and target is None):
        raise _fail(raw, origin, valid)
    return LocalPortSpec(local_port=local, target_port=target, service=service)


def _parse_mode(raw: str, origin: str) -> NameMappingMode:
    try:
        return NameMappingMode(raw.strip().lower())
    except ValueError:
        raise _fail(raw, origin, "one of " + ", ".join(repr(m.value) for m in NameMappingMode)) from None


TRANSPORTS = ("auto", "kubectl", "websocket")


def _parse_transport(raw: str, origin: str) -> str:
    text = raw.strip().lower()
    if text not in TRANSPORTS:
        raise _fail(raw, origin, "one of " + ", ".join(repr(t) for t in TRANSPORTS))
    return text


def _parse_code(raw: str, origin: str) -> str:
    text = raw.strip().lower()
    if text not in CODE_DELIVERIES:
        raise _fail(raw, origin, "one of " + ", ".join(repr(c) for c in CODE_DELIVERIES))
    return text


def _parse_seconds(raw: str, origin: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise _fail(raw, origin, "a number of seconds greater than 0 (e.g. '60' or '2.5')")
    return seconds


MAX_ROUTE_POOL = 16

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_pool_size(raw: str, origin: str) -> int:
    text = raw.strip()
    if not text.isdigit() or int(text) > MAX_ROUTE_POOL:
        raise _fail(raw, origin, f"a whole number of pods from 0 (no pool) to {MAX_ROUTE_POOL}")
    return int(text)


def _parse_bool(raw: str, origin: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(raw, origin, "a boolean: " + "/".join(sorted(_TRUE)) + " or " + "/".join(sorted(_FALSE)))


def _parse_route_prefix(raw: str, origin: str) -> str:
    text = raw.strip()
    if not _ROUTE_PREFIX.match(text):
        raise _fail(raw, origin, "a lowercase DNS-label prefix of 1-20 characters [a-z0-9-], e.g. 'ci'")
    return text


@dataclass(frozen=True)
class _Setting(Generic[T]):
    attr: str
    help: str
    parse: Callable[[str, str], T]
    multi: bool = False
    metavar: str = "VALUE"
    flag_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dashed(self) -> str:
        return self.attr.replace("_", "-")

    @property
    def flag(self) -> str:
        return f"--bridge-{self.dashed}"

    @property
    def dest(self) -> str:
        return f"bridge_{self.attr}"

    @property
    def ini(self) -> str:
        return f"bridge_{self.attr}"

    @property
    def env(self) -> str:
        return f"PYTEST_BRIDGE_{self.attr.upper()}"


# The attribute name doubles as the marker keyword (`@pytest.mark.bridge(local_port=...)`),
# so the singular is used for repeatable settings.
_SETTINGS: tuple[_Setting[Any], ...] = (
    _Setting(
        "service",
        "Service to bridge into the session (repeatable).",
        _parse_service,
        multi=True,
        metavar="NAME",
    ),
    _Setting("namespace", "Namespace of the service (default: the kube context's).", _parse_namespace, metavar="NS"),
    _Setting("context", "kubeconfig context to use (default: current context).", _parse_nonempty, metavar="CTX"),
    _Setting(
        "kubeconfig",
        "Path of the kubeconfig file (default: $KUBECONFIG or ~/.kube/config).",
        _parse_path,
        metavar="PATH",
    ),
    _Setting(
        "container",
        "Container to replace: NAME, or SERVICE=NAME (repeatable; default: chosen "
        "from the Service's target ports, never a sidecar).",
        _parse_container,
        multi=True,
        metavar="[SVC=]NAME",
    ),
    _Setting(
        "local_port",
        "Local port for a target port: LOCAL (next target port), TARGET=LOCAL or "
        "SERVICE:TARGET=LOCAL (repeatable; default: the same number, or a free port if taken).",
        _parse_local_port,
        multi=True,
        metavar="[SVC:][TARGET=]LOCAL",
    ),
    _Setting(
        "agent_image",
        "Python image the agent, restore guard, routing manager and router control run on; a mirror of the "
        f"default for air-gapped clusters, or with --bridge-code=image one built by `pytest-bridge images build` "
        f"(default: {DEFAULT_AGENT_IMAGE}).",
        _parse_nonempty,
        metavar="IMAGE",
    ),
    _Setting(
        "code",
        "How the in-cluster code reaches its pods: configmap (shipped by the plugin at connect, runs on a stock "
        "Python image) or image (--bridge-agent-image already holds it: `pytest-bridge images build`) "
        "(default: configmap).",
        _parse_code,
        metavar="HOW",
    ),
    _Setting(
        "config_file",
        f"B2K-compatible {CONFIG_FILE_NAME} (default: that file in rootdir, if present).",
        _parse_path,
        metavar="PATH",
    ),
    _Setting(
        "name_mapping",
        "How cluster names resolve locally: auto, in-process, hosts-file, off (default: auto).",
        _parse_mode,
        metavar="MODE",
    ),
    _Setting(
        "connect_timeout",
        "Seconds to wait for the agent and tunnel (default: 60).",
        _parse_seconds,
        metavar="SECONDS",
    ),
    _Setting(
        "restore_ttl",
        "Seconds without a client after which the in-cluster guard restores the workload (default: 60).",
        _parse_seconds,
        metavar="SECONDS",
    ),
    _Setting(
        "isolate",
        "Isolate: leave the workload alone and route only tagged requests (default: false).",
        _parse_bool,
        metavar="BOOL",
        flag_kwargs={"nargs": "?", "const": "true"},
    ),
    _Setting(
        "import_volumes",
        "Fetch every mounted ConfigMap, Secret, projected and downwardAPI volume of the container at connect "
        "(bridged_service.volumes maps each mount path to its local folder); false: only the service-account "
        "token and the volumes KubernetesLocalProcessConfig.yaml names (default: true).",
        _parse_bool,
        metavar="BOOL",
        flag_kwargs={"nargs": "?", "const": "true"},
    ),
    _Setting(
        "route_prefix",
        "Prefix of generated isolation route names (DNS label, <= 20 chars).",
        _parse_route_prefix,
        metavar="PREFIX",
    ),
    _Setting(
        "routing_image",
        f"nginx image of the routers' data plane; a mirror of the default for air-gapped clusters "
        f"(default: {DEFAULT_ROUTING_IMAGE}).",
        _parse_nonempty,
        metavar="IMAGE",
    ),
    _Setting(
        "transport",
        "How the tunnel reaches the agent: kubectl (kubectl port-forward, a lane per connection: fastest), "
        "websocket (the API server's port-forward spoken by the plugin, no binary needed), or auto: kubectl "
        "when a kubectl binary is found (PYTEST_BRIDGE_KUBECTL or PATH), else websocket (default: auto).",
        _parse_transport,
        metavar="NAME",
    ),
    _Setting(
        "routing_idle",
        "Seconds without routes after which a routing manager it deploys removes itself (default: 300).",
        _parse_seconds,
        metavar="SECONDS",
    ),
    _Setting(
        "route_pool",
        "Warm route pods kept ready per routed service, so a new route only claims one (0: none; default: 2). "
        "They are the workload's pod template with the agent, selected by no Service and routed to only once "
        "claimed.",
        _parse_pool_size,
        metavar="N",
    ),
    _Setting(
        "route_pool_idle",
        "Seconds without a new route after which the warm route pods are deleted (default: 120).",
        _parse_seconds,
        metavar="SECONDS",
    ),
)

_FIELD_FOR = {"service": "services", "container": "containers", "local_port": "local_ports"}


def add_options(parser: pytest.Parser) -> None:
    """Register every setting as a ``--bridge-…`` option and a ``bridge_…`` ini key.

    Call from ``pytest_addoption``. CLI defaults are ``None`` so :func:`resolve` can
    tell "not given" from "given".
    """
    group = parser.getgroup("bridge", "pytest-bridge: bridge a Kubernetes service into the session")
    for setting in _SETTINGS:
        extra = f" [env {setting.env}, ini {setting.ini}]"
        kwargs: dict[str, Any] = {
            "dest": setting.dest,
            "default": None,
            "metavar": setting.metavar,
            "help": setting.help + extra,
        }
        if setting.multi:
            kwargs["action"] = "append"
        kwargs.update(setting.flag_kwargs)
        group.addoption(setting.flag, **kwargs)
        ini_help = setting.help + (" Comma- or whitespace-separated list." if setting.multi else "")
        parser.addini(setting.ini, ini_help, type="string", default="")


def _ini_text(value: object) -> str:
    # Native TOML values ([tool.pytest] tables) may arrive as numbers, booleans or lists.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_ini_text(item) for item in value)
    return "" if value is None else str(value)


def _marker_values(value: object) -> list[str]:
    if isinstance(value, list | tuple | set | frozenset):
        return [_ini_text(item) for item in value]
    return [_ini_text(value)]


def _raw_values(
    setting: _Setting[Any],
    config: pytest.Config,
    marker_kwargs: Mapping[str, object],
    env: Mapping[str, str],
) -> tuple[list[str], str] | None:
    """Raw string values of one setting from the winning source, and that source's name."""
    if setting.attr in marker_kwargs:
        values = _marker_values(marker_kwargs[setting.attr])
        return values, f"marker argument {setting.attr}="
    cli = config.getoption(setting.dest, default=None)
    if cli is not None:
        values = [str(v) for v in cli] if setting.multi else [str(cli)]
        if setting.multi:
            values = [part for value in values for part in _split_list(value)]
        return values, setting.flag
    if setting.env in env and env[setting.env].strip():
        raw = env[setting.env]
        return (_split_list(raw) if setting.multi else [raw]), setting.env
    try:
        ini = _ini_text(config.getini(setting.ini))
    except ValueError:
        ini = ""  # Not registered: add_options() was not called for this config.
    if ini.strip():
        return (_split_list(ini) if setting.multi else [ini.strip()]), f"ini {setting.ini}"
    return None


def resolve(
    config: pytest.Config,
    marker_kwargs: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> BridgeSettings:
    """Resolve all settings with precedence marker > CLI > env > ini > default.

    ``marker_kwargs`` are the keyword arguments of a ``bridge`` marker, keyed by the
    setting names of ``add_options`` (``service``, ``local_port``, ...); values may be
    strings, numbers, booleans or lists. ``env`` defaults to ``os.environ``.
    """
    marker_kwargs = dict(marker_kwargs or {})
    known = {setting.attr for setting in _SETTINGS}
    unknown = sorted(set(marker_kwargs) - known)
    if unknown:
        raise pytest.UsageError(
            f"pytest-bridge: unknown bridge marker argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    environ: Mapping[str, str] = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in _SETTINGS:
        found = _raw_values(setting, config, marker_kwargs, environ)
        if found is None:
            continue
        raw_values, origin = found
        field_name = _FIELD_FOR.get(setting.attr, setting.attr)
        sources[field_name] = origin
        if setting.multi:
            parsed = [setting.parse(raw, origin) for raw in raw_values]
            if setting.attr == "service":
                parsed = list(dict.fromkeys(parsed))  # keep order, drop duplicates
            values[field_name] = tuple(parsed)
        else:
            values[field_name] = setting.parse(raw_values[-1], origin)
    # Like other path ini keys, relative paths from the ini file are relative to its directory.
    ini_dir = Path(config.inipath).parent if config.inipath else Path(config.rootpath)
    for path_field in ("kubeconfig", "config_file"):
        path = values.get(path_field)
        if isinstance(path, Path) and not path.is_absolute() and sources[path_field].startswith("ini "):
            values[path_field] = ini_dir / path
    if "config_file" not in values:
        default_config = Path(config.rootpath) / CONFIG_FILE_NAME
        if default_config.is_file():
            values["config_file"] = default_config
            sources["config_file"] = "default (rootdir)"
    if values.get("code") == "image" and "agent_image" not in values:
        raise pytest.UsageError(
            f"pytest-bridge: code=image (from {sources['code']}) runs the code baked into --bridge-agent-image, "
            f"but none is given and the default {DEFAULT_AGENT_IMAGE} is a plain Python image; build and push one "
            "with `pytest-bridge images push --registry REGISTRY` and pass the agent image it prints"
        )
    _fit_connect_timeout_to_ttl(values, sources)
    return BridgeSettings(**values, sources=sources)


def _fit_connect_timeout_to_ttl(values: dict[str, Any], sources: dict[str, str]) -> None:
    """The guard counts the TTL from the moment connect records the session: a connect allowed to
    take longer could be restored under its feet. A default connect timeout shrinks to the TTL;
    one set explicitly and longer than the TTL is a usage error naming both settings."""
    ttl = values.get("restore_ttl", BridgeSettings.restore_ttl)
    timeout = values.get("connect_timeout", BridgeSettings.connect_timeout)
    if ttl >= timeout:
        return
    if "connect_timeout" not in sources:
        values["connect_timeout"] = ttl
        return
    raise pytest.UsageError(
        f"pytest-bridge: --bridge-restore-ttl {ttl:g}s (from {sources.get('restore_ttl', 'default')}) is shorter than "
        f"--bridge-connect-timeout {timeout:g}s (from {sources['connect_timeout']}): the restore guard could undo the "
        "bridge while it is still connecting. Raise the TTL or lower the connect timeout"
    )
