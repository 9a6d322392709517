"""The realtime server as a host service: start, stop, status and snapshot for one host.

This is the logic behind the MCP tools and auto-start, apart from any MCP wiring, so it
can be tested by direct calls. One ``RealtimeService`` lives in each host's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from session_buddy_realtime.errors import (
    ConfigError,
    DatabaseNotFoundError,
    PortInUseError,
    RealtimeError,
)
from session_buddy_realtime.hookspecs import HostContext
from session_buddy_realtime.host.settings import RealtimeSettings, load_settings
from session_buddy_realtime.protocol import WELCOME_TEXT, format_timestamp
from session_buddy_realtime.stream.server import RealTimeMetricsServer

__all__ = ["STATE_KEY", "PortHolder", "RealtimeService", "probe_port_holder", "service_for"]

logger = logging.getLogger(__name__)

STATE_KEY = "session_buddy_realtime"


def service_for(host: HostContext) -> RealtimeService:
    """Return the host's service, creating it on first use."""
    service = host.state.get(STATE_KEY)
    if not isinstance(service, RealtimeService):
        service = RealtimeService(host)
        host.state[STATE_KEY] = service
    return service


class RealtimeService:
    """Owns at most one ``RealTimeMetricsServer`` for a host, on the host's connection."""

    def __init__(self, host: HostContext) -> None:
        self.host = host
        self._server: RealTimeMetricsServer | None = None
        self._lock = asyncio.Lock()
        self._note: str | None = None
        self._last_error: str | None = None
        self._autostart: dict[str, Any] = {"enabled": None, "outcome": "not attempted"}
        self._requested_port: int | None = None
        self._holder: PortHolder | None = None

    @property
    def settings(self) -> RealtimeSettings:
        """The host's settings, checked (raises ``ConfigError`` naming a bad one)."""
        return load_settings(self.host.settings)

    @property
    def server(self) -> RealTimeMetricsServer | None:
        """The running server, if any."""
        return self._server if self._server is not None and self._server.running else None

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        interval: float | None = None,
        redis_url: str | None = None,
        *,
        port_attempts: int = 1,
    ) -> dict[str, Any]:
        """Start the server (unless running) and return the status.

        Unset arguments come from the settings. With ``port_attempts`` > 1, a taken port
        is followed by the next ones; the status notes which port was taken and by what.

        Raises:
            PortInUseError: every port tried is taken; the message names them.
            RealtimeError: the server could not start (no database, bad settings).
        """
        async with self._lock:
            if self._server is not None and self._server.running:
                return self.status()
            settings = self.settings
            host = host or settings.host
            first = settings.port if port is None else port
            interval = settings.interval if interval is None else interval
            options = settings.server_options()
            if redis_url is not None:
                options["redis_url"] = redis_url
            self._requested_port, self._note, self._holder = first, None, None
            if first in self.host.host_ports:
                message = (
                    f"port {first} is the host's own (it serves MCP there); pass another "
                    f"port, or port 0 for any free one"
                )
                self._last_error = f"{format_timestamp()} {message}"
                raise PortInUseError(message)
            attempts = 1 if first == 0 else max(1, min(port_attempts, 65536 - first))
            # The host's own ports are skipped, not counted as attempts.
            candidates = [
                port
                for port in range(first, min(first + attempts + len(self.host.host_ports), 65536))
                if port not in self.host.host_ports
            ][:attempts]
            taken: list[int] = []
            self._server = None
            for candidate in candidates:
                server = self._make_server(host, candidate, interval, options)
                try:
                    await server.start()
                except PortInUseError:
                    taken.append(candidate)
                    continue
                except RealtimeError as exc:
                    self._last_error = f"{format_timestamp()} {exc}"
                    raise
                self._server = server
                self._last_error = None
                break
            if taken:
                self._holder = await probe_port_holder(host, taken[0])
                self._note = f"port {taken[0]} on {host} is taken ({self._holder.description})"
            if self._server is None:
                assert self._holder is not None
                ports = ", ".join(str(p) for p in taken)
                message = (
                    f"port {ports} on {host} already in use ({self._holder.description}); "
                    f"pass another port, or port 0 for any free one"
                )
                self._last_error = f"{format_timestamp()} {message}"
                raise PortInUseError(message)
            if taken:
                self._note = f"{self._note}; listening on port {self._server.port} instead"
            logger.info("realtime server started on %s", ", ".join(self._server.urls))
            return self.status()

    def _make_server(
        self, host: str, port: int, interval: float, options: dict[str, Any]
    ) -> RealTimeMetricsServer:
        if self.host.db is not None:
            return RealTimeMetricsServer(
                host, port, update_interval=interval, db=self.host.db, **options
            )
        if self.host.db_path is not None:
            return RealTimeMetricsServer(
                host, port, self.host.db_path, update_interval=interval, **options
            )
        raise DatabaseNotFoundError("the host has no skills database open and no path to one")

    async def stop(self) -> dict[str, Any]:
        """Stop the server if it runs (harmless otherwise) and return the status."""
        async with self._lock:
            if self._server is not None and self._server.running:
                await self._server.stop()
                self._note, self._holder = None, None
                logger.info("realtime server stopped")
            return self.status()

    async def autostart(self) -> None:
        """Start on host launch if the settings allow; never raises for a taken port."""
        try:
            settings = self.settings
        except ConfigError as exc:
            self._autostart = {"enabled": None, "outcome": f"failed: {exc}"}
            self._last_error = f"{format_timestamp()} {exc}"
            raise
        self._autostart = {"enabled": settings.autostart, "outcome": "disabled"}
        if not settings.autostart:
            return
        try:
            await self.start(port_attempts=settings.port_attempts)
        except RealtimeError as exc:
            self._autostart["outcome"] = f"failed: {exc}"
            logger.warning("realtime auto-start failed: %s", exc)
            return
        self._autostart["outcome"] = "started"

    async def snapshot(self, skill: str | None = None) -> dict[str, Any]:
        """Return what a dashboard subscribed to ``skill`` would receive now."""
        if self._server is None or not self._server.running:
            raise RealtimeError(
                "the realtime server is not running; start it with realtime_start first"
            )
        return await self._server.snapshot(skill)

    def status(self) -> dict[str, Any]:
        """Return the server status plus the plugin's view (auto-start, notes, features)."""
        if self._server is not None:
            status = self._server.status()
        else:
            # Never started: the shape of a stopped server's status, with nothing counted.
            try:
                settings = self.settings
                shape = RealTimeMetricsServer(
                    port=0, update_interval=settings.interval, **settings.server_options()
                )
            except ValueError:  # a bad setting (ConfigError is one); shown in last_error
                shape = RealTimeMetricsServer(port=0)
            status = shape.status()
            status.update(port=None, host=None)
            status["database"]["path"] = None
            status["database"]["shared_connection"] = self.host.db is not None
        if status["last_error"] is None:
            status["last_error"] = self._last_error
        if self.host.db_path is not None:
            status["database"]["path"] = str(self.host.db_path.expanduser().resolve())
        status.update(
            requested_port=self._requested_port,
            note=self._note,
            port_holder=None if self._holder is None else self._holder.as_dict(),
            autostart=dict(self._autostart),
            plugin_errors=[
                f"{failure.plugin} in {failure.hook}: {failure.error}"
                for failure in self.host.plugin_errors
            ],
        )
        return status


