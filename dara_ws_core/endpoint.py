"""The connection lifecycle (protocol.md section 5), transport-agnostic: the seed's ``ws_handler``.

An adapter calls :meth:`Endpoint.authenticate` before accepting (HTTP 403 on rejection) and
:meth:`Endpoint.serve` after. ``serve`` then runs the whole connection:

1. create and register the channel's handler (its first queued frame is ``init``);
2. the receive loop (frames handled in order, bad input per section 6) and the send loop
   (drains the channel's bounded queue into the transport);
3. on any end, close the transport with the right code, fail pending requests, cancel handler
   tasks, and remove the channel from every registry.

One sweeper task per endpoint enforces the idle timeout and identity expiry for all connections,
so an idle connection costs no timer of its own.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PATH", "Endpoint", "ws_handler"]

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from .auth import Authenticator, Identity, run_authenticator
from .config import ServerConfig
from .exceptions import (
    AuthenticationFailed,
    CloseCode,
    ConnectionClosed,
    InvalidMessage,
    ProtocolError,
)
from .handler import WebSocketHandler, current_channel, current_identity
from .manager import WebsocketManager
from .messages import decode_client_frame
from .transport import HandshakeRequest, Transport

logger = logging.getLogger("dara_ws_core")

#: Where Dara's server mounts the socket, and so where a stock client looks for it.
DEFAULT_PATH = "/api/core/ws"


class Endpoint:
    """Binds a manager and an authenticator into something a transport adapter can serve."""

    def __init__(
        self,
        manager: WebsocketManager,
        authenticator: Authenticator,
        *,
        path: str = DEFAULT_PATH,
    ) -> None:
        self.manager = manager
        self.authenticator = authenticator
        self.path = path
        self._connections: dict[str, asyncio.Task[Any]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def config(self) -> ServerConfig:
        return self.manager.config

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Run the authenticator on a handshake. Call it **before** accepting.

        Raises ``AuthenticationFailed``, which the adapter answers with HTTP 403. An authenticator
        that crashes also rejects (and is logged): a bug never lets anyone in.
        """
        if self._closing:
            raise AuthenticationFailed("server is shutting down")
        try:
            identity = await run_authenticator(self.authenticator, request)
        except AuthenticationFailed as exc:
            logger.info("handshake rejected: %s", exc, extra={"path": request.path})
            raise
        except Exception as exc:
            logger.exception("authenticator failed", extra={"path": request.path})
            raise AuthenticationFailed("authenticator error") from exc
        limit = self.config.max_connections_per_user
        if limit is not None and len(self.manager.get_user_channels(identity.user_id)) >= limit:
            logger.info("handshake rejected: connection limit", extra={"user": identity.user_id})
            raise AuthenticationFailed(f"user has {limit} connections already")
        return identity

    async def serve(self, transport: Transport, identity: Identity) -> None:
        """Run one accepted connection until it ends; closes the transport itself.

        Never raises for anything the peer does; returns when the connection is over and every
        trace of it is gone from the manager.
        """
        loop = asyncio.get_running_loop()
        channel_id = str(uuid.uuid4())
        manager = self.manager
        limit = self.config.max_connections_per_user
        if limit is not None and len(manager.get_user_channels(identity.user_id)) >= limit:
            # Handshakes of one user that ran concurrently all passed the check in authenticate();
            # only here, with no await before the channel is registered, is the count exact.
            logger.info("connection refused: connection limit", extra={"user": identity.user_id})
            await _close_quietly(transport, CloseCode.POLICY_VIOLATION, "too many connections")
            return
        handler = manager.create_handler(channel_id, identity)
        close_request: ConnectionClosed | None = None
        close_task: asyncio.Task[None] | None = None
        sender: asyncio.Task[None] | None = None
        close_timeout = self.config.close_timeout
        abort_timer: asyncio.TimerHandle | None = None

        def arm_abort() -> None:
            # A peer that does not read never lets a closing handshake finish (our close frame
            # sits behind a full send buffer) and TCP keeps such a socket for minutes: whatever
            # is still open close_timeout after the close began is aborted. A no-op on a
            # transport that closed in time.
            nonlocal abort_timer
            if abort_timer is None:
                abort_timer = loop.call_later(close_timeout, _abort_quietly, transport)

        def request_close(code: int, reason: str) -> None:
            nonlocal close_task, close_request
            close_request = ConnectionClosed(code, reason)
            arm_abort()
            # Frames queued before the close (replies to requests within a rate limit, answers
            # finished within the shutdown grace) go out before the close frame: take them
            # before the manager drops the queue.
            queue, backlog = handler.queue, []
            while (frame := queue.get_nowait()) is not None:
                backlog.append(frame)
            close_task = loop.create_task(
                _flush_and_close(transport, backlog, lambda: sender, code, reason)
            )
            # The channel is dead for messaging now, even if the closing handshake with a peer
            # that does not read takes the transport's close timeout: unregister it at once.
            manager.remove_handler(channel_id, ConnectionClosed(code, reason))

        def start_sender() -> None:
            nonlocal sender
            sender = loop.create_task(self._send_loop(transport, handler))

        handler.attach(
            request_close, loop.time(), getattr(transport, "send_nowait", None), start_sender
        )
        current_channel.set(channel_id)
        current_identity.set(identity)
        this = asyncio.current_task()
        if this is not None:
            self._connections[channel_id] = this
        self._ensure_sweeper()
        closed = ConnectionClosed(CloseCode.ABNORMAL, "connection lost")
        try:
            closed = await self._receive_loop(transport, handler)
        except asyncio.CancelledError:
            closed = ConnectionClosed(CloseCode.GOING_AWAY, "server shutting down")
            handler.close(closed.code, closed.reason)
            raise
        except Exception:
            logger.exception("connection failed", extra={"channel": channel_id})
            closed = ConnectionClosed(CloseCode.INTERNAL_ERROR, "internal error")
            handler.close(closed.code, closed.reason)
        finally:
            arm_abort()
            if close_request is not None:
                closed = close_request
            self._connections.pop(channel_id, None)
            manager.remove_handler(channel_id, closed)
            if sender is not None and close_task is None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if close_task is not None:
                # Read on while our close frame waits for the peer's: when the peer sent more than
                # the library buffers, its close frame is behind them, and the closing handshake
                # would stall until the library's close timeout (RFC 6455 section 1.4).
                drain = loop.create_task(_discard_until_closed(transport))
                try:
                    await asyncio.shield(close_task)
                finally:
                    drain.cancel()
                    await asyncio.gather(drain, return_exceptions=True)
                    if sender is not None:  # done unless the close was cut short
                        sender.cancel()
                        await asyncio.gather(sender, return_exceptions=True)
            elif not transport.closed:
                await _close_quietly(transport, CloseCode.NORMAL, "")

    async def _receive_loop(
        self, transport: Transport, handler: WebSocketHandler
    ) -> ConnectionClosed:
        """Handle frames in order until the connection ends; returns how it ended."""
        config = self.config
        max_size = config.max_message_size
        max_values = config.max_message_values
        decode = decode_client_frame
        loop = asyncio.get_running_loop()
        rate_limit = config.rate_limit
        window_start, window_count = loop.time(), 0
        while True:
            try:
                frame = await transport.receive()
            except ConnectionClosed as exc:
                return exc
            now = handler.last_seen = loop.time()
            if rate_limit is not None:
                if now - window_start >= config.rate_window:
                    window_start, window_count = now, 0
                window_count += 1
                if window_count > rate_limit:
                    logger.warning("rate limit exceeded", extra={"channel": handler.channel_id})
                    handler.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                    return ConnectionClosed(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            try:
                message = decode(frame, max_size, max_values=max_values)
            except InvalidMessage as exc:
                # Unknown type or invalid fields: dropped and logged, the connection stays.
                handler.log_peer_error(logging.WARNING, "dropped client frame: %s", exc)
                continue
            except ProtocolError as exc:
                code = exc.close_code or CloseCode.PROTOCOL_ERROR
                logger.info("closing on bad frame: %s", exc, extra={"channel": handler.channel_id})
                handler.close(code, str(exc))
                return ConnectionClosed(code, str(exc))
            pending = handler.process_client_message(message)
            if pending is not None:
                try:
                    await pending
                except ConnectionClosed as exc:
                    return exc

    @staticmethod
    async def _send_loop(transport: Transport, handler: WebSocketHandler) -> None:
        try:
            await handler.run_sender(transport.send)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("send failed", extra={"channel": handler.channel_id})
            handler.close(CloseCode.INTERNAL_ERROR, "send failed")

    # ------------------------------------------------------------------ timers and shutdown

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle connections and connections whose identity expired."""
        idle = self.config.idle_timeout
        interval = min(1.0, idle / 4) if idle else 1.0
        loop = asyncio.get_running_loop()
        while self._connections:
            await asyncio.sleep(interval)
            now, wall = loop.time(), None
            for handler in list(self.manager.handlers.values()):
                if handler.channel_id not in self._connections:
                    continue
                if idle is not None and now - handler.last_seen >= idle:
                    handler.close(CloseCode.GOING_AWAY, "idle timeout")
                identity = handler.identity
                if identity is not None and identity.expires_at is not None:
                    wall = wall or time.time()
                    if identity.expired(wall):
                        handler.close(CloseCode.POLICY_VIOLATION, "identity expired")

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop: refuse new handshakes, close every connection with 1001 and fail their pending
        requests, and wait until every connection task is done.

        A connection with handler tasks running (custom requests in flight) is closed when they
        end or when ``grace`` seconds (default ``ServerConfig.shutdown_grace``) have passed,
        whichever is first; its replies queued by then are sent before the close frame. Other
        connections are closed at once. Idempotent."""
        self._closing = True
        grace = self.config.shutdown_grace if grace is None else grace
        handlers = [h for c, h in self.manager.handlers.items() if c in self._connections]

        async def close_when_done(handler: WebSocketHandler) -> None:
            if grace > 0:
                await handler.wait_tasks(grace)
            handler.close(CloseCode.GOING_AWAY, "server shutting down")

        if handlers:
            await asyncio.gather(*(close_when_done(h) for h in handlers))
        tasks = list(self._connections.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=max(grace, 1.0) + 5.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None


async def _discard_until_closed(transport: Transport) -> None:
    with contextlib.suppress(Exception):  # ConnectionClosed ends it, as does any transport error
        while True:
            await transport.receive()


async def _flush_and_close(
    transport: Transport,
    backlog: list[bytes],
    current_sender: Callable[[], asyncio.Task[None] | None],
    code: int,
    reason: str,
) -> None:
    """Send what was queued before the close, then the close frame (bounded by the caller's
    abort timer: a transport that cannot write any more is aborted, which ends this)."""
    sender = current_sender()
    if sender is not None:
        # It writes the frame it holds and stops: the queue is empty and closed.
        await asyncio.wait([sender])
    try:
        for frame in backlog:
            await transport.send(frame)
    except Exception:  # gone meanwhile: the close below is a no-op then
        logger.debug("flush before close failed", exc_info=True)
    await _close_quietly(transport, code, reason)


def _abort_quietly(transport: Transport) -> None:
    try:
        transport.abort()
    except Exception:  # aborting is the last resort; it must never raise into the loop
        logger.debug("abort failed", exc_info=True)


async def _close_quietly(transport: Transport, code: int, reason: str) -> None:
    try:
        await transport.close(code, reason[:120])
    except Exception:  # the peer may be gone already; closing is best effort
        logger.debug("close failed", exc_info=True)


async def ws_handler(endpoint: Endpoint, transport: Transport, request: HandshakeRequest) -> bool:
    """Authenticate and serve in one call, for transports whose accept step the caller controls
    elsewhere. Returns ``False`` (after closing with 1008) when authentication fails.

    Adapters that can answer HTTP 403 before accepting should call ``authenticate`` and ``serve``
    separately instead.
    """
    try:
        identity = await endpoint.authenticate(request)
    except AuthenticationFailed:
        await _close_quietly(transport, CloseCode.POLICY_VIOLATION, "forbidden")
        return False
    await endpoint.serve(transport, identity)
    return True
