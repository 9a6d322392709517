"""The quick reading of the opening request (what it takes, the library answers alike)
and the listener's own accept path."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from session_buddy_realtime.stream import listener as listener_module
from session_buddy_realtime.stream.handshake import read_upgrade, switching_protocols
from tests.conftest import UNIT, ServerFactory, SkillsDB, url_of, wait_until

KEY_LINES = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
PLAIN = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    + KEY_LINES
    + b"\r\n"
)
CLIENTS = {
    "chromium": b"GET /?token=abc HTTP/1.1\r\nHost: localhost:8765\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux "
    b"x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\nOrigin: http://localhost:8765\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    "firefox": b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUser-Agent: Mozilla/5.0 (X11; "
    b"Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0\r\nAccept: */*\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:8765\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-Fetch-Dest: empty\r\nPragma: no-cache\r\nUpgrade: websocket\r\n\r\n",
    "python websockets": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"User-Agent: Python/3.11 websockets/17.0\r\n\r\n",
    "node ws": b"GET / HTTP/1.1\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: 9fQ8ctTfY1o+mpSG2ZK6zA==\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Extensions: permessage-deflate; "
    b"client_max_window_bits\r\nHost: 127.0.0.1:8765\r\n\r\n",
    "lower case, blanks": b"GET /metrics?skill=a%20b HTTP/1.1\r\nhost: [::1]:8765\r\n"
    b"upgrade: WebSocket\r\nconnection:upgrade\r\nsec-websocket-key:\t dGhlIHNhbXBsZSBub25jZQ==  "
    b"\r\nsec-websocket-version: 13\r\nx-empty:\r\nx-latin: caf\xe9\r\n\r\n",
}


def library_answer(data: bytes) -> tuple[Request, bytes] | None:
    """The library's own reading: the request and its response, when it answers 101."""
    protocol = ServerProtocol(logger=logging.getLogger("test.handshake"))
    protocol.receive_data(data)
    requests = [event for event in protocol.events_received() if isinstance(event, Request)]
    if not requests:
        return None
    response = protocol.accept(requests[0])
    if response.status_code != 101:
        return None
    return requests[0], response.serialize()


