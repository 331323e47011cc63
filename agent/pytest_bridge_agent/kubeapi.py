"""A minimal Kubernetes API client for the in-cluster side: the guard, the routing manager, the routers.

Stdlib only (``http.client``, ``ssl``): the in-cluster code runs from the bundle on stock
Python images with nothing installed. The service account's token is re-read for every
request (projected tokens rotate) and the CA file when it changes. Requests are plain
values (:class:`Request`), so what a caller sends is tested without a server.

Each thread keeps its connection open between requests (HTTP/1.1 keep-alive): the manager
makes about eight calls a pass and a router polls its ConfigMap five times a second, and a
TLS handshake per call cost them and the API server more CPU than the calls themselves
(a fifth of the manager's time in a busy run). A kept connection idle for longer than
:data:`KEEP_IDLE` is not reused, and a request that finds its kept connection closed by the
server is sent once more on a new one.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "SA_DIR",
    "ApiClient",
    "ApiEndpoint",
    "ApiTarget",
    "Request",
    "Response",
    "endpoint_from_env",
    "json_request",
    "quote",
]

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KEEP_IDLE = 15.0  # seconds a kept connection may sit idle and still be used (servers close idle ones)

# A kept connection the server closed before it read the request: nothing was done, send again.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # including the query string
    body: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None  # parsed JSON, or None

    def message(self) -> str:
        if isinstance(self.body, dict) and self.body.get("message"):
            return f"HTTP {self.status}: {self.body['message']}"
        return f"HTTP {self.status}"


def quote(segment: str) -> str:
    """``segment`` quoted for one path segment of a request."""
    return urllib.parse.quote(segment, safe="")


def json_request(method: str, path: str, body: Any, content_type: str = "application/json") -> Request:
    return Request(method, path, json.dumps(body).encode(), content_type)


class ApiTarget(Protocol):
    """Where and how to reach the API server (GuardConfig is one; :class:`ApiEndpoint` another)."""

    @property
    def api_url(self) -> str: ...
    @property
    def token_file(self) -> str: ...
    @property
    def ca_file(self) -> str: ...  # "" = plain http (tests only)
    @property
    def api_timeout(self) -> float: ...


@dataclass(frozen=True)
class ApiEndpoint:
    api_url: str
    token_file: str = f"{SA_DIR}/token"
    ca_file: str = f"{SA_DIR}/ca.crt"
    api_timeout: float = 10.0


def endpoint_from_env(env: Mapping[str, str], prefix: str) -> ApiEndpoint:
    """The API server from ``<prefix>API_URL``/``TOKEN_FILE``/``CA_FILE``, else the in-cluster defaults."""
    ca_file = env.get(f"{prefix}CA_FILE")
    if ca_file is None:
        ca_file = f"{SA_DIR}/ca.crt"
    api_url = env.get(f"{prefix}API_URL", "")
    if not api_url:
        host, api_port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError(f"no API server: neither {prefix}API_URL nor KUBERNETES_SERVICE_HOST is set")
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        api_url = f"{'https' if ca_file else 'http'}://{host}:{api_port}"
    return ApiEndpoint(api_url.rstrip("/"), env.get(f"{prefix}TOKEN_FILE") or f"{SA_DIR}/token", ca_file)


class ApiClient:
    """Minimal Kubernetes API client: bearer token re-read per request (projected tokens rotate)."""

    def __init__(self, config: ApiTarget, *, keep_idle: float = KEEP_IDLE) -> None:
        """``keep_idle``: seconds a kept connection may sit idle and still be used (0: a new one per call)."""
        url = urllib.parse.urlsplit(config.api_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"bad API URL {config.api_url!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._config = config
        self._ssl: tuple[float, ssl.SSLContext] | None = None
        self.keep_idle = keep_idle
        self._kept = threading.local()  # .conn, .context, .used: this thread's open connection
        self._open: set[http.client.HTTPConnection] = set()  # every thread's, for close()
        self._open_lock = threading.Lock()
        self.connections = 0  # connections opened by send() so far (tests, diagnostics)

    def _context(self) -> ssl.SSLContext:
        ca = self._config.ca_file
        mtime = os.stat(ca).st_mtime if ca else 0.0
        if self._ssl is None or self._ssl[0] != mtime:
            self._ssl = (mtime, ssl.create_default_context(cafile=ca or None))
        return self._ssl[1]

    def _token(self) -> str | None:
        try:
            with open(self._config.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "pytest-bridge-guard"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def send(self, request: Request, timeout: float | None = None) -> Response:
        """One request; OSError (including ssl and http.client errors) if there is no HTTP answer."""
        timeout = self._config.api_timeout if timeout is None else timeout
        headers = self._headers()
        if request.content_type:
            headers["Content-Type"] = request.content_type
        conn, reused = self._connection(timeout)
        try:
            try:
                status, data, will_close = self._exchange(conn, request, headers)
            except _STALE:
                self._drop(conn)
                if not reused:
                    raise
                conn, _ = self._connection(timeout)  # the server had closed the kept one: a new one
                status, data, will_close = self._exchange(conn, request, headers)
        except http.client.HTTPException as e:
            self._drop(conn)
            raise OSError(f"bad HTTP answer: {e!r}") from e
        except BaseException:
            self._drop(conn)
            raise
        if will_close:
            self._drop(conn)
        else:
            self._kept.used = time.monotonic()
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        return Response(status, body)

    def _exchange(
        self, conn: http.client.HTTPConnection, request: Request, headers: dict[str, str]
    ) -> tuple[int, bytes, bool]:
        conn.request(request.method, self._prefix + request.path, body=request.body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, response.will_close

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's kept connection (and True) if it is fresh enough, else a new one (and False)."""
        kept = self._kept
        conn: http.client.HTTPConnection | None = getattr(kept, "conn", None)
        context = self._context() if self._https else None
        if conn is not None:
            if kept.context is context and time.monotonic() - kept.used < self.keep_idle and conn.sock is not None:
                conn.timeout = timeout
                conn.sock.settimeout(timeout)
                return conn, True
            self._drop(conn)
        conn = self._connect(timeout)
        kept.conn, kept.context, kept.used = conn, context, time.monotonic()
        with self._open_lock:
            self._open.add(conn)
            self.connections += 1
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._open_lock:
            self._open.discard(conn)
        if getattr(self._kept, "conn", None) is conn:
            self._kept.conn = None

    def close(self) -> None:
        """Close the kept connections of every thread (a thread's next request opens a new one)."""
        with self._open_lock:
            kept, self._open = self._open, set()
        for conn in kept:
            conn.close()

    def watch(self, path: str, timeout: float) -> Iterator[Any]:
        """The events of a ``?watch=1`` request as parsed JSON objects, until the server ends it.

        ``timeout`` bounds each read; OSError when the connection fails.
        """
        conn = self._connect(timeout)
        headers = self._headers()
        try:
            conn.request("GET", self._prefix + path, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raise OSError(f"watch {path}: HTTP {response.status}")
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        except (http.client.HTTPException, ValueError) as e:
            raise OSError(f"watch {path}: {e!r}") from e
        finally:
            conn.close()
