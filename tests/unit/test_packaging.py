"""The runtime dependencies are exactly what the shipped packages import.

Every import (top level or inside a function) of pytest_bridge, pytest_bridge_agent and
pytest_bridge_routing is scanned; what is not the standard library or one of the three must
come from a distribution listed in ``[project] dependencies``, and every listed one must be
imported. (``python -m e2e.packaging`` installs the wheel into a fresh virtualenv and runs it.)
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

import pytest_bridge
from pytest_bridge import BridgeError, BridgeFactory, IsolatedRoute, LocalService, plugin
from pytest_bridge.core import errors

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    "pytest_bridge": REPO / "pytest_bridge",
    "pytest_bridge_agent": REPO / "agent" / "pytest_bridge_agent",
    "pytest_bridge_routing": REPO / "routing" / "pytest_bridge_routing",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> dict[str, list[str]]:
    """Top-level module -> the files importing it, for every absolute import of the shipped packages."""
    found: dict[str, list[str]] = {}
    for root in SHIPPED.values():
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(str(path.relative_to(REPO)))
    return found


def test_runtime_dependencies_are_what_the_shipped_packages_import() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_canonical(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    third_party = {
        module: files
        for module, files in _imported_top_level_modules().items()
        if module not in sys.stdlib_module_names and module not in SHIPPED and module != "__future__"
    }
    needed: dict[str, list[str]] = {}
    for module, files in third_party.items():
        owners = distributions.get(module)
        assert owners, f"{module} (imported by {files[0]}) is installed by no distribution"
        needed.setdefault(_canonical(owners[0]), []).extend(files)
    assert set(needed) <= declared, f"imported but not a runtime dependency: {sorted(set(needed) - declared)}"
    assert declared <= set(needed), f"runtime dependencies nothing imports: {sorted(declared - set(needed))}"


def test_development_tools_are_not_runtime_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    for tool in ("pytest-asyncio", "docker", "requests"):
        assert tool not in runtime
        assert any(spec.startswith(tool) for spec in project["optional-dependencies"]["dev"]), tool


def test_package_data_is_declared_for_the_wheel() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "data/*" in setuptools["package-data"]["pytest_bridge"]
    shipped = {path.name for path in (REPO / "pytest_bridge" / "data").iterdir()}
    assert {"bridge-user.yaml", "agent.Dockerfile", "routing.Dockerfile"} <= shipped
    link = REPO / "deploy" / "rbac" / "bridge-user.yaml"
    assert link.is_symlink() and link.resolve() == REPO / "pytest_bridge" / "data" / "bridge-user.yaml"


def test_the_fixture_types_are_public_and_typed() -> None:
    assert set(pytest_bridge.__all__) == {"BridgeError", "BridgeFactory", "IsolatedRoute", "LocalService"}
    assert (LocalService, IsolatedRoute, BridgeFactory) == (
        plugin.LocalService,
        plugin.IsolatedRoute,
        plugin.BridgeFactory,
    )
    assert BridgeError is errors.BridgeError
    assert issubclass(IsolatedRoute, LocalService)
    assert set(pytest_bridge.__all__) <= set(dir(pytest_bridge))
    with pytest.raises(AttributeError):
        _ = pytest_bridge.NoSuchThing  # type: ignore[attr-defined]
    # PEP 561: the marker ships in the wheel (python -m e2e.packaging checks the built wheel).
    assert (REPO / "pytest_bridge" / "py.typed").is_file()
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["pytest_bridge"]


def test_a_suite_annotates_its_fixtures_with_the_public_types(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_bridge import BridgeError, BridgeFactory, IsolatedRoute, LocalService

        def test_types() -> None:
            def uses(svc: LocalService, route: IsolatedRoute, factory: BridgeFactory) -> None: ...
            assert issubclass(BridgeError, Exception)
        """
    )
    pytester.runpytest("-p", "no:asyncio", "-p", "no:cacheprovider").assert_outcomes(passed=1)
