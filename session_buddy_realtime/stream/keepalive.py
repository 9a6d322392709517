"""Keepalive: one task that pings every connection of the hub and closes dead ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from session_buddy_realtime.protocol import CloseCode
from session_buddy_realtime.stream.hub import Hub, Subscriber

__all__ = ["Keepalive"]

logger = logging.getLogger(__name__)

# ping() waits for the buffer to drain once it passed the library's high-water mark;
# below its low-water mark (a quarter of 32 KiB) it never waits.
_PING_BUFFER_LIMIT: Final = 8 * 1024


class Keepalive:
    """Ping the clients that receive nothing; close with 1011 one that stays silent.

    A subscriber that is sent an update at least every ``interval`` needs no ping: the
    kernel resets a connection whose data goes unacknowledged for ``interval + timeout``
    (``dead_peer``, set on every accepted socket), and a peer that stops reading is the
    hub's slow-client rule's. So only connections that receive nothing regularly are
    pinged (unsubscribed ones, or every one when updates are rarer than pings), by one
    task for all: each client's pings are due ``interval`` after it connected and after
    each pong, so pings spread out instead of arriving in bursts.

    Args:
        hub: Whose sessions to ping, and who closes them.
        interval: Seconds between a client's pings.
        timeout: Seconds to wait for a pong; None to wait for ever.
    """

    def __init__(self, hub: Hub[Any], *, interval: float, timeout: float | None) -> None:
        self._hub = hub
        self.interval = interval
        self.timeout = timeout
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def dead_peer(self) -> tuple[float, float] | None:
        """(interval, timeout) for the kernel's dead-peer detection; None without a timeout."""
        return None if self.timeout is None else (self.interval, self.timeout)

    def schedule(self, session: Subscriber, now: float) -> None:
        """Make a new session's first ping due one interval from ``now``."""
        session.ping_due = now + self.interval

    def start(self) -> None:
        """Start the keepalive task."""
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="session-buddy-realtime keepalive")

    async def stop(self) -> None:
        """Stop the keepalive task; harmless when not started."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        hub, stopping = self._hub, self._stopping
        step = min(1.0, self.interval / 4)
        while not stopping.is_set():
            if not hub.sessions and not await hub.until_sessions(stopping):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await stopping.wait()
            await self.check(time.monotonic())

    async def check(self, now: float) -> None:
        """One pass over the sessions: ping whoever is due, close whoever stayed silent."""
        hub = self._hub
        # Updates at least once per ping interval (an edge's at most 1.5 intervals
        # apart) keep a subscriber's connection checked by the kernel.
        fed = self.timeout is not None and 1.5 * hub.interval < self.interval
        for session in list(hub.sessions.values()):
            if fed and session.subscribed:
                session.ping_due = max(session.ping_due, now + self.interval)
                continue
            try:
                await self._ping_one(session, now)
            except ConnectionClosed:
                continue
            except Exception as exc:  # one connection's trouble must not end keepalive
                hub.stats.record_error(f"keepalive: {exc!r}")
                logger.exception("keepalive failed for %s", session.remote)

    async def _ping_one(self, session: Subscriber, now: float) -> None:
        connection = session.connection
        if connection.protocol.state is not State.OPEN:
            return
        waiter = session.pong_waiter
        if waiter is not None:
            if not waiter.done():
                if self.timeout is not None and now - session.ping_sent_at > self.timeout:
                    session.pong_waiter = None
                    self._hub.close_later(
                        connection, CloseCode.INTERNAL_ERROR, "keepalive ping timeout"
                    )
                return
            session.pong_waiter = None
            session.ping_due = now + self.interval
        if now < session.ping_due:
            return
        if connection.transport.get_write_buffer_size() > _PING_BUFFER_LIMIT:
            return
        waiter = await connection.ping()
        waiter.add_done_callback(_retrieve)
        session.pong_waiter, session.ping_sent_at = waiter, now


def _retrieve(future: asyncio.Future[float]) -> None:
    # A pong that never comes ends with ConnectionClosed; read it so asyncio does not
    # report it as never retrieved.
    if not future.cancelled():
        future.exception()
