"""The per-connection handler: outbound queue, server requests, custom message dispatch.

One :class:`WebSocketHandler` per connection (the seed's class). It owns the asyncio side of a
channel: the bounded outbound queue and its slow-consumer policy, the futures of pending
``send_and_wait`` calls (over the pure :class:`~dara_ws_core.correlation.PendingRequests` table),
and the tasks of async custom handlers. It never touches a socket: the connection lifecycle
(:mod:`dara_ws_core.endpoint`) drains its queue into the transport and feeds it decoded frames.
"""

from __future__ import annotations

__all__ = ["WebSocketHandler", "current_channel", "current_identity"]

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import pydantic_core
from pydantic import BaseModel

from .auth import Identity
from .config import ServerConfig, SlowConsumerPolicy
from .correlation import Completed, Failed, Ignored, PendingRequests
from .custom import CustomHandlerRegistry, HandlerSpec
from .exceptions import (
    CloseCode,
    ConnectionClosed,
    RequestTimeout,
    SlowConsumer,
    UnknownKind,
)
from .messages import (
    PONG_FRAME,
    ClientMessage,
    ClientPing,
    CustomClientMessage,
    CustomClientMessagePayload,
    DaraClientMessage,
    LoosePayload,
    build_frame,
    dumps,
    encode,
)
from .queue import OutboundQueue

logger = logging.getLogger("dara_ws_core")

#: The channel id / identity of the connection whose frame is being handled (like Dara's
#: ``WS_CHANNEL`` and ``USER`` context variables); set for custom handlers and their tasks.
current_channel: contextvars.ContextVar[str] = contextvars.ContextVar("dara_ws_channel")
current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("dara_ws_identity")

_DEFAULT: Any = object()


def _error_frame(kind: str, rchan: str | None, code: str, message: str) -> bytes:
    # protocol.md section 3, error [ext]: the caller's promise settles; no traceback on the wire.
    body: dict[str, Any] = {"kind": kind, "data": None, "__error": {"code": code, "message": message}}
    if rchan is not None:
        body["__response_for"] = rchan
    return dumps({"type": "custom", "message": body})


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


async def _settled(task: asyncio.Task[None]) -> None:
    # Waits for the task without raising its cancellation into the waiter (the receive loop).
    await asyncio.wait((task,))


