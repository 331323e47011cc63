"""Fault injection at named points of connect and close, for the tests that prove nothing is lost.

``PYTEST_BRIDGE_FAULT=<point>=<action>[,<point>=<action>...]`` makes :func:`checkpoint` act when
the session passes ``<point>`` (see :data:`POINTS`); actions:

* ``sigkill`` — the process dies on the spot, as with ``kill -9`` (only the in-cluster guard can
  clean up);
* ``sigterm`` — SIGTERM to this process (the plugin's handler turns it into an orderly unwind);
* ``interrupt`` — a ``KeyboardInterrupt`` raised right there (Ctrl-C);
* ``lost-response`` — the error ``kube.call`` raises when the API server's answer is lost
  (:class:`~pytest_bridge.core.errors.ApiUnreachableError`, from the client's ``ProtocolError``), raised
  right after the call made before ``<point>``: the change happened, the client does not know.

Unset (the normal case) it costs one dictionary lookup per point. This module imports nothing of
the plugin at import time (the chaos script and the e2e tests read :data:`POINTS` from here); the
error of ``lost-response`` is imported when that fault fires.
"""

from __future__ import annotations

import functools
import os
import signal

__all__ = ["ACTIONS", "ENV", "POINTS", "checkpoint", "parse"]

ENV = "PYTEST_BRIDGE_FAULT"
# In the order connect passes them; close's after.
POINTS = (
    "guard-job",  # the guard Job created (not yet armed), nothing else
    "guard-rbac",  # its ServiceAccount, Role and RoleBinding created
    "guard-record",  # the token, the restore record and the code ConfigMap stored
    "guard-armed",  # the guard's setup deadline lifted: it now guards the session
    "workload-patched",  # the workload PATCH answered (the agent is starting)
    "agent-ready",  # the agent pod ready and the Service's endpoints only it
    "tunnel-open",  # the tunnel connected and the route proven
    "connected",  # env imported, names mapped: connect() is about to return
    "close-start",  # close() begins
    "close-restored",  # close() applied the reverse patch, the guard not yet deleted
)
ACTIONS = ("sigkill", "sigterm", "interrupt", "lost-response")


def parse(text: str) -> dict[str, str]:
    """``point=action,...`` as a dict; ValueError naming an unknown point or action."""
    faults: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: {item!r} is not POINT=ACTION; points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)}"
            )
        faults[point] = action
    return faults


@functools.cache
def _faults() -> dict[str, str]:
    return parse(os.environ.get(ENV, ""))


def checkpoint(point: str) -> None:
    """Act as :data:`ENV` says for ``point``; nothing when it says nothing (the normal case)."""
    action = _faults().get(point)
    if action is None:
        return
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "interrupt":
        raise KeyboardInterrupt(f"{ENV}: interrupt at {point}")
    elif action == "lost-response":
        raise _lost_response(point)


def _lost_response(point: str) -> BaseException:
    """What ``kube.call`` raises when the connection drops before the answer, as the client reports it."""
    import http.client  # noqa: PLC0415 - only when the fault fires

    import urllib3  # noqa: PLC0415

    from pytest_bridge.core.errors import ApiUnreachableError  # noqa: PLC0415

    cause = urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("Remote end closed connection without response")
    )
    error = ApiUnreachableError(
        f"{ENV}: the call before {point}: the API server did not answer ({type(cause).__name__}: {cause}); "
        "is it reachable from here?"
    )
    error.__cause__ = cause
    return error
