"""Read-only connections to the skills database, none of which can keep the host alive.

``ReadConnection`` is all the reader needs of a connection: ``fetchall(sql, parameters)``
returning plain tuples, ``total_changes`` and ``close()``. Two implementations:

- ``AiosqliteReads``: the host's ``aiosqlite.Connection``, read through aiosqlite (its
  thread is the host's business). ``close()`` leaves it open.
- ``ThreadedReads``: a ``sqlite3.Connection`` read on a daemon thread of ours (one per
  connection, jobs through a queue, results handed back to the event loop with
  ``call_soon_threadsafe``), so neither the event loop nor the interpreter's exit ever
  waits on it. Either the source's own connection, opened read-only on a path (``close()``
  interrupts a running query and closes it), or the host's synchronous connection, only
  read: never interrupted, never closed, its ``row_factory`` untouched.

Every query runs on a cursor of its own with the default row factory and is fetched to
the end and closed before its rows are handed back, so nothing (statement, transaction,
lock) is held between two reads: the host's own use of a shared connection waits at most
for the one query running.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar, cast
from urllib.parse import quote

import aiosqlite

__all__ = [
    "AiosqliteReads",
    "HostConnection",
    "Parameters",
    "ReadConnection",
    "ThreadedReads",
    "change_token",
    "read_connection",
]

HostConnection: TypeAlias = aiosqlite.Connection | sqlite3.Connection
"""A host's open skills-database connection: asynchronous (aiosqlite) or synchronous."""
Parameters: TypeAlias = Sequence[Any] | Mapping[str, Any]
Row: TypeAlias = tuple[Any, ...]
_T = TypeVar("_T")
_CLOSED = "Cannot operate on a closed database."


class ReadConnection(Protocol):
    """The reads a ``MetricsReader`` makes; nothing here can write."""

    @property
    def total_changes(self) -> int:
        """Rows changed through this connection (as of its last query, for a threaded one)."""
        ...

    @property
    def in_transaction(self) -> bool:
        """True while the connection's owner has a transaction open (as of the last query)."""
        ...

    async def fetchall(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        """Run one query on a cursor of its own and return all its rows as tuples."""
        ...

    async def close(self) -> None:
        """Release the connection if it is the server's own; a host's stays open."""
        ...


ChangeToken: TypeAlias = tuple[int, ...]


async def change_token(db: ReadConnection) -> ChangeToken:
    """A value that changes whenever the data seen through ``db`` may have changed.

    ``PRAGMA data_version`` moves with other connections' commits, ``total_changes`` with
    writes through this one. Inside the host's open transaction on a shared connection
    its rows may still be rolled back, which moves neither, so the token is then new on
    every call: nothing read inside a transaction is reused.
    """
    rows = await db.fetchall("PRAGMA data_version")
    if db.in_transaction:
        return (int(rows[0][0]), db.total_changes, time.monotonic_ns())
    return (int(rows[0][0]), db.total_changes)


def read_connection(db: ReadConnection | aiosqlite.Connection) -> ReadConnection:
    """Return ``db`` as a ``ReadConnection`` (an aiosqlite connection gets wrapped)."""
    return AiosqliteReads(db) if isinstance(db, aiosqlite.Connection) else db


class AiosqliteReads:
    """Reads through an ``aiosqlite.Connection`` (the host's): never closed by us."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @property
    def total_changes(self) -> int:
        """Rows changed through the connection, as aiosqlite reports them."""
        return self._db.total_changes

    @property
    def in_transaction(self) -> bool:
        """True while the host has a transaction open on the connection."""
        return self._db.in_transaction

    async def fetchall(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        """Run one query on a cursor of our own, rows as plain tuples."""
        cursor = await self._db.cursor()
        try:
            cursor.row_factory = None
            await cursor.execute(sql, parameters)
            return cast(list[Row], list(await cursor.fetchall()))
        finally:
            await cursor.close()

    async def close(self) -> None:
        """Nothing to do: the connection is the host's."""


@dataclass(slots=True)
class _Stop:
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]


