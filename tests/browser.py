"""A small headless-Chromium driver over the DevTools protocol (no dependency beyond websockets).

``Chromium.start()`` launches Debian's ``/usr/bin/chromium`` with a fresh profile and
``--remote-debugging-port=0``, reads the port it chose from ``DevToolsActivePort``, and
``new_page()`` opens a tab and connects to its ``webSocketDebuggerUrl``. A ``Page`` sends
commands (``Page.navigate``, ``Runtime.evaluate``, ``Input.*``, ``Emulation.*``), keeps the
events that tell a test something went wrong (uncaught exceptions, CSP violations,
dialogs such as an ``alert`` that injected markup would open), and waits on conditions
with a deadline, never on a bare sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["CHROMIUM", "BrowserError", "Chromium", "Page"]

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's package ``chromium``; tests skip (fail in CI) without it."""

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
)
_POLL = 0.02
_COMMAND_TIMEOUT = 15.0


class BrowserError(RuntimeError):
    """The browser failed to start, a command failed, or a condition never came true."""


class Chromium:
    """A headless Chromium process with its own throwaway profile."""

    def __init__(self, process: subprocess.Popen[bytes], profile: Path, port: int) -> None:
        self.process = process
        self.profile = profile
        self.port = port

    @classmethod
    def start(cls, executable: Path = CHROMIUM, timeout: float = 30.0) -> Chromium:
        """Launch the browser and wait (bounded) until its DevTools port is known."""
        profile = Path(tempfile.mkdtemp(prefix="realtime-chromium-"))
        process = subprocess.Popen(
            [str(executable), *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                port = int(active.read_text().splitlines()[0])
                return cls(process, profile, port)
            if process.poll() is not None or time.monotonic() > deadline:
                cls._stop(process, profile)
                raise BrowserError(f"chromium did not start (exit code {process.returncode})")
            time.sleep(_POLL)  # polling a file the browser writes, under a deadline

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        self._stop(self.process, self.profile)

    @staticmethod
    def _stop(process: subprocess.Popen[bytes], profile: Path) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(profile, ignore_errors=True)

    def _http(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return json.loads(response.read() or b"null")

    async def new_page(self) -> Page:
        """Open a new blank tab and connect to it."""
        target = await asyncio.to_thread(self._http, "/json/new?about:blank", "PUT")
        socket = await connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        page = Page(self, target["id"], socket)
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page

    def close_target(self, target_id: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._http(f"/json/close/{target_id}")


class Page:
    """One tab: commands, the events worth checking, and bounded waits."""

    def __init__(self, browser: Chromium, target_id: str, socket: ClientConnection) -> None:
        self.browser = browser
        self.target_id = target_id
        self.socket = socket
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.exceptions: list[str] = []
        """Uncaught JavaScript exceptions and ``console.error`` calls."""
        self.violations: list[str] = []
        """Content-Security-Policy violations reported by the browser."""
        self.console: list[str] = []
        """Text of ``console.log``/``info`` calls, in order (arguments joined by spaces)."""
        self.dialogs: list[str] = []
        """Messages of ``alert``/``confirm``/``prompt`` dialogs (dismissed at once)."""
        self.loaded = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.socket:
                message = json.loads(raw)
                future = self.waiting.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(message)
                elif "method" in message:
                    self._event(message["method"], message.get("params", {}))
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self.loaded.set()
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.exceptions.append(str(description))
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(arg["value"]) if "value" in arg else str(arg.get("description"))
                for arg in params.get("args", [])
            )
            if params.get("type") == "error":
                self.exceptions.append(text)
            elif params.get("type") in {"log", "info"}:
                self.console.append(text)
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if "Content Security Policy" in entry.get("text", ""):
                self.violations.append(entry["text"])
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            asyncio.get_running_loop().create_task(
                self.send("Page.handleJavaScriptDialog", accept=False)
            )

    async def send(self, method: str, /, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (within 15 s)."""
        ident = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        await self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(_COMMAND_TIMEOUT):
            reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Load ``url`` and wait for its load event."""
        self.loaded.clear()
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        async with asyncio.timeout(timeout):
            await self.loaded.wait()

    async def reload(self, timeout: float = 15.0) -> None:
        """Reload the page (as a person pressing F5) and wait for its load event."""
        self.loaded.clear()
        await self.send("Page.reload")
        async with asyncio.timeout(timeout):
            await self.loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} raised {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy and return its value; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = await self.text()
                raise AssertionError(
                    f"after {timeout} s, still false: {what or expression}\n"
                    f"--- the page shows ---\n{text}"
                )
            await asyncio.sleep(_POLL)  # the next poll of a bounded wait

    async def wait_for_console(self, line: str, timeout: float = 10.0) -> None:
        """Wait until the page has logged exactly ``line``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while line not in self.console:
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout} s, {line!r} not logged: {self.console}")
            await asyncio.sleep(_POLL)  # the next poll of a bounded wait

    async def text(self, selector: str = "body") -> str:
        """What a person reads in ``selector`` (its innerText)."""
        value = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"
        )
        return str(value)

    async def click(self, selector: str) -> None:
        """Click the element (as a person would with the mouse or Enter on a button)."""
        found = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        if not found:
            raise BrowserError(f"nothing to click at {selector!r}")

    async def type(self, selector: str, text: str) -> None:
        """Focus a field, clear it, and type ``text`` into it (input events fire)."""
        await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.focus(); e.select?.(); })()"
        )
        await self.send("Input.insertText", text=text)

    async def press(self, key: str) -> None:
        """Press and release a key on the focused element: "Enter", "Tab", "Escape"..."""
        codes = {"Enter": 13, "Tab": 9, "Escape": 27, "ArrowDown": 40, "ArrowUp": 38}
        common: dict[str, Any] = {"key": key, "code": key, "windowsVirtualKeyCode": codes[key]}
        down = {**common, "text": "\r"} if key == "Enter" else common
        await self.send("Input.dispatchKeyEvent", type="keyDown", **down)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    async def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Emulate a screen of ``width`` x ``height`` CSS pixels (a phone when ``mobile``)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2 if mobile else 1,
            mobile=mobile,
        )

    async def color_scheme(self, scheme: str) -> None:
        """Emulate ``prefers-color-scheme: light`` or ``dark``."""
        await self.send(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-color-scheme", "value": scheme}],
        )

    async def screenshot(self, path: Path, *, full_page: bool = True) -> None:
        """Write a PNG of the page (the whole page when ``full_page``)."""
        result = await self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=full_page
        )
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))

    async def close(self) -> None:
        """Close the DevTools connection and the tab."""
        await self.socket.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await asyncio.to_thread(self.browser.close_target, self.target_id)
