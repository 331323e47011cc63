from __future__ import annotations

import atexit
import errno
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_bridge.core.errors import NameMappingError
from pytest_bridge.core.names import (
    AddressMode,
    Endpoint,
    EndpointPort,
    NameMapping,
    map_endpoints,
    parse_hosts_blocks,
    update_hosts_text,
)
from pytest_bridge.local import hosts
from pytest_bridge.local._resolver_site import pytest_bridge_resolver as resolver
from pytest_bridge.local.hosts import (
    SITE_DIR,
    HostsTable,
    Mechanisms,
    SystemHostsBlock,
    block_id,
    choose_mechanisms,
    describe,
    hosts_table,
    install_resolver,
    remove_stale_blocks,
    resolving,
    split_block_id,
    subprocess_env,
    uninstall_resolver,
    write_session_hosts_file,
)
from pytest_bridge.settings import NameMappingMode

ORDERS = Endpoint("orders", "bridge-demo", (EndpointPort(80, "http"),))
LEDGER = Endpoint("ledger", "finance", (EndpointPort(5432),))
SYSTEM = "127.0.0.1\tlocalhost\n10.0.0.5 nas # the NAS\n"
HOOKED = ("getaddrinfo", "gethostbyname", "gethostbyname_ex")


def mapping(first_ip: str = "127.1.1.7") -> NameMapping:
    return map_endpoints([ORDERS, LEDGER], "bridge-demo", first_ip=first_ip)


class FakeDns:
    """Stands in for the system resolver so no test touches real DNS."""

    def __init__(self) -> None:
        self.asked: list[object] = []

    def getaddrinfo(  # noqa: PLR0917 - the signature of socket.getaddrinfo
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[tuple[Any, Any, int, str, Any]]:
        self.asked.append(host)
        if host == "example.org":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        if isinstance(host, str) and host[:1].isdigit():
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, port))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def gethostbyname(self, host: str) -> str:
        self.asked.append(host)
        return "93.184.216.34"

    def gethostbyname_ex(self, host: str) -> tuple[str, list[str], list[str]]:
        self.asked.append(host)
        return host, [], ["93.184.216.34"]


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    for name in HOOKED:
        monkeypatch.setattr(socket, name, getattr(fake, name))
    return fake


def current() -> dict[str, object]:
    return {name: getattr(socket, name) for name in HOOKED}


# --------------------------------------------------------------------------- table and parsing


def test_table_lookup_is_case_insensitive_and_tolerates_trailing_dot() -> None:
    table = hosts_table(mapping())
    entry = (
        "127.1.1.7",
        ("orders", "orders.bridge-demo", "orders.bridge-demo.svc", "orders.bridge-demo.svc.cluster.local"),
    )
    assert table.lookup("orders") == entry
    assert table.lookup("ORDERS.Bridge-Demo.svc.cluster.local.") == entry
    assert table.lookup(b"orders.bridge-demo") == entry
    assert table.lookup("ledger.finance")[0] == "127.1.1.8"  # type: ignore[index]
    assert table.lookup("ledger") is None  # bare names only for the bridged namespace
    assert table.lookup("") is None
    assert table.lookup(None) is None
    assert table.lookup(b"\xff") is None


def test_table_first_line_wins() -> None:
    table = HostsTable([("127.1.1.1", ["a", "b"]), ("127.1.1.2", ["B", "c"])])
    assert table.lookup("b") == ("127.1.1.1", ("a", "b"))
    assert table.lookup("c") == ("127.1.1.2", ("b", "c"))
    assert len(table) == 2


def test_single_ip_mappings_cannot_be_resolved() -> None:
    single = map_endpoints([ORDERS], "bridge-demo", mode=AddressMode.SINGLE_IP, allocate_port=lambda p: p + 10000)
    with pytest.raises(NameMappingError, match="loopback-ips"):
        hosts_table(single)


def test_parse_hosts_text_takes_only_our_blocks_when_present() -> None:
    assert resolver.parse_hosts_text(SYSTEM) == [("127.0.0.1", ("localhost",)), ("10.0.0.5", ("nas",))]
    text = write_text_with_block()
    assert resolver.parse_hosts_text(text) == [
        (
            "127.1.1.7",
            ("orders", "orders.bridge-demo", "orders.bridge-demo.svc", "orders.bridge-demo.svc.cluster.local"),
        ),
        ("127.1.1.8", ("ledger.finance", "ledger.finance.svc", "ledger.finance.svc.cluster.local")),
    ]


