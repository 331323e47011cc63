from __future__ import annotations

import textwrap

import pytest

from pytest_bridge.core.config import (
    ExternalEndpointToken,
    LocalProcessConfig,
    RequiredEndpoints,
    Resolvers,
    ServiceToken,
    Text,
    VolumeMountToken,
    evaluate_env,
    parse_config,
    parse_value,
)
from pytest_bridge.core.errors import BridgeError, ConfigError

SAMPLE = textwrap.dedent(
    """\
    version: 0.1
    enableFeatures:
      - Probes
      - lifecyclehooks
    volumeMounts:
      - name: tls-*
        localPath: ./certs
      - name: config
        localPath: /tmp/orders-config
    env:
      - name: INVENTORY_URL
        value: http://$(services:inventory)/api
      - name: PAYMENTS
        value: $(services:payments.billing)
      - name: CA_FILE
        value: $(volumeMounts:tls-certs)/ca.crt
      - name: DB
        value: postgres://$(externalendpoints:db.example.com:5432):5432/orders
      - name: CACHE
        value: $(externalendpoints:cache.example.com:6379,6380)
      - name: PLAIN
        value: literal $$(not-a-token) text
      - name: PORT
        value: 8080
      - name: FLAG
        value: true
    """
)


def resolvers() -> Resolvers:
    def service(token: ServiceToken) -> str:
        return {("inventory", None): "127.1.1.1", ("payments", "billing"): "127.1.1.2:8443"}[
            (token.name, token.namespace)
        ]

    return Resolvers(
        service=service,
        volume_mount=lambda name: f"/sess/volumes/{name}",
        external_endpoint=lambda token: token.host,
    )


def test_parse_sample() -> None:
    config = parse_config(SAMPLE, source="/repo/KubernetesLocalProcessConfig.yaml")
    assert config.version == "0.1"
    assert config.features == ("Probes", "LifecycleHooks")
    assert config.has_feature("Probes") and not config.has_feature("ManagedIdentity")
    assert config.warnings == ()
    assert [(m.name, m.local_path) for m in config.volume_mounts] == [
        ("tls-*", "./certs"),
        ("config", "/tmp/orders-config"),
    ]
    assert config.local_path_for("tls-certs") == "./certs"
    assert config.local_path_for("config") == "/tmp/orders-config"
    assert config.local_path_for("data") is None
    env = {e.name: e for e in config.env}
    assert env["INVENTORY_URL"].segments == (Text("http://"), ServiceToken("inventory"), Text("/api"))
    assert env["PAYMENTS"].segments == (ServiceToken("payments", "billing"),)
    assert env["CA_FILE"].segments == (VolumeMountToken("tls-certs"), Text("/ca.crt"))
    assert env["CACHE"].segments == (ExternalEndpointToken("cache.example.com", (6379, 6380)),)
    assert env["PLAIN"].segments == (Text("literal $(not-a-token) text"),)
    assert env["PORT"].raw == "8080"
    assert env["FLAG"].raw == "true"


def test_evaluate() -> None:
    config = parse_config(SAMPLE)
    assert evaluate_env(config, resolvers()) == {
        "INVENTORY_URL": "http://127.1.1.1/api",
        "PAYMENTS": "127.1.1.2:8443",
        "CA_FILE": "/sess/volumes/tls-certs/ca.crt",
        "DB": "postgres://db.example.com:5432/orders",
        "CACHE": "cache.example.com",
        "PLAIN": "literal $(not-a-token) text",
        "PORT": "8080",
        "FLAG": "true",
    }


def test_evaluate_unresolvable_token_names_entry_and_token() -> None:
    config = parse_config("env:\n  - name: X\n    value: a$(services:nope.other)b\n", source="cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml, env\[0\] \(X\).*token '\$\(services:nope.other\)'"):
        evaluate_env(config, resolvers())


