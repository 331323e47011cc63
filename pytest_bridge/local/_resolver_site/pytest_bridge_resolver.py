"""In-process name resolver: cluster names → local loopback IPs, by patching ``socket``.

``install(table)`` makes ``socket.getaddrinfo``, ``socket.gethostbyname`` and
``socket.gethostbyname_ex`` answer the names of ``table`` (case-insensitive, a trailing
dot allowed) with its IPs; every other name falls through to the resolver that was in
place before. That covers ``requests``/urllib3, ``urllib``, ``http.client``,
``socket.create_connection`` and asyncio's default ``loop.getaddrinfo`` (which calls
``socket.getaddrinfo`` in the executor). It does not cover resolvers that bypass the
``socket`` module (uvloop, aiodns/c-ares, dnspython, native extensions).

Several installs stack (two sessions in one process, nested fixtures): lookups try the
newest table first, ``uninstall(token)`` removes one table in any order, and the
original functions are put back exactly when the last table goes. If someone else
wrapped our hook in the meantime, the hook is left in place, inert, so their wrapper
keeps working and a later install reuses it.

Loaded both as ``pytest_bridge.local._resolver_site.pytest_bridge_resolver`` (in pytest) and
as a top-level module by the subprocess ``sitecustomize``: stdlib only, Python 3.8+.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    Entry = tuple[str, tuple[str, ...]]  # (ip, names); names[0] is the canonical name

__all__ = [
    "ENV_HOSTS_FILE",
    "HostsTable",
    "active_tables",
    "install",
    "load_hosts_file",
    "parse_hosts_text",
    "resolving",
    "uninstall",
]

ENV_HOSTS_FILE = "PYTEST_BRIDGE_HOSTS_FILE"
_BLOCK_BEGIN = re.compile(r"^# >>> pytest-bridge session=\S+ >>>\s*$")
_BLOCK_END = re.compile(r"^# <<< pytest-bridge session=\S+ <<<\s*$")
_HOOKED = ("getaddrinfo", "gethostbyname", "gethostbyname_ex")


def _key(host: object) -> str | None:
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(host, str):
        return None
    return host.lower().rstrip(".") or None


class HostsTable:
    """An immutable name → (ip, names) lookup; the first line naming a host wins, as in /etc/hosts."""

    __slots__ = ("_by_name", "entries")

    def __init__(self, entries: Iterable[tuple[str, Sequence[str]]]) -> None:
        normalized: list[Entry] = []
        by_name: dict[str, Entry] = {}
        for ip, names in entries:
            keys = tuple(k for k in (_key(n) for n in names) if k)
            if not keys:
                continue
            entry = (ip, keys)
            normalized.append(entry)
            for name in keys:
                by_name.setdefault(name, entry)
        self.entries: tuple[Entry, ...] = tuple(normalized)
        self._by_name = by_name

    def lookup(self, host: object) -> Entry | None:
        key = _key(host)
        return None if key is None else self._by_name.get(key)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"HostsTable({list(self.entries)!r})"


def parse_hosts_text(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(ip, names)`` lines of a hosts file; only those inside pytest-bridge blocks if it has any."""
    lines = text.splitlines()
    has_blocks = any(_BLOCK_BEGIN.match(line) for line in lines)
    inside = not has_blocks
    entries: list[tuple[str, tuple[str, ...]]] = []
    for line in lines:
        if has_blocks and _BLOCK_BEGIN.match(line):
            inside = True
            continue
        if has_blocks and _BLOCK_END.match(line):
            inside = False
            continue
        fields = line.split("#", 1)[0].split()
        if inside and len(fields) >= 2:
            entries.append((fields[0], tuple(fields[1:])))
    return entries


def load_hosts_file(path: str) -> HostsTable:
    with open(path, encoding="utf-8") as handle:
        return HostsTable(parse_hosts_text(handle.read()))


# --------------------------------------------------------------------------- state


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Replaced whole (never mutated) under the lock: the hooks read a consistent snapshot without it.
        self.tables: tuple[tuple[object, HostsTable], ...] = ()
        self.originals: dict[str, Callable[..., Any]] = {}
        self.buried: set[str] = set()  # hooks someone wrapped after us: still in their chain, left in place
        self.probe: str | None = None  # a name only our hooks answer, while checking the chain


