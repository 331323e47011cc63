"""pytest-bridge: bridge a Kubernetes service into a pytest session.

The public surface is what a test suite annotates its fixtures with::

    from pytest_bridge import BridgeError, BridgeFactory, IsolatedRoute, LocalService

    def test_checkout(bridged_service: LocalService) -> None: ...

The names load lazily: ``import pytest_bridge`` (the in-cluster code's packaging, the CLI's
pure subcommands) does not pull in pytest and the Kubernetes client until one is used.

The package is built in layers; each imports only those below it (``.importlinter`` in
pyproject.toml checks it, docs/ARCHITECTURE.md draws it)::

    plugin, settings, cli, doctor      the pytest face and the command line
    orchestration                      session, isolated routes
    cluster | transport | local        Kubernetes API | tunnel | this machine (independent)
    core                               pure data: plans, patches, names, config, records

Each subpackage's docstring states its rule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_bridge.core.errors import BridgeError
    from pytest_bridge.plugin import BridgeFactory, IsolatedRoute, LocalService

__all__ = ["BridgeError", "BridgeFactory", "IsolatedRoute", "LocalService"]

_WHERE = {
    "BridgeError": "pytest_bridge.core.errors",
    "BridgeFactory": "pytest_bridge.plugin",
    "IsolatedRoute": "pytest_bridge.plugin",
    "LocalService": "pytest_bridge.plugin",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