def write_text_with_block() -> str:
    return update_hosts_text(SYSTEM, mapping(), "s1")


# --------------------------------------------------------------------------- in-process resolver


def test_resolver_answers_mapped_names_and_falls_through(fake_dns: FakeDns) -> None:
    with resolving(mapping()):
        assert socket.gethostbyname("Orders.") == "127.1.1.7"
        assert socket.gethostbyname_ex("orders.bridge-demo") == (
            "orders",
            ["orders.bridge-demo", "orders.bridge-demo.svc", "orders.bridge-demo.svc.cluster.local"],
            ["127.1.1.7"],
        )
        infos = socket.getaddrinfo("ledger.finance.svc", 5432, type=socket.SOCK_STREAM)
        assert [info[4] for info in infos] == [("127.1.1.8", 5432)]
        assert socket.getaddrinfo("example.org", 443)[0][4] == ("93.184.216.34", 443)
        assert socket.gethostbyname("example.org") == "93.184.216.34"
    assert fake_dns.asked == ["127.1.1.8", "example.org", "example.org"]


def test_resolver_canonname_and_numeric_host_flag(fake_dns: FakeDns) -> None:
    with resolving(mapping()):
        infos = socket.getaddrinfo("orders.bridge-demo.svc", 80, flags=socket.AI_CANONNAME)
        assert infos[0][3] == "orders"
        with pytest.raises(socket.gaierror):  # AI_NUMERICHOST forbids name lookups, ours included
            socket.getaddrinfo("orders", 80, flags=socket.AI_NUMERICHOST)


def test_resolver_real_getaddrinfo_keeps_family_semantics() -> None:
    with resolving(mapping()):
        assert socket.getaddrinfo("orders", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4] == ("127.1.1.7", 80)
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("orders", 80, socket.AF_INET6)  # an IPv4-only name, as from /etc/hosts


def test_uninstall_restores_the_exact_originals(fake_dns: FakeDns) -> None:
    before = current()
    token = hosts.install_resolver(mapping())
    assert socket.getaddrinfo is not before["getaddrinfo"]
    hosts.uninstall_resolver(token)
    assert current() == before
    hosts.uninstall_resolver(token)  # idempotent
    assert current() == before


def test_installs_stack_newest_first_and_uninstall_in_any_order(fake_dns: FakeDns) -> None:
    before = current()
    first = hosts.install_resolver(mapping("127.1.1.7"))
    second = hosts.install_resolver(map_endpoints([ORDERS], "bridge-demo", first_ip="127.1.2.7"))
    assert socket.gethostbyname("orders") == "127.1.2.7"
    assert socket.gethostbyname("ledger.finance") == "127.1.1.8"  # only the older table has it
    hosts.uninstall_resolver(first)
    assert socket.gethostbyname("orders") == "127.1.2.7"
    assert socket.gethostbyname("ledger.finance") == "93.184.216.34"
    assert current() != before
    hosts.uninstall_resolver(second)
    assert current() == before


def test_a_wrapper_installed_over_ours_keeps_working(fake_dns: FakeDns, monkeypatch: pytest.MonkeyPatch) -> None:
    before = current()
    token = hosts.install_resolver(mapping())
    ours = socket.gethostbyname
    seen: list[str] = []

    def theirs(name: str) -> str:
        seen.append(name)
        return ours(name)

    monkeypatch.setattr(socket, "gethostbyname", theirs)
    hosts.uninstall_resolver(token)
    assert socket.gethostbyname is theirs  # not torn out from under them
    assert socket.gethostbyname("orders") == "93.184.216.34"  # our hook is inert
    token = hosts.install_resolver(mapping())  # reuses the buried hook instead of wrapping theirs
    assert socket.gethostbyname is theirs
    assert socket.gethostbyname("orders") == "127.1.1.7"
    assert [name for name in seen if "probe" not in name] == ["orders", "orders"]
    hosts.uninstall_resolver(token)
    monkeypatch.setattr(socket, "gethostbyname", ours)  # they unwrap: our hook is on top again, inert
    token = hosts.install_resolver(mapping())
    hosts.uninstall_resolver(token)
    assert current() == before


