"""Make cluster names resolve to their local loopback IPs: the I/O side of name mapping.

:mod:`pytest_bridge.core.names` decides the names and addresses; this module makes them
resolvable, with the least privilege that works (chosen by :func:`choose_mechanisms`):

* **in-process resolver** (no privileges): patches ``socket`` name lookups inside the
  pytest process (:func:`install_resolver`, :func:`resolving`);
* **Python subprocesses** (no privileges): :func:`subprocess_env` puts a
  ``sitecustomize`` directory first on ``PYTHONPATH`` and points
  ``PYTEST_BRIDGE_HOSTS_FILE`` at the session's hosts file; the subprocess installs the
  same resolver and then runs its own ``sitecustomize``;
* **any subprocess, per-process hosts view** (Linux; root, or unprivileged user
  namespaces): :func:`wrap_argv` runs the command in a private mount namespace where
  the session hosts file (system content + our block) is bind-mounted over
  ``/etc/hosts``; nothing outside that process tree sees it;
* **system hosts file** (root, opt-in): :class:`SystemHostsBlock` writes the session's
  marked block into ``/etc/hosts`` atomically and always removes it;
  :func:`remove_stale_blocks` sweeps blocks of sessions that died.

``auto`` picks the system hosts file only when running as root on a host declared
disposable (``PYTEST_BRIDGE_DISPOSABLE_HOST=1``: a CI VM or throw-away container),
and the unprivileged mechanisms otherwise; ``hosts-file`` asks for it explicitly and
fails if the file is not writable; ``in-process`` never touches system files.

Binding the loopback IPs: on Linux (and Windows) all of 127.0.0.0/8 is local, so
forwarders bind 127.1.1.x without setup. macOS configures only 127.0.0.1 on ``lo0``:
binding 127.1.1.x fails with EADDRNOTAVAIL until an alias is added
(``sudo ifconfig lo0 alias 127.1.1.7 up``; ``sudo ifconfig lo0 -alias 127.1.1.7``
removes it; aliases do not survive a reboot). :func:`loopback_bindable` tells which
case applies, so the caller can fall back to ``single-ip`` address mode. macOS has no
mount namespaces either: there only the resolver, ``sitecustomize`` and the system
hosts file apply.

Must not run ``sudo`` or change anything outside the session directory unless the
system hosts file mechanism was chosen.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

from pytest_bridge.core.bridgesettings import NameMappingMode
from pytest_bridge.core.errors import NameMappingError
from pytest_bridge.core.names import (
    AddressMode,
    NameMapping,
    parse_hosts_blocks,
    remove_hosts_blocks,
    render_hosts_block,
    update_hosts_text,
)
from pytest_bridge.local._resolver_site import pytest_bridge_resolver as _resolver
from pytest_bridge.local._resolver_site.pytest_bridge_resolver import ENV_HOSTS_FILE, HostsTable

__all__ = [
    "DISPOSABLE_HOST_ENV",
    "ENV_HOSTS_FILE",
    "SITE_DIR",
    "SYSTEM_HOSTS",
    "HostsTable",
    "Mechanisms",
    "SystemHostsBlock",
    "block_id",
    "can_isolate_hosts",
    "choose_mechanisms",
    "describe",
    "hosts_table",
    "install_resolver",
    "loopback_bindable",
    "remove_stale_blocks",
    "resolving",
    "split_block_id",
    "subprocess_env",
    "uninstall_resolver",
    "wrap_argv",
    "write_session_hosts_file",
]

SITE_DIR = Path(_resolver.__file__).resolve().parent
SYSTEM_HOSTS = Path("/etc/hosts")  # POSIX only: Windows is not supported by this module (fcntl, unshare)
DISPOSABLE_HOST_ENV = "PYTEST_BRIDGE_DISPOSABLE_HOST"
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- in-process resolver


def hosts_table(mapping: NameMapping) -> HostsTable:
    """The resolver table of a ``loopback-ips`` mapping (single-ip mappings keep names unresolvable)."""
    if mapping.mode is not AddressMode.LOOPBACK_IPS:
        raise NameMappingError(
            "names can only be mapped in loopback-ips address mode; in single-ip mode use the service-link variables"
        )
    return HostsTable((entry.ip, entry.hostnames) for entry in mapping.entries)


def install_resolver(mapping: NameMapping) -> object:
    """Resolve ``mapping``'s names in this process; the token goes to :func:`uninstall_resolver`."""
    return _resolver.install(hosts_table(mapping))


