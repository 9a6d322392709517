"""``DatabaseSource``: the state from Session-Buddy's skills database, within a deadline.

It reads through one connection: its own, opened read-only on ``db_path`` on a daemon
thread (``connection.py``), or the host's (aiosqlite or synchronous ``sqlite3``), shared
and only read. A ``db_path`` that does not exist is waited for (state ``waiting``, one
``stat()`` per read), and the file is followed: opened when it appears, reopened when
replaced, waited for again when deleted. At most one read is in flight; while it runs
longer than the caller allows, callers get the last good data flagged ``busy``, so the
stream keeps its cadence whatever the database is doing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Set
from pathlib import Path
from typing import Any, Final

import aiosqlite

from session_buddy_realtime.data.connection import (
    AiosqliteReads,
    HostConnection,
    ReadConnection,
    ThreadedReads,
)
from session_buddy_realtime.data.detection import DetectionSettings
from session_buddy_realtime.data.lookups import Lookups
from session_buddy_realtime.data.reader import MetricsReader
from session_buddy_realtime.data.source import (
    History,
    HistoryWindow,
    MetricsSnapshot,
    SkillNames,
    SourceState,
)
from session_buddy_realtime.errors import ServerStartError

__all__ = ["DEFAULT_DB_PATH", "DatabaseSource", "HostConnection"]

logger = logging.getLogger(__name__)

DEFAULT_DB_PATH: Final = Path(".session-buddy/skills.db")
_FIRST_READ_WAIT: Final = 5.0
_MAX_WANTED: Final = 4096
_LOCK_WAIT: Final = 1.0
"""Seconds a read of the source's own connection waits for another process's lock.

Longer than a tick's deadline (so a lock shows as ``busy``, then ``error`` if it lasts),
short enough that ``stop()``, which must let a running read finish before it can close
the connection, is not held up for SQLite's default 5 s."""
_ABSENT: Final = (FileNotFoundError, NotADirectoryError)


