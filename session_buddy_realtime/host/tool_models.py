"""The MCP tools' outputs: typed models, so clients get structured output with a schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Anomaly",
    "AutostartInfo",
    "ClientInfo",
    "DatabaseInfo",
    "LeaseInfo",
    "MetricsData",
    "PortHolderInfo",
    "RealtimeSnapshot",
    "RealtimeStatus",
    "RedisInfo",
    "SkillRow",
    "SourceInfo",
]


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
    state: str | None = Field(
        description="ok, waiting, missing_tables, error or busy; null when stopped."
    )
    message: str | None
    queries: int
    refreshes: int


class AutostartInfo(_Model):
    """What auto-start did when the host launched."""

    enabled: bool | None
    outcome: str


class PortHolderInfo(_Model):
    """What listens on the port that the last start found taken."""

    port: int
    kind: str = Field(
        description="session-buddy-realtime (another instance of this plugin), session-buddy "
        "(Session-Buddy's own realtime server), websocket (another WebSocket server) or other."
    )
    server_version: str | None = Field(description="The holder's version, when it says.")


class LeaseInfo(_Model):
    """Who may publish the stream: one producer at a time holds the lease."""

    held: bool = Field(description="True when this server is the one publishing.")
    holder: str | None = Field(description="The identity of the producer holding the lease.")
    epoch: int | None = Field(description="This server's lease epoch while it holds it.")


class RedisInfo(_Model):
    """Publishing through Redis (scale-out)."""

    role: Literal["producer"]
    url: str = Field(description="The Redis URL, its password hidden.")
    prefix: str = Field(description="The stream's name in Redis.")
    identity: str = Field(description="This server's name in Redis.")
    connected: bool
    lease: LeaseInfo
    watched_skills: int = Field(description="Skills that edges' clients follow.")
    seq: int = Field(description="Sequence number of the last envelope published.")
    states_published: int
    heartbeats_published: int
    requests_answered: int = Field(description="Edges' requests answered (rows, history).")
    requests_refused: int
    invalid_requests: int
    reconnects: int
    last_error: str | None


class RealtimeStatus(_Model):
    """State of the realtime server of this host."""

    running: bool
    urls: list[str] = Field(description="WebSocket URLs dashboards connect to.")
    host: str | None
    port: int | None
    requested_port: int | None = Field(description="The port asked for, before any fallback.")
    note: str | None = Field(
        description="For example which port was taken and by what, or which arguments of "
        "realtime_start were not applied because the server was already running."
    )
    port_holder: PortHolderInfo | None = Field(
        description="What holds the port that the last start found taken; null if none."
    )
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
    server_role: Literal["standalone", "producer", "edge"] = Field(
        description="standalone (no Redis), producer (publishes through Redis) or edge."
    )
    redis: RedisInfo | None = Field(
        description="The producer's side of Redis scale-out; null when no Redis URL is set."
    )
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