class WebSocketHandler:
    """Represents a WebSocket connection to a given client (one channel).

    Create it through :meth:`WebsocketManager.create_handler`; the manager removes it when the
    connection ends, which fails its pending requests and cancels its handler tasks.
    """

    __slots__ = ("_closed", "_closer", "_custom", "_peer_errors", "_pending", "_sending",
                 "_start_sender", "_tasks", "_write_now", "channel_id", "config", "identity",
                 "last_seen", "queue")

    def __init__(
        self,
        channel_id: str,
        *,
        identity: Identity | None = None,
        config: ServerConfig | None = None,
        custom_handlers: CustomHandlerRegistry | None = None,
    ) -> None:
        self.channel_id = channel_id
        self.identity = identity
        self.config = config = config or ServerConfig()
        self.queue = OutboundQueue(config.max_queue_messages, config.max_queue_bytes)
        self._pending: PendingRequests[asyncio.Future[Any]] = PendingRequests(
            max_pending=config.max_pending_requests,
            max_chunks=config.max_chunks,
            max_chunked_bytes=config.max_chunked_bytes,
        )
        self._custom = custom_handlers or CustomHandlerRegistry()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed: ConnectionClosed | None = None
        self._closer: Callable[[int, str], None] | None = None
        self._write_now: Callable[[bytes], bool] | None = None
        self._start_sender: Callable[[], None] | None = None
        #: A send task is draining the queue (frames must queue behind it).
        self._sending = False
        #: Event-loop time of the last inbound frame (for the idle timeout).
        self.last_seen = 0.0
        self._peer_errors = 0

    def __repr__(self) -> str:
        return f"<WebSocketHandler {self.channel_id} queued={len(self.queue)}>"

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def pending_responses(self) -> Mapping[str, asyncio.Future[Any]]:
        """Pending server requests: ``__rchan`` -> the future of the waiting ``send_and_wait``."""
        return MappingProxyType({r: self._pending.waiter(r) for r in self._pending})

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def task_count(self) -> int:
        """Custom handler tasks (async and ``in_thread`` handlers) running for this connection."""
        return len(self._tasks)

    @property
    def dropped(self) -> int:
        """Frames discarded by the ``DROP_OLDEST`` policy."""
        return self.queue.dropped

    def log_peer_error(self, level: int, message: str, *args: Any, exc_info: bool = False,
                       **extra: Any) -> None:
        """Log something this channel's peer caused (a dropped frame, an unknown kind, a failing
        handler), at most a few times: the first 10 per connection, then the 100th, 1,000th...
        with the count. A log line costs I/O on the event loop; one client flooding bad frames
        must not turn it into a stall for everyone else, nor fill the disk."""
        self._peer_errors = count = self._peer_errors + 1
        if count > 10 and not _is_power_of_ten(count):
            return
        if count > 10:
            message += f" ({count} such records on this channel; only powers of ten are logged)"
        logger.log(level, message, *args, exc_info=exc_info,
                   extra={"channel": self.channel_id, **extra})

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Ask the connection to close with ``code``; returns at once. Idempotent."""
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer(code, reason)

    # ------------------------------------------------------------------ outbound

    async def send_message(self, message: BaseModel | bytes) -> None:
        """Send a message (an envelope model, or an already encoded frame) to the client.

        Applies the slow-consumer policy; raises ``SlowConsumer`` if the client is disconnected
        for being slow and ``ConnectionClosed`` if the channel is closed.
        """
        frame = message if isinstance(message, bytes) else encode(message)
        if not self.offer(frame):
            await self.enqueue_slow(frame)

    def offer(self, frame: bytes) -> bool:
        """Deliver ``frame`` without waiting; ``False`` if the queue is full (nothing changes then).

        When nothing is queued or being sent and the transport can write at once without
        exceeding its write buffer, the frame is written directly: no queue entry and no send
        task. Otherwise it is queued and a send task drains the queue (started on demand, so an
        idle connection holds no task for it). Order is kept because the direct path is taken
        only with nothing ahead. Raises ``ConnectionClosed`` if the channel is closed.
        """
        queue = self.queue
        if self._sending:
            return queue.offer(frame)
        write = self._write_now
        if write is not None and not queue and not queue.closed and write(frame):
            return True
        if not queue.offer(frame):
            return False
        self._wake_sender()
        return True

    def _wake_sender(self) -> None:
        start = self._start_sender
        if start is not None and not self._sending:
            self._sending = True
            start()

    def send_nowait(self, frame: bytes) -> Awaitable[None] | None:
        """Enqueue ``frame`` if there is room; otherwise return the coroutine that applies the
        slow-consumer policy (never raising ``SlowConsumer``). Raises ``ConnectionClosed``."""
        if self.offer(frame):
            return None
        return self.enqueue_slow(frame, raise_slow=False)

    def push(self, frame: bytes) -> bool:
        """Deliver one frame of a fan-out (broadcast, per-user send) without ever waiting.

        A fan-out must not wait on one recipient (protocol.md section 6): when this channel's
        queue is full, ``DROP_OLDEST`` makes room, and ``WAIT`` and ``DISCONNECT`` disconnect it
        with 1013 at once (it is ``max_queue_messages`` frames or ``max_queue_bytes`` behind).
        Returns whether the frame was delivered; ``False`` for a closed channel. Never raises.
        """
        queue = self.queue
        if queue.closed:
            return False
        if self.offer(frame):
            return True
        if self.config.slow_consumer_policy is SlowConsumerPolicy.DROP_OLDEST:
            self._drop_oldest_and_put(frame)
            return True
        self._disconnect_slow()
        return False

    def pong(self) -> Awaitable[None] | None:
        """Answer a client's ``ping`` (protocol.md section 2): one pong per ping, in order.

        A pong that does not fit is a reply like any other: the returned awaitable applies the
        slow-consumer policy, so a client that floods pings and reads nothing fills only its own
        queue, then stops being read, then is disconnected with 1013. ``None`` on a closed
        channel: never raises.
        """
        if self.queue.closed:
            return None
        return self.send_nowait(PONG_FRAME)

    async def enqueue_slow(self, frame: bytes, *, raise_slow: bool = True) -> None:
        """Apply the slow-consumer policy to a frame that did not fit (protocol.md section 6).

        For a sender that may wait: ``WAIT`` waits for room up to ``send_timeout``.
        """
        policy = self.config.slow_consumer_policy
        if policy is SlowConsumerPolicy.DROP_OLDEST:
            self._drop_oldest_and_put(frame)
            return
        if policy is SlowConsumerPolicy.WAIT:
            try:
                await self.queue.put(frame, self.config.send_timeout)
                return
            except TimeoutError:
                pass
        self._disconnect_slow()
        if raise_slow:
            raise SlowConsumer(f"channel {self.channel_id} is not reading; disconnected (1013)")

    def _drop_oldest_and_put(self, frame: bytes) -> None:
        queue = self.queue
        if queue.drop_oldest_and_put(frame) and queue.dropped % 1000 == 1:
            logger.warning("slow consumer: dropping oldest frames",
                           extra={"channel": self.channel_id, "dropped": queue.dropped})

    def _disconnect_slow(self) -> None:
        if self.queue.closed:
            return
        logger.warning("slow consumer: disconnecting", extra={"channel": self.channel_id})
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")
        self.queue.close()

    # ------------------------------------------------------------------ server -> client requests

    async def send_and_wait(
        self,
        message: LoosePayload | BaseModel,
        *,
        custom: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Any:
        """Send a request to the client and return its answer (a list of parts if chunked).

        ``timeout`` defaults to ``ServerConfig.request_timeout``. Raises ``RequestTimeout``,
        ``ConnectionClosed`` at once if the connection closes, ``ChunkError`` for an invalid
        chunked answer, ``TooManyPendingRequests`` at the channel's limit, ``SlowConsumer``.
        Cancelling the call removes its pending entry.
        """
        rchan = str(uuid.uuid4())  # unpredictable: 122 random bits, like Dara's
        frame = build_frame(message, custom=custom, rchan=rchan)
        return await self.send_and_wait_frame(frame, rchan, timeout)

    async def send_and_wait_frame(
        self, frame: bytes, rchan: str, timeout: float | None = _DEFAULT
    ) -> Any:
        """Send a request already encoded with ``__rchan`` = ``rchan`` (as unpredictable as a
        uuid4) and return its answer, as :meth:`send_and_wait` does: the backplane relays a
        request that another process encoded this way, byte for byte.

        Raises ``ValueError`` if ``rchan`` is already pending, else what :meth:`send_and_wait`
        raises.
        """
        if self._closed is not None:
            raise self._closed
        if timeout is _DEFAULT:
            timeout = self.config.request_timeout
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.open(waiter, rchan)
        try:
            async with asyncio.timeout(timeout) as scope:
                if not self.offer(frame):
                    await self.enqueue_slow(frame)
                return await waiter
        except TimeoutError:
            if scope.expired():
                raise RequestTimeout(
                    f"no answer from channel {self.channel_id} within {timeout} s"
                ) from None
            raise
        finally:
            self._pending.discard(rchan)

    # ------------------------------------------------------------------ client -> server

    def process_client_message(self, message: ClientMessage) -> Awaitable[None] | None:
        """Process a decoded client frame.

        Resolves pending responses and dispatches custom messages. Returns an awaitable when
        the caller must wait before reading the next frame (a sync handler's reply that did not
        fit the queue, a threaded handler), so that one connection's messages stay in order.
        Frames still read after the handler was shut down are dropped: a handler task started
        then would outlive its connection, with nothing left to cancel it.
        """
        if self._closed is not None or self.queue.closed:
            return None
        if isinstance(message, DaraClientMessage):
            self._resolve(message)
            return None
        if isinstance(message, CustomClientMessage):
            return self._dispatch(message.message)
        if isinstance(message, ClientPing):
            return self.pong()
        raise TypeError(f"not a client message: {type(message).__name__}")

    def _resolve(self, message: DaraClientMessage) -> None:
        outcome = self._pending.receive(message)
        if isinstance(outcome, Completed):
            if not outcome.waiter.done():
                outcome.waiter.set_result(outcome.value)
        elif isinstance(outcome, Failed):
            self.log_peer_error(logging.WARNING, "invalid chunked answer: %s", outcome.error,
                                rchan=outcome.rchan)
            if not outcome.waiter.done():
                outcome.waiter.set_exception(outcome.error)
        elif isinstance(outcome, Ignored):
            self.log_peer_error(logging.INFO, "answer for an unknown or settled request ignored",
                                rchan=outcome.rchan)

    def _dispatch(self, payload: CustomClientMessagePayload) -> Awaitable[None] | None:
        try:
            spec = self._custom.get(payload.kind)
        except UnknownKind:
            self.log_peer_error(logging.INFO, "custom message of unknown kind", kind=payload.kind)
            return self.send_nowait(_error_frame(payload.kind, payload.rchan, "unknown_kind",
                                                 f"no handler for kind {payload.kind!r}"))
        if spec.is_async:
            if len(self._tasks) >= self.config.max_handler_tasks:
                return self.send_nowait(_error_frame(payload.kind, payload.rchan, "busy",
                                                     "too many requests in progress"))
            task = asyncio.create_task(self._run_async(spec, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return None
        if spec.in_thread:
            # Tracked like an async handler's task so that a graceful shutdown waits for its reply
            # (wait_tasks); the receive loop still waits for it, keeping the connection's order.
            task = asyncio.create_task(self._run_in_thread(spec, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return _settled(task)
        try:
            result = spec.func(self.channel_id, payload.data)
        except Exception:
            return self.send_nowait(self._failure(spec, payload))
        return self._reply(payload, result)

    def _failure(self, spec: HandlerSpec, payload: CustomClientMessagePayload) -> bytes:
        # The traceback goes to the log with the channel and kind; the wire gets a code only.
        self.log_peer_error(logging.ERROR, "custom handler failed", exc_info=True, kind=spec.kind)
        return _error_frame(payload.kind, payload.rchan, "handler_error", "the handler failed")

    def _reply_frame(self, payload: CustomClientMessagePayload, result: Any) -> bytes | None:
        # A request (with __rchan) always gets a reply so the client's promise settles; a
        # fire-and-forget message gets one only when the handler returned a value (section 4).
        if payload.rchan is None:
            if result is None:
                return None
            body: dict[str, Any] = {"kind": payload.kind, "data": result}
        else:
            body = {"kind": payload.kind, "data": result, "__response_for": payload.rchan}
        try:
            return dumps({"type": "custom", "message": body})
        except pydantic_core.PydanticSerializationError:
            self.log_peer_error(logging.ERROR, "custom handler returned a value JSON cannot carry",
                                exc_info=True, kind=payload.kind)
            return _error_frame(payload.kind, payload.rchan, "handler_error",
                                "the handler's result could not be encoded")

    def _reply(self, payload: CustomClientMessagePayload, result: Any) -> Awaitable[None] | None:
        frame = self._reply_frame(payload, result)
        return None if frame is None else self.send_nowait(frame)

    async def _send_reply(self, frame: bytes | None) -> None:
        # A handler task's reply; the connection may have closed while the handler ran.
        if frame is None:
            return
        try:
            pending = self.send_nowait(frame)
            if pending is not None:
                await pending
        except ConnectionClosed:
            pass

    async def _run_in_thread(self, spec: HandlerSpec, payload: CustomClientMessagePayload) -> None:
        try:
            async with asyncio.timeout(self.config.handler_timeout):
                result = await asyncio.to_thread(spec.func, self.channel_id, payload.data)
        except TimeoutError:
            frame: bytes | None = _error_frame(payload.kind, payload.rchan, "timeout",
                                               "the handler timed out")
        except Exception:
            frame = self._failure(spec, payload)
        else:
            frame = self._reply_frame(payload, result)
        await self._send_reply(frame)

    async def _run_async(self, spec: HandlerSpec, payload: CustomClientMessagePayload) -> None:
        try:
            async with asyncio.timeout(self.config.handler_timeout):
                result = await spec.func(self.channel_id, payload.data)
        except TimeoutError:
            self.log_peer_error(logging.WARNING, "custom handler timed out", kind=spec.kind)
            frame: bytes | None = _error_frame(payload.kind, payload.rchan, "timeout",
                                               "the handler timed out")
        except Exception:
            frame = self._failure(spec, payload)
        else:
            frame = self._reply_frame(payload, result)
        await self._send_reply(frame)

    # ------------------------------------------------------------------ lifecycle

    def attach(
        self,
        closer: Callable[[int, str], None],
        now: float,
        write_now: Callable[[bytes], bool] | None = None,
        start_sender: Callable[[], None] | None = None,
    ) -> None:
        """Called by the connection lifecycle: how to close the connection, the start time, the
        transport's optional ``send_nowait`` (see :meth:`offer`), and how to start a task running
        :meth:`run_sender` when frames are queued. Starts it at once for frames already queued
        (``init``)."""
        self._closer = closer
        self.last_seen = now
        self._write_now = write_now
        self._start_sender = start_sender
        if self.queue:
            self._wake_sender()

    async def run_sender(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Drain the queue into the transport, then return (a new task starts with the next
        queued frame).

        Frames are written synchronously while the transport accepts them, and awaited (with its
        backpressure) only when its write buffer is full. Raises ``ConnectionClosed``; after a
        failure no new send task is started: the connection is going away.
        """
        queue = self.queue
        write = self._write_now
        while (frame := queue.get_nowait()) is not None:
            if write is None or not write(frame):
                await send(frame)
        self._sending = False

    async def wait_tasks(self, timeout: float) -> None:
        """Wait up to ``timeout`` for running handler tasks (graceful shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def shutdown(self, exc: ConnectionClosed) -> None:
        """Release everything: fail pending requests with ``exc``, drop the queue, cancel tasks.

        Called once when the connection is gone (``WebsocketManager.remove_handler``).
        """
        if self._closed is not None:
            return
        self._closed = exc
        self._closer = None
        self.queue.close()
        for waiter in self._pending.close():
            if not waiter.done():
                waiter.set_exception(exc)
        for task in self._tasks:
            task.cancel()
