"""The hub: fan-out of the source's state to every subscriber, on a fixed schedule.

One task (the broadcaster) asks the source for the state once per tick, encodes each
distinct payload once (one for "all skills", one per subscribed skill) and writes it to
every interested connection without awaiting any of them. A connection whose write
buffer is over ``max_buffered_bytes`` skips updates (it gets the newest one once it
drains) and is closed when it stays that way for ``slow_client_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Set
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from websockets.protocol import State

from session_buddy_realtime.data.source import MetricsSnapshot, Source
from session_buddy_realtime.protocol import (
    encode,
    format_timestamp,
    subscription_confirmed_message,
)
from session_buddy_realtime.stream.closing import close_listener
from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.gate import ConnectionRegistry, drop
from session_buddy_realtime.stream.listener import Listener
from session_buddy_realtime.stream.opening import text_frame, write_first
from session_buddy_realtime.stream.stats import StreamStats
from session_buddy_realtime.stream.waits import first_of, unless_set

__all__ = ["Hub", "Subscriber"]

logger = logging.getLogger(__name__)

_SLOW_CLIENT_REASON: Final = "too slow: updates were not being read"


@dataclass(eq=False, slots=True)
class Subscriber:
    """One connection as the hub (and keepalive) see it."""

    connection: Connection
    remote: str
    connected_at: float
    # The subscription: what the hub delivers (set by the hub and the session).
    subscribed: bool = True
    skill: str | None = None
    # Delivery, kept by the hub.
    messages_sent: int = 0
    updates_dropped: int = 0
    congested_since: float | None = None
    closing_since: float | None = None
    # Keepalive, kept by ``Keepalive``.
    ping_due: float = math.inf
    pong_waiter: asyncio.Future[float] | None = None
    ping_sent_at: float = 0.0


S = TypeVar("S", bound=Subscriber)
T = TypeVar("T")


class Hub(Generic[S]):
    """Subscribers by connection, the broadcaster, delivery, congestion and eviction.

    Args:
        source: Where the state comes from; the hub never knows more of it.
        stats: Counters shared with the rest of the server.
        interval: Seconds between ticks.
        read_timeout: How long a tick waits for the source before it sends what it has.
        max_buffered_bytes: A subscriber whose unsent data exceeds this skips updates.
        slow_client_timeout: Seconds a subscriber may keep skipping before it is closed.
        close_timeout: Seconds a closing handshake may take before the socket is dropped.
        paced_by: Set by the source when it has a new state (an edge's feed): ticks then
            follow it, one after each, and fall back to the interval when it goes quiet.
    """

    def __init__(
        self,
        source: Source,
        stats: StreamStats,
        *,
        interval: float,
        read_timeout: float,
        max_buffered_bytes: int,
        slow_client_timeout: float,
        close_timeout: float,
        paced_by: asyncio.Event | None = None,
    ) -> None:
        self.source = source
        self.paced_by = paced_by
        self.ticked = asyncio.Event()
        """Set after every tick: a producer's publisher publishes right after it."""
        self.last_read: MetricsSnapshot | None = None
        """What the last tick read (None if it read nothing), for the publisher to publish."""
        self.watched_elsewhere: frozenset[str] = frozenset()
        """Skills each tick reads besides its subscribers' (those edges' clients watch)."""
        self.stats = stats
        self.interval = interval
        self.read_timeout = read_timeout
        self.max_buffered_bytes = max_buffered_bytes
        self.slow_client_timeout = slow_client_timeout
        self.close_timeout = close_timeout
        self.sessions: dict[Connection, S] = {}
        self._has_sessions = asyncio.Event()
        self._stopping = asyncio.Event()
        self._broadcaster: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._failing_groups: set[str | None] = set()

    # Membership

    def add(self, session: S) -> None:
        """Add a session (its subscription as it is: all skills by default)."""
        self.sessions[session.connection] = session
        self._has_sessions.set()
        self.stats.connections_total += 1
        logger.debug("client %s connected (%d now)", session.remote, len(self.sessions))

    def remove(self, connection: Connection) -> None:
        """Forget a connection's session; harmless if it is unknown."""
        session = self.sessions.pop(connection, None)
        if not self.sessions:
            self._has_sessions.clear()
        if session is not None:
            logger.debug("client %s left (%d now)", session.remote, len(self.sessions))

    @property
    def broadcasting(self) -> bool:
        """True while the broadcaster task runs (between ``start()`` and ``close_all()``)."""
        return self._broadcaster is not None and not self._broadcaster.done()

    async def until_sessions(self, stopping: asyncio.Event) -> bool:
        """Wait until a session is added (True) or ``stopping`` is set (False)."""
        await first_of(self._has_sessions, stopping)
        return not stopping.is_set()

    # Subscriptions

    async def read(self, skills: Set[str]) -> MetricsSnapshot:
        """The source's state for ``skills``, within the tick's read timeout."""
        return await self.source.read(skills, self.read_timeout)

    async def unless_stopping(self, work: Awaitable[T]) -> T | None:
        """The result of ``work``, or None if the hub stops first (``work`` is cancelled):
        a request still being answered never holds up ``close_all()``."""
        return await unless_set(self._stopping, work)

    async def subscribe(self, session: S, skill: str | None) -> None:
        """Subscribe ``session`` to all skills (None) or one: confirm, then a snapshot."""
        snapshot = await self.read(frozenset() if skill is None else {skill})
        if self.sessions.get(session.connection) is not session:
            return
        timestamp = format_timestamp()
        known: bool | None = None
        if skill is not None and (snapshot.skills.get(skill) is not None or snapshot.fresh):
            known = snapshot.skills.get(skill) is not None
        confirmation = text_frame(
            encode(subscription_confirmed_message(timestamp=timestamp, skill=skill, known=known))
        )
        first_update = text_frame(encode(snapshot.update(skill, timestamp)))
        # Both frames are written before anything else can run, so the confirmation
        # always precedes the snapshot and every later update.
        session.subscribed, session.skill = True, skill
        connection = session.connection
        if connection.protocol.state is State.OPEN:
            connection.transport.write(confirmation + first_update)
            session.messages_sent += 2
            self.stats.messages_sent += 2

    def send_first(self, session: S, frame: bytes) -> None:
        """Write a connection's first frame (its welcome) at once, as the ticks write,
        together with the handshake's response (``write_first``)."""
        if session.connection.protocol.state is State.OPEN:
            write_first(session.connection, frame)
            session.messages_sent += 1
            self.stats.messages_sent += 1

    def unsubscribe(self, session: S) -> None:
        """Stop updates to ``session`` (it stays connected)."""
        session.subscribed, session.skill = False, None

    # The broadcaster

    def start(self) -> None:
        """Start the broadcaster task."""
        self._stopping = asyncio.Event()
        self._broadcaster = asyncio.create_task(
            self.run(), name="session-buddy-realtime broadcaster"
        )

    async def run(self) -> None:
        """Broadcast every ``interval`` until the hub stops.

        Ticks keep a fixed phase: the time a tick takes does not shift the next one, and
        a tick that overruns skips the slots it missed instead of bunching up.
        """
        loop = asyncio.get_running_loop()
        interval = self.interval
        stopping = self._stopping
        next_tick, arrival = loop.time(), False
        while not stopping.is_set():
            if not self.sessions:
                # Nobody connected: no ticks, no wake-ups, until a client arrives; it is
                # served at once and the schedule restarts from there.
                if not await self.until_sessions(stopping):
                    return
                next_tick, arrival = loop.time(), True
            began = loop.time()
            if self.paced_by is not None:
                self.paced_by.clear()  # what arrives during the tick brings the next one
            try:
                await self._tick()
            except Exception as exc:
                # Top of the task: log, remember, and keep the cadence.
                self.stats.record_error(f"broadcast tick: {exc!r}")
                logger.exception("broadcast tick failed")
            ended = loop.time()
            self.ticked.set()
            self.stats.last_tick_at = format_timestamp()
            self.stats.last_tick_seconds = round(ended - began, 6)
            self.stats.tick_seconds.observe(ended - began)
            if self.paced_by is not None:
                await self._wait_paced(began, stopping, spaced=not arrival)
                arrival = False
                continue
            next_tick += interval
            if next_tick <= ended:
                missed = math.floor((ended - next_tick) / interval) + 1
                self.stats.ticks_skipped += missed
                next_tick += missed * interval
            await first_of(stopping, deadline=next_tick)

    async def _wait_paced(self, began: float, stopping: asyncio.Event, *, spaced: bool) -> None:
        """Until the source's next state, but not before half an interval after the last
        tick (a flood of states cannot speed the clients up; the tick for a first client is
        not counted) nor after 1.5 intervals (a silent feed still gets its clients an
        update, flagged stale, at about the cadence)."""
        assert self.paced_by is not None
        await first_of(self.paced_by, stopping, deadline=began + 1.5 * self.interval)
        if spaced and not stopping.is_set():
            await first_of(stopping, deadline=began + self.interval / 2)

    async def _tick(self) -> None:
        groups: dict[str | None, list[S]] = {}
        backed_up: list[S] = []
        now = time.monotonic()
        limit = self.max_buffered_bytes
        for session in self.sessions.values():
            # Subscribers first, with no other check: their state is _deliver's.
            if session.subscribed:
                groups.setdefault(session.skill, []).append(session)
                continue
            connection = session.connection
            if connection.protocol.state is State.CLOSING:
                self._drop_if_lingering(session, now)
            elif connection.transport.get_write_buffer_size() > limit:
                # Not subscribed, yet not reading what it is sent (replies, pongs).
                backed_up.append(session)
            else:
                session.congested_since = None
        for session in backed_up:
            self._congested(session, now)
        self.stats.ticks += 1
        self.last_read = None
        if not groups:
            self.stats.idle_ticks += 1
            return
        snapshot = await self.read(
            {skill for skill in groups if skill is not None} | self.watched_elsewhere
        )
        self.last_read = snapshot
        timestamp = format_timestamp()
        for skill, members in groups.items():
            # One group's failure (a payload that cannot be encoded, say) must not cost
            # the other groups their update.
            try:
                frame = text_frame(encode(snapshot.update(skill, timestamp)))
                self._deliver(skill, members, frame)
            except Exception as exc:
                self._group_failed(skill, exc)
            else:
                self._group_recovered(skill)

    def _group_failed(self, skill: str | None, exc: Exception) -> None:
        group = "all skills" if skill is None else f"skill {skill!r}"
        self.stats.record_error(f"broadcast tick, {group}: {exc!r}")
        if skill not in self._failing_groups:
            # Logged once when it starts and once when it ends, not every tick.
            self._failing_groups.add(skill)
            logger.error("broadcast to %s failed (skipped until it recovers)", group, exc_info=exc)

    def _group_recovered(self, skill: str | None) -> None:
        if self._failing_groups and skill in self._failing_groups:
            self._failing_groups.discard(skill)
            group = "all skills" if skill is None else f"skill {skill!r}"
            logger.info("broadcast to %s works again", group)

    def _deliver(self, skill: str | None, members: list[S], frame: bytes) -> None:
        """Write one serialized frame to every member that keeps up, without awaiting.

        ``frame`` is a complete WebSocket frame, built once for all. Writing it to the
        transport is what the library's ``broadcast`` does for each connection after
        serializing the same frame again; server frames are unmasked and, with compression
        off, no extension alters them, so the bytes are identical. Each write is one whole
        frame, so it never interleaves with the library's own (pings, replies, close).
        """
        now = time.monotonic()
        limit = self.max_buffered_bytes
        sent = 0
        for session in members:
            connection = session.connection
            # Skip whoever left or changed subscription while the tick read the source.
            if not session.subscribed or session.skill != skill:
                continue
            state = connection.protocol.state
            if state is not State.OPEN:
                if state is State.CLOSING:
                    self._drop_if_lingering(session, now)
                continue
            transport = connection.transport
            if transport.get_write_buffer_size() > limit:
                session.updates_dropped += 1
                self.stats.updates_dropped += 1
                self._congested(session, now)
                continue
            session.congested_since = None
            session.messages_sent += 1
            transport.write(frame)
            sent += 1
        self.stats.messages_sent += sent

    def _congested(self, session: S, now: float) -> None:
        if session.congested_since is None:
            session.congested_since = now
        elif now - session.congested_since >= self.slow_client_timeout:
            self._evict(session)

    def _drop_if_lingering(self, session: S, now: float) -> None:
        # After a close the library starts itself (1009 for an oversized frame) it waits
        # for the peer's close frame without a deadline; enforce close_timeout here.
        if session.closing_since is None:
            session.closing_since = now
        elif now - session.closing_since >= self.close_timeout:
            session.connection.transport.abort()

    # Closing

    def _evict(self, session: S) -> None:
        if session.connection not in self.sessions:
            return
        self.remove(session.connection)
        self.stats.clients_evicted += 1
        logger.warning("dropping client %s: %s", session.remote, _SLOW_CLIENT_REASON)
        # A close frame would wait behind the backlog the client does not read: reset
        # the connection, which frees its buffers, the kernel's included, at once.
        drop(session.connection)

    def close_later(self, connection: Connection, code: int, reason: str) -> None:
        """Close ``connection`` in the background, dropping it after ``close_timeout``."""
        task = asyncio.create_task(self._close_within_timeout(connection, code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_within_timeout(self, connection: Connection, code: int, reason: str) -> None:
        # close() waits for the write buffer to drain, which a stuck client never lets
        # happen: give it close_timeout, then drop the TCP connection.
        try:
            async with asyncio.timeout(self.close_timeout):
                await connection.close(code, reason)
        except TimeoutError:
            connection.transport.abort()

    async def close_all(self, listener: Listener, registry: ConnectionRegistry) -> None:
        """Stop the broadcaster and close every connection (``close_listener``: 1001, or
        dropped when they cannot take a close frame), within ``close_timeout``. Every
        session is forgotten."""
        self._stopping.set()
        task, self._broadcaster = self._broadcaster, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await close_listener(
            listener,
            registry,
            max_buffered_bytes=self.max_buffered_bytes,
            close_timeout=self.close_timeout,
        )
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.sessions.clear()
        self._has_sessions.clear()
