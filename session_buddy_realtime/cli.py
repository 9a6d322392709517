"""The ``session-buddy-realtime`` command: ``serve``, ``edge``, ``watch``, ``mcp`` and ``run``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from session_buddy_realtime._version import __version__
from session_buddy_realtime.data.demo import DEFAULT_DEMO_DB_PATH, DemoWriter, prepare_demo_database
from session_buddy_realtime.errors import ConfigError, RealtimeError
from session_buddy_realtime.host import launcher
from session_buddy_realtime.host.settings import load_settings
from session_buddy_realtime.host.stdio import run_stdio
from session_buddy_realtime.runtime import tune_collector
from session_buddy_realtime.scaleout.link import check_prefix, check_redis_url, redacted_url
from session_buddy_realtime.stream.security import RedactSecrets, redact
from session_buddy_realtime.stream.server import DEFAULT_DB_PATH, RealTimeMetricsServer
from session_buddy_realtime.watch import DEFAULT_URL, watch

__all__ = ["build_parser", "main"]

logger = logging.getLogger("session_buddy_realtime.cli")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="session-buddy-realtime",
        description="Stream live Session-Buddy skill metrics over WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the WebSocket server",
        description="Run the realtime metrics server until Ctrl-C. With --redis it also "
        "publishes the stream for edges (one producer per database holds the lease).",
    )
    _add_listener_options(serve)
    serve.add_argument(
        "--db",
        type=Path,
        default=None,
        help=f"skills database ({DEFAULT_DB_PATH}; with --demo {DEFAULT_DEMO_DB_PATH})",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="create a demo database if missing and keep writing invocations into it",
    )
    serve.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="publish the stream through Redis for edges (SESSION_BUDDY_REALTIME_REDIS_URL)",
    )
    edge = commands.add_parser(
        "edge",
        help="serve a producer's stream from Redis, with no database",
        description="Serve the same stream, dashboard and HTTP endpoints as the producer "
        "publishing through Redis, until Ctrl-C. Run several behind a load balancer.",
    )
    _add_listener_options(edge)
    edge.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="the producer's Redis: redis://[user:password@]host:port/db, rediss:// for TLS "
        "(SESSION_BUDDY_REALTIME_REDIS_URL; required)",
    )

    watch_cmd = commands.add_parser(
        "watch",
        help="print the stream of a running server",
        description="Connect to a server and print what it sends.",
    )
    watch_cmd.add_argument("skill", nargs="?", default=None, help="follow one skill only")
    watch_cmd.add_argument("--url", default=DEFAULT_URL, help=f"server URL ({DEFAULT_URL})")
    watch_cmd.add_argument("--ping", action="store_true", help="measure one ping/pong and exit")
    watch_cmd.add_argument("--json", action="store_true", help="print raw JSON, one per line")
    watch_cmd.add_argument(
        "--count", type=_positive_int, default=None, help="exit after N metrics updates"
    )
    watch_cmd.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file with the server's token (default: SESSION_BUDDY_REALTIME_TOKEN)",
    )
    watch_cmd.add_argument(
        "--cafile", type=Path, default=None, help="CA certificate to trust for wss:// URLs"
    )
    mcp_cmd = commands.add_parser(
        "mcp",
        help="run a stdio MCP server that hosts the plugin",
        description="Serve MCP over stdio as a Session-Buddy host would: open the skills "
        "database, load plugins, auto-start the realtime server.",
    )
    mcp_cmd.add_argument(
        "--db", type=Path, default=DEFAULT_DB_PATH, help=f"skills database ({DEFAULT_DB_PATH})"
    )
    mcp_cmd.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (info)",
    )
    run_cmd = commands.add_parser(
        "run",
        help="run Session-Buddy with the plugins loaded",
        description="Run Session-Buddy's own command with the session_buddy plugins "
        "loaded: 'run -- session-buddy start' (HTTP) or 'run -- python -m "
        "session_buddy.server' (stdio). Other commands run unchanged.",
    )
    run_cmd.add_argument(
        "target", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command"
    )
    return parser


def _add_listener_options(command: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``edge`` share: where to listen, how often, security."""
    command.add_argument(
        "--host", default=None, help="address to listen on (SESSION_BUDDY_REALTIME_HOST, localhost)"
    )
    command.add_argument(
        "--port", type=_port, default=None, help="port, 0 for any free (_PORT, 8765)"
    )
    command.add_argument(
        "--interval", type=_interval, default=None, help="seconds between updates (_INTERVAL, 1.0)"
    )
    command.add_argument(
        "--redis-prefix",
        default=None,
        metavar="NAME",
        help="the stream's name in Redis, one per database (_REDIS_PREFIX, session-buddy-realtime)",
    )
    security = command.add_argument_group(
        "security",
        "Defaults come from SESSION_BUDDY_REALTIME_* variables; the token only from "
        "SESSION_BUDDY_REALTIME_TOKEN or --token-file, never from the command line.",
    )
    security.add_argument(
        "--token-file", type=Path, default=None, help="file whose first line is the shared token"
    )
    security.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain")
    security.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    security.add_argument(
        "--allow-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="browser origin allowed besides the defaults (the server's own pages; on loopback "
        "any page of this machine); repeatable; null for file:// pages, * for any",
    )
    security.add_argument("--max-connections", type=_positive_int, default=None)
    security.add_argument("--max-connections-per-ip", type=_positive_int, default=None)
    security.add_argument(
        "--message-rate", type=float, default=None, help="client messages per second (10)"
    )
    command.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (info)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        target = args.target[1:] if args.target[:1] == ["--"] else args.target
        if not target:
            print("error: run needs a command, e.g. 'run -- session-buddy start'", file=sys.stderr)
            return 2
        return launcher.run(target)
    try:
        if args.command in ("serve", "edge"):
            _configure_logging(args.log_level)
            tune_collector()
            return asyncio.run(_serve(args))
        if args.command == "mcp":
            # stdout carries the protocol: logs go to stderr, nothing is printed.
            _configure_logging(args.log_level)
            return run_stdio(args.db)
        token = _token_from(args.token_file) or os.environ.get("SESSION_BUDDY_REALTIME_TOKEN")
        return asyncio.run(
            watch(
                args.url,
                args.skill,
                ping=args.ping,
                as_json=args.json,
                count=args.count,
                token=token or None,
                cafile=args.cafile,
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# Closing the terminal or the ssh session sends SIGHUP; Ctrl-\ sends SIGQUIT. Each stops
# the server as cleanly as Ctrl-C: close frames to every client, the demo writer stopped.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


async def _serve(args: argparse.Namespace) -> int:
    edge = args.command == "edge"
    demo = not edge and args.demo
    db_path: Path = (not edge and args.db) or (DEFAULT_DEMO_DB_PATH if demo else DEFAULT_DB_PATH)
    writer: DemoWriter | None = None
    try:
        settings = load_settings(os.environ)
        options = settings.server_options()
        overrides = {
            "token": _token_from(args.token_file),
            "ssl_certfile": args.tls_cert,
            "ssl_keyfile": args.tls_key,
            "allowed_origins": args.allow_origin,
            "max_connections": args.max_connections,
            "max_connections_per_ip": args.max_connections_per_ip,
            "message_rate": args.message_rate,
            "redis_url": args.redis,
            "redis_prefix": args.redis_prefix,
        }
        options.update({key: value for key, value in overrides.items() if value is not None})
        if edge and options["redis_url"] is None:
            raise ConfigError("edge needs --redis URL (or SESSION_BUDDY_REALTIME_REDIS_URL)")
        if args.redis is not None:
            check_redis_url(args.redis, "--redis")
        if args.redis_prefix is not None:
            check_prefix(args.redis_prefix, "--redis-prefix")
        server = RealTimeMetricsServer(
            host=args.host or settings.host,
            port=settings.port if args.port is None else args.port,
            db_path=db_path,
            update_interval=args.interval or settings.interval,
            edge=edge,
            **options,
        )
        if demo:
            if await prepare_demo_database(db_path):
                logger.info("created demo database %s", db_path)
            writer = DemoWriter(db_path)
        await server.start()
    except (RealtimeError, ValueError, OSError) as exc:
        message = redact(str(exc))
        if args.redis is not None and message.startswith("redis_url "):
            message = "--redis " + message.removeprefix("redis_url ")  # name the flag used
        print(f"error: {message}", file=sys.stderr)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    writer_task = asyncio.create_task(writer.run()) if writer is not None else None
    origin = f"Redis {redacted_url(options['redis_url'])}" if edge else str(db_path)
    print(f"Streaming skill metrics from {origin} on {', '.join(server.urls)}", flush=True)
    if server.server_role == "producer":
        print(f"Publishing for edges on Redis {redacted_url(options['redis_url'])}", flush=True)
    print(f"Watch it with: session-buddy-realtime watch --url {server.urls[0]}", flush=True)
    page = server.urls[0].replace("ws", "http", 1)  # ws:// -> http://, wss:// -> https://
    print(f"Or open the dashboard: {page}/", flush=True)
    if not edge and not db_path.is_file():  # noqa: ASYNC240 - one stat at start
        print(
            f"Waiting for the skills database {db_path.resolve()}: it does not exist yet; "  # noqa: ASYNC240
            f"the stream says so until the file appears.",
            flush=True,
        )
    print("Press Ctrl-C to stop.", flush=True)
    writer_failed = False
    try:
        if writer_task is not None:
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({stopped, writer_task}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if writer_task.done() and writer_task.exception() is not None:
                writer_failed = True
                logger.error("demo writer stopped: %s", writer_task.exception())
        else:
            await stop.wait()
    finally:
        if writer is not None and writer_task is not None:
            writer.stop()
            with contextlib.suppress(Exception):
                await writer_task
        await server.stop()
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    print("Stopped.", flush=True)
    return 1 if writer_failed else 0


def _token_from(path: Path | None) -> str | None:
    if path is None:
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    # Per-connection chatter of the WebSocket library only at debug level.
    if level != "debug":
        logging.getLogger("session_buddy_realtime.websockets").setLevel(logging.WARNING)


def _port(text: str) -> int:
    value = _positive_int(text, allow_zero=True)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {value}")
    return value


def _positive_int(text: str, *, allow_zero: bool = False) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if allow_zero else 'positive'}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0.05:
        raise argparse.ArgumentTypeError("interval must be at least 0.05 seconds")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
