"""The kind backend, for laptops that have kind, Docker and kind's node image.

Not exercised on machines without a registry (the node image can't be had there); the
embedded backend is the one CI proves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .layout import Layout

__all__ = ["CLUSTER_NAME", "available", "down", "kubeconfig_path", "up"]

CLUSTER_NAME = "pytest-bridge"


def available() -> bool:
    if shutil.which("kind") is None or shutil.which("docker") is None:
        return False
    images = subprocess.run(
        ["docker", "images", "-q", "kindest/node"], capture_output=True, text=True, check=False, timeout=20
    )
    return images.returncode == 0 and bool(images.stdout.strip())


def kubeconfig_path(layout: Layout) -> Path:
    return layout.state / "kind.kubeconfig"


def up(layout: Layout) -> Path:
    """Create (or reuse) the kind cluster; its node pulls the stock images the cluster runs itself."""
    layout.state.mkdir(parents=True, exist_ok=True)
    kubeconfig = kubeconfig_path(layout)
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, check=True).stdout.split()
    if CLUSTER_NAME not in clusters:
        subprocess.run(
            ["kind", "create", "cluster", "--name", CLUSTER_NAME, "--config", str(layout.repo / "kind-config.yaml"),
             "--kubeconfig", str(kubeconfig), "--wait", "120s"],
            check=True,
        )  # fmt: skip
    else:
        subprocess.run(
            ["kind", "export", "kubeconfig", "--name", CLUSTER_NAME, "--kubeconfig", str(kubeconfig)],
            check=True,
        )
    return kubeconfig


def down(layout: Layout) -> None:
    subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER_NAME], check=False)
    kubeconfig_path(layout).unlink(missing_ok=True)
