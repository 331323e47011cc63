"""The resolved settings of a bridge session, as plain values.

Resolving them (flags, ini keys, environment, markers; ``pytest.UsageError`` for a bad value)
is the pytest face's job (``pytest_bridge.settings``); this module is what the layers below it
read, so none of them imports pytest. No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_bridge_agent.runtime import DEFAULT_NGINX_IMAGE, DEFAULT_PYTHON_IMAGE

from pytest_bridge.core.plan import LocalPortSpec

__all__ = [
    "CODE_DELIVERIES",
    "DEFAULT_AGENT_IMAGE",
    "DEFAULT_ROUTING_IMAGE",
    "BridgeSettings",
    "ContainerChoice",
    "NameMappingMode",
]

# Stock public images: the plugin ships its own code at connect (see pytest_bridge_agent.runtime).
DEFAULT_AGENT_IMAGE = DEFAULT_PYTHON_IMAGE
DEFAULT_ROUTING_IMAGE = DEFAULT_NGINX_IMAGE
CODE_DELIVERIES = ("configmap", "image")


class NameMappingMode(enum.StrEnum):
    """How cluster names are made resolvable for the code under test."""

    AUTO = "auto"
    IN_PROCESS = "in-process"
    HOSTS_FILE = "hosts-file"
    OFF = "off"


@dataclass(frozen=True)
class ContainerChoice:
    """``--bridge-container``: ``container`` for every service, or ``service=container``."""

    container: str
    service: str | None = None


@dataclass(frozen=True)
class BridgeSettings:
    """Resolved settings; see :func:`add_options` for what each one means."""

    services: tuple[str, ...] = ()
    namespace: str | None = None
    context: str | None = None
    kubeconfig: Path | None = None
    containers: tuple[ContainerChoice, ...] = ()
    local_ports: tuple[LocalPortSpec, ...] = ()
    agent_image: str = DEFAULT_AGENT_IMAGE
    config_file: Path | None = None
    name_mapping: NameMappingMode = NameMappingMode.AUTO
    connect_timeout: float = 60.0
    restore_ttl: float = 60.0
    isolate: bool = False
    # Mounted ConfigMap/Secret/projected/downwardAPI volumes are fetched at connect (not only those
    # a KubernetesLocalProcessConfig.yaml names): bridged_service.volumes maps each mount path.
    import_volumes: bool = True
    route_prefix: str | None = None
    routing_image: str = DEFAULT_ROUTING_IMAGE
    routing_idle: float = 300.0
    route_pool: int = 2  # warm route pods kept per routed service (0: none)
    route_pool_idle: float = 120.0  # seconds without a new route after which the warm pods go
    transport: str = "auto"
    code: str = "configmap"  # how the in-cluster code reaches its pods: CODE_DELIVERIES
    # Where each non-default value came from ("--bridge-service", "PYTEST_BRIDGE_SERVICE", ...),
    # for the report header and for errors raised later (e.g. by the plan).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def container_for(self, service: str) -> str | None:
        """The container asked for ``service``: a scoped choice wins over an unscoped one."""
        scoped = [c.container for c in self.containers if c.service == service]
        if scoped:
            return scoped[-1]
        unscoped = [c.container for c in self.containers if c.service is None]
        return unscoped[-1] if unscoped else None

    def local_ports_for(self, service: str) -> tuple[LocalPortSpec, ...]:
        """Local port specs that apply to ``service`` (scoped ones and unscoped ones)."""
        return tuple(spec for spec in self.local_ports if spec.service in (None, service))
