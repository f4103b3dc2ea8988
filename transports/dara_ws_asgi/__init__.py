"""ASGI adapter: serve an endpoint under any ASGI server (uvicorn, hypercorn) or inside Starlette
and FastAPI.

* :func:`asgi_app` / :class:`ASGIApp`: a plain ASGI application, e.g. ``uvicorn.run(asgi_app(ep))``.
* :func:`websocket_route`: a Starlette route, e.g. ``Starlette(routes=[websocket_route(ep)])`` or
  ``fastapi_app.router.routes.append(websocket_route(ep))``.
* :func:`serve`: run an endpoint under uvicorn in this process (from :mod:`dara_ws_asgi.uvicorn`,
  which holds everything uvicorn-specific).

The ASGI server owns frame size and keepalive: when you run uvicorn yourself, pass it
``ws_max_size=config.max_message_size``, ``ws_ping_interval`` and ``ws_ping_timeout`` as
:func:`serve` does (the core checks the size again). Shutdown: uvicorn closes open connections
with 1012 before any lifespan code runs; :class:`ASGIApp` (through ASGI lifespan) and
:func:`lifespan` (for Starlette/FastAPI) make it shut the endpoint down first (1001, in-flight
replies delivered) and bound handshakes and ping floods, when uvicorn runs in the main thread
with its own protocols: h11 or httptools, and websockets-sansio
(:func:`dara_ws_asgi.uvicorn.hook_uvicorn`).
"""

from __future__ import annotations

__all__ = ["ASGIApp", "ASGITransport", "Server", "asgi_app", "lifespan", "serve", "websocket_route"]

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, cast

try:
    from starlette.routing import WebSocketRoute
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_asgi needs the starlette library: pip install "dara-ws-core[asgi]"', name=exc.name
    ) from exc

from dara_ws_core.endpoint import UNAVAILABLE, Admission, Endpoint, host_of
from dara_ws_core.exceptions import AuthenticationFailed, CloseCode, ConnectionClosed, EndpointClosed
from dara_ws_core.transport import NOT_UTF8, HandshakeRequest, Server
from dara_ws_core.upgrade import NOT_FOUND, Refusal, check_target, check_upgrade_request, read_target

