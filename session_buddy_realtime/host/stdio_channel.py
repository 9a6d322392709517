"""The stdio channel of an MCP server: stdout for the protocol only, input a signal can end.

MCP's stdio transport (``mcp.server.stdio``) writes to ``sys.stdout.buffer`` and reads
``sys.stdin.buffer`` line by line in a worker thread. Two things follow that these helpers
fix for a host that serves stdio:

- anything else printed to stdout corrupts the channel, and Session-Buddy prints while it
  loads (``protect_stdout``);
- a blocked read cannot be cancelled, so on SIGINT or SIGTERM the server would wait for
  the client's next line before it stops; ``EndableInput`` ends the input instead, so the
  server stops as at the end of input, through its lifespan and the plugins' shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import IO, Any, Final

__all__ = ["EndableInput", "protect_stdout", "serve_until_signal"]

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def protect_stdout() -> None:
    """Send everything written to stdout to stderr, except what the MCP transport writes.

    From here on file descriptor 1 is stderr, and ``sys.stdout`` is a text stream to
    stderr whose ``buffer`` (what the transport writes to) is the real stdout.
    """
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = _TransportStdout(sys.stdout, protocol)


def restore_stdout() -> None:
    """Undo ``protect_stdout`` (before running another program in this process's place)."""
    if isinstance(sys.stdout, _TransportStdout):
        os.dup2(sys.stdout.buffer.fileno(), 1)


class _TransportStdout:
    """``sys.stdout`` while serving over stdio: text to stderr, ``buffer`` to the client."""

    def __init__(self, text: IO[str], protocol: IO[bytes]) -> None:
        self._text = text
        self.buffer = protocol

    def write(self, text: str) -> int:
        return self._text.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text, name)


class EndableInput:
    """``sys.stdin`` fed from the real stdin by a daemon thread, until the end or ``end()``.

    The transport reads a pipe of ours; ``end()`` makes that pipe reach its end, as if
    the client had closed stdin.
    """

    def __init__(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        read_end, self._write_end = os.pipe()
        sys.stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"), encoding="utf-8")
        threading.Thread(target=self._pump, name="stdin", daemon=True).start()

    def end(self) -> None:
        """End the input now (safe from a signal handler; harmless twice)."""
        with contextlib.suppress(OSError):  # already ended
            os.write(self._wake_write, b"x")

    def _pump(self) -> None:
        # Only this thread writes or closes the pipe's write end: no race with end().
        try:
            while True:
                ready = select.select([0, self._wake_read], [], [])[0]
                if self._wake_read in ready:
                    return
                chunk = os.read(0, 65536)
                if not chunk:
                    return
                os.write(self._write_end, chunk)
        except OSError:
            return
        finally:
            os.close(self._write_end)


def serve_until_signal(serve: Callable[[], Awaitable[None]]) -> int:
    """Run ``serve()`` (a stdio server) until its input ends; SIGINT, SIGTERM or SIGHUP ends it.

    The first signal ends the input, so the server stops as a client closing stdin would
    stop it; a second one stops the process at once (the default action).
    """
    stdin = EndableInput()

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            stdin.end()
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop)
        try:
            await serve()
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    return 0
