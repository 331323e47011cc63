"""The thin I/O layer over the Kubernetes API: clients from kubeconfig, errors translated.

Every call into the cluster goes through :func:`call`, which turns the client's
``ApiException`` into our own errors — not found, forbidden (naming the verb and the
resource, and how to grant them), conflict — chained with ``from``. Nothing here decides
what to change in the cluster; that is ``session``'s job.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pytest_bridge_agent import merge

from pytest_bridge.core import timing
from pytest_bridge.core.errors import ApiUnreachableError, ClusterError, ConflictError, ForbiddenError, NotFoundError

__all__ = ["Kube", "call", "deadline", "load"]

T = TypeVar("T")
# Every call to the API server: (connect, read) seconds. A stopped or unreachable API server fails
# the call within this, instead of hanging connect, close or a test.
REQUEST_TIMEOUT = (5.0, 30.0)
# The end of the current block of calls (monotonic), see deadline(); None: each call has REQUEST_TIMEOUT.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("pytest_bridge_kube_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Calls made within (in this thread) end by ``seconds`` from now, all together.

    For work that must end in bounded time whatever the API server does (closing a session: the
    guard restores what it could not). Each call's timeouts are cut to what is left — halved,
    since a failed connection is retried once — and a call made after the deadline fails at once
    with ApiUnreachableError.
    """
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _timeout_within(what: str, wanted: Any) -> Any:
    end = _deadline.get()
    if end is None:
        return wanted
    left = (end - time.monotonic()) / 2  # one retry of a failed connection: two attempts at most
    if left <= 0.05:
        raise ApiUnreachableError(f"{what}: not tried, the time given to this work is up (the API server is slow)")
    connect, read = wanted if isinstance(wanted, tuple) else (wanted, wanted)
    return (min(connect, left), min(read, left))


@dataclass
class Kube:
    """API clients for one kubeconfig context, plus what the session needs to know of it."""

    api_client: client.ApiClient
    configuration: client.Configuration
    context: str
    namespace: str

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api_client)

    @property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self.api_client)

    @property
    def authz(self) -> client.AuthorizationV1Api:
        return client.AuthorizationV1Api(self.api_client)

    def to_dict(self, obj: Any) -> dict[str, Any]:
        """A client model as the API's camelCase JSON dict (what the pure modules take)."""
        result: dict[str, Any] = self.api_client.sanitize_for_serialization(obj)
        return result

    def close(self) -> None:
        self.api_client.close()


def load(kubeconfig: str | None, context: str | None, namespace: str | None) -> Kube:
    """Clients for ``context`` of ``kubeconfig`` (defaults as kubectl: $KUBECONFIG, current context)."""
    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
    except (ConfigException, OSError, yaml.YAMLError) as exc:
        where = kubeconfig or "$KUBECONFIG / ~/.kube/config"
        raise NotFoundError(f"cannot read a kubeconfig from {where}: {exc}; pass --bridge-kubeconfig") from exc
    names = [c["name"] for c in contexts]
    chosen = context or (current or {}).get("name")
    if chosen not in names:
        raise NotFoundError(
            f"kube context {chosen!r} not found in {kubeconfig or 'the kubeconfig'}; known contexts: {', '.join(names)}"
        )
    entry = next(c for c in contexts if c["name"] == chosen)
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=chosen, client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        raise ClusterError(f"kube context {chosen!r} of {kubeconfig or 'the kubeconfig'} is unusable: {exc}") from exc
    configuration.retries = 1  # one retry of a failed connection, not urllib3's three (each up to the timeout)
    ns = namespace or entry.get("context", {}).get("namespace") or "default"
    return Kube(client.ApiClient(configuration), configuration, str(chosen), ns)


def _reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return str(exc.body or exc.reason)
    return str(body.get("message") or exc.reason)


def _invalid(exc: ApiException) -> bool:
    """A 422 for an invalid object (it has causes), not for a JSON Patch ``test`` that failed."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return True
    return isinstance(body, dict) and merge.refused_as_invalid(body)


def call(
    what: str, fn: Callable[..., T], *args: Any, verb: str = "", resource: str = "", namespace: str = "", **kwargs: Any
) -> T:
    """Call ``fn`` and translate API errors.

    ``what`` says what we were doing; ``verb``, ``resource`` and ``namespace`` name the
    permission a 403 lacks. They are for the message only and not passed to ``fn``.
    """
    kwargs["_request_timeout"] = _timeout_within(what, kwargs.get("_request_timeout", REQUEST_TIMEOUT))
    try:
        with timing.step(what):
            return fn(*args, **kwargs)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ApiUnreachableError(
            f"{what}: the API server did not answer ({type(exc).__name__}: {exc}); is it reachable from here?"
        ) from exc
    except ApiException as exc:
        reason = _reason(exc)
        if exc.status == 404:
            raise NotFoundError(f"{what}: not found ({reason})") from exc
        if exc.status == 403:
            scope = f" in namespace {namespace!r}" if namespace else ""
            grant = f"grant '{verb}' on '{resource}'{scope}" if verb and resource else "grant the missing permission"
            raise ForbiddenError(
                f"{what}: forbidden ({reason}); {grant} — `pytest-bridge rbac` prints a least-privilege Role",
                verb=verb, resource=resource, namespace=namespace,
            ) from exc  # fmt: skip
        if exc.status == 409 or (exc.status == 422 and ("test" in reason.lower() or not _invalid(exc))):
            raise ConflictError(f"{what}: conflict ({reason}); the object changed meanwhile — run again") from exc
        raise ClusterError(f"{what}: API error {exc.status} ({reason})") from exc


def pod_proxy_json(k: Kube, pod: str, port: int, path: str, timeout: float = 5) -> Any:
    """``GET`` ``path`` on a pod's port through the API server's pod proxy, parsed as JSON.

    The raw body is read (``_preload_content=False``): the client would otherwise turn a JSON
    answer into the ``str()`` of a Python dict. ValueError if the body is not JSON; ApiException
    and urllib3 errors as the client raises them.
    """
    response: Any = k.core.connect_get_namespaced_pod_proxy_with_path(
        f"{pod}:{port}", k.namespace, path, _request_timeout=timeout, _preload_content=False
    )
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()
