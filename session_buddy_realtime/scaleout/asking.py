"""An edge's questions to the producer: each request waits for its reply, briefly."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Final

from session_buddy_realtime.scaleout import wire

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Questions"]

MAX_PENDING: Final = 64
"""Requests in flight at most; more are not sent (the caller says the data is unavailable)."""


class Questions:
    """Requests to the producer in flight, by id.

    Args:
        channel: Where requests are published.
        reply_timeout: Longest wait for a reply.
    """

    def __init__(self, channel: str, reply_timeout: float) -> None:
        self.channel = channel
        self.reply_timeout = reply_timeout
        self.sent = 0
        self.unanswered = 0
        self._pending: dict[str, asyncio.Future[wire.Reply]] = {}
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        """An id for the next request (unique within this edge)."""
        return str(next(self._ids))

    async def ask(
        self, client: Redis | None, request: wire.Request, within: float
    ) -> wire.Reply | None:
        """Publish ``request`` and wait for its reply; None if none came within ``within``."""
        from redis.exceptions import RedisError

        if client is None or len(self._pending) >= MAX_PENDING:
            return None
        waiter: asyncio.Future[wire.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = waiter
        try:
            async with asyncio.timeout(min(within, self.reply_timeout)):
                self.sent += 1
                await client.publish(self.channel, wire.encode_request(request))
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # The client can swallow a cancellation that lands mid-command.
                    raise asyncio.CancelledError
                return await waiter
        except (TimeoutError, RedisError, OSError, ConnectionError):
            self.unanswered += 1
            return None
        finally:
            self._pending.pop(request.id, None)

    def answer(self, raw: bytes | str) -> None:
        """Hand a reply to its waiting request (a reply nobody waits for is dropped).

        Raises:
            WireError: the reply is not one this version reads.
        """
        reply = wire.decode_reply(raw)
        waiter = self._pending.get(reply.id)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def fail_all(self) -> None:
        """The connection is gone: every waiting request ends unanswered."""
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("Redis connection lost"))
        self._pending.clear()