class ThreadedReads:
    """Reads through a ``sqlite3.Connection`` on a daemon thread of its own.

    Use ``open_read_only()`` for a connection of the server's own, ``shared()`` for the
    host's synchronous connection.
    """

    def __init__(self, connection: sqlite3.Connection | None = None, *, name: str) -> None:
        self._connection = connection
        self._owned = connection is None
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Stop] = queue.SimpleQueue()
        self._running = False  # a query is running on the thread
        self._closed = False
        self._total_changes = 0
        self._in_transaction = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @classmethod
    async def open_read_only(cls, path: Path, *, busy_timeout: float) -> ThreadedReads:
        """Open ``path`` read-only (never created) and check that it is a SQLite database.

        Args:
            path: The database file.
            busy_timeout: Seconds a query waits for another process's lock.

        Raises:
            sqlite3.Error: the file cannot be opened or is not a database.
        """
        reads = cls(name=f"session-buddy-realtime db {path.name}")
        try:
            await reads._call(lambda: reads._connect(path, busy_timeout))
            await reads.fetchall("PRAGMA schema_version")
        except BaseException:
            await reads.close()
            raise
        return reads

    @classmethod
    async def shared(cls, connection: sqlite3.Connection) -> ThreadedReads:
        """Read through the host's ``connection``, after checking our thread may use it.

        Raises:
            sqlite3.Error: the connection is closed, or bound to the thread that opened it
                (``check_same_thread=True``).
        """
        reads = cls(connection, name="session-buddy-realtime host db")
        try:
            # Touches no file: fails only for a closed or thread-bound connection.
            await reads._call(lambda: connection.cursor().close())
        except BaseException:
            await reads.close()
            raise
        return reads

    @property
    def total_changes(self) -> int:
        """Rows changed through the connection, as of the end of the last query."""
        return self._total_changes

    @property
    def in_transaction(self) -> bool:
        """True if a transaction was open on the connection at the end of the last query."""
        return self._in_transaction

    @property
    def running(self) -> bool:
        """True while a query runs on the thread."""
        return self._running

    async def fetchall(self, sql: str, parameters: Parameters = ()) -> list[Row]:
        """Run one query on the thread, on a cursor of our own; rows as plain tuples."""
        return await self._call(lambda: self._fetchall(sql, parameters))

    async def close(self) -> None:
        """Stop the thread; close the connection if it is ours. Harmless when closed.

        Our own connection's running query is interrupted, and ``close()`` returns once the
        connection is closed (a query waiting on a lock ends within its busy timeout). The
        host's connection is never interrupted nor closed, and a query running on it is
        not waited for: the thread ends when it finishes.
        """
        if self._closed:
            return
        self._closed = True
        running = self._running
        if self._owned and running and self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.interrupt()
        loop = asyncio.get_running_loop()
        stop = _Stop(loop, loop.create_future())
        self._jobs.put(stop)
        if self._owned or not running:
            await asyncio.shield(stop.done)

    def _connect(self, path: Path, busy_timeout: float) -> None:
        # mode=ro: never created, never written; autocommit: no transaction left open.
        uri = f"file:{quote(str(path.expanduser().resolve()))}?mode=ro"
        self._connection = sqlite3.connect(
            uri, uri=True, timeout=busy_timeout, isolation_level=None
        )

    def _fetchall(self, sql: str, parameters: Parameters) -> list[Row]:
        connection = self._connection
        if connection is None:
            raise sqlite3.ProgrammingError(_CLOSED)
        cursor = connection.cursor()
        try:
            cursor.row_factory = None
            rows: list[Row] = cursor.execute(sql, parameters).fetchall()
        finally:
            cursor.close()
        self._total_changes = connection.total_changes
        self._in_transaction = connection.in_transaction
        return rows

    async def _call(self, function: Callable[[], _T]) -> _T:
        if self._closed:
            raise sqlite3.ProgrammingError(_CLOSED)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def job() -> None:
            # Flagged before the check: close() after a cancel either sees the flag (and
            # interrupts) or the job sees the cancel (and does not run).
            # Cleared before the result is handed back: once its caller resumes, no
            # query of its runs any more (close() then has nothing to interrupt).
            self._running = True
            try:
                if future.cancelled():  # its caller gave up while it waited in the queue
                    return
                result = function()
            except Exception as exc:
                self._running = False
                _hand_back(loop, future, None, exc)
            else:
                self._running = False
                _hand_back(loop, future, result, None)
            finally:
                self._running = False

        self._jobs.put(job)
        return await future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, _Stop):
                break
            job()
        if self._owned and self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
        self._connection = None
        _hand_back(job.loop, job.done, None, None)


def _hand_back(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
