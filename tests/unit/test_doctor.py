"""``pytest-bridge doctor``: its report and exit codes (e2e/test_ux.py asks a real cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_bridge import doctor
from pytest_bridge.cli import main
from pytest_bridge.doctor import FAIL, OK, UNKNOWN, Finding
from pytest_bridge.settings import BridgeSettings, NameMappingMode


def test_render_lines_up_the_checks_and_ends_with_the_verdict() -> None:
    findings = [
        Finding("service", OK, "Deployment orders"),
        Finding("image agent", UNKNOWN, "on no node yet"),
        Finding("permissions (bridge)", FAIL, "missing: patch apps/deployments"),
    ]
    assert doctor.render(findings).splitlines() == [
        "ok   service               Deployment orders",
        "?    image agent           on no node yet",
        "FAIL permissions (bridge)  missing: patch apps/deployments",
        "cannot bridge: permissions (bridge)",
    ]
    assert doctor.render(findings[:2]).endswith("can bridge: nothing in the cluster was changed to find out\n")


@pytest.mark.parametrize(
    ("findings", "code"),
    [
        ([Finding("service", OK, "x"), Finding("image agent", UNKNOWN, "y")], 0),
        ([Finding("service", OK, "x"), Finding("policy", FAIL, "refused")], 1),
        ([Finding("kubeconfig", FAIL, "no kubeconfig")], 2),
    ],
)
def test_exit_code(
    findings: list[Finding], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[tuple[BridgeSettings, str]] = []
    monkeypatch.setattr(doctor, "diagnose", lambda settings, service: asked.append((settings, service)) or findings)
    args = ["-n", "shop", "--kubeconfig", "/k", "doctor", "orders", "--container", "app", "--name-mapping", "off"]
    assert main(args) == code
    settings, service = asked[0]
    assert service == "orders" and settings.services == ("orders",) and settings.namespace == "shop"
    assert settings.kubeconfig == Path("/k") and settings.container_for("orders") == "app"
    assert settings.name_mapping is NameMappingMode.OFF
    assert capsys.readouterr().out == doctor.render(findings)


def test_the_namespace_may_follow_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str | None] = []
    monkeypatch.setattr(doctor, "diagnose", lambda settings, service: asked.append(settings.namespace) or [])
    main(["doctor", "orders", "-n", "after"])
    main(["-n", "before", "doctor", "orders"])
    main(["doctor", "orders"])
    assert asked == ["after", "before", None]


def test_no_kubeconfig_is_one_finding(tmp_path: Path) -> None:
    settings = BridgeSettings(services=("orders",), kubeconfig=tmp_path / "missing")
    (finding,) = doctor.diagnose(settings, "orders")
    assert finding.check == "kubeconfig" and finding.status == FAIL


def test_names_fail_where_the_hosts_file_cannot_be_written(tmp_path: Path) -> None:
    hosts_file = BridgeSettings(name_mapping=NameMappingMode.HOSTS_FILE)
    refused = doctor.names_finding(hosts_file, hosts_writable=lambda path: False)
    assert refused.status == FAIL and "not writable here" in refused.detail
    assert doctor.names_finding(hosts_file, hosts_writable=lambda path: True).status == OK
    off = doctor.names_finding(BridgeSettings(name_mapping=NameMappingMode.OFF))
    assert off.status == OK and "do not resolve" in off.detail