def without_date(response: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", response)


def assert_answered_alike(data: bytes) -> None:
    """If the quick reading takes ``data``, the library answers it with the same 101 and
    reads the same request."""
    upgrade = read_upgrade(data)
    if upgrade is None:
        return
    answered = library_answer(data)
    assert answered is not None, f"the library refuses what the quick reading took: {data!r}"
    request, response = answered
    assert upgrade.request.path == request.path
    assert list(upgrade.request.headers.raw_items()) == list(request.headers.raw_items())
    assert without_date(switching_protocols(upgrade.accept)) == without_date(response)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_common_clients_get_the_quick_reading_and_the_librarys_answer(client: str) -> None:
    """What browsers and client libraries send is read quickly, to the library's result."""
    assert read_upgrade(CLIENTS[client]) is not None
    assert_answered_alike(CLIENTS[client])


def test_the_response_carries_the_date_like_the_librarys() -> None:
    """The 101 response has a Date header in HTTP's format, as the library writes it."""
    response = switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", response)
    assert response.endswith(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


UNUSUAL = {
    "in pieces": PLAIN[:40],
    "a frame after it": PLAIN + b"\x81\x80abcd",
    "HTTP/1.0": PLAIN.replace(b"HTTP/1.1", b"HTTP/1.0"),
    "POST": PLAIN.replace(b"GET", b"POST"),
    "absolute target": PLAIN.replace(b"GET / ", b"GET http://127.0.0.1:8765/ "),
    "a subprotocol": PLAIN.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
    "a body": PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
    "chunked": PLAIN.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "version 8": PLAIN.replace(b"Version: 13", b"Version: 8"),
    "a short key": PLAIN.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZQ=="),
    "two keys": PLAIN.replace(KEY_LINES, KEY_LINES + KEY_LINES),
    "two upgrades": PLAIN.replace(b"Upgrade: websocket", b"Upgrade: websocket, h2c"),
    "no upgrade option": PLAIN.replace(b"Connection: Upgrade", b"Connection: keep-alive"),
    "an empty option": PLAIN.replace(b"Connection: Upgrade", b"Connection: ,Upgrade"),
    "a blank before the colon": PLAIN.replace(b"Upgrade: websocket", b"Upgrade : websocket"),
    "a control character": PLAIN.replace(b"127.0.0.1", b"127.0.\x010.1"),
    "a folded line": PLAIN.replace(b"Connection: Upgrade\r\n", b"Connection:\r\n Upgrade\r\n"),
    "a bare line feed": PLAIN.replace(b"Connection: Upgrade\r\n", b"Connection: Upgrade\n"),
    "no fields": b"GET / HTTP/1.1\r\n\r\n",
    "many fields": PLAIN.replace(b"\r\n\r\n", b"\r\n" + b"X-A: 1\r\n" * 70 + b"\r\n"),
    "a long head": PLAIN.replace(b"\r\n\r\n", b"\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"),
}


@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_unusual_requests_are_left_to_the_library(case: str) -> None:
    """Anything but a plain, whole upgrade request goes to the library's reading."""
    assert read_upgrade(UNUSUAL[case]) is None


_HEADER_NAMES = st.sampled_from(
    ["Host", "Upgrade", "Connection", "Origin", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
     "Sec-WebSocket-Protocol", "Content-Length", "X-Any", "host", "UPGRADE", "Bad Name", ""]
)  # fmt: skip
_HEADER_VALUES = st.one_of(
    st.sampled_from(
        ["websocket", "WebSocket", "Upgrade", "keep-alive, Upgrade", "upgrade,", "13", "8",
         "dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=", "0", "", " ", "a\tb"]
    ),
    st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=30),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=8), st.booleans())
def test_any_header_list_the_quick_reading_takes_the_library_answers_alike(
    fields: list[tuple[str, str]], with_defaults: bool
) -> None:
    """Random header lists: whatever the quick reading accepts, the library accepts with
    the same request and the same 101."""
    head = b"GET /?q=1 HTTP/1.1\r\n"
    if with_defaults:
        head += b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + KEY_LINES
    for name, value in fields:
        head += name.encode() + b": " + value.encode("iso-8859-1") + b"\r\n"
    assert_answered_alike(head + b"\r\n")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CLIENTS)), st.integers(0, 700), st.binary(max_size=4), st.booleans())
def test_any_altered_request_the_quick_reading_takes_the_library_answers_alike(
    client: str, at: int, inserted: bytes, replace: bool
) -> None:
    """Real requests with bytes inserted or replaced anywhere: the same implication."""
    data = CLIENTS[client]
    at %= len(data)
    altered = data[:at] + inserted + data[at + (len(inserted) if replace else 0) :]
    assert_answered_alike(altered)


# From outside: a real server, raw sockets


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 40 * UNIT)


