"""The router's nginx config with a real nginx, and the router process end to end, all on loopback.

Layout: the router listens on 127.0.0.1; route "a" is a pod at 127.0.0.2, route "b" at 127.0.0.3
(both on the router's own port numbers, like clone pods on the target port), and the default
backend (the clone Service) is at 127.0.0.4. The HTTP backends are Python; the h2c backends are a
second nginx that answers with its name and the route header it received.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pytest_bridge_agent.kubeapi import Response
from pytest_bridge_routing import accesslog, nginxconf, nginxproc
from pytest_bridge_routing import router as r
from pytest_bridge_routing.nginxconf import RouterPort, RouterSpec, render, sidecar_command

from pytest_bridge.orchestration.isolation import is_router_answer, router_probe_request

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = [
    pytest.mark.skipif(
        NGINX is None, reason="no nginx binary (Debian: apt-get install nginx-light libnginx-mod-stream)"
    ),
    pytest.mark.timeout(120),
]

ROUTER_IP = "127.0.0.1"
POD_A = "127.0.0.2"
POD_B = "127.0.0.3"
DEFAULT_IP = "127.0.0.4"
CLIENT_IP = "127.0.0.5"  # the source address of the requests that the stats test counts
HOSTS = ("shop.example",)
NS = "shop"
CONFIGMAP = "orders-pbr-router"
API_TOKEN = "router-sa-token"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate()`` is truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def port_free(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def free_port_on(*ips: str) -> int:
    """A port number that is free on every one of ``ips``."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((ips[0], 0))
            port = int(sock.getsockname()[1])
        if all(port_free(ip, port) for ip in ips):
            return port
    raise AssertionError(f"no common free port on {ips}")


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ------------------------------------------------------------------ HTTP/WebSocket backends


def read_chunked(rfile: Any) -> bytes:
    body = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        body += rfile.read(size)
        rfile.readline()


