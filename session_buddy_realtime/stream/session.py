"""A client session: one per connection, from the welcome to the last message.

The session authenticates the client (at the handshake or with a first ``auth``
message), applies the message rate limit, parses and answers each message, and asks
the hub to subscribe or unsubscribe it. Bad input gets an ``error`` reply, never a close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from session_buddy_realtime._version import __version__
from session_buddy_realtime.data.source import LOOKUP_WAIT, History, HistoryWindow, SkillNames
from session_buddy_realtime.protocol import (
    MAX_SKILL_RESULTS,
    Auth,
    CloseCode,
    ErrorCode,
    HistoryRequest,
    Ping,
    ProtocolError,
    SkillsRequest,
    Subscribe,
    Unsubscribe,
    authenticated_message,
    connected_message,
    encode,
    error_message,
    format_timestamp,
    parse_client_message,
    pong_message,
    unsubscribed_message,
    validate_skill_name,
)
from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.hub import Hub, Subscriber
from session_buddy_realtime.stream.opening import text_frame
from session_buddy_realtime.stream.receiving import Waiting
from session_buddy_realtime.stream.security import AuthThrottle, RateLimiter, tokens_match

__all__ = ["ClientSession", "SessionPolicy"]

logger = logging.getLogger(__name__)

_STAMP = "0000-00-00T00:00:00.000Z"
"""Where a welcome template's timestamp goes (as long as every ``format_timestamp()``)."""


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What every session of one server applies."""

    token: str | None
    auth_timeout: float
    message_rate: float
    message_burst: int
    update_interval: float
    server_role: str = "standalone"
    """``standalone``, ``producer`` or ``edge``: said in ``connected``."""
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    """Failed attempts per address, shared with the handshake's token check."""
    welcomes: dict[tuple[bool, bool], bytes] = field(default_factory=dict)
    """The ``connected`` frame per (subscribed, authenticated), stamped ``_STAMP``."""

    def welcome(self, *, subscribed: bool, authenticated: bool) -> bytes:
        """The ``connected`` frame for a new client, stamped now (built once per kind)."""
        timestamp = format_timestamp()
        key = (subscribed, authenticated)
        template = self.welcomes.get(key)
        if template is None:
            template = self.welcomes[key] = self._welcome(subscribed, authenticated, _STAMP)
        if len(timestamp) != len(_STAMP):  # a year before 1000 or after 9999
            return self._welcome(subscribed, authenticated, timestamp)
        return template.replace(_STAMP.encode(), timestamp.encode(), 1)

    def _welcome(self, subscribed: bool, authenticated: bool, timestamp: str) -> bytes:
        return text_frame(
            encode(
                connected_message(
                    timestamp=timestamp,
                    server_version=__version__,
                    update_interval=self.update_interval,
                    server_role=self.server_role,
                    subscription="all" if subscribed else None,
                    authenticated=authenticated,
                    auth_required=self.token is not None,
                )
            )
        )


