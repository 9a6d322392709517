"""The producer: a server's state published through Redis, by one lease holder at a time.

Beside the server's own clients, a ``Publisher`` takes (or renews) the lease every
``renew_every`` seconds. While it holds it, each tick it reads the watched skills that
edges announced, reads the source once for them, and publishes a ``state`` envelope when
that differs from the last one, else a ``heartbeat``. No edge watching means no read of
the database at all: the heartbeat alone goes out. It also answers edges' requests
(a new subscription's row, a history, a skill search) while it holds the lease.
Several producers on one database are common (a host process per client): the others
wait, trying the lease, and the first to find it expired takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from session_buddy_realtime.data.source import MetricsSnapshot, Source
from session_buddy_realtime.scaleout import wire
from session_buddy_realtime.scaleout.link import (
    CLAIM_LEASE,
    PUBLISH_HELD,
    RELEASE_LEASE,
    WATCHED,
    Backoff,
    Keys,
    RedisTimings,
    as_text,
    first_contact,
    log_failure,
    new_identity,
    redacted_url,
    stay_connected,
    wait_or_stop,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Publisher", "Ticks"]

logger = logging.getLogger(__name__)

LAST_KEPT_SECONDS: Final = 3600
"""How long the last state stays readable for edges that connect later."""
MAX_CONCURRENT_REQUESTS: Final = 16


class Ticks(Protocol):
    """What the publisher sees of the server's hub."""

    ticked: asyncio.Event
    """Set after each tick."""
    last_read: MetricsSnapshot | None
    """What the last tick read, if it read."""
    watched_elsewhere: frozenset[str]
    """Skills every tick reads besides the hub's own subscribers'."""


