"""The local machine: name mapping (in-process resolver, hosts file), ports, the local
process under test and the session directory.

Rule: imports ``core`` only, never ``cluster``, ``transport`` or anything above; no pytest.
``_resolver_site`` is put on subprocesses' ``PYTHONPATH`` and imports nothing of ours.
"""
