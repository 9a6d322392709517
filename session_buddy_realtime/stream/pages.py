"""The dashboard's files: ``GET /`` and ``GET /assets/NAME``, from the package's ``dashboard/``.

Only plain file names of known types are served (``NAME`` is matched against a strict
pattern, never decoded or joined as a path), so nothing outside the folder can be
reached. Every page carries a strict Content-Security-Policy: scripts, styles and images
from the page's own origin only, and connections to that origin and its WebSocket (named
by scheme, host and port, because not every browser counts ``ws:`` as ``'self'``). The
files hold no data, so they are served without a token: the page asks for it.
"""

from __future__ import annotations

import functools
import hashlib
import http
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Final
from urllib.parse import urlsplit

from websockets.http11 import Request, Response

from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.router import HttpRouter, http_response

__all__ = ["ASSETS_PREFIX", "CONTENT_TYPES", "content_security_policy", "install_pages"]

ASSETS_PREFIX: Final = "/assets/"
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
"""The types served; a file of any other type is not."""
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9]+)+")
# A Host header value that can go into a CSP source as it is: a name or an IPv4 address,
# or a bracketed IPv6 address, and an optional port.
_AUTHORITY: Final = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def install_pages(router: HttpRouter) -> None:
    """Serve ``/`` (``index.html``) and ``/assets/NAME`` (the other files) on ``router``."""
    router.add_route("/", _index)
    router.add_route(ASSETS_PREFIX, _asset, prefix=True)


def content_security_policy(host: str | None) -> str:
    """The page's policy: everything from its own origin only, WebSocket included.

    ``host`` is the request's Host header: the page's WebSocket goes to the same host and
    port, as ``ws://`` or, behind TLS, ``wss://``.
    """
    connect = "'self'"
    if host is not None and _AUTHORITY.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _index(connection: Connection, request: Request) -> Response:
    return _serve(request, "index.html")


def _asset(connection: Connection, request: Request) -> Response:
    name = urlsplit(request.path).path.removeprefix(ASSETS_PREFIX)
    return _serve(request, name)


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    etag: str
    content_type: str


@functools.cache
def _dashboard_files() -> dict[str, _File]:
    """Every servable file of the package's dashboard folder, read and hashed once.

    The files ship with the package and do not change while it runs, so no request
    touches the disk (or hashes) again.
    """
    folder = files("session_buddy_realtime") / "dashboard"
    found: dict[str, _File] = {}
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if not entry.is_file() or not _NAME.fullmatch(name) or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        found[name] = _File(body, etag, CONTENT_TYPES[suffix])
    return found


def _serve(request: Request, name: str) -> Response:
    served = _dashboard_files().get(name)
    if served is None:
        return _not_found()
    headers = [
        ("Cache-Control", "no-cache"),
        ("ETag", served.etag),
        ("Content-Security-Policy", content_security_policy(request.headers.get("Host"))),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
    ]
    if served.etag in request.headers.get("If-None-Match", ""):
        response = http_response(http.HTTPStatus.NOT_MODIFIED, b"", served.content_type, headers)
        del response.headers["Content-Length"]
        return response
    return http_response(http.HTTPStatus.OK, served.body, served.content_type, headers)


def _not_found() -> Response:
    return http_response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