class Publisher:
    """Publishes ``source``'s state to ``url`` under the stream's lease.

    Args:
        source: The server's source (the database one), shared with its hub.
        url: The Redis URL.
        keys: Where the stream lives in Redis.
        interval: Seconds between publications (the server's update interval).
        read_timeout: How long a publication waits for the source.
        timings: Lease, watch and reconnection timings.
        ticks: The server's own hub: while the server has clients, the publisher publishes
            right after each of its ticks the very state that tick read (reading the
            skills edges watch too); on its own schedule otherwise.
    """

    def __init__(
        self,
        source: Source,
        url: str,
        *,
        keys: Keys,
        interval: float,
        read_timeout: float,
        timings: RedisTimings,
        ticks: Ticks | None = None,
    ) -> None:
        self.source = source
        self.ticks = ticks
        self.url = url
        self.keys = keys
        self.interval = interval
        self.read_timeout = read_timeout
        self.timings = timings
        self.identity = new_identity("producer")
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._connected = False
        self._held_epoch: int | None = None
        self._epoch: int | None = None
        self._holder: str | None = None
        self._seq = 0
        self._last_body: bytes | None = None
        self._watched = 0
        self._counts = {
            "states_published": 0,
            "heartbeats_published": 0,
            "requests_answered": 0,
            "requests_refused": 0,
            "invalid_requests": 0,
            "reconnects": 0,
        }
        self._last_error: str | None = None
        self._backoff = Backoff(timings.reconnect_max)
        """Reset only once the lease is claimed: a Redis that answers PING but refuses the
        scripts (an ACL) is retried with backoff, not ten times a second."""

    async def open(self) -> None:
        """Check the URL once: a refused password fails the start; an unreachable Redis
        does not (the publisher keeps trying, and the server serves its own clients)."""
        self._last_error = await first_contact(self.url, name=self.identity)
        if self._last_error is not None:
            logger.warning(
                "Redis at %s is unreachable (%s); serving local clients and retrying",
                redacted_url(self.url),
                self._last_error,
            )

    def start(self) -> None:
        """Start publishing in the background."""
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="session-buddy-realtime publisher")

    async def close(self) -> None:
        """Stop publishing and hand the lease over at once (released, not left to expire)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._unwatch()

    def _unwatch(self) -> None:
        if self.ticks is not None:
            self.ticks.watched_elsewhere = frozenset()

    def describe(self) -> dict[str, Any]:
        """The ``redis`` object of the status."""
        return {
            "role": "producer",
            "url": redacted_url(self.url),
            "prefix": self.keys.prefix,
            "identity": self.identity,
            "connected": self._connected,
            "lease": {
                "held": self._held_epoch is not None,
                "holder": self.identity if self._held_epoch is not None else self._holder,
                "epoch": self._held_epoch,
            },
            "watched_skills": self._watched,
            "seq": self._seq,
            **self._counts,
            "last_error": self._last_error,
        }

    # The loop

    async def _run(self) -> None:
        await stay_connected(
            self.url,
            name=self.identity,
            stopping=self._stopping,
            backoff=self._backoff,
            session=self._connected_session,
            lost=self._lost,
            failed=self._failed,
        )

    async def _connected_session(self, client: Redis) -> None:
        await client.ping()
        self._connected = True
        await self._serve(client)

    async def _lost(self, client: Redis) -> None:
        self._connected, self._held_epoch = False, None
        await self._release(client)
        await self._drain_requests()

    def _failed(self, exc: BaseException, ours: bool) -> None:
        self._last_error = log_failure(
            self.url, exc, ours=ours, what="publisher", then="retrying with backoff",
            last=self._last_error,
        )  # fmt: skip
        self._counts["reconnects"] += 1

    async def _serve(self, client: Redis) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._answer_requests(client))
            group.create_task(self._publish_loop(client))

    async def _publish_loop(self, client: Redis) -> None:
        loop = asyncio.get_running_loop()
        claim = client.register_script(CLAIM_LEASE)
        ticked = None if self.ticks is None else self.ticks.ticked
        next_claim = next_publish = loop.time()
        while not self._stopping.is_set():
            now = loop.time()
            if now >= next_claim:
                await self._claim(claim)
                next_claim = now + self.timings.renew_every
            paced = ticked is not None and ticked.is_set()
            if ticked is not None:
                ticked.clear()
            if self._held_epoch is not None and (paced or now >= next_publish):
                await self._publish(client, paced=paced)
                if paced:
                    # Right after the server's own tick: its clients and the edges' get each
                    # state one Redis hop apart. The timer only takes over if ticks stop.
                    next_publish = now + 1.5 * self.interval
                else:
                    next_publish += self.interval
                    if next_publish <= loop.time():  # overran: skip the missed slots
                        next_publish = loop.time() + self.interval
            wake = min(next_claim, next_publish) if self._held_epoch is not None else next_claim
            if await wait_or_stop(self._stopping, wake - loop.time(), also=ticked):
                return

    async def _claim(self, claim: Any) -> None:
        ttl = round(self.timings.lease_seconds * 1000)
        held, value = await claim(
            keys=[self.keys.lease, self.keys.epoch], args=[self.identity, ttl]
        )
        self._backoff.reset()
        if self._last_error is not None and self._connected:
            logger.info("Redis at %s works again", redacted_url(self.url))
            self._last_error = None
        if held:
            epoch = int(value)
            if self._held_epoch is None:
                logger.info("publishing to Redis as %s (epoch %d)", self.identity, epoch)
                self._last_body = None  # publish a whole state first, whatever came before
            if epoch != self._epoch:
                # The sequence restarts only with a new epoch: a lease kept across a lost
                # connection goes on numbering, or edges would drop what follows as old.
                self._epoch, self._seq = epoch, 0
            self._held_epoch, self._holder = epoch, self.identity
        else:
            if self._held_epoch is not None:
                logger.warning("lost the Redis lease to %s", as_text(value))
            self._held_epoch, self._holder = None, as_text(value)
            self._unwatch()

    async def _publish(self, client: Redis, *, paced: bool) -> None:
        epoch = self._held_epoch
        assert epoch is not None
        # One more than the limit: ``all`` is a member too. The latest announced first.
        limit = wire.MAX_WATCHED + 1
        members = [as_text(m) for m in await client.eval(WATCHED, 1, self.keys.watch, limit)]
        names = [m.removeprefix("skill:") for m in members if m.startswith("skill:")]
        skills = {name for name in names if wire.is_skill_name(name)}
        self._watched = len(skills)
        if self.ticks is not None:
            self.ticks.watched_elsewhere = frozenset(skills)  # the next tick reads them too
        envelope: bytes | None = None
        body: bytes | None = None
        self._seq += 1
        stamp = wire.Stamp(epoch, self._seq, self.identity)
        if members:
            shared = None if self.ticks is None or not paced else self.ticks.last_read
            if shared is not None and skills <= shared.skills.keys():
                snapshot = shared  # the very state the server's own clients were just sent
            else:  # the source re-queries only when the data changed
                snapshot = await self.source.read(skills, self.read_timeout)
            body = wire.encode_body(wire.state_body(snapshot, skills))
            if body != self._last_body:
                envelope = wire.encode_state(body, stamp, self.interval, time.time())
        if envelope is None:
            envelope, keep = wire.encode_heartbeat(stamp, self.interval, time.time()), "0"
        else:
            keep = "1"
        published = await client.eval(
            PUBLISH_HELD,
            2,
            self.keys.lease,
            self.keys.last,
            self.identity,
            envelope,
            keep,
            LAST_KEPT_SECONDS,
            self.keys.states,
        )
        if published == -1:
            self._held_epoch = None
            logger.warning("the Redis lease expired before a publication; not published")
            return
        if keep == "1":
            self._last_body = body
            self._counts["states_published"] += 1
        else:
            self._counts["heartbeats_published"] += 1

    # Requests from edges

    async def _answer_requests(self, client: Redis) -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.requests)
            while not self._stopping.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                self._take_request(client, message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _take_request(self, client: Redis, raw: bytes) -> None:
        if self._held_epoch is None:
            return  # the holder answers; others stay quiet
        try:
            request = wire.decode_request(raw)
        except wire.WireError as exc:
            self._counts["invalid_requests"] += 1
            logger.debug("ignored a request from Redis: %s", exc)
            return
        if len(self._requests) >= MAX_CONCURRENT_REQUESTS:
            self._counts["requests_refused"] += 1
            return
        task = asyncio.create_task(self._answer(client, request))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _answer(self, client: Redis, request: wire.Request) -> None:
        from redis.exceptions import RedisError

        epoch = self._held_epoch
        if epoch is None:
            return
        within = self.timings.reply_timeout * 0.8
        body: dict[str, Any]
        if request.op == "read":
            snapshot = await self.source.read(request.skills, min(within, self.read_timeout))
            body = wire.state_body(snapshot, request.skills)
        elif request.op == "history":
            body = wire.history_body(
                await self.source.history(request.skill, request.window, within)
            )
        else:
            names = await self.source.skill_names(request.query, request.limit, within)
            body = wire.names_body(names)
        reply = wire.encode_reply(
            request.id, wire.Stamp(epoch, self._seq or 1, self.identity), body
        )
        try:
            await client.publish(self.keys.replies(request.edge), reply)
        except (RedisError, OSError):
            return  # the connection's loop notices and reconnects
        self._counts["requests_answered"] += 1

    async def _drain_requests(self) -> None:
        for task in list(self._requests):
            task.cancel()
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)

    async def _release(self, client: Redis) -> None:
        if not self._stopping.is_set():
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await client.eval(RELEASE_LEASE, 1, self.keys.lease, self.identity)
