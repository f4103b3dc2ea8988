"""Application code run as connections open and end: :meth:`WebsocketManager.on_connect` and
:meth:`WebsocketManager.on_disconnect` (python-socketio's ``connect`` and ``disconnect`` events).

``on_connect(channel_id, identity)`` runs once the channel is registered and its ``init`` (and
its user's kept messages) are queued, in the connection's context (``current_channel``,
``current_identity``), before its first frame is handled: what it sends follows them. A sync
hook is called there and then; the first async one (or awaitable a sync one returns) moves the
rest of the hooks, in order, to a task the connection tracks like a custom handler's: it never
holds up the connection's frames, it is cancelled when the connection closes, and each hook
within it is bounded by ``handler_timeout``.

``on_disconnect(channel_id, identity, closed)`` runs once the channel is removed (no longer
reachable; its user's other channels are), whatever ended it, exactly once for each connection
``on_connect`` ran for; ``closed`` is the :class:`~dara_ws_core.exceptions.ConnectionClosed` that
says how (``code``, ``reason``). Its hooks run in order in one task of the manager's (never inside
the close, which may happen in the middle of a fan-out), each bounded by ``handler_timeout``,
once the connection's ``on_connect`` task, cancelled with it, has unwound (or
``handler_timeout`` has passed): what ``on_connect`` does as it unwinds lands before what
``on_disconnect`` undoes. :meth:`Endpoint.shutdown` waits for those of its own connections.
Those tasks are bounded in count: at most ``ServerConfig.max_disconnect_hooks`` run at once, and
the connections of one client address hold at most a quarter of them (a client connecting and
closing in a loop, with a slow hook, would otherwise pile up a task, and the connection it
holds, every time). Beyond, that connection's ``on_disconnect`` hooks are not run: counted in
:attr:`ServerStats.hooks` (``disconnect_dropped``) and logged at WARNING, never silently.

A hook that raises or times out is logged with the application's failures (their own budget,
the first of each hook and exception type always written) and counted in
:attr:`ServerStats.hooks`; the connection stays open. Refusing a connection is the
authenticator's job: it runs before there is a channel.
"""

from __future__ import annotations

__all__ = ["DISCONNECT_ADDRESS_SHARES", "ConnectHook", "ConnectionHooks", "DisconnectHook", "Hook"]

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .exceptions import ConnectionClosed
from .handler import current_channel, current_identity
from .logs import _name_of, current_source

if TYPE_CHECKING:
    from .handler import WebSocketHandler

#: ``on_connect(channel_id, identity)``, sync or async (``identity``: what the authenticator gave).
ConnectHook = Callable[[str, Any], Any]
#: ``on_disconnect(channel_id, identity, closed)``, sync or async.
DisconnectHook = Callable[[str, Any, ConnectionClosed], Any]

_CONNECT = "connect"
_DISCONNECT = "disconnect"
#: The connections of one client address hold at most this fraction of the ``on_disconnect``
#: tasks (``ServerConfig.max_disconnect_hooks``), as of the other budgets shared by a process.
DISCONNECT_ADDRESS_SHARES = 4


@dataclass(frozen=True, slots=True)
class Hook:
    """A registered hook and how to call it."""

    event: str  # "connect" or "disconnect"
    func: Callable[..., Any]
    is_async: bool


def _check_arguments(event: str, func: Callable[..., Any]) -> None:
    """``TypeError`` if ``func`` cannot take a hook's arguments: at registration, not at the
    first connection."""
    takes = "(channel_id, identity, closed)" if event == _DISCONNECT else "(channel_id, identity)"
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without one: taken at its word
        return
    try:
        signature.bind(*range(takes.count(",") + 1))
    except TypeError:
        raise TypeError(f"an on_{event} hook takes {takes}; {_name_of(func)} has the signature "
                        f"{signature}") from None


