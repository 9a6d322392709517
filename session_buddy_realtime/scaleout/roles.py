"""A server's part in scale-out: ``standalone``, ``producer`` (publishes) or ``edge`` (follows)."""

from __future__ import annotations

from typing import Any

from session_buddy_realtime.data.source import Source
from session_buddy_realtime.scaleout.edge import RedisSource
from session_buddy_realtime.scaleout.link import Keys, RedisTimings, check_prefix, check_redis_url
from session_buddy_realtime.scaleout.producer import Publisher, Ticks

__all__ = ["ScaleOut"]


class ScaleOut:
    """What a server does with Redis, if anything.

    Args:
        redis_url: None for a standalone server.
        edge: Follow the stream instead of publishing one.
        prefix: The stream's name in Redis.
        timings: Lease, watch, staleness and reconnection timings.
        interval: The server's update interval.

    Raises:
        ConfigError: the URL or the prefix cannot be used; the message names it.
    """

    def __init__(
        self,
        redis_url: str | None,
        edge: bool,
        prefix: str,
        timings: RedisTimings | None,
        interval: float,
    ) -> None:
        if edge and redis_url is None:
            raise ValueError("invalid edge: an edge needs redis_url")
        if redis_url is not None:
            check_redis_url(redis_url)
        self.url = redis_url
        self.keys = Keys(check_prefix(prefix))
        self.timings = timings or RedisTimings()
        self.interval = float(interval)
        self.role = "edge" if edge else "standalone" if redis_url is None else "producer"
        self.feed = (
            RedisSource(redis_url, keys=self.keys, interval=self.interval, timings=self.timings)
            if edge and redis_url is not None
            else None
        )
        self.publisher: Publisher | None = None

    def publish(self, source: Source, read_timeout: float, ticks: Ticks) -> None:
        """As a producer, publish what ``source`` (the server's own) reads, right after
        each tick of the server's hub (``ticks``) while it has clients."""
        if self.role == "producer" and self.url is not None:
            self.publisher = Publisher(
                source,
                self.url,
                keys=self.keys,
                interval=self.interval,
                read_timeout=read_timeout,
                timings=self.timings,
                ticks=ticks,
            )

    async def open(self) -> None:
        """Check the producer's Redis (a refused password fails the start)."""
        if self.publisher is not None:
            await self.publisher.open()

    def start(self) -> None:
        """Start publishing."""
        if self.publisher is not None:
            self.publisher.start()

    async def close(self) -> None:
        """Stop publishing and release the lease."""
        if self.publisher is not None:
            await self.publisher.close()

    def status(self) -> dict[str, Any] | None:
        """The ``redis`` object of the status; None when standalone."""
        if self.publisher is not None:
            return self.publisher.describe()
        return None if self.feed is None else self.feed.feed_status()
