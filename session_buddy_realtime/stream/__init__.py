"""The stream server: the listener, the hub's fan-out, client sessions and keepalive.

``server.py`` composes the parts; ``hub.py`` fans the source's state out to
subscribers; ``session.py`` serves one connection; ``keepalive.py`` pings them;
``router.py`` and ``gate.py`` are the HTTP side before the upgrade; ``security.py``
holds the pure checks; ``stats.py`` the counters.
"""

from __future__ import annotations

from session_buddy_realtime.stream.server import RealTimeMetricsServer

__all__ = ["RealTimeMetricsServer"]
