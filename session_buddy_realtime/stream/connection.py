"""One accepted connection: an asyncio protocol on the library's sans-I/O ``ServerProtocol``.

The library parses frames, answers pings and closes, and reads any opening request the
quick reading (``handshake``) leaves to it; this class does the I/O around it with as
little per connection as it can: no task until the handler has something to do (see
``receiving``), no coroutine while the client is quiet, queues only when used. Every
accepted socket enters the registry at once (the socket caps apply before any byte is
read), and TLS runs after it is counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from session_buddy_realtime.stream.handshake import read_upgrade
from session_buddy_realtime.stream.receiving import Receiving, Waiting

__all__ = ["Connection", "Handler", "ListenerConfig", "Registry"]

logger = logging.getLogger(__name__)

_WRITE_LIMIT: Final = 32 * 1024
"""Unsent bytes above which ``send()`` waits for the transport to drain."""


class Registry(Protocol):
    """The listener's accounting of connections (``gate.ConnectionRegistry``)."""

    write_limit: int
    connections: set[Connection]
    tls_handshakes: set[asyncio.Task[None]]

    def add(self, connection: Connection) -> None: ...
    def remove(self, connection: Connection) -> None: ...
    def drop(self, connection: Connection, reason: str) -> None: ...


ProcessRequest = Callable[["Connection", Request], Response | Awaitable[Response] | None]
ProcessResponse = Callable[["Connection", Request, int], None]
"""Told the status of the handshake's answer before it is sent."""
Handler = Callable[["Connection"], Coroutine[Any, Any, None] | Waiting]
"""Serves an open connection: its coroutine runs at once, or it is ``Waiting`` for the
client's first message."""


