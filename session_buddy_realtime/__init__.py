"""Live Session-Buddy skill metrics over WebSocket, as a Session-Buddy plugin."""

from __future__ import annotations

from session_buddy_realtime._version import __version__
from session_buddy_realtime.errors import (
    DatabaseNotFoundError,
    PortInUseError,
    RealtimeError,
    ServerStartError,
)
from session_buddy_realtime.stream.server import RealTimeMetricsServer

__all__ = [
    "DatabaseNotFoundError",
    "PortInUseError",
    "RealTimeMetricsServer",
    "RealtimeError",
    "ServerStartError",
    "__version__",
]
