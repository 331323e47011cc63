from __future__ import annotations

import itertools

import pytest
from k8s_samples import echo_service, ledger_service, orders_service

from pytest_bridge.core.errors import NameMappingError
from pytest_bridge.core.names import (
    AddressMode,
    Endpoint,
    EndpointPort,
    HostsBlock,
    NameMapping,
    env_name,
    hostnames_for,
    loopback_ips,
    map_endpoints,
    parse_hosts_blocks,
    remove_hosts_blocks,
    render_hosts_block,
    service_link_env,
    unsafe_name,
    update_hosts_text,
)

INVENTORY = Endpoint("inventory", "shop", (EndpointPort(80, "http"), EndpointPort(9000, "admin")))
PAYMENTS = Endpoint("payments", "billing", (EndpointPort(8443, "https"),))
KUBERNETES = Endpoint("kubernetes", "default", (EndpointPort(443, "https"),))
DB = Endpoint.external("DB.example.com", [5432])

HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n# my comment\n10.0.0.5 nas\n"


def mapping() -> NameMapping:
    return map_endpoints([INVENTORY, PAYMENTS, KUBERNETES, DB], "shop")


def test_loopback_ips_skip_0_and_255() -> None:
    ips = list(itertools.islice(loopback_ips(), 256))
    assert ips[0] == "127.1.1.1"
    assert ips[253] == "127.1.1.254"
    assert ips[254] == "127.1.2.1"
    assert not any(ip.endswith((".0", ".255")) for ip in ips)
    assert list(loopback_ips("127.255.255.253")) == ["127.255.255.253", "127.255.255.254"]
    with pytest.raises(NameMappingError, match="not a loopback"):
        next(loopback_ips("10.0.0.1"))


def test_hostnames() -> None:
    assert hostnames_for(INVENTORY, "shop") == (
        "inventory",
        "inventory.shop",
        "inventory.shop.svc",
        "inventory.shop.svc.cluster.local",
    )
    assert hostnames_for(PAYMENTS, "shop", "corp.local") == (
        "payments.billing",
        "payments.billing.svc",
        "payments.billing.svc.corp.local",
    )
    assert hostnames_for(DB, "shop") == ("db.example.com",)


def test_map_endpoints_loopback_ips() -> None:
    m = mapping()
    assert [e.ip for e in m.entries] == ["127.1.1.1", "127.1.1.2", "127.1.1.3", "127.1.1.4"]
    inventory = m.service("inventory")
    assert inventory.local_port(80) == 80 and inventory.local_port(9000) == 9000
    assert inventory.address == "127.1.1.1"
    assert m.service("payments", "billing").ip == "127.1.1.2"
    assert m.external("db.EXAMPLE.com").ip == "127.1.1.4"
    assert m.resolve("Inventory.shop.svc.cluster.local.") == "127.1.1.1"
    assert m.resolve("payments") is None  # other namespace: no bare name
    assert m.resolve("nowhere") is None
    with pytest.raises(KeyError):
        m.service("payments")
    with pytest.raises(KeyError):
        m.external("other.example.com")
    with pytest.raises(KeyError):
        inventory.local_port(1)


def test_addresses_another_session_holds_are_skipped() -> None:
    taken = {("127.1.1.1", 9000), ("127.1.1.3", 8443)}  # e.g. a second pytest-bridge session on this machine
    m = map_endpoints(
        [INVENTORY, PAYMENTS], "shop", address_free=lambda ip, port: (ip, port) not in taken
    )  # fmt: skip
    assert [e.ip for e in m.entries] == ["127.1.1.2", "127.1.1.4"]


def test_single_ip_mode_assigns_distinct_ports() -> None:
    free = iter(range(40000, 40100))
    m = map_endpoints(
        [INVENTORY, PAYMENTS], "shop", mode=AddressMode.SINGLE_IP, allocate_port=lambda _remote: next(free)
    )
    assert {e.ip for e in m.entries} == {"127.0.0.1"}
    inventory = m.service("inventory")
    assert [(p.remote_port, p.local_port) for p in inventory.ports] == [(80, 40000), (9000, 40001)]
    assert inventory.address == "127.0.0.1:40000"
    assert m.service("payments", "billing").address == "127.0.0.1:40002"


def test_single_ip_mode_requires_allocator_and_rejects_duplicates() -> None:
    with pytest.raises(NameMappingError, match="allocate_port"):
        map_endpoints([INVENTORY], "shop", mode=AddressMode.SINGLE_IP)
    with pytest.raises(NameMappingError, match=r"127.0.0.1:5000 was handed out for both inventory.shop:80"):
        map_endpoints([INVENTORY], "shop", mode=AddressMode.SINGLE_IP, allocate_port=lambda _p: 5000)


