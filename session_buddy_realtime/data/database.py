"""``DatabaseSource``: the state from Session-Buddy's skills database, within a deadline.

It reads through one connection: its own, opened read-only on ``db_path`` (and reopened
when the file is replaced), or the host's, shared and only read. At most one read is in
flight; while it runs longer than the caller allows, callers get the last good data
flagged ``busy``, so the stream keeps its cadence whatever the database is doing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Set
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiosqlite

from session_buddy_realtime.data.detection import DetectionSettings
from session_buddy_realtime.data.reader import MetricsReader
from session_buddy_realtime.data.source import MetricsSnapshot, SourceState
from session_buddy_realtime.errors import DatabaseNotFoundError, ServerStartError

__all__ = ["DEFAULT_DB_PATH", "DatabaseSource"]

logger = logging.getLogger(__name__)

DEFAULT_DB_PATH: Final = Path(".session-buddy/skills.db")
_FIRST_READ_WAIT: Final = 5.0
_MAX_WANTED: Final = 4096
_LOCK_WAIT: Final = 1.0
"""Seconds a read of the source's own connection waits for another process's lock.

Longer than a tick's deadline (so a lock shows as ``busy``, then ``error`` if it lasts),
short enough that ``stop()``, which must let a running read finish before it can close
the connection, is not held up for SQLite's default 5 s."""


