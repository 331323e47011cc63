"""The pure core: plans, patches, names, config and record formats as plain data.

Rule: no I/O and no pytest here — no Kubernetes client, no sockets, no subprocesses, no
files outside the package's own data. Everything is tested without a cluster. It imports
only the standard library, PyYAML and the in-cluster packages' constants
(``pytest_bridge_agent.runtime``, ``pytest_bridge_routing.objects``); nothing else of
``pytest_bridge``. (``faults`` may signal its own process: the fault points of the tests.)
"""
