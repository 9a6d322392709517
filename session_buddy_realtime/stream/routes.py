"""The plain HTTP routes beside the WebSocket: ``/healthz``, ``/api/snapshot``, ``/metrics``,
and the dashboard's pages (``pages.py``).

With a token set, ``/api/snapshot`` and ``/metrics`` need ``Authorization: Bearer TOKEN``
(compared in constant time, failures throttled per address with the WebSocket's
attempts); otherwise 401 with ``WWW-Authenticate: Bearer``. ``/healthz`` says only
whether the server is serving, so it stays open, as do the dashboard's files, which hold
no data. None of them changes anything.
"""

from __future__ import annotations

import http
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from websockets.http11 import Request, Response

from session_buddy_realtime.data.source import LOOKUP_WAIT
from session_buddy_realtime.errors import RealtimeError
from session_buddy_realtime.protocol import ErrorCode, ProtocolError, validate_skill_name
from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.gate import peer_ip
from session_buddy_realtime.stream.hub import Hub
from session_buddy_realtime.stream.pages import install_pages
from session_buddy_realtime.stream.prometheus import (
    CONTENT_TYPE,
    METRICS_SKILLS,
    metric_families,
    render,
)
from session_buddy_realtime.stream.router import HttpRouter, http_response
from session_buddy_realtime.stream.security import AuthThrottle, bearer_token, tokens_match
from session_buddy_realtime.stream.session import SessionPolicy
from session_buddy_realtime.stream.stats import StreamStats

__all__ = ["HttpAccess", "install_routes"]

_JSON: Final = "application/json"
_CHALLENGE: Final = 'Bearer realm="session-buddy-realtime"'


@dataclass(frozen=True, slots=True)
class HttpAccess:
    """The token check of the data routes."""

    token: str | None
    throttle: AuthThrottle
    stats: StreamStats

    def refusal(self, connection: Connection, request: Request) -> Response | None:
        """None when the request may have data; otherwise the 401 or 429 to send."""
        if self.token is None:
            return None
        ip = peer_ip(connection)
        wait = self.throttle.wait(ip)
        if wait > 0:
            self.stats.refused["auth_throttled"] += 1
            return _json(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                _error("auth_throttled", f"too many failed attempts; retry in {wait:.0f} s"),
                [("Retry-After", str(max(1, round(wait))))],
            )
        provided = bearer_token(request.headers.raw_items())
        if provided is None:
            self.stats.refused["no_token"] += 1
            return _json(
                http.HTTPStatus.UNAUTHORIZED,
                _error("not_authenticated", "send the token as Authorization: Bearer TOKEN"),
                [("WWW-Authenticate", _CHALLENGE)],
            )
        if not tokens_match(provided, self.token):
            self.throttle.failed(ip)
            self.stats.auth_failures += 1
            self.stats.refused["bad_token"] += 1
            return _json(
                http.HTTPStatus.UNAUTHORIZED,
                _error("bad_token", "invalid token"),
                [("WWW-Authenticate", f'{_CHALLENGE}, error="invalid_token"')],
            )
        self.throttle.succeeded(ip)
        return None


@dataclass(frozen=True, slots=True)
class _Api:
    access: HttpAccess
    hub: Hub[Any]
    status: Callable[[], dict[str, Any]]
    snapshot: Callable[[str | None], Awaitable[dict[str, Any]]]

    def healthz(self, connection: Connection, request: Request) -> Response:
        # What the process can do, not what the database says: every instance reads the
        # same database, so taking one out of a load balancer for a lock would help
        # nobody, and a server that is idle has not read it lately anyway.
        if not self.hub.broadcasting:
            return _json(http.HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable"})
        return _json(http.HTTPStatus.OK, {"status": "ok"})

    async def api_snapshot(self, connection: Connection, request: Request) -> Response:
        refusal = self.access.refusal(connection, request)
        if refusal is not None:
            return refusal
        try:
            skill = _skill_parameter(request.path)
        except ProtocolError as exc:
            return _json(http.HTTPStatus.BAD_REQUEST, _error(exc.code.value, exc.message))
        try:
            payload = await self.snapshot(skill)
        except RealtimeError as exc:  # stopped meanwhile
            return _json(http.HTTPStatus.SERVICE_UNAVAILABLE, _error("unavailable", str(exc)))
        return _json(http.HTTPStatus.OK, payload)

    async def metrics(self, connection: Connection, request: Request) -> Response:
        refusal = self.access.refusal(connection, request)
        if refusal is not None:
            return refusal
        names = await self.hub.unless_stopping(
            self.hub.source.skill_names("", METRICS_SKILLS, LOOKUP_WAIT)
        )
        if names is None:  # stopping
            return _json(http.HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable"})
        snapshot = await self.hub.read(frozenset(names.names))
        families = metric_families(
            self.status(), snapshot, names.names, self.hub.stats.tick_seconds
        )
        return http_response(
            http.HTTPStatus.OK,
            render(families).encode(),
            CONTENT_TYPE,
            [("Cache-Control", "no-store")],
        )


def install_routes(
    router: HttpRouter,
    hub: Hub[Any],
    policy: SessionPolicy,
    *,
    status: Callable[[], dict[str, Any]],
    snapshot: Callable[[str | None], Awaitable[dict[str, Any]]],
) -> None:
    """Add ``/healthz``, ``/api/snapshot``, ``/metrics`` and the dashboard to ``router``.

    Args:
        router: The server's router.
        hub: Its hub (the source, the stats, whether it broadcasts).
        policy: The sessions' policy: its token, and its throttle of failed attempts.
        status: The server's ``status()``.
        snapshot: The server's ``snapshot(skill)``.
    """
    access = HttpAccess(policy.token, policy.throttle, hub.stats)
    api = _Api(access, hub, status, snapshot)
    router.add_route("/healthz", api.healthz)
    router.add_route("/api/snapshot", api.api_snapshot)
    router.add_route("/metrics", api.metrics)
    install_pages(router)


def _skill_parameter(path: str) -> str | None:
    """The ``skill`` query parameter, checked as the protocol checks skill names."""
    try:
        query = parse_qs(
            urlsplit(path).query, keep_blank_values=True, errors="strict", max_num_fields=16
        )
    except (ValueError, UnicodeDecodeError):  # too many fields, or not UTF-8
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "the query string is malformed or not UTF-8"
        ) from None
    values = query.get("skill", [])
    if len(values) > 1:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "give 'skill' at most once")
    if not values:
        return None
    if values[0] == "":
        raise ProtocolError(
            ErrorCode.INVALID_SKILL, "'skill' must not be empty; leave it out for all skills"
        )
    return validate_skill_name(values[0])


def _error(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


def _json(
    status: http.HTTPStatus, payload: object, headers: list[tuple[str, str]] | None = None
) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return http_response(
        status, body.encode(), _JSON, [("Cache-Control", "no-store"), *(headers or [])]
    )
