"""Make docs/dashboard.png: the dashboard of ``serve --demo``, taken by headless Chromium.

Run from the repository's top folder (not collected by pytest: no ``test_`` prefix)::

    .venv/bin/python -m tests.screenshot

It starts ``session-buddy-realtime serve --demo`` in a temporary folder on a free port,
opens http://127.0.0.1:PORT/ at laptop size in light mode, waits until the page is live,
its activity chart is filled and an anomaly shows, and writes the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.browser import CHROMIUM, Chromium

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 900


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _command() -> list[str]:
    script = Path(sys.executable).with_name("session-buddy-realtime")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "session_buddy_realtime.cli"]


async def _wait_for_output(process: asyncio.subprocess.Process, text: str, timeout: float) -> None:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while line := await process.stdout.readline():
            if text in line.decode(errors="replace"):
                return
    raise RuntimeError(f"the server exited before printing {text!r}")


async def take(out: Path, timeout: float) -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="realtime-demo-") as folder:
        # The demo without a token, whatever the environment says.
        env = {k: v for k, v in os.environ.items() if k != "SESSION_BUDDY_REALTIME_TOKEN"}
        process = await asyncio.create_subprocess_exec(
            *_command(),
            "serve",
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            cwd=folder,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        browser = None
        try:
            await _wait_for_output(process, "Streaming skill metrics", 30)
            browser = Chromium.start()
            page = await browser.new_page()
            await page.viewport(WIDTH, HEIGHT)
            await page.color_scheme("light")
            await page.navigate(f"http://127.0.0.1:{port}/")
            await page.wait_for(
                "document.getElementById('status-text').textContent === 'Live'"
                " && document.querySelectorAll('#skills-body tr').length === 10"
                " && document.getElementById('activity').dataset.mode !== 'waiting'"
                " && document.querySelectorAll('#anomaly-list li').length > 0",
                timeout,
                "live, with the top 10, the activity chart and an anomaly",
            )
            # A few more updates, for a fuller picture; not required.
            with contextlib.suppress(AssertionError):
                await page.wait_for("document.querySelectorAll('#anomaly-list li').length > 1", 20)
            await page.evaluate("window.scrollTo(0, 0)")
            await page.screenshot(out)
            await page.close()
        finally:
            if browser is not None:
                browser.close()
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument(
        "--timeout", type=float, default=90, help="seconds to wait for an anomaly (90)"
    )
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"error: needs {CHROMIUM} (Debian package chromium)", file=sys.stderr)
        return 1
    asyncio.run(take(args.out, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
