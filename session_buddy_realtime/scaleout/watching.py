"""What an edge's clients watch, announced in Redis with an expiry so producers include it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Final

from session_buddy_realtime.scaleout.link import ANNOUNCE, Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ALL", "Watching"]

ALL: Final = "all"
"""Stands for "somebody here reads at all" (the all-skills part of every state)."""


class Watching:
    """Skills (and ``ALL``) the hub asked for, when it last did, and their announcement.

    Args:
        keys: Where the watched set lives.
        seconds: How long an announcement lasts (renewed every third of it).
        forget: Called with each skill nobody asked for within ``seconds``.
    """

    def __init__(self, keys: Keys, seconds: float, forget: Callable[[str], None]) -> None:
        self.keys = keys
        self.seconds = seconds
        self.forget = forget
        self.asked: dict[str, float] = {}
        self.announced: set[str] = set()
        self._now = asyncio.Event()

    def ask(self, skills: Set[str], now: float) -> bool:
        """Record a read of ``skills``; True when nobody had read for ``seconds`` before."""
        last = self.asked.get(ALL)
        idle = last is None or now - last > self.seconds
        self.asked[ALL] = now
        for name in skills:
            self.asked[name] = now
        if not skills | {ALL} <= self.announced:
            self._now.set()
        return idle

    @property
    def skills(self) -> int:
        """How many skills are watched (``ALL`` not counted)."""
        return len(self.asked) - (ALL in self.asked)

    async def announce(self, client: Redis, stopping: asyncio.Event) -> None:
        """Announce what is watched now, on every new skill, and every third of ``seconds``."""
        self.announced = set()
        while not stopping.is_set():
            now = time.monotonic()
            for name, asked in list(self.asked.items()):
                if now - asked > self.seconds:
                    del self.asked[name]
                    self.forget(name)
            if self.asked:
                members = [ALL if n == ALL else f"skill:{n}" for n in self.asked]
                ttl = round(self.seconds * 1000)
                await client.eval(ANNOUNCE, 1, self.keys.watch, ttl, *members)
                self.announced = set(self.asked)
            self._now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.seconds / 3):
                    await self._now.wait()
