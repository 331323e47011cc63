"""``python -m bench.pyforward``: ``kubectl port-forward`` rebuilt on the bridge's own transport.

Listens on 127.0.0.1 and, for every accepted connection, opens one API-server port-forward
websocket with :func:`pytest_bridge.transport.portforward.open_portforward` (what the tunnel rides on)
and copies bytes both ways — no multiplexer, no agent. Comparing it with the bridge shows what
the tunnel's framing and agent hop cost; comparing it with kubectl shows what the Python
websocket/TLS transport costs. A diagnostic for the benchmarks, not part of the plugin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from pytest_bridge.cluster import kube
from pytest_bridge.transport.portforward import ApiEndpoint, open_portforward

CHUNK = 256 * 1024


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(kubeconfig: str | None, namespace: str, pod: str, port: int) -> None:
    k = kube.load(kubeconfig, None, namespace)
    endpoint = ApiEndpoint.from_configuration(k.configuration)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            forward = await open_portforward(endpoint, namespace, pod, port)
        except Exception as exc:
            print(f"port-forward failed: {exc}", file=sys.stderr, flush=True)
            writer.close()
            return
        try:
            tasks = [
                asyncio.create_task(_copy(reader, forward.writer)),
                asyncio.create_task(_copy(forward.reader, writer)),
            ]
            # Whichever side finishes first ends the connection: the port-forward has no half-close.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(tasks, timeout=5)
            for task in tasks:
                task.cancel()
        finally:
            await forward.close()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(f"listening 127.0.0.1 {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.pyforward")
    parser.add_argument("--kubeconfig")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.kubeconfig, args.namespace, args.pod, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
