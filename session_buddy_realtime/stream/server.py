"""``RealTimeMetricsServer``: the public API and lifecycle; it composes the source
(``data/``), the hub, a session per connection, keepalive and the HTTP side (router,
gate), and owns nothing else. The seed's methods are thin delegates to those parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from session_buddy_realtime.data.database import DEFAULT_DB_PATH, DatabaseSource, HostConnection
from session_buddy_realtime.data.detection import DetectionSettings
from session_buddy_realtime.data.source import Source
from session_buddy_realtime.errors import RealtimeError
from session_buddy_realtime.protocol import format_timestamp, validate_skill_name
from session_buddy_realtime.scaleout.link import DEFAULT_PREFIX, RedisTimings
from session_buddy_realtime.scaleout.roles import ScaleOut
from session_buddy_realtime.stream.arguments import check_arguments
from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.gate import (
    ConnectionRegistry,
    HandshakeGate,
    default_max_connections,
)
from session_buddy_realtime.stream.hub import Hub
from session_buddy_realtime.stream.keepalive import Keepalive
from session_buddy_realtime.stream.listener import Listener
from session_buddy_realtime.stream.receiving import Waiting
from session_buddy_realtime.stream.router import HttpRouter, listen, listener_urls
from session_buddy_realtime.stream.routes import install_routes
from session_buddy_realtime.stream.security import (
    build_ssl_context,
    is_loopback,
    own_origins,
    warn_if_exposed,
)
from session_buddy_realtime.stream.session import ClientSession, SessionPolicy
from session_buddy_realtime.stream.stats import StreamStats

__all__ = ["DEFAULT_DB_PATH", "RealTimeMetricsServer"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Running:
    """What a started server holds; dropped as a whole by ``stop()``."""

    listener: Listener
    registry: ConnectionRegistry
    started_at: float
    started_monotonic: float


class RealTimeMetricsServer:
    """Stream live skill metrics from Session-Buddy's skills database over WebSocket.

    Args:
        host: Address to listen on. ``localhost`` listens on both IPv4 and IPv6 loopback.
        port: Port to listen on; 0 picks a free one (see ``port`` after ``start()``).
        db_path: Skills database, default ``.session-buddy/skills.db``. The server opens
            it read-only and never creates it; while it does not exist the stream says
            ``waiting`` and picks it up when it appears. Ignored when ``db`` is given.
        update_interval: Seconds between broadcasts.
        db: The host's open ``aiosqlite.Connection`` or ``sqlite3.Connection`` (opened with
            ``check_same_thread=False``; read on a daemon thread) to read instead of opening
            one: never written, never closed, its ``row_factory`` untouched.
        max_message_size: Largest client message in bytes; larger closes with 1009.
        max_buffered_bytes: A client whose unsent data exceeds this skips updates.
        slow_client_timeout: Seconds a client may keep skipping before it is closed (1008).
        ping_interval: Seconds between keepalive pings.
        ping_timeout: Seconds to wait for a pong before closing the connection.
        open_timeout: Seconds allowed for the opening handshake.
        close_timeout: Seconds to wait for a closing handshake before dropping the socket.
        detection: Windows and thresholds of live anomaly detection.
        source: Where the state comes from instead of the skills database (an edge's
            feed, a test's fake); ``db_path``, ``db`` and ``detection`` are then unused.
        token: Shared secret clients must present (header, query parameter or first
            ``auth`` message); None for no authentication.
        auth_timeout: Seconds a client has to authenticate before it is closed (4001).
        ssl_certfile: PEM certificate (chain) to serve ``wss://``; None for plain ``ws://``.
        ssl_keyfile: PEM private key, if not in ``ssl_certfile``.
        allowed_origins: Browser origins allowed besides the defaults (the server's own
            pages, and on loopback any loopback page); ``*`` for any, ``null`` for pages
            opened from files. Clients that send no Origin (not browsers) are always allowed.
        check_host_header: On a loopback address, refuse requests whose Host header names
            another host (DNS rebinding).
        max_connections: Open connections at most; None for 10,000 or what the open-file
            limit allows.
        max_connections_per_ip: Open connections from one address at most.
        message_rate: Client messages per second allowed on average.
        message_burst: Client messages allowed in a burst.
        redis_url: Share the stream through Redis (``redis://``, ``rediss://`` for TLS,
            ``unix://``; a password or ACL user in the URL). With a database this server
            is a producer: it publishes its state while it holds the stream's lease.
        edge: Serve the stream of the producer behind ``redis_url`` instead of reading a
            database (``db_path``, ``db``, ``detection`` and ``source`` unused).
        redis_prefix: The stream's name in Redis: producers and edges of one database
            share it; another database needs another prefix.
        redis_timings: Lease, watch, staleness and reconnection timings.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8765,
        db_path: Path | str | None = None,
        update_interval: float = 1.0,
        *,
        db: HostConnection | None = None,
        # Limits
        max_message_size: int = 4096,
        max_buffered_bytes: int = 64 * 1024,
        slow_client_timeout: float = 10.0,
        # Timeouts
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float = 5.0,
        close_timeout: float = 1.0,
        # Data
        detection: DetectionSettings | None = None,
        source: Source | None = None,
        # Security
        token: str | None = None,
        auth_timeout: float = 5.0,
        ssl_certfile: Path | str | None = None,
        ssl_keyfile: Path | str | None = None,
        allowed_origins: Iterable[str] = (),
        check_host_header: bool = True,
        max_connections: int | None = None,
        max_connections_per_ip: int = 1000,
        message_rate: float = 10.0,
        message_burst: int = 20,
        # Scale-out
        redis_url: str | None = None,
        edge: bool = False,
        redis_prefix: str = DEFAULT_PREFIX,
        redis_timings: RedisTimings | None = None,
    ) -> None:
        check_arguments(locals())
        self._scale = ScaleOut(redis_url, edge, redis_prefix, redis_timings, update_interval)
        self.server_role = self._scale.role
        self.host = host
        self.port = port
        self.db_path = Path(db_path) if db_path is not None else DEFAULT_DB_PATH
        self.update_interval = float(update_interval)
        self._max_message_size = max_message_size
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._token = token
        self._ssl_certfile = None if ssl_certfile is None else Path(ssl_certfile)
        self._ssl_keyfile = None if ssl_keyfile is None else Path(ssl_keyfile)
        self._allowed_origins = {origin.rstrip("/").lower() for origin in allowed_origins}
        self._check_host_header = check_host_header
        self._max_connections = max_connections or default_max_connections()
        self._max_connections_per_ip = max_connections_per_ip
        self._policy = SessionPolicy(
            token=token,
            auth_timeout=auth_timeout,
            message_rate=message_rate,
            message_burst=message_burst,
            update_interval=self.update_interval,
            server_role=self.server_role,
        )
        self._stats = StreamStats()
        self._source: Source = (
            self._scale.feed or source or DatabaseSource(self.db_path, db=db, detection=detection)
        )
        # How long a tick waits for a new read before sending the last good data.
        read_timeout = 0.8 * self.update_interval
        self._hub: Hub[ClientSession] = Hub(
            self._source,
            self._stats,
            interval=self.update_interval,
            read_timeout=read_timeout,
            max_buffered_bytes=max_buffered_bytes,
            slow_client_timeout=slow_client_timeout,
            close_timeout=close_timeout,
            paced_by=None if self._scale.feed is None else self._scale.feed.arrivals,
        )
        self._scale.publish(self._source, read_timeout, self._hub)
        self._keepalive = (
            None
            if ping_interval is None
            else Keepalive(self._hub, interval=ping_interval, timeout=ping_timeout)
        )
        self._running: _Running | None = None
        self._lifecycle = asyncio.Lock()

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running is not None

    @property
    def urls(self) -> list[str]:
        """The ``ws://`` addresses the server listens on (empty when stopped)."""
        if self._running is None:
            return []
        return listener_urls(self._running.listener, tls=self._ssl_certfile is not None)

    async def start(self) -> None:
        """Open the database, listen, and start the broadcaster. Harmless when running.

        Raises:
            PortInUseError: the address is taken.
            ServerStartError: anything else that prevents listening; nothing is left open.
        """
        async with self._lifecycle:
            if self._running is not None:
                return
            ssl_context = None
            if self._ssl_certfile is not None:
                ssl_context = build_ssl_context(self._ssl_certfile, self._ssl_keyfile)
            await self._source.open()
            try:
                await self._scale.open()
            except BaseException:
                await self._source.close()
                raise
            self._stats.reset()
            registry = ConnectionRegistry.for_limits(
                self._max_connections,
                self._max_connections_per_ip,
                max_buffered_bytes=self._hub.max_buffered_bytes,
                dropped=self._stats.refused,
            )
            gate = HandshakeGate(
                registry=registry,
                max_connections=self._max_connections,
                max_connections_per_ip=self._max_connections_per_ip,
                token=self._token,
                allowed_origins=set(self._allowed_origins),
                check_host_header=self._check_host_header and is_loopback(self.host),
                bound_host=self.host,
                refused=self._stats.refused,
                throttle=self._policy.throttle,
            )
            router = HttpRouter(gate)
            install_routes(
                router, self._hub, self._policy, status=self.status, snapshot=self.snapshot
            )
            try:
                listener = await listen(
                    self._open_session,
                    self.host,
                    self.port,
                    router=router,
                    ssl_context=ssl_context,
                    max_message_size=self._max_message_size,
                    open_timeout=self._open_timeout,
                    close_timeout=self._close_timeout,
                    dead_peer=None if self._keepalive is None else self._keepalive.dead_peer,
                )
            except BaseException:
                await self._source.close()
                raise
            self._running = _Running(
                listener=listener,
                registry=registry,
                started_at=time.time(),
                started_monotonic=time.monotonic(),
            )
            if self.port == 0 and listener.sockets:
                self.port = listener.sockets[0].getsockname()[1]
            for sock in listener.sockets:
                gate.allowed_origins |= own_origins(sock.getsockname()[1])
            self._hub.start()
            self._scale.start()
            if self._keepalive is not None:
                self._keepalive.start()
            logger.info("listening on %s", ", ".join(self.urls))
            warn_if_exposed(self.host, token=self._token is not None, tls=ssl_context is not None)

    async def stop(self) -> None:
        """Close every client (1001), stop the broadcaster, release the port and DB.

        Prompt and bounded by ``close_timeout``; harmless when not running. Closes the
        database connection only if the server opened it.
        """
        async with self._lifecycle:
            running, self._running = self._running, None
            if running is None:
                return
            await self._scale.close()  # first: the lease goes to another producer at once
            if self._keepalive is not None:
                await self._keepalive.stop()
            await self._hub.close_all(running.listener, running.registry)
            await self._source.close()
            logger.info("stopped")

    # The seed's methods: thin delegates to the session and the hub.

    def register_client(self, websocket: Connection) -> ClientSession:
        """Add a client, subscribed to all skills (the seed's default); return its session."""
        now = time.monotonic()
        session = ClientSession.open(websocket, self._hub, self._policy, now)
        if self._keepalive is not None:
            self._keepalive.schedule(session, now)
        self._hub.add(session)
        return session

    def unregister_client(self, websocket: Connection) -> None:
        """Forget a client; harmless if it is unknown."""
        self._hub.remove(websocket)

    def client_handler(self, websocket: Connection) -> Coroutine[Any, Any, None]:
        """Serve one connection (``ClientSession.serve``) from welcome to close: the
        seed's handler, to await; the session leaves the hub when it ends."""
        served = self._open_session(websocket)
        return served.start() if isinstance(served, Waiting) else served

    def _open_session(self, websocket: Connection) -> Coroutine[Any, Any, None] | Waiting:
        """The listener's handler: the session's coroutine, or the session itself when it
        waits for its client's first message (no task, no frame of ours per quiet client)."""
        session = self.register_client(websocket)
        running = self._running
        return session.serve(
            preauthenticated=running is not None and websocket in running.registry.preauthenticated
        )

    async def handle_client_message(self, websocket: Connection, message: str | bytes) -> None:
        """Answer one message of a registered client (``ClientSession.handle``)."""
        session = self._hub.sessions.get(websocket)
        if session is not None:
            await session.handle(message)

    async def handle_subscription(self, websocket: Connection, skill_name: str | None) -> None:
        """Subscribe a registered client (``ClientSession.subscribe``): confirm, then a snapshot."""
        session = self._hub.sessions.get(websocket)
        if session is not None:
            await session.subscribe(skill_name)

    async def broadcast_metrics(self) -> None:
        """Broadcast every ``update_interval`` until ``stop()`` (``Hub.run``).

        ``start()`` already runs it in the background.
        """
        if self._running is None:
            raise RealtimeError("broadcast_metrics() runs only while the server is running")
        await self._hub.run()

    # Introspection

    async def snapshot(self, skill: str | None = None) -> dict[str, Any]:
        """Return the ``metrics_update`` a client subscribed to ``skill`` would get now."""
        if self._running is None:
            raise RealtimeError("the realtime server is not running; start it first")
        skill = validate_skill_name(skill)
        snapshot = await self._hub.read(frozenset() if skill is None else {skill})
        return snapshot.update(skill, format_timestamp())

    def status(self) -> dict[str, Any]:
        """Return a JSON-ready description of the server, its clients and counters."""
        running = self._running
        now = time.monotonic()
        sessions = self._hub.sessions.values()
        return {
            "running": running is not None,
            "urls": self.urls,
            "host": self.host,
            "port": self.port,
            "update_interval": self.update_interval,
            "started_at": None
            if running is None
            else format_timestamp(datetime.fromtimestamp(running.started_at, UTC)),
            "uptime_seconds": None
            if running is None
            else round(now - running.started_monotonic, 3),
            "clients": [session.describe(now) for session in sessions],
            "client_count": len(sessions),
            "connections": 0 if running is None else len(running.registry.connections),
            **self._stats.describe(),
            "auth_enabled": self._token is not None,
            "tls_enabled": self._ssl_certfile is not None,
            "database": self._source.describe(),
            "server_role": self.server_role,
            "redis": self._scale.status(),
        }
