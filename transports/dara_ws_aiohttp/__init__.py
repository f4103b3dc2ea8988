"""aiohttp adapter: serve an endpoint from an aiohttp application, or connect to one as a client.

Server: :func:`add_route` mounts an endpoint on your ``aiohttp.web.Application``; :func:`serve` runs
one on its own socket. Client: :func:`connect`. They translate aiohttp to the core's ``Transport``
contract and hold no protocol logic.

Compression (permessage-deflate) is off: it costs a zlib context per connection and CPU per frame.
aiohttp has one keepalive knob: ``ServerConfig.ping_interval`` is its ``heartbeat``, and the pong
must arrive within half of it (``ping_timeout`` is not used). aiohttp's reader accepts unmasked
client frames; the server side here closes on them with 1002, as RFC 6455 requires (``_masking``).
"""

from __future__ import annotations

__all__ = ["AiohttpTransport", "Server", "add_route", "connect", "serve"]

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

try:
    import aiohttp
    from aiohttp import WSMsgType, web
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_aiohttp needs the aiohttp library: pip install "dara-ws-core[aiohttp]"', name=exc.name
    ) from exc

from dara_ws_core.endpoint import Endpoint
from dara_ws_core.exceptions import AuthenticationFailed, CloseCode, ConnectionClosed
from dara_ws_core.transport import HandshakeRequest, Server

from ._masking import MaskedOnlyResponse


class AiohttpTransport:
    """An aiohttp WebSocket (server or client side) as a :class:`Transport`.

    Built by :func:`add_route` and :func:`connect`; you do not create it yourself. ``session`` is
    a client session owned by the transport, closed with it.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._ws = ws
        self._session = session
        self._local_code: int | None = None  # what we closed with, until the peer echoes it
        self._gone: ConnectionClosed | None = None

    @property
    def closed(self) -> bool:
        return self._gone is not None or self._ws.closed

    def _error(self, code: int | None = None, reason: str = "") -> ConnectionClosed:
        # After our own close, aiohttp reports 1000 whatever code we sent: ours wins.
        code = code or self._local_code or self._ws.close_code or CloseCode.ABNORMAL
        return ConnectionClosed(code, reason)

    async def send(self, frame: bytes) -> None:
        """Send one text frame; raises ``ConnectionClosed`` once the connection is closing."""
        await self._send(frame, WSMsgType.TEXT)

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame (the protocol has none: to test how a server refuses them)."""
        await self._send(data, WSMsgType.BINARY)

    async def _send(self, data: bytes, opcode: WSMsgType) -> None:
        if self.closed:
            raise self._gone or self._error()
        try:
            # send_frame skips send_str's decode/encode round trip: frame is UTF-8 already.
            await self._ws.send_frame(data, opcode)
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError
            raise self._error() from exc

    async def receive(self) -> str | bytes:
        """Return the next text (``str``) or binary (``bytes``) frame.

        aiohttp reports closes as messages; they become ``ConnectionClosed`` with the close code
        (1009 for a frame over ``max_msg_size``).
        """
        if self._gone is not None:
            raise self._gone  # aiohttp raises RuntimeError after a few reads past the close
        msg = await self._ws.receive()
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            return msg.data  # type: ignore[no-any-return]
        # CLOSE carries (code, reason), ERROR the error (1009: too big, whatever close_code says
        # after aiohttp's own close); CLOSING and CLOSED leave the code on the socket.
        if msg.type is WSMsgType.CLOSE:
            self._gone = self._error(msg.data, msg.extra or "")
        elif isinstance(msg.data, aiohttp.WebSocketError):
            self._gone = self._error(msg.data.code, str(msg.data))
        else:
            self._gone = self._error()
        await self._release()
        raise self._gone

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with ``code`` (waits for the peer's echo up to aiohttp's timeout); idempotent."""
        if self._local_code is None:
            self._local_code = code
        try:
            await self._ws.close(code=code, message=reason.encode())
        finally:
            await self._release()

    def abort(self) -> None:
        # aiohttp has no public abort on a WebSocket; its writer holds the socket's transport.
        transport = getattr(getattr(self._ws, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def _release(self) -> None:
        if self._session is not None:
            await self._session.close()


def add_route(app: web.Application, endpoint: Endpoint, path: str | None = None) -> None:
    """Mount ``endpoint`` at ``path`` (default ``endpoint.path``) on ``app``; call before startup.

    A handshake the endpoint rejects gets HTTP 403 before the upgrade. The app's shutdown shuts
    the endpoint down (connections close with 1001).
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        handshake = HandshakeRequest.build(request.raw_path, request.headers.items(), peer)
        try:
            identity = await endpoint.authenticate(handshake)
        except AuthenticationFailed:
            return web.Response(status=403, text="Forbidden")
        config = endpoint.config
        # aiohttp closes a message of exactly max_msg_size (it checks >=): +1 makes the limit
        # inclusive, as on the other transports (the core checks the size again).
        ws = MaskedOnlyResponse(
            max_msg_size=config.max_message_size + 1, heartbeat=config.ping_interval, compress=False
        )
        await ws.prepare(request)
        protocol = request.protocol
        live.add(protocol)
        try:
            await endpoint.serve(AiohttpTransport(ws), identity)
        finally:
            live.discard(protocol)
        return ws

    async def on_shutdown(_: web.Application) -> None:
        # aiohttp's runner marks every connection closing before on_shutdown runs, and a closing
        # connection drops all input: in-flight requests would never be answered. Reopen input
        # on ours before the first await, so the endpoint's graceful shutdown sees the frames.
        for protocol in live:
            if getattr(protocol, "_close", False) is True:
                protocol._close = False
        await endpoint.shutdown()

    live: set[Any] = set()  # the connections being served (RequestHandler has no weakref)
    app.router.add_get(path or endpoint.path, handle)
    app.on_shutdown.insert(0, on_shutdown)


@asynccontextmanager
async def serve(
    endpoint: Endpoint, host: str = "127.0.0.1", port: int = 8000
) -> AsyncIterator[Server[web.AppRunner]]:
    """Serve ``endpoint`` on ``host:port`` for the duration of the ``async with`` block; yields a
    :class:`~dara_ws_core.Server` whose ``native`` is aiohttp's ``AppRunner``.

    On exit the endpoint shuts down (connections close with 1001) and listening stops. Raises
    ``OSError`` if the address cannot be bound.
    """
    app = web.Application()
    add_route(app, endpoint)
    config = endpoint.config
    # keepalive_timeout also bounds a connection that never completes its request (aiohttp arms
    # it at connect): half-open handshakes go after handshake_timeout.
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.shutdown_grace,
        keepalive_timeout=config.handshake_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        port = int(runner.addresses[0][1])
        yield Server.build(host, port, endpoint.path, runner)
    finally:
        for listener in runner.sites:
            await listener.stop()
        await endpoint.shutdown()  # before aiohttp stops reading input (see add_route)
        await runner.cleanup()


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
