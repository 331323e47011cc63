"""The shipped Roles: every verb explained, enough for what the plugin does, nothing of the manager's."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pytest_bridge_routing import objects as ro

from pytest_bridge import cli
from pytest_bridge.cluster import permissions, restore
from pytest_bridge.cluster.workloads import HPA_KIND
from pytest_bridge.core import rbac
from pytest_bridge.core.errors import ForbiddenError
from pytest_bridge.orchestration import isolation

USER = rbac.role_rules(rbac.USER_FILE)["pytest-bridge-user"]
MANAGER = rbac.role_rules(rbac.MANAGER_FILE)


@pytest.mark.parametrize("name", [rbac.USER_FILE, rbac.MANAGER_FILE])
def test_every_verb_says_why(name: str) -> None:
    """Verbs are listed one a line, each with a comment; no flow lists hide one without."""
    lines = rbac.file_text(name).splitlines()
    in_verbs = False
    counted = 0
    for line in lines:
        if re.match(r"^\s+verbs:", line):
            assert line.strip() == "verbs:", f"{name}: verbs in a flow list: {line}"
            in_verbs = True
            continue
        if in_verbs and re.match(r"^\s+- [a-z]+(\s|$)", line):
            assert re.match(r"^\s+- [a-z]+\s+# \S", line), f"{name}: a verb without a reason: {line}"
            counted += 1
            continue
        in_verbs = False
    granted = sum(len(r["verbs"]) for rules in rbac.role_rules(name).values() for r in rules)
    assert counted == granted


def test_the_user_role_reads_no_secret_and_holds_none_of_the_managers_verbs() -> None:
    assert not any(rbac.grants(USER, (verb, "", "secrets")) for verb in ("get", "list", "watch", "create"))
    for permission in [
        ("create", "", "services"),
        ("patch", "", "services"),
        ("create", "networking.k8s.io", "ingresses"),
        ("update", "apps", "deployments"),
        ("delete", "apps", "deployments"),  # only the manager's, by name
        ("patch", "", "serviceaccounts"),
        ("patch", "rbac.authorization.k8s.io", "roles"),
        ("list", "rbac.authorization.k8s.io", "roles"),
        ("delete", "", "configmaps"),
        ("list", "batch", "jobs"),
    ]:
        assert not rbac.grants(USER, permission), permission
    assert rbac.grants(USER, ("delete", "apps", "deployments", ro.MANAGER_NAME))
    assert not rbac.grants(USER, ("delete", "apps", "deployments", "orders"))


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "Pod"])
def test_the_user_role_covers_a_bridge_and_whatever_the_guard_gets(kind: str) -> None:
    for permission in permissions.required_permissions(kind, "configmap", "orders"):
        assert rbac.grants(USER, permission), permission
    record = restore.RestoreRecord(
        session="s-1", namespace="shop", kind=kind, name="orders", reverse_patch=[], original={}, owner="me",
        created=0.0, related=[{"kind": HPA_KIND, "name": "orders", "reverse_patch": []}] if kind != "Pod" else [],
        roll_pods=["orders-0"] if kind == "StatefulSet" else [],
    )  # fmt: skip
    job = {"metadata": {"name": restore.guard_name("s-1"), "uid": "u"}}
    role = next(o for o in restore.guard_rbac("s-1", "shop", record, job) if o["kind"] == "Role")
    # Kubernetes lets the user create the guard's Role only if they hold all of it.
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    permission = (verb, rule["apiGroups"][0], resource, *([name] if name else []))
                    assert rbac.grants(USER, permission), permission  # type: ignore[arg-type]
    assert not any("secrets" in rule["resources"] for rule in role["rules"])


def test_the_user_role_covers_routes_but_not_the_managers_rbac() -> None:
    for permission in isolation.required_permissions():
        assert rbac.grants(USER, permission), permission
    manager_rules = [rule for rules in MANAGER.values() for rule in rules]
    assert rbac.missing_from(USER, manager_rules)  # the user does not hold what the manager gets


def test_the_installed_manager_rbac_is_what_the_plugin_would_create() -> None:
    runtime = ro.RoutingRuntime()
    _deployment, *created = ro.manager_objects("shop", runtime, 300)
    shipped = [d for d in yaml.safe_load_all(rbac.file_text(rbac.MANAGER_FILE)) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in created) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in shipped
    )
    for obj in created:
        if obj["kind"] == "Role":
            assert rbac.missing_from(MANAGER[obj["metadata"]["name"]], obj["rules"]) == []
            assert rbac.missing_from(obj["rules"], MANAGER[obj["metadata"]["name"]]) == []
        if obj["kind"] == "RoleBinding":
            name = obj["metadata"]["name"]
            binding = next(d for d in shipped if d["kind"] == "RoleBinding" and d["metadata"]["name"] == name)
            assert binding["roleRef"] == obj["roleRef"]
            assert [s["name"] for s in binding["subjects"]] == [s["name"] for s in obj["subjects"]]
    for doc in shipped:
        assert doc["metadata"]["labels"][rbac.INSTALLED_LABEL] == "true"
        assert "app.kubernetes.io/managed-by" not in doc["metadata"]["labels"]  # not swept as ours


def test_grants_reads_resource_names_and_wildcards() -> None:
    rules = [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["a"], "verbs": ["patch"]},
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]},
    ]
    assert rbac.grants(rules, ("patch", "apps", "deployments", "a"))
    assert not rbac.grants(rules, ("patch", "apps", "deployments", "b"))
    assert not rbac.grants(rules, ("patch", "apps", "deployments"))  # all of them: no
    assert rbac.grants(rules, ("get", "batch", "jobs"))
    assert rbac.missing_from(rules, [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]) == [
        ("list", "", "pods")
    ]


def test_the_missing_permission_is_named_with_the_file_that_grants_it() -> None:
    allowed: set[tuple[str, ...]] = set()

    def review(body: Any, **_: Any) -> Any:
        a = body.spec.resource_attributes
        resource = a.resource + (f"/{a.subresource}" if a.subresource else "")
        key = (a.verb, a.group, resource, *([a.name] if a.name else []))
        return SimpleNamespace(status=SimpleNamespace(allowed=key in allowed))

    k: Any = SimpleNamespace(namespace="shop", authz=SimpleNamespace(create_self_subject_access_review=review))
    needed = permissions.required_permissions("Deployment", "configmap", "orders")
    allowed.update(tuple(p) for p in needed if p[0] != "patch" or p[2] != "deployments")
    with pytest.raises(ForbiddenError) as caught:
        permissions.required_permissions_check(k, needed, what="bridge 'orders'")
    message = str(caught.value)
    assert "'patch' on 'deployments' named 'orders'" in message
    assert "nothing was changed" in message
    assert "the user Role pytest-bridge-user (`pytest-bridge rbac`, deploy/rbac/bridge-user.yaml)" in message
    allowed.add(("patch", "apps", "deployments", "orders"))
    permissions.required_permissions_check(k, needed, what="bridge 'orders'")
    assert "routing-manager.yaml" in (rbac.source_of(("create", "", "services")) or "")


def test_installed_manager_rbac_is_used_and_checked() -> None:
    _deployment, *objects = ro.manager_objects("shop", ro.RoutingRuntime(), 300)
    roles: dict[str, Any] = {}

    def read(name: str, namespace: str, **_: Any) -> Any:
        if name not in roles:
            raise _not_found()
        return roles[name]

    k: Any = SimpleNamespace(rbac=SimpleNamespace(read_namespaced_role=read), to_dict=lambda rule: rule)
    assert not isolation._installed_manager_rbac(k, "shop", objects)
    for name, rules in MANAGER.items():
        roles[name] = SimpleNamespace(metadata=SimpleNamespace(labels={rbac.INSTALLED_LABEL: "true"}), rules=rules)
    assert isolation._installed_manager_rbac(k, "shop", objects)
    roles[ro.MANAGER_NAME].rules = [r for r in MANAGER[ro.MANAGER_NAME] if "ingresses" not in r["resources"]]
    with pytest.raises(ForbiddenError, match=r"lacks .*'create' on 'ingresses'.*pytest-bridge rbac --routing-manager"):
        isolation._installed_manager_rbac(k, "shop", objects)
    roles[ro.MANAGER_NAME].metadata.labels = {}  # one the plugin created: not installed
    assert not isolation._installed_manager_rbac(k, "shop", objects)


def _not_found() -> Exception:
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    return ApiException(status=404, reason="Not Found")


def test_cli_prints_either_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rbac"]) == 0
    assert capsys.readouterr().out == rbac.file_text(rbac.USER_FILE)
    assert cli.main(["rbac", "--routing-manager"]) == 0
    assert capsys.readouterr().out == rbac.file_text(rbac.MANAGER_FILE)
