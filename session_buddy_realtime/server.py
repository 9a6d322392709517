"""``RealTimeMetricsServer``: the WebSocket server that streams skill metrics.

One background task (the broadcaster) reads the database once per tick, encodes each
distinct payload once (one for "all skills", one per subscribed skill) and writes it to
every interested connection without awaiting any of them. A connection whose write
buffer is over ``max_buffered_bytes`` skips updates (it gets the newest one once it
drains) and is closed when it stays that way for ``slow_client_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import resource
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import quote

import aiosqlite
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from session_buddy_realtime._version import __version__
from session_buddy_realtime.detection import DetectionSettings
from session_buddy_realtime.errors import (
    DatabaseNotFoundError,
    PortInUseError,
    RealtimeError,
    ServerStartError,
)
from session_buddy_realtime.gate import (
    ConnectionRegistry,
    HandshakeGate,
    tracking_connection_class,
)
from session_buddy_realtime.metrics import MetricsSnapshot, MetricsSource, SourceState
from session_buddy_realtime.protocol import (
    Auth,
    CloseCode,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    authenticated_message,
    connected_message,
    encode,
    error_message,
    format_timestamp,
    metrics_update_message,
    parse_client_message,
    pong_message,
    subscription_confirmed_message,
    unsubscribed_message,
    validate_skill_name,
)
from session_buddy_realtime.security import (
    RateLimiter,
    RedactSecrets,
    build_ssl_context,
    is_loopback,
    own_origins,
    tokens_match,
)

__all__ = ["DEFAULT_DB_PATH", "ClientState", "RealTimeMetricsServer"]

logger = logging.getLogger(__name__)

DEFAULT_DB_PATH: Final = Path(".session-buddy/skills.db")
_SLOW_CLIENT_REASON: Final = "too slow: updates were not being read"
_PING_BUFFER_LIMIT: Final = 8 * 1024
_FIRST_READ_WAIT: Final = 5.0


@dataclass(eq=False, slots=True)
class ClientState:
    """What the server knows about one connected client."""

    websocket: ServerConnection
    remote: str
    connected_at: float
    limiter: RateLimiter
    subscribed: bool = True
    skill: str | None = None
    authenticated: bool = False
    messages_sent: int = 0
    updates_dropped: int = 0
    congested_since: float | None = None
    closing_since: float | None = None
    rate_violations: int = 0
    ping_due: float = math.inf
    pong_waiter: asyncio.Future[float] | None = None
    ping_sent_at: float = 0.0

    def describe(self, now: float) -> dict[str, Any]:
        """Return this client as shown in ``status()``."""
        return {
            "remote": self.remote,
            "connected_for_seconds": round(now - self.connected_at, 3),
            "subscription": (self.skill or "all") if self.subscribed else None,
            "authenticated": self.authenticated,
            "messages_sent": self.messages_sent,
            "updates_dropped": self.updates_dropped,
            "congested": self.congested_since is not None,
        }


@dataclass(slots=True)
class _Counters:
    ticks: int = 0
    idle_ticks: int = 0
    ticks_skipped: int = 0
    messages_sent: int = 0
    updates_dropped: int = 0
    clients_evicted: int = 0
    connections_total: int = 0
    last_tick_at: str | None = None
    last_tick_seconds: float | None = None
    last_error: str | None = None
    errors: int = 0
    auth_failures: int = 0
    rate_limited: int = 0
    refused: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Running:
    """Everything a started server owns; dropped as a whole by ``stop()``."""

    server: Server
    source: MetricsSource
    db: aiosqlite.Connection
    owns_db: bool
    stopping: asyncio.Event
    registry: ConnectionRegistry
    gate: HandshakeGate
    started_at: float
    started_monotonic: float
    db_identity: tuple[int, int] | None = None
    broadcaster: asyncio.Task[None] | None = None
    keepalive: asyncio.Task[None] | None = None
    read_task: asyncio.Task[MetricsSnapshot] | None = None
    busy_since: float | None = None
    evictions: set[asyncio.Task[None]] = field(default_factory=set)


class RealTimeMetricsServer:
    """Stream live skill metrics from Session-Buddy's skills database over WebSocket.

    Args:
        host: Address to listen on. ``localhost`` listens on both IPv4 and IPv6 loopback.
        port: Port to listen on; 0 picks a free one (see ``port`` after ``start()``).
        db_path: Skills database, default ``.session-buddy/skills.db``. The server opens
            it read-only and never creates it. Ignored when ``db`` is given.
        update_interval: Seconds between broadcasts.
        db: An open ``aiosqlite.Connection`` to use instead of opening one (the host's).
            It is only read: never written, never closed, its ``row_factory`` untouched.
        max_message_size: Largest client message in bytes; larger closes with 1009.
        max_buffered_bytes: A client whose unsent data exceeds this skips updates.
        slow_client_timeout: Seconds a client may keep skipping before it is closed (1008).
        ping_interval: Seconds between keepalive pings.
        ping_timeout: Seconds to wait for a pong before closing the connection.
        open_timeout: Seconds allowed for the opening handshake.
        close_timeout: Seconds to wait for a closing handshake before dropping the socket.
        detection: Windows and thresholds of live anomaly detection.
        token: Shared secret clients must present (header, query parameter or first
            ``auth`` message); None for no authentication.
        auth_timeout: Seconds a client has to authenticate before it is closed (4001).
        ssl_certfile: PEM certificate (chain) to serve ``wss://``; None for plain ``ws://``.
        ssl_keyfile: PEM private key, if not in ``ssl_certfile``.
        allowed_origins: Browser origins allowed besides the server's own; ``*`` for any.
            Clients that send no Origin (not browsers) are always allowed.
        check_host_header: On a loopback address, refuse requests whose Host header names
            another host (DNS rebinding).
        max_connections: Open connections at most; None for 10,000 or what the open-file
            limit allows.
        max_connections_per_ip: Open connections from one address at most.
        message_rate: Client messages per second allowed on average.
        message_burst: Client messages allowed in a burst.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8765,
        db_path: Path | str | None = None,
        update_interval: float = 1.0,
        *,
        db: aiosqlite.Connection | None = None,
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
    ) -> None:
        _require(isinstance(port, int) and 0 <= port <= 65535, "port", "an integer 0-65535")
        _require(
            update_interval > 0 and math.isfinite(update_interval),
            "update_interval",
            "a positive number of seconds",
        )
        _require(max_message_size >= 256, "max_message_size", "at least 256 bytes")
        _require(max_buffered_bytes >= 1024, "max_buffered_bytes", "at least 1024 bytes")
        _require(slow_client_timeout > 0, "slow_client_timeout", "positive")
        _require(open_timeout > 0, "open_timeout", "positive")
        _require(close_timeout > 0, "close_timeout", "positive")
        _require(ping_interval is None or ping_interval > 0, "ping_interval", "positive or None")
        _require(ping_timeout is None or ping_timeout > 0, "ping_timeout", "positive or None")
        _require(token is None or len(token) >= 8, "token", "at least 8 characters")
        _require(auth_timeout > 0, "auth_timeout", "positive")
        _require(
            ssl_keyfile is None or ssl_certfile is not None,
            "ssl_keyfile",
            "given together with ssl_certfile",
        )
        _require(max_connections is None or max_connections >= 1, "max_connections", ">= 1")
        _require(max_connections_per_ip >= 1, "max_connections_per_ip", ">= 1")
        _require(message_rate > 0 and math.isfinite(message_rate), "message_rate", "positive")
        _require(message_burst >= 1, "message_burst", ">= 1")
        self.host = host
        self.port = port
        self.db_path = Path(db_path) if db_path is not None else DEFAULT_DB_PATH
        self.update_interval = float(update_interval)
        self._external_db = db
        self._max_message_size = max_message_size
        self._max_buffered_bytes = max_buffered_bytes
        self._slow_client_timeout = slow_client_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._detection = detection or DetectionSettings()
        self._token = token
        self._auth_timeout = auth_timeout
        self._ssl_certfile = None if ssl_certfile is None else Path(ssl_certfile)
        self._ssl_keyfile = None if ssl_keyfile is None else Path(ssl_keyfile)
        self._allowed_origins = {origin.rstrip("/") for origin in allowed_origins}
        self._check_host_header = check_host_header
        self._max_connections = max_connections or _default_max_connections()
        self._max_connections_per_ip = max_connections_per_ip
        self._message_rate = message_rate
        self._message_burst = message_burst
        # How long a tick waits for a new read before sending the last good data.
        self._read_deadline = 0.8 * self.update_interval
        self._clients: dict[ServerConnection, ClientState] = {}
        self._has_clients = asyncio.Event()
        self._counters = _Counters()
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
    def scheme(self) -> str:
        """``wss`` with TLS, else ``ws``."""
        return "wss" if self._ssl_certfile is not None else "ws"

    @property
    def urls(self) -> list[str]:
        """The ``ws://`` addresses the server listens on (empty when stopped)."""
        if self._running is None:
            return []
        urls = []
        for sock in self._running.server.sockets:
            address, port = sock.getsockname()[:2]
            shown = f"[{address}]" if ":" in address else address
            urls.append(f"{self.scheme}://{shown}:{port}")
        return urls

    async def start(self) -> None:
        """Open the database, listen, and start the broadcaster. Harmless when running.

        Raises:
            DatabaseNotFoundError: ``db_path`` does not exist (nothing is created).
            PortInUseError: the address is taken.
            ServerStartError: anything else that prevents listening; nothing is left open.
        """
        async with self._lifecycle:
            if self._running is not None:
                return
            ssl_context = None
            if self._ssl_certfile is not None:
                ssl_context = build_ssl_context(self._ssl_certfile, self._ssl_keyfile)
            db, owns_db = await self._open_database()
            registry = ConnectionRegistry()
            gate = HandshakeGate(
                registry=registry,
                max_connections=self._max_connections,
                max_connections_per_ip=self._max_connections_per_ip,
                token=self._token,
                allowed_origins=set(self._allowed_origins),
                check_host_header=self._check_host_header and is_loopback(self.host),
                bound_host=self.host,
            )
            try:
                server = await serve(
                    self.client_handler,
                    self.host.strip("[]"),
                    self.port,
                    compression=None,
                    max_size=self._max_message_size,
                    max_queue=16,
                    open_timeout=self._open_timeout,
                    # One server-wide keepalive task (below) replaces the library's task
                    # per connection: less memory per client, pings spread over time.
                    ping_interval=None,
                    close_timeout=self._close_timeout,
                    create_connection=tracking_connection_class(registry),
                    process_request=gate,
                    ssl=ssl_context,
                    logger=_websockets_logger(),
                )
            except OSError as exc:
                if owns_db:
                    await db.close()
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"port {self.port} on {self.host} is already in use; choose another "
                        f"port or stop the process that holds it"
                    ) from exc
                raise ServerStartError(
                    f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
                ) from exc
            except BaseException:
                if owns_db:
                    await db.close()
                raise
            self._counters = _Counters(refused=gate.refused)
            running = _Running(
                server=server,
                source=MetricsSource(db, detection=self._detection),
                db=db,
                owns_db=owns_db,
                stopping=asyncio.Event(),
                registry=registry,
                gate=gate,
                started_at=time.time(),
                started_monotonic=time.monotonic(),
            )
            if owns_db:
                with contextlib.suppress(OSError):
                    running.db_identity = _file_identity(self.db_path)
            self._running = running
            if self.port == 0 and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
            for sock in server.sockets:
                gate.allowed_origins |= own_origins(sock.getsockname()[1])
            running.broadcaster = asyncio.create_task(
                self.broadcast_metrics(), name="session-buddy-realtime broadcaster"
            )
            if self._ping_interval is not None:
                running.keepalive = asyncio.create_task(
                    self._keepalive(running), name="session-buddy-realtime keepalive"
                )
            logger.info("listening on %s", ", ".join(self.urls))
            if not is_loopback(self.host) and self._token is None and ssl_context is None:
                logger.warning(
                    "listening on %s, which is not a loopback address, with neither a token "
                    "nor TLS: anyone who can reach this port can read the metrics; set a "
                    "token (SESSION_BUDDY_REALTIME_TOKEN) and TLS, or bind to localhost",
                    self.host,
                )

    async def stop(self) -> None:
        """Close every client (1001), stop the broadcaster, release the port and DB.

        Prompt and bounded by ``close_timeout``; harmless when not running. Closes the
        database connection only if the server opened it.
        """
        async with self._lifecycle:
            running, self._running = self._running, None
            if running is None:
                return
            running.stopping.set()
            for task in (running.broadcaster, running.keepalive):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            # Connections still in the handshake, and clients so far behind that a close
            # frame would wait behind their backlog, are dropped at once; the rest get 1001.
            for connection in list(running.registry.connections):
                if (
                    connection.state is State.CONNECTING
                    or connection.transport.get_write_buffer_size() > self._max_buffered_bytes
                ):
                    connection.transport.abort()
            running.server.close(close_connections=True, code=CloseCode.GOING_AWAY)
            # Clients that do not finish the closing handshake in close_timeout (a stuck
            # client cannot even receive the close frame) are dropped.
            try:
                async with asyncio.timeout(self._close_timeout):
                    await running.server.wait_closed()
            except TimeoutError:
                for connection in list(running.registry.connections):
                    connection.transport.abort()
                await running.server.wait_closed()
            if running.read_task is not None:
                running.read_task.cancel()
                await asyncio.gather(running.read_task, return_exceptions=True)
            if running.evictions:
                await asyncio.gather(*running.evictions, return_exceptions=True)
            self._clients.clear()
            self._has_clients.clear()
            if running.owns_db:
                await running.db.close()
            logger.info("stopped")

    async def _open_database(self) -> tuple[aiosqlite.Connection, bool]:
        if self._external_db is not None:
            return self._external_db, False
        path = self.db_path.expanduser().resolve()
        if not path.is_file():
            raise DatabaseNotFoundError(
                f"skills database not found: {path} (check the path, or create a demo "
                f"database with 'session-buddy-realtime serve --demo')"
            )
        db = await _connect_read_only(path)
        try:
            cursor = await db.execute("PRAGMA schema_version")
            await cursor.close()
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise ServerStartError(f"cannot read skills database {path}: {exc}") from exc
        return db, True

    # Clients

    def register_client(self, websocket: ServerConnection) -> ClientState:
        """Add a client, subscribed to all skills (the seed's default)."""
        remote = websocket.remote_address
        shown = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
        now = time.monotonic()
        state = ClientState(
            websocket=websocket,
            remote=shown,
            connected_at=now,
            limiter=RateLimiter(self._message_rate, self._message_burst),
        )
        if self._ping_interval is not None:
            state.ping_due = now + self._ping_interval
        self._clients[websocket] = state
        self._has_clients.set()
        self._counters.connections_total += 1
        logger.debug("client %s connected (%d now)", shown, len(self._clients))
        return state

    def unregister_client(self, websocket: ServerConnection) -> None:
        """Forget a client; harmless if it is unknown."""
        state = self._clients.pop(websocket, None)
        if not self._clients:
            self._has_clients.clear()
        if state is not None:
            logger.debug("client %s left (%d now)", state.remote, len(self._clients))

    async def client_handler(self, websocket: ServerConnection) -> None:
        """Serve one connection: welcome, authentication if required, then its messages.

        Messages over the rate limit get one ``rate_limited`` error; a client that keeps
        going is closed with 1008.
        """
        state = self.register_client(websocket)
        running = self._running
        try:
            state.authenticated = running is not None and (
                websocket in running.registry.preauthenticated
            )
            state.subscribed = self._token is None or state.authenticated
            welcome = connected_message(
                timestamp=format_timestamp(),
                server_version=__version__,
                update_interval=self.update_interval,
                subscription="all" if state.subscribed else None,
                authenticated=state.authenticated,
                auth_required=self._token is not None,
            )
            await self._reply(websocket, welcome)
            if not state.subscribed and not await self._authenticate(websocket, state):
                return
            async for message in websocket:
                if not await self._within_rate(websocket, state):
                    return
                await self.handle_client_message(websocket, message)
        except ConnectionClosed:
            pass
        finally:
            self.unregister_client(websocket)

    async def _authenticate(self, websocket: ServerConnection, state: ClientState) -> bool:
        """Serve only ``auth`` until the client authenticates; close it (4001) otherwise."""
        try:
            async with asyncio.timeout(self._auth_timeout):
                async for message in websocket:
                    if not await self._within_rate(websocket, state):
                        return False
                    # Everything but a valid auth gets not_authenticated (or closes 4001).
                    await self.handle_client_message(websocket, message)
                    if state.authenticated:
                        return True
        except TimeoutError:
            self._counters.auth_failures += 1
            await websocket.close(CloseCode.AUTH_FAILED, "authentication timeout")
        return False

    async def _check_token(
        self, websocket: ServerConnection, state: ClientState, token: str
    ) -> None:
        if self._token is not None and not tokens_match(token, self._token):
            self._counters.auth_failures += 1
            logger.info("client %s failed to authenticate", state.remote)
            await websocket.close(CloseCode.AUTH_FAILED, "authentication failed")
            return
        state.authenticated = self._token is not None
        if not state.subscribed:
            state.subscribed, state.skill = True, None
        await self._reply(websocket, authenticated_message(timestamp=format_timestamp()))

    async def _within_rate(self, websocket: ServerConnection, state: ClientState) -> bool:
        """Apply the message rate limit; False once the client has been closed for it."""
        if state.limiter.allow():
            state.rate_violations = 0
            return True
        state.rate_violations += 1
        self._counters.rate_limited += 1
        if state.rate_violations == 1:
            await self._reply_error(
                websocket,
                ErrorCode.RATE_LIMITED,
                f"too many messages: at most {self._message_rate:g} per second "
                f"(bursts of {self._message_burst}); this message was ignored",
            )
        elif state.rate_violations > self._message_burst:
            logger.warning("closing client %s: message rate limit exceeded", state.remote)
            await websocket.close(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
            return False
        return True

    async def handle_client_message(
        self, websocket: ServerConnection, message: str | bytes
    ) -> None:
        """Answer one client message; bad input gets an ``error`` reply, never a close."""
        try:
            request = parse_client_message(message)
        except ProtocolError as exc:
            await self._reply_error(websocket, exc.code, exc.message)
            return
        state = self._clients.get(websocket)
        if state is None:
            return
        if not isinstance(request, Auth) and not self._may_use(state):
            await self._reply_error(
                websocket,
                ErrorCode.NOT_AUTHENTICATED,
                'authenticate first: send {"type": "auth", "token": "..."}',
            )
            return
        try:
            if isinstance(request, Subscribe):
                await self.handle_subscription(websocket, request.skill)
            elif isinstance(request, Unsubscribe):
                state.subscribed = False
                state.skill = None
                await self._reply(websocket, unsubscribed_message(timestamp=format_timestamp()))
            elif isinstance(request, Ping):
                await self._reply(websocket, pong_message(timestamp=format_timestamp()))
            elif isinstance(request, Auth):
                await self._check_token(websocket, state, request.token)
        except ConnectionClosed:
            raise
        except Exception as exc:
            # Our fault, not the client's: keep the connection and the server going.
            self._record_error(f"handling {type(request).__name__.lower()}: {exc!r}")
            logger.exception("internal error answering %s", type(request).__name__.lower())
            await self._reply_error(
                websocket, ErrorCode.INTERNAL_ERROR, "internal error; see the server log"
            )

    async def handle_subscription(
        self, websocket: ServerConnection, skill_name: str | None
    ) -> None:
        """Subscribe a client to all skills (None) or one: confirm, then send a snapshot."""
        try:
            skill = validate_skill_name(skill_name)
        except ProtocolError as exc:
            await self._reply_error(websocket, exc.code, exc.message)
            return
        state = self._clients.get(websocket)
        running = self._running
        if state is None or running is None or not self._may_use(state):
            return
        snapshot = await self._read(running, frozenset() if skill is None else {skill})
        if self._clients.get(websocket) is not state:
            return
        timestamp = format_timestamp()
        known: bool | None = None
        if skill is not None and (snapshot.skills.get(skill) is not None or snapshot.fresh):
            known = snapshot.skills.get(skill) is not None
        confirmation = encode(
            subscription_confirmed_message(timestamp=timestamp, skill=skill, known=known)
        )
        first_update = encode(_update(snapshot, skill, timestamp))
        # Both frames are written before anything else can run, so the confirmation
        # always precedes the snapshot and every later update.
        state.subscribed, state.skill = True, skill
        broadcast([websocket], confirmation)
        broadcast([websocket], first_update)
        state.messages_sent += 2
        self._counters.messages_sent += 2

    def _may_use(self, state: ClientState) -> bool:
        return self._token is None or state.authenticated

    async def _reply_error(self, websocket: ServerConnection, code: ErrorCode, text: str) -> None:
        await self._reply(websocket, error_message(code, text, timestamp=format_timestamp()))

    async def _reply(self, websocket: ServerConnection, message: dict[str, Any]) -> None:
        # Awaiting the send pauses reading from this client until it drains: a client
        # that floods without reading slows only itself.
        await websocket.send(encode(message))
        self._counters.messages_sent += 1
        state = self._clients.get(websocket)
        if state is not None:
            state.messages_sent += 1

    # Broadcasting

    async def broadcast_metrics(self) -> None:
        """Broadcast metrics every ``update_interval`` until ``stop()`` (the broadcaster).

        Ticks keep a fixed phase: the time a tick takes does not shift the next one, and
        a tick that overruns skips the slots it missed instead of bunching up.
        """
        running = self._running
        if running is None:
            raise RealtimeError("broadcast_metrics() runs only while the server is running")
        loop = asyncio.get_running_loop()
        interval = self.update_interval
        next_tick = loop.time()
        while not running.stopping.is_set():
            if not self._clients:
                # Nobody connected: no ticks, no wake-ups, until a client arrives; it is
                # served at once and the schedule restarts from there.
                if not await self._until_clients(running):
                    return
                next_tick = loop.time()
            began = loop.time()
            try:
                await self._broadcast_tick(running)
            except Exception as exc:
                # Top of the task: log, remember, and keep the cadence.
                self._record_error(f"broadcast tick: {exc!r}")
                logger.exception("broadcast tick failed")
            ended = loop.time()
            self._counters.last_tick_at = format_timestamp()
            self._counters.last_tick_seconds = round(ended - began, 6)
            next_tick += interval
            if next_tick <= ended:
                missed = math.floor((ended - next_tick) / interval) + 1
                self._counters.ticks_skipped += missed
                next_tick += missed * interval
            try:
                async with asyncio.timeout_at(next_tick):
                    await running.stopping.wait()
            except TimeoutError:
                pass

    async def _until_clients(self, running: _Running) -> bool:
        """Wait until a client is registered (True) or the server stops (False)."""
        arrived = asyncio.ensure_future(self._has_clients.wait())
        stopping = asyncio.ensure_future(running.stopping.wait())
        try:
            await asyncio.wait({arrived, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
            stopping.cancel()
        return not running.stopping.is_set()

    async def _broadcast_tick(self, running: _Running) -> None:
        groups: dict[str | None, list[ClientState]] = {}
        now = time.monotonic()
        for state in self._clients.values():
            if state.websocket.state is State.CLOSING:
                self._drop_if_lingering(state, now)
            elif state.subscribed:
                groups.setdefault(state.skill, []).append(state)
        self._counters.ticks += 1
        if not groups:
            self._counters.idle_ticks += 1
            return
        snapshot = await self._read(running, {skill for skill in groups if skill is not None})
        timestamp = format_timestamp()
        for skill, members in groups.items():
            frame = _text_frame(encode(_update(snapshot, skill, timestamp)))
            self._deliver(running, skill, members, frame)

    async def _read(self, running: _Running, skills: Set[str]) -> MetricsSnapshot:
        """Read the database, but never wait longer than the tick allows.

        At most one read is in flight: while one is still running (a writer holds a lock,
        a query is slow), callers get the last good data flagged ``busy`` and the stream
        keeps its cadence; the next call picks up the result once it is there.
        """
        if running.owns_db and not await self._check_database_file(running):
            return running.source.cached(skills)
        # A read still running from an earlier tick is not waited for again, except for
        # the very first data: an empty "busy" snapshot would help nobody.
        wait = 0.0
        if running.read_task is None or running.read_task.done():
            running.read_task = asyncio.create_task(running.source.read(skills))
            wait = self._read_deadline
        task = running.read_task
        if not running.source.has_data:
            wait = max(wait, _FIRST_READ_WAIT)
        done = (await asyncio.wait({task}, timeout=wait))[0] if wait else set()
        if task.cancelled():  # dropped because the database file was replaced
            return running.source.cached(skills)
        if task in done and not skills <= task.result().skills.keys():
            # The read that finished was started for other skills (an earlier tick).
            return await self._read(running, skills)
        if task in done:
            if running.busy_since is not None:
                logger.info("skills database answering again")
                running.busy_since = None
            return task.result()
        if running.busy_since is None:
            running.busy_since = time.monotonic()
            logger.warning(
                "skills database read is taking longer than %.2f s (locked or slow); "
                "serving the last good data meanwhile",
                self._read_deadline,
            )
        waited = time.monotonic() - running.busy_since
        return running.source.cached(
            skills,
            SourceState.BUSY,
            f"the database has not answered for {waited:.1f} s (locked by a writer, or a "
            f"slow query); showing the last good data",
        )

    async def _check_database_file(self, running: _Running) -> bool:
        """For a database the server opened: notice the file deleted or replaced.

        Returns False while the file is missing. A replaced file (another inode) is
        reopened, so the stream follows a database recreated or restored from a backup
        (restore with SQLite's backup API, or remove the old ``-wal``/``-shm`` files first:
        SQLite would otherwise apply the old write-ahead log to the new file).
        """
        path = self.db_path
        try:
            identity = _file_identity(path)
        except OSError:
            running.source.unavailable(f"the skills database file is gone: {path}")
            return False
        if identity == running.db_identity:
            return True
        logger.warning("skills database file %s was replaced; reopening it", path)
        try:
            db = await _connect_read_only(path)
        except sqlite3.Error as exc:
            running.source.unavailable(f"cannot reopen the replaced database {path}: {exc}")
            return False
        old, running.db, running.db_identity = running.db, db, identity
        if running.read_task is not None and not running.read_task.done():
            running.read_task.cancel()
        running.read_task = None
        running.source.use_connection(db)
        await old.close()
        return True

    async def _keepalive(self, running: _Running) -> None:
        """Ping every client each ``ping_interval``; close with 1011 one that stays silent.

        One task for all connections. Each client's pings are due ``ping_interval`` after
        it connected and after each pong, so pings spread out instead of arriving in bursts.
        Clients too far behind to read a ping are left to the slow-client rule.
        """
        assert self._ping_interval is not None
        interval = self._ping_interval
        step = min(1.0, interval / 4)
        while not running.stopping.is_set():
            if not self._clients and not await self._until_clients(running):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await running.stopping.wait()
            now = time.monotonic()
            for client in list(self._clients.values()):
                try:
                    await self._keepalive_one(running, client, now, interval)
                except ConnectionClosed:
                    continue
                except Exception as exc:  # one connection's trouble must not end keepalive
                    self._record_error(f"keepalive: {exc!r}")
                    logger.exception("keepalive failed for %s", client.remote)

    async def _keepalive_one(
        self, running: _Running, client: ClientState, now: float, interval: float
    ) -> None:
        websocket = client.websocket
        if websocket.protocol.state is not State.OPEN:
            return
        waiter = client.pong_waiter
        if waiter is not None:
            if not waiter.done():
                if self._ping_timeout is not None and (
                    now - client.ping_sent_at > self._ping_timeout
                ):
                    client.pong_waiter = None
                    self._close_later(
                        running, websocket, CloseCode.INTERNAL_ERROR, "keepalive ping timeout"
                    )
                return
            client.pong_waiter = None
            client.ping_due = now + interval
        if now < client.ping_due:
            return
        # ping() waits for the buffer to drain once it passed the library's high-water
        # mark; below its low-water mark (a quarter of 32 KiB) it never waits.
        if websocket.transport.get_write_buffer_size() > _PING_BUFFER_LIMIT:
            return
        waiter = cast("asyncio.Future[float]", await websocket.ping())
        waiter.add_done_callback(_retrieve)
        client.pong_waiter, client.ping_sent_at = waiter, now

    def _drop_if_lingering(self, client: ClientState, now: float) -> None:
        # After a close the library starts itself (1009 for an oversized frame) it waits
        # for the peer's close frame without a deadline; enforce close_timeout here.
        if client.closing_since is None:
            client.closing_since = now
        elif now - client.closing_since >= self._close_timeout:
            client.websocket.transport.abort()

    def _deliver(
        self, running: _Running, skill: str | None, members: list[ClientState], frame: bytes
    ) -> None:
        """Write one serialized frame to every member that keeps up, without awaiting.

        ``frame`` is a complete WebSocket frame, built once for all. Writing it to the
        transport is what the library's ``broadcast`` does for each connection after
        serializing the same frame again; server frames are unmasked and, with compression
        off, no extension alters them, so the bytes are identical. Each write is one whole
        frame, so it never interleaves with the library's own (pings, replies, close).
        """
        now = time.monotonic()
        limit = self._max_buffered_bytes
        sent = 0
        for client in members:
            websocket = client.websocket
            # Skip whoever left or changed subscription while the tick read the database.
            if not client.subscribed or client.skill != skill:
                continue
            if websocket.protocol.state is not State.OPEN:
                continue
            transport = websocket.transport
            if transport.get_write_buffer_size() > limit:
                client.updates_dropped += 1
                self._counters.updates_dropped += 1
                if client.congested_since is None:
                    client.congested_since = now
                elif now - client.congested_since >= self._slow_client_timeout:
                    self._evict(running, client)
                continue
            client.congested_since = None
            client.messages_sent += 1
            transport.write(frame)
            sent += 1
        self._counters.messages_sent += sent

    def _evict(self, running: _Running, client: ClientState) -> None:
        if client.websocket not in self._clients:
            return
        self.unregister_client(client.websocket)
        self._counters.clients_evicted += 1
        logger.warning("closing client %s: %s", client.remote, _SLOW_CLIENT_REASON)
        self._close_later(
            running, client.websocket, CloseCode.POLICY_VIOLATION, _SLOW_CLIENT_REASON
        )

    def _close_later(
        self, running: _Running, websocket: ServerConnection, code: int, reason: str
    ) -> None:
        task = asyncio.create_task(self._close_within_timeout(websocket, code, reason))
        running.evictions.add(task)
        task.add_done_callback(running.evictions.discard)

    async def _close_within_timeout(
        self, websocket: ServerConnection, code: int, reason: str
    ) -> None:
        # close() waits for the write buffer to drain, which a stuck client never lets
        # happen: give it close_timeout, then drop the TCP connection.
        try:
            async with asyncio.timeout(self._close_timeout):
                await websocket.close(code, reason)
        except TimeoutError:
            websocket.transport.abort()

    def _record_error(self, message: str) -> None:
        self._counters.errors += 1
        self._counters.last_error = f"{format_timestamp()} {message}"

    # Introspection

    async def snapshot(self, skill: str | None = None) -> dict[str, Any]:
        """Return the ``metrics_update`` a client subscribed to ``skill`` would get now."""
        running = self._running
        if running is None:
            raise RealtimeError("the realtime server is not running; start it first")
        skill = validate_skill_name(skill)
        snapshot = await self._read(running, frozenset() if skill is None else {skill})
        return _update(snapshot, skill, format_timestamp())

    def status(self) -> dict[str, Any]:
        """Return a JSON-ready description of the server, its clients and counters."""
        running = self._running
        counters = self._counters
        now = time.monotonic()
        status: dict[str, Any] = {
            "running": running is not None,
            "urls": self.urls,
            "host": self.host,
            "port": self.port,
            "update_interval": self.update_interval,
            "started_at": None,
            "uptime_seconds": None,
            "clients": [client.describe(now) for client in self._clients.values()],
            "client_count": len(self._clients),
            "connections": 0 if running is None else len(running.registry.connections),
            "ticks": counters.ticks,
            "idle_ticks": counters.idle_ticks,
            "ticks_skipped": counters.ticks_skipped,
            "messages_sent": counters.messages_sent,
            "updates_dropped": counters.updates_dropped,
            "clients_evicted": counters.clients_evicted,
            "connections_total": counters.connections_total,
            "last_tick_at": counters.last_tick_at,
            "last_tick_seconds": counters.last_tick_seconds,
            "errors": counters.errors,
            "last_error": counters.last_error,
            "auth_enabled": self._token is not None,
            "tls_enabled": self._ssl_certfile is not None,
            "auth_failures": counters.auth_failures,
            "rate_limited": counters.rate_limited,
            "refused": dict(counters.refused),
            "database": {
                "path": None if self._external_db is not None else str(self.db_path),
                "shared_connection": self._external_db is not None,
                "state": None,
                "message": None,
                "queries": 0,
                "refreshes": 0,
            },
        }
        if running is not None:
            status["started_at"] = format_timestamp(datetime.fromtimestamp(running.started_at, UTC))
            status["uptime_seconds"] = round(now - running.started_monotonic, 3)
            source = running.source
            busy = running.busy_since is not None
            status["database"].update(
                state=SourceState.BUSY.value if busy else source.state.value,
                message="a read has been running for "
                f"{time.monotonic() - (running.busy_since or 0):.1f} s (lock or slow query)"
                if busy
                else source.message,
                queries=source.queries,
                refreshes=source.refreshes,
            )
        return status


def _update(snapshot: MetricsSnapshot, skill: str | None, timestamp: str) -> dict[str, Any]:
    return metrics_update_message(
        timestamp=timestamp, skill=skill, data=snapshot.data(skill), source=snapshot.source()
    )


async def _connect_read_only(path: Path) -> aiosqlite.Connection:
    uri = f"file:{quote(str(path.expanduser().resolve()))}?mode=ro"  # noqa: ASYNC240
    return await aiosqlite.connect(uri, uri=True)


def _file_identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return (info.st_dev, info.st_ino)


def _retrieve(future: asyncio.Future[float]) -> None:
    # A pong that never comes ends with ConnectionClosed; read it so asyncio does not
    # report it as never retrieved.
    if not future.cancelled():
        future.exception()


def _text_frame(text: str) -> bytes:
    """One unmasked, unfragmented text frame, as the server side sends it."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


def _websockets_logger() -> logging.Logger:
    # The library logs request lines at debug level, query string (token) included.
    library = logging.getLogger("session_buddy_realtime.websockets")
    if not any(isinstance(f, RedactSecrets) for f in library.filters):
        library.addFilter(RedactSecrets())
    return library


def _default_max_connections() -> int:
    # Leave room for the database, logs and the host's own files.
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 10_000
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(1, min(10_000, soft - 64))


def _require(condition: bool, setting: str, expected: str) -> None:
    if not condition:
        raise ValueError(f"invalid {setting}: must be {expected}")
