"""The router's view of nginx's access log: parse its lines, count requests, follow the file.

nginx writes one JSON object per request (:data:`pytest_bridge_routing.nginxconf.LOG_FIELDS`);
:class:`LogTailer` follows the file across rotations, :class:`Stats` counts the requests per
(effective route, header received or not, remote address) for the router's ``/stats``. Pure
or file-only; stdlib only.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import nginxconf

__all__ = [
    "AccessRecord",
    "LogTailer",
    "Stats",
    "StatsKey",
    "parse_access_line",
]

log = logging.getLogger("pytest_bridge_router")


# --- the access log --------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRecord:
    time: float  # epoch seconds
    remote_addr: str
    header: str  # the received kubernetes-route-as ("" = none)
    route: str  # the effective route ("" = default backend)
    host: str = ""
    upstream: str = ""
    status: int = 0
    request_time: float = 0.0
    port: str = ""
    proto: str = ""


def _number(value: Any, kind: Callable[[str], float]) -> float:
    try:
        return kind(str(value))
    except ValueError:
        return 0


def parse_access_line(line: str | bytes) -> AccessRecord | None:
    """One access-log line (a JSON object, nginx ``escape=json``); None if it is not one."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        obj = json.loads(line)
        when = float(obj["time"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(obj, dict):
        return None
    text = {key: str(obj.get(key, "")) for key in nginxconf.LOG_FIELDS}
    return AccessRecord(
        time=when,
        remote_addr=text["remote_addr"],
        header=text["header"],
        route=text["route"],
        host=text["host"],
        upstream=text["upstream"],
        status=int(_number(text["status"], int)),
        request_time=float(_number(text["request_time"], float)),
        port=text["port"],
        proto=text["proto"],
    )


StatsKey = tuple[str, bool, str]  # effective route, header received, remote address


@dataclass
class _Counter:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def add(self, record: AccessRecord) -> None:
        self.first = record.time if self.count == 0 else min(self.first, record.time)
        self.last = max(self.last, record.time)
        self.count += 1
        self.statuses[record.status] = self.statuses.get(record.status, 0) + 1


def _entries(counters: Mapping[StatsKey, _Counter]) -> list[dict[str, Any]]:
    return [
        {
            "route": route,
            "header": header,
            "remote_addr": remote,
            "count": c.count,
            "first": c.first,
            "last": c.last,
            "statuses": {str(status): n for status, n in sorted(c.statuses.items())},
        }
        for (route, header, remote), c in sorted(counters.items())
    ]


class Stats:
    """Request counts per (effective route, header received, remote address). Not thread-safe.

    Totals cover everything seen; ``since`` queries are answered from the last ``window`` records
    (``complete`` says whether the window reaches back that far).
    """

    def __init__(self, window: int = 100_000) -> None:
        self._totals: dict[StatsKey, _Counter] = {}
        self._recent: collections.deque[AccessRecord] = collections.deque(maxlen=window)
        self._dropped_until = float("-inf")  # the latest time of a record that left the window
        self.unparsed = 0

    @staticmethod
    def key(record: AccessRecord) -> StatsKey:
        return (record.route, record.header != "", record.remote_addr)

    def add(self, record: AccessRecord) -> None:
        self._totals.setdefault(self.key(record), _Counter()).add(record)
        if self._recent.maxlen and len(self._recent) == self._recent.maxlen:
            self._dropped_until = max(self._dropped_until, self._recent[0].time)
        self._recent.append(record)

    def add_line(self, line: str | bytes) -> None:
        record = parse_access_line(line)
        if record is None:
            self.unparsed += 1
        else:
            self.add(record)

    def snapshot(self, since: float | None = None) -> dict[str, Any]:
        if since is None:
            counters: Mapping[StatsKey, _Counter] = self._totals
            complete = True
        else:
            window: dict[StatsKey, _Counter] = {}
            for record in self._recent:
                if record.time > since:
                    window.setdefault(self.key(record), _Counter()).add(record)
            counters = window
            complete = since >= self._dropped_until
        return {
            "since": since,
            "total": sum(c.count for c in counters.values()),
            "unparsed": self.unparsed,
            "complete": complete,
            "entries": _entries(counters),
        }


class LogTailer:
    """Complete new lines of a log file that nginx appends to, across renames and truncation.

    A renamed file (rotation) is read to its end for ``grace`` seconds more (workers reopen their
    logs a little after the master), while the new file at ``path`` is read from its start.
    """

    def __init__(
        self, path: str, *, from_end: bool = False, grace: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._from_end = from_end
        self._grace = grace
        self._clock = clock
        self._file: BinaryIO | None = None
        self._partial = b""
        self._old: list[tuple[BinaryIO, bytearray, float]] = []  # file, partial line, rotated at

    def _open(self) -> BinaryIO | None:
        self._partial = b""
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across polls
        except FileNotFoundError:
            self._file = None
            return None
        if self._from_end:
            self._file.seek(0, os.SEEK_END)
        self._from_end = False  # only the file found first: later files are new
        return self._file

    @staticmethod
    def _drain(f: BinaryIO, partial: bytearray, lines: list[bytes]) -> bool:
        data = f.read()
        if not data:
            return False
        partial += data
        *complete, rest = bytes(partial).split(b"\n")
        lines.extend(line for line in complete if line)
        partial[:] = rest
        return True

    def poll(self) -> list[bytes]:
        lines: list[bytes] = []
        now = self._clock()
        for entry in list(self._old):
            old, old_partial, since = entry
            if self._drain(old, old_partial, lines):
                continue
            if now - since >= self._grace:
                old.close()
                self._old.remove(entry)
        f = self._file or self._open()
        if f is None:
            return lines
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(f.fileno())
        if current is not None and (current.st_ino, current.st_dev) != (opened.st_ino, opened.st_dev):
            partial = bytearray(self._partial)
            self._drain(f, partial, lines)
            self._old.append((f, partial, now))
            f = self._open()
            if f is None:
                return lines
        elif opened.st_size < f.tell():  # truncated in place
            f.seek(0)
            self._partial = b""
        buffer = bytearray(self._partial)
        self._drain(f, buffer, lines)
        self._partial = bytes(buffer)
        return lines

    def close(self) -> None:
        for f, _, _ in self._old:
            f.close()
        self._old.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
