"""Files put first on ``PYTHONPATH`` of Python subprocesses started through the bridge.

This directory doubles as a ``sys.path`` entry for foreign interpreters (another
virtualenv, another Python version, without pytest-bridge installed), so everything in
it must be stdlib-only, Python 3.8+ compatible, and must never import ``pytest_bridge``.
The ``__init__`` only makes the directory a package so it ships in the distribution and
``pytest_bridge.local.hosts`` can import the resolver from it.
"""
