"""CLI of the cluster harness: ``python -m e2e.cluster up|down|status|kubeconfig|kubectl|logs``.

``up`` prints ``KUBECONFIG=<path>`` as its last line so scripts can ``eval`` it; ``kubectl``
prints the kubectl binary to use (the one built with the embedded cluster, else PATH's), so
the scripts can hand it to the plugin's kubectl transport (``PYTEST_BRIDGE_KUBECTL``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from . import embedded, images, kind, prereq, procs
from .layout import Layout

__all__ = ["main"]


def _backend(args: argparse.Namespace) -> str:
    if args.kubeconfig or (os.environ.get("KUBECONFIG") and not args.embedded):
        return "kubeconfig"
    if args.embedded or not kind.available():
        return "embedded"
    return "kind"


def _up(layout: Layout, args: argparse.Namespace) -> int:
    backend = _backend(args)
    if backend == "kubeconfig":
        path = args.kubeconfig or os.environ["KUBECONFIG"]
        print(f"using the cluster of {path}", file=sys.stderr)
        print(f"KUBECONFIG={path}")
        return 0
    if backend == "kind":
        path = kind.up(layout)
        print(f"KUBECONFIG={path}")
        return 0
    anything_running = any(procs.is_running(layout, name) for name in embedded.COMPONENTS)
    facts = prereq.check(layout, check_ports=not anything_running)
    assert facts.go is not None
    started = time.monotonic()
    embedded.up(layout, facts.go, report=lambda line: print(line, file=sys.stderr), sample_app=not args.no_sample_app)
    print(f"embedded cluster ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    print(f"KUBECONFIG={layout.admin_kubeconfig}")
    return 0


def _images_line(layout: Layout) -> str:
    if not procs.is_running(layout, "containerd"):
        return "(containerd not running)"
    try:
        return ", ".join(images.node_images(layout)) or "none"
    except RuntimeError as exc:
        return f"(unknown: {exc})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "kubeconfig", "kubectl", "logs"])
    parser.add_argument("--kubeconfig", help="use this existing cluster instead of starting one")
    parser.add_argument("--embedded", action="store_true", help="use the embedded cluster even if kind is available")
    parser.add_argument("--no-sample-app", action="store_true", help="don't deploy fixtures/manifests")
    args = parser.parse_args(argv)
    layout = Layout.default()
    try:
        if args.command == "up":
            return _up(layout, args)
        if args.command == "down":
            if kind.kubeconfig_path(layout).exists():
                kind.down(layout)
            embedded.down(layout, report=lambda line: print(line, file=sys.stderr))
            return 0
        if args.command == "status":
            states = embedded.status(layout)
            for name, state in states.items():
                print(f"{name:25} {state}")
            print(f"{'images':25} {_images_line(layout)}")
            return 0 if all(s.startswith("running") for s in states.values()) else 1
        if args.command == "kubectl":
            embedded_kubectl = layout.bin / "kubectl"
            found = str(embedded_kubectl) if embedded_kubectl.exists() else shutil.which("kubectl")
            if found:
                print(found)
            return 0 if found else 1
        if args.command == "kubeconfig":
            print(layout.admin_kubeconfig)
            return 0 if layout.admin_kubeconfig.exists() else 1
        for log in sorted(Path(layout.logs).glob("*.log")):
            print(log)
        return 0
    except prereq.PrerequisiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}\nlogs: {layout.logs}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
