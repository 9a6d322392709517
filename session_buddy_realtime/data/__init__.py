"""The data side: where the stream's state comes from.

``source.py`` is the seam (``Source``, ``MetricsSnapshot``); ``database.py`` implements
it over Session-Buddy's skills database through ``reader.py`` (cached reads on one
connection), ``connection.py`` (read-only connections: the host's aiosqlite one, or a
``sqlite3`` one on a daemon thread), ``queries.py`` (the SQL and row conversions) and
``detection.py`` (live anomalies). ``schema.py`` is the DDL of the tables read, and
``demo.py`` the demo data.
"""

from __future__ import annotations

from session_buddy_realtime.data.source import MetricsSnapshot, Source, SourceState

__all__ = ["MetricsSnapshot", "Source", "SourceState"]
