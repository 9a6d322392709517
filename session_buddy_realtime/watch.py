"""A terminal client for the stream: ``session-buddy-realtime watch``."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any, Final, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from session_buddy_realtime.protocol import CloseCode

__all__ = ["DEFAULT_URL", "render_message", "watch"]

DEFAULT_URL: Final = "ws://localhost:8765"
_RECONNECT_DELAYS: Final = (0.5, 1.0, 2.0, 4.0, 8.0)


class WatchError(Exception):
    """The client cannot go on (no server, refused handshake, bad URL)."""


async def watch(
    url: str,
    skill: str | None,
    *,
    ping: bool = False,
    as_json: bool = False,
    count: int | None = None,
    token: str | None = None,
    cafile: Path | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Follow the stream and print it; return the process exit status.

    With ``ping``, measure one ping/pong round trip and return. With ``count``, stop
    after that many ``metrics_update`` messages. When an established connection drops
    (for example the server restarts), reconnect with backoff. ``token`` is sent as an
    ``Authorization: Bearer`` header; ``cafile`` is trusted for ``wss://``.
    """
    received = 0
    attempt = 0
    ever_connected = False
    while True:
        try:
            async with connect(
                url,
                open_timeout=5,
                close_timeout=1,
                max_size=2**22,
                additional_headers={"Authorization": f"Bearer {token}"} if token else None,
                ssl=ssl.create_default_context(cafile=cafile) if cafile else None,
            ) as ws:
                ever_connected, attempt = True, 0
                if ping:
                    return await _ping(ws, as_json=as_json, out=out)
                await ws.send(json.dumps({"type": "subscribe", "skill": skill}))
                confirmed = False
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message.get("type")
                    confirmed = confirmed or kind == "subscription_confirmed"
                    # Updates sent before the subscription took effect (for the default
                    # subscription to all skills) are not what was asked for: not shown.
                    if kind == "metrics_update" and not confirmed:
                        continue
                    print(raw if as_json else render_message(message), file=out, flush=True)
                    if kind == "metrics_update" and message.get("skill") == skill:
                        received += 1
                        if count is not None and received >= count:
                            return 0
                reason = _close_reason(ws.close_code, ws.close_reason)
        except InvalidURI as exc:
            print(f"error: {exc}", file=err)
            return 2
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (wrong or missing token?)" if status == 401 else ""
            print(f"error: the server refused the connection: HTTP {status}{hint}", file=err)
            return 1
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if not ever_connected:
                print(
                    f"error: cannot connect to {url}: {exc}\n"
                    f"is the server running? (session-buddy-realtime serve --demo)",
                    file=err,
                )
                return 1
            reason = str(exc)
        except ConnectionClosed as exc:
            close = exc.rcvd or exc.sent
            reason = _close_reason(*((close.code, close.reason) if close else (None, None)))
            if close is not None and close.code == CloseCode.AUTH_FAILED:
                print(f"error: {reason}", file=err)
                return 1
        delay = _RECONNECT_DELAYS[min(attempt, len(_RECONNECT_DELAYS) - 1)]
        attempt += 1
        print(f"connection lost ({reason}); reconnecting in {delay:g}s", file=err, flush=True)
        await asyncio.sleep(delay)


async def _ping(ws: ClientConnection, *, as_json: bool, out: TextIO) -> int:
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "ping"}))
    async with asyncio.timeout(10):
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "pong":
                rtt_ms = (time.perf_counter() - sent) * 1000
                if as_json:
                    print(raw, file=out, flush=True)
                else:
                    print(f"pong in {rtt_ms:.1f} ms", file=out, flush=True)
                return 0
    return 1


def _close_reason(code: int | None, reason: str | None) -> str:
    if code is None:
        return "connection dropped"
    return f"closed with {code}" + (f": {reason}" if reason else "")


def render_message(message: dict[str, Any]) -> str:
    """Return a server message as readable lines for a terminal."""
    kind = message.get("type")
    stamp = _clock(message.get("timestamp"))
    if kind == "metrics_update":
        return _render_update(message, stamp)
    if kind == "connected":
        return (
            f"{stamp} connected: {message.get('message', '')} "
            f"(server {message.get('server_version', '?')}, "
            f"every {message.get('update_interval', '?')}s)"
        )
    if kind == "subscription_confirmed":
        skill = message.get("skill")
        if skill is None:
            return f"{stamp} subscribed to all skills"
        note = "" if message.get("known", True) else " (no metrics for it yet)"
        return f"{stamp} subscribed to {skill}{note}"
    if kind == "unsubscribed":
        return f"{stamp} unsubscribed"
    if kind == "pong":
        return f"{stamp} pong"
    if kind == "error":
        return f"{stamp} error {message.get('code')}: {message.get('message')}"
    return f"{stamp} {json.dumps(message)}"


def _render_update(message: dict[str, Any], stamp: str) -> str:
    data = message.get("data") or {}
    source = message.get("source") or {}
    scope = message.get("skill") or "all skills"
    lines = [f"{stamp} {scope}" + _source_note(source)]
    skills = data.get("top_skills") or []
    if skills:
        lines.append(f"  {'skill':<28} {'runs':>7} {'done %':>7} {'avg s':>8}")
        for row in skills:
            avg = row.get("avg_duration_seconds")
            lines.append(
                f"  {row['skill_name'][:28]:<28} {row['total_invocations']:>7} "
                f"{row['completion_rate']:>7.1f} {'-' if avg is None else f'{avg:.1f}':>8}"
            )
    else:
        lines.append("  (no metrics yet)")
    for anomaly in data.get("anomalies") or []:
        score = anomaly.get("deviation_score")
        shown = "?" if score is None else f"{score:.1f}"
        detail = ""
        if anomaly.get("baseline_value") is not None and anomaly.get("observed_value") is not None:
            detail = f"  {anomaly['baseline_value']:g} -> {anomaly['observed_value']:g}"
        lines.append(
            f"  ! {anomaly['skill_name']} {anomaly['anomaly_type']} (z {shown}, "
            f"{anomaly.get('source', 'table')}){detail}"
        )
    return "\n".join(lines)


def _source_note(source: dict[str, Any]) -> str:
    if not source or source.get("state") == "ok":
        return ""
    return f"  [{source.get('state')}: {source.get('message')}]"


def _clock(timestamp: object) -> str:
    if isinstance(timestamp, str) and "T" in timestamp:
        return timestamp.split("T", 1)[1][:8]
    return "--:--:--"
