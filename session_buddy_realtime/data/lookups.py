"""History and skill-name search: read when a client asks, cached until the database changes.

Neither is ever read by the tick: a dashboard asks for its history once when it
connects, and for names as someone types, so an idle server still reads nothing. Each
answer is one bounded query (``HISTORY_SQL``: one row per bucket at most; the search: a
few dozen names), cached under the change token the reader uses (``PRAGMA data_version``
plus the connection's own changes): while the database is unchanged, asking again costs
one ``PRAGMA``. A history is computed from ``skill_invocation.invoked_at`` rather than
from states kept in memory, so it is complete right after a restart, and costs nothing
while nobody asks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast

from session_buddy_realtime.data.connection import ChangeToken, ReadConnection, change_token
from session_buddy_realtime.data.queries import (
    SKILL_SEARCH_SQL,
    history_parameters,
    history_sql,
    like_pattern,
    text_or_none,
)
from session_buddy_realtime.data.schema import failure_state
from session_buddy_realtime.data.source import History, HistoryWindow, SkillNames, SourceState
from session_buddy_realtime.protocol import ProtocolError, format_timestamp, validate_skill_name

__all__ = ["MAX_CACHED_LOOKUPS", "Lookups"]

MAX_CACHED_LOOKUPS: Final = 64
"""Answers kept (histories and searches, least recently asked dropped first)."""
_READ_ERRORS: Final = (sqlite3.Error, ValueError)
_T = TypeVar("_T", History, SkillNames)


class Lookups:
    """Histories and skill-name searches through one connection, cached by change token.

    Args:
        db: The connection the reader uses.
        clock: Returns the current Unix time; tests pass their own.
    """

    def __init__(self, db: ReadConnection, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: ChangeToken | None = None
        self._cache: OrderedDict[tuple[Any, ...], History | SkillNames] = OrderedDict()
        self.queries = 0
        """Number of data queries run (change checks not counted)."""

    async def history(self, skill: str | None, window: HistoryWindow, within: float) -> History:
        """Invocations per bucket over ``window`` (all skills, or ``skill``), the last one now.

        Waits at most ``within`` seconds; then, or on a database error, the buckets are
        empty and the state says why.
        """
        now = self._clock()
        start = window.start(now)

        async def compute() -> History:
            self.queries += 1
            rows = await self._db.fetchall(
                history_sql(one_skill=skill is not None),
                history_parameters(skill, start, window.bucket_seconds, window.buckets),
            )
            return History.from_rows(skill, window, start, rows, as_of=_stamp(now))

        def failed(state: SourceState, message: str) -> History:
            return History.empty(skill, window, start, state, message)

        key = ("history", skill, start, window.bucket_seconds, window.buckets)
        return await self._answer(key, compute, failed, within)

    async def skill_names(self, query: str, limit: int, within: float) -> SkillNames:
        """Names of ``skill_metrics`` containing ``query`` (ASCII letters in any case), the
        most invoked first, at most ``limit``; only names a client may subscribe to."""
        now = self._clock()

        async def compute() -> SkillNames:
            self.queries += 1
            # Twice the limit, so that a few names no client could send take no good one's place.
            rows = await self._db.fetchall(
                SKILL_SEARCH_SQL, {"pattern": like_pattern(query), "limit": 2 * limit}
            )
            names = [name for row in rows if (name := _subscribable(row[0])) is not None]
            return SkillNames(query, names[:limit], SourceState.OK, None, _stamp(now))

        def failed(state: SourceState, message: str) -> SkillNames:
            return SkillNames(query, [], state, message, None)

        return await self._answer(("skills", query, limit), compute, failed, within)

    def use_connection(self, db: ReadConnection) -> None:
        """Read through ``db`` from now on (the file was replaced): nothing cached is kept."""
        self._db, self._token = db, None
        self._cache.clear()

    async def _answer(
        self,
        key: tuple[Any, ...],
        compute: Callable[[], Awaitable[_T]],
        failed: Callable[[SourceState, str], _T],
        within: float,
    ) -> _T:
        try:
            async with asyncio.timeout(within):
                async with self._lock:
                    token = await change_token(self._db)
                    if token != self._token:
                        self._token = token
                        self._cache.clear()
                    cached = self._cache.get(key)
                    if cached is not None:
                        self._cache.move_to_end(key)
                        return cast(_T, cached)
                    answer = await compute()
                    self._cache[key] = answer
                    while len(self._cache) > MAX_CACHED_LOOKUPS:
                        self._cache.popitem(last=False)
                    return answer
        except TimeoutError:
            return failed(
                SourceState.BUSY,
                f"the database did not answer within {within:.1f} s (locked by a writer, "
                f"or a slow query)",
            )
        except _READ_ERRORS as exc:
            return failed(*await failure_state(self._db, exc))


def _subscribable(raw: object) -> str | None:
    name = text_or_none(raw)
    try:
        return validate_skill_name(name)
    except ProtocolError:
        return None


def _stamp(now: float) -> str:
    return format_timestamp(datetime.fromtimestamp(now, UTC))
