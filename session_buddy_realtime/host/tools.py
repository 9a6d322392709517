"""The MCP tools: ``realtime_start``, ``realtime_stop``, ``realtime_status``, ``realtime_snapshot``.

The plugin's only module that imports ``mcp`` (the stdio host does too). Tools work on any
server object with the ``tool(...)`` decorator factory: mcp's ``MCPServer`` (mcp 2.x) or
``FastMCP`` (mcp 1.x), and the standalone FastMCP (3.x on mcp 1.x, 4.x on mcp 2.x). Inputs
are validated by their annotations; outputs are typed models (structured output); expected
failures are raised as the server's own ``ToolError`` so the client reads what to fix.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal, ParamSpec, Protocol, TypeVar

from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from session_buddy_realtime.errors import RealtimeError
from session_buddy_realtime.host.service import RealtimeService
from session_buddy_realtime.host.settings import HOST_PATTERN
from session_buddy_realtime.protocol import ProtocolError

__all__ = [
    "TOOL_NAMES",
    "Anomaly",
    "RealtimeSnapshot",
    "RealtimeStatus",
    "SkillRow",
    "ToolServer",
    "register_tools",
]

START: Final = "realtime_start"
STOP: Final = "realtime_stop"
STATUS: Final = "realtime_status"
SNAPSHOT: Final = "realtime_snapshot"
TOOL_NAMES: Final = (START, STOP, STATUS, SNAPSHOT)

P = ParamSpec("P")
R = TypeVar("R")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientInfo(_Model):
    """One connected WebSocket client."""

    remote: str = Field(description="Client address and port.")
    connected_for_seconds: float
    subscription: str | None = Field(
        description="'all', a skill name, or null if unsubscribed or not yet authenticated."
    )
    authenticated: bool = Field(description="True when the client presented a valid token.")
    messages_sent: int
    updates_dropped: int = Field(description="Updates skipped because the client was behind.")
    congested: bool = Field(description="True while the client is not keeping up.")


class DatabaseInfo(_Model):
    """The skills database the server reads."""

    path: str | None
    shared_connection: bool = Field(description="True when reading the host's own connection.")
    state: str | None = Field(description="ok, missing_tables, error or busy; null when stopped.")
    message: str | None
    queries: int
    refreshes: int


class AutostartInfo(_Model):
    """What auto-start did when the host launched."""

    enabled: bool | None
    outcome: str


class RealtimeStatus(_Model):
    """State of the realtime server of this host."""

    running: bool
    urls: list[str] = Field(description="WebSocket URLs dashboards connect to.")
    host: str | None
    port: int | None
    requested_port: int | None = Field(description="The port asked for, before any fallback.")
    note: str | None = Field(description="For example which port was taken and by what.")
    update_interval: float
    started_at: str | None
    uptime_seconds: float | None
    client_count: int
    clients: list[ClientInfo]
    connections: int = Field(description="Open TCP connections, handshakes included.")
    connections_total: int
    ticks: int
    idle_ticks: int = Field(description="Ticks with nobody subscribed (no database work).")
    ticks_skipped: int = Field(description="Ticks missed because one ran over the interval.")
    messages_sent: int
    updates_dropped: int
    clients_evicted: int
    last_tick_at: str | None
    last_tick_seconds: float | None
    errors: int
    last_error: str | None
    database: DatabaseInfo
    autostart: AutostartInfo
    auth_enabled: bool = Field(description="True when clients must present a token.")
    tls_enabled: bool = Field(description="True when serving wss:// (TLS).")
    auth_failures: int = Field(description="Clients closed for a wrong or missing token.")
    rate_limited: int = Field(description="Client messages refused by the rate limit.")
    refused: dict[str, int] = Field(
        description="Connections refused at the handshake, by reason (limits, Host, Origin, token)."
    )
    broker: str | None = Field(description="Scale-out broker state; null when not configured.")
    plugin_errors: list[str] = Field(description="Plugins of this host that failed.")


class SkillRow(_Model):
    """One skill's metrics, as in skill_metrics."""

    skill_name: str
    total_invocations: int
    completion_rate: float = Field(description="Percent of invocations that completed.")
    avg_duration_seconds: float | None
    completed_invocations: int
    last_invoked: str | None


class Anomaly(_Model):
    """An anomaly from skill_anomalies ('table') or from live detection ('live')."""

    skill_name: str
    detected_at: str
    anomaly_type: str
    deviation_score: float | None
    baseline_value: float | None
    observed_value: float | None
    metric: str | None = None
    source: Literal["table", "live"]


class MetricsData(_Model):
    """Top skills (or the one skill asked for) and anomalies."""

    top_skills: list[SkillRow]
    anomalies: list[Anomaly]


