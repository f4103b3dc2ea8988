"""aiohttp adapter: serve an endpoint from an aiohttp application, or connect to one as a client.

Server: :func:`add_route` mounts an endpoint on your ``aiohttp.web.Application``; :func:`serve` runs
one on its own socket. Client: :func:`connect`. They translate aiohttp to the core's ``Transport``
contract and hold no protocol logic.

Compression (permessage-deflate) is off: it costs a zlib context per connection and CPU per frame.
aiohttp has one keepalive knob: ``ServerConfig.ping_interval`` is its ``heartbeat``, and the pong
must arrive within half of it (``ping_timeout`` is not used). aiohttp's reader accepts unmasked
client frames; the server side here closes on them with 1002, as RFC 6455 requires (``_masking``).
A close the server starts lingers until the client's end of stream, at most ``close_timeout``
(``_masking``): aiohttp closed the socket with the client's input still arriving (a reset).
"""

from __future__ import annotations

__all__ = ["AiohttpTransport", "Server", "add_route", "connect", "serve"]

import asyncio
import logging
import ssl as _ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:
    from aiohttp import web
    from aiohttp.abc import AbstractAccessLogger
    from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, HttpProcessingError, LineTooLong
    from aiohttp.web_protocol import RequestHandler
    from aiohttp.web_urldispatcher import PlainResource
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_aiohttp needs the aiohttp library: pip install "dara-ws-core[aiohttp]"', name=exc.name
    ) from exc

from dara_ws_core.endpoint import RETRY_AFTER, Admission, Endpoint, Evict, host_of
from dara_ws_core.exceptions import AuthenticationFailed, EndpointClosed
from dara_ws_core.logs import RepeatedRecords
from dara_ws_core.tls import CountedTLS
from dara_ws_core.transport import HandshakeRequest, Server, SharedBufferReads
from dara_ws_core.upgrade import (
    UNPARSABLE,
    Refusal,
    RequestLine,
    check_target,
    check_upgrade_request,
    parse_request_line,
    read_target,
)

from ._masking import ENDED_BEHIND_REQUEST, LINGERING, MaskedFramesOnly, MaskedOnlyResponse, lingered
from .client import connect
from .transport import DECODE_TEXT_LATER, AiohttpTransport


def add_route(app: web.Application, endpoint: Endpoint, path: str | None = None) -> None:
    """Mount ``endpoint`` at ``path`` (default ``endpoint.path``) on ``app``; call before startup.

    aiohttp's router matches on its decoded path (``/api/core/%77s`` is ``/api/core/ws`` to it,
    ``/api%2Fcore%2Fws`` is not): the handler checks the raw target again
    (:func:`~dara_ws_core.upgrade.check_target`, as every transport does) and answers 404 to one
    that does not name ``path``. A target the router does not route never reaches it (aiohttp's
    own 404); :func:`serve` routes every target to the check. A handshake the endpoint rejects
    gets HTTP 403 before the upgrade. The app's shutdown shuts the endpoint down (connections
    close with 1001).
    """
    _add_route(app, endpoint, path or endpoint.path, any_target=False)


