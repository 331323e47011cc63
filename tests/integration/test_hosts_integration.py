"""Name mapping against real sockets on loopback and real subprocesses.

A tiny HTTP server listens on 127.1.1.7 (Linux: all of 127/8 is local) and answers with
the Host header it got, so each test proves the request reached it by the cluster name.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pytest_bridge.core.names import Endpoint, EndpointPort, NameMapping, map_endpoints
from pytest_bridge.local import hosts
from pytest_bridge.local._resolver_site import pytest_bridge_resolver as resolver_module
from pytest_bridge.local.hosts import (
    SITE_DIR,
    can_isolate_hosts,
    loopback_bindable,
    resolving,
    subprocess_env,
    wrap_argv,
    write_session_hosts_file,
)

IP = "127.1.1.7"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.1.1.x needs lo0 aliases off Linux")


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"host={self.headers['Host']} server={self.connection.getsockname()[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer((IP, 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def mapping(server: int) -> NameMapping:
    return map_endpoints([Endpoint("orders", "bridge-demo", (EndpointPort(server),))], "bridge-demo", first_ip=IP)


@pytest.fixture
def resolver(mapping: NameMapping) -> Iterator[None]:
    with resolving(mapping):
        yield


def expected(host: str, port: int) -> str:
    return f"host={host}:{port} server={IP}"


def test_loopback_ip_is_bindable_without_setup() -> None:
    assert loopback_bindable(IP)
    assert loopback_bindable("127.1.2.254")


# --------------------------------------------------------------------------- in-process


@pytest.mark.usefixtures("resolver")
def test_requests(server: int) -> None:
    with requests.Session() as session:
        session.trust_env = False  # a proxy from the environment would resolve names itself
        response = session.get(f"http://orders:{server}/", timeout=5)
    assert response.text == expected("orders", server)


@pytest.mark.usefixtures("resolver")
def test_urllib(server: int) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://orders.bridge-demo.svc.cluster.local.:{server}/", timeout=5) as response:
        body = response.read().decode()
    assert body == expected("orders.bridge-demo.svc.cluster.local.", server)


@pytest.mark.usefixtures("resolver")
def test_http_client(server: int) -> None:
    connection = http.client.HTTPConnection("ORDERS.bridge-demo", server, timeout=5)
    try:
        connection.request("GET", "/")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    assert body == expected("ORDERS.bridge-demo", server)


@pytest.mark.asyncio
@pytest.mark.usefixtures("resolver")
async def test_asyncio(server: int) -> None:
    infos = await asyncio.get_running_loop().getaddrinfo("orders.bridge-demo.svc", server, type=socket.SOCK_STREAM)
    assert {info[4] for info in infos} == {(IP, server)}
    reader, writer = await asyncio.open_connection("orders.bridge-demo.svc", server)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: orders.bridge-demo.svc\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert data.decode().endswith(f"host=orders.bridge-demo.svc server={IP}")


def test_names_stop_resolving_after_uninstall(mapping: NameMapping) -> None:
    original = socket.getaddrinfo
    with resolving(mapping):
        assert socket.gethostbyname("orders.bridge-demo") == IP
    assert socket.getaddrinfo is original
    assert resolver_module.active_tables() == ()


# --------------------------------------------------------------------------- Python subprocesses


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10, check=False)


def test_python_subprocess_resolves_through_sitecustomize(mapping: NameMapping, server: int, tmp_path: Path) -> None:
    env = subprocess_env(mapping, tmp_path)
    code = (
        "import socket, urllib.request;"
        "print(socket.gethostbyname('orders'));"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}));"
        f"print(opener.open('http://orders.bridge-demo:{server}/', timeout=5).read().decode())"
    )
    result = run([sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [IP, expected("orders.bridge-demo", server)]
    assert result.stderr == ""


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system Python")
def test_foreign_interpreter_without_pytest_bridge(mapping: NameMapping, tmp_path: Path) -> None:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env = subprocess_env(mapping, tmp_path, base=base)
    code = "import socket, sys; print(socket.gethostbyname('orders'), 'pytest_bridge' in sys.modules)"
    result = run(["/usr/bin/python3", "-c", code], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [IP, "False"]


def test_sitecustomize_chains_to_the_next_one(mapping: NameMapping, tmp_path: Path) -> None:
    other = tmp_path / "other-site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    env = subprocess_env(mapping, tmp_path / "session", base={**os.environ, "PYTHONPATH": str(other)})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), str(other)]
    code = "import os, socket, sitecustomize; print(os.environ['CHAINED'], socket.gethostbyname('orders'), sitecustomize.__file__)"
    result = run([sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["yes", IP, str(other / "sitecustomize.py")]


def test_sitecustomize_reports_a_missing_hosts_file_and_starts_anyway(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SITE_DIR), "PYTEST_BRIDGE_HOSTS_FILE": str(tmp_path / "gone")}
    result = run([sys.executable, "-c", "print('started')"], env)
    assert result.returncode == 0
    assert result.stdout == "started\n"
    assert "pytest-bridge: cluster names will not resolve" in result.stderr


# --------------------------------------------------------------------------- any subprocess: private /etc/hosts

needs_isolation = pytest.mark.skipif(not can_isolate_hosts(), reason="no mount namespaces here (unshare)")


@needs_isolation
def test_non_python_subprocess_sees_a_private_etc_hosts(mapping: NameMapping, server: int, tmp_path: Path) -> None:
    real = Path("/etc/hosts").read_text()
    hosts_file = write_session_hosts_file(mapping, tmp_path, "s1")
    result = run(wrap_argv(["getent", "hosts", "orders.bridge-demo"], hosts_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == IP
    result = run(wrap_argv(["getent", "hosts", "localhost"], hosts_file))  # system entries still there
    assert result.returncode == 0, result.stderr
    assert Path("/etc/hosts").read_text() == real  # nothing leaked out of the namespace
    assert run(["getent", "hosts", "orders.bridge-demo.svc.cluster.local"]).returncode != 0


@needs_isolation
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_reaches_the_service_by_name(mapping: NameMapping, server: int, tmp_path: Path) -> None:
    hosts_file = write_session_hosts_file(mapping, tmp_path, "s1")
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*", f"http://orders.bridge-demo.svc:{server}/"]
    result = run(wrap_argv(argv, hosts_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected("orders.bridge-demo.svc", server)


def _others_can_run(path: Path) -> bool:
    """Whether another user can reach ``path`` (every parent folder searchable by others)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.is_dir())


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to try as an unprivileged user"
)
@pytest.mark.skipif(
    not _others_can_run(Path(sys.executable).parent) or not _others_can_run(Path(__file__).parent),
    reason="the checkout or its venv is not reachable by another user (private clone folder)",
)
def test_unprivileged_user_keeps_its_uid(mapping: NameMapping) -> None:
    # The pytest process is root here; measure what an ordinary user gets.
    with tempfile.TemporaryDirectory() as directory:
        Path(directory).chmod(0o755)
        hosts_file = write_session_hosts_file(mapping, Path(directory), "s1")
        code = (
            "import subprocess, sys; from pathlib import Path; from pytest_bridge.local import hosts;"
            "style = hosts._isolation_style(); print(style);"
            f"argv = hosts.wrap_argv(['sh', '-c', 'id -u; getent hosts orders'], Path({str(hosts_file)!r})) if style else None;"
            "style and sys.stdout.write(subprocess.run(argv, capture_output=True, text=True).stdout)"
        )
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(hosts.__file__).parents[1])}
        result = run([*drop, sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if lines[0] == "None":
        pytest.skip("unprivileged user namespaces are disabled here")
    assert lines[0] == "userns-keep-id"
    assert lines[1] == "65534"
    assert lines[2].split()[0] == IP
