"""pytest-bridge name mapping for Python subprocesses, loaded by ``site`` at start-up.

pytest-bridge puts this directory first on ``PYTHONPATH`` and sets
``PYTEST_BRIDGE_HOSTS_FILE`` to the session's hosts file. This module installs the
in-process resolver with the names of that file, then runs the ``sitecustomize`` the
interpreter would have loaded without us (the next one on ``sys.path``), so a
distribution's or virtualenv's own customization keeps working.

Must never stop the interpreter from starting: problems are reported on stderr.
Stdlib only, Python 3.8+; does not import ``pytest_bridge``. Not active under
``python -I``/``-E``/``-S``, which ignore ``PYTHONPATH`` or skip ``site``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
_RESOLVER = "pytest_bridge_resolver"


def _load_resolver() -> types.ModuleType:
    resolver = sys.modules.get(_RESOLVER)
    if resolver is not None:
        return resolver
    spec = importlib.util.spec_from_file_location(_RESOLVER, os.path.join(_HERE, _RESOLVER + ".py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_RESOLVER} from {_HERE}")
    resolver = importlib.util.module_from_spec(spec)
    sys.modules[_RESOLVER] = resolver
    spec.loader.exec_module(resolver)
    return resolver


def _install_resolver() -> None:
    path = os.environ.get("PYTEST_BRIDGE_HOSTS_FILE", "")
    if not path:
        return
    try:
        resolver = _load_resolver()
        resolver.install(resolver.load_hosts_file(path))
    except Exception as error:
        sys.stderr.write(f"pytest-bridge: cluster names will not resolve in this process: {error}\n")


def _is_ours(entry: str) -> bool:
    directory = os.path.abspath(entry or os.curdir)
    # Any copy of this directory (another pytest-bridge install) would chain back to us: skip them all.
    return os.path.isfile(os.path.join(directory, "sitecustomize.py")) and os.path.isfile(
        os.path.join(directory, _RESOLVER + ".py")
    )


def _chain() -> None:
    rest = [entry for entry in sys.path if isinstance(entry, str) and not _is_ours(entry)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # what `import sitecustomize` would have given without us
    spec.loader.exec_module(module)


_install_resolver()
_chain()