def _add_route(app: web.Application, endpoint: Endpoint, path: str, *, any_target: bool) -> None:
    """:func:`add_route`; with ``any_target``, for :func:`serve`, every request of ``app`` is
    routed here and answered as on every other transport: the upgrade check first, whatever the
    path (aiohttp's router answered 404 before it), then the target."""

    async def handle(request: web.Request) -> web.StreamResponse:
        protocol: Any = request.protocol
        if type(protocol) is RequestHandler:  # an application of the caller's (see _UpgradeHandler)
            protocol.__class__ = _UpgradeHandler
            transport = request.transport
            if transport is not None and not transport.is_closing():
                transport.set_protocol(protocol)  # reads into the shared buffer from now on
        counted = _accepted.get(protocol)
        if counted is not None and counted[0] is endpoint:
            # serve() counted the socket from its accept (_count_sockets): its request is whole.
            _, admission, _, evict = counted
            endpoint.settled(evict)
            if refused := _refused(request) or _not_named(request):
                return refused
            if admission is not Admission.ADMIT:
                return _full()
            return await upgrade(request)
        # An application of the caller's: aiohttp hands over no socket before its request, so
        # max_connections counts from here.
        if refused := _refused(request) or _not_named(request):
            return refused
        host = host_of(request.transport.get_extra_info("peername") if request.transport else None)
        admission = endpoint.take_slot(host)
        try:
            if admission is not Admission.ADMIT:
                return _full()
            return await upgrade(request)
        finally:
            endpoint.free_slot(admission, host)

    async def upgrade(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        handshake = HandshakeRequest.build(request.raw_path, request.headers.items(), peer)
        try:
            identity = await endpoint.authenticate(handshake)
        except EndpointClosed:  # the shutdown overtook it: going away, not refusing the client
            return _full()
        except AuthenticationFailed:
            return web.Response(status=403, text="Forbidden")
        config = endpoint.config
        # aiohttp closes a message of exactly max_msg_size (it checks >=): +1 makes the limit
        # inclusive, as on the other transports (the core checks the size again).
        ws = MaskedOnlyResponse(
            max_msg_size=config.max_message_size + 1, heartbeat=config.ping_interval, compress=False,
            **DECODE_TEXT_LATER,
        )
        ws.dara_close_timeout = config.close_timeout
        ws.dara_charge = charge = endpoint.receiving_charge(identity, host_of(peer))
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The peer left during the upgrade: not a server error, and aiohttp would log one
            # with a traceback per such peer. The answer returned meets the same closed socket,
            # which aiohttp lets go as a premature disconnect (the upgrade cannot be returned:
            # half-prepared, aiohttp's finish would raise on it).
            return web.Response()
        protocol = request.protocol
        live.add(protocol)
        try:
            await endpoint.serve(AiohttpTransport(ws), identity)
        finally:
            live.discard(protocol)
            charge.release()  # the message in progress is not coming
        # Our close lingers until the client's end (aiohttp closes the socket once this returns).
        await ws.dara_lingered()
        return ws

    async def on_shutdown(_: web.Application) -> None:
        # aiohttp's runner marks every connection closing before on_shutdown runs, and a closing
        # connection drops all input: in-flight requests would never be answered. Reopen input
        # on ours before the first await, so the endpoint's graceful shutdown sees the frames.
        for protocol in live:
            if getattr(protocol, "_close", False) is True:
                protocol._close = False
        await endpoint.shutdown()

    async def on_startup(_: web.Application) -> None:
        endpoint.open()  # served again after a shutdown (the application run a second time)

    def _not_named(request: web.Request) -> web.Response | None:
        # The route's own path: a sub-application's prefix included (aiohttp adds it to the
        # resource). A route with parameters ("/ws/{room}") is the router's to match.
        resource = request.match_info.route.resource
        named = path if any_target else resource.canonical if isinstance(resource, PlainResource) else None
        target = request.raw_path  # the target as sent: undecoded, the absolute form too
        refusal = check_target(target, named) if named is not None else read_target(target)
        return _answer(refusal) if isinstance(refusal, Refusal) else None

    live: set[Any] = set()  # the connections being served (RequestHandler has no weakref)
    RepeatedRecords.install(logging.getLogger("aiohttp.websocket"), _NO_SUBPROTOCOL)
    if any_target:
        app.router.add_route("*", "/{target:.*}", handle, expect_handler=_no_expectation)
    else:
        app.router.add_get(path, handle, expect_handler=_no_expectation)
    app.on_startup.append(on_startup)
    app.on_shutdown.insert(0, on_shutdown)


#: aiohttp's warning, for each upgrade offering subprotocols, that none is served (none ever is:
#: protocol.md section 1), with the client's whole list: any peer could write it at will, up to a
#: header line's 8 KiB a connection, where the other transports write nothing. Rate-limited.
_NO_SUBPROTOCOL = ("%s: Client protocols %r don\u2019t overlap server-known ones %r",)


def _refused(request: web.Request) -> web.Response | None:
    """What every transport answers a request that is no upgrade it serves
    (:func:`~dara_ws_core.upgrade.check_upgrade_request`), or ``None``. aiohttp upgrades
    ``HEAD`` and HTTP/1.0 requests, two ``Sec-WebSocket-Key`` headers and drafts 7 and 8, reads
    a body as frames, and answers what it refuses 400."""
    version = request.version
    refusal = check_upgrade_request(request.method, f"{version.major}.{version.minor}", request.headers.items())
    protocol: Any = request.protocol
    line = _lines.pop(protocol, None)  # under serve(): its request line, as sent
    if line is not None:
        # Parsed: aiohttp's own reads again, so that none costs a call more.
        protocol.__class__ = _UpgradeHandler
    if version < (1, 0) or (line is not None and line.ended and parse_request_line(line.text) is None):
        # aiohttp's parser takes a line without a version as HTTP/0.9, and runs of blanks
        # between its parts: no request line to the other transports.
        refusal = UNPARSABLE
    return None if refusal is None else _answer(refusal)


def _answer(refusal: Refusal) -> web.Response:
    response = web.Response(status=refusal.status, text=refusal.text, headers=refusal.headers)
    response.force_close()  # the socket is let go, as on every transport
    return response


async def _no_expectation(request: web.Request) -> None:
    """The route's ``Expect`` handler: none. aiohttp's own answered ``Expect: 100-continue``
    with an interim 100 before the 101 (a WebSocket client takes the 100 for the answer) and
    any other expectation with 417, where every other transport upgrades: an upgrade has no
    body to wait for."""


def _full() -> web.Response:
    """503: the process is full, or its endpoint shut down."""
    return web.Response(status=503, text="Service Unavailable",
                        headers={"Retry-After": str(RETRY_AFTER), "Connection": "close"})


#: The sockets :func:`serve` counted from their accept, by aiohttp's protocol (its
#: ``RequestHandler``, which takes no weak reference): the endpoint, its answer, the peer's host
#: and the key the socket waits under until its request is whole.
_accepted: dict[Any, tuple[Endpoint, Admission, str | None, Evict]] = {}


def _count_sockets(server: web.Server, endpoint: Endpoint) -> None:
    """Make ``endpoint`` count every socket ``server`` accepts against ``max_connections``, from
    its accept: aiohttp's ``Server.connection_made``, which each of its protocols calls, is the
    earliest hook it offers. Sockets that never send their request then hold no more
    descriptors than the cap, as on the other transports, and are evicted to make room."""
    made, lost = server.connection_made, server.connection_lost
    if type(server) is web.Server:
        # Its protocols are built as _RequestHandler (the same object, whose errors say more,
        # below): made so in connection_made, it was too late on uvloop, whose transport takes
        # the protocol's data_received before connection_made and calls that one ever after.
        server.__class__ = _Server

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        if type(handler) is _RequestHandler:
            _lines[handler] = RequestLine()
        made(handler, transport)
        host = host_of(transport.get_extra_info("peername"))

        def evict() -> bool:
            transport.abort()
            return True

        admission = endpoint.take_slot(host, evict)
        _accepted[handler] = (endpoint, admission, host, evict)
        if admission is Admission.DROP:
            transport.abort()

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        _lines.pop(handler, None)
        counted = _accepted.pop(handler, None)
        if counted is not None:
            endpoint.free_slot(counted[1], counted[2], counted[3])
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


#: The first request line of each socket :func:`serve` accepted, until its request is handled.
_lines: dict[Any, RequestLine] = {}


class _UpgradeHandler(RequestHandler, SharedBufferReads):
    """aiohttp's protocol, still answering a peer that ended its stream (a half-close) behind an
    upgrade request or frames: aiohttp closes the socket at the end of stream, so that a request
    being answered got nothing (not even the 101), and frames already read got no answer (their
    pong written to a closing transport failed the connection). The socket stays open for the
    answers; the WebSocket's reader gets the end of stream after every frame before it
    (:meth:`MaskedFramesOnly.end_of_stream`), and aiohttp closes the socket once the WebSocket is
    done (``close()``: no request after this one). Any other request ends as aiohttp ends it.
    The same slots as aiohttp's class, whose reads it keeps as they are, but for where they go:
    one buffer for each thread (:class:`~dara_ws_core.transport.SharedBufferReads`)."""

    __slots__ = ()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # aiohttp's never keeps the transport
        parser, transport = self._payload_parser, self.transport
        if self in LINGERING:  # the client's end after our lingering close: the socket closes
            return super().eof_received()
        if (not self._upgraded or self._force_close or transport is None
                or _over_tls(transport)  # asyncio closes it all the same
                or not (parser is None or isinstance(parser, MaskedFramesOnly))):
            return super().eof_received()  # None: the transport closes
        if parser is None:  # the upgrade is being answered: the end follows what came with the request
            ENDED_BEHIND_REQUEST.add(self)
        else:
            parser.end_of_stream()
        self.close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        ENDED_BEHIND_REQUEST.discard(self)
        lingered(self)
        super().connection_lost(exc)


def _over_tls(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport`` is asyncio's TLS transport (or uvloop's). asyncio's, once closed
    twice (as aiohttp closes it), raises ``AttributeError`` from ``get_extra_info``: logged
    with a traceback by the loop, at each such client's end of stream."""
    try:
        return transport.get_extra_info("sslcontext") is not None
    except AttributeError:
        return True


class _RequestHandler(_UpgradeHandler):
    """aiohttp's protocol, answering what every other transport answers where aiohttp's parser
    refuses a request with 400 (:func:`~dara_ws_core.upgrade.check_upgrade_request`): 431 to a
    header line over its limit (8190 bytes: those of the check, 8192 with the name and its
    colon, are met first) or more than 128 headers, 505 to another HTTP version than 1.0 and
    1.1, 405 to a method it cannot read (``get``). It keeps the request line for that, and for
    :func:`_refused`. The same slots: :func:`serve` gives its sockets' protocols this class until
    their first request is parsed (then aiohttp's own again: no call more per read)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        line = _lines.get(self)
        if line is not None and not line.ended:
            line.feed(data)
        # Not super(): on uvloop this method stays the transport's after _refused gives the
        # object the class it reads with from then on (_UpgradeHandler), which super() here
        # would refuse (not a _RequestHandler any more).
        RequestHandler.data_received(self, data)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        line = _lines.pop(self, None)
        if status == 400 and (isinstance(exc, LineTooLong) or (
                isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received")):
            status = 431
        elif status == 400 and isinstance(exc, BadStatusLine) and line is not None:
            parsed = parse_request_line(line.text)
            refusal = check_upgrade_request(parsed[0], parsed[2], ()) if parsed is not None else None
            if refusal is not None and refusal.status in (405, 505):
                status = refusal.status
        return super().handle_error(request, status, exc, message)


class _Server(web.Server):
    """aiohttp's ``Server`` (the protocol factory :func:`serve` listens with), whose protocols
    are :class:`_RequestHandler`: the same objects, built so from the start."""

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        if type(handler) is RequestHandler:
            handler.__class__ = _RequestHandler
        return handler


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, for :func:`serve`. aiohttp logs each request it cannot parse as an
    ERROR with a traceback, which any peer can repeat at will: those records are written for the
    first ten, then the 100th, the 1,000th... with the count, as the core bounds what one client
    makes it log (a log line is blocking I/O on the event loop)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))
        self.bad_requests = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level > logging.DEBUG and isinstance(kwargs.get("exc_info"), HttpProcessingError):
            self.bad_requests = count = self.bad_requests + 1
            if count > 10:
                if str(count).rstrip("0") != "1":
                    return
                msg = f"{msg} ({count} such records; only powers of ten are logged)"
        super().log(level, msg, *args, **kwargs)


class _AccessLog(AbstractAccessLogger):
    """The access log of :func:`serve`: one line per request, its path without the query string
    (``?token=`` is where older Dara clients put their session token) and cut to 64 printable
    characters, no header (aiohttp's own format writes the whole request line and the client's
    ``User-Agent`` as they came)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = "".join(c if c.isprintable() else "?" for c in request.rel_url.raw_path[:64])
        self.logger.info('%s "%s %s" %d', request.remote, request.method, path, response.status)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class _TLSSite(web.TCPSite):
    """aiohttp's ``TCPSite`` listening on plain TCP, its sockets served over TLS by
    :class:`~dara_ws_core.tls.CountedTLS`: each counted from its accept against
    ``max_connections`` (a listener with ``ssl=`` hands aiohttp a socket only once its TLS
    handshake is done), the handshake bounded by ``handshake_timeout`` (asyncio's default is
    60 s, and aiohttp sets none). The same call as ``TCPSite.start`` otherwise."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, endpoint: Endpoint,
                 **options: Any) -> None:
        super().__init__(runner, host, port, **options)
        self._tls = CountedTLS(options["ssl_context"], (endpoint,))

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner, as TCPSite's does
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._tls.factory(server), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        # What TCPSite.start records since aiohttp 3.12 (its port property reads it).
        self._bound_port = int(self._server.sockets[0].getsockname()[1])


@asynccontextmanager
async def serve(
    endpoint: Endpoint, host: str = "127.0.0.1", port: int = 8000, *, reuse_port: bool = False,
    ssl: _ssl.SSLContext | None = None,
) -> AsyncIterator[Server[web.AppRunner]]:
    """Serve ``endpoint`` on ``host:port`` for the duration of the ``async with`` block; yields a
    :class:`~dara_ws_core.Server` whose ``native`` is aiohttp's ``AppRunner``. ``reuse_port``
    listens with ``SO_REUSEPORT``, so that several processes share the port (``--workers``).
    ``ssl``, a server ``ssl.SSLContext``, serves TLS (``wss://``, the ``url`` says so), as the
    same argument does on the other transports.

    On exit the endpoint shuts down (connections close with 1001) and listening stops. Raises
    ``OSError`` if the address cannot be bound.
    """
    app = web.Application()
    _add_route(app, endpoint, endpoint.path, any_target=True)
    config = endpoint.config
    # keepalive_timeout also bounds a connection that never completes its request (aiohttp arms
    # it at connect and after each response): half-open handshakes go after handshake_timeout.
    # lingering_time bounds a body still being sent after its response (default 10 s).
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.shutdown_grace,
        keepalive_timeout=config.handshake_timeout, lingering_time=config.handshake_timeout,
        logger=_ServerLog(), access_log_class=_AccessLog,
    )
    endpoint.open()
    await runner.setup()
    assert runner.server is not None  # set up
    _count_sockets(runner.server, endpoint)
    try:
        if ssl is None:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        else:
            site = _TLSSite(runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl,
                            endpoint=endpoint)
        await site.start()
        port = int(runner.addresses[0][1])
        yield Server.build(host, port, endpoint.path, runner, secure=ssl is not None)
    finally:
        for listener in runner.sites:
            await listener.stop()
        await endpoint.shutdown()  # before aiohttp stops reading input (see add_route)
        await runner.cleanup()
