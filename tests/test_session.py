"""A client session driven without a socket: dispatch, replies, authentication."""

from __future__ import annotations

from typing import Any, cast

from websockets.asyncio.server import ServerConnection

from session_buddy_realtime.protocol import CloseCode
from session_buddy_realtime.stream.hub import Hub
from session_buddy_realtime.stream.session import ClientSession, SessionPolicy
from session_buddy_realtime.stream.stats import StreamStats
from tests.conftest import SERVER_MESSAGE
from tests.fakes import FakeConnection, FakeSource, skill_row

TOKEN = "a-session-token"


def _session(
    source: FakeSource | None = None, *, token: str | None = None, incoming: list[str] | None = None
) -> tuple[ClientSession, FakeConnection, Hub[ClientSession]]:
    hub: Hub[ClientSession] = Hub(
        source or FakeSource(),
        StreamStats(),
        interval=1.0,
        read_timeout=0.8,
        max_buffered_bytes=64 * 1024,
        slow_client_timeout=10.0,
        close_timeout=1.0,
    )
    policy = SessionPolicy(
        token=token, auth_timeout=1.0, message_rate=10.0, message_burst=20, update_interval=1.0
    )
    connection = FakeConnection(incoming)
    session = ClientSession.open(cast(ServerConnection, connection), hub, policy, 0.0)
    session.subscribed = token is None
    hub.add(session)
    return session, connection, hub


def _valid(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for message in messages:
        SERVER_MESSAGE.validate(message)
    return messages


async def test_subscribe_writes_confirmation_then_snapshot_in_one_write() -> None:
    """A subscribe to one skill writes the confirmation and that skill's snapshot
    together, confirmation first, and the session is then subscribed to it."""
    source = FakeSource([skill_row("alpha", 9), skill_row("beta", 4)])
    session, connection, _ = _session(source)
    await session.handle('{"type": "subscribe", "skill": "beta"}')
    confirmation, update = _valid(connection.transport.frames())
    assert confirmation["type"] == "subscription_confirmed"
    assert (confirmation["skill"], confirmation["known"]) == ("beta", True)
    assert update["type"] == "metrics_update"
    assert update["data"]["top_skills"] == [source.rows["beta"]]
    assert (session.subscribed, session.skill, session.messages_sent) == (True, "beta", 2)
    assert source.asked == [(frozenset({"beta"}), 0.8)]


async def test_unsubscribe_confirms_and_stops_updates() -> None:
    """unsubscribe is confirmed and leaves the session connected but unsubscribed."""
    session, connection, _ = _session()
    await session.handle('{"type": "unsubscribe"}')
    assert [m["type"] for m in _valid(connection.sent)] == ["unsubscribed"]
    assert (session.subscribed, session.skill) == (False, None)


async def test_bad_input_gets_an_error_and_the_session_goes_on() -> None:
    """Malformed JSON and an unknown type each get an error with their code; a ping
    afterwards is still answered."""
    session, connection, _ = _session()
    await session.handle("{not json")
    await session.handle('{"type": "launch"}')
    await session.handle('{"type": "subscribe", "skill": 42}')
    await session.handle('{"type": "ping"}')
    replies = _valid(connection.sent)
    assert [m.get("code") for m in replies] == [
        "invalid_json",
        "unknown_type",
        "invalid_skill",
        None,
    ]
    assert replies[-1]["type"] == "pong"
    assert connection.closed is None


async def test_before_authenticating_only_auth_is_served() -> None:
    """With a token set, a subscribe before auth gets not_authenticated; the right token
    replies authenticated and subscribes the session to all skills."""
    session, connection, _ = _session(token=TOKEN)
    await session.handle('{"type": "subscribe"}')
    assert [m["code"] for m in _valid(connection.sent)] == ["not_authenticated"]
    assert session.subscribed is False
    await session.handle(f'{{"type": "auth", "token": "{TOKEN}"}}')
    assert _valid(connection.sent)[-1]["type"] == "authenticated"
    assert (session.authenticated, session.subscribed, session.skill) == (True, True, None)


async def test_a_wrong_token_closes_with_4001_and_is_counted() -> None:
    """A wrong token closes the connection with 4001 and counts one auth failure."""
    session, connection, hub = _session(token=TOKEN)
    await session.handle('{"type": "auth", "token": "not-the-token"}')
    assert connection.closed == (CloseCode.AUTH_FAILED, "authentication failed")
    assert session.authenticated is False
    assert hub.stats.auth_failures == 1


async def test_a_fault_while_answering_is_an_internal_error_reply() -> None:
    """If the source fails while a subscribe is answered, the client gets internal_error,
    the error is counted, and the next message is answered."""
    source = FakeSource()
    source.fail_next = RuntimeError("source exploded")
    session, connection, hub = _session(source)
    await session.handle('{"type": "subscribe", "skill": "alpha"}')
    await session.handle('{"type": "ping"}')
    assert [m["type"] for m in _valid(connection.sent)] == ["error", "pong"]
    assert connection.sent[0]["code"] == "internal_error"
    assert hub.stats.errors == 1
    assert "source exploded" in (hub.stats.last_error or "")


async def test_serve_welcomes_then_answers_until_the_connection_ends() -> None:
    """serve() sends connected (with the interval and no auth required), answers each
    incoming message in order, and returns when the messages end."""
    session, connection, _ = _session(incoming=['{"type": "ping"}', '{"type": "unsubscribe"}'])
    served = session.serve(preauthenticated=False)
    assert served is session, "with nothing to authenticate, the session waits for the client"
    await session.start()
    replies = _valid(connection.transport.frames() + connection.sent)
    assert [m["type"] for m in replies] == ["connected", "pong", "unsubscribed"]
    assert replies[0]["update_interval"] == 1.0
    assert replies[0]["auth_required"] is False
