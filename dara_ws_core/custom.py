"""Custom message handlers by kind (protocol.md sections 2-4), and how they are run.

The application registers ``handler(channel_id, data)`` for a kind, sync or async, like Dara's
``config.add_ws_handler``. A non-``None`` return value becomes the reply. Sync handlers run in the
receive loop, so a connection's messages are handled in order; ``in_thread=True`` runs a blocking
sync handler in a worker thread (order kept, other connections not blocked) of the manager's own
pool (:class:`HandlerThreads`), of which one user holds only a share. Async handlers run as
tracked tasks of the connection, cancelled when it closes. What the client gets back (the reply,
or a ``handler_error`` / ``timeout`` error reply) is the connection's decision
(:class:`~dara_ws_core.connection.ServerConnection`); :meth:`CustomHandlerRegistry.dispatch`
runs the handler and hands it the outcome.
"""

from __future__ import annotations

__all__ = ["CustomHandler", "CustomHandlerRegistry", "DispatchHost", "HandlerSpec", "HandlerThreads"]

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pydantic_core

from .auth import Identity, holder_of
from .config import ServerConfig
from .connection import CustomReceived, SendFrame, ServerConnection
from .exceptions import ConnectionClosed, UnknownKind
from .logs import _name_of, current_source
from .stats import Counters

CustomHandler = Callable[[str, Any], Any | Awaitable[Any]]
_DEFAULT_THREADS = ServerConfig().handler_threads
H = TypeVar("H", bound=CustomHandler)


class DispatchHost(Protocol):
    """What running a handler needs from its connection (a ``WebSocketHandler``)."""

    channel_id: str
    config: ServerConfig
    connection: ServerConnection[Any]
    counters: Counters
    identity: Identity | None

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


