"""The in-cluster API client against a real HTTP/1.1 server on loopback: kept connections."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pytest_bridge_agent import kubeapi


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append((self.path, self.headers.get("Authorization"), self.client_address[1]))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path.endswith("close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None, int]] = []


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


@pytest.fixture
def client(server: _Server, tmp_path: Path) -> Iterator[kubeapi.ApiClient]:
    (tmp_path / "token").write_text("t1")
    host, port = server.server_address[:2]
    api = kubeapi.ApiClient(kubeapi.ApiEndpoint(f"http://{host}:{port}", str(tmp_path / "token"), ca_file=""))
    yield api
    api.close()


def test_requests_of_one_thread_share_one_connection_and_reread_the_token(
    server: _Server, client: kubeapi.ApiClient, tmp_path: Path
) -> None:
    api = client
    for i in range(5):
        if i == 3:
            (tmp_path / "token").write_text("t2")  # a projected token rotated
        assert api.send(kubeapi.Request("GET", f"/x{i}")).body == {"path": f"/x{i}"}
    assert api.connections == 1
    assert len({port for _, _, port in server.requests}) == 1
    assert [auth for _, auth, _ in server.requests] == ["Bearer t1"] * 3 + ["Bearer t2"] * 2


def test_a_connection_the_server_closes_is_replaced(server: _Server, client: kubeapi.ApiClient, tmp_path: Path) -> None:
    api = client
    assert api.send(kubeapi.Request("GET", "/a")).status == 200
    assert api.send(kubeapi.Request("GET", "/and-close")).status == 200  # Connection: close
    assert api.send(kubeapi.Request("GET", "/b")).status == 200
    assert api.connections == 2


def test_a_kept_connection_closed_under_it_is_sent_again_once(
    server: _Server, client: kubeapi.ApiClient, tmp_path: Path
) -> None:
    api = client
    assert api.send(kubeapi.Request("GET", "/a")).status == 200
    kept = api._kept.conn
    assert kept is not None and kept.sock is not None
    kept.sock.shutdown(2)  # as a server closing an idle connection looks to the next request
    assert api.send(kubeapi.Request("GET", "/b")).body == {"path": "/b"}
    assert api.connections == 2
    assert [path for path, _, _ in server.requests] == ["/a", "/b"]


def test_an_idle_connection_is_not_reused(client: kubeapi.ApiClient) -> None:
    api = client
    api.send(kubeapi.Request("GET", "/a"))
    api.keep_idle = 0.0
    api.send(kubeapi.Request("GET", "/b"))
    assert api.connections == 2


def test_each_thread_has_its_own_connection(server: _Server, client: kubeapi.ApiClient, tmp_path: Path) -> None:
    api = client
    api.send(kubeapi.Request("GET", "/main"))
    other = threading.Thread(target=lambda: [api.send(kubeapi.Request("GET", "/other")) for _ in range(3)])
    other.start()
    other.join()
    api.send(kubeapi.Request("GET", "/main-again"))
    assert api.connections == 2
    ports = {path: port for path, _, port in server.requests}
    assert ports["/main"] == ports["/main-again"] != ports["/other"]


def test_no_server_is_an_oserror(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    api = kubeapi.ApiClient(kubeapi.ApiEndpoint("http://127.0.0.1:9", str(tmp_path / "token"), ca_file=""))
    with pytest.raises(OSError):
        api.send(kubeapi.Request("GET", "/"), timeout=2)
