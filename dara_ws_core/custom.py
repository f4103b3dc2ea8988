"""Custom message handlers by kind (protocol.md sections 2-4), and how they are run.

The application registers ``handler(channel_id, data)`` for a kind, sync or async, like Dara's
``config.add_ws_handler``. A non-``None`` return value becomes the reply. Sync handlers run in the
receive loop, so a connection's messages are handled in order; ``in_thread=True`` runs a blocking
sync handler in a worker thread (order kept, other connections not blocked). Async handlers run as
tracked tasks of the connection, cancelled when it closes. What the client gets back (the reply,
or a ``handler_error`` / ``timeout`` error reply) is the connection's decision
(:class:`~dara_ws_core.connection.ServerConnection`); :meth:`CustomHandlerRegistry.dispatch`
runs the handler and hands it the outcome.
"""

from __future__ import annotations

__all__ = ["CustomHandler", "CustomHandlerRegistry", "DispatchHost", "HandlerSpec"]

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pydantic_core

from .config import ServerConfig
from .connection import CustomReceived, SendFrame, ServerConnection
from .exceptions import ConnectionClosed, UnknownKind
from .stats import Counters

CustomHandler = Callable[[str, Any], Any | Awaitable[Any]]
H = TypeVar("H", bound=CustomHandler)


