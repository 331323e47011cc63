"""The port-forward sends the same credentials the kubernetes client would (token kubeconfigs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pytest_bridge.cluster import kube
from pytest_bridge.transport.portforward import ApiEndpoint


def test_a_kubeconfig_token_becomes_the_authorization_header(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "ci",
            "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
            "users": [{"name": "u", "user": {"token": "s3cr3t"}}],
            "contexts": [{"name": "ci", "context": {"cluster": "c", "user": "u", "namespace": "shop"}}],
        })
    )  # fmt: skip
    k = kube.load(str(kubeconfig), None, None)
    try:
        endpoint = ApiEndpoint.from_configuration(k.configuration)
    finally:
        k.close()
    assert endpoint.host == "http://127.0.0.1:1"
    assert ("Authorization", "Bearer s3cr3t") in endpoint.headers