class ConnectionHooks:
    """The manager's ``on_connect`` and ``on_disconnect`` hooks, and what runs them: the
    channels they ran for (so that each gets one ``on_disconnect``) and the ``on_disconnect``
    tasks still running (each endpoint's :meth:`Endpoint.shutdown` waits for its own). Made by the first hook
    registered: a manager without hooks pays one ``None`` check per connection."""

    __slots__ = ("by_address", "connect", "connecting", "disconnect", "open", "tasks")

    def __init__(self) -> None:
        # Tuples, replaced on registration: a hook registered while others run joins the next
        # connection's, never the running sequence.
        self.connect: tuple[Hook, ...] = ()
        self.disconnect: tuple[Hook, ...] = ()
        #: Channels ``on_connect`` ran for, whose ``on_disconnect`` is still to come, with
        #: their client's address (``current_source``; ``None`` where there is none).
        self.open: dict[str, str | None] = {}
        #: ``on_disconnect`` tasks running, by channel (one per ended connection, at most).
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: Of those, how many each client address's connections hold (those holding any).
        self.by_address: dict[str, int] = {}
        #: ``on_connect`` tasks running, by channel: a channel's ``on_disconnect`` starts once
        #: its ``on_connect`` (cancelled with the connection) has unwound.
        self.connecting: dict[str, asyncio.Task[None]] = {}

    def add(self, event: str, func: Callable[..., Any]) -> None:
        """Register ``func`` for ``event``; ``TypeError`` for what cannot be a hook."""
        if not callable(func):
            raise TypeError(f"an on_{event} hook must be a callable, not {type(func).__name__}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(f"an on_{event} hook cannot be a generator function: it would never run "
                            f"({_name_of(func)})")
        is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - async callable objects
        )
        _check_arguments(event, func)
        hook = Hook(event, func, is_async)
        if event == _CONNECT:
            self.connect += (hook,)
        else:
            self.disconnect += (hook,)

    # ------------------------------------------------------------------ running them

    def connected(self, handler: WebSocketHandler) -> None:
        """A connection is served: its ``init`` and kept messages are queued (the driver calls
        it in the connection's context, before its first frame). Runs the sync hooks, and the
        rest from the first async one in a task the connection tracks."""
        if handler.closed:  # closed as it started (its kept messages overflowed its queue)
            return
        self.open[handler.channel_id] = current_source.get()
        hooks = self.connect
        args = (handler.channel_id, handler.identity)
        for index, hook in enumerate(hooks):
            if handler.closed:  # an earlier hook closed it
                return
            if hook.is_async:
                rest, first = hooks[index:], None
            else:
                result = _call_sync(hook, handler, args)
                if result is None:
                    continue
                if handler.closed:  # it closed the connection: nothing left to run
                    _discard(result)
                    return
                rest, first = hooks[index + 1:], (hook, result)
            task = asyncio.get_running_loop().create_task(_run(rest, first, handler, args),
                                                          name=f"on_connect {handler.channel_id}")
            handler.track(task)
            self.connecting[handler.channel_id] = task
            task.add_done_callback(functools.partial(_forget, self.connecting, handler.channel_id))
            if first is not None:
                # Cancelled before its first step (the connection closed at once), the task never
                # awaits it: discarded, not left to warn that it was never awaited.
                task.add_done_callback(functools.partial(_discard, first[1]))
            return

    def disconnected(self, handler: WebSocketHandler, closed: ConnectionClosed) -> None:
        """A channel was removed (the manager calls it): its ``on_disconnect`` hooks, if
        ``on_connect`` ran for it, in a task of their own, in a context naming the channel
        (not the one of whoever closed it)."""
        channel_id = handler.channel_id
        if channel_id not in self.open:
            return
        address = self.open.pop(channel_id)
        hooks = self.disconnect
        if not hooks:
            return
        if (full := self._full(handler.config.max_disconnect_hooks, address)) is not None:
            _count(handler, _DISCONNECT, "dropped")
            handler.log_app_error(logging.WARNING, "on_disconnect hooks not run: %s (%s)",
                                  ("<on_disconnect>", "dropped"), full,
                                  ", ".join(_name_of(hook.func) for hook in hooks), hook=_DISCONNECT)
            return
        args = (channel_id, handler.identity, closed)
        task = asyncio.get_running_loop().create_task(
            _run(hooks, None, handler, args, self.connecting.get(channel_id)),
            name=f"on_disconnect {channel_id}", context=contextvars.Context())
        self.tasks[channel_id] = task
        if address is not None:
            self.by_address[address] = self.by_address.get(address, 0) + 1
        task.add_done_callback(functools.partial(self._done, channel_id, address))

    def _full(self, limit: int, address: str | None) -> str | None:
        """Why another ``on_disconnect`` task cannot start (its address's connections, or all
        of them, hold their share of ``limit``), or ``None``."""
        if len(self.tasks) >= limit:
            return f"{len(self.tasks)} connections' on_disconnect hooks are running, max_disconnect_hooks"
        share = max(1, limit // DISCONNECT_ADDRESS_SHARES)
        if address is not None and self.by_address.get(address, 0) >= share:
            return (f"the connections of its client address run {share} already, a "
                    f"{DISCONNECT_ADDRESS_SHARES}th of max_disconnect_hooks")
        return None

    def _done(self, channel_id: str, address: str | None, _: object) -> None:
        """A channel's ``on_disconnect`` task is done: no longer listed, nor counted."""
        self.tasks.pop(channel_id, None)
        if address is not None:
            left = self.by_address.get(address, 0) - 1
            if left > 0:
                self.by_address[address] = left
            else:
                self.by_address.pop(address, None)

    @staticmethod
    async def wait(tasks: Collection[asyncio.Task[None]], timeout: float) -> None:
        """Wait up to ``timeout`` for ``on_disconnect`` tasks (an endpoint's: those of the
        connections it served), then cancel those left (each is bounded by ``handler_timeout``
        already; a shutdown leaves none of its own pending, and never cuts short another
        endpoint's)."""
        if not tasks:
            return
        _, still = await asyncio.wait(list(tasks), timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5.0)


def _forget(tasks: dict[str, asyncio.Task[None]], channel_id: str, _: object) -> None:
    """A channel's hook task is done: no longer listed."""
    tasks.pop(channel_id, None)


def _discard(awaitable: Awaitable[Any], _: object = None) -> None:
    """Let go of an awaitable a hook returned that will not be awaited (closing a coroutine
    that ran, or was closed, does nothing)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _call_sync(hook: Hook, handler: WebSocketHandler, args: tuple[Any, ...]) -> Awaitable[Any] | None:
    """Call a sync hook; what it returned to await (a lambda calling an async function), if any.
    A failure is logged and counted."""
    try:
        result = hook.func(*args)
    except (Exception, asyncio.CancelledError) as exc:
        # Nothing cancels a sync call: a CancelledError is its own (a cancelled future's
        # result), a failure. Raised on, it ended the connection's task before its serving
        # began (the channel left registered), or skipped the next on_disconnect hooks.
        _failed(hook, handler, exc)
        return None
    if inspect.isawaitable(result):
        return result
    _count(handler, hook.event, "ok")
    return None


async def _run(hooks: tuple[Hook, ...], first: tuple[Hook, Awaitable[Any]] | None,
               handler: WebSocketHandler, args: tuple[Any, ...],
               unwinding: asyncio.Task[None] | None = None) -> None:
    """Run ``hooks`` in order (after ``first``: a sync hook's awaitable), each within
    ``handler_timeout``; ``on_disconnect`` ones once the channel's ``on_connect`` task
    (``unwinding``, cancelled) is done, or ``handler_timeout`` has passed."""
    if len(args) == 3:  # on_disconnect, in a context of its own
        current_channel.set(args[0])
        if args[1] is not None:
            current_identity.set(args[1])
        if unwinding is not None and not unwinding.done():
            # What on_connect does as it unwinds (a write it shielded) lands before what
            # on_disconnect undoes.
            await asyncio.wait((unwinding,), timeout=handler.config.handler_timeout)
    if first is not None:
        await _bounded(first[0], handler, args, first[1])
    for hook in hooks:
        if handler.closed and hook.event == _CONNECT:
            return  # (its task is being cancelled)
        if hook.is_async:
            await _bounded(hook, handler, args, None)
        else:
            result = _call_sync(hook, handler, args)
            if result is not None:
                await _bounded(hook, handler, args, result)


async def _bounded(hook: Hook, handler: WebSocketHandler, args: tuple[Any, ...],
                   awaitable: Awaitable[Any] | None) -> None:
    """Await an async hook (or what a sync one returned) within ``handler_timeout``."""
    scope = asyncio.timeout(handler.config.handler_timeout)
    try:
        async with scope:
            await (hook.func(*args) if awaitable is None else awaitable)
    except TimeoutError as exc:
        if not scope.expired():  # its own (a send_and_wait it let through): a failure
            _failed(hook, handler, exc)
            return
        _count(handler, hook.event, "timeout")
        handler.log_app_error(logging.WARNING, "on_%s hook timed out after %.3g s (%s)",
                              (f"<on_{hook.event}>", "TimeoutError"), hook.event,
                              handler.config.handler_timeout, _name_of(hook.func), hook=hook.event)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the connection closed, or the server stops
        _failed(hook, handler, exc)  # its own: it awaited something cancelled
    except Exception as exc:
        _failed(hook, handler, exc)
    else:
        _count(handler, hook.event, "ok")


def _failed(hook: Hook, handler: WebSocketHandler, exc: BaseException) -> None:
    # The application's failure, as a custom handler's: its own budget of records, and the
    # first of each hook event and exception type always written.
    _count(handler, hook.event, "error")
    handler.log_app_error(logging.ERROR, "on_%s hook failed (%s)", (f"<on_{hook.event}>", type(exc).__qualname__),
                          hook.event, _name_of(hook.func), exc_info=True, hook=hook.event)


def _count(handler: WebSocketHandler, event: str, outcome: str) -> None:
    counters = handler.counters
    counters.count(counters.hooks, f"{event}_{outcome}")