@dataclass(eq=False, slots=True)
class ListenerConfig:
    """What every connection of one listener shares: its settings and its hooks."""

    registry: Registry
    answer: Callable[[Connection, Request, str | None], None]
    """Answers the opening handshake's request (``opening.answer``), given the
    ``Sec-WebSocket-Accept`` value of an upgrade the quick reading checked."""
    handler: Handler
    process_request: ProcessRequest
    process_response: ProcessResponse
    max_size: int
    open_timeout: float
    close_timeout: float
    protocol_logger: logging.Logger
    tls: ssl.SSLContext | None = None
    serving: bool = True
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """Handler tasks and asynchronous routes still running."""
    settled: Callable[[], None] = lambda: None
    """Called when a connection is gone or one of ``tasks`` ended (see ``Listener``)."""

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished task of ``tasks``."""
        self.tasks.discard(task)
        self.settled()

    def run(self, connection: Connection, handler: Coroutine[Any, Any, None]) -> None:
        """Run a connection's handler in a task of ``tasks``; when it returns, the
        connection is closed (1011 if it failed)."""
        task = connection.loop.create_task(handler)
        self.tasks.add(task)
        task.add_done_callback(functools.partial(_handler_done, connection))


def _handler_done(connection: Connection, task: asyncio.Task[Any]) -> None:
    failed = None if task.cancelled() else task.exception()
    if failed is not None and not isinstance(failed, ConnectionClosed):
        logger.error("connection handler failed", exc_info=failed)
    if connection.protocol.state is State.OPEN:
        connection.protocol.send_close(
            CloseCode.INTERNAL_ERROR if failed is not None else CloseCode.NORMAL_CLOSURE
        )
        connection.send_data()
    connection.config.task_done(task)


class Connection(Receiving, asyncio.Protocol):
    """One TCP connection: its handshake, its frames, and what the rest of the server uses
    of it (``send``, ``recv``, ``ping``, ``close``, ``transport``, ``protocol.state``).

    It is dropped when the peer sends data (a ping frame each time, say) while
    ``write_limit`` bytes are waiting for it: a client that does not read cannot make
    the server queue replies for ever.
    """

    __slots__ = (
        "_closed",
        "_drained",
        "_lost",
        "_protocol",
        "config",
        "deadline",
        "early",
        "held",
        "loop",
        "transport",
        "unread",
    )

    def __init__(self, config: ListenerConfig) -> None:
        super().__init__()
        self.config = config
        self.loop = asyncio.get_running_loop()
        self._protocol: ServerProtocol | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on accept
        self.early: list[bytes] | None = None
        """Data that arrived between the TLS handshake and the connection taking it over."""
        self.deadline: asyncio.TimerHandle | None = None
        """The opening handshake's deadline, then the closing handshake's."""
        self.unread = True  # nothing received yet: the first bytes may get the quick reading
        self.held: bytes | None = None
        """A 101 response not yet written (see ``send_data``)."""
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._lost = False

    # What the server uses

    @property
    def protocol(self) -> ServerProtocol:
        """The library's protocol for this connection, made when first asked for: an
        upgrade that the quick reading answers never needs one for its handshake."""
        protocol = self._protocol
        if protocol is None:
            config = self.config
            protocol = ServerProtocol(max_size=config.max_size, logger=config.protocol_logger)
            self._protocol = protocol
        return protocol

    @protocol.setter
    def protocol(self, protocol: ServerProtocol) -> None:
        self._protocol = protocol

    @property
    def opening(self) -> bool:
        """Whether the opening handshake is still under way."""
        protocol = self._protocol
        return protocol is None or protocol.state is State.CONNECTING

    @property
    def remote_address(self) -> Any:
        """The peer's address, as the socket gives it."""
        return self.transport.get_extra_info("peername")

    async def send(self, message: str | bytes) -> None:
        """Send one message; waits while the client's unsent data is over the limit.

        Raises:
            ConnectionClosed: the connection is closing or closed.
        """
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            await self.wait_closed()
            raise protocol.close_exc
        if isinstance(message, str):
            protocol.send_text(message.encode())
        else:
            protocol.send_binary(message)
        self.send_data()
        if self._drained is not None:
            await self._drained
        if cast(State, protocol.state) is State.CLOSED:  # closed while it drained
            raise protocol.close_exc

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame and wait until the connection is closed (the closing
        handshake has ``close_timeout``, then the socket is dropped)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.send_data()
        elif self.opening:
            self.transport.abort()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the TCP connection is closed."""
        if self._lost:
            return
        if self._closed is None:
            self._closed = self.loop.create_future()
        await asyncio.shield(self._closed)

    def send_data(self, then: bytes = b"") -> None:
        """Write a held response, what the protocol has to send, then ``then`` (a
        prebuilt frame), in one write; close at the protocol's end of stream."""
        chunks = self.protocol.data_to_send()
        ending = bool(chunks) and not chunks[-1]
        if self.held is not None:
            chunks.insert(0, self.held)
            self.held = None
        if then:
            chunks.append(then)
        if chunks:
            transport = self.transport
            data = b"".join(chunks)
            if data:
                transport.write(data)
            if ending:
                # The library is done with the stream (the closing handshake is over, or
                # it failed the connection): close it once what is written has gone,
                # rather than half-close and wait for the client's end, which the kernel
                # takes care of. (A client that sends after its close frame gets a reset.)
                transport.close()
        if self.deadline is None and self.protocol.state is State.CLOSING and self.config.serving:
            # The closing handshake gets close_timeout; then the socket is dropped. (Once
            # the listener closes, its own deadline covers every connection.)
            self.deadline = self.loop.call_later(self.config.close_timeout, self.transport.abort)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (other event loops' need not subclass asyncio.Transport).
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(_WRITE_LIMIT)
        config = self.config
        config.registry.add(self)
        if transport.is_closing():  # dropped at accept
            return
        if config.tls is None:
            self.deadline = self.loop.call_later(config.open_timeout, self._opening_timed_out)
            return
        # Until TLS is up the connection holds the raw transport, so that the caps,
        # drop() and stop() treat it as any other.
        self.early = []
        task = self.loop.create_task(self._start_tls(transport))
        config.registry.tls_handshakes.add(task)
        task.add_done_callback(config.registry.tls_handshakes.discard)

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        config = self.config
        assert config.tls is not None
        timeout = config.open_timeout
        try:
            async with asyncio.timeout(timeout + 1.0):  # ssl_handshake_timeout's backstop
                secure = await self.loop.start_tls(
                    transport, self, config.tls, server_side=True, ssl_handshake_timeout=timeout
                )
        except OSError:  # SSL errors, resets, and the handshake timeout (TimeoutError)
            transport.abort()
            self._forget()
            return
        if secure is None or transport.is_closing():
            self._forget()
            return
        early, self.early = self.early or [], None
        self.transport = secure
        secure.set_write_buffer_limits(_WRITE_LIMIT)
        self.deadline = self.loop.call_later(timeout, self._opening_timed_out)
        for data in early:
            self.data_received(data)

    def _opening_timed_out(self) -> None:
        if self.opening:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
            return
        registry = self.config.registry
        if self.transport.get_write_buffer_size() > registry.write_limit:
            registry.drop(self, "not_reading")
            return
        if self.unread:
            self.unread = False
            # (The library's reading logs each header when its logger is at DEBUG.)
            debug = self.config.protocol_logger.isEnabledFor(logging.DEBUG)
            upgrade = None if debug else read_upgrade(data)
            if upgrade is not None:
                self.config.answer(self, upgrade.request, upgrade.accept)
                return
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self.send_data()
        for event in events:
            if isinstance(event, Request):
                self.config.answer(self, event, None)
            elif protocol.state is not State.CONNECTING:
                self._frame(event)

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self.send_data()

    def wake(self) -> None:
        waiting = self.waiting
        if waiting is not None:
            handler = waiting.start()  # should it fail, connection_lost still calls gone()
            self.waiting = None
            self.config.run(self, handler)

    def _forget(self) -> None:
        self.config.registry.remove(self)
        self.config.settled()

    def connection_lost(self, exc: Exception | None) -> None:
        protocol = self.protocol
        protocol.receive_eof()  # idempotent; the state is CLOSED from here on
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            try:
                waiting.gone()
            except Exception:
                logger.exception("connection handler failed")
        self._forget()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.early is not None:  # the TLS handshake never finished
            self.early = None
            return
        self._fail_waiters()
        self._resume()
        self._lost = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self._resume()

    def _resume(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)
