from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_bridge.core.plan import LocalPortSpec
from pytest_bridge.settings import (
    CONFIG_FILE_NAME,
    DEFAULT_AGENT_IMAGE,
    BridgeSettings,
    ContainerChoice,
    NameMappingMode,
    add_options,
    resolve,
)


class _Options:
    """Registers the options the way plugin.py's pytest_addoption will."""

    @staticmethod
    def pytest_addoption(parser: pytest.Parser) -> None:
        add_options(parser)


# `-p no:bridge`: our own plugin object registers the options, whatever plugin.py does.
NO_ENTRY_POINT = ("-p", "no:bridge")
# Inner runs have no ini of ours; keep unrelated plugins' config warnings out of them.
INNER_RUN = (*NO_ENTRY_POINT, "-p", "no:asyncio", "-p", "no:cacheprovider")


@pytest.fixture
def parse(pytester: pytest.Pytester):  # type: ignore[no-untyped-def]
    pytester.plugins.append(_Options())

    def _parse(*args: str, ini: str = "") -> pytest.Config:
        if ini:
            pytester.makeini("[pytest]\n" + textwrap.dedent(ini))
        return pytester.parseconfig(*NO_ENTRY_POINT, *args)

    return _parse


def test_defaults(parse) -> None:  # type: ignore[no-untyped-def]
    settings = resolve(parse(), env={})
    assert settings == BridgeSettings()
    assert settings.agent_image == DEFAULT_AGENT_IMAGE == "python:3.11.13-slim-bookworm"
    assert settings.routing_image == "nginx:1.28.0" and settings.code == "configmap"
    assert settings.name_mapping is NameMappingMode.AUTO
    assert settings.connect_timeout == 60.0 and settings.restore_ttl == 60.0
    assert settings.namespace is None and settings.config_file is None and not settings.isolate
    assert settings.sources == {}