class HandlerThreads:
    """The worker threads that ``in_thread`` handlers run on, and each source's share of them.

    One per manager (its registry's :attr:`CustomHandlerRegistry.threads`), sized by
    ``ServerConfig.handler_threads``; threads are started as work arrives, never more than
    ``size``. A *source* (a user; an anonymous connection's remote address) holds at most
    :attr:`share` of them, an eighth (at least one): its handlers running, and those still
    running after their request timed out (a thread cannot be stopped: it counts until the
    function returns). Sources that hold a thread already share only the first ``size -``
    :attr:`reserve` threads: the last eighth is kept for sources holding none, so that a
    newcomer finds a thread until ``reserve`` more sources than the ``(size - reserve) / share``
    that fill the rest run handlers at once (11 with 32 threads). No job ever waits for a
    thread: beyond its share, or with no thread it may take, :meth:`submit` refuses at once
    (the request is answered ``busy``), so that clients whose requests are slow, or made slow
    on purpose, never make others' requests wait until they time out. The sources of one
    client ``address`` hold at most :attr:`address_share` together (a quarter, at least two
    shares), whatever users they name. Submit and shut down from one thread (the event loop's).
    """

    __slots__ = ("_executor", "_held", "_lock", "_total", "address_share", "reserve", "share", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        #: Threads one source may hold at once.
        self.share = max(1, size // 8)
        #: Threads only a source holding none may take (the last ones).
        self.reserve = self.share
        #: Threads the sources of one client address may hold together, whatever users they
        #: name: without it, one client naming a user for every share (free where the
        #: authenticator lets anyone name themselves) took every thread.
        self.address_share = max(2 * self.share, size // 4)
        # Jobs per source; a job's thread releases its own when it returns (no second wake-up
        # of the loop for it), so the counts are shared with the threads, under the lock.
        self._held: dict[Hashable, int] = {}
        self._total = 0  # the sum of _held
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # made by the first job

    def held(self, source: Hashable) -> int:
        """Jobs of ``source`` submitted and not yet returned (or cancelled unstarted)."""
        return self._held.get(source, 0)

    def submit(self, source: Hashable, func: Callable[..., Any], *args: Any,
               address: str | None = None) -> concurrent.futures.Future[Any] | None:
        """Run ``func(*args)`` on a thread, in a copy of the current context (as
        ``asyncio.to_thread``), charged to ``source`` and to its client ``address`` (if known)
        until it returns; ``None``, and nothing run, when ``source`` holds its share already,
        its address holds :attr:`address_share`, or no thread is free for it (every one taken,
        or all but the reserve while it holds one)."""
        keys: tuple[Hashable, ...] = (source,) if address is None else (source, (HandlerThreads, address))
        with self._lock:
            held = self._held.get(source, 0)
            total = self._total
            if held >= self.share or total >= (self.size - self.reserve if held else self.size):
                return None
            if address is not None and self._held.get(keys[1], 0) >= self.address_share:
                return None
            for key in keys:
                self._held[key] = self._held.get(key, 0) + 1
            self._total = total + 1
        executor = self._executor
        if executor is None:
            self._executor = executor = concurrent.futures.ThreadPoolExecutor(
                self.size, thread_name_prefix="dara-ws-handler")
        job = executor.submit(self._run, keys, contextvars.copy_context().run, func, *args)
        job.add_done_callback(functools.partial(self._cancelled, keys))
        return job

    def _run(self, keys: tuple[Hashable, ...], run: Callable[..., Any], func: Callable[..., Any],
             *args: Any) -> Any:
        try:
            return run(func, *args)
        finally:
            self._release(keys)

    def _cancelled(self, keys: tuple[Hashable, ...], job: concurrent.futures.Future[Any]) -> None:
        if job.cancelled():  # never started (its request timed out first): _run never ran
            self._release(keys)

    def _release(self, keys: tuple[Hashable, ...]) -> None:
        with self._lock:
            self._total -= 1
            for key in keys:
                held = self._held.get(key, 0) - 1
                if held > 0:
                    self._held[key] = held
                else:
                    self._held.pop(key, None)

    def shutdown(self) -> None:
        """Let the pool's threads end once the jobs handed to them return (without waiting for
        them). Nothing is cancelled: no job waits for a thread, and one just handed over runs,
        so that the requests of another endpoint serving the same manager are all answered. A
        later job starts a new pool (the counts stay: never more than ``size`` jobs run), so a
        manager served again after a shutdown still runs its handlers. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


class CustomHandlerRegistry:
    """Handlers by kind, and the threads its ``in_thread`` handlers run on; one per manager
    (which sizes :attr:`threads` from ``ServerConfig.handler_threads``)."""

    __slots__ = ("_handlers", "threads")

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerSpec] = {}
        #: Where ``in_thread`` handlers run (see :class:`HandlerThreads`).
        self.threads = HandlerThreads(_DEFAULT_THREADS)

    def register(self, kind: str, func: CustomHandler, *, in_thread: bool = False) -> None:
        """Register ``func`` for ``kind``; raises ``ValueError`` if the kind is taken,
        ``TypeError`` if ``kind`` is not a string or ``func`` not callable, or a generator
        function (sync or async)."""
        if not isinstance(kind, str):
            raise TypeError(f"a handler's kind must be a str, not {type(kind).__name__}")
        if not callable(func):
            raise TypeError(f"the handler for kind {kind!r} must be a callable "
                            f"handler(channel_id, data), not {type(func).__name__}")
        if kind in self._handlers:
            raise ValueError(f"a handler is already registered for kind {kind!r}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # Its result would be a generator, which no reply can carry: refused when every
            # request for it would fail, not at the first one.
            raise TypeError(f"the handler for kind {kind!r} is a generator function: a handler returns "
                            "its reply (or awaits it, if async); it cannot yield a stream of them")
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
            host.connection.handler_done(received.size)
            return send_outcome(host, host.connection.reply_error(
                received.kind, received.rchan, "unknown_kind", f"no handler for {received.kind!r}"))
        if spec.in_thread:
            job = self.threads.submit(_source(host), spec.func, host.channel_id, received.data,
                                      address=current_source.get())
            if job is None:  # its user (or address) holds its share of the threads
                host.connection.handler_done(received.size)
                host.connection.busy += 1
                return send_outcome(host, host.connection.reply_error(
                    received.kind, received.rchan, "busy", "its share of the handler threads is in use"))
            task = asyncio.create_task(_run_task(spec, received, host, job))
            host.track(task)
            return asyncio.wait((task,))  # type: ignore[return-value]  # waited for: order kept
        if spec.is_async:
            host.track(asyncio.create_task(_run_task(spec, received, host)))  # runs alongside
            return None
        telemetry = host.counters.telemetry
        if telemetry is not None:
            return telemetry.run_sync(spec, received, host)  # type: ignore[no-any-return]
        outcome = execute_sync(spec, received, host)
        if not isinstance(outcome, tuple):
            run_returned(spec, received, host, outcome)
            return None
        return send_outcome(host, outcome[0])


def execute_sync(spec: HandlerSpec, received: CustomReceived,
                 host: DispatchHost) -> tuple[SendFrame | None, bool] | Awaitable[Any]:
    """Run a sync handler now: the reply (or error reply) to send, and whether it succeeded;
    or what it returned to await, for :func:`run_returned` to run as an async handler's (its
    own execution: the caller counts none for this call)."""
    awaited = False
    try:
        result = spec.func(host.channel_id, received.data)
        if inspect.isawaitable(result):
            # A callable that is not a coroutine function returned something to await (a lambda
            # calling an async function, a decorator's plain wrapper): run as an async handler's.
            # Its reply was the coroutine object, which no encoder takes, and it never ran.
            awaited = True
            return result
    except (Exception, asyncio.CancelledError) as exc:  # nothing cancels a sync call: its own
        host.counters.custom_error += 1
        return _failed(host, spec, received, exc), False
    else:
        host.counters.custom_ok += 1
        return _reply(host, spec, received, result), True
    finally:
        if not awaited:  # else its task's
            host.connection.handler_done(received.size)


def run_returned(spec: HandlerSpec, received: CustomReceived, host: DispatchHost,
                 awaitable: Awaitable[Any]) -> None:
    """Run what a sync handler returned to await (:func:`execute_sync`) as an async handler's
    task, which ``host`` tracks."""
    host.track(asyncio.create_task(_run_task(spec, received, host, awaitable)))


def _source(host: DispatchHost) -> Hashable:
    """Whose share of the threads a handler of ``host``'s connection takes: its user, or for an
    anonymous connection (``allow_anonymous``, or no identity) its remote address (the
    handshake's ``current_source``; the channel where the transport has none)."""
    return holder_of(host.identity, current_source.get()) or ("channel", host.channel_id)


async def _run_task(spec: HandlerSpec, received: CustomReceived, host: DispatchHost,
                    job: concurrent.futures.Future[Any] | Awaitable[Any] | None = None) -> None:
    telemetry = host.counters.telemetry
    if telemetry is not None:
        await telemetry.run_task(spec, received, host, job)
        return
    frame, _ = await execute_async(spec, received, host, job)
    await deliver(host, frame)


async def execute_async(spec: HandlerSpec, received: CustomReceived, host: DispatchHost,
                        job: concurrent.futures.Future[Any] | Awaitable[Any] | None = None,
                        ) -> tuple[SendFrame | None, bool]:
    """Wait for an async handler, or an ``in_thread`` handler's ``job`` (already submitted to
    the threads), or what a sync handler returned to await, within ``handler_timeout``: the
    reply (or error reply) to send, and whether it succeeded. A job that times out is cancelled
    if it has not started; if it has, its thread runs on, still charged to its source, and its
    result is ignored."""
    scope = asyncio.timeout(host.config.handler_timeout)
    try:
        async with scope:
            if isinstance(job, concurrent.futures.Future):
                result = _not_awaitable(spec, await asyncio.wrap_future(job))
            elif job is not None:
                result = await job
            else:
                result = await spec.func(host.channel_id, received.data)
    except TimeoutError as exc:
        if not scope.expired():
            # The handler's own (a send_and_wait's RequestTimeout it let through, say): a failure
            # with its traceback, not "timed out after handler_timeout", which it had not.
            host.counters.custom_error += 1
            return _failed(host, spec, received, exc), False
        host.counters.custom_timeout += 1
        host.log_app_error(logging.WARNING, "custom handler timed out after %.3g s (kind %r, %s)",
                           (spec.kind, "TimeoutError"), host.config.handler_timeout, spec.kind,
                           _name_of(spec.func), kind=spec.kind)
        return host.connection.reply_error(received.kind, received.rchan, "timeout",
                                           "the handler timed out"), False
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the connection closes, or the server stops: no reply is wanted
        # The handler's own (it awaited something cancelled): a failure like any other. Raised
        # on, it ended the task with no reply, and the client waited for its timeout.
        host.counters.custom_error += 1
        return _failed(host, spec, received, exc), False
    except Exception as exc:
        host.counters.custom_error += 1
        return _failed(host, spec, received, exc), False
    else:
        host.counters.custom_ok += 1
        return _reply(host, spec, received, result), True
    finally:
        host.connection.handler_done(received.size)


def _not_awaitable(spec: HandlerSpec, result: Any) -> Any:
    """An ``in_thread`` handler's result; ``TypeError`` if it is something to await (a sync
    wrapper of an async function): no thread runs it, and running it on the event loop is not
    what ``in_thread`` asked for. A coroutine is closed, not left to warn it was never awaited."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"the in_thread handler for kind {spec.kind!r} ({_name_of(spec.func)}) returned "
                        f"{type(result).__name__} {result!r}, something to await: a thread cannot run a "
                        "coroutine. Register an async handler without in_thread=True")
    return result


async def deliver(host: DispatchHost, frame: SendFrame | None) -> None:
    """Send a task's reply, waiting for room if it must."""
    pending = send_outcome(host, frame)
    if pending is not None:
        # The connection may close while the reply waits for room.
        with contextlib.suppress(ConnectionClosed):
            await pending

def _reply(host: DispatchHost, spec: HandlerSpec, received: CustomReceived,
           result: Any) -> SendFrame | None:
    try:
        return host.connection.encode_reply(received.kind, received.rchan, result)
    except pydantic_core.PydanticSerializationError as exc:
        host.log_app_error(logging.ERROR, "custom handler returned a value JSON cannot carry "
                           "(kind %r, %s)", (received.kind, type(exc).__name__), received.kind,
                           _name_of(spec.func), exc_info=True, kind=received.kind)
        return host.connection.reply_error(received.kind, received.rchan, "handler_error",
                                           "the handler's result could not be encoded")


def _failed(host: DispatchHost, spec: HandlerSpec, received: CustomReceived,
            exc: BaseException) -> SendFrame | None:
    # The traceback goes to the log with the channel and kind (in the text too, for the default
    # format, which prints no extra field); the wire gets a code only.
    # Application code failed, not the peer: the record is the application's (its own budget,
    # and the first of each kind and exception type always written).
    host.log_app_error(logging.ERROR, "custom handler failed (kind %r, %s)",
                       (spec.kind, type(exc).__qualname__), spec.kind, _name_of(spec.func),
                       exc_info=True, kind=spec.kind)
    return host.connection.reply_error(received.kind, received.rchan, "handler_error",
                                       "the handler failed")


def send_outcome(host: DispatchHost, frame: SendFrame | None) -> Awaitable[None] | None:
    return None if frame is None else host.send_nowait(frame.frame)
