"""Custom message handlers by kind (protocol.md sections 2-4).

The application registers ``handler(channel_id, data)`` for a kind, sync or async, like Dara's
``config.add_ws_handler``. A non-``None`` return value becomes the reply. Sync handlers run in the
receive loop, so a connection's messages are handled in order; ``in_thread=True`` runs a blocking
sync handler in a worker thread (order kept, other connections not blocked). Async handlers run as
tracked tasks of the connection, cancelled when it closes.
"""

from __future__ import annotations

__all__ = ["CustomHandler", "CustomHandlerRegistry", "HandlerSpec"]

import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .exceptions import UnknownKind

CustomHandler = Callable[[str, Any], Any | Awaitable[Any]]
H = TypeVar("H", bound=CustomHandler)


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
