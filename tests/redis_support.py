"""A real ``redis-server`` on a free loopback port, started, killed and restarted by tests.

Debian's ``redis-server`` package; the tests that need it skip without it (and fail under
REALTIME_TESTS_NO_SKIP=1, as in CI).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HAVE_REDIS = Path(REDIS_SERVER).is_file()
needs_redis = pytest.mark.skipif(
    not HAVE_REDIS, reason="needs redis-server (Debian package redis-server)"
)


ACL_RULES = (
    "resetkeys",
    "~session-buddy-realtime:*",
    "resetchannels",
    "&session-buddy-realtime:*",
    "-@all",
    "+@connection",
    "+get",
    "+set",
    "+del",
    "+pexpire",
    "+publish",
    "+subscribe",
    "+unsubscribe",
    "+eval",
    "+evalsha",
    "+script|load",
    "+zadd",
    "+zremrangebyscore",
    "+zrevrangebyscore",
    "+time",
)
"""The least an ACL user needs for the default prefix, as docs/scaling.md lists it."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisProcess:
    """One ``redis-server``: no persistence, loopback only, logs in ``folder``.

    Args:
        folder: Where its log (and TLS files, if any) live.
        password: ``requirepass`` for the default user.
        acl_user: ``(name, password)`` of an ACL user limited to the stream's keys and
            channels; the default user is then disabled.
        tls: ``(cert, key, ca)`` files: serve TLS only (``rediss://``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        acl_user: tuple[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.folder = folder
        self.password = password
        self.acl_user = acl_user
        self.tls = tls
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use (with the credentials, and the CA for TLS)."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.acl_user is not None:
            auth = f"{self.acl_user[0]}:{self.acl_user[1]}@"
        elif self.password is not None:
            auth = f":{self.password}@"
        query = f"?ssl_ca_certs={self.tls[2]}" if self.tls else ""
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{auth}{host}:{self.port}/0{query}"

    def start(self) -> None:
        """Start it (on the same port as before, after a kill) and wait until it answers."""
        command = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.folder),
            "--logfile", str(self.folder / f"redis-{self.port}.log"),
        ]  # fmt: skip
        if self.tls is not None:
            cert, key, ca = self.tls
            command += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.acl_user is not None:
            name, secret = self.acl_user
            # Each word its own argument: redis-server joins them into one config line.
            command += ["--user", "default", "off"]
            command += ["--user", name, "on", f">{secret}", *ACL_RULES]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise RuntimeError(f"redis-server exited: {err.decode(errors='replace')}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on {self.port} in {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no goodbye to its clients, its data gone (nothing is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)
        self._forget()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._forget()

    def _forget(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def cli(self) -> object:
        """A synchronous ``redis`` client for the test's own reads and writes."""
        import redis

        return redis.Redis.from_url(self.url)


@contextlib.contextmanager
def running_redis(folder: Path, **options: object) -> Iterator[RedisProcess]:
    """A started ``RedisProcess``, stopped on exit."""
    server = RedisProcess(folder, **options)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
