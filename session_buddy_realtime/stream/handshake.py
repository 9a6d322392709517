"""The common opening request, read in one step: a well-formed WebSocket upgrade.

Nearly every client sends the same request: ``GET``, HTTP/1.1, a handful of headers,
all in its first segment. ``read_upgrade`` reads exactly that, more strictly than the
library's parser, and says None to anything else (a route's request, a request in
pieces, an unusual header, anything malformed), which then goes to the library as if
this module did not exist: its answers, refusals and error messages stay the authority.
What this reader accepts, the library would accept too, with the same response.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.utils import accept_key

__all__ = ["Upgrade", "read_upgrade", "switching_protocols"]

_MAX_HEAD: Final = 8192
"""Bytes of request line and headers that the quick reading takes (the library's limit
is per line; a longer head is read by it)."""
_MAX_FIELDS: Final = 64

_REQUEST_LINE: Final = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n")
"""An origin-form target of visible ASCII (RFC 9112 section 3.2.1)."""
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELDS: Final = re.compile(rb"(?:" + _TOKEN + rb":[\x09\x20-\x7e\x80-\xff]*\r\n)+\r\n")
"""Field lines without obsolete folding (RFC 9110 section 5.5, as the library reads
them: the value's surrounding blanks are not part of it)."""
_OPTIONS: Final = re.compile(
    (rb"[ \t]*" + _TOKEN + rb"(?:[ \t]*,[ \t]*" + _TOKEN + rb")*[ \t]*").decode()
)
"""A ``Connection`` value: a plain list of options, without empty elements."""
_KEY: Final = re.compile(r"[A-Za-z0-9+/]{22}==")
"""Sixteen bytes in base64: what RFC 6455 section 4.1 asks of ``Sec-WebSocket-Key``."""


@dataclass(slots=True)
class Upgrade:
    """A well-formed upgrade request, and what the 101 response will carry."""

    request: Request
    accept: str
    """The ``Sec-WebSocket-Accept`` value."""


def read_upgrade(data: bytes) -> Upgrade | None:
    """The upgrade request that is all of ``data``, or None for the library to read.

    (A client sends nothing more before the response: RFC 6455 section 4.1.)
    """
    end = len(data) - 4
    if end > _MAX_HEAD or not data.endswith(b"\r\n\r\n"):
        return None
    line = _REQUEST_LINE.match(data)
    if line is None or not _FIELDS.fullmatch(data, line.end(), end + 4):
        return None
    fields = data[line.end() : end].split(b"\r\n")
    if len(fields) > _MAX_FIELDS:
        return None
    headers = Headers()
    for field in fields:
        name, _, value = field.partition(b":")
        # Checked by _FIELDS: a token, then a value of allowed octets.
        headers.set_insecure(name.decode(), value.strip(b" \t").decode("iso-8859-1"))
    key = _upgrade_key(headers)
    if key is None:
        return None
    return Upgrade(Request(line[1].decode(), headers), accept_key(key))


def _upgrade_key(headers: Headers) -> str | None:
    """The ``Sec-WebSocket-Key`` of a plain upgrade to WebSocket version 13, else None."""
    get = headers.get_all
    if get("Sec-WebSocket-Protocol") or get("Transfer-Encoding") or get("Content-Length"):
        return None  # a subprotocol to negotiate, or a body: the library's to answer
    if len(get("Origin")) > 1:
        return None  # the library refuses a repeated Origin
    upgrade, version, key = get("Upgrade"), get("Sec-WebSocket-Version"), get("Sec-WebSocket-Key")
    if len(upgrade) != 1 or upgrade[0].lower() != "websocket":
        return None
    if version != ["13"] or len(key) != 1 or not _KEY.fullmatch(key[0]):
        return None
    connection = get("Connection")
    if not all(_OPTIONS.fullmatch(value) for value in connection):
        return None  # the library refuses the whole request for one malformed value
    options = (option.strip().lower() for value in connection for option in value.split(","))
    return key[0] if "upgrade" in options else None


_date: tuple[int, bytes] = (0, b"")


def switching_protocols(accept: str) -> bytes:
    """The 101 response to an upgrade, as the library would write it."""
    global _date
    second = int(time.time())
    if _date[0] != second:  # the Date header changes once a second
        _date = (second, email.utils.formatdate(second, usegmt=True).encode())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nDate: %s\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % (_date[1], accept.encode())
    )
