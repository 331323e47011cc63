"""``pytest-bridge status|cleanup|images|rbac``: what pytest-bridge has in a namespace, and what it needs.

``status`` lists bridged workloads (restore records, and whether their session is alive),
route pods, routers, switched Services and the routing manager. ``cleanup`` restores workloads
of dead sessions and deletes route pods of dead sessions — what a new session does anyway
before it connects; ``--force`` also restores workloads of live sessions and deletes every
route pod (the routing manager then restores the Services and removes itself when idle).
``images build|push|load`` builds the prebuilt images of ``--bridge-code=image`` (see
:mod:`pytest_bridge.cluster.images`); ``rbac`` prints the least-privilege Role a user needs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import sys
from collections.abc import Sequence
from typing import Any

from pytest_bridge_agent.runtime import DEFAULT_NGINX_IMAGE, DEFAULT_PYTHON_IMAGE
from pytest_bridge_routing import objects as ro

from pytest_bridge.cluster import bundle, images, kube, restore
from pytest_bridge.core import rbac
from pytest_bridge.core.errors import BridgeError, NotFoundError
from pytest_bridge.core.patch import SESSION_LABEL
from pytest_bridge.core.records import RecordError
from pytest_bridge.orchestration.session import _session_alive, session_liveness

__all__ = ["main", "rbac_role"]

RBAC_ROLE = rbac.USER_FILE  # package data: the least-privilege Role (deploy/rbac/ links to it)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest-bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", help="kube context (default: the current one)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="what pytest-bridge has in the namespace")
    cleanup = sub.add_parser("cleanup", help="restore and delete what dead sessions left")
    cleanup.add_argument("--force", action="store_true", help="also what live sessions use")
    rbac_parser = sub.add_parser(
        "rbac", help="print the least-privilege Role (and a RoleBinding to fill in) a user needs"
    )
    rbac_parser.add_argument(
        "--routing-manager", action="store_true",
        help="print instead the routing manager's RBAC, for an admin to apply once per namespace (isolated routes)",
    )  # fmt: skip
    _images_parser(sub)
    _doctor_parser(sub)
    return parser


def _doctor_parser(sub: Any) -> None:
    from pytest_bridge.settings import NameMappingMode  # noqa: PLC0415

    parser = sub.add_parser(
        "doctor",
        help="say whether this context can bridge SERVICE, changing nothing (permissions, policy, images, names)",
        description="Checks, with reads, access reviews and dry runs only, what connect needs: the Service and its "
        "workload, permissions (bridge and isolated routes), the admission of the agent's and guard's pods and of the "
        "code ConfigMap, whether nodes have the images, and the name mapping here. Exit 0: it can bridge; 1: it "
        "cannot (each FAIL line says why); 2: the cluster could not be reached.",
    )
    parser.add_argument("service", help="the Service to bridge")
    # also after the command (`doctor orders -n shop`); SUPPRESS keeps a -n given before it
    parser.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's)")
    parser.add_argument("--container", help="container to replace (default: chosen as connect does)")
    parser.add_argument("--agent-image", default=DEFAULT_PYTHON_IMAGE, help="as --bridge-agent-image")
    parser.add_argument("--routing-image", default=DEFAULT_NGINX_IMAGE, help="as --bridge-routing-image")
    parser.add_argument("--code", choices=("configmap", "image"), default="configmap", help="as --bridge-code")
    parser.add_argument(
        "--name-mapping", choices=[m.value for m in NameMappingMode], default="auto", help="as --bridge-name-mapping"
    )


def doctor_command(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from pytest_bridge import doctor  # noqa: PLC0415
    from pytest_bridge.settings import BridgeSettings, ContainerChoice, NameMappingMode  # noqa: PLC0415

    settings = BridgeSettings(
        services=(args.service,), namespace=args.namespace, context=args.context,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        containers=(ContainerChoice(args.container),) if args.container else (),
        agent_image=args.agent_image, routing_image=args.routing_image, code=args.code,
        name_mapping=NameMappingMode(args.name_mapping),
    )  # fmt: skip
    findings = doctor.diagnose(settings, args.service)
    sys.stdout.write(doctor.render(findings))
    if any(f.check == "kubeconfig" for f in findings):
        return 2
    return 1 if any(f.status == doctor.FAIL for f in findings) else 0


def _images_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "images",
        help="build, push or load prebuilt images for --bridge-code=image",
        description="Prebuilt images for --bridge-code=image: the agent image (the Python base plus this "
        "plugin's in-cluster code) and the routing image (the nginx base). Drives the docker CLI "
        "(DOCKER_HOST is honoured) and ends by printing the pytest settings that use the images.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--python-image", default=DEFAULT_PYTHON_IMAGE, help="agent base (default: %(default)s)")
    common.add_argument("--nginx-image", default=DEFAULT_NGINX_IMAGE, help="routing base (default: %(default)s)")
    common.add_argument("--platform", help="docker build --platform (another architecture needs emulation)")
    common.add_argument("-q", "--quiet", action="store_true", help="do not relay the tools' output")
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument(
        "--prefix", default=images.DEFAULT_PREFIX, help="image name prefix (default: %(default)s, a local name)"
    )
    actions.add_parser("build", parents=[common, prefix], help="build both images into the local Docker")
    push = actions.add_parser("push", parents=[common], help="build both images under REGISTRY and docker push them")
    push.add_argument("--registry", required=True, help="registry and path to push to, e.g. localhost:5000/team")
    load = actions.add_parser(
        "load", parents=[common, prefix], help="build both images and load them onto the nodes (no registry)"
    )
    target = load.add_mutually_exclusive_group(required=True)
    target.add_argument("--kind", nargs="?", const="kind", metavar="NAME", help="kind load into cluster NAME (kind)")
    target.add_argument("--containerd", metavar="SOCKET", help="docker save | ctr import into containerd at SOCKET")


def rbac_role(routing_manager: bool = False) -> str:
    """The least-privilege Role shipped with the package (deploy/rbac/bridge-user.yaml in the repository),
    or with ``routing_manager`` the manager's RBAC an admin installs (deploy/rbac/routing-manager.yaml)."""
    name = rbac.MANAGER_FILE if routing_manager else RBAC_ROLE
    return importlib.resources.files("pytest_bridge").joinpath("data", name).read_text()