_state = _State()
_originals = _state.originals
_PROBE_IP = "127.1.0.254"


def _lookup(host: object) -> Entry | None:
    if _state.probe is not None and _key(host) == _state.probe:
        return (_PROBE_IP, (_state.probe,))
    for _token, table in reversed(_state.tables):
        found = table.lookup(host)
        if found is not None:
            return found
    return None


def _getaddrinfo(  # noqa: PLR0917 - the signature of socket.getaddrinfo
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[tuple[Any, Any, int, str, Any]]:
    original = _originals["getaddrinfo"]
    found = None if flags & socket.AI_NUMERICHOST else _lookup(host)
    if found is None:
        return original(host, port, family, type, proto, flags)  # type: ignore[no-any-return]
    ip, names = found
    results: list[tuple[Any, Any, int, str, Any]] = original(
        ip, port, family, type, proto, flags | socket.AI_NUMERICHOST
    )
    if flags & socket.AI_CANONNAME and results:
        # glibc puts the canonical name (first name of the hosts line) on the first result only.
        fam, kind, prot, _canon, address = results[0]
        results[0] = (fam, kind, prot, names[0], address)
    return results


def _gethostbyname(hostname: str) -> str:
    found = _lookup(hostname)
    if found is None or ":" in found[0]:
        return _originals["gethostbyname"](hostname)  # type: ignore[no-any-return]
    return found[0]


def _gethostbyname_ex(hostname: str) -> tuple[str, list[str], list[str]]:
    found = _lookup(hostname)
    if found is None or ":" in found[0]:
        return _originals["gethostbyname_ex"](hostname)  # type: ignore[no-any-return]
    ip, names = found
    return names[0], list(names[1:]), [ip]


_HOOKS: dict[str, Callable[..., Any]] = {
    "getaddrinfo": _getaddrinfo,
    "gethostbyname": _gethostbyname,
    "gethostbyname_ex": _gethostbyname_ex,
}


def _still_chained(name: str, current: Callable[..., Any]) -> bool:
    """Whether ``current`` (someone's wrapper) still calls our hook: ask it for a name only we know."""
    probe = f"pytest-bridge-probe-{id(_state)}-{threading.get_ident()}.invalid"
    _state.probe = probe
    try:
        if name == "getaddrinfo":
            answer: Any = [info[4][0] for info in current(probe, None)]
        else:
            answer = current(probe)
    except (OSError, TypeError, ValueError):
        return False
    finally:
        _state.probe = None
    return _PROBE_IP in (answer if isinstance(answer, list) else [answer]) or (
        isinstance(answer, tuple) and _PROBE_IP in answer[2]
    )


def _patch() -> None:
    for name in _HOOKED:
        current = getattr(socket, name)
        hook = _HOOKS[name]
        if current is hook:
            _state.buried.discard(name)
            continue
        if name in _state.buried:
            _state.buried.discard(name)
            if _still_chained(name, current):
                continue  # our hook is inside their wrapper: wrapping theirs would loop
        if current is not _state.originals.get(name):
            _state.originals[name] = current
        setattr(socket, name, hook)


def _unpatch() -> None:
    for name in _HOOKED:
        if getattr(socket, name) is _HOOKS[name]:
            setattr(socket, name, _state.originals[name])
        else:
            _state.buried.add(name)  # removing ourselves would also remove their wrapper


def install(table: HostsTable) -> object:
    """Start answering ``table``'s names; returns the token for :func:`uninstall`."""
    token = object()
    with _state.lock:
        if not _state.tables:
            _patch()
        _state.tables = (*_state.tables, (token, table))
    return token


def uninstall(token: object) -> None:
    """Stop answering the table of ``token``; idempotent. The last one restores ``socket``."""
    with _state.lock:
        remaining = tuple(item for item in _state.tables if item[0] is not token)
        if len(remaining) == len(_state.tables):
            return
        _state.tables = remaining
        if not remaining:
            _unpatch()


def active_tables() -> tuple[HostsTable, ...]:
    """Installed tables, oldest first."""
    return tuple(table for _token, table in _state.tables)


@contextlib.contextmanager
def resolving(table: HostsTable) -> Iterator[HostsTable]:
    token = install(table)
    try:
        yield table
    finally:
        uninstall(token)
