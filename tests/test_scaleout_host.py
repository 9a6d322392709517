"""Scale-out from the host's side: the MCP tool's ``redis_url``, the settings, no extra."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import aiosqlite
import pytest

from session_buddy_realtime import RealTimeMetricsServer
from tests.conftest import INTERVAL, ClientFactory, update_where, url_of
from tests.mcp_support import SERVER_KINDS
from tests.redis_support import RedisProcess
from tests.test_scaleout import FAST
from tests.test_tools import host_db, hosted  # noqa: F401 - host_db is a fixture


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_realtime_start_with_a_redis_url_makes_the_host_a_producer(
    kind: str,
    host_db: aiosqlite.Connection,  # noqa: F811
    redis_server: RedisProcess,
    open_client: ClientFactory,
) -> None:
    """``realtime_start(redis_url=...)`` publishes the host's stream: the status shows the
    lease held, and an edge's client receives the host's skills."""
    async with hosted(kind, db=host_db) as (session, _):
        started = await session.call("realtime_start", {"redis_url": redis_server.url})
        assert not started.is_error, started.text
        assert started.structured["server_role"] == "producer"
        async with RealTimeMetricsServer(
            "127.0.0.1", 0, update_interval=INTERVAL, redis_url=redis_server.url, edge=True,
            redis_timings=FAST,
        ) as edge:  # fmt: skip
            client = await open_client(url_of(edge))
            update = await update_where(client, lambda u: u["source"]["state"] == "ok")
            assert update["data"]["top_skills"][0]["skill_name"] == "pytest-run"
        status = (await session.call("realtime_status", {})).structured
        assert status["redis"]["lease"]["held"] is True
        assert status["redis"]["url"] == redis_server.url
        again = await session.call("realtime_start", {"redis_url": "redis://other.example:6379"})
        assert "redis_url=redis://other.example:6379 was not applied" in again.structured["note"]


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_bad_redis_url_argument_names_it_without_the_password(
    kind: str,
    host_db: aiosqlite.Connection,  # noqa: F811
) -> None:
    """A URL of the wrong scheme, or not a string, is refused in one line naming
    ``redis_url``; a password in it is never echoed."""
    async with hosted(kind, db=host_db) as (session, _):
        wrong = await session.call("realtime_start", {"redis_url": "http://me:hunter2@host"})
        assert wrong.is_error
        assert "redis_url" in wrong.text
        assert "hunter2" not in wrong.text
        number = await session.call("realtime_start", {"redis_url": 6379})
        assert number.is_error
        assert "redis_url must be a redis://" in number.text
        status = (await session.call("realtime_status", {})).structured
        assert status["running"] is False


async def test_the_redis_url_setting_makes_the_host_a_producer(
    host_db: aiosqlite.Connection,  # noqa: F811
    redis_server: RedisProcess,
) -> None:
    """``SESSION_BUDDY_REALTIME_REDIS_URL`` is used when the tool is given no URL; the
    status shows the role before the start, and the lease once started."""
    settings = {"SESSION_BUDDY_REALTIME_REDIS_URL": redis_server.url}
    async with hosted(SERVER_KINDS[0], db=host_db, settings=settings) as (session, _):
        before = (await session.call("realtime_status", {})).structured
        assert (before["server_role"], before["redis"]["connected"]) == ("producer", False)
        await session.call("realtime_start", {})

        async def held() -> bool:
            status = (await session.call("realtime_status", {})).structured
            return bool(status["redis"]["lease"]["held"])

        async with asyncio.timeout(10):  # the first claim is made within a second
            while not await held():  # noqa: ASYNC110 - polls the tool, bounded
                await asyncio.sleep(0.05)


def test_the_package_runs_without_the_redis_extra() -> None:
    """Without the ``redis`` package, everything imports and serves; only a Redis URL fails,
    at start, saying which extra to install."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["redis"] = None  # as if not installed
        import session_buddy_realtime.cli, session_buddy_realtime.plugin
        from session_buddy_realtime import RealTimeMetricsServer, RealtimeError

        async def main():
            async with RealTimeMetricsServer(port=0):
                pass
            server = RealTimeMetricsServer(port=0, redis_url="redis://127.0.0.1:1")
            try:
                await server.start()
            except RealtimeError as exc:
                print("refused:", exc)
            assert not server.running

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "install session-buddy-realtime[redis]" in result.stdout
