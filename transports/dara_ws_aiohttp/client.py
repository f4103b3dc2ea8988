"""The client side of the aiohttp adapter: :func:`connect` (for ``DaraClient``)."""

from __future__ import annotations

__all__ = ["connect"]

from collections.abc import Mapping
from typing import Any

import aiohttp

from dara_ws_core.exceptions import AuthenticationFailed

from .transport import AiohttpTransport


async def connect(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    max_size: int = 16 * 1024 * 1024,
    session: aiohttp.ClientSession | None = None,
    **kwargs: Any,
) -> AiohttpTransport:
    """Open a client connection to ``url``; frames over ``max_size`` bytes close it with 1009.

    Without ``session``, one is created and closed with the transport. Other keyword arguments go
    to ``ClientSession.ws_connect`` (e.g. ``timeout=aiohttp.ClientWSTimeout(ws_close=1)``). Raises
    ``AuthenticationFailed`` when the server answers the handshake with 401 or 403, and
    ``aiohttp.ClientError`` (``WSServerHandshakeError`` for other statuses) on other failures.
    """
    owned = None
    if session is None:
        session = owned = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, headers=headers, max_msg_size=max_size, compress=0, **kwargs)
    except BaseException as exc:
        if owned is not None:
            await owned.close()
        if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (401, 403):
            raise AuthenticationFailed(f"handshake rejected with HTTP {exc.status}") from exc
        raise
    return AiohttpTransport(ws, owned)
