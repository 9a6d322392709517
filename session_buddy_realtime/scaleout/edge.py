"""The edge's source: the producer's state, read from Redis, behind the ``Source`` seam.

A ``RedisSource`` subscribes to the state channel and keeps the newest state it has
accepted. Envelopes are accepted in (epoch, seq) order: a duplicate or a late one from an
older epoch is dropped, a gap is counted and the last state re-read, garbage is counted
and ignored. Each accepted envelope sets ``arrivals``, on which the edge's hub ticks, so
its clients get each state one Redis hop after the producer's own clients.

The skills its clients watch are announced in Redis (with an expiry) so the producer's
states carry their rows; a skill not in the newest state yet (a new subscription) is
asked of the producer directly. Redis down or the producer silent: clients stay
connected and the state says ``unavailable``; the source reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Set
from typing import TYPE_CHECKING, Any, Final

from session_buddy_realtime.data.source import (
    History,
    HistoryWindow,
    MetricsSnapshot,
    SkillNames,
    SourceState,
)
from session_buddy_realtime.scaleout import wire
from session_buddy_realtime.scaleout.asking import Questions
from session_buddy_realtime.scaleout.link import (
    Backoff,
    Keys,
    RedisTimings,
    first_contact,
    log_failure,
    new_identity,
    redacted_url,
    stay_connected,
)
from session_buddy_realtime.scaleout.received import Received
from session_buddy_realtime.scaleout.watching import ALL, Watching

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisSource"]

logger = logging.getLogger(__name__)

_FIRST_CONNECT_WAIT: Final = 3.0


class RedisSource:
    """A ``Source`` fed by a producer through Redis.

    Args:
        url: The Redis URL.
        keys: Where the stream lives in Redis.
        interval: The edge's update interval (its producer's, normally).
        timings: Watch, staleness and reconnection timings.
    """

    def __init__(self, url: str, *, keys: Keys, interval: float, timings: RedisTimings) -> None:
        self.url = url
        self.keys = keys
        self.interval = interval
        self.timings = timings
        self.identity = new_identity("edge")
        self.arrivals = asyncio.Event()
        """Set on every accepted envelope: the edge's hub ticks on it."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._connected = False
        self._down_since: float | None = None
        self._received = Received()
        self._questions = Questions(keys.requests, timings.reply_timeout)
        self._watching = Watching(keys, timings.watch_seconds, self._forget)
        self._asked: dict[str, float] = {}
        self._fetching: dict[str, asyncio.Future[None]] = {}  # rows asked for, by skill
        self._outdated = True  # the newest state may be old: none yet, or before an idle spell
        self._counts = {"invalid": 0, "reconnects": 0}
        self._backoff = Backoff(timings.reconnect_max)
        self._tried = asyncio.Event()
        """Set once the first connection attempt has succeeded or failed."""
        self._last_invalid: str | None = None
        self._last_error: str | None = None
        self._resync = False

    # The Source seam

    async def open(self) -> None:
        """Start following Redis. A refused password fails the start; an unreachable
        Redis does not (the stream says ``unavailable`` until it answers)."""
        self._last_error = await first_contact(self.url, name=self.identity)
        if self._last_error is not None:
            logger.warning(
                "Redis at %s is unreachable (%s); clients are told so until it answers",
                redacted_url(self.url),
                self._last_error,
            )
        self._stopping = asyncio.Event()
        self._down_since = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="session-buddy-realtime edge feed")
        # The first clients get the last state, not "connecting", when Redis answers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FIRST_CONNECT_WAIT):
                await self._tried.wait()

    async def close(self) -> None:
        """Stop following Redis; harmless when not open."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._questions.fail_all()

    async def read(self, skills: Set[str], within: float) -> MetricsSnapshot:
        """The newest state, with ``skills``' rows; what is not carried yet (a new skill, or
        everything after an idle spell, when the producer stopped publishing states) is
        asked of the producer, once for all callers, waiting up to ``within``."""
        now = time.monotonic()
        idle = self._watching.ask(skills, now)
        if idle or self._received.latest is None:
            self._outdated = True  # until a whole state arrives (a reply, or published)
        outage = self._outage(now)
        if outage is None:
            missing = {n for n in skills if not self._received.has_row(n, now, self.interval)}
            if missing or self._outdated:
                await self._rows_of(missing, self._outdated, within)
            outage = self._outage(time.monotonic())
            if outage is None and self._outdated:
                # Never the state from before an idle spell called current.
                outage = SourceState.UNAVAILABLE, "waiting for the producer's current state"
        return self._received.snapshot(skills, outage)

    async def _rows_of(self, skills: set[str], whole: bool, within: float) -> None:
        """Wait (up to ``within``) for the rows of ``skills`` (and a whole state), asking the
        producer for what nobody is asking already."""
        now = time.monotonic()
        wanted = skills | {ALL} if whole else skills
        new = {n for n in wanted if n not in self._fetching or self._fetching[n].done()}
        new = {n for n in new if now - self._asked.get(n, -1e9) > self.interval or n == ALL}
        if new:
            task = asyncio.ensure_future(self._fetch_rows(new - {ALL}, replace=ALL in new))
            for name in new:
                self._fetching[name] = task
        waits = {self._fetching[n] for n in wanted if n in self._fetching}
        if waits:
            await asyncio.wait(waits, timeout=within)

    async def history(self, skill: str | None, window: HistoryWindow, within: float) -> History:
        """The producer's history, asked for through Redis."""
        request = wire.Request(
            self._questions.new_id(), self.identity, "history", skill=skill,
            bucket_seconds=window.bucket_seconds, buckets=window.buckets,
        )  # fmt: skip
        reply = await self._questions.ask(self._client, request, within)
        if reply is not None:
            try:
                return wire.history_from_body(reply.body, window)
            except wire.WireError as exc:
                self._invalid(f"history reply: {exc}")
        state, message = self._unanswered()
        return History.empty(skill, window, window.start(time.time()), state, message)

    async def skill_names(self, query: str, limit: int, within: float) -> SkillNames:
        """The producer's skill names containing ``query``, asked for through Redis."""
        ident = self._questions.new_id()
        request = wire.Request(ident, self.identity, "skills", query=query, limit=limit)
        reply = await self._questions.ask(self._client, request, within)
        if reply is not None:
            try:
                return wire.names_from_body(reply.body, limit)
            except wire.WireError as exc:
                self._invalid(f"skills reply: {exc}")
        state, message = self._unanswered()
        return SkillNames(query, [], state, message, None)

    def describe(self) -> dict[str, Any]:
        """The feed's state in the shape of ``database`` in the status (no path, no queries)."""
        feed = self.feed_status()
        return {
            "path": None,
            "shared_connection": False,
            "state": feed["state"],
            "message": feed["message"],
            "queries": 0,
            "refreshes": 0,
        }

    def feed_status(self) -> dict[str, Any]:
        """The ``redis`` object of the status: the feed, the producer, and what was dropped."""
        now = time.monotonic()
        received = self._received
        outage = self._outage(now)
        latest = received.latest
        state, message = outage or (
            (None, None) if latest is None else (latest.state, latest.message)
        )
        stamp = received.stamp
        return {
            "role": "edge",
            "url": redacted_url(self.url),
            "prefix": self.keys.prefix,
            "identity": self.identity,
            "connected": self._connected,
            "state": None if state is None else state.value,
            "message": message,
            "producer": None if stamp is None else stamp.producer,
            "epoch": None if stamp is None else stamp.epoch,
            "seq": None if stamp is None else stamp.seq,
            "producer_interval": received.interval,
            "last_envelope_age_seconds": None
            if received.heard_at is None
            else round(now - received.heard_at, 3),
            "watched_skills": self._watching.skills,
            **received.counts,
            "invalid": self._counts["invalid"],
            "reconnects": self._counts["reconnects"],
            "requests_sent": self._questions.sent,
            "requests_unanswered": self._questions.unanswered,
            "last_invalid": self._last_invalid,
            "last_error": self._last_error,
        }

    # Following Redis

    async def _run(self) -> None:
        await stay_connected(
            self.url,
            name=self.identity,
            stopping=self._stopping,
            backoff=self._backoff,
            session=self._follow,
            lost=self._lost,
            failed=self._failed,
        )

    async def _follow(self, client: Redis) -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.states, self.keys.replies(self.identity))
            self._client = client
            await self._accept_last(client)
            if not self._connected:
                logger.info("following %s on Redis %s", self.keys.states, redacted_url(self.url))
            self._connected, self._down_since = True, None
            self._tried.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watching.announce(client, self._stopping))
                group.create_task(self._listen(client, pubsub))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _lost(self, client: Redis) -> None:
        if self._connected:
            self._down_since = time.monotonic()
        self._connected, self._client = False, None
        self._questions.fail_all()
        self._tried.set()
        self.arrivals.set()  # the clients hear of it at once, not at the next state

    def _failed(self, exc: BaseException, ours: bool) -> None:
        self._last_error = log_failure(
            self.url, exc, ours=ours, what="edge feed",
            then="clients are told so, retrying with backoff", last=self._last_error,
        )  # fmt: skip
        self._counts["reconnects"] += 1

    async def _listen(self, client: Redis, pubsub: Any) -> None:
        replies = self.keys.replies(self.identity).encode()
        while not self._stopping.is_set():
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(1.0, self._stale_after())
            )
            if message is not None and message.get("type") == "message":
                if message["channel"] == replies:
                    try:
                        self._questions.answer(message["data"])
                    except wire.WireError as exc:
                        self._invalid(f"reply: {exc}")
                else:
                    self._take(message["data"])
            elif self._quiet_for(time.monotonic()) > self._stale_after():
                self.arrivals.set()  # gone quiet: the hub's fallback cadence says so anyway
            if self._resync:
                self._resync = False
                await self._accept_last(client)

    async def _accept_last(self, client: Redis) -> None:
        raw = await client.get(self.keys.last)
        if raw is not None:
            self._take(raw, from_last=True)

    def _take(self, raw: bytes | str, *, from_last: bool = False) -> None:
        now = time.monotonic()
        try:
            published = wire.decode_published(raw)
            resync = self._received.accept(
                published,
                now,
                producer_gone=self._quiet_for(now) > self._stale_after(),
                from_last=from_last,
            )
        except wire.WireError as exc:
            self._invalid(str(exc))
            return
        if resync is None:
            return
        if published.snapshot is not None:
            self._outdated = False
        # Envelopes flow: the next trouble is logged again, and retried briefly at first.
        self._last_error = None
        self._backoff.reset()
        self._resync = self._resync or resync
        self.arrivals.set()

    def _stale_after(self) -> float:
        """Seconds without an envelope before the feed is called stale: ``stale_after`` of
        the slower of this edge's interval and its producer's."""
        return self.timings.stale_after * max(self.interval, self._received.interval or 0.0)

    def _quiet_for(self, now: float) -> float:
        heard = self._received.heard_at
        return math.inf if heard is None else now - heard

    def _invalid(self, reason: str) -> None:
        self._counts["invalid"] += 1
        if self._last_invalid is None:
            logger.warning("ignored an envelope from Redis: %s", reason)
        self._last_invalid = reason[:300]

    # Watched skills

    def _forget(self, name: str) -> None:
        self._asked.pop(name, None)
        self._fetching.pop(name, None)

    # Requests to the producer

    async def _fetch_rows(self, skills: set[str], *, replace: bool) -> None:
        now = time.monotonic()
        for name in skills:
            self._asked[name] = now
        names = sorted(skills)
        for start in range(0, max(1, len(names)), wire.MAX_REQUEST_SKILLS):
            batch = frozenset(names[start : start + wire.MAX_REQUEST_SKILLS])
            request = wire.Request(self._questions.new_id(), self.identity, "read", skills=batch)
            reply = await self._questions.ask(self._client, request, self.timings.reply_timeout)
            if reply is None:
                continue
            try:
                snapshot = wire.snapshot_from_body(reply.body)
            except wire.WireError as exc:
                self._invalid(f"read reply: {exc}")
                continue
            self._received.keep_rows(snapshot, batch, time.monotonic(), replace=replace)
            if replace:
                self._outdated = False

    # What clients are told

    def _outage(self, now: float) -> tuple[SourceState, str] | None:
        """``unavailable`` and why when the feed is not reaching this edge, else None."""
        where = redacted_url(self.url)
        if not self._connected and not self._tried.is_set():
            return SourceState.UNAVAILABLE, f"connecting to Redis at {where}"
        if not self._connected:
            since = "" if self._down_since is None else f" for {now - self._down_since:.0f} s"
            error = f" ({self._last_error})" if self._last_error else ""
            return SourceState.UNAVAILABLE, (
                f"Redis at {where} is unreachable{since}{error}; showing the last data received"
            )
        quiet = self._quiet_for(now)
        if quiet == math.inf:
            return SourceState.UNAVAILABLE, f"no producer has published on {where} yet"
        if quiet > self._stale_after():
            return SourceState.UNAVAILABLE, (
                f"no producer has published on {where} for {quiet:.0f} s; "
                f"showing the last data received"
            )
        return None

    def _unanswered(self) -> tuple[SourceState, str]:
        return self._outage(time.monotonic()) or (
            SourceState.UNAVAILABLE,
            "the producer did not answer in time",
        )
