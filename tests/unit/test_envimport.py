from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest
from k8s_samples import app_container, orders_pod

from pytest_bridge.core.config import parse_config
from pytest_bridge.core.envimport import (
    SERVICE_ACCOUNT_MOUNT_PATH,
    SkippedVolume,
    VolumeDownload,
    build_environment,
    local_volume_paths,
    plan_downloads,
    plan_mounted_volumes,
    volume_kind,
)
from pytest_bridge.core.errors import ConfigError
from pytest_bridge.core.names import AddressMode, Endpoint, EndpointPort, map_endpoints

SESSION = PurePosixPath("/tmp/bridge-s1")

# What the agent reports from inside the orders pod (the real container env).
REPORTED = {
    "PATH": "/usr/local/bin:/usr/bin",
    "HOME": "/root",
    "HOSTNAME": "orders-7d9f8c6b5-abcde",
    "PYTHON_VERSION": "3.11.2",
    "LANG": "C.UTF-8",
    "PYTEST_BRIDGE_TOKEN": "secret-token",
    "PYTEST_BRIDGE_SESSION": "s1",
    "LOG_LEVEL": "debug",
    "INVENTORY_URL": "http://inventory:80",
    "DB_PASSWORD": "hunter2",
    "POD_NAME": "orders-7d9f8c6b5-abcde",
    "FEATURE_X": "on",  # from envFrom configMapRef orders-config
    "INVENTORY_SERVICE_HOST": "10.96.0.20",
    "INVENTORY_SERVICE_PORT": "80",
    "INVENTORY_PORT": "tcp://10.96.0.20:80",
    "INVENTORY_PORT_80_TCP": "tcp://10.96.0.20:80",
    "INVENTORY_PORT_80_TCP_ADDR": "10.96.0.20",
    "INVENTORY_PORT_80_TCP_PORT": "80",
    "INVENTORY_PORT_80_TCP_PROTO": "tcp",
    "LEGACY_SERVICE_HOST": "10.96.0.99",
    "LEGACY_PORT_5000_TCP": "tcp://10.96.0.99:5000",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443",
}

CONFIG = parse_config(
    """\
version: 0.1
volumeMounts:
  - name: tls-*
    localPath: certs
env:
  - name: CA_FILE
    value: $(volumeMounts:tls-certs)/ca.crt
  - name: PAYMENTS_URL
    value: https://$(services:payments.billing)
  - name: DB_HOST
    value: $(externalendpoints:db.example.com:5432)
  - name: LOG_LEVEL
    value: trace
""",
    source="/repo/KubernetesLocalProcessConfig.yaml",
)

INVENTORY = Endpoint("inventory", "shop", (EndpointPort(80, "http"),))
PAYMENTS = Endpoint("payments", "billing", (EndpointPort(443, "https"),))
DB = Endpoint.external("db.example.com", [5432])


