"""``pytest-bridge status|cleanup``: what pytest-bridge has in a namespace, and removing what is stale.

``status`` lists bridged workloads (restore records, and whether their session is alive),
route pods, routers, switched Services and the routing manager. ``cleanup`` restores workloads
of dead sessions and deletes route pods of dead sessions — what a new session does anyway
before it connects; ``--force`` also restores workloads of live sessions and deletes every
route pod (the routing manager then restores the Services and removes itself when idle).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from pytest_bridge_routing import objects as ro

from . import kube, restore
from .errors import BridgeError, NotFoundError
from .patch import SESSION_LABEL
from .session import _session_alive

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest-bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", help="kube context (default: the current one)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="what pytest-bridge has in the namespace")
    cleanup = sub.add_parser("cleanup", help="restore and delete what dead sessions left")
    cleanup.add_argument("--force", action="store_true", help="also what live sessions use")
    return parser


def status(k: kube.Kube, out: Any = sys.stdout) -> int:
    ns = k.namespace
    print(f"namespace {ns} (context {k.context})", file=out)
    records = restore.read_records(k, ns)
    for record in records:
        alive = "alive" if _session_alive(k, record.session) else "dead"
        print(f"  bridged: {record.kind} {record.name} by session {record.session} ({alive}; {record.owner})", file=out)
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, ns, label_selector=f"{ro.COMPONENT}=route")
    for pod in pods.items:
        labels = pod.metadata.labels or {}
        print(
            f"  route: {labels.get(ro.LABEL_ROUTE)} of {labels.get(ro.LABEL_ROUTE_SERVICE)} "
            f"(pod {pod.metadata.name}, {pod.status.phase}, session {labels.get(SESSION_LABEL)})",
            file=out,
        )
    services: Any = kube.call("list services", k.core.list_namespaced_service, ns)
    for service in services.items:
        original = (service.metadata.annotations or {}).get(ro.ANN_ORIGINAL_SELECTOR)
        if original:
            print(f"  routed service: {service.metadata.name} (original selector {original})", file=out)
    try:
        manager: Any = kube.call("read the routing manager", k.apps.read_namespaced_deployment, ro.MANAGER_NAME, ns)
        print(f"  routing manager: {manager.status.ready_replicas or 0}/{manager.spec.replicas} ready", file=out)
    except NotFoundError:
        pass
    if not records and not pods.items:
        print("  nothing bridged or routed", file=out)
    return 0


def cleanup(k: kube.Kube, force: bool, out: Any = sys.stdout) -> int:
    ns = k.namespace
    for record in restore.read_records(k, ns):
        if not force and _session_alive(k, record.session):
            print(f"  kept: {record.kind} {record.name} (session {record.session} is alive)", file=out)
            continue
        restore.apply_restore(k, record)
        restore.delete_session_objects(k, ns, record.session)
        print(f"  restored: {record.kind} {record.name} (session {record.session})", file=out)
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, ns, label_selector=f"{ro.COMPONENT}=route")
    for pod in pods.items:
        session = (pod.metadata.labels or {}).get(SESSION_LABEL, "")
        if not force and pod.status.phase == "Running" and _session_alive(k, session):
            print(f"  kept: route pod {pod.metadata.name} (session {session} is alive)", file=out)
            continue
        with contextlib.suppress(NotFoundError):
            kube.call("delete a route pod", k.core.delete_namespaced_pod, pod.metadata.name, ns, grace_period_seconds=0)
        print(f"  deleted: route pod {pod.metadata.name} (session {session})", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        k = kube.load(args.kubeconfig, args.context, args.namespace)
    except BridgeError as exc:
        print(f"pytest-bridge: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            return status(k)
        return cleanup(k, args.force)
    except BridgeError as exc:
        print(f"pytest-bridge: {exc}", file=sys.stderr)
        return 1
    finally:
        k.close()


if __name__ == "__main__":
    sys.exit(main())