def test_loopback_mode_with_remapped_low_ports() -> None:
    m = map_endpoints([INVENTORY], "shop", allocate_port=lambda p: p + 10000 if p < 1024 else p)
    assert m.service("inventory").address == "127.1.1.1:10080"


def test_duplicate_endpoints_merge_ports_and_name_clash() -> None:
    m = map_endpoints([INVENTORY, Endpoint("inventory", "shop", (EndpointPort(80), EndpointPort(81)))], "shop")
    assert len(m.entries) == 1
    assert [p.remote_port for p in m.entries[0].ports] == [80, 9000, 81]
    with pytest.raises(NameMappingError, match=r"'inventory.shop' is claimed by both"):
        map_endpoints([INVENTORY, Endpoint.external("inventory.shop", [80])], "shop")


def test_endpoint_from_service() -> None:
    orders = Endpoint.from_service(orders_service())
    assert orders == Endpoint("orders", "shop", (EndpointPort(80, "http"), EndpointPort(9090, "grpc")))
    ledger = Endpoint.from_service(ledger_service())
    assert ledger is not None and ledger.headless
    external = echo_service()
    external["spec"] = {"type": "ExternalName", "externalName": "x.example.com"}
    assert Endpoint.from_service(external) is None
    udp = echo_service()
    udp["spec"]["ports"] = [{"port": 53, "protocol": "UDP"}]
    assert Endpoint.from_service(udp) is None


# ----------------------------------------------------------------- hosts file


def test_render_block() -> None:
    block = render_hosts_block(mapping(), "s-1a2b")
    lines = block.splitlines()
    assert lines[0] == "# >>> pytest-bridge session=s-1a2b >>>"
    assert lines[-1] == "# <<< pytest-bridge session=s-1a2b <<<"
    assert "127.1.1.1\tinventory inventory.shop inventory.shop.svc inventory.shop.svc.cluster.local" in lines
    assert "127.1.1.4\tdb.example.com" in lines
    assert block.endswith("\n")


def test_render_refuses_single_ip_and_bad_session() -> None:
    single = map_endpoints([INVENTORY], "shop", mode=AddressMode.SINGLE_IP, allocate_port=lambda p: p)
    with pytest.raises(NameMappingError, match="cannot remap ports"):
        render_hosts_block(single, "s")
    with pytest.raises(NameMappingError, match="marker"):
        render_hosts_block(mapping(), "bad id")


def test_update_parse_and_remove_roundtrip() -> None:
    updated = update_hosts_text(HOSTS, mapping(), "s1")
    assert updated.startswith(HOSTS)
    blocks = parse_hosts_blocks(updated)
    assert [b.session_id for b in blocks] == ["s1"]
    assert blocks[0].entries[0] == (
        "127.1.1.1",
        ("inventory", "inventory.shop", "inventory.shop.svc", "inventory.shop.svc.cluster.local"),
    )
    assert remove_hosts_blocks(updated, {"s1"}) == HOSTS
    # Updating again replaces, never duplicates.
    again = update_hosts_text(updated, map_endpoints([DB], "shop"), "s1")
    assert [b.entries for b in parse_hosts_blocks(again)] == [(("127.1.1.1", ("db.example.com",)),)]


def test_several_sessions_stale_block_removal() -> None:
    text = update_hosts_text(HOSTS, mapping(), "crashed")
    text = update_hosts_text(text, map_endpoints([DB], "shop"), "alive")
    assert [b.session_id for b in parse_hosts_blocks(text)] == ["crashed", "alive"]
    cleaned = remove_hosts_blocks(text, {"crashed"})
    assert [b.session_id for b in parse_hosts_blocks(cleaned)] == ["alive"]
    assert remove_hosts_blocks(text) == HOSTS
    assert remove_hosts_blocks(HOSTS) is HOSTS


def test_windows_line_endings_and_missing_final_newline() -> None:
    text = "127.0.0.1 localhost\r\n10.0.0.5 nas"
    updated = update_hosts_text(text, mapping(), "w")
    assert "10.0.0.5 nas\r\n# >>> pytest-bridge session=w >>>\r\n" in updated
    assert "\n" not in updated.replace("\r\n", "")
    assert remove_hosts_blocks(updated, {"w"}) == "127.0.0.1 localhost\r\n10.0.0.5 nas\r\n"


