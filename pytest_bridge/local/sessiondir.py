"""The session's private directory under the temp dir, and the sweep of those whose owner died.

A session keeps its env file (imported secrets, mode 0600), hosts file, sitecustomize and
local service logs in ``$TMPDIR/pytest-bridge-<session>-<random>/`` and removes it on
close. A pytest killed with SIGKILL cannot: the in-cluster guard restores the cluster, and
the next session on the machine removes the directory here. Each directory names its owner
in ``owner.pid``; one whose owner is gone is removed by :func:`sweep`, which every new
session runs first. Directories of versions before ``owner.pid`` are removed only when
empty and older than :data:`LEGACY_GRACE_S`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

__all__ = ["OWNER_FILE", "create", "sweep"]

OWNER_FILE = "owner.pid"
LEGACY_GRACE_S = 600.0
# tempfile.mkdtemp(prefix=f"pytest-bridge-{session_id}-"): session ids end in 6 hex digits.
_NAME = re.compile(r"^pytest-bridge-.+-[0-9a-f]{6}-[a-z0-9_]{8}$")


def create(session_id: str, root: Path | None = None) -> Path:
    """A new private session directory (0700) naming this process as its owner; stale ones are swept first."""
    root = Path(root or tempfile.gettempdir())
    sweep(root)
    path = Path(tempfile.mkdtemp(prefix=f"pytest-bridge-{session_id}-", dir=root))
    path.chmod(0o700)
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def sweep(root: Path | None = None) -> list[Path]:
    """Remove this user's session directories whose owner process is gone; returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    uid = os.getuid()
    for path in entries:
        if not _NAME.match(path.name):
            continue
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
                continue
            try:
                pid = int((path / OWNER_FILE).read_text().split()[0])
            except FileNotFoundError:
                # Before owner.pid: an empty directory left by a session that never got used.
                if time.time() - info.st_mtime > LEGACY_GRACE_S and not any(path.iterdir()):
                    path.rmdir()
                    removed.append(path)
                continue
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to read: leave it
    return removed
