"""Local names and addresses for cluster endpoints.

Each reachable endpoint (a Service of the bridged namespace, a Service of another
namespace named by the config, an external endpoint reached through the agent) gets a
local address, and the names code uses for it (``svc``, ``svc.ns``, ``svc.ns.svc``,
``svc.ns.svc.cluster.local``) are mapped to it. Two address modes:

* ``loopback-ips``: one loopback IP per endpoint from 127.1.1.1 up (skipping .0/.255),
  ports keep their numbers, so names can go into a hosts file or an in-process resolver;
* ``single-ip``: everything on 127.0.0.1 with distinct local ports (no admin rights,
  no aliases needed); code finds them through the regenerated service-link variables.

Also renders, parses and strips the marked hosts-file block of a session, and
regenerates Kubernetes service-link env vars. Pure: the whole new hosts-file content
is returned as a string; writing it (atomically) and probing free ports is the
caller's job.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_bridge.core.errors import NameMappingError

__all__ = [
    "FIRST_LOOPBACK_IP",
    "PUBLIC_SUFFIXES",
    "AddressMode",
    "Endpoint",
    "EndpointPort",
    "HostsBlock",
    "MappedEndpoint",
    "NameMapping",
    "PortMapping",
    "env_name",
    "hostnames_for",
    "loopback_ips",
    "map_endpoints",
    "parse_hosts_blocks",
    "remove_hosts_blocks",
    "render_hosts_block",
    "service_link_env",
    "unsafe_name",
    "update_hosts_text",
]

FIRST_LOOPBACK_IP = "127.1.1.1"
_BEGIN = re.compile(r"^# >>> pytest-bridge session=(?P<session>\S+) >>>\s*$")
_END = re.compile(r"^# <<< pytest-bridge session=(?P<session>\S+) <<<\s*$")


class AddressMode(enum.StrEnum):
    LOOPBACK_IPS = "loopback-ips"
    SINGLE_IP = "single-ip"


@dataclass(frozen=True)
class EndpointPort:
    port: int
    name: str | None = None
    protocol: str = "TCP"


@dataclass(frozen=True)
class Endpoint:
    """A Service (``namespace`` set) or an external host (``namespace=None``)."""

    name: str
    namespace: str | None
    ports: tuple[EndpointPort, ...]
    headless: bool = False  # headless Services get no service-link variables
    # The Service's ClusterIP: the agent dials it directly (no DNS lookup per connection).
    cluster_ip: str | None = field(default=None, compare=False)

    @property
    def is_external(self) -> bool:
        return self.namespace is None

    @classmethod
    def from_service(cls, service: Mapping[str, Any]) -> Endpoint | None:
        """The endpoint of a Service dict; ``None`` if it cannot be mapped (ExternalName, no TCP port)."""
        meta = service.get("metadata") or {}
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            return None
        ports = tuple(
            EndpointPort(int(p["port"]), p.get("name") or None, "TCP")
            for p in spec.get("ports") or []
            if (p.get("protocol") or "TCP") == "TCP"
        )
        if not ports:
            return None
        return cls(
            name=str(meta["name"]),
            namespace=str(meta.get("namespace") or "default"),
            ports=ports,
            headless=spec.get("clusterIP") == "None",
            cluster_ip=spec.get("clusterIP") if spec.get("clusterIP") not in (None, "", "None") else None,
        )

    @classmethod
    def external(cls, host: str, ports: Iterable[int]) -> Endpoint:
        return cls(name=host.lower(), namespace=None, ports=tuple(EndpointPort(p) for p in ports))


@dataclass(frozen=True)
class PortMapping:
    remote_port: int
    local_port: int
    name: str | None = None
    protocol: str = "TCP"


@dataclass(frozen=True)
class MappedEndpoint:
    endpoint: Endpoint
    ip: str
    hostnames: tuple[str, ...]
    ports: tuple[PortMapping, ...]

    def local_port(self, remote_port: int) -> int:
        for mapping in self.ports:
            if mapping.remote_port == remote_port:
                return mapping.local_port
        raise KeyError(f"{self.endpoint.name} has no port {remote_port}")

    @property
    def address(self) -> str:
        """What ``$(services:…)`` becomes: the IP if every port kept its number, else IP:first local port."""
        if all(p.local_port == p.remote_port for p in self.ports):
            return self.ip
        return f"{self.ip}:{self.ports[0].local_port}"


@dataclass(frozen=True)
class NameMapping:
    namespace: str  # the bridged namespace (bare names and service links belong to it)
    mode: AddressMode
    entries: tuple[MappedEndpoint, ...]
    cluster_domain: str = "cluster.local"

    def service(self, name: str, namespace: str | None = None) -> MappedEndpoint:
        """The mapping of a Service; :class:`KeyError` if it is not mapped."""
        namespace = namespace or self.namespace
        for entry in self.entries:
            if entry.endpoint.name == name and entry.endpoint.namespace == namespace:
                return entry
        raise KeyError(f"service {name}.{namespace} is not mapped")

    def external(self, host: str) -> MappedEndpoint:
        for entry in self.entries:
            if entry.endpoint.is_external and entry.endpoint.name == host.lower():
                return entry
        raise KeyError(f"external endpoint {host} is not mapped")

    def resolve(self, hostname: str) -> str | None:
        """The local IP for a host name (case-insensitive, trailing dot allowed), for in-process resolvers."""
        wanted = hostname.lower().rstrip(".")
        for entry in self.entries:
            if wanted in entry.hostnames:
                return entry.ip
        return None


def loopback_ips(first: str = FIRST_LOOPBACK_IP) -> Iterator[str]:
    """127.1.1.1, 127.1.1.2, … 127.1.1.254, 127.1.2.1, …: never a .0 or .255 last octet."""
    address = ipaddress.IPv4Address(first)
    if not address.is_loopback:
        raise NameMappingError(f"{first} is not a loopback address")
    last = ipaddress.IPv4Address("127.255.255.254")
    while address <= last:
        if int(address) & 0xFF not in (0, 255):
            yield str(address)
        address += 1


# Names that mean this machine (RFC 6761): a Service called "localhost" must not take them over.
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "broadcasthost", "ip6-localhost", "ip6-loopback"})
# Top-level domains in wide use: ``svc.ns`` with such a namespace is a public name (a Service "api"
# in namespace "com" would be "api.com"), so only the ``.svc`` forms are mapped. Two-letter
# namespaces are treated as country-code domains. Not every TLD: the most used ones.
PUBLIC_SUFFIXES = frozenset(
    {"com", "net", "org", "edu", "gov", "mil", "int", "info", "biz", "io", "dev", "app", "ai", "xyz", "cloud", "page",
     "online", "site", "tech", "arpa", "local", "internal"}
)  # fmt: skip


def unsafe_name(name: str) -> str | None:
    """Why ``name`` must not be mapped to a cluster address, or None if it may."""
    lowered = name.lower().rstrip(".")
    if lowered in _LOCAL_NAMES or lowered.endswith(".localhost"):
        return "it names this machine"
    labels = lowered.split(".")
    if len(labels) == 2 and (labels[1] in PUBLIC_SUFFIXES or (len(labels[1]) == 2 and labels[1].isalpha())):
        return f"it is a public domain name (.{labels[1]})"
    return None


def hostnames_for(endpoint: Endpoint, namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """Names code may use for ``endpoint``; the bare name only in the bridged namespace.

    Names that would take over this machine's own names or a public domain are left out
    (:func:`unsafe_name`): a Service called ``localhost``, or ``svc.ns`` when ``ns`` is a
    top-level domain; the ``.svc`` forms still reach the service.
    """
    if endpoint.is_external:
        return (endpoint.name,)
    qualified = f"{endpoint.name}.{endpoint.namespace}"
    names = [qualified, f"{qualified}.svc", f"{qualified}.svc.{cluster_domain}"]
    if endpoint.namespace == namespace:
        names.insert(0, endpoint.name)
    return tuple(name for name in names if unsafe_name(name) is None)


def _merge(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    merged: dict[tuple[str, str | None], Endpoint] = {}
    for endpoint in endpoints:
        key = (endpoint.name, endpoint.namespace)
        if key in merged:
            known = merged[key]
            numbers = {p.port for p in known.ports}
            extra = tuple(p for p in endpoint.ports if p.port not in numbers)
            merged[key] = Endpoint(known.name, known.namespace, known.ports + extra, known.headless)
        else:
            merged[key] = endpoint
    return list(merged.values())


def map_endpoints(
    endpoints: Iterable[Endpoint],
    namespace: str,
    *,
    mode: AddressMode = AddressMode.LOOPBACK_IPS,
    first_ip: str = FIRST_LOOPBACK_IP,
    cluster_domain: str = "cluster.local",
    allocate_port: Callable[[int], int] | None = None,
    address_free: Callable[[str, int], bool] | None = None,
) -> NameMapping:
    """Give every endpoint a local address and its names.

    ``allocate_port(remote_port)`` returns a free local port; it is required in
    ``single-ip`` mode, and optional in ``loopback-ips`` mode (default: the same number).
    ``address_free(ip, port)``, in ``loopback-ips`` mode, lets an IP be skipped when one of
    the endpoint's local ports is taken there (another session on this machine).
    Endpoints named twice are merged. Raises :class:`NameMappingError` on a name
    claimed by two endpoints or a local address handed out twice.
    """
    if mode is AddressMode.SINGLE_IP and allocate_port is None:
        raise NameMappingError("single-ip mode needs allocate_port to assign distinct free ports")
    ips = loopback_ips(first_ip)
    owners: dict[str, str] = {}
    used: dict[tuple[str, int], str] = {}
    entries: list[MappedEndpoint] = []
    for endpoint in _merge(endpoints):
        label = endpoint.name if endpoint.is_external else f"{endpoint.name}.{endpoint.namespace}"
        locals_ = [allocate_port(port.port) if allocate_port is not None else port.port for port in endpoint.ports]
        if mode is AddressMode.SINGLE_IP:
            ip = "127.0.0.1"
        else:
            try:
                ip = next(ips)
                while address_free is not None and not all(address_free(ip, local) for local in locals_):
                    ip = next(ips)
            except StopIteration:
                raise NameMappingError("ran out of loopback addresses") from None
        names = hostnames_for(endpoint, namespace, cluster_domain)
        for name in names:
            if name in owners:
                raise NameMappingError(f"name {name!r} is claimed by both {owners[name]} and {label}")
            owners[name] = label
        ports: list[PortMapping] = []
        for port, local in zip(endpoint.ports, locals_, strict=True):
            if (ip, local) in used:
                raise NameMappingError(
                    f"local address {ip}:{local} was handed out for both {used[(ip, local)]} and "
                    f"{label}:{port.port}; the port allocator must return distinct free ports"
                )
            used[(ip, local)] = f"{label}:{port.port}"
            ports.append(PortMapping(port.port, local, port.name, port.protocol))
        entries.append(MappedEndpoint(endpoint, ip, names, tuple(ports)))
    return NameMapping(namespace, mode, tuple(entries), cluster_domain)


# --------------------------------------------------------------------------- hosts file


@dataclass(frozen=True)
class HostsBlock:
    session_id: str
    entries: tuple[tuple[str, tuple[str, ...]], ...]  # (ip, names)
    first_line: int  # 0-based index of the begin marker
    last_line: int  # 0-based index of the end marker


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def render_hosts_block(mapping: NameMapping, session_id: str, *, newline: str = "\n") -> str:
    """The marked block for ``session_id`` (ends with a newline)."""
    if mapping.mode is not AddressMode.LOOPBACK_IPS:
        raise NameMappingError("a hosts file cannot remap ports; use loopback-ips mode for hosts-file mapping")
    if not re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]*", session_id):
        raise NameMappingError(f"session id {session_id!r} cannot be used in a hosts-file marker")
    lines = [
        f"# >>> pytest-bridge session={session_id} >>>",
        "# Added by pytest-bridge for a test session and removed when it ends; "
        "safe to delete if that session is not running.",
    ]
    lines += [f"{entry.ip}\t{' '.join(entry.hostnames)}" for entry in mapping.entries]
    lines.append(f"# <<< pytest-bridge session={session_id} <<<")
    return newline.join(lines) + newline


def parse_hosts_blocks(text: str) -> list[HostsBlock]:
    """All pytest-bridge blocks in a hosts file; :class:`NameMappingError` if one is broken."""
    blocks: list[HostsBlock] = []
    current: str | None = None
    start = 0
    entries: list[tuple[str, tuple[str, ...]]] = []
    for number, line in enumerate(text.splitlines()):
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if current is not None:
                raise NameMappingError(
                    f"hosts file line {number + 1}: block of session {begin['session']} starts inside the "
                    f"unterminated block of session {current} (line {start + 1}); "
                    "remove the stray lines by hand"
                )
            current, start, entries = begin["session"], number, []
        elif end:
            if current is None or current != end["session"]:
                raise NameMappingError(
                    f"hosts file line {number + 1}: end marker of session {end['session']} without its begin "
                    "marker; remove the stray lines by hand"
                )
            blocks.append(HostsBlock(current, tuple(entries), start, number))
            current = None
        elif current is not None:
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2:
                entries.append((fields[0], tuple(fields[1:])))
    if current is not None:
        raise NameMappingError(
            f"hosts file line {start + 1}: block of session {current} has no end marker; remove it by hand"
        )
    return blocks


def remove_hosts_blocks(text: str, session_ids: Collection[str] | None = None) -> str:
    """``text`` without the blocks of ``session_ids`` (all pytest-bridge blocks if ``None``)."""
    drop: set[int] = set()
    for block in parse_hosts_blocks(text):
        if session_ids is None or block.session_id in session_ids:
            drop.update(range(block.first_line, block.last_line + 1))
    if not drop:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(line for number, line in enumerate(lines) if number not in drop)


def update_hosts_text(text: str, mapping: NameMapping, session_id: str) -> str:
    """The whole new hosts-file content: ``text`` with this session's block replaced (or added)."""
    newline = _newline(text)
    kept = remove_hosts_blocks(text, {session_id})
    if not mapping.entries:
        return kept
    if kept and not kept.endswith(("\n", "\r")):
        kept += newline
    return kept + render_hosts_block(mapping, session_id, newline=newline)