class SourceInfo(_Model):
    """Health of the database reading."""

    state: str
    stale: bool
    as_of: str | None
    message: str | None


class RealtimeSnapshot(_Model):
    """The metrics_update a dashboard subscribed to the same skill would receive now."""

    type: Literal["metrics_update"]
    timestamp: str
    skill: str | None
    data: MetricsData
    source: SourceInfo


def _annotations(title: str, *, read_only: bool, idempotent: bool) -> ToolAnnotations:
    # Built from the wire names so that both the mcp 1.x and 2.x models accept them.
    return ToolAnnotations.model_validate(
        {
            "title": title,
            "readOnlyHint": read_only,
            "destructiveHint": False,
            "idempotentHint": idempotent,
            "openWorldHint": False,
        }
    )


def _tool_error_class(mcp: Any) -> type[Exception]:
    """The exception whose message the given server passes on to the client."""
    if any(cls.__module__.split(".")[0] == "fastmcp" for cls in type(mcp).__mro__):
        from fastmcp.exceptions import ToolError as StandaloneToolError

        return StandaloneToolError
    try:
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:  # mcp 1.x
        from mcp.server.fastmcp.exceptions import (  # type: ignore[no-redef,import-not-found,unused-ignore]
            ToolError,
        )
    return ToolError


def _reported(
    error_class: type[Exception],
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Turn expected failures into the server's ToolError, keeping their message."""

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await function(*args, **kwargs)
            except (RealtimeError, ProtocolError) as exc:
                raise error_class(str(exc)) from exc

        return wrapper

    return decorate


HostName = Annotated[
    str | None,
    Field(
        description="Address to listen on, e.g. 'localhost' or '127.0.0.1' "
        "(default: SESSION_BUDDY_REALTIME_HOST or localhost).",
        min_length=1,
        max_length=253,
        pattern=f"^{HOST_PATTERN.pattern}$",
    ),
]
Port = Annotated[
    int | None,
    Field(
        description="Port to listen on, 0-65535; 0 picks a free one "
        "(default: SESSION_BUDDY_REALTIME_PORT or 8765).",
        ge=0,
        le=65535,
    ),
]
Interval = Annotated[
    float | None,
    Field(
        description="Seconds between updates, 0.05-3600 "
        "(default: SESSION_BUDDY_REALTIME_INTERVAL or 1.0).",
        ge=0.05,
        le=3600,
    ),
]
SkillName = Annotated[
    str | None,
    Field(
        description="A skill name to read one skill (any skill, not only the top 10); "
        "omit or null for the top 10 and all anomalies.",
        max_length=128,
    ),
]


class ToolServer(Protocol):
    """Any MCP server with the ``tool(...)`` decorator factory."""

    def tool(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], object]: ...


def register_tools(mcp: ToolServer, service: RealtimeService) -> None:
    """Add the four realtime tools to ``mcp`` (any server with ``tool(...)``)."""
    reported = _reported(_tool_error_class(mcp))

    @mcp.tool(
        name=START,
        description="Start the realtime WebSocket server that streams live skill metrics to "
        "dashboards, reading the host's skills database. Returns the status; when already "
        "running, returns the running status unchanged.",
        annotations=_annotations("Start realtime metrics", read_only=False, idempotent=True),
    )
    @reported
    async def realtime_start(
        host: HostName = None, port: Port = None, interval: Interval = None
    ) -> RealtimeStatus:
        return RealtimeStatus.model_validate(await service.start(host, port, interval))

    @mcp.tool(
        name=STOP,
        description="Stop the realtime WebSocket server, closing dashboard connections. "
        "Harmless when it is not running. Returns the status.",
        annotations=_annotations("Stop realtime metrics", read_only=False, idempotent=True),
    )
    @reported
    async def realtime_stop() -> RealtimeStatus:
        return RealtimeStatus.model_validate(await service.stop())

    @mcp.tool(
        name=STATUS,
        description="Report whether the realtime server runs, its URLs, uptime, interval, "
        "connected clients and their subscriptions, counters, last tick, last error, and the "
        "database state.",
        annotations=_annotations("Realtime metrics status", read_only=True, idempotent=True),
    )
    @reported
    async def realtime_status() -> RealtimeStatus:
        return RealtimeStatus.model_validate(service.status())

    @mcp.tool(
        name=SNAPSHOT,
        description="Read the live skill metrics now, exactly as a dashboard would receive "
        "them: the top 10 skills (or one skill) with completion rates and durations, and "
        "current anomalies. Needs the server running.",
        annotations=_annotations("Realtime metrics snapshot", read_only=True, idempotent=True),
    )
    @reported
    async def realtime_snapshot(skill: SkillName = None) -> RealtimeSnapshot:
        return RealtimeSnapshot.model_validate(await service.snapshot(skill))