async def test_a_client_librarys_request_is_answered_without_the_librarys_reading(
    skills_db: SkillsDB, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real client's upgrade opens through the quick reading: the library's accept()
    is not called, and the client gets its welcome."""
    accepted: list[Request] = []
    library_accept = ServerProtocol.accept

    def counted(protocol: ServerProtocol, request: Request) -> Response:
        accepted.append(request)
        return library_accept(protocol, request)

    monkeypatch.setattr(ServerProtocol, "accept", counted)
    server = await start_server()
    async with connect(url_of(server)) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 40 * UNIT))
    assert welcome["type"] == "connected"
    assert accepted == []


async def test_a_request_in_two_segments_is_read_by_the_library_and_opens(
    skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A request whose first segment the server has already read in part still opens."""
    server = await start_server()
    running = server._running
    assert running is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(PLAIN[:30])
    await wait_until(lambda: any(not c.unread for c in running.registry.connections))
    writer.write(PLAIN[30:])
    head = await _read_head(reader)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    [connection] = running.registry.connections
    assert connection.protocol.state is State.OPEN
    writer.close()


async def test_a_message_sent_with_the_request_is_answered(
    skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that sends a message right behind its request (in the same write) gets
    the 101, the welcome, then the message's answer."""
    server = await start_server(update_interval=60.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    message = b'{"type": "ping"}'
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(message))
    writer.write(PLAIN + bytes([0x81, 0x80 | len(message)]) + mask + masked)
    assert (await _read_head(reader)).startswith(b"HTTP/1.1 101")
    seen = b""
    async with asyncio.timeout(40 * UNIT):
        while b'"pong"' not in seen:
            seen += await reader.read(65536)
    assert seen.index(b'"connected"') < seen.index(b'"pong"')
    writer.close()


async def test_a_close_frame_sent_with_the_request_ends_the_stream_quietly(
    skills_db: SkillsDB, start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends a close frame right behind its request (before any answer):
    the library ends the stream while reading, so the server writes nothing more, logs
    no error, and forgets the connection."""
    server = await start_server()
    running = server._running
    assert running is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    mask = b"\x01\x02\x03\x04"
    code = (1000).to_bytes(2, "big")
    writer.write(
        PLAIN
        + bytes([0x88, 0x80 | len(code)])
        + mask
        + bytes(b ^ mask[i] for i, b in enumerate(code))
    )
    assert await asyncio.wait_for(reader.read(), 40 * UNIT) == b""
    await wait_until(lambda: not running.registry.connections)
    assert server.status()["client_count"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    writer.close()


async def test_with_the_protocol_log_at_debug_the_library_reads_and_logs_the_request(
    skills_db: SkillsDB, start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG the request's lines are logged (by the library's reading) and it opens."""
    caplog.set_level(logging.DEBUG, logger="session_buddy_realtime.websockets")
    server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(PLAIN)
    assert (await _read_head(reader)).startswith(b"HTTP/1.1 101")
    assert any("< GET / HTTP/1.1" in record.getMessage() for record in caplog.records)
    writer.close()


# The listener's own accept path


class _OutOfFiles:
    """A listening socket whose accept() fails as it does when the process has no file left."""

    def accept(self) -> tuple[socket.socket, object]:
        raise OSError(errno.EMFILE, "Too many open files")


async def test_out_of_files_at_accept_pauses_accepting_then_a_waiting_client_is_served(
    skills_db: SkillsDB,
    start_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE at accept: one warning, accepting pauses (the socket would stay readable),
    and when it resumes a client that connected meanwhile gets its 101."""
    monkeypatch.setattr(listener_module, "ACCEPT_RETRY_DELAY", 5 * UNIT)
    server = await start_server()
    running = server._running
    assert running is not None
    listener = running.listener
    loop = asyncio.get_running_loop()
    listener._accept(loop, _OutOfFiles(), 100)  # type: ignore[arg-type]
    assert listener._retry is not None
    assert [r.getMessage() for r in caplog.records if "accepting paused" in r.getMessage()]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(PLAIN)
    assert (await _read_head(reader)).startswith(b"HTTP/1.1 101")
    assert listener._retry is None
    writer.close()


async def test_on_a_loop_it_cannot_accept_on_the_listener_uses_the_loops_server(
    skills_db: SkillsDB, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the listener cannot make transports itself (another event loop), asyncio's
    create_server accepts: clients still get their welcome, and stop() still ends them."""
    monkeypatch.setattr(listener_module, "accepts_itself", lambda loop: False)
    server = await start_server()
    assert server._running is not None
    assert server._running.listener._accepting == []
    async with connect(url_of(server)) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 40 * UNIT))
        assert welcome["type"] == "connected"
        await server.stop()
        await asyncio.wait_for(ws.wait_closed(), 40 * UNIT)
    assert ws.close_code == 1001
