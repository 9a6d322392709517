"""What a connection does with the frames it receives: messages, pongs, and the handler
that waits for them.

Messages wait in a list that ``recv()`` reads, with no coroutine while the client is
quiet; a handler that has nothing to do before the client speaks is not even started
until then (``Waiting``): an idle connection holds no task, and one that ends without a
word never runs its handler.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Coroutine
from typing import Any, Final

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = ["Receiving", "Waiting"]

_MAX_QUEUE: Final = 16
"""Messages received and not yet read at which reading from the socket pauses."""


class Waiting:
    """A handler with nothing to do until its client sends a message."""

    __slots__ = ()

    def start(self) -> Coroutine[Any, Any, None]:
        """What runs from the client's first message (which ``recv()`` gives)."""
        raise NotImplementedError

    def gone(self) -> None:
        """The connection ended before any message: nothing to start."""
        raise NotImplementedError


class Receiving:
    """The receiving half of a ``Connection``."""

    __slots__ = ("_fragments", "_messages", "_pings", "_receiver", "waiting")

    # The connection's.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    protocol: ServerProtocol

    def __init__(self) -> None:
        self.waiting: Waiting | None = None
        """A handler not started yet (``wake`` starts it)."""
        self._messages: list[str | bytes] | None = None
        self._receiver: asyncio.Future[str | bytes] | None = None
        self._fragments: list[Frame] | None = None
        self._pings: dict[bytes, tuple[asyncio.Future[float], float]] | None = None

    def send_data(self, then: bytes = b"") -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Start the ``waiting`` handler: a message has come for it."""
        raise NotImplementedError

    def recv(self) -> Awaitable[str | bytes]:
        """The next message (str for text, bytes for binary).

        Raises:
            ConnectionClosed: the connection closed and every message was read.
        """
        future: asyncio.Future[str | bytes] = self.loop.create_future()
        messages = self._messages
        if messages:
            future.set_result(messages.pop(0))
            if len(messages) <= _MAX_QUEUE // 4 and not self.transport.is_closing():
                self.transport.resume_reading()
            return future
        if self.protocol.state is State.CLOSED:
            raise self.protocol.close_exc
        self._receiver = future
        return future

    async def ping(self) -> asyncio.Future[float]:
        """Send a ping; the future gets the round trip in seconds when the pong comes."""
        data = os.urandom(4)
        self.protocol.send_ping(data)
        self.send_data()
        waiter: asyncio.Future[float] = self.loop.create_future()
        if self._pings is None:
            self._pings = {}
        self._pings[data] = (waiter, self.loop.time())
        return waiter

    def _fail_waiters(self) -> None:
        """The connection is gone: whoever waits for a message or a pong learns it."""
        receiver, pings = self._receiver, self._pings
        if receiver is None and not pings:
            return  # (the exception is made only for someone to receive it)
        self._receiver = self._pings = None
        closed = self.protocol.close_exc
        if receiver is not None and not receiver.done():
            receiver.set_exception(closed)
        for waiter, _ in (pings or {}).values():
            if not waiter.done():
                waiter.set_exception(closed)

    def _frame(self, frame: Any) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode, frame.data)
            else:
                self._fragments = [frame]
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:
                return
            fragments.append(frame)
            if frame.fin:
                self._fragments = None
                self._message(fragments[0].opcode, b"".join(part.data for part in fragments))
        elif opcode is Opcode.PONG:
            self._pong(bytes(frame.data))

    def _message(self, opcode: Opcode, data: bytes) -> None:
        message: str | bytes
        if opcode is Opcode.TEXT:
            try:
                message = bytes(data).decode()
            except UnicodeDecodeError as exc:
                self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                self.send_data()
                return
        else:
            message = bytes(data)
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            self._receiver = None
            receiver.set_result(message)
            return
        if self._messages is None:
            self._messages = []
        self._messages.append(message)
        if len(self._messages) > _MAX_QUEUE:
            self.transport.pause_reading()
        if self.waiting is not None:
            self.wake()

    def _pong(self, data: bytes) -> None:
        pings = self._pings
        if not pings or data not in pings:
            return
        now = self.loop.time()
        # A pong answers its ping and every ping sent before it.
        for sent in list(pings):
            waiter, sent_at = pings.pop(sent)
            if not waiter.done():
                waiter.set_result(now - sent_at)
            if sent == data:
                break
