"""The data side: where the stream's state comes from.

``source.py`` is the seam (``Source``, ``MetricsSnapshot``); ``database.py`` implements
it over Session-Buddy's skills database through ``reader.py`` (cached reads on one
connection), ``queries.py`` (the SQL and row conversions) and ``detection.py`` (live
anomalies). ``schema.py`` is the DDL of the tables read, and ``demo.py`` the demo data.
"""

from __future__ import annotations

from session_buddy_realtime.data.source import MetricsSnapshot, Source, SourceState

__all__ = ["MetricsSnapshot", "Source", "SourceState"]
