"""``GET /metrics``: the skill metrics and the server's own, in Prometheus text format 0.0.4.

``metric_families`` turns what the server already holds (its ``status()``, a snapshot of
the source, the tick histogram) into families; ``render`` writes them as the text
exposition format defines it: ``# HELP`` and ``# TYPE`` lines, label values escaped
(backslash, double quote, newline), names restricted to ``[a-zA-Z_:][a-zA-Z0-9_:]*``.
Label values are bounded: skills are the ``METRICS_SKILLS`` most invoked, anomaly types
are the three Session-Buddy uses plus ``other``, refusal reasons are the server's own.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from session_buddy_realtime._version import __version__
from session_buddy_realtime.data.source import MetricsSnapshot, SourceState
from session_buddy_realtime.stream.stats import Histogram

__all__ = [
    "CONTENT_TYPE",
    "METRICS_SKILLS",
    "Family",
    "escape_label_value",
    "metric_families",
    "metric_name",
    "render",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
METRICS_SKILLS: Final = 50
"""Skills exported, the most invoked first: the bound on the ``skill`` label's values."""
ANOMALY_TYPES: Final = ("drop", "spike", "pattern_shift")
"""``type`` label values; any other stored type is counted as ``other``."""
_SKILL: Final = "session_buddy_skill_"
_SERVER: Final = "session_buddy_realtime_"
_INVALID_NAME: Final = re.compile(r"[^a-zA-Z0-9_:]")

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(slots=True)
class Family:
    """One metric family: its samples are ``(suffix, labels, value)``."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        """Add one sample (``suffix`` such as ``_bucket`` for histograms)."""
        self.samples.append((suffix, labels, value))


def metric_name(name: str) -> str:
    """``name`` with every character that a metric name cannot hold replaced by ``_``."""
    name = _INVALID_NAME.sub("_", name)
    return f"_{name}" if not name or name[0].isdigit() else name


def escape_label_value(value: str) -> str:
    """Escape a label value as the text format requires: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The families in text exposition format 0.0.4, ending with a newline."""
    lines: list[str] = []
    for family in families:
        name = metric_name(family.name)
        lines.append(f"# HELP {name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {name} {family.kind}")
        for suffix, labels, value in family.samples:
            shown = ",".join(
                f'{metric_name(key)}="{escape_label_value(text)}"' for key, text in labels.items()
            )
            lines.append(
                f"{name}{suffix}{{{shown}}} {_number(value)}"
                if shown
                else f"{name}{suffix} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def metric_families(
    status: Mapping[str, Any],
    snapshot: MetricsSnapshot,
    skills: Sequence[str],
    tick_seconds: Histogram,
) -> list[Family]:
    """Every family of ``/metrics``.

    Args:
        status: The server's ``status()``.
        snapshot: The source's state, with the rows of ``skills``.
        skills: The skills to export, the most invoked first (at most ``METRICS_SKILLS``).
        tick_seconds: Durations of the broadcast ticks.
    """
    return [*_skill_families(snapshot, skills), *_server_families(status, snapshot, tick_seconds)]


def _skill_families(snapshot: MetricsSnapshot, skills: Sequence[str]) -> list[Family]:
    invocations = Family(
        _SKILL + "invocations_total", "counter", "Invocations recorded (skill_metrics)."
    )
    completed = Family(
        _SKILL + "completed_invocations_total", "counter", "Invocations that completed."
    )
    ratio = Family(
        _SKILL + "completion_ratio", "gauge", "Share of invocations that completed (0-1)."
    )
    duration = Family(
        _SKILL + "average_duration_seconds",
        "gauge",
        "Mean duration of completed invocations (absent until one completes).",
    )
    for name in skills[:METRICS_SKILLS]:
        row = snapshot.skills.get(name)
        if row is None:
            continue
        invocations.add(row["total_invocations"], skill=name)
        completed.add(row["completed_invocations"], skill=name)
        ratio.add(round(row["completion_rate"] / 100.0, 6), skill=name)
        if row["avg_duration_seconds"] is not None:
            duration.add(row["avg_duration_seconds"], skill=name)
    anomalies = Family(
        "session_buddy_anomalies",
        "gauge",
        "Current anomalies by type and source (table: skill_anomalies; live: z-scores).",
    )
    seen: Counter[tuple[str, str]] = Counter(
        (a["anomaly_type"] if a["anomaly_type"] in ANOMALY_TYPES else "other", a["source"])
        for a in snapshot.anomalies
    )
    for kind in (*ANOMALY_TYPES, "other"):
        for source in ("table", "live"):
            anomalies.add(seen[kind, source], type=kind, source=source)
    return [invocations, completed, ratio, duration, anomalies]


_COUNTERS: Final = (
    ("connections_total", "connections_total", "WebSocket connections opened."),
    ("ticks", "ticks_total", "Broadcast ticks."),
    ("idle_ticks", "idle_ticks_total", "Ticks with nobody subscribed (no database read)."),
    ("ticks_skipped", "skipped_ticks_total", "Tick slots skipped because a tick overran."),
    ("messages_sent", "messages_sent_total", "WebSocket messages sent."),
    ("updates_dropped", "updates_dropped_total", "Updates skipped for congested clients."),
    ("clients_evicted", "clients_evicted_total", "Clients dropped for not reading."),
    ("errors", "errors_total", "Internal errors (ticks, replies)."),
    ("auth_failures", "auth_failures_total", "Failed authentication attempts."),
    ("rate_limited", "rate_limited_total", "Client messages refused by the rate limit."),
)


def _server_families(
    status: Mapping[str, Any], snapshot: MetricsSnapshot, tick_seconds: Histogram
) -> list[Family]:
    info = Family(_SERVER + "info", "gauge", "The server's version (always 1).")
    info.add(1, version=__version__)
    gauges = [
        ("client_count", "clients", "Connected WebSocket clients."),
        ("connections", "connections", "Open TCP connections, handshakes included."),
        ("update_interval", "update_interval_seconds", "Seconds between broadcasts."),
        ("uptime_seconds", "uptime_seconds", "Seconds since the server started."),
    ]
    families = [info]
    for key, name, text in gauges:
        family = Family(_SERVER + name, "gauge", text)
        family.add(float(status.get(key) or 0))
        families.append(family)
    for key, name, text in _COUNTERS:
        family = Family(_SERVER + name, "counter", text)
        family.add(float(status.get(key) or 0))
        families.append(family)
    refused = Family(
        _SERVER + "refused_total", "counter", "Requests and connections refused, by reason."
    )
    for reason, count in sorted(dict(status.get("refused") or {}).items()):
        refused.add(count, reason=str(reason))
    database = status.get("database") or {}
    queries = Family(_SERVER + "database_queries_total", "counter", "Data queries run.")
    queries.add(float(database.get("queries") or 0))
    state = Family(
        _SERVER + "database_state",
        "gauge",
        "1 for the state of the last database read (ok, missing_tables, error, busy, waiting).",
    )
    for each in SourceState:
        state.add(1 if snapshot.state is each else 0, state=each.value)
    ticks = Family(_SERVER + "tick_duration_seconds", "histogram", "Time a broadcast tick took.")
    for bound, count in tick_seconds.cumulative():
        ticks.add(count, "_bucket", le=_number(bound) if math.isfinite(bound) else "+Inf")
    ticks.add(tick_seconds.total, "_sum")
    ticks.add(tick_seconds.count, "_count")
    return [*families, refused, queries, state, ticks]