def pod_container() -> dict[str, Any]:
    return orders_pod()["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_plan_downloads_config_token_and_service_account() -> None:
    downloads = plan_downloads(pod_container(), CONFIG, SESSION)
    assert downloads == (
        VolumeDownload(
            "tls-certs", "/etc/tls", PurePosixPath("/repo/certs"), "env[0] (CA_FILE) uses $(volumeMounts:tls-certs)"
        ),
        VolumeDownload(
            "kube-api-access-x7k2p",
            SERVICE_ACCOUNT_MOUNT_PATH,
            SESSION / "volumes" / "kube-api-access-x7k2p",
            "service-account token",
        ),
    )


def test_plan_downloads_without_config_and_without_sa_mount() -> None:
    template_container = app_container()  # templates have no SA mount; admission adds it to pods
    assert plan_downloads(template_container, None, SESSION) == (
        VolumeDownload(
            "kube-api-access",
            SERVICE_ACCOUNT_MOUNT_PATH,
            SESSION / "volumes" / "kube-api-access",
            "service-account token",
        ),
    )
    assert plan_downloads(template_container, None, SESSION, service_account_token=False) == ()


def test_plan_downloads_absolute_local_path_and_default_dir() -> None:
    config = parse_config(
        "volumeMounts:\n  - name: config\n    localPath: /abs/cfg\n"
        "env:\n  - name: A\n    value: $(volumeMounts:config)\n  - name: B\n    value: $(volumeMounts:config)/x\n"
    )
    downloads = plan_downloads(pod_container(), config, SESSION, service_account_token=False)
    assert downloads == (
        VolumeDownload("config", "/etc/orders", PurePosixPath("/abs/cfg"), "env[0] (A) uses $(volumeMounts:config)"),
    )
    config = parse_config("env:\n  - name: A\n    value: $(volumeMounts:config)\n")
    (download,) = plan_downloads(pod_container(), config, SESSION, service_account_token=False)
    assert download.local_dir == SESSION / "volumes" / "config"


def test_unknown_volume_mount_token_is_a_config_error() -> None:
    config = parse_config("env:\n  - name: A\n    value: $(volumeMounts:nope)\n", source="k.yaml")
    with pytest.raises(ConfigError, match=r"k.yaml, env\[0\] \(A\): .*no volume mount 'nope'.*config \(/etc/orders\)"):
        plan_downloads(pod_container(), config, SESSION)


def test_build_environment() -> None:
    mapping = map_endpoints([INVENTORY, PAYMENTS, DB], "shop")
    downloads = plan_downloads(pod_container(), CONFIG, SESSION)
    result = build_environment(
        REPORTED,
        pod_container(),
        mapping,
        config=CONFIG,
        downloads=downloads,
        namespace_services=["inventory", "legacy", "orders"],
    )
    env = result.env
    # Declared and envFrom values are the real ones the agent saw (secretKeyRef, fieldRef included).
    assert env["DB_PASSWORD"] == "hunter2"
    assert env["POD_NAME"] == "orders-7d9f8c6b5-abcde"
    assert env["FEATURE_X"] == "on"
    assert env["INVENTORY_URL"] == "http://inventory:80"
    # Service links point at the local mapping; unreachable ones are dropped.
    assert env["INVENTORY_SERVICE_HOST"] == "127.1.1.1"
    assert env["INVENTORY_PORT_80_TCP"] == "tcp://127.1.1.1:80"
    assert env["INVENTORY_SERVICE_PORT_HTTP"] == "80"
    assert "LEGACY_SERVICE_HOST" not in env and "LEGACY_PORT_5000_TCP" not in env
    # kubernetes not mapped: kept as reported.
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    # Config entries win.
    assert env["LOG_LEVEL"] == "trace"
    assert env["CA_FILE"] == "/repo/certs/ca.crt"
    assert env["PAYMENTS_URL"] == "https://127.1.1.2"
    assert env["DB_HOST"] == "db.example.com"
    # Process and agent variables never leak in.
    for name in ("PATH", "HOME", "HOSTNAME", "PYTHON_VERSION", "LANG", "PYTEST_BRIDGE_TOKEN"):
        assert name not in env
    assert "PYTEST_BRIDGE_TOKEN" in result.dropped and "LEGACY_SERVICE_HOST" in result.dropped
    assert result.downloads == downloads


def test_without_env_from_only_declared_names_are_imported() -> None:
    container = pod_container()
    del container["envFrom"]
    result = build_environment(REPORTED, container, map_endpoints([], "shop"))
    assert "FEATURE_X" not in result.env
    assert "FEATURE_X" in result.dropped
    assert result.env["LOG_LEVEL"] == "debug"


def test_kubernetes_service_mapped() -> None:
    kubernetes = Endpoint("kubernetes", "default", (EndpointPort(443, "https"),))
    mapping = map_endpoints([kubernetes], "shop")
    env = build_environment(REPORTED, pod_container(), mapping).env
    assert env["KUBERNETES_SERVICE_HOST"] == "127.1.1.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443"
    assert env["KUBERNETES_PORT_443_TCP"] == "tcp://127.1.1.1:443"


def test_declared_variable_wins_over_service_link() -> None:
    container = pod_container()
    container["env"].append({"name": "INVENTORY_SERVICE_PORT", "value": "8080"})
    reported = dict(REPORTED, INVENTORY_SERVICE_PORT="8080")
    env = build_environment(reported, container, map_endpoints([INVENTORY], "shop")).env
    assert env["INVENTORY_SERVICE_PORT"] == "8080"
    assert env["INVENTORY_SERVICE_HOST"] == "127.1.1.1"


def test_single_ip_mode_and_unresolvable_names() -> None:
    free = iter(range(42000, 42010))
    mapping = map_endpoints(
        [INVENTORY, PAYMENTS, DB], "shop", mode=AddressMode.SINGLE_IP, allocate_port=lambda _p: next(free)
    )
    downloads = plan_downloads(pod_container(), CONFIG, SESSION)
    env = build_environment(
        REPORTED, pod_container(), mapping, config=CONFIG, downloads=downloads, names_resolvable=False
    ).env
    assert env["INVENTORY_SERVICE_HOST"] == "127.0.0.1"
    assert env["INVENTORY_SERVICE_PORT"] == "42000"
    assert env["PAYMENTS_URL"] == "https://127.0.0.1:42001"
    assert env["DB_HOST"] == "127.0.0.1:42002"


def test_config_service_not_mapped_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"env\[1\] \(PAYMENTS_URL\).*services:payments.billing"):
        build_environment(
            REPORTED,
            pod_container(),
            map_endpoints([DB], "shop"),
            config=CONFIG,
            downloads=plan_downloads(pod_container(), CONFIG, SESSION),
        )


