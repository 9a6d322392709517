"""Exceptions raised by the realtime server."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseNotFoundError",
    "PortInUseError",
    "RealtimeError",
    "ServerStartError",
]


class RealtimeError(Exception):
    """Base class of every error this package raises on purpose."""


class ServerStartError(RealtimeError):
    """The server could not start; nothing was left running."""


class DatabaseNotFoundError(ServerStartError, FileNotFoundError):
    """The skills database file does not exist (it is never created silently)."""


class PortInUseError(ServerStartError):
    """The address to listen on is already taken by another process."""


class ConfigError(RealtimeError, ValueError):
    """A setting is invalid; the message names it and says what is expected."""