def uninstall_resolver(token: object) -> None:
    _resolver.uninstall(token)


@contextlib.contextmanager
def resolving(mapping: NameMapping) -> Iterator[HostsTable]:
    with _resolver.resolving(hosts_table(mapping)) as table:
        yield table


# --------------------------------------------------------------------------- subprocesses


def _safe_block_id(text: str) -> str:
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", text).lstrip("-_.")
    return cleaned or "session"


def write_session_hosts_file(
    mapping: NameMapping,
    session_dir: Path,
    session_id: str | None = None,
    *,
    system_hosts: Path = SYSTEM_HOSTS,
) -> Path:
    """Write ``<session_dir>/hosts``: the system hosts file plus this session's block.

    Read by the subprocess ``sitecustomize`` (which takes only the marked block) and
    bind-mounted over ``/etc/hosts`` by :func:`wrap_argv` (which needs the rest too).
    """
    session_id = session_id or _safe_block_id(Path(session_dir).name)
    try:
        system_text = system_hosts.read_text(encoding="utf-8")
    except FileNotFoundError:
        system_text = ""
    try:
        text = update_hosts_text(system_text, mapping, session_id)
    except NameMappingError:
        # A broken block in the system file must not stop us; ours goes last and still parses.
        newline = "" if not system_text or system_text.endswith("\n") else "\n"
        text = system_text + newline + render_hosts_block(mapping, session_id)
    target = Path(session_dir) / "hosts"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".hosts.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # World-readable like /etc/hosts: after a user-namespace mapping the reader may look like another user.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def subprocess_env(
    mapping: NameMapping,
    session_dir: Path,
    *,
    base: Mapping[str, str] | None = None,
    session_id: str | None = None,
    system_hosts: Path = SYSTEM_HOSTS,
) -> dict[str, str]:
    """The environment for a subprocess that should resolve ``mapping``'s names.

    ``base`` (default ``os.environ``) plus: :data:`SITE_DIR` first on ``PYTHONPATH``,
    ``PYTEST_BRIDGE_HOSTS_FILE`` naming the session hosts file (written here), and, when
    a proxy is configured, the mapped names and IPs added to ``NO_PROXY``/``no_proxy``
    (a proxy would otherwise try to resolve cluster names itself).
    """
    env = dict(os.environ if base is None else base)
    if mapping.mode is not AddressMode.LOOPBACK_IPS or not mapping.entries:
        return env
    hosts_file = write_session_hosts_file(mapping, session_dir, session_id, system_hosts=system_hosts)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])
    env[ENV_HOSTS_FILE] = str(hosts_file)
    if any(env.get(var) for var in _PROXY_VARS):
        ours = [name for entry in mapping.entries for name in (entry.ip, *entry.hostnames)]
        for var in ("NO_PROXY", "no_proxy"):
            existing = [p for p in env.get(var, "").split(",") if p.strip()]
            env[var] = ",".join(dict.fromkeys([*existing, *ours]))
    return env


_MOUNT_SCRIPT = 'mount --bind "$0" /etc/hosts && exec "$@"'
# Unprivileged: map ourselves to root in a user namespace to mount, then map back to our own
# uid/gid in a nested one, so the command does not run as (namespace) root.
_MOUNT_SCRIPT_KEEP_ID = 'mount --bind "$0" /etc/hosts && exec unshare --user --map-user={uid} --map-group={gid} -- "$@"'


def _wrap(argv: Sequence[str], hosts_file: Path, style: str) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    if style == "root":
        prefix = [unshare, "--mount", "--propagation", "private"]
        script = _MOUNT_SCRIPT
    else:
        prefix = [unshare, "--mount", "--propagation", "private", "--map-root-user"]
        script = (
            _MOUNT_SCRIPT_KEEP_ID.format(uid=os.getuid(), gid=os.getgid())
            if style == "userns-keep-id"
            else _MOUNT_SCRIPT
        )
    return [*prefix, "--", "/bin/sh", "-c", script, str(hosts_file), *argv]