def test_volume_token_without_download_is_a_config_error() -> None:
    mapping = map_endpoints([INVENTORY, PAYMENTS, DB], "shop")
    with pytest.raises(ConfigError, match="volumeMounts:tls-certs"):
        build_environment(REPORTED, pod_container(), mapping, config=CONFIG, downloads=())


# --- mounted volumes imported by default (--bridge-import-volumes) ------------------------------

POD_VOLUMES = [
    {"name": "config", "configMap": {"name": "orders-config"}},
    {"name": "tls-certs", "secret": {"secretName": "orders-tls"}},
    {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    {"name": "bundle", "projected": {"sources": [{"configMap": {"name": "extra"}}]}},
    {"name": "scratch", "emptyDir": {}},
    {"name": "data", "persistentVolumeClaim": {"claimName": "orders-data"}},
    {"name": "pytest-bridge-code", "configMap": {"name": "pytest-bridge-code-1234"}},
    {"name": "kube-api-access-x7k2p", "projected": {"sources": []}},
]


def mounted_container() -> dict[str, Any]:
    container = pod_container()
    container["volumeMounts"] += [
        {"name": "podinfo", "mountPath": "/etc/podinfo"},
        {"name": "bundle", "mountPath": "/etc/bundle"},
        {"name": "bundle", "mountPath": "/etc/app.ini", "subPath": "app.ini"},
        {"name": "scratch", "mountPath": "/tmp"},
        {"name": "data", "mountPath": "/var/lib/orders"},
        {"name": "pytest-bridge-code", "mountPath": "/opt/pytest-bridge"},  # the agent's own: never imported
    ]
    return container


def test_mounted_configuration_volumes_are_imported_and_data_volumes_skipped() -> None:
    container = mounted_container()
    planned = plan_downloads(container, None, SESSION)  # the service-account token
    own = {m["name"] for m in container["volumeMounts"]} - {"pytest-bridge-code"}
    downloads, skipped = plan_mounted_volumes(container, POD_VOLUMES, None, SESSION, planned=planned, only=own)
    assert [(d.volume_name, d.mount_path, d.local_dir, d.reason) for d in downloads] == [
        ("config", "/etc/orders", SESSION / "volumes" / "config", "mounted configMap volume"),
        ("tls-certs", "/etc/tls", SESSION / "volumes" / "tls-certs", "mounted secret volume"),
        ("podinfo", "/etc/podinfo", SESSION / "volumes" / "podinfo", "mounted downwardAPI volume"),
        ("bundle", "/etc/bundle", SESSION / "volumes" / "bundle", "mounted projected volume"),
        ("bundle", "/etc/app.ini", SESSION / "volumes" / "bundle.2", "mounted projected volume"),
    ]
    assert skipped == (
        SkippedVolume("scratch", "/tmp", "emptyDir"),
        SkippedVolume("data", "/var/lib/orders", "persistentVolumeClaim"),
    )
    assert (
        skipped[1].describe()
        == "/var/lib/orders (persistentVolumeClaim data: a persistent volume: data, possibly large)"
    )
    assert "emptyDir scratch" in skipped[0].describe()


def test_a_volume_the_config_names_is_fetched_once_where_the_config_says() -> None:
    container = mounted_container()
    planned = plan_downloads(container, CONFIG, SESSION)  # tls-certs -> /repo/certs
    downloads, _ = plan_mounted_volumes(container, POD_VOLUMES, CONFIG, SESSION, planned=planned)
    assert "tls-certs" not in {d.volume_name for d in downloads}
    assert "/opt/pytest-bridge" not in {d.mount_path for d in downloads}  # the plugin's code, even unfiltered
    assert [d.mount_path for d in downloads].count("/etc/orders") == 1


def test_volume_paths_map_mount_paths_to_local_folders_and_subpath_files() -> None:
    container = mounted_container()
    downloads, _ = plan_mounted_volumes(container, POD_VOLUMES, None, SESSION, only={"bundle"})
    files = {SESSION / "volumes" / "bundle.2" / "app.ini"}
    assert local_volume_paths(container, downloads, is_file=lambda path: path in files) == {
        "/etc/bundle": str(SESSION / "volumes" / "bundle"),
        "/etc/app.ini": str(SESSION / "volumes" / "bundle.2" / "app.ini"),
    }
    assert local_volume_paths(container, downloads)["/etc/app.ini"] == str(SESSION / "volumes" / "bundle.2")
    assert volume_kind({"name": "x", "csi": {}}) == "csi" and volume_kind({"name": "x"}) == "unknown"
