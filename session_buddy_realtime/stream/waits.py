"""Waiting on several things at once, bounded: the broadcaster's and requests' waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["first_of", "unless_set"]

T = TypeVar("T")


async def first_of(*events: asyncio.Event, deadline: float | None = None) -> None:
    """Return once any of ``events`` is set, or at ``deadline`` (the loop's time)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        pass
    finally:
        for waiter in waiters:
            waiter.cancel()


async def unless_set(event: asyncio.Event, work: Awaitable[T]) -> T | None:
    """The result of ``work``, or None if ``event`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()