def test_required_endpoints() -> None:
    config = parse_config(
        SAMPLE + "  - name: AGAIN\n    value: $(services:inventory) $(externalendpoints:cache.example.com:7000)\n"
    )
    assert config.required_endpoints() == RequiredEndpoints(
        services=(ServiceToken("inventory"), ServiceToken("payments", "billing")),
        namespaces=("billing",),
        external=(
            ExternalEndpointToken("db.example.com", (5432,)),
            ExternalEndpointToken("cache.example.com", (6379, 6380, 7000)),
        ),
        volume_mounts=("tls-certs",),
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("$(services:inventory", "unterminated"),
        ("$(services)", "malformed"),
        ("$(services:)", "malformed"),
        ("$(HOME)", "malformed"),
        ("$(secrets:db)", "unknown token kind 'secrets'"),
        ("$(services:Inventory)", "lowercase"),
        ("$(services:a.b.c)", "NAME.NAMESPACE"),
        ("$(services:9lives)", "lowercase"),
        ("$(volumeMounts:Bad_Name)", "volume name"),
        ("$(externalendpoints:db.example.com)", "PORT"),
        ("$(externalendpoints:db.example.com:)", "PORT"),
        ("$(externalendpoints:db.example.com:0)", "1-65535"),
        ("$(externalendpoints:db.example.com:70000)", "1-65535"),
        ("$(externalendpoints:db.example.com:80,x)", "PORT"),
        ("$(externalendpoints:bad_host!:80)", "HOST"),
    ],
)
def test_bad_tokens_name_file_entry_and_token(value: str, fragment: str) -> None:
    text = f"version: 0.1\nenv:\n  - name: OK\n    value: fine\n  - name: BAD\n    value: '{value}'\n"
    with pytest.raises(ConfigError, match=r"^my.yaml, env\[1\] \(BAD\): ") as info:
        parse_config(text, source="my.yaml")
    assert fragment in str(info.value)
    assert info.value.source == "my.yaml"
    assert info.value.entry == "env[1] (BAD)"
    assert info.value.token
    assert isinstance(info.value, BridgeError)


def test_token_kinds_are_case_insensitive() -> None:
    assert parse_value("$(Services:a)$(VOLUMEMOUNTS:v)$(ExternalEndpoints:H.example.com:1)") == (
        ServiceToken("a"),
        VolumeMountToken("v"),
        ExternalEndpointToken("h.example.com", (1,)),
    )


def test_ip_external_endpoint_and_duplicate_ports() -> None:
    assert parse_value("$(externalendpoints:10.0.0.5:80,80,443)") == (ExternalEndpointToken("10.0.0.5", (80, 443)),)


@pytest.mark.parametrize(
    ("text", "fragment", "entry"),
    [
        ("version: [", "not valid YAML", ""),
        ("- a\n- b\n", "top level must be a mapping", ""),
        ("version: 0.2\n", "unsupported version 0.2", "version"),
        ("env: {}\n", "'env' must be a list", "env"),
        ("env:\n  - just-a-string\n", "mapping with 'name' and 'value'", "env[0]"),
        ("env:\n  - value: x\n", "environment variable name", "env[0]"),
        ("env:\n  - name: 'A=B'\n    value: x\n", "environment variable name", "env[0]"),
        ("env:\n  - name: A\n    value: [1]\n", "'value' must be a string", "env[0] (A)"),
        ("env:\n  - name: A\n  - name: A\n", "duplicate variable, first defined at env[0] (A)", "env[1] (A)"),
        ("volumeMounts:\n  - localPath: /x\n", "'name' must be a volume name", "volumeMounts[0]"),
        ("volumeMounts:\n  - name: v\n", "'localPath' is required", "volumeMounts[0] (v)"),
        ("volumeMounts:\n  - v\n", "mapping with 'name' and 'localPath'", "volumeMounts[0]"),
        ("enableFeatures:\n  - {a: 1}\n", "must be a string", "enableFeatures[0]"),
    ],
)
def test_structural_errors(text: str, fragment: str, entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("c.yaml")
    assert info.value.entry == entry


def test_unknown_features_and_keys_warn_but_are_kept() -> None:
    config = parse_config("enableFeatures: [Probes, TimeTravel]\nextra: 1\n", source="c.yaml")
    assert config.features == ("Probes", "TimeTravel")
    assert any("unknown feature 'TimeTravel'" in w for w in config.warnings)
    assert any("unknown key(s) extra" in w for w in config.warnings)


def test_empty_file_and_defaults() -> None:
    config = parse_config("", source="c.yaml")
    assert config == LocalProcessConfig(source="c.yaml")
    assert config.required_endpoints() == RequiredEndpoints()
    assert parse_config("version: '0.1'\n").version == "0.1"


def test_value_missing_is_empty() -> None:
    config = parse_config("env:\n  - name: EMPTY\n")
    assert evaluate_env(config, resolvers()) == {"EMPTY": ""}


def test_config_error_without_location() -> None:
    assert str(ConfigError("plain")) == "plain"
