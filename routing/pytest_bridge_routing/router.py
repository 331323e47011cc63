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
  changed the ConfigMap: a route is served about one reload after its claim, not up to a poll later;
  once wakes arrive the ConfigMap is read on a wake and every ``ROUTER_FETCH_SECONDS`` only);
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
interfaces), ROUTER_POLL_SECONDS (0.2: nginx and its logs are looked at this often, and the
ConfigMap read until the first ``POST /wake``), ROUTER_FETCH_SECONDS (2: after a wake, the
ConfigMap is read on each wake and at least this often), ROUTER_RUNTIME_DIR (/tmp/pytest-bridge-router; render
with the same ``runtime_dir``), NGINX (``nginx``), ROUTER_STOP_GRACE (2 s of QUIT before TERM), ROUTER_NGINX_MODE (``child``: nginx is this process's
child; ``sidecar``: it runs in the pod's other container, see :class:`SidecarNginx`),
ROUTER_RELOAD_TIMEOUT (10 s); for tests ROUTER_API_URL, ROUTER_TOKEN_FILE, ROUTER_CA_FILE (as
the guard's GUARD_*: service-account defaults, an empty ROUTER_CA_FILE means plain http).

Stdlib only; the Kubernetes API client is ``pytest_bridge_agent.kubeapi``. The access log and its
stats are in :mod:`pytest_bridge_routing.accesslog`, nginx's processes and the reload decision in
:mod:`pytest_bridge_routing.nginxproc`; this module holds the ConfigMap, the health, the
:class:`Router` loop, the stats server and ``main``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from pytest_bridge_agent import labels
from pytest_bridge_agent.kubeapi import SA_DIR, ApiClient, Request, Response, endpoint_from_env

from . import nginxconf
from .accesslog import LogTailer, Stats
from .nginxproc import (
    Nginx,
    NginxError,
    SidecarNginx,
    reap_orphans,
)

__all__ = [
    "CONFIG_KEY",
    "GENERATION_ANNOTATION",
    "DesiredConfig",
    "Health",
    "Router",
    "RouterConfig",
    "api_client",
    "config_from_env",
    "configmap_request",
    "main",
    "parse_configmap",
    "plan",
    "self_test",
    "serve_stats",
]

log = logging.getLogger("pytest_bridge_router")

CONFIG_KEY = "nginx.conf"
GENERATION_ANNOTATION = labels.GENERATION_ANNOTATION
ROTATE_BYTES = 64 * 1024 * 1024  # the access log is renamed to access.log.1 past this size
RESTART_BACKOFF = 5.0


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
    fetch_interval: float = 2.0  # once wakes arrive: the ConfigMap is read on a wake and at least this often
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
        fetch = float(env.get("ROUTER_FETCH_SECONDS") or 2.0)
        grace = float(env.get("ROUTER_STOP_GRACE") or 2.0)
        reload_timeout = float(env.get("ROUTER_RELOAD_TIMEOUT") or 10.0)
    except ValueError as e:
        raise ValueError(f"a numeric ROUTER_* variable is malformed: {e}") from e
    if not (0 <= port < 65536 and poll > 0 and fetch > 0 and grace >= 0 and reload_timeout > 0):
        raise ValueError(
            "ROUTER_STATS_PORT must be a port (0 = any), ROUTER_POLL_SECONDS, ROUTER_FETCH_SECONDS and "
            "ROUTER_RELOAD_TIMEOUT > 0, ROUTER_STOP_GRACE >= 0"
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
        fetch_interval=fetch,
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
        # Once a wake has come, the manager's wakes reach us: the ConfigMap is then read on a wake
        # and every ``fetch_interval``, not every poll (5 GETs a second per router otherwise). Until
        # then (a NetworkPolicy may keep the manager out) every poll reads it, as before.
        self.wakes_arrive = False
        self._fetched_at = float("-inf")

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
    def round(self, fetch: bool = True) -> None:
        desired = None
        if fetch:
            desired = self.fetch()
            self._fetched_at = time.monotonic()
        if desired is not None:
            self.apply(desired)
        self.supervise()
        self.nginx.error_lines()
        self.ingest()
        self.rotate_if_large()
        if os.getpid() == 1:
            reap_orphans(self.nginx.pid)

    def run(self, stop: threading.Event) -> None:
        woken = True  # the first round reads the ConfigMap
        while not stop.is_set():
            try:
                self.round(fetch=self.fetch_due(woken, time.monotonic()))
            except Exception:
                log.exception("unexpected error in the router loop")
            woken = self.wake.wait(self.config.poll_interval)
            self.wake.clear()

    def fetch_due(self, woken: bool, now: float) -> bool:
        """Whether a round reads the ConfigMap: on a wake; every round until wakes arrive; else every fetch_interval."""
        return woken or not self.wakes_arrive or now - self._fetched_at >= self.config.fetch_interval

    def request_wake(self) -> None:
        """Read the ConfigMap now (``POST /wake``); ``run`` ends its wait at once."""
        self.wakes_arrive = True
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
