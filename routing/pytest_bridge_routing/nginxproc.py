"""nginx as the router runs it: its processes under ``/proc``, and the two ways to drive it.

:class:`Nginx` runs nginx as this process's child (tests, an image with both programs);
:class:`SidecarNginx` drives the nginx of the pod's other container through the shared process
namespace. The reload decision (:func:`reload_done`) reads the workers' titles from ``/proc``
and is unit-tested on a fake ``/proc``. Stdlib only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from . import nginxconf
from .accesslog import LogTailer

__all__ = [
    "SHUTTING_DOWN",
    "WORKER_TITLE",
    "Nginx",
    "NginxError",
    "SidecarNginx",
    "nginx_workers",
    "reap_orphans",
    "reload_done",
    "workers_running",
]

log = logging.getLogger("pytest_bridge_router")

WORKER_TITLE = "nginx: worker process"
SHUTTING_DOWN = "is shutting down"


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


def reap_orphans(keep: int | None) -> None:
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