class DispatchHost(Protocol):
    """What running a handler needs from its connection (a ``WebSocketHandler``)."""

    channel_id: str
    config: ServerConfig
    connection: ServerConnection[Any]
    counters: Counters

    def send_nowait(self, frame: bytes) -> Awaitable[None] | None: ...

    def track(self, task: asyncio.Task[None]) -> None: ...

    def log_app_error(self, level: int, message: str, key: tuple[str, str], *args: Any,
                      exc_info: bool = False, **extra: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and how to run it."""

    kind: str
    func: CustomHandler
    is_async: bool
    in_thread: bool


class CustomHandlerRegistry:
    """Handlers by kind; one per manager."""

    __slots__ = ("_handlers",)

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerSpec] = {}

    def register(self, kind: str, func: CustomHandler, *, in_thread: bool = False) -> None:
        """Register ``func`` for ``kind``; raises ``ValueError`` if the kind is taken."""
        if kind in self._handlers:
            raise ValueError(f"a handler is already registered for kind {kind!r}")
        is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - async callable objects
        )
        if is_async and in_thread:
            raise ValueError("in_thread=True is for blocking sync handlers, not async ones")
        self._handlers[kind] = HandlerSpec(kind, func, is_async, in_thread)

    def on(self, kind: str, *, in_thread: bool = False) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""

        def decorate(func: H) -> H:
            self.register(kind, func, in_thread=in_thread)
            return func

        return decorate

    def unregister(self, kind: str) -> None:
        self._handlers.pop(kind, None)

    def get(self, kind: str) -> HandlerSpec:
        """The handler for ``kind``; raises :class:`UnknownKind`."""
        try:
            return self._handlers[kind]
        except KeyError:
            raise UnknownKind(f"no handler for kind {kind!r}") from None

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    # ------------------------------------------------------------------ running handlers

    def dispatch(self, received: CustomReceived, host: DispatchHost) -> Awaitable[None] | None:
        """Run the handler of ``received.kind`` for ``host``'s connection and send its outcome.

        Sync handlers run now; async and ``in_thread`` ones run as tasks that ``host`` tracks.
        Returns an awaitable when the receive loop must wait before the next frame (a threaded
        handler, or a reply that did not fit the queue), keeping the connection's order.
        """
        spec = self._handlers.get(received.kind)
        if spec is None:  # unregistered since the connection checked the kind
            host.connection.handler_done()
            return send_outcome(host, host.connection.reply_error(
                received.kind, received.rchan, "unknown_kind", f"no handler for {received.kind!r}"))
        if spec.is_async or spec.in_thread:
            task = asyncio.create_task(_run_task(spec, received, host))
            host.track(task)
            # A threaded handler is waited for (order kept); an async one runs alongside.
            return asyncio.wait((task,)) if spec.in_thread else None  # type: ignore[return-value]
        telemetry = host.counters.telemetry
        if telemetry is not None:
            return telemetry.run_sync(spec, received, host)  # type: ignore[no-any-return]
        frame, _ = execute_sync(spec, received, host)
        return send_outcome(host, frame)


def execute_sync(spec: HandlerSpec, received: CustomReceived,
                 host: DispatchHost) -> tuple[SendFrame | None, bool]:
    """Run a sync handler now: the reply (or error reply) to send, and whether it succeeded."""
    try:
        result = spec.func(host.channel_id, received.data)
    except Exception as exc:
        host.counters.custom_error += 1
        return _failed(host, spec, received, exc), False
    else:
        host.counters.custom_ok += 1
        return _reply(host, received, result), True
    finally:
        host.connection.handler_done()


async def _run_task(spec: HandlerSpec, received: CustomReceived, host: DispatchHost) -> None:
    telemetry = host.counters.telemetry
    if telemetry is not None:
        await telemetry.run_task(spec, received, host)
        return
    frame, _ = await execute_async(spec, received, host)
    await deliver(host, frame)


async def execute_async(spec: HandlerSpec, received: CustomReceived,
                        host: DispatchHost) -> tuple[SendFrame | None, bool]:
    """Run an async or ``in_thread`` handler within ``handler_timeout``: the reply (or error
    reply) to send, and whether it succeeded."""
    try:
        async with asyncio.timeout(host.config.handler_timeout):
            if spec.in_thread:
                result = await asyncio.to_thread(spec.func, host.channel_id, received.data)
            else:
                result = await spec.func(host.channel_id, received.data)
    except TimeoutError:
        host.counters.custom_timeout += 1
        host.log_app_error(logging.WARNING, "custom handler timed out", (spec.kind, "TimeoutError"),
                           kind=spec.kind)
        return host.connection.reply_error(received.kind, received.rchan, "timeout",
                                           "the handler timed out"), False
    except Exception as exc:
        host.counters.custom_error += 1
        return _failed(host, spec, received, exc), False
    else:
        host.counters.custom_ok += 1
        return _reply(host, received, result), True
    finally:
        host.connection.handler_done()


async def deliver(host: DispatchHost, frame: SendFrame | None) -> None:
    """Send a task's reply, waiting for room if it must."""
    pending = send_outcome(host, frame)
    if pending is not None:
        # The connection may close while the reply waits for room.
        with contextlib.suppress(ConnectionClosed):
            await pending

def _reply(host: DispatchHost, received: CustomReceived, result: Any) -> SendFrame | None:
    try:
        return host.connection.encode_reply(received.kind, received.rchan, result)
    except pydantic_core.PydanticSerializationError as exc:
        host.log_app_error(logging.ERROR, "custom handler returned a value JSON cannot carry",
                           (received.kind, type(exc).__name__), exc_info=True, kind=received.kind)
        return host.connection.reply_error(received.kind, received.rchan, "handler_error",
                                           "the handler's result could not be encoded")


def _failed(host: DispatchHost, spec: HandlerSpec, received: CustomReceived,
            exc: Exception) -> SendFrame | None:
    # The traceback goes to the log with the channel and kind; the wire gets a code only.
    # Application code failed, not the peer: the record is the application's (its own budget,
    # and the first of each kind and exception type always written).
    host.log_app_error(logging.ERROR, "custom handler failed", (spec.kind, type(exc).__qualname__),
                       exc_info=True, kind=spec.kind)
    return host.connection.reply_error(received.kind, received.rchan, "handler_error",
                                       "the handler failed")


def send_outcome(host: DispatchHost, frame: SendFrame | None) -> Awaitable[None] | None:
    return None if frame is None else host.send_nowait(frame.frame)
