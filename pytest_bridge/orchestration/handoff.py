"""Hand a connected bridge from the pytest-xdist controller to its workers.

Under ``-n N`` the controller connects once: the agent swap, the guard, the tunnel and the
outbound listeners on 127.1.1.x all live in its process. Each worker gets a
:class:`Handoff` in ``workerinput`` and attaches to it (``BridgeSession.attach``): the same
services (local ports, env, session dirs, cluster URLs) and the same name mapping, which
the worker installs for itself (in-process resolver, subprocess env); its connections to
the mapped addresses reach the controller's listeners. A worker never changes the cluster
for the session's bridge.

``workerinput`` travels through execnet, which carries only basic types: the handoff is
pickled into a string. Both ends are the same code in the same environment (the
controller spawns the workers), so nothing else ever reads it. Pure data, no I/O.
"""

from __future__ import annotations

import base64
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_bridge.local.hosts import Mechanisms
    from pytest_bridge.orchestration.connection import BridgedService

__all__ = ["WORKERINPUT_KEY", "Handoff", "decode", "encode"]

WORKERINPUT_KEY = "pytest_bridge_handoff"


@dataclass(frozen=True)
class Handoff:
    """What a worker needs to use the controller's bridge."""

    session_id: str
    services: dict[str, BridgedService]
    mechanisms: Mechanisms  # as chosen by the controller (a system hosts block stays its job)
    owner: str  # who holds the tunnel, for messages ("xdist controller pid 1234")
    phases: dict[str, float] = field(default_factory=dict)  # the controller's connect phases (seconds)


def encode(handoff: Handoff) -> str:
    return base64.b64encode(pickle.dumps(handoff)).decode("ascii")


def decode(text: str) -> Handoff:
    handoff = pickle.loads(
        base64.b64decode(text.encode("ascii"))
    )  # our own controller's data, see the module docstring
    if not isinstance(handoff, Handoff):
        raise TypeError(f"not a pytest-bridge handoff: {type(handoff).__name__}")
    return handoff
