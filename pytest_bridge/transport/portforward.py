"""Port-forward to a pod through the Kubernetes API server, in asyncio, without kubectl.

One call opens one websocket (``v4.channel.k8s.io``) to
``/api/v1/namespaces/{ns}/pods/{pod}/portforward?ports={port}`` and hands back an asyncio
stream pair. The tunnel multiplexes everything over one or a few of these, so there is no
per-connection handshake on the hot path. The pod's answer on the error channel (e.g.
"connection refused") ends the connection and is raised to whoever reads it.

Learned from the official client's threaded port-forward (no per-call timeout, broken
pipes on long streams): here every step has a timeout, and closing either side closes
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pytest_bridge.core.errors import ConnectError, ForbiddenError, NotFoundError

__all__ = ["ApiEndpoint", "PortForward", "open_portforward"]

log = logging.getLogger(__name__)

_DATA, _ERROR = 0, 1
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ApiEndpoint:
    """How to reach and authenticate to the API server (taken from a client Configuration)."""

    host: str
    ssl_context: ssl.SSLContext | None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_configuration(cls, configuration: Any) -> ApiEndpoint:
        host = str(configuration.host).rstrip("/")
        context: ssl.SSLContext | None = None
        if host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif configuration.assert_hostname is False:
                context.check_hostname = False
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        headers = []
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)
        # The client keeps a kubeconfig token under "BearerToken" (older versions: "authorization");
        # auth_settings() gives the header it would send, whichever the version.
        for setting in configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers.append((str(setting["key"]).title(), str(setting["value"])))
        return cls(host, context, tuple(headers))


@dataclass
class PortForward:
    """An open port-forward: ``reader``/``writer`` are the pod's port; ``close()`` ends it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _websocket: ClientConnection
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    error: str | None = None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        await _close(self._websocket)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _close(websocket: ClientConnection) -> None:
    """Close ``websocket``; its TLS connection is aborted if the closing handshake does not finish.

    A tunnel stopped while a port-forward closes cancels the handshake: without the abort the
    connection stayed open until the garbage collector found it (a ResourceWarning, an error in a
    suite run with ``-W error``).
    """
    try:
        with contextlib.suppress(Exception):
            await websocket.close()
    finally:
        transport = websocket.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


async def open_portforward(
    endpoint: ApiEndpoint, namespace: str, pod: str, port: int, *, open_timeout: float = 10.0
) -> PortForward:
    url = (
        endpoint.host.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        + f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward?ports={port}"
    )
    what = f"port-forward to pod {namespace}/{pod}:{port}"
    try:
        websocket = await connect(
            url,
            subprotocols=["v4.channel.k8s.io"],  # type: ignore[list-item]
            ssl=endpoint.ssl_context,
            additional_headers=list(endpoint.headers),
            compression=None,
            max_size=None,
            ping_interval=None,  # liveness is the tunnel's job (its own pings)
            open_timeout=open_timeout,
            proxy=None,
            write_limit=_CHUNK,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 403:
            raise ForbiddenError(
                f"{what}: forbidden; grant 'get' and 'create' on 'pods/portforward' in namespace {namespace!r} "
                "(the WebSocket upgrade is a GET; newer API servers also check 'create')",
                verb="get", resource="pods/portforward", namespace=namespace,
            ) from exc  # fmt: skip
        if status == 404:
            raise NotFoundError(f"{what}: pod not found") from exc
        raise ConnectError(f"{what}: API server answered {status}") from exc
    except (OSError, TimeoutError) as exc:
        raise ConnectError(f"{what}: cannot reach the API server at {endpoint.host}: {exc}") from exc

    app_side, pump_side = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=app_side, limit=_CHUNK)
    pump_reader, pump_writer = await asyncio.open_connection(sock=pump_side, limit=_CHUNK)
    forward = PortForward(reader, writer, websocket)
    forward._tasks = [
        asyncio.create_task(_from_pod(websocket, pump_writer, forward, what)),
        asyncio.create_task(_to_pod(websocket, pump_reader)),
    ]
    return forward


async def _from_pod(websocket: ClientConnection, out: asyncio.StreamWriter, forward: PortForward, what: str) -> None:
    seen_port_prefix = {_DATA: False, _ERROR: False}
    try:
        async for message in websocket:
            if not isinstance(message, bytes) or not message:
                continue
            channel, payload = message[0], message[1:]
            if not seen_port_prefix.get(channel, True):
                # The first frame on each channel is the 2-byte port number.
                seen_port_prefix[channel] = True
                payload = payload[2:]
                if not payload:
                    continue
            if channel == _DATA:
                out.write(payload)
                await out.drain()
            elif channel == _ERROR and payload:
                forward.error = payload.decode(errors="replace")
                log.warning("%s: %s", what, forward.error)
                break
    except ConnectionClosed:
        pass
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            out.close()
        await _close(websocket)


async def _to_pod(websocket: ClientConnection, source: asyncio.StreamReader) -> None:
    try:
        while chunk := await source.read(_CHUNK):
            await websocket.send(b"\x00" + chunk)
    except (ConnectionClosed, ConnectionError, OSError):
        pass
    finally:
        # The v4 port-forward protocol has no half-close: the local side finishing means done.
        await _close(websocket)
