"""``python -m pytest_bridge_agent``: configuration from env (overridable by flags), signals, run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .guard import IDLE_EXIT_PREFIX
from .server import Agent, AgentConfig

__all__ = ["main", "parse_config"]

log = logging.getLogger("pytest_bridge_agent")


def _ports(value: str) -> list[int]:
    ports = []
    for item in value.split(","):
        if not item.strip():
            continue
        port = int(item)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        ports.append(port)
    return ports


def parse_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    env = os.environ if environ is None else environ
    defaults = AgentConfig()
    parser = argparse.ArgumentParser(prog="pytest_bridge_agent", description="pytest-bridge in-cluster agent")

    def opt(flag: str, var: str, default: object, kind: type = str, help: str = "") -> None:
        parser.add_argument(
            flag, type=kind, default=env.get(var, default), help=f"{help} (env {var}, default {default})"
        )

    opt("--token", "PYTEST_BRIDGE_TOKEN", "", help="the token clients must present")
    opt("--token-sha256", "PYTEST_BRIDGE_TOKEN_SHA256", "", help="or only its SHA-256, hex (what pods carry)")
    opt("--control-port", "PYTEST_BRIDGE_CONTROL_PORT", defaults.control_port, int, "tunnel port")
    opt("--status-port", "PYTEST_BRIDGE_STATUS_PORT", defaults.status_port, int, "HTTP /status, /healthz")
    opt("--listen-ports", "PYTEST_BRIDGE_LISTEN_PORTS", "", help="comma list of service target ports")
    opt("--bind-host", "PYTEST_BRIDGE_BIND_HOST", defaults.bind_host, help="address of the service and status ports")
    opt("--control-host", "PYTEST_BRIDGE_CONTROL_HOST", defaults.control_host, help="address of the control port")
    opt("--window", "PYTEST_BRIDGE_WINDOW", defaults.window, int, "per-stream receive window, bytes")
    opt("--connect-timeout", "PYTEST_BRIDGE_CONNECT_TIMEOUT", defaults.connect_timeout, float, "outbound dial")
    opt("--hold-seconds", "PYTEST_BRIDGE_HOLD_SECONDS", defaults.hold_seconds, float, "wait for a client")
    opt("--keepalive", "PYTEST_BRIDGE_KEEPALIVE", defaults.keepalive_interval, float, "ping interval")
    opt("--keepalive-timeout", "PYTEST_BRIDGE_KEEPALIVE_TIMEOUT", defaults.keepalive_timeout, float, "dead peer")
    opt("--idle-timeout", "PYTEST_BRIDGE_IDLE_TIMEOUT", defaults.stream_idle_timeout, float, "idle stream")
    opt("--drain-seconds", "PYTEST_BRIDGE_DRAIN_SECONDS", defaults.drain_seconds, float, "on SIGTERM")
    opt("--exit-when-idle", "PYTEST_BRIDGE_EXIT_WHEN_IDLE", 0.0, float, "exit 0 after no client this long (0: never)")
    opt("--log-level", "PYTEST_BRIDGE_LOG_LEVEL", "INFO", help="DEBUG, INFO, WARNING")
    args = parser.parse_args(argv)
    if not args.token and not args.token_sha256:
        parser.error("a token is required (PYTEST_BRIDGE_TOKEN_SHA256 or --token-sha256, or --token)")
    logging.getLogger().setLevel(str(args.log_level).upper())
    return AgentConfig(
        token=str(args.token),
        token_sha256=str(args.token_sha256).lower(),
        control_host=str(args.control_host),
        control_port=int(args.control_port),
        status_port=int(args.status_port),
        listen_ports=_ports(str(args.listen_ports)),
        bind_host=str(args.bind_host),
        window=int(args.window),
        connect_timeout=float(args.connect_timeout),
        hold_seconds=float(args.hold_seconds),
        keepalive_interval=float(args.keepalive),
        keepalive_timeout=float(args.keepalive_timeout),
        stream_idle_timeout=float(args.idle_timeout),
        drain_seconds=float(args.drain_seconds),
        exit_when_idle=float(args.exit_when_idle),
    )


async def run(config: AgentConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    agent = Agent(config)
    await agent.start()
    if config.exit_when_idle > 0:
        # A route pod's own guard: once its session has been gone this long, the pod ends
        # (restartPolicy Never) and the routing manager deletes it.
        async def idle_exit() -> None:
            while not stop.is_set():
                await asyncio.sleep(1.0)
                status = agent.status()
                idle = float(str(status["idle_seconds"]))
                if not status["connected_clients"] and idle >= config.exit_when_idle:
                    message = f"{IDLE_EXIT_PREFIX} {idle:.0f}s (session {os.environ.get('PYTEST_BRIDGE_SESSION', '?')})"
                    log.info("%s: exiting", message)
                    _termination_message(message)
                    stop.set()

        watchdog = asyncio.create_task(idle_exit())
    await stop.wait()
    if config.exit_when_idle > 0:
        watchdog.cancel()
    await agent.shutdown()


def _termination_message(message: str) -> None:
    """Leave ``message`` where the kubelet reads a container's termination message.

    It reaches the pod's status through the API server, so the restore guard learns that this
    session's client is gone even when it cannot reach this pod over the network.
    """
    path = os.environ.get("PYTEST_BRIDGE_TERMINATION_LOG", "/dev/termination-log")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(message)
    except OSError as e:
        log.debug("cannot write the termination message to %s: %s", path, e)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s pytest-bridge-agent: %(message)s",
    )
    try:
        config = parse_config(argv)
    except ValueError as e:
        log.error("bad configuration: %s", e)  # noqa: TRY400 - the message says it all
        return 2
    try:
        asyncio.run(run(config))
    except OSError as e:
        log.error("cannot start: %s", e)  # noqa: TRY400
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
