"""The realtime server as a host service: start, stop, status and snapshot for one host.

This is the logic behind the MCP tools and auto-start, apart from any MCP wiring, so it
can be tested by direct calls. One ``RealtimeService`` lives in each host's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
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

__all__ = ["STATE_KEY", "RealtimeService", "service_for"]

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
            self._requested_port, self._note = first, None
            attempts = 1 if first == 0 else max(1, min(port_attempts, 65536 - first))
            taken: list[int] = []
            self._server = None
            for candidate in range(first, first + attempts):
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
                holder = await _describe_holder(host, taken[0])
                self._note = f"port {taken[0]} on {host} is taken ({holder})"
            if self._server is None:
                ports = ", ".join(str(p) for p in taken)
                message = (
                    f"port {ports} on {host} already in use ({holder}); "
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
                self._note = None
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
            autostart=dict(self._autostart),
            broker=None,
            plugin_errors=[
                f"{failure.plugin} in {failure.hook}: {failure.error}"
                for failure in self.host.plugin_errors
            ],
        )
        return status


async def _describe_holder(host: str, port: int) -> str:
    """Say what listens on a taken port: another realtime instance, or something else."""
    shown = f"[{host}]" if ":" in host else host
    url = f"ws://{shown}:{port}"
    try:
        async with asyncio.timeout(1.0), connect(url, open_timeout=1.0, close_timeout=0.2) as ws:
            welcome = json.loads(await ws.recv())
    except (OSError, TimeoutError, WebSocketException, ValueError):
        return "by another program"
    if isinstance(welcome, dict) and welcome.get("message") == WELCOME_TEXT:
        return f"another session-buddy-realtime instance is serving {url}"
    return "by another WebSocket server"
