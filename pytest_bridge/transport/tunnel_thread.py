"""Synchronous facade over :class:`pytest_bridge.transport.tunnel.Tunnel` for the (sync) pytest plugin.

The tunnel's event loop runs in a daemon thread; every method here submits a coroutine to it and
waits for the result. Nothing here may touch the caller's event loop (tests may run their own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from pytest_bridge.core import timing
from pytest_bridge.transport.tunnel import Connector, Tunnel, TunnelError, TunnelStats, TunnelTimeoutError

__all__ = ["BackgroundTunnel"]

T = TypeVar("T")


class BackgroundTunnel:
    """``start()`` connects (raising on failure), ``stop()`` closes and joins the thread."""

    def __init__(
        self,
        connect: Connector,
        token: str,
        reverse_ports: Mapping[int, int] | None = None,
        **options: Any,
    ) -> None:
        self._connect = connect
        self._token = token
        self._reverse_ports = dict(reverse_ports or {})
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tunnel: Tunnel | None = None
        self.cleanups: list[Callable[[], None]] = []  # run by stop(), e.g. a kubectl transport process

    def start(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            raise TunnelError("tunnel already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name="pytest-bridge-tunnel", daemon=True)
        self._thread.start()

        async def start() -> Tunnel:
            tunnel = Tunnel(self._connect, self._token, self._reverse_ports, **self._options)
            await tunnel.start()
            return tunnel

        try:
            self._tunnel = self._call(start(), timeout)
        except BaseException:
            self._stop_loop()
            for cleanup in self.cleanups:
                cleanup()
            raise

    @timing.timed("stop the tunnel")
    def stop(self, timeout: float = 15.0, grace: float = 1.0) -> None:
        if self._loop is None:
            return
        try:
            if self._tunnel is not None:
                self._call(self._tunnel.close(grace), timeout)
        finally:
            self._tunnel = None
            self._stop_loop()
            for cleanup in self.cleanups:
                cleanup()

    def __enter__(self) -> BackgroundTunnel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- requests ----
    def get_env(self, timeout: float = 60.0) -> dict[str, str]:
        return self._call(self._require().get_env(), timeout)

    def fetch_files(self, path: str, timeout: float = 300.0) -> bytes:
        return self._call(self._require().fetch_files(path), timeout)

    def serve_outbound(
        self, bind_host: str, bind_port: int, remote_host: str, remote_port: int, timeout: float = 30.0
    ) -> tuple[str, int]:
        return self._call(self._require().serve_outbound(bind_host, bind_port, remote_host, remote_port), timeout)

    def canary(self, host: str, port: int, timeout: float = 2.0, count: int = 1) -> bool:
        """Whether ``count`` connections to ``host:port``, dialled in-cluster at once, all come back here.

        Proves the Service routes to our agent (kube-proxy has caught up), not just that
        the agent pod is Ready. One connection is not enough: while kube-proxy still lists
        an old pod beside the agent it picks at random per connection, so a lone canary can
        pass while the next real request goes to the old (dead) pod. Every connection is a
        fresh pick; all of them must arrive.
        """
        tunnel = self._require()

        async def probe() -> bool:
            before = tunnel.reverse_total
            streams: list[Any] = []

            async def dial() -> None:
                _, stream = await tunnel.open_stream(host, port)
                streams.append(stream)

            tunnel.probing += 1
            try:
                async with asyncio.timeout(timeout):
                    async with asyncio.TaskGroup() as group:  # one failure cancels the other dials
                        for _ in range(count):
                            group.create_task(dial())
                    while tunnel.reverse_total - before < count:  # noqa: ASYNC110 - polls a counter, no event
                        await asyncio.sleep(0.01)
                return True
            except Exception:
                return False
            finally:
                tunnel.probing -= 1
                for stream in streams:
                    stream.close()

        return self._call(probe(), timeout + 5)

    def ping(self, timeout: float = 60.0) -> float:
        return self._call(self._require().ping(), timeout)

    @property
    def stats(self) -> TunnelStats:
        # Plain int reads of a dataclass: safe enough across threads for reporting.
        return self._require().stats

    @property
    def connected(self) -> bool:
        return self._tunnel is not None and self._tunnel.connected

    @property
    def tunnel(self) -> Tunnel:
        """The asyncio tunnel; only use it from coroutines submitted to :attr:`loop`."""
        return self._require()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise TunnelError("tunnel not started")
        return self._loop

    # ---- internals ----
    def _require(self) -> Tunnel:
        if self._tunnel is None:
            raise TunnelError("tunnel not started")
        return self._tunnel

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        loop = self._loop
        try:
            loop.run_forever()
            # Anything still running (a request abandoned by a timeout) is cancelled, not leaked.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TunnelTimeoutError(
                f"the tunnel did not answer within {timeout:g}s (agent or port-forward not responding)"
            ) from None

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
