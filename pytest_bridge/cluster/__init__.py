"""Cluster I/O: the Kubernetes API, as thin as it can be, over the pure core.

``kube`` wraps the client and turns its exceptions into ours; the others read and change
objects (permissions, policies, workloads and their controllers, the restore record and
guard, the code bundle and the agent images). Rule: imports ``core`` only, never
``transport``, ``local`` or anything above; no pytest.
"""
