"""``python3 -I -m pytest_bridge_routing.router``: the process in a router pod; runs nginx.

Every ``ROUTER_POLL_SECONDS`` it reads its ConfigMap (``data["nginx.conf"]``, rendered by
:func:`pytest_bridge_routing.nginxconf.render`, and the annotation ``pytest-bridge.io/generation``).
A changed config is checked with ``nginx -t``, then nginx is started (the first time) or reloaded
(SIGHUP to the master). A reload counts as done once the master runs new workers and every old
worker is gone or shutting down (its listening sockets closed): from then on every new connection
gets the new config, and only then does ``/healthz`` report the new generation. A config that fails
``nginx -t`` or the reload leaves the previous one running and is reported in ``/healthz``.

On ``ROUTER_STATS_PORT`` (threaded ``http.server``):

- ``GET /healthz``: 200 ``{"generation", "ok", "error", ...}`` once nginx runs a config, else 503;
- ``POST /wake``: read the ConfigMap now, not at the next poll (the manager sends it right after it
  changed the ConfigMap: a route is served about one reload after its claim, not up to a poll later);
- ``GET /stats[?since=<epoch seconds>]``: request counts per (effective route, header received or
  not, remote address), read from nginx's access log (a JSON object per line, see
  :data:`pytest_bridge_routing.nginxconf.LOG_FIELDS`) when asked, so they include every request
  that nginx has logged by then. The log is rotated (``access.log.1``, SIGUSR1) past 64 MiB.

In a router pod nginx runs in a second container from the stock nginx image and this process
finds it through the shared process namespace (:class:`SidecarNginx`). Elsewhere (tests, an image
with both programs) nginx runs in the foreground as this process's child and gets SIGTERM if this
process dies (``PR_SET_PDEATHSIG``). SIGTERM/SIGINT stop nginx (QUIT, then TERM) and exit 0.

Configuration (env): ROUTER_CONFIGMAP, ROUTER_NAMESPACE (or POD_NAMESPACE, or the service
account's namespace), ROUTER_STATS_PORT (47180; 0 picks one), ROUTER_STATS_HOST (all
interfaces), ROUTER_POLL_SECONDS (0.2), ROUTER_RUNTIME_DIR (/tmp/pytest-bridge-router; render
with the same ``runtime_dir``), NGINX (``nginx``), ROUTER_STOP_GRACE (2 s of QUIT before TERM), ROUTER_NGINX_MODE (``child``: nginx is this process's
child; ``sidecar``: it runs in the pod's other container, see :class:`SidecarNginx`),
ROUTER_RELOAD_TIMEOUT (10 s); for tests ROUTER_API_URL, ROUTER_TOKEN_FILE, ROUTER_CA_FILE (as
the guard's GUARD_*: service-account defaults, an empty ROUTER_CA_FILE means plain http).

Stdlib only; the Kubernetes API client is the guard's. The parsing and bookkeeping (ConfigMap,
access-log lines, stats, /proc, the reload decision) are pure or file-only and unit-tested;
:class:`Nginx` and :class:`Router` do the process and network I/O.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, BinaryIO

from pytest_bridge_agent import labels
from pytest_bridge_agent.kubeapi import ApiClient, Request, Response, endpoint_from_env

from . import nginxconf

__all__ = [
    "CONFIG_KEY",
    "GENERATION_ANNOTATION",
    "AccessRecord",
    "DesiredConfig",
    "Health",
    "LogTailer",
    "Nginx",
    "NginxError",
    "Router",
    "RouterConfig",
    "SidecarNginx",
    "Stats",
    "api_client",
    "config_from_env",
    "configmap_request",
    "main",
    "nginx_workers",
    "parse_access_line",
    "parse_configmap",
    "plan",
    "reload_done",
    "self_test",
    "serve_stats",
    "workers_running",
]

log = logging.getLogger("pytest_bridge_router")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CONFIG_KEY = "nginx.conf"
GENERATION_ANNOTATION = labels.GENERATION_ANNOTATION
ROTATE_BYTES = 64 * 1024 * 1024  # the access log is renamed to access.log.1 past this size
RESTART_BACKOFF = 5.0
WORKER_TITLE = "nginx: worker process"
SHUTTING_DOWN = "is shutting down"


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    configmap: str
    namespace: str
    api_url: str
    token_file: str
    ca_file: str  # "" = no TLS (plain http, tests only)
    stats_port: int = nginxconf.DEFAULT_STATS_PORT
    stats_host: str = ""  # "" = every interface (IPv6 and IPv4 where possible)
    poll_interval: float = 0.2
    runtime_dir: str = nginxconf.DEFAULT_RUNTIME_DIR
    nginx: str = "nginx"
    stop_grace: float = 2.0
    nginx_mode: str = "child"  # "child": run nginx ourselves; "sidecar": it runs in another container
    reload_timeout: float = 10.0
    api_timeout: float = 5.0


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def config_from_env(env: Mapping[str, str]) -> RouterConfig:
    """The configuration from ``env``; ValueError naming what is missing or malformed."""
    configmap = env.get("ROUTER_CONFIGMAP", "")
    if not configmap:
        raise ValueError("missing environment variable ROUTER_CONFIGMAP")
    namespace = env.get("ROUTER_NAMESPACE") or env.get("POD_NAMESPACE") or _read(f"{SA_DIR}/namespace")
    if not namespace:
        raise ValueError("no namespace: set ROUTER_NAMESPACE or POD_NAMESPACE")
    try:
        port = int(env.get("ROUTER_STATS_PORT") or nginxconf.DEFAULT_STATS_PORT)
        poll = float(env.get("ROUTER_POLL_SECONDS") or 0.2)
        grace = float(env.get("ROUTER_STOP_GRACE") or 2.0)
        reload_timeout = float(env.get("ROUTER_RELOAD_TIMEOUT") or 10.0)
    except ValueError as e:
        raise ValueError(f"a numeric ROUTER_* variable is malformed: {e}") from e
    if not (0 <= port < 65536 and poll > 0 and grace >= 0 and reload_timeout > 0):
        raise ValueError(
            "ROUTER_STATS_PORT must be a port (0 = any), ROUTER_POLL_SECONDS and ROUTER_RELOAD_TIMEOUT > 0, "
            "ROUTER_STOP_GRACE >= 0"
        )
    mode = env.get("ROUTER_NGINX_MODE") or "child"
    if mode not in ("child", "sidecar"):
        raise ValueError(f"ROUTER_NGINX_MODE {mode!r} is neither 'child' nor 'sidecar'")
    runtime_dir = env.get("ROUTER_RUNTIME_DIR") or nginxconf.DEFAULT_RUNTIME_DIR
    if not os.path.isabs(runtime_dir):
        raise ValueError(f"ROUTER_RUNTIME_DIR {runtime_dir!r} is not an absolute path")
    endpoint = endpoint_from_env(env, "ROUTER_")
    return RouterConfig(
        configmap=configmap,
        namespace=namespace,
        api_url=endpoint.api_url,
        token_file=endpoint.token_file,
        ca_file=endpoint.ca_file,
        stats_port=port,
        stats_host=env.get("ROUTER_STATS_HOST", ""),
        poll_interval=poll,
        runtime_dir=runtime_dir.rstrip("/") or "/",
        nginx=env.get("NGINX") or "nginx",
        nginx_mode=mode,
        stop_grace=grace,
        reload_timeout=reload_timeout,
    )


def api_client(config: RouterConfig) -> ApiClient:
    """The guard's API client, pointed where the router's configuration says."""
    return ApiClient(config)


def configmap_request(config: RouterConfig) -> Request:
    q = urllib.parse.quote
    return Request(
        "GET", f"/api/v1/namespaces/{q(config.namespace, safe='')}/configmaps/{q(config.configmap, safe='')}"
    )


# --- the desired config ----------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredConfig:
    text: str
    generation: int
    digest: str  # sha256 of the text


def parse_configmap(obj: Any) -> DesiredConfig:
    """The config in a ConfigMap (API JSON); ValueError if it has none or a malformed generation.

    A missing generation annotation counts as 0: the text, not the number, decides what runs.
    """
    data = obj.get("data") if isinstance(obj, dict) else None
    text = data.get(CONFIG_KEY) if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the ConfigMap has no data key {CONFIG_KEY!r}")
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(GENERATION_ANNOTATION, "0") if isinstance(annotations, dict) else "0"
    try:
        generation = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"annotation {GENERATION_ANNOTATION}={raw!r} is not an integer") from None
    if generation < 0:
        raise ValueError(f"annotation {GENERATION_ANNOTATION}={raw!r} is negative")
    return DesiredConfig(text, generation, hashlib.sha256(text.encode()).hexdigest())


def plan(loaded: DesiredConfig | None, failed_digest: str | None, desired: DesiredConfig) -> str:
    """What to do about ``desired``: "none", "adopt" (same text, new generation), "start" or "reload".

    A config that already failed is not retried until it changes.
    """
    if loaded is not None and desired.digest == loaded.digest:
        return "none" if desired.generation == loaded.generation else "adopt"
    if desired.digest == failed_digest:
        return "none"
    return "start" if loaded is None else "reload"


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


# --- nginx processes -------------------------------------------------------------------------


def _parse_stat(text: str) -> tuple[int, str]:
    """(ppid, state) from /proc/<pid>/stat; the command name may contain spaces and parentheses."""
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), fields[0]


def nginx_workers(master_pid: int, proc: str = "/proc") -> dict[int, str]:
    """pid -> process title of the live worker processes of an nginx master (Linux /proc)."""
    workers = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", encoding="utf-8", errors="replace") as f:
                ppid, state = _parse_stat(f.read())
            if ppid != master_pid or state in ("Z", "X"):
                continue
            with open(f"{proc}/{name}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if title.startswith(WORKER_TITLE):
            workers[int(name)] = title
    return workers


def _title(pid: int, proc: str = "/proc") -> bytes:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _is_orphaned_worker(pid: int, proc: str = "/proc") -> bool:
    """An nginx worker whose parent is no nginx master (not another instance's live worker)."""
    if not _title(pid, proc).startswith(WORKER_TITLE.encode()):
        return False
    try:
        with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as f:
            ppid, _ = _parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return False
    return not _title(ppid, proc).startswith(b"nginx: master process")


def workers_running(workers: Mapping[int, str]) -> bool:
    """Does the master run workers that accept connections?"""
    return any(SHUTTING_DOWN not in title for title in workers.values())


def reload_done(before: Collection[int], workers: Mapping[int, str]) -> bool:
    """After a SIGHUP: new workers run, and every worker of before is gone or shutting down."""
    new = [pid for pid, title in workers.items() if pid not in before and SHUTTING_DOWN not in title]
    old_active = [pid for pid in before if pid in workers and SHUTTING_DOWN not in workers[pid]]
    return bool(new) and not old_active


class NginxError(Exception):
    """nginx refused a config or did not start/reload; the message says why."""


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM when this thread dies (Linux), else None."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _emergencies(lines: Sequence[bytes], levels: Sequence[str] = ("[emerg]", "[alert]", "[crit]")) -> list[str]:
    found = []
    for line in lines:
        text = line.decode("utf-8", errors="replace")
        if any(level in text for level in levels):
            found.append(text.strip())
    return found


class Nginx:
    """One nginx master in the foreground (``daemon off``), as a child of the main thread."""

    def __init__(self, binary: str, runtime_dir: str, *, on_error_lines: Callable[[list[bytes]], None] | None = None):
        self.binary = binary
        self.runtime_dir = runtime_dir
        self.conf = os.path.join(runtime_dir, nginxconf.CONF_FILE)
        self.error_log = os.path.join(runtime_dir, nginxconf.ERROR_LOG)
        self.process: subprocess.Popen[bytes] | None = None
        self._errors = LogTailer(self.error_log, from_end=True)
        self._on_error_lines = on_error_lines
        self._preexec = _pdeathsig_setter()
        # Workers seen last: a master that was killed leaves them running, holding the ports.
        self._workers: set[int] = set()

    @staticmethod
    def _env() -> dict[str, str]:
        # nginx reads $NGINX as a list of inherited listening sockets (binary upgrades); ours names
        # the binary, so it must not reach nginx.
        return {name: value for name, value in os.environ.items() if name != "NGINX"}

    def _argv(self, conf: str, *extra: str) -> list[str]:
        # No -p: every path the config names is absolute, and the modules Debian's packages enable
        # are named relative to nginx's own prefix.
        return [self.binary, *extra, "-e", "stderr", "-g", "daemon off;", "-c", conf]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    def error_lines(self) -> list[bytes]:
        """New lines of the error log (also handed to ``on_error_lines``)."""
        lines = self._errors.poll()
        if lines and self._on_error_lines is not None:
            self._on_error_lines(lines)
        return lines

    def test(self, text: str) -> None:
        """``nginx -t`` of ``text``; NginxError with nginx's message if it fails."""
        candidate = f"{self.conf}.new"
        with open(candidate, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            result = subprocess.run(
                self._argv(candidate, "-t", "-q"),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NginxError(f"cannot run {self.binary} -t: {e}") from e
        if result.returncode != 0:
            message = result.stderr.decode("utf-8", errors="replace").strip()
            raise NginxError(message.replace(candidate, nginxconf.CONF_FILE) or f"nginx -t exit {result.returncode}")

    def install(self, text: str) -> None:
        """Make ``text`` the config that a start or reload reads (after :meth:`test`)."""
        candidate = f"{self.conf}.new"
        with open(candidate, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(candidate, self.conf)

    def start(self, timeout: float) -> None:
        """Start the master on the installed config; return once its workers run (NginxError if not)."""
        if self.running():
            raise NginxError("nginx is already running")
        self._kill_strays()
        self.error_lines()
        # nginx's stderr is its error log: early messages (before the config's error_log is open)
        # land there too, where error_lines() finds them.
        with open(self.error_log, "ab") as stderr:
            self.process = subprocess.Popen(
                self._argv(self.conf), env=self._env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                preexec_fn=self._preexec,  # noqa: PLW1509 - only prctl() runs in the child
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        lines: list[bytes] = []
        while True:
            code = self.process.poll()
            lines += self.error_lines()
            if code is not None:
                why = "; ".join(_emergencies(lines)) or f"exit code {code}"
                raise NginxError(f"nginx did not start: {why}")
            workers = nginx_workers(self.process.pid)
            if workers_running(workers):
                self._workers = set(workers)
                return
            if time.monotonic() > deadline:
                self.stop(grace=0)
                raise NginxError(f"nginx started no worker within {timeout:g}s")
            time.sleep(0.01)

    def reload(self, timeout: float) -> None:
        """SIGHUP; return once the reload is done (:func:`reload_done`), NginxError if it failed."""
        pid = self.pid
        if pid is None:
            raise NginxError("nginx is not running")
        before = set(nginx_workers(pid))
        self.error_lines()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            # Only [emerg] means the new config was refused: workers log traffic errors meanwhile.
            emergencies = _emergencies(self.error_lines(), ("[emerg]",))
            if emergencies:
                raise NginxError(f"nginx kept the previous config: {'; '.join(emergencies)}")
            if self.pid is None:
                raise NginxError(f"nginx exited during the reload (exit code {self.process and self.process.poll()})")
            workers = nginx_workers(pid)
            if reload_done(before, workers):
                self._workers = set(workers)
                return
            if time.monotonic() > deadline:
                raise NginxError(f"the reload was not done within {timeout:g}s")
            time.sleep(0.01)

    def reopen_logs(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGUSR1)

    def stop(self, grace: float) -> None:
        """Graceful stop (QUIT) for ``grace`` seconds, then fast (TERM), then KILL."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self._workers |= set(nginx_workers(process.pid))
        for signum, wait in ((signal.SIGQUIT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if wait <= 0 and signum != signal.SIGKILL:
                continue
            try:
                process.send_signal(signum)
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("nginx did not stop within %gs of %s", wait, signal.Signals(signum).name)
        self._kill_strays()

    def _kill_strays(self) -> None:
        """SIGKILL the orphaned workers of our master, now gone (a killed master leaves them running)."""
        for pid in self._workers:
            if _is_orphaned_worker(pid):
                log.warning("killing nginx worker %d left behind by its master", pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._workers = set()

    def close(self) -> None:
        self._errors.close()


class SidecarNginx:
    """nginx in the pod's other container, found through the shared process namespace.

    The router pod runs the stock nginx image beside this process's Python image (neither has
    the other's program); its container waits for the config file, then runs nginx in the
    foreground (:func:`pytest_bridge_routing.nginxconf.sidecar_command`). Both containers run as
    the same user, so no capability is needed to signal it. The master is found by the pid file
    the config names, checked against its process title in ``/proc``; a reload is SIGHUP and
    counts as done exactly as for :class:`Nginx` (new workers, old ones shutting down). What this
    side cannot do is ``nginx -t`` (the binary is in the other container): the reload tests the
    config itself, nginx keeps the previous one if it is refused, and the ``[emerg]`` line says why.
    """

    process = None  # not our child: the kubelet restarts the nginx container if it exits

    def __init__(
        self, runtime_dir: str, *, on_error_lines: Callable[[list[bytes]], None] | None = None, proc: str = "/proc"
    ) -> None:
        self.runtime_dir = runtime_dir
        self.conf = os.path.join(runtime_dir, nginxconf.CONF_FILE)
        self.error_log = os.path.join(runtime_dir, nginxconf.ERROR_LOG)
        self.pid_file = os.path.join(runtime_dir, nginxconf.PID_FILE)
        self._proc = proc
        self._errors = LogTailer(self.error_log, from_end=True)
        self._on_error_lines = on_error_lines

    @property
    def pid(self) -> int | None:
        try:
            with open(self.pid_file, encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        # A pid file outlives a killed master, and its number may be reused.
        return pid if _title(pid, self._proc).startswith(b"nginx: master process") else None

    def running(self) -> bool:
        return self.pid is not None

    def error_lines(self) -> list[bytes]:
        lines = self._errors.poll()
        if lines and self._on_error_lines is not None:
            self._on_error_lines(lines)
        return lines

    def test(self, text: str) -> None:
        """Nothing to run here (see the class docstring); the reload or start tests the config."""

    def install(self, text: str) -> None:
        candidate = f"{self.conf}.new"
        with open(candidate, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(candidate, self.conf)

    def start(self, timeout: float) -> None:
        """Wait for the nginx container to run the installed config (it starts once the file exists)."""
        deadline = time.monotonic() + timeout
        while True:
            emergencies = _emergencies(self.error_lines())
            if emergencies:
                raise NginxError(f"nginx did not start: {'; '.join(emergencies)}")
            pid = self.pid
            if pid is not None and workers_running(nginx_workers(pid, self._proc)):
                return
            if time.monotonic() > deadline:
                raise NginxError(
                    f"nginx did not start within {timeout:g}s (no master in {self.pid_file}); "
                    "see the logs of the router pod's nginx container"
                )
            time.sleep(0.02)

    def reload(self, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            raise NginxError("nginx is not running")
        before = set(nginx_workers(pid, self._proc))
        self.error_lines()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            emergencies = _emergencies(self.error_lines(), ("[emerg]",))
            if emergencies:
                raise NginxError(f"nginx kept the previous config: {'; '.join(emergencies)}")
            if self.pid != pid:
                raise NginxError("nginx exited during the reload")
            if reload_done(before, nginx_workers(pid, self._proc)):
                return
            if time.monotonic() > deadline:
                raise NginxError(f"the reload was not done within {timeout:g}s")
            time.sleep(0.01)

    def reopen_logs(self) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)

    def stop(self, grace: float) -> None:
        """Graceful stop (QUIT); the pod is ending anyway, so its nginx container is not restarted."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + grace
        while self.pid == pid and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._errors.close()


# --- health ----------------------------------------------------------------------------------


@dataclass
class Health:
    """What ``/healthz`` answers."""

    loaded: DesiredConfig | None = None  # the config nginx runs
    desired_generation: int | None = None  # the generation last read from the ConfigMap
    error: str | None = None  # why the desired config does not run (nginx -t, reload, nginx exit)
    api_error: str | None = None  # why the ConfigMap could not be read (the loaded config keeps running)
    nginx_pid: int | None = None
    reloads: int = 0

    def answer(self) -> tuple[int, dict[str, Any]]:
        running = self.loaded is not None and self.nginx_pid is not None
        body = {
            "generation": self.loaded.generation if self.loaded else None,
            "ok": running and self.error is None,
            "error": self.error,
            "desired_generation": self.desired_generation,
            "api_error": self.api_error,
            "nginx_pid": self.nginx_pid,
            "config_sha256": self.loaded.digest if self.loaded else None,
            "reloads": self.reloads,
        }
        return (200 if running else 503), body


# --- the router ------------------------------------------------------------------------------


Send = Callable[[Request], Response]


class Router:
    """The loop: read the ConfigMap, apply it, watch nginx, read the logs. Call from the main thread."""

    def __init__(self, config: RouterConfig, send: Send, nginx: Nginx | SidecarNginx | None = None) -> None:
        self.config = config
        self.send = send
        self.lock = threading.Lock()  # health and stats, shared with the HTTP threads
        self.health = Health()
        self.stats = Stats()
        if nginx is None:
            nginx = (
                SidecarNginx(config.runtime_dir, on_error_lines=self._forward_errors)
                if config.nginx_mode == "sidecar"
                else Nginx(config.nginx, config.runtime_dir, on_error_lines=self._forward_errors)
            )
        self.nginx: Nginx | SidecarNginx = nginx
        self.access_log = os.path.join(config.runtime_dir, nginxconf.ACCESS_LOG)
        self.tailer = LogTailer(self.access_log)
        self._failed_digest: str | None = None  # the config that failed: not tried again until it changes...
        self._failed_retry = False  # ...unless it passed nginx -t (a busy port may free up)
        self._retry_at = 0.0
        self._warned_runtime_dir = False
        # Set by ``POST /wake`` (the manager, right after it changed our ConfigMap): the loop reads
        # the ConfigMap at once instead of at the next poll. A wake carries no config, so anyone
        # who can reach the port can only make us read what the API server holds.
        self.wake = threading.Event()

    @staticmethod
    def _forward_errors(lines: list[bytes]) -> None:
        for line in lines:
            log.info("nginx: %s", line.decode("utf-8", errors="replace").rstrip())

    # ---- the ConfigMap ----
    def fetch(self) -> DesiredConfig | None:
        what = f"ConfigMap {self.config.namespace}/{self.config.configmap}"
        try:
            response = self.send(configmap_request(self.config))
        except OSError as e:
            self._api_error(f"cannot read {what}: {e}")
            return None
        if response.status != 200:
            self._api_error(f"cannot read {what}: {response.message()}")
            return None
        try:
            desired = parse_configmap(response.body)
        except ValueError as e:
            self._api_error(f"{what}: {e}")
            return None
        with self.lock:
            if self.health.api_error is not None:
                log.info("%s readable again", what)
            self.health.api_error = None
            self.health.desired_generation = desired.generation
        return desired

    def _api_error(self, message: str) -> None:
        with self.lock:
            if self.health.api_error != message:
                log.warning("%s", message)
            self.health.api_error = message

    # ---- applying a config ----
    def apply(self, desired: DesiredConfig) -> None:
        with self.lock:
            loaded = self.health.loaded
        action = plan(loaded, self._failed_digest, desired)
        if action == "none":
            return
        if action == "adopt":
            with self.lock:
                self.health.loaded = desired
            log.info("generation %d: same config as generation %d", desired.generation, loaded and loaded.generation)
            return
        if not self._warned_runtime_dir and f"{self.config.runtime_dir}/{nginxconf.ACCESS_LOG}" not in desired.text:
            log.warning("the config does not log to %s: /stats will stay empty", self.access_log)
            self._warned_runtime_dir = True
        try:
            self.nginx.test(desired.text)
        except (NginxError, OSError) as e:
            self._failed(desired, f"nginx -t: {e}", retry=False)
            return
        if action == "reload" and not self.nginx.running():
            action = "start"  # it died: supervise() had not restarted it yet
        try:
            self.nginx.install(desired.text)
            if action == "reload":
                self.nginx.reload(self.config.reload_timeout)
            else:
                self.nginx.start(self.config.reload_timeout)
        except (NginxError, OSError) as e:
            self._failed(desired, str(e), retry=True)
            if loaded is not None:
                self._reinstall(loaded)
            return
        self._failed_digest = None
        with self.lock:
            self.health.loaded = desired
            self.health.error = None
            self.health.nginx_pid = self.nginx.pid
            self.health.reloads += action == "reload"
        log.info("generation %d live (%s, nginx pid %s)", desired.generation, action, self.nginx.pid)

    def _failed(self, desired: DesiredConfig, why: str, *, retry: bool) -> None:
        self._failed_digest = desired.digest
        self._failed_retry = retry
        self._retry_at = time.monotonic() + RESTART_BACKOFF
        message = f"generation {desired.generation} not applied: {why}"
        log.error("%s", message)
        with self.lock:
            self.health.error = message
            self.health.nginx_pid = self.nginx.pid

    def _reinstall(self, loaded: DesiredConfig) -> None:
        try:  # the file nginx reads on a restart or the next reload
            self.nginx.install(loaded.text)
        except OSError as e:
            log.error("cannot restore %s: %s", self.nginx.conf, e)  # noqa: TRY400 - no traceback needed

    # ---- supervision ----
    def supervise(self) -> None:
        """Restart an nginx that died; let the next round retry a start or reload that failed."""
        if time.monotonic() < self._retry_at:
            return
        if self._failed_digest is not None and self._failed_retry:
            self._failed_digest = None
        with self.lock:
            loaded = self.health.loaded
            reported = self.health.nginx_pid
        pid = self.nginx.pid
        if pid is not None and loaded is not None and pid != reported:
            # A sidecar nginx restarted by the kubelet runs the installed config (the loaded one).
            log.info("nginx now runs as pid %d (generation %d)", pid, loaded.generation)
            with self.lock:
                self.health.nginx_pid = pid
        if pid is not None or loaded is None:
            return
        code = self.nginx.process.poll() if self.nginx.process else None
        log.error("nginx exited (code %s); restarting generation %d", code, loaded.generation)
        try:
            self.nginx.install(loaded.text)
            self.nginx.start(self.config.reload_timeout)
        except (NginxError, OSError) as e:
            self._retry_at = time.monotonic() + RESTART_BACKOFF
            with self.lock:
                self.health.nginx_pid = None
                self.health.error = f"nginx exited (code {code}) and did not restart: {e}"
            return
        with self.lock:
            self.health.nginx_pid = self.nginx.pid
            if self._failed_digest is None:  # else the desired config's error still stands
                self.health.error = None

    # ---- logs ----
    def ingest(self) -> None:
        """Count the new access-log lines (thread-safe; /stats calls it too)."""
        with self.lock:
            for line in self.tailer.poll():
                self.stats.add_line(line)

    def rotate_if_large(self) -> None:
        try:
            size = os.stat(self.access_log).st_size
        except OSError:
            return
        if size > ROTATE_BYTES and self.nginx.running():
            self.ingest()
            os.replace(self.access_log, self.access_log + ".1")
            self.nginx.reopen_logs()

    # ---- HTTP answers ----
    def healthz(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            return self.health.answer()

    def stats_answer(self, since: float | None) -> dict[str, Any]:
        self.ingest()
        with self.lock:
            body = self.stats.snapshot(since)
            body["generation"] = self.health.loaded.generation if self.health.loaded else None
        body["now"] = time.time()
        return body

    # ---- the loop ----
    def round(self) -> None:
        desired = self.fetch()
        if desired is not None:
            self.apply(desired)
        self.supervise()
        self.nginx.error_lines()
        self.ingest()
        self.rotate_if_large()
        if os.getpid() == 1:
            _reap_orphans(self.nginx.pid)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.round()
            except Exception:
                log.exception("unexpected error in the router loop")
            self.wake.wait(self.config.poll_interval)
            self.wake.clear()

    def request_wake(self) -> None:
        """Read the ConfigMap now (``POST /wake``); ``run`` ends its wait at once."""
        self.wake.set()

    def shutdown(self) -> None:
        log.info("stopping nginx (pid %s)", self.nginx.pid)
        self.nginx.stop(self.config.stop_grace)
        self.nginx.error_lines()
        self.ingest()
        self.nginx.close()
        self.tailer.close()
        with self.lock:
            self.health.nginx_pid = None


def _reap_orphans(keep: int | None) -> None:
    """As PID 1 (the pod's init), reap the zombies re-parented to us, but not the nginx master."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == keep:
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                ppid, state = _parse_stat(f.read())
            if ppid == 1 and state == "Z":
                os.waitpid(int(name), os.WNOHANG)
        except (OSError, ValueError, IndexError):
            continue


# --- the stats server ------------------------------------------------------------------------


def _handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "pytest-bridge-router"

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body, sort_keys=True).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/healthz":
                self._json(*router.healthz())
            elif url.path == "/stats":
                raw = urllib.parse.parse_qs(url.query).get("since", [""])[-1]
                try:
                    since = float(raw) if raw else None
                except ValueError:
                    self._json(400, {"error": f"since={raw!r} is not a number (epoch seconds)"})
                    return
                self._json(200, router.stats_answer(since))
            else:
                self._json(404, {"error": "not found; try /healthz or /stats"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 4096))
            if urllib.parse.urlsplit(self.path).path == "/wake":
                router.request_wake()
                self._json(200, {"woken": True})
            else:
                self._json(404, {"error": "not found; POST /wake"})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def serve_stats(router: Router, host: str, port: int) -> ThreadingHTTPServer:
    """The /healthz and /stats server, bound (not yet serving). ``host`` "" = every interface."""
    handler = _handler(router)
    if not host:
        try:
            return _DualStackServer(("::", port), handler)
        except OSError:  # no IPv6 here
            host = "0.0.0.0"
    if ":" in host:
        server: ThreadingHTTPServer = _DualStackServer((host, port), handler)
    else:
        server = _Server((host, port), handler)
    return server


# --- main ------------------------------------------------------------------------------------


def self_test(binary: str, modules_dir: str | None = None) -> int:
    """``nginx -t`` of a config with every kind of port: nginx and its stream module are usable."""
    spec = nginxconf.RouterSpec(
        service="self-test",
        namespace="default",
        ports=(
            nginxconf.RouterPort("http", 18080, "http", "10.0.0.1:80"),
            nginxconf.RouterPort("grpc", 18081, "grpc", "10.0.0.1:81"),
            nginxconf.RouterPort("db", 18082, "tcp", "10.0.0.1:82"),
        ),
        routes={"self-test": "10.0.0.2"},
        hosts=("example.com",),
    )
    with tempfile.TemporaryDirectory(prefix="pytest-bridge-router-") as run:
        nginx = Nginx(binary, run)
        try:
            nginx.test(nginxconf.render(spec, runtime_dir=run, modules_dir=modules_dir))
        except NginxError as e:
            print(f"nginx self-test failed: {e}", file=sys.stderr)
            return 1
        finally:
            nginx.close()
    print("nginx self-test passed", file=sys.stderr)
    return 0


def _prepare_runtime_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, 0o755)  # nginx workers (nobody, when run as root) must reach their temp dirs


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -I -m pytest_bridge_routing.router",
        description="Run nginx with the config in a ConfigMap; serve /healthz and /stats. "
        "Configured by environment variables: ROUTER_CONFIGMAP, ROUTER_NAMESPACE (or POD_NAMESPACE), "
        "ROUTER_STATS_PORT, ROUTER_STATS_HOST, ROUTER_POLL_SECONDS, ROUTER_RUNTIME_DIR, NGINX, "
        "ROUTER_STOP_GRACE, ROUTER_RELOAD_TIMEOUT, ROUTER_API_URL, ROUTER_TOKEN_FILE, ROUTER_CA_FILE.",
    )
    parser.add_argument("--self-test", action="store_true", help="check that nginx accepts a rendered config; exit")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s pytest-bridge-router: %(message)s"
    )
    if args.self_test:
        return self_test(env.get("NGINX") or "nginx")
    try:
        config = config_from_env(env)
        client = api_client(config)
    except ValueError as e:
        log.error("bad configuration: %s", e)  # noqa: TRY400 - the message says it all
        return 2
    _prepare_runtime_dir(config.runtime_dir)
    router = Router(config, client.send)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()
        router.request_wake()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        server = serve_stats(router, config.stats_host, config.stats_port)
    except OSError as e:
        log.error("cannot serve stats on port %d: %s", config.stats_port, e)  # noqa: TRY400
        return 1
    thread = threading.Thread(target=server.serve_forever, name="stats", daemon=True)
    thread.start()
    host, port = str(server.server_address[0]), int(server.server_address[1])
    host = f"[{host}]" if ":" in host else host
    log.info(
        "ready stats=%s:%d configmap=%s/%s runtime=%s",
        host,
        port,
        config.namespace,
        config.configmap,
        config.runtime_dir,
    )
    try:
        router.run(stop)
    finally:
        router.shutdown()
        server.shutdown()
        server.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
