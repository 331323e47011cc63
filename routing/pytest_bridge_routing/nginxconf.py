"""The nginx configuration of one service's router: pure data in, ``nginx.conf`` text out.

A router takes over a Service's selector. Per Service port it listens on the port's target port
and sends each request to one backend:

- header ``kubernetes-route-as: <route>`` naming a known route -> that route's clone pod;
- no header, but ``Host: <route>.<ingress host>`` -> the header is added, then as above;
- anything else (no route, an unknown route, any TCP port) -> the default backend, a clone
  Service with the original selector.

The effective route is sent upstream as ``kubernetes-route-as`` (never an empty header). Header
values are matched like every nginx ``map`` string: ignoring case. Each request is logged as one
JSON object per line (:data:`LOG_FIELDS`) to ``<runtime_dir>/access.log``, which the router process
(:mod:`pytest_bridge_routing.router`) tails for ``/stats``.

Stdlib only, no I/O: the routing manager renders and compares configs with it, the router runs
them. Written for nginx 1.22 (Debian bookworm ``nginx-light`` + ``libnginx-mod-stream``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCESS_LOG",
    "CONF_FILE",
    "DEFAULT_MODULES_DIR",
    "DEFAULT_RUNTIME_DIR",
    "DEFAULT_STATS_PORT",
    "ERROR_LOG",
    "LOG_FIELDS",
    "PID_FILE",
    "PROTOCOLS",
    "ROUTER_PROBE_HEADER",
    "ROUTER_PROBE_PATH",
    "ROUTE_HEADER",
    "RouterPort",
    "RouterSpec",
    "is_route_name",
    "protocol_for",
    "render",
    "validate_spec",
]

ROUTE_HEADER = "kubernetes-route-as"
ROUTER_PROBE_PATH = "/.pytest-bridge/router"  # the router answers it itself: 204 with ROUTER_PROBE_HEADER
ROUTER_PROBE_HEADER = "x-pytest-bridge-router"  # value: the service the router stands in for
PROTOCOLS = ("http", "grpc", "tcp")
DEFAULT_STATS_PORT = 47180
DEFAULT_RUNTIME_DIR = "/tmp/pytest-bridge-router"
DEFAULT_MODULES_DIR = "/usr/lib/nginx/modules"
# Where Debian's nginx packages enable dynamic modules (the stream module among them). The official
# nginx image has the stream module built in and no such folder: the glob then matches nothing.
MODULES_ENABLED = "/etc/nginx/modules-enabled/*.conf"
# File names under the runtime directory.
CONF_FILE = "nginx.conf"
PID_FILE = "nginx.pid"
ERROR_LOG = "error.log"
ACCESS_LOG = "access.log"
# The keys of each access-log line (a JSON object; every value a string, "" when unknown):
# time (epoch seconds, ms resolution), remote_addr, header (the received kubernetes-route-as, ""
# when absent), route (the effective route), host, upstream (address(es) tried), status,
# request_time (seconds), port (the router port), proto (http | grpc | tcp).
LOG_FIELDS = ("time", "remote_addr", "header", "route", "host", "upstream", "status", "request_time", "port", "proto")

_LONG = "3600s"  # streams, WebSockets and slow uploads may be quiet or long for this long
_CONNECT = "10s"
_KEEPALIVE_CONNECTIONS = 32
# Below the 5 s idle timeout of Node.js servers (the shortest common one): an upstream closing an
# idle keep-alive connection just as nginx reuses it would fail a non-idempotent request.
_KEEPALIVE_TIMEOUT = "4s"
# Old workers of a reload keep serving their open connections (streams, WebSockets) this long.
_WORKER_SHUTDOWN = "10m"

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS_LABEL_PATTERN = "[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"  # same as _DNS_LABEL, for nginx (PCRE)
_PORT_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_PATH = re.compile(r"/[^\s\"'\\$;{}#]*")
_MAP_KEYWORDS = frozenset({"default", "hostnames", "include", "volatile"})


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterPort:
    name: str  # Service port name ('' allowed)
    listen: int  # the router listens here == the target port on the original and the clone pods
    protocol: str  # "http" | "grpc" | "tcp"
    default_upstream: str  # "ip:port" of the default backend (clone Service ClusterIP:service port)


@dataclass(frozen=True)
class RouterSpec:
    service: str
    namespace: str
    ports: tuple[RouterPort, ...]
    routes: Mapping[str, str] = field(default_factory=dict)  # route -> clone pod IP ("<ip>:<listen>")
    hosts: tuple[str, ...] = ()  # ingress hosts: Host "<route>.<host>" (any port suffix) adds the header
    stats_port: int = DEFAULT_STATS_PORT  # the router process's /healthz and /stats, not nginx
    generation: int = 0


# --- validation ------------------------------------------------------------------------------


def is_route_name(name: str) -> bool:
    """A route name is a DNS label: lowercase letters, digits and '-', 1-63 characters."""
    return isinstance(name, str) and _DNS_LABEL.fullmatch(name) is not None


def _ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:  # "fe80::1%<anything>"
        raise ValueError(f"{what}: {value!r} is not an IP address without a scope")
    return ip


def _port_number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what}: {value!r} is not a port number (1-65535)")
    return value


def _split_address(address: str, what: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``ip:port`` or ``[ipv6]:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what}: {address!r} is not 'ip:port'")
    if host.startswith("[") and host.endswith("]"):
        ip = _ip(host[1:-1], what)
        if ip.version != 6:
            raise ValueError(f"{what}: {address!r}: only IPv6 addresses go in brackets")
    else:
        ip = _ip(host, what)
        if ip.version == 6:
            raise ValueError(f"{what}: {address!r}: write an IPv6 address as [ip]:port")
    return ip, _port_number(int(port), what)


def _hostport(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _host(host: str) -> str:
    """An ingress host (DNS name), lowercased; ValueError for wildcards, IPs and bad names."""
    name = host.lower() if isinstance(host, str) else ""
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"ingress host {host!r} is not a DNS name (wildcard hosts cannot carry routes)")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"ingress host {host!r} is an IP address, not a DNS name")
    return name


def _path(value: str, what: str) -> str:
    if not _PATH.fullmatch(value):
        raise ValueError(
            f"{what}: {value!r} must be an absolute path without spaces, quotes, '$', ';', '{{', '}}', '#'"
        )
    return value.rstrip("/") or "/"


def validate_spec(spec: RouterSpec) -> None:
    """ValueError naming the first thing :func:`render` cannot put into a config."""
    for what, name in (("service", spec.service), ("namespace", spec.namespace)):
        if not is_route_name(name):
            raise ValueError(f"{what} {name!r} is not a DNS label")
    _port_number(spec.stats_port, "stats_port")
    if isinstance(spec.generation, bool) or not isinstance(spec.generation, int) or spec.generation < 0:
        raise ValueError(f"generation {spec.generation!r} is not a non-negative integer")
    seen: dict[int, str] = {}
    for port in spec.ports:
        what = f"port {port.name or port.listen!r}"
        if port.name and not (len(port.name) <= 63 and _PORT_NAME.fullmatch(port.name)):
            raise ValueError(f"{what}: name {port.name!r} is not a Service port name")
        listen = _port_number(port.listen, f"{what}: listen")
        if listen in seen:
            raise ValueError(f"{what}: listen port {listen} is also the listen port of port {seen[listen]!r}")
        if listen == spec.stats_port:
            raise ValueError(f"{what}: listen port {listen} is the router's stats port")
        seen[listen] = port.name or str(listen)
        if port.protocol not in PROTOCOLS:
            raise ValueError(f"{what}: protocol {port.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        _split_address(port.default_upstream, f"{what}: default_upstream")
    for route, ip in spec.routes.items():
        if not is_route_name(route):
            raise ValueError(f"route name {route!r} is not a DNS label (lowercase a-z, 0-9, '-'; at most 63)")
        if not isinstance(ip, str):
            raise ValueError(f"route {route!r}: {ip!r} is not an IP address")  # noqa: TRY004 - one error type
        _ip(ip, f"route {route!r}")
    for host in spec.hosts:
        _host(host)


# --- protocols -------------------------------------------------------------------------------

_HTTP_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/ws", "ws", "grpc-web"})
_GRPC_APP_PROTOCOLS = frozenset({"grpc", "kubernetes.io/h2c", "h2c"})


def protocol_for(port: Mapping[str, Any]) -> str:
    """How the router handles a Kubernetes ServicePort (API dict): "http", "grpc" or "tcp".

    ``appProtocol`` decides when set (``http``, ``kubernetes.io/ws``, ``grpc-web`` -> http;
    ``grpc``, ``kubernetes.io/h2c`` -> grpc; anything else, e.g. ``https`` or ``mysql`` -> tcp),
    else the port name convention (``http``, ``http-*``, ``web*``, ``grpc-web*`` -> http;
    ``grpc``, ``grpc-*``, ``h2c*`` -> grpc; else tcp). TCP ports are passed through to the default
    backend: there is nothing to route on. UDP and SCTP cannot go through the router: ValueError.
    """
    protocol = str(port.get("protocol") or "TCP").upper()
    if protocol != "TCP":
        raise ValueError(f"port {port.get('name') or port.get('port')!r}: {protocol} cannot be routed (only TCP)")
    app = str(port.get("appProtocol") or "").lower()
    if app:
        if app in _HTTP_APP_PROTOCOLS:
            return "http"
        if app in _GRPC_APP_PROTOCOLS:
            return "grpc"
        return "tcp"
    name = str(port.get("name") or "").lower()
    if name == "http" or name.startswith(("http-", "web", "grpc-web")):
        return "http"
    if name == "grpc" or name.startswith(("grpc-", "h2c")):
        return "grpc"
    return "tcp"


# --- the host rule ---------------------------------------------------------------------------


def _host_regex(hosts: Sequence[str]) -> str:
    """PCRE for ``$host`` (lowercase, no port, no trailing dot): group 1 is the route."""
    # Hosts are [a-z0-9.-] only: '.' is the one character to escape.
    alternatives = "|".join(h.replace(".", "\\.") for h in sorted({_host(h) for h in hosts}))
    return f"^({_DNS_LABEL_PATTERN})\\.(?:{alternatives})$"


# --- rendering -------------------------------------------------------------------------------


def _map_key(value: str) -> str:
    # A map source equal to a map keyword must be escaped, else `default` would be the default.
    return f"\\{value}" if value in _MAP_KEYWORDS else value


def _upstream_name(listen: int, route: str | None) -> str:
    # Named upstreams: proxy_pass/grpc_pass with a variable look the name up among them first.
    # These can never be a real host name (underscores), so no resolver is ever asked.
    return f"bridge_{listen}_default" if route is None else f"bridge_{listen}_route_{route}"


def _log_format(name: str, proto: str, *, stream: bool) -> str:
    values = {
        "time": "$msec",
        "remote_addr": "$remote_addr",
        "header": "" if stream else "$http_kubernetes_route_as",
        "route": "" if stream else "$bridge_route",
        "host": "" if stream else "$host",
        "upstream": "$upstream_addr",
        "status": "$status",
        "request_time": "$session_time" if stream else "$request_time",
        "port": "$server_port",
        "proto": proto,
    }
    body = ",".join(f'"{key}":"{values[key]}"' for key in LOG_FIELDS)
    return f"log_format {name} escape=json '{{{body}}}';"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append(("    " * self.depth + line) if line else "")

    def open(self, head: str) -> None:
        self(f"{head} {{")
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        self("}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(
    spec: RouterSpec,
    *,
    runtime_dir: str = DEFAULT_RUNTIME_DIR,
    modules_dir: str | None = None,
    listen_address: str = "",
) -> str:
    """The complete ``nginx.conf`` of ``spec``; ValueError if the spec is not valid.

    Deterministic (ports sorted by listen port, routes and hosts sorted), so equal specs give equal
    text. Run it with ``nginx -g 'daemon off;' -c <file>`` (as the router does);
    every file nginx writes is under ``runtime_dir``. TCP ports need the stream module: loaded from
    ``modules_dir`` when given, else whatever :data:`MODULES_ENABLED` enables (Debian's packages;
    built into the official nginx image). ``listen_address`` (an IP) restricts the
    listeners to one address, for tests whose backends use the same ports on other loopback
    addresses; by default the router listens on every address.
    """
    validate_spec(spec)
    run = _path(runtime_dir, "runtime_dir")
    modules = _path(modules_dir, "modules_dir") if modules_dir is not None else None
    bind = _ip(listen_address, "listen_address") if listen_address else None
    ports = sorted(spec.ports, key=lambda p: p.listen)
    routes = {name: _ip(spec.routes[name], f"route {name!r}") for name in sorted(spec.routes)}
    http_ports = [p for p in ports if p.protocol in ("http", "grpc")]
    tcp_ports = [p for p in ports if p.protocol == "tcp"]
    addresses = [_split_address(p.default_upstream, "default_upstream")[0] for p in ports] + list(routes.values())
    ipv6 = any(ip.version == 6 for ip in addresses)

    def listen(port: int, extra: str = "") -> str:
        # An IPv6 cluster (any IPv6 backend) gets a dual-stack listener; else IPv4 only, which works
        # even where IPv6 is disabled.
        if bind is not None:
            return f"listen {_hostport(bind, port)}{extra};"
        where = f"[::]:{port} ipv6only=off" if ipv6 else str(port)
        return f"listen {where}{extra};"

    out = _Out()
    out(f"# pytest-bridge router for service {spec.namespace}/{spec.service}, generation {spec.generation}")
    out("# Rendered by pytest_bridge_routing.nginxconf and run by pytest_bridge_routing.router; do not edit.")
    for port in ports:
        out(f"#   port {port.name or '-'} {port.listen}/{port.protocol} default -> {port.default_upstream}")
    for name, ip in routes.items():
        out(f"#   route {name} -> {ip}")
    for host in sorted({_host(h) for h in spec.hosts}):
        out(f"#   host <route>.{host}")
    out(f"#   /healthz and /stats: the router process on port {spec.stats_port}")
    out()
    if tcp_ports:
        out(f"load_module {modules}/ngx_stream_module.so;" if modules else f"include {MODULES_ENABLED};")
    out("worker_processes 1;")
    out(f"worker_shutdown_timeout {_WORKER_SHUTDOWN};")
    out("pcre_jit on;")
    out(f"pid {run}/{PID_FILE};")
    out(f"error_log {run}/{ERROR_LOG} warn;")
    out()
    out.open("events")
    out("worker_connections 4096;")
    out.close()
    out()
    out.open("http")
    for module in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        out(f"{module}_temp_path {run}/{module.replace('client_', '')}_temp;")
    out(_log_format("bridge_http", "http", stream=False))
    out(_log_format("bridge_grpc", "grpc", stream=False))
    out(f"access_log {run}/{ACCESS_LOG} bridge_http;")
    out("server_tokens off;")
    out("underscores_in_headers on;")
    out("merge_slashes off;")
    out("large_client_header_buffers 8 64k;")
    out("client_max_body_size 0;")
    out(f"client_body_timeout {_LONG};")
    out(f"send_timeout {_LONG};")
    out("keepalive_requests 10000;")
    out("map_hash_bucket_size 128;")  # route names are up to 63 characters
    out("map_hash_max_size 16384;")
    out()
    out("# The effective route: the received header, else the route in the Host name.")
    out.open("map $host $bridge_host_route")
    out('default "";')
    if spec.hosts:
        out(f'"~{_host_regex(spec.hosts)}" $1;')
    out.close()
    header_variable = "$http_" + ROUTE_HEADER.replace("-", "_")
    out.open(f"map {header_variable} $bridge_route")
    out('"" $bridge_host_route;')
    out(f"default {header_variable};")
    out.close()
    out.open("map $http_upgrade $bridge_connection")
    out("default upgrade;")
    out('"" "";')  # no Connection header: the upstream connection is kept alive
    out.close()
    out.open("map $http_host $bridge_host_header")
    out('"" $host;')  # an HTTP/1.0 request without Host
    out("default $http_host;")
    out.close()
    for port in http_ports:
        out()
        out(f"# port {port.name or '-'} {port.listen} ({port.protocol})")
        out.open(f"map $bridge_route $bridge_upstream_{port.listen}")
        out(f"default {_upstream_name(port.listen, None)};")
        for name in routes:
            out(f"{_map_key(name)} {_upstream_name(port.listen, name)};")
        out.close()
        default_ip, default_port = _split_address(port.default_upstream, "default_upstream")
        backends: list[tuple[str | None, str]] = [(None, _hostport(default_ip, default_port))]
        backends += [(name, _hostport(ip, port.listen)) for name, ip in routes.items()]
        for route, address in backends:
            out.open(f"upstream {_upstream_name(port.listen, route)}")
            out(f"server {address};")
            out(f"keepalive {_KEEPALIVE_CONNECTIONS};")
            out(f"keepalive_timeout {_KEEPALIVE_TIMEOUT};")
            out.close()
        out.open("server")
        if port.protocol == "grpc":
            out(listen(port.listen, " http2"))
            out(f"access_log {run}/{ACCESS_LOG} bridge_grpc;")
            out(f"grpc_set_header {ROUTE_HEADER} $bridge_route;")
            out("grpc_set_header Host $bridge_host_header;")
            out("grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
            out(f"grpc_connect_timeout {_CONNECT};")
            out(f"grpc_read_timeout {_LONG};")
            out(f"grpc_send_timeout {_LONG};")
            out("grpc_buffer_size 64k;")
            out.open("location /")
            out(f"grpc_pass grpc://$bridge_upstream_{port.listen};")
            out.close()
        else:
            out(listen(port.listen))
            out(f"proxy_set_header {ROUTE_HEADER} $bridge_route;")
            out("proxy_set_header Host $bridge_host_header;")
            out("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
            out("proxy_set_header Upgrade $http_upgrade;")
            out("proxy_set_header Connection $bridge_connection;")
            out("proxy_http_version 1.1;")
            out("proxy_buffering off;")
            out("proxy_request_buffering off;")
            out("proxy_buffer_size 64k;")  # large response headers (cookies, tokens)
            out("proxy_buffers 4 64k;")
            out("proxy_busy_buffers_size 128k;")
            out("proxy_redirect off;")
            out("proxy_pass_header Server;")
            out("proxy_pass_header Date;")
            out(f"proxy_connect_timeout {_CONNECT};")
            out(f"proxy_read_timeout {_LONG};")
            out(f"proxy_send_timeout {_LONG};")
            # Answered by the router itself: whoever dials the Service can tell it reached the
            # router, not the pods it replaced (the plugin's proof that <route>.<host> works).
            out.open(f"location = {ROUTER_PROBE_PATH}")
            out(f"add_header {ROUTER_PROBE_HEADER} {spec.service} always;")
            out("return 204;")
            out.close()
            out.open("location /")
            out(f"proxy_pass http://$bridge_upstream_{port.listen};")
            out.close()
        out.close()
    out.close()
    if tcp_ports:
        out()
        out("# TCP ports carry no header: always the default backend.")
        out.open("stream")
        out(_log_format("bridge_tcp", "tcp", stream=True))
        out(f"access_log {run}/{ACCESS_LOG} bridge_tcp;")
        out(f"proxy_connect_timeout {_CONNECT};")
        out(f"proxy_timeout {_LONG};")
        out("proxy_half_close on;")
        for port in tcp_ports:
            out()
            out(f"# port {port.name or '-'} {port.listen} (tcp)")
            default_ip, default_port = _split_address(port.default_upstream, "default_upstream")
            out.open(f"upstream {_upstream_name(port.listen, None)}")
            out(f"server {_hostport(default_ip, default_port)};")
            out.close()
            out.open("server")
            out(listen(port.listen))
            out(f"proxy_pass {_upstream_name(port.listen, None)};")
            out.close()
        out.close()
    return out.text()


def sidecar_command(runtime_dir: str = DEFAULT_RUNTIME_DIR) -> list[str]:
    """The nginx container's command in a router pod: wait for the router's config, then run it.

    The router process (the pod's other container) writes ``nginx.conf`` into the shared
    ``runtime_dir`` once it has read its ConfigMap; a restarted container finds it at once.
    Only ``sh`` and ``sleep`` besides nginx: the official image (Debian or Alpine) has both.
    """
    run = _path(runtime_dir, "runtime_dir")
    script = (
        f'run="{run}"; until [ -s "$run/{CONF_FILE}" ]; do sleep 0.05; done; '
        f'exec nginx -e "$run/{ERROR_LOG}" -g \'daemon off;\' -p "$run/" -c "$run/{CONF_FILE}"'
    )
    return ["/bin/sh", "-c", script]