def _probe(style: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="pytest-bridge-probe-") as directory:
        probe = Path(directory, "hosts")
        marker = f"127.1.1.1 pytest-bridge-probe-{os.getpid()}\n"
        probe.write_text(marker, encoding="utf-8")
        probe.chmod(0o644)
        Path(directory).chmod(0o755)
        try:
            result = subprocess.run(
                _wrap(["cat", "/etc/hosts"], probe, style),
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        if result.returncode != 0 or result.stdout != marker:
            return False
        if style == "userns-keep-id":
            check = subprocess.run(
                _wrap(["id", "-u"], probe, style), capture_output=True, text=True, timeout=5, check=False
            )
            return check.returncode == 0 and check.stdout.strip() == str(os.getuid())
        return True


@functools.cache
def _isolation_style() -> str | None:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    styles = ["root"] if os.geteuid() == 0 else ["userns-keep-id", "userns-root"]
    for style in styles:
        if _probe(style):
            return style
    return None


def can_isolate_hosts() -> bool:
    """Whether :func:`wrap_argv` works here (probed once per process: a few ms)."""
    return _isolation_style() is not None


def wrap_argv(argv: Sequence[str], hosts_file: Path) -> list[str]:
    """``argv`` run with ``hosts_file`` bind-mounted over ``/etc/hosts`` in a private mount namespace.

    Unprivileged, the command keeps its uid/gid when the nested user namespace works
    (util-linux >= 2.38), else it runs as root of its user namespace. Supplementary
    groups show as the overflow group inside (access checks still use them). Raises
    :class:`NameMappingError` when :func:`can_isolate_hosts` is false.
    """
    style = _isolation_style()
    if style is None:
        raise NameMappingError(
            "cannot give a subprocess its own /etc/hosts here (needs Linux, unshare and root or unprivileged "
            "user namespaces); use subprocess_env() for Python subprocesses or the hosts-file mode"
        )
    return _wrap(argv, hosts_file, style)


# --------------------------------------------------------------------------- system hosts file


def block_id(session_id: str, pid: int | None = None) -> str:
    """The id in this session's hosts-file markers: the session id and our pid, to sweep dead sessions."""
    return f"{session_id}.pid{os.getpid() if pid is None else pid}"


def split_block_id(text: str) -> tuple[str, int | None]:
    """``(session_id, pid)`` of a marker id; ``pid`` is ``None`` for ids that do not carry one."""
    match = re.fullmatch(r"(?P<session>.+)\.pid(?P<pid>\d+)", text)
    if match is None:
        return text, None
    return match["session"], int(match["pid"])


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_applied_here: set[str] = set()  # marker ids this process has in a system hosts file


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Lock the directory, not the file: os.replace swaps the file's inode (and a lock held on
    # it), the directory's stays; and no lock file is left behind in /etc.
    fd = os.open(path.resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace_atomically(path: Path, text: str) -> None:
    info = path.stat()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.pytest-bridge-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, info.st_mode & 0o7777)
        if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(temporary, info.st_uid, info.st_gid)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_in_place(path: Path, text: str) -> None:
    # Keeps inode, owner and SELinux label, but a reader may catch a half-written file: fallback only.
    with open(path, "r+", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.truncate()
        handle.flush()
        os.fsync(handle.fileno())


def _edit_hosts(path: Path, change: Callable[[str], str]) -> bool:
    """Apply ``change`` to the file under a lock; ``True`` if the content changed."""
    with _locked(path):
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
        new = change(text)
        if new == text:
            return False
        try:
            _replace_atomically(path, new)
        except OSError as error:
            # Docker and Kubernetes bind-mount /etc/hosts: rename onto a mount point fails with
            # EBUSY (EXDEV, EPERM elsewhere); a directory we may not create files in gives EACCES.
            if error.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS):
                raise
            _write_in_place(path, new)
        return True


def remove_stale_blocks(
    path: Path = SYSTEM_HOSTS,
    live_session_ids: Collection[str] = (),
    *,
    is_alive: Callable[[int], bool] = _pid_alive,
) -> list[str]:
    """Remove pytest-bridge blocks of sessions that are gone; returns the removed marker ids.

    A block is kept if its session id (or whole marker id) is in ``live_session_ids`` or
    applied by a :class:`SystemHostsBlock` of this process, or its marker carries the pid
    of another process that is still running. Blocks without a pid, of a dead pid, or of
    this process but no longer applied are removed. A reused pid keeps a stale block until
    that process exits: harmless, and never removes a live one.
    """
    live = set(live_session_ids) | _applied_here
    stale: list[str] = []

    def change(text: str) -> str:
        stale.clear()
        for block in parse_hosts_blocks(text):
            session, pid = split_block_id(block.session_id)
            if session in live or block.session_id in live:
                continue
            if pid is not None and pid != os.getpid() and is_alive(pid):
                continue
            stale.append(block.session_id)
        return remove_hosts_blocks(text, stale) if stale else text

    _edit_hosts(Path(path), change)
    return list(stale)


class SystemHostsBlock:
    """This session's block in the system hosts file: written on enter, always removed on exit.

    Also removed at interpreter exit if :meth:`remove` was never called (atexit does not run
    on SIGKILL: :func:`remove_stale_blocks` sweeps those on the next run).
    """

    def __init__(self, mapping: NameMapping, session_id: str, path: Path = SYSTEM_HOSTS) -> None:
        self.mapping = mapping
        self.path = Path(path)
        self.block_id = block_id(session_id)
        self._applied = False

    def apply(self) -> None:
        if not os.access(self.path, os.W_OK):
            raise NameMappingError(
                f"{self.path} is not writable: run as root for --bridge-name-mapping=hosts-file, "
                "or use --bridge-name-mapping=in-process"
            )
        _edit_hosts(self.path, lambda text: update_hosts_text(text, self.mapping, self.block_id))
        self._applied = True
        _applied_here.add(self.block_id)
        atexit.register(self.remove)

    def remove(self) -> None:
        if not self._applied:
            return
        self._applied = False
        atexit.unregister(self.remove)
        _applied_here.discard(self.block_id)
        _edit_hosts(self.path, lambda text: remove_hosts_blocks(text, {self.block_id}))

    def __enter__(self) -> SystemHostsBlock:
        self.apply()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


# --------------------------------------------------------------------------- choosing and reporting


def loopback_bindable(ip: str) -> bool:
    """Whether a TCP socket can bind ``ip`` (false on macOS for 127.1.1.x without an lo0 alias)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Mechanisms:
    """What makes names resolvable in a session."""

    in_process: bool = False
    python_subprocesses: bool = False
    isolated_subprocesses: bool = False  # wrap_argv works
    system_hosts_file: Path | None = None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def choose_mechanisms(
    mode: NameMappingMode,
    *,
    environ: Mapping[str, str] | None = None,
    is_root: bool | None = None,
    can_isolate: bool | None = None,
    system_hosts: Path = SYSTEM_HOSTS,
) -> Mechanisms:
    """The mechanisms ``mode`` stands for here (``auto``: see the module docstring)."""
    environ = os.environ if environ is None else environ
    root = _is_root() if is_root is None else is_root
    disposable = environ.get(DISPOSABLE_HOST_ENV, "").strip().lower() in _TRUE
    if mode is NameMappingMode.OFF:
        return Mechanisms()
    if mode is NameMappingMode.HOSTS_FILE or (mode is NameMappingMode.AUTO and root and disposable):
        return Mechanisms(system_hosts_file=system_hosts)
    isolate = can_isolate_hosts() if can_isolate is None else can_isolate
    return Mechanisms(in_process=True, python_subprocesses=True, isolated_subprocesses=isolate)


def describe(selection: Mechanisms | NameMappingMode) -> str:
    """One line for the report header: which mechanisms make cluster names resolve."""
    mechanisms = choose_mechanisms(selection) if isinstance(selection, NameMappingMode) else selection
    if mechanisms.system_hosts_file is not None:
        return f"system hosts file {mechanisms.system_hosts_file}"
    parts = []
    if mechanisms.in_process:
        parts.append("in-process resolver")
    if mechanisms.python_subprocesses:
        parts.append("PYTHONPATH sitecustomize for Python subprocesses")
    if mechanisms.isolated_subprocesses:
        parts.append("private /etc/hosts (mount namespace) for wrapped subprocesses")
    return " + ".join(parts) if parts else "off (cluster names do not resolve locally)"
