"""What a listener shares with its connections, and the opening handshake.

A connection hands its first request here (``answer``): the listener's
``process_request`` (the router: a route's response, a refusal, or None to upgrade),
then its ``process_response`` (the gate's bookkeeping), then the response. After a
101 the request's headers are dropped and the handler runs in a task of its own, at
once or when the client first has something for it; the response is held for the
handler's first message to take along (``write_first``).
"""

from __future__ import annotations

import http
import inspect
import logging
import socket
from collections.abc import Awaitable
from typing import Final

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.gate import SEND_BUFFER_BYTES
from session_buddy_realtime.stream.handshake import switching_protocols
from session_buddy_realtime.stream.receiving import Waiting

__all__ = ["answer", "socket_options", "text_frame", "write_first"]

logger = logging.getLogger(__name__)

_NO_HEADERS: Final = Headers()
"""The headers of every open connection's request: nothing reads them after the upgrade,
so none of them is kept (the library's parser still holds the request itself)."""


def socket_options(dead_peer: tuple[float, float] | None) -> list[tuple[int, int, int]]:
    """The options of every accepted socket, set once on the listening socket (Linux
    copies them to each connection it accepts, which saves six system calls per accept).

    The kernel send buffer is capped at ``SEND_BUFFER_BYTES``. With ``dead_peer``
    (keepalive interval, timeout), the kernel gives up on a peer that acknowledges
    nothing for that long (``TCP_USER_TIMEOUT``, and TCP keepalive while idle).
    """
    options = [(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)]
    if dead_peer is not None and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        interval, timeout = dead_peer
        options += [
            # Data unacknowledged for interval + timeout: the connection is reset, as a
            # ping without a pong would have it closed.
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round((interval + timeout) * 1000)),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(interval))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(timeout / 4))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
        ]
    return options


def answer(connection: Connection, request: Request, accept: str | None) -> None:
    """Answer the opening handshake's request: a route's response, a refusal, or the
    upgrade, after which the handler runs (see ``ListenerConfig``).

    ``accept`` is the ``Sec-WebSocket-Accept`` value of an upgrade that the quick
    reading (``handshake.read_upgrade``) checked; None for a request the library read,
    which then checks the upgrade and builds the response.
    """
    try:
        answer = connection.config.process_request(connection, request)
    except Exception:
        logger.exception("process_request failed")
        answer = _failed(connection)
    if answer is not None and inspect.isawaitable(answer):
        task = connection.loop.create_task(_answer_later(connection, request, answer, accept))
        connection.config.tasks.add(task)
        task.add_done_callback(connection.config.task_done)
        return
    _respond(connection, request, answer, accept)


async def _answer_later(
    connection: Connection, request: Request, answer: Awaitable[Response], accept: str | None
) -> None:
    try:
        response = await answer
    except Exception:
        logger.exception("process_request failed")
        response = _failed(connection)
    _respond(connection, request, response, accept)


def _failed(connection: Connection) -> Response:
    return connection.protocol.reject(
        http.HTTPStatus.INTERNAL_SERVER_ERROR,
        "Failed to open a WebSocket connection.\nSee server log for more information.\n",
    )


def _respond(
    connection: Connection, request: Request, response: Response | None, accept: str | None
) -> None:
    config = connection.config
    if not connection.opening or connection.transport.is_closing():
        # Gone or dropped while a route was answering, or ended by the library while it
        # read the request (a close frame behind it, say): nothing more to write.
        return
    if response is None and accept is None:
        response = connection.protocol.accept(request)
    status = http.HTTPStatus.SWITCHING_PROTOCOLS if response is None else response.status_code
    try:
        config.process_response(connection, request, status)
    except Exception:
        logger.exception("process_response failed")
        response = _failed(connection)
    opening = response is None or response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS
    if opening and not config.serving:
        response = connection.protocol.reject(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n"
        )
    if response is None:
        # The quick reading's upgrade: a protocol that starts open, and the response
        # the library would have written.
        assert accept is not None
        connection.protocol = ServerProtocol(
            state=State.OPEN, max_size=config.max_size, logger=config.protocol_logger
        )
        connection.held = switching_protocols(accept)
    else:
        connection.protocol.send_response(response)
    if connection.deadline is not None:
        connection.deadline.cancel()
        connection.deadline = None
    if connection.protocol.state is not State.OPEN:
        connection.send_data()  # the refusal, then the end of the stream
        return
    # Open: the response is held for the handler's first message to take along
    # (``write_first``, from the handler's synchronous start); if it sent nothing, the
    # response goes out now.
    request.headers = _NO_HEADERS
    handler = config.handler(connection)
    if isinstance(handler, Waiting):
        connection.waiting = handler  # started by the client's first message
    else:
        config.run(connection, handler)
    connection.send_data()


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented text frame, as the server side sends it.

    Written straight to a transport, it is what ``send()`` would write: server frames
    are unmasked and, with compression off, no extension alters them.
    """
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


def write_first(connection: Connection, frame: bytes) -> None:
    """Write ``frame`` as the first message of an open connection, in one write with the
    handshake's response, which the connection holds until then: one segment, one system
    call, where two would each wake the client."""
    connection.send_data(frame)