class DatabaseSource:
    """The skills database as the hub's source.

    Args:
        db_path: The database file; opened read-only, never created. While it does not
            exist the source is ``waiting`` and opens it when it appears. Ignored with ``db``.
        db: An open connection (the host's) to read through instead, an
            ``aiosqlite.Connection`` or a ``sqlite3.Connection`` (opened with
            ``check_same_thread=False``; read on a thread of ours): never written, never
            closed, its ``row_factory`` untouched.
        detection: Windows and thresholds of live anomaly detection.

    Raises:
        TypeError: ``db`` is neither of the connections accepted.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        db: HostConnection | None = None,
        detection: DetectionSettings | None = None,
    ) -> None:
        if db is not None and not isinstance(db, aiosqlite.Connection | sqlite3.Connection):
            raise TypeError(
                f"db must be an open aiosqlite.Connection or sqlite3.Connection (the host's "
                f"skills database), not {type(db).__module__}.{type(db).__qualname__}"
            )
        self.db_path = db_path
        self._external_db = db
        self._detection = detection or DetectionSettings()
        self._opened = False
        self._db: ReadConnection | None = None
        self._reader: MetricsReader | None = None  # kept for its last good data
        self._lookups: Lookups | None = None
        self._identity: tuple[int, int] | None = None
        self._refused: tuple[int, ...] | None = None  # a file that failed to open, by stat
        self._had_file = False
        self._outside: tuple[SourceState, str] | None = None  # found outside SQLite
        self._read_task: asyncio.Task[MetricsSnapshot] | None = None
        self._read_started = 0.0
        self._read_skills: frozenset[str] = frozenset()
        self._wanted: set[str] = set()
        self._busy_since: float | None = None
        self._following = asyncio.Lock()  # one caller opens a new file, the others wait

    @property
    def owns_connection(self) -> bool:
        """True when the source opens its own connection (not the host's)."""
        return self._external_db is None

    async def open(self) -> None:
        """Take the host's connection, or open the database if it exists. Harmless when open.

        A ``db_path`` that does not exist is not an error: the source is ``waiting``.

        Raises:
            ServerStartError: the file is not a readable SQLite database, or the host's
                connection cannot be read from another thread (closed, thread-bound).
        """
        if self._opened:
            return
        self._busy_since = None
        host_db = self._external_db
        if isinstance(host_db, aiosqlite.Connection):
            self._use(AiosqliteReads(host_db))
        elif host_db is not None:
            self._use(await _share(host_db))
        else:
            path = self._path()
            try:
                info = path.stat()
            except _ABSENT:
                self._set_outside(
                    SourceState.WAITING,
                    f"waiting for the skills database at {path} (it does not exist yet)",
                )
            except OSError as exc:
                raise ServerStartError(f"cannot read skills database {path}: {exc}") from exc
            else:
                try:
                    db = await ThreadedReads.open_read_only(path, busy_timeout=_LOCK_WAIT)
                except sqlite3.Error as exc:
                    raise ServerStartError(f"cannot read skills database {path}: {exc}") from exc
                self._identity, self._had_file = (info.st_dev, info.st_ino), True
                self._use(db)
        self._opened = True

    async def close(self) -> None:
        """Cancel a read in flight and close the connection if it is the source's own."""
        task, self._read_task = self._read_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        db, self._db, self._reader, self._lookups = self._db, None, None, None
        self._opened, self._identity, self._refused, self._outside = False, None, None, None
        self._had_file = False
        if db is not None:
            await db.close()  # a host's connection stays open

    async def read(self, skills: Set[str], within: float) -> MetricsSnapshot:
        """Read the database, but never wait longer than ``within`` seconds.

        At most one read is in flight. A caller that finds one running waits for it
        until it has run for ``within`` seconds (or for its own deadline); only a read
        that has really not answered for that long makes the data ``busy``: callers then
        get the last good data flagged so, and the stream keeps its cadence.
        """
        return await self._read(skills, time.monotonic() + within, within)

    async def _read(self, skills: Set[str], deadline: float, within: float) -> MetricsSnapshot:
        if not self._opened:
            raise RuntimeError("the database source is not open")
        if self.owns_connection and not await self._follow_file():
            return self._unread(skills)
        reader = self._require_reader()
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
        if task.cancelled():  # dropped because the database file was replaced or deleted
            return self._unread(skills)
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

    async def history(self, skill: str | None, window: HistoryWindow, within: float) -> History:
        """Invocations per bucket of ``window`` from ``skill_invocation`` (see ``Lookups``)."""
        lookups = await self._readable_lookups()
        if lookups is not None:
            return await lookups.history(skill, window, within)
        state, message = self._outside or (SourceState.WAITING, None)
        return History.empty(skill, window, window.start(time.time()), state, message)

    async def skill_names(self, query: str, limit: int, within: float) -> SkillNames:
        """Names in ``skill_metrics`` containing ``query``, the most invoked first."""
        lookups = await self._readable_lookups()
        if lookups is not None:
            return await lookups.skill_names(query, limit, within)
        state, message = self._outside or (SourceState.WAITING, None)
        return SkillNames(query, [], state, message, None)

    async def _readable_lookups(self) -> Lookups | None:
        if not self._opened:
            raise RuntimeError("the database source is not open")
        if self.owns_connection and not await self._follow_file():
            return None
        return self._lookups

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
        if not self._opened:
            return described
        reader, busy_since = self._reader, self._busy_since
        state: SourceState | None = None
        message: str | None = None
        if self._outside is not None:
            state, message = self._outside
        elif busy_since is not None:
            state = SourceState.BUSY
            message = (
                f"a read has been running for {time.monotonic() - busy_since:.1f} s "
                f"(lock or slow query)"
            )
        elif reader is not None:
            state, message = reader.state, reader.message
        described.update(state=None if state is None else state.value, message=message)
        if reader is not None:
            lookups = 0 if self._lookups is None else self._lookups.queries
            described.update(queries=reader.queries + lookups, refreshes=reader.refreshes)
        return described

    def _require_reader(self) -> MetricsReader:
        if self._reader is None:
            raise RuntimeError("the database source is not open")
        return self._reader

    def _path(self) -> Path:
        return Path(os.path.abspath(self.db_path.expanduser()))

    def _use(self, db: ReadConnection) -> None:
        self._db = db
        if self._lookups is None:
            self._lookups = Lookups(db)
        else:
            self._lookups.use_connection(db)
        if self._reader is None:
            self._reader = MetricsReader(db, detection=self._detection)
        else:
            self._reader.use_connection(db)

    def _unread(self, skills: Set[str]) -> MetricsSnapshot:
        """What to serve without reading: the last good data flagged with the file's state."""
        state, message = self._outside or (None, None)
        if self._reader is not None:
            return self._reader.cached(skills, state, message)
        return MetricsSnapshot(
            top_skills=[],
            skills=dict.fromkeys(skills),
            anomalies=[],
            state=state or SourceState.WAITING,
            message=message,
            as_of=None,
        )

    def _set_outside(self, state: SourceState | None, message: str = "") -> None:
        """Record (and log once) a state found outside SQLite: no file, an unopenable one."""
        outside = None if state is None else (state, message)
        if outside == self._outside:
            return
        if outside is None:
            logger.info("skills database %s opened", self._path())
        elif state is SourceState.WAITING and not self._had_file:
            logger.info("%s; the stream says so until it appears", message)
        else:
            logger.warning("%s (serving the last good data until it recovers)", message)
        self._outside = outside

    async def _drop_connection(self) -> None:
        if self._read_task is not None and not self._read_task.done():
            self._read_task.cancel()
        self._read_task = None
        db, self._db, self._identity = self._db, None, None
        if db is not None:
            await db.close()

    async def _follow_file(self) -> bool:
        """For a database the source opens itself: follow the file. True if readable.

        One ``stat()`` per call. A missing file is waited for (a connection already open
        on it is closed); a new or replaced file (another inode) is opened, so the stream
        follows a database created later, recreated or restored from a backup (restore
        with SQLite's backup API, or remove the old ``-wal``/``-shm`` files first: SQLite
        would otherwise apply the old write-ahead log to the new file). A file that fails
        to open is tried again only once it changes.
        """
        async with self._following:
            return await self._check_file()

    async def _check_file(self) -> bool:
        path = self._path()
        try:
            info = path.stat()
        except _ABSENT:
            await self._drop_connection()
            if self._had_file:
                message = f"the skills database file is gone: {path}; waiting for it again"
            else:
                message = f"waiting for the skills database at {path} (it does not exist yet)"
            self._set_outside(SourceState.WAITING, message)
            return False
        except OSError as exc:
            self._set_outside(SourceState.ERROR, f"cannot reach the skills database {path}: {exc}")
            return False
        identity = (info.st_dev, info.st_ino)
        if self._db is not None and identity == self._identity:
            return True
        signature = (*identity, info.st_size, info.st_mtime_ns)
        if signature == self._refused:
            return False
        if self._db is not None:
            logger.warning("skills database file %s was replaced; reopening it", path)
        try:
            db = await ThreadedReads.open_read_only(path, busy_timeout=_LOCK_WAIT)
        except sqlite3.Error as exc:
            self._refused = signature
            self._set_outside(SourceState.ERROR, f"cannot open the skills database {path}: {exc}")
            return False
        await self._drop_connection()
        self._identity, self._refused, self._had_file = identity, None, True
        self._use(db)
        self._set_outside(None)
        return True


async def _share(db: sqlite3.Connection) -> ThreadedReads:
    """Read the host's synchronous connection on a thread of ours, if that is safe."""
    if sqlite3.threadsafety != 3:
        raise ServerStartError(
            f"cannot share the host's sqlite3.Connection: this Python's SQLite library is not "
            f"serialized (sqlite3.threadsafety is {sqlite3.threadsafety}, 3 is needed); pass "
            f"db_path instead"
        )
    try:
        return await ThreadedReads.shared(db)
    except sqlite3.Error as exc:
        raise ServerStartError(
            f"cannot read through the host's sqlite3.Connection: {exc} (it must be open, "
            f"and opened with check_same_thread=False)"
        ) from exc
