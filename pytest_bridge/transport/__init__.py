"""Transport: the tunnel to the agent and the port-forwards it rides on.

Our own WebSocket port-forward through the API server, ``kubectl port-forward``, the
multiplexed tunnel and its background thread. Rule: imports ``core`` only (and the agent's
wire protocol), never ``cluster``, ``local`` or anything above; no pytest.
"""