# --------------------------------------------------------------------------- service links


def env_name(name: str) -> str:
    """Kubernetes' env-var form of a name: upper case, dashes to underscores."""
    return name.upper().replace("-", "_")


def _links(prefix: str, host: str, ports: Sequence[PortMapping]) -> dict[str, str]:
    env: dict[str, str] = {}
    first = ports[0]
    env[f"{prefix}_SERVICE_HOST"] = host
    env[f"{prefix}_SERVICE_PORT"] = str(first.local_port)
    for port in ports:
        if port.name:
            env[f"{prefix}_SERVICE_PORT_{env_name(port.name)}"] = str(port.local_port)
    proto = first.protocol.lower()
    env[f"{prefix}_PORT"] = f"{proto}://{host}:{first.local_port}"
    for port in ports:
        proto = port.protocol.lower()
        key = f"{prefix}_PORT_{port.remote_port}_{port.protocol.upper()}"
        env[key] = f"{proto}://{host}:{port.local_port}"
        env[f"{key}_PROTO"] = proto
        env[f"{key}_PORT"] = str(port.local_port)
        env[f"{key}_ADDR"] = host
    return env


def service_link_env(mapping: NameMapping) -> dict[str, str]:
    """Service-link variables as Kubernetes forms them, pointing at the local mapping.

    Covers the non-headless Services of the bridged namespace, plus ``kubernetes`` in
    ``default`` (Kubernetes injects that one into every pod). Variable names keep the
    cluster port numbers; values carry the local address and port.
    """
    env: dict[str, str] = {}
    for entry in mapping.entries:
        endpoint = entry.endpoint
        if endpoint.is_external or endpoint.headless or not entry.ports:
            continue
        in_namespace = endpoint.namespace == mapping.namespace
        is_master = endpoint.name == "kubernetes" and endpoint.namespace == "default"
        if in_namespace or is_master:
            env.update(_links(env_name(endpoint.name), entry.ip, entry.ports))
    return env
