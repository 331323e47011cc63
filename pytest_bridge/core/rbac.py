"""The shipped Roles, and which of them grants a permission the pre-flight check finds missing.

Two files in ``pytest_bridge/data`` (``deploy/rbac/`` links to them):

* ``bridge-user.yaml``: the Role a user (or CI identity) needs to bridge and to route;
* ``routing-manager.yaml``: the routing manager's and routers' ServiceAccounts, Roles and
  RoleBindings, installed once per namespace by an admin. With them in place a user needs none of
  the manager's verbs (Kubernetes lets you grant only what you hold); without them the plugin
  creates the same objects itself, which takes a user who holds those verbs.

Pure apart from reading the package's own data files; no cluster I/O.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from pytest_bridge_agent import labels

__all__ = [
    "INSTALLED_LABEL",
    "MANAGER_FILE",
    "USER_FILE",
    "Permission",
    "describe",
    "file_text",
    "grants",
    "missing_from",
    "role_rules",
    "source_of",
]

USER_FILE = "bridge-user.yaml"
MANAGER_FILE = "routing-manager.yaml"
# On what an admin installed from MANAGER_FILE: the plugin neither re-creates nor adopts it.
INSTALLED_LABEL = labels.INSTALLED_LABEL

# (verb, API group, resource) or (verb, API group, resource, name): the name is asked for too, so a
# Role narrowed with resourceNames passes the check.
Permission = tuple[str, str, str] | tuple[str, str, str, str]

_HOW = {
    USER_FILE: "`pytest-bridge rbac`, deploy/rbac/bridge-user.yaml",
    MANAGER_FILE: "`pytest-bridge rbac --routing-manager`, deploy/rbac/routing-manager.yaml, applied once by an admin",
}


def file_text(name: str) -> str:
    """The text of a shipped file (``USER_FILE`` or ``MANAGER_FILE``)."""
    return importlib.resources.files("pytest_bridge").joinpath("data", name).read_text()


@functools.cache
def role_rules(name: str) -> dict[str, tuple[dict[str, Any], ...]]:
    """The rules of each Role in a shipped file, by Role name."""
    return {
        str(doc["metadata"]["name"]): tuple(doc.get("rules") or ())
        for doc in yaml.safe_load_all(file_text(name))
        if isinstance(doc, dict) and doc.get("kind") == "Role"
    }


def grants(rules: Iterable[Mapping[str, Any]], permission: Permission) -> bool:
    """Whether ``rules`` allow ``permission`` (wildcards and resourceNames as RBAC reads them)."""
    verb, group, resource, *name = permission
    for rule in rules:
        if not _matches(rule.get("verbs"), verb) or not _matches(rule.get("apiGroups"), group):
            continue
        if not _matches(rule.get("resources"), resource):
            continue
        names = rule.get("resourceNames") or []
        if names and (not name or name[0] not in names):
            continue
        return True
    return False


def _matches(values: Sequence[str] | None, value: str) -> bool:
    return bool(values) and ("*" in values or value in values)  # type: ignore[operator]


def missing_from(rules: Iterable[Mapping[str, Any]], wanted: Iterable[Mapping[str, Any]]) -> list[Permission]:
    """Every (verb, group, resource) that ``wanted`` rules grant and ``rules`` do not."""
    have = list(rules)
    result: list[Permission] = []
    for rule in wanted:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    permission = (str(verb), str(group), str(resource))
                    if permission not in result and not grants(have, permission):
                        result.append(permission)
    return result


def source_of(permission: Permission) -> str | None:
    """Which shipped file grants ``permission`` to whom, for a message; None if none does."""
    for file, subject in ((USER_FILE, "the user Role"), (MANAGER_FILE, "the routing manager's Role")):
        for role, rules in role_rules(file).items():
            if grants(rules, permission):
                return f"{subject} {role} ({_HOW[file]})"
    return None


def describe(permission: Permission) -> str:
    """``'patch' on 'deployments'`` (with ``named X`` when asked by name)."""
    verb, _group, resource, *name = permission
    return f"'{verb}' on '{resource}'" + (f" named {name[0]!r}" if name else "")