from .uvicorn import COUNTED, RECEIVING, TEXT_BYTES, LateText, hook_uvicorn, serve

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ASGITransport:
    """An accepted ASGI WebSocket as a :class:`Transport`; built by :class:`ASGIApp`."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._sent: ConnectionClosed | None = None  # we sent websocket.close
        self._gone: ConnectionClosed | None = None  # the server reported websocket.disconnect
        #: The socket behind ``send`` (under uvicorn; see _socket_of), else None.
        self._socket = _socket_of(send)

    @property
    def closed(self) -> bool:
        return (self._gone or self._sent) is not None

    @property
    def disconnected(self) -> bool:
        """Whether the socket is gone (``SupportsDisconnected``): closing with nothing left to
        write. Never true where the socket is not found (another server than uvicorn)."""
        socket = self._socket
        return socket is not None and socket.is_closing() and not socket.get_write_buffer_size()

    async def send(self, frame: bytes) -> None:
        """Send one text frame; raises ``ConnectionClosed`` once the connection is closing."""
        if gone := self._gone or self._sent:
            raise gone
        socket = self._socket
        if socket is not None and socket.is_closing():
            # The socket is lost or closing, which the server reports to the application only
            # when it reads the disconnect: a connection paused for backpressure does not read.
            # uvicorn would write anyway, and asyncio logs a warning for each write to a lost
            # socket: a peer that aborts while a fan-out is queued for it would make the server
            # log once per frame.
            raise ConnectionClosed(CloseCode.ABNORMAL, "connection lost")
        try:
            await self._send({"type": "websocket.send", "text": frame.decode()})
        except OSError as exc:  # the ASGI spec's error for sending on a closed connection
            raise ConnectionClosed(CloseCode.ABNORMAL) from exc
        except RuntimeError as exc:
            # uvicorn's own close (a peer's protocol error, a ping timeout) is not reported to
            # the app until it reads the disconnect; a send meanwhile raises RuntimeError
            # ("... after sending 'websocket.close'"). The connection is over, not the server.
            raise ConnectionClosed(CloseCode.ABNORMAL, "closed by the server library") from exc

    async def receive(self) -> str | bytes:
        """Return the next text (``str``) or binary (``bytes``) frame; raises ``ConnectionClosed``
        with the close code on ``websocket.disconnect``."""
        if self._gone is not None:
            raise self._gone  # the server sends only one disconnect
        # After our own close, keep reading: the server reports the disconnect with our code.
        message = await self._receive()
        if message["type"] == "websocket.receive":
            # Under our hook, a text's bytes (TEXT_BYTES), decoded now. Its LateText is read as
            # a plain dict: it decodes ``text`` only for another reader (a middleware), whose
            # copy of the message may be a plain dict holding the bytes too.
            if type(message) is LateText:
                text: str | None = dict.get(message, "text")
                data = dict.get(message, TEXT_BYTES)
            else:
                text = message.get("text")
                data = message.get(TEXT_BYTES)
            if text is not None:
                return text
            if data is None:
                return bytes(message.get("bytes") or b"")
            try:  # late_text, without a call more
                return str(data, "utf-8")
            except UnicodeDecodeError:
                return NOT_UTF8
        self._gone = ConnectionClosed(message.get("code", 1005), message.get("reason") or "")
        raise self._gone

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send ``websocket.close`` with ``code``; idempotent, and a no-op once the peer left."""
        if self.closed:
            return
        self._sent = ConnectionClosed(code, reason)
        # The peer left meanwhile (OSError), or the server library closed first (RuntimeError,
        # see send).
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        """Drop the TCP connection. ASGI has no abort: under uvicorn the socket is found behind
        ``send`` (see :func:`_socket_of`); elsewhere this does nothing and the server's own
        close timeout applies."""
        if (transport := self._socket) is not None:
            transport.abort()


def _socket_of(send: Send) -> asyncio.Transport | None:
    """The asyncio transport behind an ASGI ``send``: uvicorn's is a bound method of its
    protocol, which holds it; Starlette and middleware wrap it in closures, searched a few
    levels deep. ``None`` when not found (another server)."""
    transport = _behind(send, lambda protocol: getattr(protocol, "transport", None))
    # asyncio's, or uvloop's (uvicorn's default loop where it is installed), which is no
    # asyncio.Transport subclass: known by the methods the adapter calls.
    if transport is not None and all(callable(getattr(transport, name, None)) for name in _SOCKET_METHODS):
        return cast(asyncio.Transport, transport)
    return None


#: What the adapter calls on the socket's transport (see _socket_of).
_SOCKET_METHODS = ("abort", "is_closing", "get_write_buffer_size")


def _behind(send: Send, find: Callable[[Any], Any]) -> Any:
    """The first non-None ``find(protocol)`` of the objects whose bound method ``send`` is, or
    wraps in closures (searched a few levels deep); None when there is none."""
    todo: list[Any] = [send]
    for _ in range(32):
        if not todo:
            break
        fn = todo.pop()
        found = find(getattr(fn, "__self__", None))
        if found is not None:
            return found
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    todo.append(cell.cell_contents)
    return None