def ws_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([bit | len(payload)])
    elif len(payload) < 65536:
        head += bytes([bit | 126]) + len(payload).to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + len(payload).to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    first, second = read(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(read(2), "big")
    elif length == 127:
        length = int.from_bytes(read(8), "big")
    key = read(4) if second & 0x80 else b""
    payload = read(length)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


@dataclass
class Backend:
    """An HTTP/1.1 backend that records each request's headers and answers with its own name."""

    name: str
    ip: str
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def requests(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.seen if s["path"] == path]

    def start(self) -> Backend:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> dict[str, str]:
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urllib.parse.urlsplit(self.path).path
                with backend.lock:
                    backend.seen.append({"method": self.command, "path": path, "headers": headers})
                return headers

            def _json(self, body: dict[str, Any]) -> None:
                data = json.dumps({"backend": backend.name, **body}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                headers = self._record()
                url = urllib.parse.urlsplit(self.path)
                if headers.get("upgrade", "").lower() == "websocket":
                    self._websocket(headers)
                elif url.path == "/download":
                    query = urllib.parse.parse_qs(url.query)
                    data = pattern(int(query["seed"][0]), int(query["size"][0]))
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Backend", backend.name)
                    self.end_headers()
                    for i in range(0, len(data), 65536):
                        chunk = data[i : i + 65536]
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self._json({"route": headers.get("kubernetes-route-as"), "headers": headers})

            def do_POST(self) -> None:
                headers = self._record()
                chunked = "chunked" in headers.get("transfer-encoding", "")
                body = read_chunked(self.rfile) if chunked else self.rfile.read(int(headers.get("content-length", 0)))
                self._json({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body), "chunked": chunked})

            def _websocket(self, headers: dict[str, str]) -> None:
                key = headers["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key).digest()).decode())
                self.end_headers()
                self.wfile.flush()
                while True:
                    opcode, payload = ws_read(self.rfile.read)
                    if opcode == 8:
                        self.wfile.write(ws_frame(8, payload, mask=False))
                        break
                    self.wfile.write(ws_frame(opcode, backend.name.encode() + b":" + payload, mask=False))
                    self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server((self.ip, self.port), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class TcpEcho:
    """Reads a connection to its end (the client's half-close), then sends it all back and closes."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_server((ip, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = bytearray()
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(bytes(data))
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


# ------------------------------------------------------------------ nginx processes


def runtime_dir() -> str:
    # Not under pytest's tmp_path (0700): nginx workers run as nobody and must reach their temp dirs.
    path = tempfile.mkdtemp(prefix="pytest-bridge-router-test-", dir="/tmp")
    os.chmod(path, 0o755)
    return path


@contextlib.contextmanager
def running_nginx(text: Callable[[str], str]) -> Iterator[nginxproc.Nginx]:
    """nginx (started and supervised by the router's :class:`Nginx`) on ``text(runtime_dir)``."""
    assert NGINX is not None
    run = runtime_dir()
    nginx = nginxproc.Nginx(NGINX, run)
    try:
        conf = text(run)
        nginx.test(conf)
        nginx.install(conf)
        nginx.start(timeout=10)
        yield nginx
    finally:
        nginx.stop(grace=0)
        nginx.close()
        shutil.rmtree(run, ignore_errors=True)


def h2_backends_conf(run: str, port: int, default_port: int) -> str:
    """A second nginx: h2c servers that answer "<name> <kubernetes-route-as>"."""
    temp = "\n".join(f"    {m}_temp_path {run}/{m}_temp;" for m in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    servers = "\n".join(
        f'    server {{ listen {ip}:{p} http2; return 200 "{name} $http_kubernetes_route_as\\n"; }}'
        for name, ip, p in (("a", POD_A, port), ("b", POD_B, port), ("default", DEFAULT_IP, default_port))
    )
    return (
        f"worker_processes 1;\npid {run}/nginx.pid;\nerror_log {run}/error.log warn;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}\n{servers}\n}}\n"
    )


@dataclass
class Lab:
    http_port: int
    grpc_port: int
    tcp_port: int
    backends: dict[str, Backend]  # a, b, default (HTTP)
    tcp: TcpEcho
    router: nginxproc.Nginx
    spec: RouterSpec

    def conn(self, port: int | None = None, source: str | None = None) -> http.client.HTTPConnection:
        source_address = (source, 0) if source else None
        return http.client.HTTPConnection(ROUTER_IP, port or self.http_port, timeout=30, source_address=source_address)


def http_backends(port: int) -> dict[str, Backend]:
    backends = {
        "a": Backend("a", POD_A, port),
        "b": Backend("b", POD_B, port),
        "default": Backend("default", DEFAULT_IP, 0),
    }
    started = []
    try:
        for backend in backends.values():
            started.append(backend.start())
    except BaseException:
        for backend in started:
            backend.close()
        raise
    return backends


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    result: dict[str, Any] = json.loads(body)
    return result


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        http_port = free_port_on(ROUTER_IP, POD_A, POD_B)
        backends = http_backends(http_port)
        for backend in backends.values():
            stack.callback(backend.close)
        grpc_port = free_port_on(ROUTER_IP, POD_A, POD_B)
        grpc_default = free_port_on(DEFAULT_IP)
        stack.enter_context(running_nginx(lambda run: h2_backends_conf(run, grpc_port, grpc_default)))
        tcp = TcpEcho(DEFAULT_IP)
        stack.callback(tcp.close)
        tcp_port = free_port_on(ROUTER_IP)
        spec = RouterSpec(
            service="orders",
            namespace=NS,
            ports=(
                RouterPort("http", http_port, "http", f"{DEFAULT_IP}:{backends['default'].port}"),
                RouterPort("grpc", grpc_port, "grpc", f"{DEFAULT_IP}:{grpc_default}"),
                RouterPort("db", tcp_port, "tcp", f"{DEFAULT_IP}:{tcp.port}"),
            ),
            routes={"a": POD_A, "b": POD_B},
            hosts=HOSTS,
            generation=1,
        )
        router = stack.enter_context(running_nginx(lambda run: render(spec, runtime_dir=run, listen_address=ROUTER_IP)))
        yield Lab(http_port, grpc_port, tcp_port, backends, tcp, router, spec)


# ------------------------------------------------------------------ nginx -t


@pytest.mark.parametrize(
    "spec",
    [
        RouterSpec("orders", NS, (), {}),
        RouterSpec("orders", NS, (RouterPort("", 5432, "tcp", "10.96.0.9:5432"),), {"a": "10.244.0.7"}),
        RouterSpec(
            "orders",
            NS,
            (RouterPort("http", 8080, "http", "[fd00::10]:80"), RouterPort("grpc", 9090, "grpc", "[fd00::10]:90")),
            {"default": "fd00::7", "include": "fd00::8"},
            ("shop.example", "my-shop.example.com"),
        ),
        RouterSpec(  # long route names, many routes
            "orders",
            NS,
            (RouterPort("http", 8080, "http", "10.96.0.10:80"), RouterPort("grpc", 9090, "grpc", "10.96.0.10:90")),
            {f"r{i:04d}-" + "x" * 57: f"10.244.{i // 250}.{i % 250 + 1}" for i in range(1000)},
            HOSTS,
        ),
    ],
    ids=["no-ports", "tcp-only", "ipv6-and-keyword-routes", "1000-long-routes"],
)
def test_nginx_accepts_rendered_configs(spec: RouterSpec) -> None:
    assert NGINX is not None
    run = runtime_dir()
    nginx = nginxproc.Nginx(NGINX, run)
    try:
        nginx.test(render(spec, runtime_dir=run))
    finally:
        nginx.close()
        shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------ routing


def test_header_routes_to_the_route_pod(lab: Lab) -> None:
    with contextlib.closing(lab.conn()) as conn:
        reply = get(conn, "/header", {"kubernetes-route-as": "a"})
    assert reply["backend"] == "a"
    (seen,) = lab.backends["a"].requests("/header")
    assert seen["headers"]["kubernetes-route-as"] == "a"
    assert seen["headers"]["host"] == f"{ROUTER_IP}:{lab.http_port}"  # preserved
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_host_route_injects_the_header(lab: Lab) -> None:
    with contextlib.closing(lab.conn()) as conn:
        assert get(conn, "/host", {"Host": f"b.shop.example:{lab.http_port}"})["backend"] == "b"
        assert get(conn, "/host", {"Host": "B.Shop.Example"})["backend"] == "b"
    first, second = lab.backends["b"].requests("/host")
    assert first["headers"]["kubernetes-route-as"] == "b"
    assert first["headers"]["host"] == f"b.shop.example:{lab.http_port}"
    assert second["headers"]["kubernetes-route-as"] == "b"


def test_the_router_answers_its_probe_itself_whatever_the_route(lab: Lab) -> None:
    """The plugin's proof that a Service reaches its router (not the pods it replaced)."""
    for headers in ({}, {"kubernetes-route-as": "a"}, {"Host": f"b.shop.example:{lab.http_port}"}):
        with socket.create_connection((ROUTER_IP, lab.http_port), timeout=10) as sock:
            sock.sendall(router_probe_request(headers.get("Host", ROUTER_IP)))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, head
                head += chunk
        assert is_router_answer(head, lab.spec.service), head
        assert not is_router_answer(head, "other"), head
    assert all(not b.requests(nginxconf.ROUTER_PROBE_PATH) for b in lab.backends.values())


def test_header_wins_over_host(lab: Lab) -> None:
    with contextlib.closing(lab.conn()) as conn:
        reply = get(conn, "/both", {"kubernetes-route-as": "a", "Host": "b.shop.example"})
    assert reply["backend"] == "a"
    assert reply["route"] == "a"


@pytest.mark.parametrize(
    ("headers", "forwarded"),
    [
        ({}, None),
        ({"kubernetes-route-as": "zzz"}, "zzz"),  # unknown route: default backend, header kept
        ({"Host": "zzz.shop.example"}, "zzz"),
        ({"Host": "a.other.example"}, None),
        ({"Host": "a.b.shop.example"}, None),
    ],
)
def test_no_or_unknown_route_goes_to_the_default_backend(
    lab: Lab, headers: dict[str, str], forwarded: str | None
) -> None:
    with contextlib.closing(lab.conn()) as conn:
        reply = get(conn, "/default", headers)
    assert reply["backend"] == "default"
    assert reply["route"] == forwarded


def test_one_keepalive_connection_routes_each_request(lab: Lab) -> None:
    plan = [
        ({"kubernetes-route-as": "a"}, "a"),
        ({}, "default"),
        ({"Host": "b.shop.example"}, "b"),
        ({"kubernetes-route-as": "nope"}, "default"),
        ({"kubernetes-route-as": "b"}, "b"),
        ({"kubernetes-route-as": "a"}, "a"),
    ]
    with contextlib.closing(lab.conn()) as conn:
        sockets = set()
        for i, (headers, backend) in enumerate(plan):
            reply = get(conn, f"/keepalive/{i}", headers)
            assert reply["backend"] == backend, (i, headers)
            assert conn.sock is not None
            sockets.add(conn.sock.getsockname())
    assert len(sockets) == 1, "the router closed the client connection between requests"


def test_chunked_upload_and_download_are_byte_exact(lab: Lab) -> None:
    data = pattern(7, 4 * 1024 * 1024 + 123)
    chunks = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
    with contextlib.closing(lab.conn()) as conn:
        conn.request("POST", "/upload", body=chunks, headers={"kubernetes-route-as": "b"}, encode_chunked=True)
        response = conn.getresponse()
        reply = json.loads(response.read())
        assert response.status == 200
        assert reply == {
            "backend": "b",
            "sha256": hashlib.sha256(data).hexdigest(),
            "length": len(data),
            "chunked": True,  # streamed through, not buffered into a Content-Length
        }
        size = 5 * 1024 * 1024 + 17
        conn.request("GET", f"/download?seed=11&size={size}", headers={"Host": "a.shop.example"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("X-Backend") == "a"
        assert response.getheader("Transfer-Encoding") == "chunked"
        digest = hashlib.sha256()
        while block := response.read(65536):
            digest.update(block)
        assert digest.hexdigest() == hashlib.sha256(pattern(11, size)).hexdigest()


def test_websocket_upgrade_through_a_route(lab: Lab) -> None:
    with socket.create_connection((ROUTER_IP, lab.http_port), timeout=30) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nkubernetes-route-as: b\r\n\r\n"
            ).encode()
        )
        reader = sock.makefile("rb")
        status = reader.readline()
        assert status.startswith(b"HTTP/1.1 101"), status
        while reader.readline() not in (b"\r\n", b""):
            pass
        for message in (b"hello", b"x" * 70_000):
            sock.sendall(ws_frame(1, message, mask=True))
            assert ws_read(reader.read) == (1, b"b:" + message)
        sock.sendall(ws_frame(8, b"\x03\xe8", mask=True))
        assert ws_read(reader.read)[0] == 8
        reader.close()
    (seen,) = lab.backends["b"].requests("/ws")
    assert seen["headers"]["kubernetes-route-as"] == "b"


def test_tcp_port_passes_to_the_default_backend_with_half_close(lab: Lab) -> None:
    data = pattern(3, 1024 * 1024 + 5)
    with socket.create_connection((ROUTER_IP, lab.tcp_port), timeout=30) as sock:

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the backend answers only after this

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        sender.join(10)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ HTTP/2 (gRPC port)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_string(value: str) -> bytes:
    raw = value.encode()
    assert len(raw) < 127
    return bytes([len(raw)]) + raw  # no Huffman coding


class H2Client:
    """HTTP/2 with prior knowledge, just enough for GET requests (HPACK without Huffman or indexing)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((ROUTER_IP, port), timeout=30)
        self.reader = self.sock.makefile("rb")
        self.sock.sendall(H2_PREFACE + h2_frame(4, 0, 0))
        self.next_stream = 1

    def get(self, path: str, authority: str, headers: dict[str, str]) -> tuple[int, bytes]:
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        block = b"\x82\x86"  # :method GET, :scheme http
        block += b"\x04" + h2_string(path) + b"\x01" + h2_string(authority)  # :path, :authority
        for name, value in headers.items():
            block += b"\x00" + h2_string(name) + h2_string(value)
        self.sock.sendall(h2_frame(1, 0x4 | 0x1, stream, block))  # HEADERS, END_HEADERS | END_STREAM
        status, body = 0, bytearray()
        while True:
            head = self.reader.read(9)
            assert len(head) == 9, "connection closed"
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            on = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = self.reader.read(length)
            if kind == 4 and not flags & 0x1:  # SETTINGS
                self.sock.sendall(h2_frame(4, 0x1, 0))
            elif kind == 6 and not flags & 0x1:  # PING
                self.sock.sendall(h2_frame(6, 0x1, 0, payload))
            elif kind in (3, 7):  # RST_STREAM, GOAWAY
                raise AssertionError(f"HTTP/2 frame type {kind} on stream {on}: {payload!r}")
            elif on == stream and kind == 1:
                status = H2_STATUS.get(payload[0], -1)
            elif on == stream and kind == 0:
                body += payload
                if payload:
                    self.sock.sendall(h2_frame(8, 0, 0, len(payload).to_bytes(4, "big")))
            if on == stream and kind in (0, 1) and flags & 0x1:
                return status, bytes(body)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_h2c_port_routes_by_header_and_host(lab: Lab) -> None:
    client = H2Client(lab.grpc_port)
    try:  # several streams on one connection, each routed on its own
        assert client.get("/", "orders", {"kubernetes-route-as": "a"}) == (200, b"a a\n")
        assert client.get("/", "orders", {}) == (200, b"default \n")
        assert client.get("/", "b.shop.example", {}) == (200, b"b b\n")
        assert client.get("/", "orders", {"kubernetes-route-as": "zzz"}) == (200, b"default zzz\n")
        assert client.get("/", "a.shop.example", {"kubernetes-route-as": "b"}) == (200, b"b b\n")
    finally:
        client.close()


# ------------------------------------------------------------------ the access log


def test_access_log_records_header_route_and_upstream(lab: Lab) -> None:
    log = os.path.join(lab.router.runtime_dir, "access.log")
    with contextlib.closing(lab.conn()) as conn:
        get(conn, "/logged/header", {"kubernetes-route-as": "a"})
        get(conn, "/logged/host", {"Host": "b.shop.example"})
        get(conn, "/logged/none")

    def records() -> list[accesslog.AccessRecord]:
        with open(log, "rb") as f:
            parsed = [accesslog.parse_access_line(line) for line in f]
        return [p for p in parsed if p is not None and p.proto == "http"]

    wait_until(lambda: sum(rec.status == 200 for rec in records()) >= 3, 10, "three access-log lines")
    found = {(rec.header, rec.route, rec.upstream, rec.proto) for rec in records()}
    assert ("a", "a", f"{POD_A}:{lab.http_port}", "http") in found
    assert ("", "b", f"{POD_B}:{lab.http_port}", "http") in found
    assert ("", "", f"{DEFAULT_IP}:{lab.backends['default'].port}", "http") in found


# ------------------------------------------------------------------ reloads


def test_a_reload_is_live_when_done_and_a_failed_one_keeps_the_old_config() -> None:
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    try:

        def conf(routes: dict[str, str], extra: tuple[RouterPort, ...] = ()) -> Callable[[str], str]:
            default = RouterPort("http", port, "http", f"{DEFAULT_IP}:{backends['default'].port}")
            spec = RouterSpec("orders", NS, (default, *extra), routes, HOSTS)
            return lambda run: render(spec, runtime_dir=run, listen_address=ROUTER_IP)

        with running_nginx(conf({"a": POD_A})) as nginx:

            def route_b() -> str:
                with contextlib.closing(http.client.HTTPConnection(ROUTER_IP, port, timeout=30)) as conn:
                    return str(get(conn, "/reload", {"kubernetes-route-as": "b"})["backend"])

            assert route_b() == "default"
            new = conf({"a": POD_A, "b": POD_B})(nginx.runtime_dir)
            nginx.test(new)
            nginx.install(new)
            nginx.reload(timeout=10)
            assert route_b() == "b"  # no waiting: done means live

            with socket.create_server((ROUTER_IP, 0)) as busy:  # passes nginx -t, fails to bind
                taken = int(busy.getsockname()[1])
                broken = conf({}, (RouterPort("db", taken, "tcp", f"{DEFAULT_IP}:1"),))(nginx.runtime_dir)
                nginx.test(broken)
                nginx.install(broken)
                with pytest.raises(nginxproc.NginxError, match="bind"):
                    nginx.reload(timeout=10)
            assert route_b() == "b"
    finally:
        for backend in backends.values():
            backend.close()


# ------------------------------------------------------------------ the router process


@dataclass
class FakeApi:
    """Serves one ConfigMap; only with the right bearer token."""

    configmap: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    gets: int = 0

    def publish(self, text: str, generation: int) -> None:
        with self.lock:
            self.configmap = {
                "kind": "ConfigMap",
                "metadata": {
                    "name": CONFIGMAP,
                    "namespace": NS,
                    "annotations": {r.GENERATION_ANNOTATION: str(generation)},
                },
                "data": {"nginx.conf": text},
            }


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with fake.lock:
                fake.gets += 1
                if self.headers.get("Authorization") != f"Bearer {API_TOKEN}":
                    status, body = 401, {"kind": "Status", "message": "Unauthorized"}
                elif self.path == f"/api/v1/namespaces/{NS}/configmaps/{CONFIGMAP}" and fake.configmap:
                    status, body = 200, fake.configmap
                else:
                    status, body = 404, {"kind": "Status", "message": "not found"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((ROUTER_IP, 0), Handler)
    server.daemon_threads = True
    fake.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


@dataclass
class RouterProcess:
    proc: subprocess.Popen[bytes]
    logs: list[str] = field(default_factory=list)
    stats_port: int = 0

    def wait_for_log(self, regex: str, timeout: float = 10.0) -> re.Match[str]:
        def find() -> re.Match[str] | None:
            for line in list(self.logs):
                if match := re.search(regex, line):
                    return match
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited {self.proc.returncode}:\n" + "".join(self.logs))
            return None

        try:
            result: re.Match[str] = wait_until(find, timeout, f"a log line matching {regex!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; logs:\n" + "".join(self.logs)) from None
        return result

    def get(self, path: str) -> tuple[int, Any]:
        with contextlib.closing(http.client.HTTPConnection(ROUTER_IP, self.stats_port, timeout=10)) as conn:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

    def healthz(self) -> dict[str, Any]:
        status, body = self.get("/healthz")
        assert status == (200 if body["generation"] is not None and body["nginx_pid"] else 503), body
        result: dict[str, Any] = body
        return result


def _drain(router: RouterProcess) -> None:
    assert router.proc.stderr is not None
    for line in router.proc.stderr:
        router.logs.append(line.decode(errors="replace"))


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie runs nothing
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open and read
        return True


@pytest.fixture
def start_router(api: FakeApi, tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    token = tmp_path / "token"
    token.write_text(API_TOKEN + "\n")
    run = runtime_dir()
    routers: list[RouterProcess] = []

    def start(**extra_env: str) -> RouterProcess:
        assert NGINX is not None
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ROUTER_CONFIGMAP": CONFIGMAP,
            "ROUTER_NAMESPACE": NS,
            "ROUTER_STATS_PORT": "0",
            "ROUTER_STATS_HOST": ROUTER_IP,
            "ROUTER_POLL_SECONDS": "0.05",
            "ROUTER_RUNTIME_DIR": run,
            "ROUTER_STOP_GRACE": "2",
            "NGINX": NGINX,
            "ROUTER_API_URL": f"http://{ROUTER_IP}:{api.port}",
            "ROUTER_TOKEN_FILE": str(token),
            "ROUTER_CA_FILE": "",
            **extra_env,
        }
        popen = subprocess.Popen(
            [sys.executable, "-I", "-m", "pytest_bridge_routing.router"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        router = RouterProcess(popen)
        routers.append(router)
        threading.Thread(target=_drain, args=(router,), daemon=True).start()
        router.stats_port = int(router.wait_for_log(r"ready stats=[\d.]+:(\d+)").group(1))
        return router

    yield start
    for router in routers:
        pid = None
        with contextlib.suppress(OSError, AssertionError, ValueError, KeyError):
            pid = router.healthz()["nginx_pid"] if router.proc.poll() is None else None
        if router.proc.poll() is None:
            router.proc.terminate()
            try:
                router.proc.wait(15)
            except subprocess.TimeoutExpired:
                router.proc.kill()
                router.proc.wait(5)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if router.proc.stderr:
            router.proc.stderr.close()
    shutil.rmtree(run, ignore_errors=True)


def router_conf(port: int, default_port: int, routes: dict[str, str], generation: int) -> Callable[[str], str]:
    spec = RouterSpec(
        "orders",
        NS,
        (RouterPort("http", port, "http", f"{DEFAULT_IP}:{default_port}"),),
        routes,
        HOSTS,
        generation=generation,
    )
    return lambda run: render(spec, runtime_dir=run, listen_address=ROUTER_IP)


def test_router_process_end_to_end(api: FakeApi, start_router: Callable[[], RouterProcess]) -> None:
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    try:
        router = start_router()
        run = router.wait_for_log(r"runtime=(\S+)").group(1)
        default_port = backends["default"].port

        # nothing to run yet: 503, and the API problem is reported
        status, body = router.get("/healthz")
        assert status == 503
        assert body["generation"] is None

        api.publish(router_conf(port, default_port, {"a": POD_A}, 1)(run), 1)
        body = wait_until(lambda: (h := router.healthz())["generation"] == 1 and h, 10, "generation 1 in /healthz")
        assert (body["ok"], body["error"], body["api_error"]) == (True, None, None)

        def backend_for(headers: dict[str, str], source: str | None = None) -> str:
            source_address = (source, 0) if source else None
            conn = http.client.HTTPConnection(ROUTER_IP, port, timeout=30, source_address=source_address)
            with contextlib.closing(conn):
                return str(get(conn, "/e2e", headers)["backend"])

        assert backend_for({"kubernetes-route-as": "a"}) == "a"
        assert backend_for({"kubernetes-route-as": "b"}) == "default"

        # a new route: live as soon as /healthz says so
        api.publish(router_conf(port, default_port, {"a": POD_A, "b": POD_B}, 2)(run), 2)
        body = wait_until(lambda: (h := router.healthz())["generation"] == 2 and h, 10, "generation 2 in /healthz")
        assert (body["ok"], body["reloads"]) == (True, 1)
        assert backend_for({"kubernetes-route-as": "b"}) == "b"

        # a broken config: the previous one keeps running, the error is reported
        api.publish("this is not nginx;\n", 3)
        body = wait_until(lambda: (h := router.healthz())["error"] and h, 10, "the error of generation 3 in /healthz")
        assert (body["generation"], body["ok"], body["desired_generation"]) == (2, False, 3)
        assert "generation 3" in body["error"]
        assert "nginx -t" in body["error"]
        assert 'unknown directive "this"' in body["error"]
        assert backend_for({"kubernetes-route-as": "b"}) == "b"

        # fixed again: route b gone
        api.publish(router_conf(port, default_port, {"a": POD_A}, 4)(run), 4)
        body = wait_until(lambda: (h := router.healthz())["generation"] == 4 and h, 10, "generation 4 in /healthz")
        assert (body["ok"], body["error"]) == (True, None)
        assert backend_for({"kubernetes-route-as": "b"}) == "default"

        # /stats: requests from one client address, by route and by whether the header came with them
        for headers in [{"kubernetes-route-as": "a"}] * 3 + [{"Host": "a.shop.example"}] * 2 + [{}] * 4:
            backend_for(headers, source=CLIENT_IP)

        def mine() -> dict[tuple[str, bool], int]:
            status, stats = router.get("/stats")
            assert status == 200
            return {(e["route"], e["header"]): e["count"] for e in stats["entries"] if e["remote_addr"] == CLIENT_IP}

        wait_until(lambda: sum(mine().values()) == 9, 10, "nine requests from the client in /stats")
        assert mine() == {("a", True): 3, ("a", False): 2, ("", False): 4}
        status, stats = router.get("/stats")
        assert stats["generation"] == 4
        assert stats["total"] >= 14
        entry = next(e for e in stats["entries"] if e["remote_addr"] == CLIENT_IP and e["route"] == "a" and e["header"])
        assert entry["statuses"] == {"200": 3}
        assert entry["first"] <= entry["last"] <= stats["now"]
        status, later = router.get(f"/stats?since={stats['now'] + 3600}")
        assert (status, later["total"], later["entries"]) == (200, 0, [])
        assert router.get("/stats?since=soon")[0] == 400
        assert router.get("/nothing")[0] == 404

        # SIGTERM: nginx goes with the router
        master = router.healthz()["nginx_pid"]
        workers = set(nginxproc.nginx_workers(master))
        assert workers
        router.proc.send_signal(signal.SIGTERM)
        assert router.proc.wait(20) == 0
        for pid in {master, *workers}:
            wait_until(functools.partial(gone, pid), 10, f"nginx process {pid} to be gone")
        router.wait_for_log("stopped")
        emergencies = [line for line in router.logs if "[emerg]" in line and "not applied: nginx -t" not in line]
        assert not emergencies
    finally:
        for backend in backends.values():
            backend.close()


def test_nginx_dies_with_a_killed_router(api: FakeApi, start_router: Callable[[], RouterProcess]) -> None:
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    try:
        router = start_router()
        run = router.wait_for_log(r"runtime=(\S+)").group(1)
        api.publish(router_conf(port, backends["default"].port, {"a": POD_A}, 1)(run), 1)
        master = wait_until(lambda: router.healthz()["nginx_pid"], 10, "nginx to run")
        workers = set(nginxproc.nginx_workers(master))
        router.proc.kill()
        router.proc.wait(10)
        for pid in {master, *workers}:
            wait_until(functools.partial(gone, pid), 10, f"nginx process {pid} to be gone")
    finally:
        for backend in backends.values():
            backend.close()


def test_router_restarts_a_killed_nginx(api: FakeApi, start_router: Callable[[], RouterProcess]) -> None:
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    try:
        router = start_router()
        run = router.wait_for_log(r"runtime=(\S+)").group(1)
        api.publish(router_conf(port, backends["default"].port, {"a": POD_A}, 1)(run), 1)
        master = wait_until(lambda: router.healthz()["nginx_pid"], 10, "nginx to run")
        workers = set(nginxproc.nginx_workers(master))
        os.kill(master, signal.SIGKILL)  # its workers live on, holding the port
        body = wait_until(
            lambda: (h := router.healthz())["nginx_pid"] not in (None, master) and h, 20, "a new nginx master"
        )
        assert (body["generation"], body["ok"]) == (1, True)
        for pid in workers:
            wait_until(functools.partial(gone, pid), 10, f"the old worker {pid} to be gone")
        with contextlib.closing(http.client.HTTPConnection(ROUTER_IP, port, timeout=30)) as conn:
            assert get(conn, "/restarted", {"kubernetes-route-as": "a"})["backend"] == "a"
        router.wait_for_log("nginx exited")
        router.wait_for_log("left behind by its master")
        assert not [line for line in router.logs if "[emerg]" in line]
    finally:
        for backend in backends.values():
            backend.close()


def test_router_rotates_the_access_log_without_losing_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router in this process, driven round by round, with a fake API."""
    assert NGINX is not None
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    run = runtime_dir()
    configmap = {
        "metadata": {"annotations": {r.GENERATION_ANNOTATION: "1"}},
        "data": {"nginx.conf": router_conf(port, backends["default"].port, {"a": POD_A}, 1)(run)},
    }
    config = r.RouterConfig(
        configmap=CONFIGMAP,
        namespace=NS,
        api_url="http://unused",
        token_file="",
        ca_file="",
        runtime_dir=run,
        nginx=NGINX,
    )
    router = r.Router(config, lambda request: Response(200, configmap))
    try:
        router.round()
        assert router.healthz()[1]["generation"] == 1

        def send(n: int) -> None:
            with contextlib.closing(http.client.HTTPConnection(ROUTER_IP, port, timeout=30)) as conn:
                for _ in range(n):
                    assert get(conn, "/rotate", {"kubernetes-route-as": "a"})["backend"] == "a"

        def counted() -> int:
            return sum(e["count"] for e in router.stats_answer(None)["entries"] if e["route"] == "a")

        send(3)
        wait_until(lambda: counted() == 3, 10, "three requests counted")
        monkeypatch.setattr(r, "ROTATE_BYTES", 1)
        router.round()
        assert os.path.exists(os.path.join(run, "access.log.1"))
        send(2)  # whether nginx has reopened its log yet or not
        wait_until(lambda: counted() == 5, 10, "five requests counted")
        wait_until(lambda: os.path.exists(os.path.join(run, "access.log")), 10, "a new access.log")
    finally:
        router.shutdown()
        for backend in backends.values():
            backend.close()
        shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------ nginx in another container


def start_nginx_container(run: str) -> subprocess.Popen[bytes]:
    """The router pod's nginx container, as a process: the very command the pod runs."""
    assert NGINX is not None
    path = f"{os.path.dirname(NGINX)}:{os.environ.get('PATH', '')}"
    return subprocess.Popen(
        sidecar_command(run), env={"PATH": path}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def kill_container(container: subprocess.Popen[bytes]) -> None:
    """What the runtime does when a container of a shared-PID pod exits: every process of it goes."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(container.pid, signal.SIGKILL)
    container.wait(10)


def test_router_drives_nginx_in_another_container(api: FakeApi, start_router: Callable[..., RouterProcess]) -> None:
    """ROUTER_NGINX_MODE=sidecar: nginx is not the router's child; it waits for the config, is found by its
    pid file, reloaded by signal, and a refused config keeps the previous one (no nginx -t on this side)."""
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    router = start_router(ROUTER_NGINX_MODE="sidecar")
    run = router.wait_for_log(r"runtime=(\S+)").group(1)
    container = start_nginx_container(run)
    try:
        default_port = backends["default"].port

        def backend_for(route: str) -> str:
            conn = http.client.HTTPConnection(ROUTER_IP, port, timeout=30)
            with contextlib.closing(conn):
                return str(get(conn, "/sidecar", {"kubernetes-route-as": route})["backend"])

        time.sleep(0.3)
        assert container.poll() is None, "the nginx container waits for the router's config"
        api.publish(router_conf(port, default_port, {"a": POD_A}, 1)(run), 1)
        body = wait_until(lambda: (h := router.healthz())["generation"] == 1 and h, 10, "generation 1 live")
        master = body["nginx_pid"]
        assert master not in (None, router.proc.pid) and body["ok"]
        assert (backend_for("a"), backend_for("b")) == ("a", "default")

        api.publish(router_conf(port, default_port, {"a": POD_A, "b": POD_B}, 2)(run), 2)
        body = wait_until(lambda: (h := router.healthz())["generation"] == 2 and h, 10, "generation 2 live")
        assert (body["ok"], body["reloads"], body["nginx_pid"]) == (True, 1, master)
        assert backend_for("b") == "b"

        api.publish("this is not nginx;\n", 3)
        body = wait_until(lambda: (h := router.healthz())["error"] and h, 10, "the error of generation 3")
        assert (body["generation"], body["ok"]) == (2, False)
        assert "kept the previous config" in body["error"] and 'unknown directive "this"' in body["error"]
        assert backend_for("b") == "b"

        # The container dies and the kubelet starts it again: it finds the last good config at once.
        api.publish(router_conf(port, default_port, {"a": POD_A}, 4)(run), 4)
        wait_until(lambda: router.healthz()["generation"] == 4, 10, "generation 4 live")
        kill_container(container)
        container = start_nginx_container(run)
        body = wait_until(
            lambda: (h := router.healthz())["nginx_pid"] not in (None, master) and h, 20, "the restarted nginx"
        )
        assert (body["generation"], body["ok"]) == (4, True)
        assert backend_for("b") == "default"
        assert (body["generation"], body["ok"]) == (4, True)
        assert backend_for("b") == "default"
    finally:
        router.proc.terminate()
        router.proc.wait(15)
        kill_container(container)
        for backend in backends.values():
            backend.close()


def test_a_wake_applies_a_new_config_without_waiting_for_the_poll(
    api: FakeApi, start_router: Callable[..., RouterProcess]
) -> None:
    """POST /wake (what the manager sends after changing the ConfigMap) reads it at once."""
    port = free_port_on(ROUTER_IP, POD_A, POD_B)
    backends = http_backends(port)
    try:
        router = start_router(ROUTER_POLL_SECONDS="60")
        run = router.wait_for_log(r"runtime=(\S+)").group(1)
        default_port = backends["default"].port
        api.publish(router_conf(port, default_port, {"a": POD_A}, 1)(run), 1)
        conn = http.client.HTTPConnection(ROUTER_IP, router.stats_port, timeout=10)
        with contextlib.closing(conn):
            conn.request("POST", "/wake", body=b"")
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())) == (200, {"woken": True})
        woken = time.monotonic()
        wait_until(lambda: router.healthz()["generation"] == 1, 10, "generation 1 after the wake")
        assert time.monotonic() - woken < 5, "the wake, not the 60 s poll, applied it"
    finally:
        for backend in backends.values():
            backend.close()