@dataclass(frozen=True, slots=True)
class PortHolder:
    """What listens on a port that a start found taken."""

    port: int
    kind: str
    """``session-buddy-realtime``, ``session-buddy`` (its own realtime server), ``websocket``
    (another WebSocket server) or ``other`` (anything else, or no answer within a second)."""
    server_version: str | None
    description: str

    def as_dict(self) -> dict[str, Any]:
        """The ``port_holder`` object of the status."""
        return {"port": self.port, "kind": self.kind, "server_version": self.server_version}


async def probe_port_holder(host: str, port: int) -> PortHolder:
    """Find out what listens on a taken port, from its WebSocket welcome (a second at most).

    Ours and Session-Buddy's own realtime server send the same welcome text; only ours
    says its ``server_version``.
    """
    shown = f"[{host}]" if ":" in host else host
    url = f"ws://{shown}:{port}"
    try:
        async with asyncio.timeout(1.0), connect(url, open_timeout=1.0, close_timeout=0.2) as ws:
            welcome = json.loads(await ws.recv())
    except (OSError, TimeoutError, WebSocketException, ValueError):
        return PortHolder(port, "other", None, "by another program")
    if not isinstance(welcome, dict) or welcome.get("message") != WELCOME_TEXT:
        return PortHolder(port, "websocket", None, "by another WebSocket server")
    version = welcome.get("server_version")
    if isinstance(version, str) and version:
        shown_version = version[:40]
        return PortHolder(
            port,
            "session-buddy-realtime",
            shown_version,
            f"another session-buddy-realtime instance ({shown_version}) is serving {url}",
        )
    return PortHolder(
        port, "session-buddy", None, f"Session-Buddy's own realtime server is serving {url}"
    )