def test_every_setting_from_the_cli(parse, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = parse(
        "--bridge-service=orders",
        "--bridge-service",
        "payments,inventory",
        "--bridge-namespace=shop",
        "--bridge-context=kind-dev",
        f"--bridge-kubeconfig={tmp_path}/kc",
        "--bridge-container=app",
        "--bridge-container=payments=server",
        "--bridge-local-port=8080",
        "--bridge-local-port=9090=19090",
        "--bridge-local-port=orders:7000=17000",
        "--bridge-agent-image=reg/agent:2",
        f"--bridge-config-file={tmp_path}/c.yaml",
        "--bridge-name-mapping=hosts-file",
        "--bridge-connect-timeout=2.5",
        "--bridge-restore-ttl=30",
        "--bridge-isolate",
        "--bridge-route-prefix=ci",
    )
    s = resolve(config, env={})
    assert s.services == ("orders", "payments", "inventory")
    assert (s.namespace, s.context, s.kubeconfig) == ("shop", "kind-dev", tmp_path / "kc")
    assert s.containers == (ContainerChoice("app"), ContainerChoice("server", "payments"))
    assert s.container_for("payments") == "server"
    assert s.container_for("orders") == "app"
    assert s.local_ports == (LocalPortSpec(8080), LocalPortSpec(19090, 9090), LocalPortSpec(17000, 7000, "orders"))
    assert s.local_ports_for("payments") == (LocalPortSpec(8080), LocalPortSpec(19090, 9090))
    assert s.agent_image == "reg/agent:2"
    assert s.config_file == tmp_path / "c.yaml"
    assert s.name_mapping is NameMappingMode.HOSTS_FILE
    assert (s.connect_timeout, s.restore_ttl) == (2.5, 30.0)
    assert s.isolate is True and s.route_prefix == "ci"
    assert s.sources["services"] == "--bridge-service"
    assert s.sources["local_ports"] == "--bridge-local-port"


def test_container_for_without_choice() -> None:
    assert BridgeSettings().container_for("orders") is None
    only_scoped = BridgeSettings(containers=(ContainerChoice("x", "payments"),))
    assert only_scoped.container_for("orders") is None


def test_precedence_marker_cli_env_ini(parse) -> None:  # type: ignore[no-untyped-def]
    ini = "bridge_namespace = from-ini\nbridge_service = ini-a, ini-b\nbridge_connect_timeout = 5\n"
    env = {"PYTEST_BRIDGE_NAMESPACE": "from-env", "PYTEST_BRIDGE_SERVICE": "env-a"}
    config = parse("--bridge-namespace=from-cli", ini=ini)
    s = resolve(config, env=env)
    assert s.namespace == "from-cli"
    assert s.services == ("env-a",)  # a whole list from one source, not merged
    assert s.connect_timeout == 5.0
    assert s.sources == {
        "namespace": "--bridge-namespace",
        "services": "PYTEST_BRIDGE_SERVICE",
        "connect_timeout": "ini bridge_connect_timeout",
    }
    s = resolve(config, {"namespace": "from-marker", "service": ["m1", "m2"]}, env=env)
    assert (s.namespace, s.services) == ("from-marker", ("m1", "m2"))
    assert s.sources["namespace"] == "marker argument namespace="
    assert resolve(config, env={}).services == ("ini-a", "ini-b")
    assert resolve(parse(ini=ini), env={"PYTEST_BRIDGE_NAMESPACE": "from-env"}).namespace == "from-env"


def test_env_defaults_to_os_environ(parse, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTEST_BRIDGE_LOCAL_PORT", "orders:9090=8080, 3000")
    monkeypatch.setenv("PYTEST_BRIDGE_ISOLATE", "yes")
    monkeypatch.setenv("PYTEST_BRIDGE_NAMESPACE", "  ")  # blank: unset
    s = resolve(parse())
    assert s.local_ports == (LocalPortSpec(8080, 9090, "orders"), LocalPortSpec(3000))
    assert s.isolate is True
    assert s.namespace is None


def test_marker_values_may_be_native_types(parse) -> None:  # type: ignore[no-untyped-def]
    s = resolve(
        parse(),
        {"local_port": [8080, "9090=1"], "connect_timeout": 3, "isolate": False, "service": "orders"},
        env={"PYTEST_BRIDGE_ISOLATE": "1"},
    )
    assert s.local_ports == (LocalPortSpec(8080), LocalPortSpec(1, 9090))
    assert s.connect_timeout == 3.0 and s.isolate is False and s.services == ("orders",)


def test_duplicate_services_are_dropped_keeping_order(parse) -> None:  # type: ignore[no-untyped-def]
    assert resolve(parse("--bridge-service=a,b,a"), env={}).services == ("a", "b")


def test_isolate_flag_takes_an_optional_value(parse) -> None:  # type: ignore[no-untyped-def]
    assert resolve(parse("--bridge-isolate=false"), env={"PYTEST_BRIDGE_ISOLATE": "true"}).isolate is False


@pytest.mark.parametrize(
    ("args", "env", "ini", "where", "valid"),
    [
        (("--bridge-local-port=http",), {}, "", "from --bridge-local-port", "'9090=8080'"),
        ((), {"PYTEST_BRIDGE_LOCAL_PORT": "70000"}, "", "from PYTEST_BRIDGE_LOCAL_PORT", "1-65535"),
        ((), {}, "bridge_local_port = 1=2=3\n", "from ini bridge_local_port", "SERVICE:TARGET=LOCAL"),
        (("--bridge-local-port=Orders:1=2",), {}, "", "--bridge-local-port", "SERVICE:TARGET=LOCAL"),
        (("--bridge-local-port=0",), {}, "", "--bridge-local-port", "1-65535"),
        (("--bridge-service=Orders",), {}, "", "--bridge-service", "DNS-1035"),
        (("--bridge-namespace=a_b",), {}, "", "--bridge-namespace", "DNS-1123"),
        (("--bridge-container=a=b=c",), {}, "", "--bridge-container", "SERVICE=CONTAINER"),
        (("--bridge-container=orders=",), {}, "", "--bridge-container", "CONTAINER"),
        (("--bridge-name-mapping=dns",), {}, "", "--bridge-name-mapping", "'in-process'"),
        (("--bridge-connect-timeout=0",), {}, "", "--bridge-connect-timeout", "greater than 0"),
        ((), {"PYTEST_BRIDGE_RESTORE_TTL": "soon"}, "", "PYTEST_BRIDGE_RESTORE_TTL", "seconds"),
        ((), {"PYTEST_BRIDGE_CONNECT_TIMEOUT": "inf"}, "", "PYTEST_BRIDGE_CONNECT_TIMEOUT", "seconds"),
        ((), {"PYTEST_BRIDGE_ISOLATE": "maybe"}, "", "PYTEST_BRIDGE_ISOLATE", "true"),
        (("--bridge-route-prefix=Has_Caps",), {}, "", "--bridge-route-prefix", "DNS-label"),
        (("--bridge-agent-image= ",), {}, "", "--bridge-agent-image", "non-empty"),
    ],
)
def test_bad_values_name_value_source_and_valid_forms(  # type: ignore[no-untyped-def]
    parse, *, args: tuple[str, ...], env: dict[str, str], ini: str, where: str, valid: str
) -> None:
    config = parse(*args, ini=ini)
    with pytest.raises(pytest.UsageError) as info:
        resolve(config, env=env)
    message = str(info.value)
    assert where in message
    assert valid in message
    assert "invalid value" in message


def test_bad_marker_value_and_unknown_marker_argument(parse) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pytest.UsageError, match=r"'x' from marker argument local_port="):
        resolve(parse(), {"local_port": "x"}, env={})
    with pytest.raises(pytest.UsageError, match=r"unknown bridge marker argument.*services.*valid: .*service"):
        resolve(parse(), {"services": "orders"}, env={})


def test_default_config_file_in_rootdir(parse, pytester: pytest.Pytester) -> None:  # type: ignore[no-untyped-def]
    pytester.makefile(".yaml", **{CONFIG_FILE_NAME.removesuffix(".yaml"): "version: 0.1\n"})
    s = resolve(parse(ini="\n"), env={})
    assert s.config_file == pytester.path / CONFIG_FILE_NAME
    assert s.sources["config_file"] == "default (rootdir)"


def test_relative_ini_paths_are_relative_to_the_ini_file(parse, pytester: pytest.Pytester) -> None:  # type: ignore[no-untyped-def]
    s = resolve(parse(ini="bridge_config_file = conf/b2k.yaml\nbridge_kubeconfig = kc\n"), env={})
    assert s.config_file == pytester.path / "conf" / "b2k.yaml"
    assert s.kubeconfig == pytester.path / "kc"
    cli = resolve(parse("--bridge-kubeconfig=rel/kc"), env={})
    assert cli.kubeconfig == Path("rel/kc")


def test_resolve_without_registered_ini_keys(pytester: pytest.Pytester) -> None:
    # Options not registered at all: ini lookups are skipped, CLI lookups fall back to defaults.
    config = pytester.parseconfig(*NO_ENTRY_POINT)
    assert resolve(config, env={"PYTEST_BRIDGE_SERVICE": "orders"}).services == ("orders",)


def test_options_show_in_help(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from pytest_bridge.settings import add_options as pytest_addoption\n")
    result = pytester.runpytest_inprocess(*INNER_RUN, "--help")
    result.stdout.fnmatch_lines(
        ["*bridge*", "*--bridge-service=NAME*", "*--bridge-local-port=*", "*bridge_connect_timeout*"]
    )


CONFTEST = """
import pytest
from pytest_bridge.settings import add_options, resolve

def pytest_addoption(parser):
    add_options(parser)

def pytest_configure(config):
    config.addinivalue_line("markers", "bridge(**settings): pytest-bridge settings for a test")
    config.bridge_base = resolve(config)

@pytest.fixture
def bridge_settings(request):
    marker = request.node.get_closest_marker("bridge")
    return resolve(request.config, marker.kwargs if marker else None)
"""


def test_as_users_run_it_marker_over_cli_over_env_over_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nbridge_local_port = 1111\nbridge_namespace = ini-ns\nbridge_service = ini\n")
    monkeypatch.setenv("PYTEST_BRIDGE_NAMESPACE", "env-ns")
    monkeypatch.setenv("PYTEST_BRIDGE_LOCAL_PORT", "2222")
    pytester.makepyfile(
        """
        import pytest

        def test_plain(bridge_settings):
            assert bridge_settings.namespace == "env-ns"
            assert [p.local_port for p in bridge_settings.local_ports] == [3333]
            assert bridge_settings.services == ("ini",)

        @pytest.mark.bridge(local_port="9090=4444", service=["orders", "payments"])
        def test_marker(bridge_settings):
            assert [(p.target_port, p.local_port) for p in bridge_settings.local_ports] == [(9090, 4444)]
            assert bridge_settings.services == ("orders", "payments")
            assert bridge_settings.namespace == "env-ns"
        """
    )
    result = pytester.runpytest_inprocess(*INNER_RUN, "--bridge-local-port=3333")
    result.assert_outcomes(passed=2)


def test_as_users_run_it_bad_value_is_a_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("def test_x(): pass\n")
    monkeypatch.setenv("PYTEST_BRIDGE_CONNECT_TIMEOUT", "-1")
    result = pytester.runpytest_inprocess(*INNER_RUN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid value '-1' from PYTEST_BRIDGE_CONNECT_TIMEOUT*greater than 0*"])


def test_explicitly_empty_list_overrides_lower_sources(parse) -> None:  # type: ignore[no-untyped-def]
    s = resolve(parse("--bridge-service="), env={"PYTEST_BRIDGE_SERVICE": "orders"})
    assert s.services == ()
    assert s.sources["services"] == "--bridge-service"


def test_transport_and_routing_settings(parse) -> None:  # type: ignore[no-untyped-def]
    s = resolve(parse("--bridge-transport=KUBECTL", "--bridge-routing-idle=30", "--bridge-routing-image=r:1"), env={})
    assert (s.transport, s.routing_idle, s.routing_image) == ("kubectl", 30.0, "r:1")
    assert resolve(parse(), env={}).transport == "auto"
    pooled = resolve(parse("--bridge-route-pool=4"), env={"PYTEST_BRIDGE_ROUTE_POOL_IDLE": "30"})
    assert (pooled.route_pool, pooled.route_pool_idle) == (4, 30.0)
    assert (resolve(parse(), env={}).route_pool, resolve(parse(), env={}).route_pool_idle) == (2, 120.0)
    assert resolve(parse(), env={"PYTEST_BRIDGE_ROUTE_POOL": "0"}).route_pool == 0
    with pytest.raises(pytest.UsageError, match=r"PYTEST_BRIDGE_ROUTE_POOL.*from 0"):
        resolve(parse(), env={"PYTEST_BRIDGE_ROUTE_POOL": "-1"})
    assert resolve(parse("--bridge-transport=websocket"), env={}).transport == "websocket"
    with pytest.raises(pytest.UsageError, match="--bridge-transport"):
        resolve(parse("--bridge-transport=spdy"), env={})


def test_a_ttl_shorter_than_the_connect_timeout(parse) -> None:  # type: ignore[no-untyped-def]
    """The default connect timeout shrinks to a short TTL; an explicit longer one is refused, naming both."""
    assert resolve(parse("--bridge-restore-ttl=10"), env={}).connect_timeout == 10.0
    with pytest.raises(
        pytest.UsageError, match=r"--bridge-restore-ttl 5s .* shorter than --bridge-connect-timeout 60s"
    ):
        resolve(parse("--bridge-restore-ttl=5", "--bridge-connect-timeout=60"), env={})