def test_empty_mapping_only_removes() -> None:
    text = update_hosts_text(HOSTS, mapping(), "s")
    assert update_hosts_text(text, map_endpoints([], "shop"), "s") == HOSTS
    assert update_hosts_text("", mapping(), "s").startswith("# >>> pytest-bridge")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("# >>> pytest-bridge session=a >>>\n127.1.1.1 x\n", "no end marker"),
        ("# <<< pytest-bridge session=a <<<\n", "without its begin"),
        ("# >>> pytest-bridge session=a >>>\n# <<< pytest-bridge session=b <<<\n", "without its begin"),
        ("# >>> pytest-bridge session=a >>>\n# >>> pytest-bridge session=b >>>\n", "starts inside"),
    ],
)
def test_broken_blocks_are_reported_not_guessed(text: str, fragment: str) -> None:
    with pytest.raises(NameMappingError, match=fragment):
        parse_hosts_blocks(text)


def test_parse_ignores_comments_inside_block() -> None:
    text = "# >>> pytest-bridge session=a >>>\n# note\n127.1.1.1 x y # trailing\n# <<< pytest-bridge session=a <<<\n"
    assert parse_hosts_blocks(text) == [HostsBlock("a", (("127.1.1.1", ("x", "y")),), 0, 3)]


# ----------------------------------------------------------------- service links


def test_env_name() -> None:
    assert env_name("redis-primary") == "REDIS_PRIMARY"


def test_service_link_env_as_kubernetes_forms_it() -> None:
    env = service_link_env(mapping())
    assert {k: v for k, v in env.items() if k.startswith("INVENTORY_")} == {
        "INVENTORY_SERVICE_HOST": "127.1.1.1",
        "INVENTORY_SERVICE_PORT": "80",
        "INVENTORY_SERVICE_PORT_HTTP": "80",
        "INVENTORY_SERVICE_PORT_ADMIN": "9000",
        "INVENTORY_PORT": "tcp://127.1.1.1:80",
        "INVENTORY_PORT_80_TCP": "tcp://127.1.1.1:80",
        "INVENTORY_PORT_80_TCP_PROTO": "tcp",
        "INVENTORY_PORT_80_TCP_PORT": "80",
        "INVENTORY_PORT_80_TCP_ADDR": "127.1.1.1",
        "INVENTORY_PORT_9000_TCP": "tcp://127.1.1.1:9000",
        "INVENTORY_PORT_9000_TCP_PROTO": "tcp",
        "INVENTORY_PORT_9000_TCP_PORT": "9000",
        "INVENTORY_PORT_9000_TCP_ADDR": "127.1.1.1",
    }
    assert env["KUBERNETES_SERVICE_HOST"] == "127.1.1.3"
    assert env["KUBERNETES_SERVICE_PORT_HTTPS"] == "443"
    assert not any(k.startswith(("PAYMENTS_", "DB_")) for k in env)  # other namespace, external


def test_service_link_env_single_ip_keys_keep_cluster_ports() -> None:
    free = iter([41000, 41001])
    m = map_endpoints(
        [Endpoint("redis-primary", "shop", (EndpointPort(6379), EndpointPort(26379, "sentinel")))],
        "shop",
        mode=AddressMode.SINGLE_IP,
        allocate_port=lambda _p: next(free),
    )
    env = service_link_env(m)
    assert env["REDIS_PRIMARY_SERVICE_PORT"] == "41000"
    assert env["REDIS_PRIMARY_SERVICE_PORT_SENTINEL"] == "41001"
    assert env["REDIS_PRIMARY_PORT_6379_TCP"] == "tcp://127.0.0.1:41000"
    assert env["REDIS_PRIMARY_PORT_26379_TCP_PORT"] == "41001"


def test_headless_services_get_no_links() -> None:
    ledger = Endpoint.from_service(ledger_service())
    assert ledger is not None
    assert service_link_env(map_endpoints([ledger], "shop")) == {}


# --- names that must not be taken over ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("localhost", "this machine"),
        ("LOCALHOST.", "this machine"),
        ("api.localhost", "this machine"),
        ("api.com", "public domain name (.com)"),
        ("orders.io", "public domain name (.io)"),
        ("orders.de", "public domain name (.de)"),
        ("orders", None),
        ("orders.shop-dev", None),
        ("orders.com.svc", None),
        ("orders.com.svc.cluster.local", None),
    ],
)
def test_unsafe_names(name: str, why: str | None) -> None:
    reason = unsafe_name(name)
    assert (reason is None) if why is None else (reason is not None and why in reason)


def test_a_service_called_localhost_and_a_tld_namespace_do_not_take_over_names() -> None:
    local = Endpoint("localhost", "shop", (EndpointPort(80),))
    assert hostnames_for(local, "shop") == ("localhost.shop", "localhost.shop.svc", "localhost.shop.svc.cluster.local")
    public = Endpoint("api", "com", (EndpointPort(80),))
    assert hostnames_for(public, "com") == ("api", "api.com.svc", "api.com.svc.cluster.local")