def images_command(args: argparse.Namespace, out: Any = None) -> int:
    runner = images.Runner(quiet=args.quiet, dry_run=args.dry_run)
    prefix_option = "--registry" if args.action == "push" else "--prefix"
    prefix = images.check_prefix(args.registry if args.action == "push" else args.prefix, prefix_option)
    built = images.run(
        args.action, runner, bundle.build(), prefix,
        python_image=args.python_image, nginx_image=args.nginx_image, platform=args.platform,
        kind_cluster=getattr(args, "kind", None), containerd_socket=getattr(args, "containerd", None),
    )  # fmt: skip
    print(images.summary(args.action, built), file=out or sys.stdout)
    return 0


def status(k: kube.Kube, out: Any = sys.stdout) -> int:
    ns = k.namespace
    print(f"namespace {ns} (context {k.context})", file=out)
    rejected: list[str] = []
    records = restore.read_records(k, ns, rejected)
    for why in rejected:
        print(f"  ignored: {why}", file=out)
    for record in records:
        alive = session_liveness(k, record.session)
        print(f"  bridged: {record.kind} {record.name} by session {record.session} ({alive}; {record.owner})", file=out)
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, ns, label_selector=f"{ro.COMPONENT}=route")
    for pod in pods.items:
        labels = pod.metadata.labels or {}
        # A warm pod of a session's pool has no route until a test claims it.
        what = f"route: {labels[ro.LABEL_ROUTE]}" if ro.LABEL_ROUTE in labels else "warm route pod (pool)"
        print(
            f"  {what} of {labels.get(ro.LABEL_ROUTE_SERVICE)} "
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
    rejected: list[str] = []
    for record in restore.read_records(k, ns, rejected):
        if not force and _session_alive(k, record.session):
            print(f"  kept: {record.kind} {record.name} (session {record.session} is alive)", file=out)
            continue
        try:
            restore.apply_restore(k, record)
        except RecordError as exc:
            print(f"  not restored: {exc}", file=out)
            continue
        restore.delete_session_objects(k, ns, record.session)
        print(f"  restored: {record.kind} {record.name} (session {record.session})", file=out)
    for why in rejected:
        print(f"  ignored (not used, not deleted): {why}", file=out)
    pods: Any = kube.call("list route pods", k.core.list_namespaced_pod, ns, label_selector=f"{ro.COMPONENT}=route")
    for pod in pods.items:
        session = (pod.metadata.labels or {}).get(SESSION_LABEL, "")
        if not force and pod.status.phase == "Running" and _session_alive(k, session, starting_counts=False):
            print(f"  kept: route pod {pod.metadata.name} (session {session} is alive)", file=out)
            continue
        with contextlib.suppress(NotFoundError):
            kube.call("delete a route pod", k.core.delete_namespaced_pod, pod.metadata.name, ns, grace_period_seconds=0)
        print(f"  deleted: route pod {pod.metadata.name} (session {session})", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "rbac":
        sys.stdout.write(rbac_role(args.routing_manager))
        return 0
    if args.command == "doctor":
        return doctor_command(args)
    if args.command == "images":
        try:
            return images_command(args)
        except BridgeError as exc:
            print(f"pytest-bridge: {exc}", file=sys.stderr)
            return 1
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