def test_resolver_is_thread_safe(fake_dns: FakeDns) -> None:
    before = current()
    errors: list[BaseException] = []
    table_mapping = mapping()

    def churn() -> None:
        try:
            for _ in range(200):
                token = hosts.install_resolver(table_mapping)
                assert socket.gethostbyname("orders") == "127.1.1.7"
                hosts.uninstall_resolver(token)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=churn) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert resolver.active_tables() == ()
    assert current() == before


# --------------------------------------------------------------------------- subprocess environment and wrapping


def test_session_hosts_file_is_system_content_plus_our_block(tmp_path: Path) -> None:
    system = tmp_path / "etc-hosts"
    system.write_text(SYSTEM)
    written = write_session_hosts_file(mapping(), tmp_path / "session", "s1", system_hosts=system)
    text = written.read_text()
    assert written == tmp_path / "session" / "hosts"
    assert text.startswith(SYSTEM)
    assert [b.session_id for b in parse_hosts_blocks(text)] == ["s1"]
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    broken = "# >>> pytest-bridge session=dead >>>\n127.1.1.1 x\n"
    system.write_text(broken)
    text = write_session_hosts_file(mapping(), tmp_path / "session", "s1", system_hosts=system).read_text()
    assert text.startswith(broken)
    assert resolver.HostsTable(resolver.parse_hosts_text(text)).lookup("orders") is not None


def test_subprocess_env(tmp_path: Path) -> None:
    system = tmp_path / "etc-hosts"
    system.write_text(SYSTEM)
    base = {"PATH": "/usr/bin", "PYTHONPATH": os.pathsep.join(["/src", str(SITE_DIR)])}
    env = subprocess_env(mapping(), tmp_path / "run-1", base=base, system_hosts=system)
    assert env["PYTHONPATH"] == os.pathsep.join([str(SITE_DIR), "/src"])
    assert env["PYTEST_BRIDGE_HOSTS_FILE"] == str(tmp_path / "run-1" / "hosts")
    assert env["PATH"] == "/usr/bin"
    assert "NO_PROXY" not in env
    assert base["PYTHONPATH"].startswith("/src")  # not mutated
    assert [b.session_id for b in parse_hosts_blocks(Path(env["PYTEST_BRIDGE_HOSTS_FILE"]).read_text())] == ["run-1"]


def test_subprocess_env_bypasses_proxies_for_mapped_names(tmp_path: Path) -> None:
    base = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "localhost"}
    env = subprocess_env(mapping(), tmp_path, base=base, system_hosts=tmp_path / "missing")
    no_proxy = env["NO_PROXY"].split(",")
    assert no_proxy[:3] == ["localhost", "127.1.1.7", "orders"]
    assert "ledger.finance.svc.cluster.local" in no_proxy
    assert env["no_proxy"].split(",")[0] == "127.1.1.7"


def test_subprocess_env_leaves_single_ip_mappings_alone(tmp_path: Path) -> None:
    single = map_endpoints([ORDERS], "bridge-demo", mode=AddressMode.SINGLE_IP, allocate_port=lambda p: p + 10000)
    assert subprocess_env(single, tmp_path, base={"A": "1"}) == {"A": "1"}
    assert not (tmp_path / "hosts").exists()


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("root", ["--mount", "--propagation", "private", "--", "/bin/sh", "-c"]),
        ("userns-root", ["--mount", "--propagation", "private", "--map-root-user", "--", "/bin/sh", "-c"]),
        ("userns-keep-id", ["--mount", "--propagation", "private", "--map-root-user", "--", "/bin/sh", "-c"]),
    ],
)
def test_wrap_shapes(style: str, expected: list[str]) -> None:
    argv = hosts._wrap(["getent", "hosts", "orders"], Path("/s/hosts"), style)
    assert argv[0].endswith("unshare")
    assert argv[1 : 1 + len(expected)] == expected
    script = argv[1 + len(expected)]
    assert script.startswith('mount --bind "$0" /etc/hosts && exec ')
    assert ("--map-user=" in script) == (style == "userns-keep-id")
    assert argv[-4:] == ["/s/hosts", "getent", "hosts", "orders"]