class DatabaseSource:
    """The skills database as the hub's source.

    Args:
        db_path: The database file; opened read-only, never created. Ignored with ``db``.
        db: An open connection (the host's) to read through instead: never written,
            never closed, its ``row_factory`` untouched.
        detection: Windows and thresholds of live anomaly detection.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        db: aiosqlite.Connection | None = None,
        detection: DetectionSettings | None = None,
    ) -> None:
        self.db_path = db_path
        self._external_db = db
        self._detection = detection or DetectionSettings()
        self._db: aiosqlite.Connection | None = None
        self._reader: MetricsReader | None = None
        self._identity: tuple[int, int] | None = None
        self._read_task: asyncio.Task[MetricsSnapshot] | None = None
        self._read_started = 0.0
        self._read_skills: frozenset[str] = frozenset()
        self._wanted: set[str] = set()
        self._busy_since: float | None = None
        self._replacement_seen: tuple[int, int] | None = None

    @property
    def owns_connection(self) -> bool:
        """True when the source opened its own connection (not the host's)."""
        return self._external_db is None

    async def open(self) -> None:
        """Open the database (or take the host's connection). Harmless when open.

        Raises:
            DatabaseNotFoundError: ``db_path`` does not exist (nothing is created).
            ServerStartError: the file is not a readable SQLite database.
        """
        if self._db is not None:
            return
        if self._external_db is not None:
            db = self._external_db
        else:
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
            try:
                self._identity = _file_identity(self.db_path)
            except OSError:
                self._identity = None
        self._db, self._busy_since = db, None
        self._reader = MetricsReader(db, detection=self._detection)

    async def close(self) -> None:
        """Cancel a read in flight and close the connection if it is the source's own."""
        task, self._read_task = self._read_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        db, self._db, self._reader = self._db, None, None
        if db is not None and self.owns_connection:
            await db.close()

    async def read(self, skills: Set[str], within: float) -> MetricsSnapshot:
        """Read the database, but never wait longer than ``within`` seconds.

        At most one read is in flight. A caller that finds one running waits for it
        until it has run for ``within`` seconds (or for its own deadline); only a read
        that has really not answered for that long makes the data ``busy``: callers then
        get the last good data flagged so, and the stream keeps its cadence.
        """
        return await self._read(skills, time.monotonic() + within, within)

    async def _read(self, skills: Set[str], deadline: float, within: float) -> MetricsSnapshot:
        reader = self._require_reader()
        if self.owns_connection and not await self._follow_file(reader):
            return reader.cached(skills)
        now = time.monotonic()
        if self._read_task is None or self._read_task.done():
            # One read for every caller that waited meanwhile: many clients subscribing at
            # once cost two reads, not one each in a row.
            self._read_skills, self._wanted = frozenset(skills | self._wanted), set()
            self._read_task = asyncio.create_task(reader.read(self._read_skills))
            self._read_started = now
        elif not skills <= self._read_skills and len(self._wanted) < _MAX_WANTED:
            self._wanted |= skills  # bounded, should a read stay stuck while clients ask
        task = self._read_task
        wait = min(deadline, self._read_started + within) - now
        if not reader.has_data:  # an empty "busy" snapshot would help nobody
            wait = max(wait, _FIRST_READ_WAIT)
        done = (await asyncio.wait({task}, timeout=wait))[0] if wait > 0 else set()
        if task.cancelled():  # dropped because the database file was replaced
            return self._require_reader().cached(skills)
        if task in done and not skills <= task.result().skills.keys():
            # The read that finished was started for other skills (by another caller).
            return await self._read(skills, max(deadline, time.monotonic()), within)
        if task in done:
            if self._busy_since is not None:
                logger.info("skills database answering again")
                self._busy_since = None
            return task.result()
        waited = time.monotonic() - self._read_started
        if waited < within:
            # Our own deadline came first, behind reads for other callers: the database
            # is not late, but our rows may not be read yet (never report them unknown).
            if reader.has_rows(skills):
                return reader.cached(skills)
            return reader.cached(
                skills,
                SourceState.BUSY,
                f"no answer within {within:.1f} s (reads for other clients came first); "
                f"showing the last good data",
            )
        if self._busy_since is None:
            self._busy_since = self._read_started
            logger.warning(
                "skills database read is taking longer than %.2f s: no answer for %.2f s "
                "(locked or slow); serving the last good data meanwhile",
                within,
                waited,
            )
        return reader.cached(
            skills,
            SourceState.BUSY,
            f"the database has not answered for {waited:.1f} s (locked by a writer, or a "
            f"slow query); showing the last good data",
        )

    def describe(self) -> dict[str, Any]:
        """Path, whether the connection is the host's, state and query counts."""
        described: dict[str, Any] = {
            "path": None if self._external_db is not None else str(self.db_path),
            "shared_connection": self._external_db is not None,
            "state": None,
            "message": None,
            "queries": 0,
            "refreshes": 0,
        }
        reader = self._reader
        if reader is None:
            return described
        busy_since = self._busy_since
        if busy_since is not None:
            state = SourceState.BUSY.value
            message: str | None = (
                f"a read has been running for {time.monotonic() - busy_since:.1f} s "
                f"(lock or slow query)"
            )
        else:
            state, message = reader.state.value, reader.message
        described.update(
            state=state, message=message, queries=reader.queries, refreshes=reader.refreshes
        )
        return described

    def _require_reader(self) -> MetricsReader:
        if self._reader is None:
            raise RuntimeError("the database source is not open")
        return self._reader

    async def _follow_file(self, reader: MetricsReader) -> bool:
        """For a database the source opened: notice the file deleted or replaced.

        Returns False while the file is missing. A replaced file (another inode) is
        reopened, so the stream follows a database recreated or restored from a backup
        (restore with SQLite's backup API, or remove the old ``-wal``/``-shm`` files first:
        SQLite would otherwise apply the old write-ahead log to the new file).
        """
        path = self.db_path
        try:
            identity = _file_identity(path)
        except OSError:
            reader.unavailable(f"the skills database file is gone: {path}")
            return False
        if identity == self._identity:
            return True
        if identity != self._replacement_seen:  # once per replacement, not every tick
            self._replacement_seen = identity
            logger.warning("skills database file %s was replaced; reopening it", path)
        try:
            db = await _connect_read_only(path)
        except sqlite3.Error as exc:
            reader.unavailable(f"cannot reopen the replaced database {path}: {exc}")
            return False
        old, self._db, self._identity = self._db, db, identity
        if self._read_task is not None and not self._read_task.done():
            self._read_task.cancel()
        self._read_task = None
        reader.use_connection(db)
        if old is not None:
            await old.close()
        return True


async def _connect_read_only(path: Path) -> aiosqlite.Connection:
    uri = f"file:{quote(str(path.expanduser().resolve()))}?mode=ro"  # noqa: ASYNC240
    return await aiosqlite.connect(uri, uri=True, timeout=_LOCK_WAIT)


def _file_identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return (info.st_dev, info.st_ino)
