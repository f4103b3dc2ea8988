"""The manager: every connection of a server, and sending to one, a user's, or all of them.

Frames are encoded once per call, never once per recipient: a broadcast builds one ``bytes``
object and every recipient's queue holds that same object. A fan-out (broadcast, per-user send)
never waits: a recipient whose queue is full applies its slow-consumer policy at once, so one slow
client never delays the others (protocol.md section 6).

With a backplane (:mod:`dara_ws_core.backplane`) the same calls reach channels connected to other
processes. The manager holds the backplane and calls its hooks; the backplane reaches back only
through the named methods of ``BackplaneHost`` ("for the backplane" below), never the dicts.
"""

from __future__ import annotations

__all__ = ["WebsocketManager", "get_user_channels"]

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .auth import Identity
from .codec import build_frame
from .config import ServerConfig
from .custom import CustomHandler, CustomHandlerRegistry
from .exceptions import CloseCode, ConnectionClosed, UnknownChannel
from .handler import _DEFAULT, Sink, WebSocketHandler
from .messages import LoosePayload
from .registry import ChannelRegistry
from .stats import Counters, ServerStats, frozen

if TYPE_CHECKING:
    from .backplane.contract import Backplane

logger = logging.getLogger("dara_ws_core")


class WebsocketManager:
    """Manages WebSocket connections to clients and communication with them.

    One per server (or per test): it holds no global state, so two managers never share
    channels, users or handlers.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        custom_handlers: CustomHandlerRegistry | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        #: channel id -> handler, for the connections of this process.
        self.handlers: dict[str, WebSocketHandler] = {}
        self.registry = ChannelRegistry()
        self.custom_handlers = custom_handlers or CustomHandlerRegistry()
        self.backplane = backplane
        #: Running totals of this server (see :meth:`stats`).
        self.counters = Counters()

    # ------------------------------------------------------------------ handlers

    def add_ws_handler(self, kind: str, handler: CustomHandler, *, in_thread: bool = False) -> None:
        """Register a custom message handler ``handler(channel_id, data)`` (Dara's name)."""
        self.custom_handlers.register(kind, handler, in_thread=in_thread)

    def create_handler(
        self,
        channel_id: str,
        identity: Identity | None = None,
        *,
        sink: Sink | None = None,
        now: float = 0.0,
        transport: str = "unknown",
    ) -> WebSocketHandler:
        """Create and register the handler of a new connection; its first frame is ``init``.

        ``sink`` is where its frames go (the connection's driver; without one they stay queued),
        ``now`` the driver's clock at the start. Raises ``ValueError`` if the channel id is
        taken. Without an identity the channel is reachable by id and by broadcast, but belongs
        to no user. ``transport`` names the transport in stats and logs.
        """
        if channel_id in self.handlers:
            raise ValueError(f"channel {channel_id!r} already has a handler")
        handler = WebSocketHandler(
            channel_id, identity=identity, config=self.config, custom_handlers=self.custom_handlers,
            sink=sink, now=now, counters=self.counters, transport=transport,
        )
        self.handlers[channel_id] = handler
        self.counters.connections_opened += 1
        if identity is not None:
            self.registry.add(channel_id, identity.session_id, identity.user_id)
        if self.backplane is not None:
            self.backplane.channel_added(channel_id, identity)
        return handler

    def remove_handler(self, channel_id: str, exc: ConnectionClosed | None = None) -> None:
        """Remove a channel's handler: its pending requests fail with ``exc`` (by default a
        ``ConnectionClosed``), its handler tasks are cancelled, its registry entries go."""
        handler = self.handlers.pop(channel_id, None)
        self.registry.remove(channel_id)
        if handler is not None:
            if self.backplane is not None:
                self.backplane.channel_removed(channel_id, handler.identity)
            exc = exc or ConnectionClosed(CloseCode.NORMAL, "handler removed")
            self.counters.count(self.counters.close_codes, exc.code)
            handler.shutdown(exc)

    def get_user_channels(self, user_id: str) -> set[str]:
        """Connected channels of a user, on this process (see ``get_all_user_channels``)."""
        return self.registry.user_channels(user_id)

    async def get_all_user_channels(self, user_id: str) -> set[str]:
        """Connected channels of a user on every process sharing the backplane (without one,
        the same as ``get_user_channels``). Raises ``BackplaneError`` if the bus is unreachable."""
        if self.backplane is None:
            return self.registry.user_channels(user_id)
        return await self.backplane.user_channels(user_id)

    # ------------------------------------------------------------------ sending

    async def send_message(
        self, channel_id: str, message: LoosePayload | BaseModel, custom: bool = False
    ) -> None:
        """Send a message to one channel. Raises ``UnknownChannel`` if no such channel is
        connected (Dara returned ``None`` silently), ``SlowConsumer``, ``ConnectionClosed``."""
        frame = build_frame(message, custom=custom)
        handler = self.handlers.get(channel_id)
        if handler is not None:
            if not handler.offer(frame):
                await handler.enqueue_slow(frame)
            return
        if self.backplane is not None:
            await self.backplane.send_to_channel(channel_id, frame)
            return
        raise UnknownChannel(channel_id)

    async def broadcast(
        self,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        ignore_channel: str | None = None,
    ) -> None:
        """Send a message to every connected client except ``ignore_channel``."""
        frame = build_frame(message, custom=custom)
        self.deliver_to_all(frame, ignore_channel)
        if self.backplane is not None:
            await self.backplane.broadcast(frame, ignore_channel)

    async def send_message_to_user(
        self,
        user_id: str,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        ignore_channel: str | None = None,
    ) -> None:
        """Send a message to every channel of a user except ``ignore_channel``. A user with no
        connection is not an error (the message has no recipient)."""
        frame = build_frame(message, custom=custom)
        self.deliver_to_user(user_id, frame, ignore_channel)
        if self.backplane is not None:
            await self.backplane.send_to_user(user_id, frame, ignore_channel)

    async def send_and_wait(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Any:
        """Send a request to a channel and return the client's answer.

        Raises ``UnknownChannel``, ``RequestTimeout``, ``ConnectionClosed`` (at once when the
        client disconnects), ``ChunkError``, ``TooManyPendingRequests`` (see the handler's method).
        """
        handler = self.handlers.get(channel_id)
        if handler is not None:
            return await handler.send_and_wait(message, custom=custom, timeout=timeout)
        if self.backplane is not None:
            if timeout is _DEFAULT:
                timeout = self.config.request_timeout
            return await self.backplane.request(channel_id, message, custom, timeout)
        raise UnknownChannel(channel_id)

    def deliver_local(
        self, handlers: Iterable[WebSocketHandler], frame: bytes, ignore_channel: str | None = None
    ) -> int:
        """Deliver one encoded frame to local handlers without waiting (the one fan-out that
        broadcasts, per-user sends and the backplane use); returns how many got it.

        A full queue never delays the others: its channel applies its policy at once
        (:meth:`WebSocketHandler.push`). Closed channels are skipped. Never raises.
        """
        delivered = 0
        full: list[WebSocketHandler] | None = None
        for handler in handlers:
            if handler.channel_id == ignore_channel or handler.queue.closed:
                continue
            if handler.offer(frame):
                delivered += 1
            elif full is None:
                full = [handler]
            else:
                full.append(handler)
        # After the loop: a disconnect removes the handler from the dict being iterated.
        if full is not None:
            delivered += sum(handler.push(frame) for handler in full)
        return delivered

    # ------------------------------------------------------------------ for the backplane

    def deliver_to_channel(self, channel_id: str, frame: bytes) -> bool:
        """Hand an encoded frame to one local channel without waiting; ``False`` if it is not
        connected here (or closed, or dropped by its slow-consumer policy)."""
        handler = self.handlers.get(channel_id)
        return handler is not None and self.deliver_local((handler,), frame) == 1

    def deliver_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None = None) -> int:
        """Hand an encoded frame to the user's local channels but ``ignore_channel``, without
        waiting; returns how many got it."""
        handlers = self.handlers
        local = [handlers[c] for c in self.registry.user_channels(user_id) if c in handlers]
        return self.deliver_local(local, frame, ignore_channel)

    def deliver_to_all(self, frame: bytes, ignore_channel: str | None = None) -> int:
        """Hand an encoded frame to every local channel but ``ignore_channel``, without waiting;
        returns how many got it."""
        return self.deliver_local(self.handlers.values(), frame, ignore_channel)

    async def serve_relayed_request(
        self, channel_id: str, frame: bytes, rchan: str, timeout: float | None
    ) -> Any:
        """Send a request another process encoded (``frame``, its ``__rchan`` being ``rchan``)
        to a local channel byte for byte, and return the client's answer. Raises
        ``UnknownChannel`` if the channel is not here, else what ``send_and_wait`` raises."""
        handler = self.handlers.get(channel_id)
        if handler is None:
            raise UnknownChannel(channel_id)
        return await handler.send_and_wait_frame(frame, rchan, timeout)

    def local_channels(self) -> list[tuple[str, str | None]]:
        """A snapshot of this process's channels: ``(channel id, user id or None)``."""
        return [
            (channel_id, None if handler.identity is None else handler.identity.user_id)
            for channel_id, handler in self.handlers.items()
        ]

    # ------------------------------------------------------------------ observing

    def stats(self) -> ServerStats:
        """A snapshot of this process's server: connections, handshakes, close codes, traffic,
        slow consumers, queues, requests and handler outcomes, and the backplane's counters.

        Reads the running totals and walks the live connections once (queues, pending requests):
        cheap enough to call every second. Never raises.
        """
        c = self.counters
        by_transport: dict[str, int] = {}
        queued_frames = queued_bytes = max_depth = pending = running = busy = 0
        for handler in self.handlers.values():
            by_transport[handler.transport] = by_transport.get(handler.transport, 0) + 1
            queue = handler.queue
            depth = len(queue)
            queued_frames += depth
            queued_bytes += queue.nbytes
            max_depth = max(max_depth, depth)
            connection = handler.connection
            pending += len(connection.pending)
            running += connection.handlers_running
            busy += connection.busy
        backplane_stats = getattr(self.backplane, "stats", None)
        as_dict = getattr(backplane_stats, "as_dict", None)
        return ServerStats(
            connections=len(self.handlers),
            connections_by_transport=frozen(by_transport),
            connections_opened=c.connections_opened,
            handshakes_accepted=c.handshakes_accepted,
            handshakes_rejected=frozen(c.handshakes_rejected),
            close_codes=frozen(c.close_codes),
            frames_in=c.frames_in,
            bytes_in=c.bytes_in,
            frames_out=c.frames_out,
            bytes_out=c.bytes_out,
            slow_consumer=frozen(c.slow_consumer),
            frames_dropped=c.frames_dropped,
            queued_frames=queued_frames,
            queued_bytes=queued_bytes,
            max_queue_depth=max_depth,
            pending_requests=pending,
            requests=frozen({"answered": c.requests_answered, "timeout": c.requests_timeout,
                             "closed": c.requests_closed, "chunk_error": c.requests_chunk_error}),
            custom_handlers=frozen({"ok": c.custom_ok, "error": c.custom_error,
                                    "timeout": c.custom_timeout, "busy": c.custom_busy + busy}),
            handlers_running=running,
            backplane=frozen(as_dict()) if callable(as_dict) else None,
        )

    # ------------------------------------------------------------------ disconnecting

    def close_channel(self, channel_id: str, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Close one local connection; ``False`` if it is not connected here."""
        handler = self.handlers.get(channel_id)
        if handler is None:
            return False
        handler.close(code, reason)
        return True

    def disconnect_user(
        self, user_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """Close every local connection of a user (logout, revocation); returns how many."""
        channels = self.registry.user_channels(user_id)
        return sum(self.close_channel(c, code, reason) for c in channels)

    def disconnect_session(
        self, session_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """Close every local connection of one session (one login); returns how many."""
        channels = self.registry.session_channels(session_id)
        return sum(self.close_channel(c, code, reason) for c in channels)


def get_user_channels(user_identifier: str, manager: WebsocketManager) -> set[str]:
    """Get connected websocket channels associated with a given user (the seed's function).

    Takes the manager explicitly: there is no module-level registry to share.
    """
    return manager.get_user_channels(user_identifier)