@dataclass(eq=False, slots=True, kw_only=True)
class ClientSession(Subscriber, Waiting):
    """One connected client: its authentication, rate limit and messages."""

    hub: Hub[ClientSession]
    policy: SessionPolicy
    limiter: RateLimiter
    ip: str = "unknown"
    authenticated: bool = False

    @classmethod
    def open(
        cls,
        connection: Connection,
        hub: Hub[ClientSession],
        policy: SessionPolicy,
        now: float,
    ) -> ClientSession:
        """A session for a new connection, subscribed to all skills (the seed's default)."""
        remote = connection.remote_address
        shown = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
        return cls(
            connection=connection,
            remote=shown,
            ip=str(remote[0]) if isinstance(remote, tuple) else "unknown",
            connected_at=now,
            hub=hub,
            policy=policy,
            limiter=RateLimiter(policy.message_rate, policy.message_burst),
        )

    @property
    def may_use(self) -> bool:
        """True when the client may do more than authenticate."""
        return self.policy.token is None or self.authenticated

    def describe(self, now: float) -> dict[str, Any]:
        """Return this client as shown in ``status()``."""
        return {
            "remote": self.remote,
            "connected_for_seconds": round(now - self.connected_at, 3),
            "subscription": (self.skill or "all") if self.subscribed else None,
            "authenticated": self.authenticated,
            "messages_sent": self.messages_sent,
            "updates_dropped": self.updates_dropped,
            "congested": self.congested_since is not None,
        }

    def serve(self, *, preauthenticated: bool) -> Coroutine[Any, Any, None] | Waiting:
        """Welcome the client now, then return what authenticates it if required and
        answers its messages: a coroutine to run at once when the client has to
        authenticate (its time is counted), else the session itself, ``Waiting`` for
        the client's first message (no task for a quiet client).

        The welcome is written before this returns (with the handshake's response, see
        ``write_first``), so it precedes every update. Messages over the rate limit get one
        ``rate_limited`` error; a client that keeps going is closed with 1008. The
        coroutine returns when the connection closes, after leaving the hub.
        """
        self.authenticated = preauthenticated
        self.subscribed = self.policy.token is None or self.authenticated
        welcome = self.policy.welcome(subscribed=self.subscribed, authenticated=self.authenticated)
        self.hub.send_first(self, welcome)
        # Decided now: by its first message the session may have been unsubscribed, which
        # is not a reason to ask for a token.
        return self._converse(authenticate=True) if not self.subscribed else self

    def start(self) -> Coroutine[Any, Any, None]:
        """Answer the client's messages, from its first (``Waiting``)."""
        return self._converse(authenticate=False)

    def gone(self) -> None:
        """The client left without a message (``Waiting``)."""
        self.hub.remove(self.connection)

    async def _converse(self, *, authenticate: bool) -> None:
        connection = self.connection
        try:
            if authenticate and not await self._authenticate():
                return
            # recv() in a loop rather than ``async for``: no async generator kept per client.
            while True:
                message = await connection.recv()
                if await self._admit():
                    await self.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(connection)

    async def handle(self, message: str | bytes) -> None:
        """Answer one client message; bad input gets an ``error`` reply, never a close."""
        try:
            request = parse_client_message(message)
        except ProtocolError as exc:
            await self.reply_error(exc.code, exc.message)
            return
        if not isinstance(request, Auth) and not self.may_use:
            await self.reply_error(
                ErrorCode.NOT_AUTHENTICATED,
                'authenticate first: send {"type": "auth", "token": "..."}',
            )
            return
        try:
            if isinstance(request, Subscribe):
                await self.subscribe(request.skill)
            elif isinstance(request, Unsubscribe):
                self.hub.unsubscribe(self)
                await self.reply(unsubscribed_message(timestamp=format_timestamp()))
            elif isinstance(request, Ping):
                await self.reply(pong_message(timestamp=format_timestamp()))
            elif isinstance(request, HistoryRequest | SkillsRequest):
                await self._look_up(request)
            elif isinstance(request, Auth):
                await self._check_token(request.token)
        except ConnectionClosed:
            raise
        except Exception as exc:
            # Our fault, not the client's: keep the connection and the server going.
            self.hub.stats.record_error(f"handling {type(request).__name__.lower()}: {exc!r}")
            logger.exception("internal error answering %s", type(request).__name__.lower())
            await self.reply_error(ErrorCode.INTERNAL_ERROR, "internal error; see the server log")

    async def _look_up(self, request: HistoryRequest | SkillsRequest) -> None:
        """Answer ``history`` or ``skills`` from the source; nothing if the server stops first."""
        work: Awaitable[History | SkillNames]
        if isinstance(request, HistoryRequest):
            window = HistoryWindow.for_interval(self.policy.update_interval)
            work = self.hub.source.history(request.skill, window, LOOKUP_WAIT)
        else:
            work = self.hub.source.skill_names(request.query, MAX_SKILL_RESULTS, LOOKUP_WAIT)
        answer: History | SkillNames | None = await self.hub.unless_stopping(work)
        if answer is not None:
            await self.reply(answer.reply(format_timestamp()))

    async def subscribe(self, skill_name: object) -> None:
        """Subscribe to all skills (None) or one: confirmation, then a snapshot at once."""
        try:
            skill = validate_skill_name(skill_name)
        except ProtocolError as exc:
            await self.reply_error(exc.code, exc.message)
            return
        if self.may_use:
            await self.hub.subscribe(self, skill)

    async def reply(self, message: dict[str, Any]) -> None:
        """Send one message to this client."""
        # Awaiting the send pauses reading from this client until it drains: a client
        # that floods without reading slows only itself.
        await self.connection.send(encode(message))
        self.hub.stats.messages_sent += 1
        self.messages_sent += 1

    async def reply_error(self, code: ErrorCode, text: str) -> None:
        """Send an ``error`` message; the connection stays open."""
        await self.reply(error_message(code, text, timestamp=format_timestamp()))

    async def _authenticate(self) -> bool:
        """Serve only ``auth`` until the client authenticates; close it (4001) otherwise."""
        try:
            async with asyncio.timeout(self.policy.auth_timeout):
                while True:
                    message = await self.connection.recv()
                    if not await self._admit():
                        continue
                    # Everything but a valid auth gets not_authenticated (or closes 4001).
                    await self.handle(message)
                    if self.authenticated:
                        return True
        except TimeoutError:
            self.hub.stats.auth_failures += 1
            await self.connection.close(CloseCode.AUTH_FAILED, "authentication timeout")
        return False

    async def _check_token(self, token: str) -> None:
        expected = self.policy.token
        if expected is not None:
            throttle = self.policy.throttle
            wait = throttle.wait(self.ip)
            if wait > 0 or not tokens_match(token, expected):
                self.hub.stats.auth_failures += 1
                if wait > 0:
                    self.hub.stats.refused["auth_throttled"] += 1
                    reason = f"too many failed attempts; retry in {wait:.0f} s"
                else:
                    throttle.failed(self.ip)
                    reason = "authentication failed"
                logger.info("client %s failed to authenticate", self.remote)
                await self.connection.close(CloseCode.AUTH_FAILED, reason)
                return
            throttle.succeeded(self.ip)
        self.authenticated = expected is not None
        if not self.subscribed:
            self.subscribed, self.skill = True, None
        await self.reply(authenticated_message(timestamp=format_timestamp()))

    async def _admit(self) -> bool:
        """Apply the message rate limit: True to answer the message, False to drop it.

        A message over the limit is never answered. The first of a run gets one
        ``rate_limited`` error; a client that goes on until it is ``message_burst``
        messages over the limit (since it last kept within it) is closed with 1008.
        """
        limiter = self.limiter
        if limiter.allow():
            return True
        self.hub.stats.rate_limited += 1
        policy = self.policy
        if limiter.violations == 1:
            await self.reply_error(
                ErrorCode.RATE_LIMITED,
                f"too many messages: at most {policy.message_rate:g} per second "
                f"(bursts of {policy.message_burst}); this message was ignored",
            )
        elif limiter.violations > policy.message_burst:
            logger.warning("closing client %s: message rate limit exceeded", self.remote)
            await self.connection.close(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
        return False
