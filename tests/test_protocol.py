"""The pure protocol functions: parsing, validation, message builders."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session_buddy_realtime.protocol import (
    MAX_SKILL_NAME_LENGTH,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    connected_message,
    encode,
    error_message,
    format_timestamp,
    metrics_update_message,
    parse_client_message,
    pong_message,
    subscription_confirmed_message,
    unsubscribed_message,
)
from tests.conftest import CLIENT_MESSAGE, SERVER_MESSAGE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type": "subscribe"}', Subscribe(None)),
        ('{"type": "subscribe", "skill": null}', Subscribe(None)),
        ('{"type": "subscribe", "skill": "pytest-run"}', Subscribe("pytest-run")),
        ('{"type": "subscribe", "skill_name": "pytest-run"}', Subscribe("pytest-run")),
        ('{"type": "subscribe", "skill": "a", "skill_name": "a"}', Subscribe("a")),
        ('{"type": "subscribe", "skill": "ünïcødé skill"}', Subscribe("ünïcødé skill")),
        ('{"type": "unsubscribe"}', Unsubscribe()),
        ('{"type": "ping", "extra": [1, 2]}', Ping()),
    ],
)
def test_valid_client_messages_parse(raw: str, expected: object) -> None:
    """Every documented client message (and the skill_name alias) parses to its request."""
    assert parse_client_message(raw) == expected
    CLIENT_MESSAGE.validate(json.loads(raw))


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"type": "ping"}', ErrorCode.UNSUPPORTED_FRAME),
        ("not json", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ('{"type": "ping"', ErrorCode.INVALID_JSON),
        ("[" * 100_000 + "]" * 100_000, ErrorCode.INVALID_JSON),
        ("[]", ErrorCode.INVALID_MESSAGE),
        ('"subscribe"', ErrorCode.INVALID_MESSAGE),
        ("42", ErrorCode.INVALID_MESSAGE),
        ("null", ErrorCode.INVALID_MESSAGE),
        ("{}", ErrorCode.INVALID_MESSAGE),
        ('{"type": 3}', ErrorCode.INVALID_MESSAGE),
        ('{"type": null}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "subscribe", "skill": "a", "skill_name": "b"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "Subscribe"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "auth_bypass"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "subscribe", "skill": 7}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": ["a"]}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": ""}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": " padded"}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": "nul\\u0000byte"}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": "lone\\ud800surrogate"}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": "bidi\\u202eoverride"}', ErrorCode.INVALID_SKILL),
        ('{"type": "subscribe", "skill": "new\\nline"}', ErrorCode.INVALID_SKILL),
        (json.dumps({"type": "subscribe", "skill": "x" * 129}), ErrorCode.INVALID_SKILL),
    ],
)
def test_bad_client_messages_raise_documented_codes(raw: str | bytes, code: ErrorCode) -> None:
    """Each kind of bad input maps to one documented error code with a readable message."""
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(raw)
    assert caught.value.code is code
    assert caught.value.message
    SERVER_MESSAGE.validate(error_message(code, caught.value.message, timestamp=format_timestamp()))


def test_skill_name_limit_is_inclusive() -> None:
    """A name of exactly the maximum length is accepted."""
    name = "s" * MAX_SKILL_NAME_LENGTH
    assert parse_client_message(json.dumps({"type": "subscribe", "skill": name})) == Subscribe(name)


def test_unknown_type_echo_is_bounded_and_printable() -> None:
    """An unknown type is quoted back shortened and without control characters."""
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(json.dumps({"type": "\x1b[31m" + "z" * 5000}))
    assert len(caught.value.message) < 200
    assert "\x1b" not in caught.value.message


def test_timestamps_are_utc_with_milliseconds() -> None:
    """Timestamps are ISO 8601 in UTC with milliseconds and Z, whatever the input zone."""
    moment = datetime(2026, 2, 10, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert format_timestamp(moment) == "2026-02-10T12:00:00.123Z"
    assert format_timestamp().endswith("Z")


def test_builders_match_the_schema() -> None:
    """Every server message builder produces a frame that the published schema accepts."""
    ts = format_timestamp(datetime.now(UTC))
    row = {
        "skill_name": "pytest-run",
        "total_invocations": 150,
        "completion_rate": 95.5,
        "avg_duration_seconds": None,
        "completed_invocations": 0,
        "last_invoked": None,
    }
    source = {"state": "ok", "stale": False, "as_of": ts, "message": None}
    for message in (
        connected_message(timestamp=ts, server_version="1", update_interval=1.0),
        metrics_update_message(
            timestamp=ts, skill=None, data={"top_skills": [row], "anomalies": []}, source=source
        ),
        subscription_confirmed_message(timestamp=ts, skill="pytest-run", known=False),
        unsubscribed_message(timestamp=ts),
        pong_message(timestamp=ts),
    ):
        SERVER_MESSAGE.validate(json.loads(encode(message)))


def test_encode_is_compact_and_rejects_nan() -> None:
    """Frames carry no spaces, keep non-ASCII as is, and never contain NaN."""
    assert encode({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    with pytest.raises(ValueError, match="JSON"):
        encode({"x": float("nan")})


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary(),
        _json_values.map(json.dumps),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "x"])},
            optional={"skill": _json_values, "skill_name": _json_values},
        ).map(json.dumps),
    )
)
def test_any_input_parses_or_raises_protocol_error(raw: str | bytes) -> None:
    """For arbitrary input the parser returns a request or a ProtocolError, nothing else."""
    try:
        request = parse_client_message(raw)
    except ProtocolError as exc:
        SERVER_MESSAGE.validate(error_message(exc.code, exc.message, timestamp=format_timestamp()))
    else:
        assert isinstance(request, Subscribe | Unsubscribe | Ping)
        if isinstance(request, Subscribe) and request.skill is not None:
            request.skill.encode("utf-8")  # no lone surrogates reach SQLite


def test_now_is_formatted_as_the_clock_reads_it() -> None:
    """format_timestamp() with no moment (its second formatted once and reused) reads
    back as a UTC time between the clock readings around it, call after call."""
    for _ in range(2000):
        before = datetime.now(UTC).replace(microsecond=0)
        stamp = format_timestamp()
        after = datetime.now(UTC)
        parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert len(stamp) == 24
        assert before <= parsed <= after, (before, stamp, after)