def lifespan(endpoint: Endpoint) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A Starlette / FastAPI ``lifespan=`` that shuts ``endpoint`` down gracefully.

    Under uvicorn it makes the server run ``endpoint.shutdown()`` (clients get 1001, in-flight
    replies finish within the grace period) before uvicorn closes connections with 1012, which
    it otherwise does before any lifespan shutdown code runs. Elsewhere, the endpoint shuts down
    at lifespan shutdown. ``Starlette(routes=[websocket_route(ep)], lifespan=lifespan(ep))``.
    """

    @contextlib.asynccontextmanager
    async def context(_: Any) -> AsyncIterator[None]:
        hook_uvicorn(endpoint)
        endpoint.open()  # served again after a shutdown (a second TestClient(app), say)
        try:
            yield
        finally:
            await endpoint.shutdown()

    return context


async def _deny(scope: Scope, send: Send, refusal: Refusal | None = None) -> None:
    """Refuse a request: 404 for plain HTTP; for a WebSocket, a close before accept, which the
    ASGI spec makes an HTTP 403 on every server. A uvicorn hooked by :func:`hook_uvicorn` (what
    :func:`serve` and the lifespans run) answers a target that is not the endpoint's
    (``refusal``: 404, or 400), or a handshake its shutdown overtook (503), with that status,
    as the other transports do. (The
    ``websocket.http.response`` extension could do that on any server, but uvicorn's default
    websockets-sansio then logs a spurious ERROR for every rejection, Kludex/uvicorn#3138.)"""
    if scope["type"] == "websocket":
        # The adapter's uvicorn protocol, on any event loop (uvloop's transports are no
        # asyncio.Transport, so not through _socket_of).
        refuse = _behind(send, lambda protocol: getattr(protocol, "dara_refuse_with", None)) if refusal else None
        if refuse is not None and refuse(refusal):
            return
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _target(scope: Scope) -> str:
    """The request target as the client sent it: ASGI's ``raw_path`` (uvicorn gives it: the
    absolute form too), else ``path`` (decoded: a server without ``raw_path`` hides what a
    ``%2F`` was), and the query."""
    raw: bytes | None = scope.get("raw_path")
    target = raw.decode("latin-1") if raw else scope["path"]
    if query := scope.get("query_string", b"").decode("latin-1"):
        target += "?" + query
    return target


def _handshake(scope: Scope) -> HandshakeRequest:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    return HandshakeRequest.build(_target(scope), headers, scope.get("client"))


def _refusal(scope: Scope) -> Refusal | None:
    """:func:`~dara_ws_core.upgrade.check_upgrade_request` on a plain HTTP request's scope."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    return check_upgrade_request(scope.get("method", "GET"), scope.get("http_version", "1.1"), headers)


def _target_refusal(scope: Scope, path: str | None) -> Refusal | None:
    """:func:`~dara_ws_core.upgrade.check_target` on the request's raw target: ``None`` if it
    names ``path`` below the application's mount point (ASGI's paths include ``root_path``:
    Starlette's ``Mount``, uvicorn's ``--root-path``), or as the whole path; any target that
    is one when ``path`` is ``None`` (a router matched it)."""
    target = _target(scope)
    if path is None:
        read = read_target(target)
        if isinstance(read, Refusal):
            return read
        # A router matched the decoded path, where an encoded slash is a separator: the target
        # names another path than the one routed (/api%2Fcore%2Fws is not /api/core/ws).
        return NOT_FOUND if "%2F" in read.path else None
    refusal = check_target(target, path)
    root: str = scope.get("root_path", "")
    if refusal is not None and refusal.status == 404 and root:
        # Below the mount point, "/realtime" + "/api/core/ws" ("/realtimeX/..." is not below it).
        return check_target(target, root.rstrip("/") + path)
    return refusal


class ASGIApp:
    """An ASGI application serving ``endpoint``. WebSocket requests whose target names ``path``
    (:func:`~dara_ws_core.upgrade.check_target` on ASGI's ``raw_path``; any path when ``None``,
    as inside a router) are served; ``path`` is matched below the mount point (``root_path``:
    ``app.mount("/realtime", asgi_app(endpoint))`` serves ``/realtime/api/core/ws``), or as the
    whole path. A rejected handshake gets HTTP 403 before accept; another target gets 404 (400
    for one that names no path) under a uvicorn hooked by :func:`hook_uvicorn`, elsewhere 403
    (all ASGI lets a WebSocket refusal be). Plain HTTP (a request the server did not take as an
    upgrade) gets what :func:`~dara_ws_core.upgrade.check_upgrade_request` answers it, as on
    every transport (426 to a GET without ``Upgrade: websocket``), else 404.
    """

    def __init__(self, endpoint: Endpoint, *, path: str | None = None) -> None:
        self.endpoint = endpoint
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # see lifespan(): the same, for a plain ASGI server
            while (kind := (await receive())["type"]) != "lifespan.shutdown":
                hook_uvicorn(self.endpoint)
                self.endpoint.open()
                await send({"type": f"{kind}.complete"})
            await self.endpoint.shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "websocket":
            # A request the server did not take as an upgrade (no Upgrade header, a Connection
            # without upgrade...): what every transport answers it, whatever its path, then
            # what its target names.
            refusal = (_refusal(scope) or _target_refusal(scope, self.path)) if scope["type"] == "http" else None
            if refusal is None:
                await _deny(scope, send)
                return
            await send({"type": "http.response.start", "status": refusal.status, "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in (*refusal.headers, ("Connection", "close"))]})
            await send({"type": "http.response.body", "body": refusal.text.encode()})
            return
        if refusal := _target_refusal(scope, self.path):
            if (await receive())["type"] == "websocket.connect":
                await _deny(scope, send, refusal)
            return
        if self.endpoint in scope.get("extensions", {}).get(COUNTED, ()):
            # Under uvicorn hooked by hook_uvicorn, the server counted the socket from its
            # accept and answered 503 to one the endpoint refused: it holds an admitted slot.
            await self._serve(scope, receive, send)
            return
        # ASGI shows no socket before its request: max_connections counts from here. A refusal
        # is a close before accept, which ASGI makes a 403 (see _deny).
        host = host_of(scope.get("client"))
        admission = self.endpoint.take_slot(host)
        try:
            if admission is not Admission.ADMIT:
                if (await receive())["type"] == "websocket.connect":
                    await _deny(scope, send)
                return
            await self._serve(scope, receive, send)
        finally:
            self.endpoint.free_slot(admission, host)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left before the handshake completed
        try:
            identity = await self.endpoint.authenticate(_handshake(scope))
        except EndpointClosed:  # the shutdown overtook it: 503 where the server can say so
            await _deny(scope, send, UNAVAILABLE)
            return
        except AuthenticationFailed:
            await _deny(scope, send)
            return
        if COUNTED in scope.get("extensions", {}):  # under uvicorn: its frame headers count
            scope["extensions"][RECEIVING] = self.endpoint.receiving_charge(identity, host_of(scope.get("client")))
        await send({"type": "websocket.accept"})
        await self.endpoint.serve(ASGITransport(receive, send), identity)


def asgi_app(endpoint: Endpoint, *, path: str | None = None) -> ASGIApp:
    """An ASGI app serving ``endpoint`` at ``path`` (default ``endpoint.path``), for servers."""
    return ASGIApp(endpoint, path=path or endpoint.path)


def websocket_route(endpoint: Endpoint, path: str | None = None) -> WebSocketRoute:
    """A Starlette/FastAPI route serving ``endpoint`` at ``path`` (default ``endpoint.path``).
    The router decides the path: where the route sits is the router's (FastAPI's
    ``include_router(prefix=...)`` copies it to ``prefix + path``, unmounted). Starlette routes
    on the decoded path, so the app refuses (404) a raw target with an encoded slash, which
    names another path than the one routed (``/api%2Fcore%2Fws`` is ``/api/core/ws`` to
    Starlette), and answers 400 to a target that names no path, as every transport does."""
    return WebSocketRoute(path or endpoint.path, ASGIApp(endpoint))