def test_wrap_argv_refuses_when_isolation_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "_isolation_style", lambda: None)
    assert not hosts.can_isolate_hosts()
    with pytest.raises(NameMappingError, match="subprocess_env"):
        hosts.wrap_argv(["true"], Path("/s/hosts"))


# --------------------------------------------------------------------------- system hosts file


def test_block_ids_carry_the_pid() -> None:
    assert block_id("ab12", 4242) == "ab12.pid4242"
    assert block_id("ab12") == f"ab12.pid{os.getpid()}"
    assert split_block_id("ab12.pid4242") == ("ab12", 4242)
    assert split_block_id("a.b.pid7") == ("a.b", 7)
    assert split_block_id("legacy") == ("legacy", None)


def test_system_block_is_written_atomically_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    path.chmod(0o640)
    inode = path.stat().st_ino
    with SystemHostsBlock(mapping(), "s1", path) as block:
        text = path.read_text()
        assert text.startswith(SYSTEM)
        assert [b.session_id for b in parse_hosts_blocks(text)] == [block.block_id]
        assert path.stat().st_ino != inode  # replaced, not rewritten
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text() == SYSTEM
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]  # no temp files left behind


def test_system_block_keeps_crlf_and_other_sessions(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    original = "127.0.0.1 localhost\r\n"
    path.write_bytes(original.encode())
    with SystemHostsBlock(mapping(), "s1", path), SystemHostsBlock(mapping("127.1.3.1"), "s2", path):
        data = path.read_bytes().decode()
        assert "\n" not in data.replace("\r\n", "")
        assert len(parse_hosts_blocks(data)) == 2
    assert path.read_bytes().decode() == original


def test_system_block_registers_atexit_until_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", registered.remove)
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    block = SystemHostsBlock(mapping(), "s1", path)
    block.apply()
    assert len(registered) == 1
    registered[0]()  # what the interpreter would do at exit
    assert registered == []
    assert path.read_text() == SYSTEM
    block.remove()  # idempotent


def test_system_block_falls_back_to_in_place_write_on_bind_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(path: Path, text: str) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(hosts, "_replace_atomically", busy)
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    inode = path.stat().st_ino
    with SystemHostsBlock(mapping(), "s1", path):
        assert "orders.bridge-demo" in path.read_text()
        assert path.stat().st_ino == inode
    assert path.read_text() == SYSTEM


def test_system_block_refuses_unwritable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # root may write anything
    with pytest.raises(NameMappingError, match="in-process"):
        SystemHostsBlock(mapping(), "s1", path).apply()
    assert path.read_text() == SYSTEM


def test_concurrent_sessions_do_not_lose_each_others_blocks(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    blocks = [SystemHostsBlock(mapping(f"127.1.{n}.1"), f"s{n}", path) for n in range(1, 9)]
    threads = [threading.Thread(target=block.apply) for block in blocks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(parse_hosts_blocks(path.read_text())) == 8
    for block in blocks:
        block.remove()
    assert path.read_text() == SYSTEM


def test_remove_stale_blocks(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    text = SYSTEM
    for marker in ("live.pid10", "running.pid11", "dead.pid12", "legacy", f"mine.pid{os.getpid()}", "kept"):
        text = update_hosts_text(text, mapping(), marker)
    path.write_text(text)
    removed = remove_stale_blocks(path, {"live", "kept"}, is_alive=lambda pid: pid in {10, 11})
    assert sorted(removed) == sorted(["dead.pid12", f"mine.pid{os.getpid()}", "legacy"])
    assert [b.session_id for b in parse_hosts_blocks(path.read_text())] == ["live.pid10", "running.pid11", "kept"]
    mtime = path.stat().st_mtime_ns
    assert remove_stale_blocks(path, {"live", "kept"}, is_alive=lambda pid: pid in {10, 11}) == []
    assert path.stat().st_mtime_ns == mtime  # nothing to do: not rewritten


def test_remove_stale_blocks_keeps_blocks_applied_by_this_process(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    with SystemHostsBlock(mapping(), "outer", path) as outer:
        assert remove_stale_blocks(path) == []
        assert [b.session_id for b in parse_hosts_blocks(path.read_text())] == [outer.block_id]


def test_dead_sessions_are_swept_before_our_block_is_applied(tmp_path: Path) -> None:
    # as BridgeSession does with the system hosts file: sweep, then apply, remove at close
    path = tmp_path / "hosts"
    path.write_text(update_hosts_text(SYSTEM, mapping(), "crashed.pid999999999"))
    assert remove_stale_blocks(path) == ["crashed.pid999999999"]
    with SystemHostsBlock(mapping(), "s1", path):
        assert [b.session_id for b in parse_hosts_blocks(path.read_text())] == [block_id("s1")]
    assert path.read_text() == SYSTEM


def test_a_failed_apply_leaves_nothing_to_undo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    path = tmp_path / "hosts"
    broken = "# >>> pytest-bridge session=x >>>\n"
    path.write_text(broken)
    block = SystemHostsBlock(mapping(), "s1", path)
    with pytest.raises(NameMappingError, match="by hand"):
        block.apply()
    assert registered == []
    block.remove()
    assert path.read_text() == broken


def test_remove_stale_blocks_uses_real_pids(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(update_hosts_text(SYSTEM, mapping(), "gone.pid999999999"))
    assert remove_stale_blocks(path) == ["gone.pid999999999"]
    assert path.read_text() == SYSTEM


# --------------------------------------------------------------------------- choosing and describing


@pytest.mark.parametrize(
    ("mode", "root", "env", "expected"),
    [
        (NameMappingMode.OFF, True, {"PYTEST_BRIDGE_DISPOSABLE_HOST": "1"}, Mechanisms()),
        (NameMappingMode.AUTO, False, {"PYTEST_BRIDGE_DISPOSABLE_HOST": "1"}, Mechanisms(True, True, True)),
        (NameMappingMode.AUTO, True, {}, Mechanisms(True, True, True)),
        (
            NameMappingMode.AUTO,
            True,
            {"PYTEST_BRIDGE_DISPOSABLE_HOST": "yes"},
            Mechanisms(system_hosts_file=Path("/h")),
        ),
        (NameMappingMode.IN_PROCESS, True, {"PYTEST_BRIDGE_DISPOSABLE_HOST": "1"}, Mechanisms(True, True, True)),
        (NameMappingMode.HOSTS_FILE, False, {}, Mechanisms(system_hosts_file=Path("/h"))),
    ],
)
def test_choose_mechanisms(mode: NameMappingMode, root: bool, env: dict[str, str], expected: Mechanisms) -> None:
    chosen = choose_mechanisms(mode, environ=env, is_root=root, can_isolate=True, system_hosts=Path("/h"))
    assert chosen == expected


def test_describe() -> None:
    assert describe(Mechanisms()) == "off (cluster names do not resolve locally)"
    assert describe(Mechanisms(system_hosts_file=Path("/etc/hosts"))) == "system hosts file /etc/hosts"
    assert describe(Mechanisms(True, True, False)) == (
        "in-process resolver + PYTHONPATH sitecustomize for Python subprocesses"
    )
    assert describe(Mechanisms(True, True, True)).endswith(
        " + private /etc/hosts (mount namespace) for wrapped subprocesses"
    )
    assert describe(NameMappingMode.OFF) == describe(Mechanisms())


def test_in_process_resolver_and_python_subprocesses(tmp_path: Path, fake_dns: FakeDns) -> None:
    # as BridgeSession does with the in-process mechanisms: install, hand env to subprocesses, uninstall
    before = current()
    token = install_resolver(mapping())
    try:
        assert socket.gethostbyname("orders") == "127.1.1.7"
        env = subprocess_env(mapping(), tmp_path, base={}, session_id="s1", system_hosts=tmp_path / "none")
        assert env["PYTEST_BRIDGE_HOSTS_FILE"] == str(tmp_path / "hosts")
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(SITE_DIR)
        assert describe(Mechanisms(True, True, False)).startswith("in-process resolver")
    finally:
        uninstall_resolver(token)
    assert current() == before


def test_system_hosts_block_resolves_through_the_file(tmp_path: Path, fake_dns: FakeDns) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    before = current()
    with SystemHostsBlock(mapping(), "s1", path):
        assert "orders.bridge-demo" in path.read_text()
        assert current() == before  # the system file does the resolving, not our resolver
    assert path.read_text() == SYSTEM
