"""The in-cluster code as one zipapp, and the ConfigMap that ships it at connect.

``pytest-bridge.pyz`` holds the packages ``pytest_bridge_agent`` and ``pytest_bridge_routing``
exactly as this plugin has them installed, a ``__main__`` that runs one role of
:data:`pytest_bridge_agent.runtime.ROLES`, and ``pytest_bridge_agent/_bundle.py`` naming the
plugin's version and the code's digest (the agent reports both in its handshake, so a mismatch
with a prebuilt image is named). The archive is deterministic — sorted entries, fixed
timestamps — so the same plugin always ships the same bytes under the same name.

:func:`build` reads the installed package files, :func:`configmap` builds the manifest (pure),
:func:`ship` creates it through ``kube.call`` and turns a refusal into advice.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_bridge_agent
import pytest_bridge_routing
from pytest_bridge_agent import labels
from pytest_bridge_agent.runtime import BUNDLE_FILE, ROLES, Code

from pytest_bridge.cluster import kube
from pytest_bridge.core.errors import ClusterError, ConflictError, ForbiddenError

__all__ = ["BUNDLE_FILE", "Bundle", "build", "code_for", "configmap", "configmap_name", "plugin_version", "ship"]

CODE_LABEL = labels.CODE_LABEL
VERSION_ANNOTATION = labels.VERSION_ANNOTATION
_EPOCH = (1980, 1, 1, 0, 0, 0)

_MAIN = '''"""pytest-bridge {version} in-cluster code ({digest}): python3 -I pytest-bridge.pyz ROLE [ARGS...]"""
import runpy
import sys

ROLES = {roles!r}
if len(sys.argv) < 2 or sys.argv[1] not in ROLES:
    print(f"usage: python3 -I pytest-bridge.pyz {{'|'.join(ROLES)}} [ARGS...]", file=sys.stderr)
    sys.exit(2)
role = sys.argv.pop(1)
sys.argv[0] = "pytest-bridge.pyz " + role
runpy.run_module(ROLES[role], run_name="__main__", alter_sys=True)
'''


@dataclass(frozen=True)
class Bundle:
    data: bytes  # the zipapp
    digest: str  # sha256 (hex) of the sources and the version
    version: str

    @property
    def short(self) -> str:
        """The digest's first 10 hex digits: enough to tell versions apart in object names."""
        return self.digest[:10]


def plugin_version() -> str:
    try:
        return importlib.metadata.version("pytest-bridge")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0+unknown"


def _sources() -> list[tuple[str, bytes]]:
    """(path inside the zip, content) of every module of the in-cluster packages, sorted."""
    files: list[tuple[str, bytes]] = []
    for package in (pytest_bridge_agent, pytest_bridge_routing):
        root = Path(str(package.__file__)).parent
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root.parent).as_posix()
            if "__pycache__" in relative or path.name == "_bundle.py":
                continue
            files.append((relative, path.read_bytes()))
    return sorted(files)


@functools.cache
def build() -> Bundle:
    """The zipapp of the installed in-cluster code (built once per process)."""
    version = plugin_version()
    sources = _sources()
    digest = hashlib.sha256()
    digest.update(version.encode() + b"\0")
    for name, content in sources:
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    hexdigest = digest.hexdigest()
    generated = [
        ("__main__.py", _MAIN.format(version=version, digest=hexdigest[:10], roles=ROLES).encode()),
        ("pytest_bridge_agent/_bundle.py", f"VERSION = {version!r}\nDIGEST = {hexdigest!r}\n".encode()),
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, content in sorted(sources + generated):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return Bundle(buffer.getvalue(), hexdigest, version)


def configmap_name(bundle: Bundle, owner: str = "") -> str:
    """``pytest-bridge-code-<digest>[-<owner>]``: the code's identity is in the name."""
    return f"pytest-bridge-code-{bundle.short}" + (f"-{owner}" if owner else "")


def configmap(
    bundle: Bundle, name: str, namespace: str, *, labels: dict[str, str], owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An immutable ConfigMap holding the zipapp (``binaryData``), optionally owned by ``owner``."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**labels, CODE_LABEL: bundle.short},
        "annotations": {VERSION_ANNOTATION: bundle.version, CODE_LABEL: bundle.digest},
    }
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "immutable": True,
        "binaryData": {BUNDLE_FILE: base64.b64encode(bundle.data).decode()},
    }


def code_for(delivery: str, bundle: Bundle, configmap_name: str) -> Code:
    """The :class:`Code` of pods the plugin creates: mounted from ``configmap_name``, or in the image."""
    return Code(configmap=configmap_name if delivery == "configmap" else None, digest=bundle.digest)


def ship(k: kube.Kube, manifest: dict[str, Any], bundle: Bundle, *, exist_ok: bool = False) -> None:
    """Create the code ConfigMap ``manifest``; errors say what refused it and what to set instead.

    ``exist_ok``: a ConfigMap of that name already there is fine (the name holds the digest and
    the ConfigMap is immutable, so it holds the same code).
    """
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    size = f"{len(bundle.data) / 1024:.0f} KiB zipped"
    instead = (
        "or run prebuilt images instead: `pytest-bridge images push --registry REGISTRY`, then "
        "--bridge-code=image --bridge-agent-image=<the agent image it prints>; nothing was changed"
    )
    try:
        kube.call(
            f"ship pytest-bridge's in-cluster code ({size}) as ConfigMap {ns}/{name}",
            k.core.create_namespaced_config_map, ns, manifest,
            verb="create", resource="configmaps", namespace=ns,
        )  # fmt: skip
    except ConflictError:
        if not exist_ok:
            raise
    except ForbiddenError as exc:
        raise ForbiddenError(f"{exc}; {instead}", verb="create", resource="configmaps", namespace=ns) from exc
    except ClusterError as exc:
        cause = exc.__cause__
        status = getattr(cause, "status", None)
        if status in (413, 422):
            raise ClusterError(
                f"the cluster refused ConfigMap {ns}/{name} with pytest-bridge's in-cluster code ({size}) as too "
                f"large or invalid ({exc}); {instead}"
            ) from exc
        raise
