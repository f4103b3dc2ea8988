"""The one contract every transport adapter implements.

An adapter translates a native WebSocket (``websockets``, ``aiohttp``, ASGI, in-memory ...) to
:class:`Transport` and does nothing else: no protocol logic lives in adapters. The core owns
framing rules, limits, heartbeat and close codes (protocol.md sections 1 and 6), so behaviour does
not change with the adapter.

Adapter duties, in full:

* Before accepting, build a :class:`HandshakeRequest` (``HandshakeRequest.build`` parses the query
  string and cookies) and call ``Endpoint.authenticate``; on ``AuthenticationFailed`` answer HTTP 403
  and create nothing.
* After accepting, wrap the socket in a :class:`Transport` and ``await endpoint.serve(transport,
  identity)``.
* ``receive()`` returns ``str`` for a text frame and ``bytes`` for a binary frame, and raises
  :class:`~dara_ws_core.exceptions.ConnectionClosed` (with the close code) once the peer is gone,
  whether the native library reports closes as exceptions or as messages.
* ``send(frame)`` sends ``frame`` (UTF-8 JSON) as one **text** frame.
* ``abort()`` drops the TCP connection at once (the native transport's ``abort()``).
* Pass ``ServerConfig.max_message_size`` and the keepalive settings to the native library.

Optional, for speed: ``send_nowait(frame) -> bool`` writes a text frame synchronously if the
native library can take it without waiting (connection open, write buffer below its limit) and
returns ``False`` otherwise, without side effects. With it, a broadcast writes straight to the
sockets of clients that keep up, as ``websockets.broadcast`` does, and queues only for the others.
"""

from __future__ import annotations

__all__ = ["HandshakeRequest", "SupportsSendNowait", "Transport", "parse_cookies"]

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from types import MappingProxyType
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit


@runtime_checkable
class Transport(Protocol):
    """One accepted WebSocket connection, as the core sees it."""

    async def send(self, frame: bytes) -> None:
        """Send ``frame`` (UTF-8 encoded JSON) as one text frame.

        Raises ``ConnectionClosed`` if the connection is closed.
        """

    async def receive(self) -> str | bytes:
        """Wait for the next frame: ``str`` for text, ``bytes`` for binary.

        Raises ``ConnectionClosed`` (with the peer's close code) once the connection is closed.
        """

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and return; idempotent."""

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake: release the socket and its
        buffers. Idempotent, never raises; a no-op once the connection is fully closed.

        The endpoint calls it when a close has not completed within
        ``ServerConfig.close_timeout`` (a peer that does not read).
        """

    @property
    def closed(self) -> bool:
        """Whether the connection is closed or closing."""


@runtime_checkable
class SupportsSendNowait(Protocol):
    """The optional fast path of a transport (see the module docstring)."""

    def send_nowait(self, frame: bytes) -> bool:
        """Write ``frame`` as a text frame now if possible without waiting; else ``False``."""


def parse_cookies(header: str | None) -> dict[str, str]:
    """Parse a ``Cookie`` header; malformed cookies are skipped rather than failing the handshake."""
    if not header:
        return {}
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(part.strip())
        except CookieError:
            continue
        for name, morsel in jar.items():
            cookies[name] = morsel.value
    return cookies


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What an authenticator may read of the opening HTTP request (protocol.md section 5).

    ``headers`` keys are lower-case; the last value wins for repeated query parameters.
    """

    path: str
    query: Mapping[str, str] = field(default_factory=_empty)
    headers: Mapping[str, str] = field(default_factory=_empty)
    cookies: Mapping[str, str] = field(default_factory=_empty)
    remote: tuple[str, int] | None = None

    @classmethod
    def build(
        cls,
        target: str,
        headers: Iterable[tuple[str, str]],
        remote: tuple[str, int] | None = None,
    ) -> HandshakeRequest:
        """Build from a request target (``/path?query``) and raw header pairs."""
        split = urlsplit(target)
        hdrs: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            # Repeated headers are joined as HTTP allows; cookies use "; " per RFC 6265.
            if key in hdrs:
                hdrs[key] += ("; " if key == "cookie" else ", ") + value
            else:
                hdrs[key] = value
        return cls(
            path=split.path or "/",
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers=hdrs,
            cookies=parse_cookies(hdrs.get("cookie")),
            remote=remote,
        )

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header (sent by browsers), or ``None``."""
        return self.headers.get("origin")
