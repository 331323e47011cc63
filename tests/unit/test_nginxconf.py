"""The router's nginx config (pytest_bridge_routing.nginxconf) and the router process's pure parts."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pytest_bridge_routing import accesslog, nginxconf, nginxproc
from pytest_bridge_routing import router as r
from pytest_bridge_routing.nginxconf import (
    LOG_FIELDS,
    RouterPort,
    RouterSpec,
    is_route_name,
    protocol_for,
    render,
    validate_spec,
)

HTTP = RouterPort("http", 8080, "http", "10.96.0.10:80")
GRPC = RouterPort("grpc-api", 9090, "grpc", "10.96.0.10:90")
TCP = RouterPort("", 5432, "tcp", "10.96.0.10:5432")
ROUTES = {"feature-x": "10.244.0.7", "ci-3f9a": "10.244.0.8"}


def route_from_host(host: str, hosts: Sequence[str]) -> str | None:
    """The route that the router's host rule should take from a Host header value, if any.

    What nginx does: ``$host`` is the Host header lowercased, without a port or a trailing dot.
    """
    if not hosts:
        return None
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal is no ingress host
        return None
    name = name.partition(":")[0].removesuffix(".")
    match = re.fullmatch(nginxconf._host_regex(hosts), name)
    return match.group(1) if match else None


def spec(**changes: Any) -> RouterSpec:
    fields: dict[str, Any] = {
        "service": "orders",
        "namespace": "shop",
        "ports": (HTTP, GRPC),
        "routes": dict(ROUTES),
        "hosts": ("shop.example",),
        "generation": 7,
    }
    fields.update(changes)
    return RouterSpec(**fields)


def block(text: str, head: str) -> str:
    """The body of the first block that starts with ``head {`` (blocks nest at most a few deep)."""
    start = text.index(head + " {")
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise AssertionError(f"unterminated block {head!r}")


# --- names and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "feature-x", "ci-3f9a", "0abc", "a" * 63, "default", "include"])
def test_route_names_are_dns_labels(name: str) -> None:
    assert is_route_name(name)
    validate_spec(spec(routes={name: "10.0.0.1"}))


@pytest.mark.parametrize("name", ["", "Feature", "a_b", "-a", "a-", "a.b", "a" * 64, "a b", "a;b", "a\nb"])
def test_bad_route_names_are_refused(name: str) -> None:
    assert not is_route_name(name)
    with pytest.raises(ValueError, match="route name"):
        render(spec(routes={name: "10.0.0.1"}))


@pytest.mark.parametrize("ip", ["10.0.0", "pod.local", "10.0.0.1:80", "", "fe80::1%eth0;"])
def test_bad_route_ips_are_refused(ip: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        render(spec(routes={"a": ip}))


@pytest.mark.parametrize("host", ["*.shop.example", "1.2.3.4", "shop_example.com", "", "a..b", "shop.example:80"])
def test_bad_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="ingress host"):
        render(spec(hosts=(host,)))


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("10.0.0.1", "not 'ip:port'"),
        ("svc.ns:80", "not an IP address"),
        ("10.0.0.1:0", "port number"),
        ("10.0.0.1:70000", "port number"),
        ("fd00::1:80", "write an IPv6 address as [ip]:port"),
        ("[10.0.0.1]:80", "only IPv6"),
    ],
)
def test_bad_default_upstreams_are_refused(upstream: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render(spec(ports=(RouterPort("http", 8080, "http", upstream),)))


def test_duplicate_listen_ports_and_the_stats_port_are_refused() -> None:
    with pytest.raises(ValueError, match="listen port 8080 is also"):
        render(spec(ports=(HTTP, RouterPort("other", 8080, "tcp", "10.0.0.1:1"))))
    with pytest.raises(ValueError, match="stats port"):
        render(spec(ports=(RouterPort("http", 47180, "http", "10.0.0.1:80"),)))


@pytest.mark.parametrize(
    "changes",
    [
        {"service": "Orders"},
        {"namespace": "shop\n}"},
        {"ports": (RouterPort("http", 8080, "https", "10.0.0.1:80"),)},
        {"ports": (RouterPort("Bad Name", 8080, "http", "10.0.0.1:80"),)},
        {"generation": -1},
        {"stats_port": 0},
    ],
)
def test_other_bad_specs_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        render(spec(**changes))


@pytest.mark.parametrize("path", ["relative/dir", "/tmp/with space", "/tmp/$var", "/tmp/a;b", '/tmp/"q"'])
def test_paths_that_nginx_would_misread_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="runtime_dir"):
        render(spec(), runtime_dir=path)
    with pytest.raises(ValueError, match="modules_dir"):
        render(spec(ports=(TCP,)), modules_dir=path)


# --- protocols --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"name": "http"}, "http"),
        ({"name": "http-api"}, "http"),
        ({"name": "web"}, "http"),
        ({"name": "websocket"}, "http"),
        ({"name": "grpc"}, "grpc"),
        ({"name": "grpc-orders"}, "grpc"),
        ({"name": "grpc-web"}, "http"),
        ({"name": "h2c"}, "grpc"),
        ({"name": "h2c-api"}, "grpc"),
        ({"name": "https"}, "tcp"),
        ({"name": "http2"}, "tcp"),
        ({"name": "postgres"}, "tcp"),
        ({"name": ""}, "tcp"),
        ({}, "tcp"),
        ({"name": "metrics", "appProtocol": "http"}, "http"),
        ({"name": "api", "appProtocol": "kubernetes.io/ws"}, "http"),
        ({"name": "api", "appProtocol": "kubernetes.io/h2c"}, "grpc"),
        ({"name": "api", "appProtocol": "GRPC"}, "grpc"),
        ({"name": "http", "appProtocol": "kubernetes.io/wss"}, "tcp"),
        ({"name": "http", "appProtocol": "https"}, "tcp"),
        ({"name": "grpc", "appProtocol": "mysql"}, "tcp"),
        ({"name": "http", "protocol": "TCP"}, "http"),
    ],
)
def test_protocol_for(port: dict[str, Any], expected: str) -> None:
    assert protocol_for(port) == expected


@pytest.mark.parametrize("protocol", ["UDP", "SCTP"])
def test_protocol_for_refuses_udp_and_sctp(protocol: str) -> None:
    with pytest.raises(ValueError, match=f"{protocol} cannot be routed"):
        protocol_for({"name": "dns", "port": 53, "protocol": protocol})


# --- the host rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("feature-x.shop.example", "feature-x"),
        ("Feature-X.Shop.Example", "feature-x"),
        ("feature-x.shop.example:8080", "feature-x"),
        ("feature-x.shop.example.", "feature-x"),
        ("unknown.shop.example", "unknown"),  # the header is added; the default backend answers
        ("shop.example", None),
        ("a.b.shop.example", None),
        ("feature-x.shop.example.org", None),
        ("feature-x.shopxexample", None),
        ("-x.shop.example", None),
        ("[fd00::1]:8080", None),
        ("", None),
    ],
)
def test_route_from_host(host: str, expected: str | None) -> None:
    assert route_from_host(host, ("shop.example", "other.example")) == expected


def test_route_from_host_without_hosts() -> None:
    assert route_from_host("feature-x.shop.example", ()) is None


def test_route_from_host_agrees_with_the_rendered_regex() -> None:
    text = render(spec(hosts=("shop.example", "my-shop.example.com")))
    (pattern,) = re.findall(r'"~(.*)" \$1;', text)
    regex = re.compile(pattern.replace("\\\\", "\\"))
    for host in [
        "a.shop.example",
        "a.my-shop.example.com",
        "a.myxshop.example.com",
        "a.b.shop.example",
        "shop.example",
    ]:
        match = regex.search(host)
        assert (match.group(1) if match else None) == route_from_host(host, ("shop.example", "my-shop.example.com"))


# --- rendering --------------------------------------------------------------------------------


def test_render_is_deterministic() -> None:
    a = render(spec(routes={"b": "10.0.0.2", "a": "10.0.0.1"}, ports=(GRPC, HTTP), hosts=("y.example", "x.example")))
    b = render(spec(routes={"a": "10.0.0.1", "b": "10.0.0.2"}, ports=(HTTP, GRPC), hosts=("x.example", "y.example")))
    assert a == b
    assert render(spec()) == render(spec())
    assert render(spec(routes={"a": "10.0.0.1"})) != render(spec(routes={"a": "10.0.0.3"}))
    assert render(spec(generation=1)) != render(spec(generation=2))
    assert a.index("route a ") < a.index("route b ")


def test_header_comment_names_service_namespace_and_generation() -> None:
    text = render(spec())
    first = text.splitlines()[0]
    assert first.startswith("#")
    assert "shop/orders" in first
    assert "generation 7" in first
    assert "route feature-x -> 10.244.0.7" in text


def test_every_route_has_an_upstream_per_http_port() -> None:
    text = render(spec())
    for port in (8080, 9090):
        upstream_map = block(text, f"map $bridge_route $bridge_upstream_{port}")
        assert f"default bridge_{port}_default;" in upstream_map
        for route, ip in ROUTES.items():
            assert f"{route} bridge_{port}_route_{route};" in upstream_map
            upstream = block(text, f"upstream bridge_{port}_route_{route}")
            assert f"server {ip}:{port};" in upstream
            assert "keepalive " in upstream
    assert "server 10.96.0.10:80;" in block(text, "upstream bridge_8080_default")
    assert "server 10.96.0.10:90;" in block(text, "upstream bridge_9090_default")


def test_http_server_routes_streams_and_upgrades() -> None:
    server = block(render(spec()).split("# port http 8080")[1], "server")
    for directive in [
        "listen 8080;",
        "proxy_pass http://$bridge_upstream_8080;",
        "proxy_set_header kubernetes-route-as $bridge_route;",
        "proxy_set_header Host $bridge_host_header;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $bridge_connection;",
        "proxy_http_version 1.1;",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_read_timeout 3600s;",
        "proxy_send_timeout 3600s;",
    ]:
        assert directive in server
    text = render(spec())
    assert "client_max_body_size 0;" in text
    assert '"" "";' in block(text, "map $http_upgrade $bridge_connection")


def test_header_wins_over_host() -> None:
    route_map = block(render(spec()), "map $http_kubernetes_route_as $bridge_route")
    assert '"" $bridge_host_route;' in route_map
    assert "default $http_kubernetes_route_as;" in route_map


def test_grpc_server() -> None:
    server = block(render(spec()).split("# port grpc-api 9090")[1], "server")
    assert "listen 9090 http2;" in server
    assert "grpc_pass grpc://$bridge_upstream_9090;" in server
    assert "grpc_set_header kubernetes-route-as $bridge_route;" in server
    assert "proxy_pass" not in server


def test_host_map_lists_the_escaped_hosts_or_nothing() -> None:
    host_map = block(render(spec(hosts=("shop.example", "my-shop.example.com"))), "map $host $bridge_host_route")
    assert r"\.(?:my-shop\.example\.com|shop\.example)$" in host_map
    assert 'default "";' in host_map
    assert "~" not in block(render(spec(hosts=())), "map $host $bridge_host_route")


def test_route_names_that_are_map_keywords_are_escaped() -> None:
    upstream_map = block(render(spec(routes={"default": "10.0.0.1"})), "map $bridge_route $bridge_upstream_8080")
    assert "\\default bridge_8080_route_default;" in upstream_map
    assert "default bridge_8080_default;" in upstream_map


def test_stream_block_only_with_tcp_ports() -> None:
    text = render(spec(), modules_dir="/opt/mods")
    assert "stream {" not in text
    assert "load_module" not in text
    text = render(spec(ports=(HTTP, TCP)), modules_dir="/opt/mods")
    assert text.startswith("#")
    assert "load_module /opt/mods/ngx_stream_module.so;" in text
    stream = block(text, "stream")
    assert "listen 5432;" in stream
    assert "proxy_pass bridge_5432_default;" in stream
    assert "server 10.96.0.10:5432;" in stream
    assert "proxy_half_close on;" in stream
    # the TCP port gets no http server and no route upstreams
    assert "bridge_upstream_5432" not in text
    assert "bridge_5432_route" not in text


def test_files_are_under_the_runtime_dir() -> None:
    text = render(spec(ports=(HTTP, TCP)), runtime_dir="/run/router/")
    assert "pid /run/router/nginx.pid;" in text
    assert "error_log /run/router/error.log" in text
    assert text.count("access_log /run/router/access.log") == 2  # http and stream
    for temp in re.findall(r"^\s*\w+_temp_path (\S+);", text, re.M):
        assert temp.startswith("/run/router/")
    assert "daemon" not in text
    assert "\nuser " not in text


def test_log_formats_carry_every_field_as_json() -> None:
    text = render(spec(ports=(HTTP, GRPC, TCP)))
    formats = re.findall(r"log_format (\w+) escape=json '(.*)';", text)
    assert [name for name, _ in formats] == ["bridge_http", "bridge_grpc", "bridge_tcp"]
    for name, body in formats:
        sample = json.loads(re.sub(r"\$\w+", "x", body))
        assert list(sample) == list(LOG_FIELDS)
        assert sample["proto"] == name.removeprefix("bridge_")


def test_listeners_follow_the_address_family() -> None:
    assert "listen 8080;" in render(spec())
    v6 = render(spec(routes={"a": "fd00::7"}))
    assert "listen [::]:8080 ipv6only=off;" in v6
    assert "server [fd00::7]:8080;" in v6
    assert "listen 127.0.0.1:9090 http2;" in render(spec(), listen_address="127.0.0.1")


def test_no_ports_still_renders() -> None:
    text = render(spec(ports=(), routes={}))
    assert "events {" in text
    assert "server {" not in text


# --- the router: ConfigMap ------------------------------------------------------------------------


def configmap(text: str = "events {}\n", generation: Any = "3") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "orders-pbr-router"}
    if generation is not None:
        meta["annotations"] = {r.GENERATION_ANNOTATION: generation}
    return {"kind": "ConfigMap", "metadata": meta, "data": {"nginx.conf": text}}


def test_parse_configmap() -> None:
    desired = r.parse_configmap(configmap())
    assert desired == r.DesiredConfig("events {}\n", 3, hashlib.sha256(b"events {}\n").hexdigest())
    assert r.parse_configmap(configmap(generation=None)).generation == 0


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"data": {}}, "no data key"),
        ({"data": {"nginx.conf": "  "}}, "no data key"),
        (None, "no data key"),
        (configmap(generation="two"), "not an integer"),
        (configmap(generation="-1"), "negative"),
    ],
)
def test_parse_configmap_refuses(obj: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        r.parse_configmap(obj)


def test_plan() -> None:
    one = r.DesiredConfig("a", 1, "d1")
    assert r.plan(None, None, one) == "start"
    assert r.plan(one, None, one) == "none"
    assert r.plan(one, None, r.DesiredConfig("a", 2, "d1")) == "adopt"
    two = r.DesiredConfig("b", 2, "d2")
    assert r.plan(one, None, two) == "reload"
    assert r.plan(one, "d2", two) == "none"  # already failed: not again until it changes
    assert r.plan(None, "d2", two) == "none"
    assert r.plan(one, "d2", r.DesiredConfig("c", 3, "d3")) == "reload"


def test_configmap_request_quotes_names() -> None:
    config = r.RouterConfig(
        configmap="orders-pbr-router", namespace="shop", api_url="http://x", token_file="", ca_file=""
    )
    assert r.configmap_request(config).path == "/api/v1/namespaces/shop/configmaps/orders-pbr-router"


# --- the router: environment ------------------------------------------------------------------


BASE_ENV = {"ROUTER_CONFIGMAP": "orders-pbr-router", "ROUTER_NAMESPACE": "shop", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}


def test_config_from_env_defaults() -> None:
    config = r.config_from_env(BASE_ENV)
    assert config.stats_port == 47180
    assert config.poll_interval == 0.2
    assert config.runtime_dir == "/tmp/pytest-bridge-router"
    assert config.nginx == "nginx"
    assert config.api_url == "https://10.96.0.1:443"
    assert config.ca_file.endswith("/ca.crt")
    assert config.token_file.endswith("/token")


def test_router_reads_its_configmap_every_poll_until_woken_then_on_wakes_and_every_fetch_interval() -> None:
    config = r.config_from_env({**BASE_ENV, "ROUTER_FETCH_SECONDS": "3"})
    assert (config.poll_interval, config.fetch_interval) == (0.2, 3.0)
    router = r.Router(config, lambda request: r.Response(500, {}), nginx=nginxproc.Nginx("nginx", "/nonexistent"))
    router.round = lambda fetch=True: setattr(router, "_fetched_at", 100.0) if fetch else None  # type: ignore[method-assign]
    assert router.fetch_due(woken=False, now=100.1)  # no wake has come: a NetworkPolicy may keep the manager out
    router.request_wake()
    router.round(fetch=True)
    assert router.fetch_due(woken=True, now=100.1)
    assert not router.fetch_due(woken=False, now=102.9)
    assert router.fetch_due(woken=False, now=103.0)  # a lost wake costs at most fetch_interval


def test_config_from_env_for_tests() -> None:
    env = {
        "ROUTER_CONFIGMAP": "cm", "POD_NAMESPACE": "ns", "ROUTER_STATS_PORT": "0", "ROUTER_POLL_SECONDS": "0.05",
        "ROUTER_RUNTIME_DIR": "/tmp/x/", "NGINX": "/usr/sbin/nginx", "ROUTER_API_URL": "http://127.0.0.1:5/",
        "ROUTER_TOKEN_FILE": "/tmp/token", "ROUTER_CA_FILE": "",
    }  # fmt: skip
    config = r.config_from_env(env)
    assert (config.namespace, config.stats_port, config.poll_interval) == ("ns", 0, 0.05)
    assert (config.runtime_dir, config.nginx, config.api_url) == ("/tmp/x", "/usr/sbin/nginx", "http://127.0.0.1:5")
    assert (config.token_file, config.ca_file) == ("/tmp/token", "")
    assert r.config_from_env({**BASE_ENV, "ROUTER_CA_FILE": ""}).api_url == "http://10.96.0.1:443"
    assert r.config_from_env({**BASE_ENV, "KUBERNETES_SERVICE_HOST": "fd00::1"}).api_url == "https://[fd00::1]:443"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROUTER_NAMESPACE": "shop"}, "ROUTER_CONFIGMAP"),
        ({"ROUTER_CONFIGMAP": "cm", "ROUTER_NAMESPACE": "ns"}, "no API server"),
        ({**BASE_ENV, "ROUTER_STATS_PORT": "http"}, "malformed"),
        ({**BASE_ENV, "ROUTER_POLL_SECONDS": "0"}, "ROUTER_POLL_SECONDS"),
        ({**BASE_ENV, "ROUTER_FETCH_SECONDS": "0"}, "ROUTER_FETCH_SECONDS"),
        ({**BASE_ENV, "ROUTER_RUNTIME_DIR": "run"}, "absolute"),
    ],
)
def test_config_from_env_refuses(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        r.config_from_env(env)


# --- the router: access log and stats -----------------------------------------------------------


def line(**values: str) -> str:
    fields = dict.fromkeys(LOG_FIELDS, "")
    fields.update({"time": "1700000000.123", "remote_addr": "10.244.0.9", "status": "200", "request_time": "0.002"})
    fields.update(values)
    return json.dumps(fields)


def test_parse_access_line() -> None:
    record = accesslog.parse_access_line(
        line(header="feature-x", route="feature-x", upstream="10.244.0.7:8080", proto="http")
    )
    assert record == accesslog.AccessRecord(
        time=1700000000.123, remote_addr="10.244.0.9", header="feature-x", route="feature-x", host="",
        upstream="10.244.0.7:8080", status=200, request_time=0.002, port="", proto="http",
    )  # fmt: skip


def test_parse_access_line_tolerates_odd_values() -> None:
    # nginx escape=json: quotes and control characters escaped, other bytes as they came
    raw = b'{"time":"1.5","remote_addr":"10.0.0.1","header":"a\\"b\\u0009\xff","route":"x","status":"-"}'
    record = accesslog.parse_access_line(raw)
    assert record is not None
    assert record.header == 'a"b\t\ufffd'
    assert (record.status, record.request_time, record.host) == (0, 0.0, "")


@pytest.mark.parametrize("raw", ["", "not json", "[]", '{"remote_addr": "x"}', '{"time": "soon"}'])
def test_parse_access_line_refuses(raw: str) -> None:
    assert accesslog.parse_access_line(raw) is None


def test_stats_count_per_route_header_and_remote() -> None:
    stats = accesslog.Stats()
    for t, (header, route, remote, status) in enumerate(
        [
            ("a", "a", "10.0.0.1", "200"),
            ("a", "a", "10.0.0.1", "502"),
            ("", "a", "10.0.0.1", "200"),  # by Host
            ("", "", "10.0.0.2", "200"),
            ("zz", "zz", "10.0.0.2", "200"),  # unknown route: the default backend, header kept
        ]
    ):
        stats.add_line(line(time=str(100 + t), header=header, route=route, remote_addr=remote, status=status))
    stats.add_line("garbage")
    snapshot = stats.snapshot()
    assert snapshot["total"] == 5
    assert snapshot["unparsed"] == 1
    assert snapshot["complete"] is True
    entries = {(e["route"], e["header"], e["remote_addr"]): e for e in snapshot["entries"]}
    assert list(entries) == [
        ("", False, "10.0.0.2"),
        ("a", False, "10.0.0.1"),
        ("a", True, "10.0.0.1"),
        ("zz", True, "10.0.0.2"),
    ]
    assert entries[("a", True, "10.0.0.1")] == {
        "route": "a", "header": True, "remote_addr": "10.0.0.1", "count": 2, "first": 100.0, "last": 101.0,
        "statuses": {"200": 1, "502": 1},
    }  # fmt: skip
    assert json.loads(json.dumps(snapshot)) == snapshot


def test_stats_since() -> None:
    stats = accesslog.Stats(window=3)
    for t in range(5):
        stats.add_line(line(time=str(100 + t), route="a", header="a"))
    recent = stats.snapshot(since=102.5)
    assert (recent["total"], recent["complete"], recent["since"]) == (2, True, 102.5)
    assert recent["entries"][0]["first"] == 103.0
    too_old = stats.snapshot(since=100.5)  # records 101 left the 3-record window
    assert (too_old["total"], too_old["complete"]) == (3, False)
    assert stats.snapshot()["total"] == 5


# --- the router: tailing a log ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tailer_returns_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    tailer = accesslog.LogTailer(str(path))
    assert tailer.poll() == []  # no file yet
    with path.open("ab", buffering=0) as f:
        f.write(b"one\ntw")
        assert tailer.poll() == [b"one"]
        f.write(b"o\n\nthree\n")
        assert tailer.poll() == [b"two", b"three"]
        assert tailer.poll() == []
    tailer.close()


def test_tailer_follows_a_rotation_without_losing_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = Clock()
    tailer = accesslog.LogTailer(str(path), grace=2.0, clock=clock)
    with path.open("ab", buffering=0) as old:
        old.write(b"1\n2")
        assert tailer.poll() == [b"1"]
        os.replace(path, tmp_path / "access.log.1")
        with path.open("ab", buffering=0) as new:
            new.write(b"4\n")
            old.write(b"\n3\n")  # a worker that has not reopened its log yet
            assert tailer.poll() == [b"2", b"3", b"4"]
            old.write(b"5\n")
            clock.now = 1.0
            assert tailer.poll() == [b"5"]
            clock.now = 5.0
            assert tailer.poll() == []  # the old file is closed after the grace time
            old.write(b"lost\n")
            new.write(b"6\n")
            assert tailer.poll() == [b"6"]
    tailer.close()


def test_tailer_restarts_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"a\nb\n")
    tailer = accesslog.LogTailer(str(path))
    assert tailer.poll() == [b"a", b"b"]
    path.write_bytes(b"c\n")  # truncated and rewritten in place
    assert tailer.poll() == [b"c"]
    tailer.close()


def test_tailer_from_end_skips_what_was_there(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    path.write_bytes(b"old\n")
    tailer = accesslog.LogTailer(str(path), from_end=True)
    assert tailer.poll() == []
    with path.open("ab") as f:
        f.write(b"new\n")
    assert tailer.poll() == [b"new"]
    tailer.close()


# --- the router: nginx processes and health ---------------------------------------------------


def test_parse_stat_with_odd_command_names() -> None:
    assert nginxproc._parse_stat("42 (nginx) S 7 42 42 0 -1") == (7, "S")
    assert nginxproc._parse_stat("42 (a) b (c) Z 1 42 42 0 -1") == (1, "Z")


def fake_proc(root: Path, pid: int, ppid: int, title: str, state: str = "S") -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "stat").write_text(f"{pid} (nginx) {state} {ppid} {pid} {pid} 0 -1\n")
    (root / str(pid) / "cmdline").write_bytes(title.encode() + b"\0" * 8)


def test_nginx_workers_from_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, 1, "nginx: master process nginx -g daemon off;")
    fake_proc(tmp_path, 11, 10, "nginx: worker process")
    fake_proc(tmp_path, 12, 10, "nginx: worker process is shutting down")
    fake_proc(tmp_path, 13, 10, "nginx: worker process", state="Z")
    fake_proc(tmp_path, 14, 99, "nginx: worker process")
    fake_proc(tmp_path, 15, 10, "nginx: cache manager process")
    (tmp_path / "self").mkdir()
    assert nginxproc.nginx_workers(10, str(tmp_path)) == {
        11: "nginx: worker process",
        12: "nginx: worker process is shutting down",
    }
    assert nginxproc.nginx_workers(10, str(tmp_path / "missing")) == {}


def test_orphaned_workers_are_told_from_live_ones(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, 1, "nginx: master process nginx")
    fake_proc(tmp_path, 11, 10, "nginx: worker process")
    fake_proc(tmp_path, 12, 1, "nginx: worker process")  # its master was killed
    fake_proc(tmp_path, 13, 1, "python3 -m something")
    assert not nginxproc._is_orphaned_worker(11, str(tmp_path))
    assert nginxproc._is_orphaned_worker(12, str(tmp_path))
    assert not nginxproc._is_orphaned_worker(13, str(tmp_path))
    assert not nginxproc._is_orphaned_worker(99, str(tmp_path))


def test_workers_running_and_reload_done() -> None:
    up, down = "nginx: worker process", "nginx: worker process is shutting down"
    assert not nginxproc.workers_running({})
    assert not nginxproc.workers_running({5: down})
    assert nginxproc.workers_running({5: down, 6: up})
    assert not nginxproc.reload_done({5}, {5: up})  # SIGHUP not acted on yet
    assert not nginxproc.reload_done({5}, {5: up, 6: up})  # new workers, but the old one still accepts
    assert nginxproc.reload_done({5}, {5: down, 6: up})
    assert nginxproc.reload_done({5}, {6: up})
    assert not nginxproc.reload_done({5}, {5: down})  # no new worker: the reload failed


def test_health_answers() -> None:
    health = r.Health()
    status, body = health.answer()
    assert status == 503
    assert (body["generation"], body["ok"], body["error"]) == (None, False, None)
    health.loaded = r.DesiredConfig("x", 2, "d")
    health.nginx_pid = 123
    status, body = health.answer()
    assert status == 200
    assert (body["generation"], body["ok"], body["error"], body["config_sha256"]) == (2, True, None, "d")
    health.error = "generation 3 not applied: nginx -t: unknown directive"
    status, body = health.answer()
    assert (status, body["generation"], body["ok"]) == (200, 2, False)
    health.nginx_pid = None
    assert health.answer()[0] == 503
