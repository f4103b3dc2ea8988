"""Test your custom handlers and server requests against the protocol, with no socket and no
event loop: the same :class:`~dara_ws_core.connection.ServerConnection` the servers run, driven
synchronously, plus hypothesis strategies for what clients send.

    from hypothesis import given
    from dara_ws_core.testing import ProtocolHarness, json_values

    @given(json_values())
    def test_echo_answers_with_what_it_got(value):
        harness = ProtocolHarness(manager)          # your manager, with its handlers
        reply = harness.call("echo", value)         # a client request with __rchan
        assert reply["message"]["data"] == value    # the frame as the client parses it

Sync and ``in_thread`` handlers are called inline; async handlers are run to completion step by
step, which works for handlers that await other coroutines but not for ones that wait on real
I/O or timers (test those over :class:`~dara_ws_core.memory.MemoryServer`). Every frame the
harness collects is parsed as a browser's ``JSON.parse`` would (strictly), so a frame the stock
client could not read fails your test.

The strategies need ``hypothesis`` (``pip install "dara-ws-core[testing]"``); the harness does not.
"""

from __future__ import annotations

__all__ = [
    "ProtocolHarness",
    "answer_frames",
    "client_frames",
    "custom_frames",
    "hostile_frames",
    "json_values",
]

import asyncio
import inspect
import json
import logging
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from .auth import Identity
from .codec import build_frame
from .config import ServerConfig
from .connection import (
    CloseConnection,
    CustomReceived,
    Event,
    RequestCompleted,
    RequestFailed,
    SendFrame,
    ServerConnection,
    State,
)
from .custom import CustomHandlerRegistry
from .exceptions import DaraWSError, UnknownChannel
from .handler import current_channel, current_identity
from .manager import WebsocketManager
from .messages import LoosePayload

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

logger = logging.getLogger("dara_ws_core.testing")

#: How many times an async handler may yield before the harness gives up on it.
MAX_STEPS = 10_000


def _strict_loads(frame: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"the server sent {constant}, which JSON.parse refuses")

    return json.loads(frame, parse_constant=refuse)


class ProtocolHarness:
    """One client connection, driven synchronously. Frames in, parsed frames out.

    ``handlers`` is your manager (its custom handlers are used) or a registry. ``sent`` keeps
    every frame the server sent, parsed; ``closed`` is the close the server decided, if any;
    ``answers`` and ``failures`` hold the outcome of each server request by ``__rchan``;
    ``errors`` holds what your handlers raised (each is logged with its traceback, as on a
    server, where the client gets a ``handler_error`` reply).

    The connection is in no manager: a handler that reaches it through the manager
    (``send_and_wait``, ``send_message``, fan-out to its user) needs a server, and the harness
    raises a ``RuntimeError`` that says so; test it over ``MemoryServer``.
    """

    def __init__(
        self,
        handlers: WebsocketManager | CustomHandlerRegistry | None = None,
        config: ServerConfig | None = None,
        *,
        channel_id: str = "test-channel",
        identity: Identity | None = None,
        now: float = 0.0,
    ) -> None:
        if isinstance(handlers, WebsocketManager):
            config = config or handlers.config
            handlers = handlers.custom_handlers
        self.handlers = handlers or CustomHandlerRegistry()
        self.identity = identity or Identity(user_id="test-user", session_id="test-session")
        self.now = now
        self.connection: ServerConnection[str] = ServerConnection(
            channel_id, config, now=now, expires_at=self.identity.expires_at, kinds=self.handlers
        )
        self.sent: list[Any] = [_strict_loads(self.connection.init_frame)]
        self.closed: CloseConnection | None = None
        self.answers: dict[str, Any] = {}
        self.failures: dict[str, DaraWSError] = {}
        #: What the handlers raised, in order: each one's client got a ``handler_error`` reply.
        self.errors: list[BaseException] = []

    @property
    def state(self) -> State:
        return self.connection.state

    # ------------------------------------------------------------------ client -> server

    def receive(self, frame: str | bytes, *, after: float = 0.0) -> list[Any]:
        """The client sends ``frame`` (``str``: text, ``bytes``: binary) ``after`` seconds;
        returns the frames the server sent in response, parsed."""
        self.now += after
        return self._apply(self.connection.receive_frame(frame, self.now))

    def call(self, kind: str, data: Any = None) -> Any:
        """Send a custom request (with ``__rchan``) and return the server's reply, parsed.

        Raises ``AssertionError`` if the server answered with anything but exactly one reply.
        """
        rchan = f"call-{len(self.sent)}"
        frames = self.receive(json.dumps({"type": "custom", "message": {
            "kind": kind, "data": data, "__rchan": rchan}}))
        replies = [f for f in frames if f.get("message", {}).get("__response_for") == rchan]
        assert len(replies) == 1, f"expected one reply to {kind!r}, the server sent {frames}"
        return replies[0]

    def advance(self, seconds: float, *, wall: float = 0.0) -> list[Any]:
        """Let time pass (idle timeout; ``wall`` is the epoch time for identity expiry)."""
        self.now += seconds
        return self._apply(self.connection.tick(self.now, wall))

    # ------------------------------------------------------------------ server -> client

    def request(self, payload: LoosePayload, *, custom: bool = False) -> tuple[str, Any]:
        """Open a server request (as ``send_and_wait`` does); returns its ``__rchan`` and the
        frame the client gets, parsed. Answer it with :meth:`answer`."""
        rchan = self.connection.open_request("waiter")
        frame = build_frame(payload, custom=custom, rchan=rchan)
        parsed = _strict_loads(frame)
        self.sent.append(parsed)
        return rchan, parsed

    def answer(self, rchan: str, value: Any, *, chunks: int | None = None) -> list[Any]:
        """The client answers a server request (one part of ``chunks`` when given)."""
        frame: dict[str, Any] = {"type": "message", "channel": rchan, "message": value}
        if chunks is not None:
            frame["chunk_count"] = chunks
        return self.receive(json.dumps(frame))

    def close(self, code: int = 1000, reason: str = "") -> list[Any]:
        """The server decides to close (as ``close_channel`` does)."""
        return self._apply(self.connection.close(code, reason))

    # ------------------------------------------------------------------ events

    def _apply(self, events: Iterable[Event]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, SendFrame):
                out.append(_strict_loads(event.frame))
            elif isinstance(event, CloseConnection):
                self.closed = event
            elif isinstance(event, CustomReceived):
                reply = self._run(event)
                if reply is not None:
                    out.append(_strict_loads(reply.frame))
            elif isinstance(event, RequestCompleted):
                self.answers[event.rchan] = event.value
            elif isinstance(event, RequestFailed):
                self.failures[event.rchan] = event.error
        self.sent.extend(out)
        return out

    def _run(self, event: CustomReceived) -> SendFrame | None:
        conn = self.connection
        spec = self.handlers.get(event.kind)
        channel = current_channel.set(conn.channel_id)
        identity = current_identity.set(self.identity)
        try:
            result = spec.func(conn.channel_id, event.data)
            if spec.is_async or inspect.iscoroutine(result):  # a lambda calling an async function too
                result = _run_to_completion(result, event.kind)  # type: ignore[arg-type]
        except _NeedsLoop:
            raise
        except (Exception, asyncio.CancelledError) as exc:  # no task here: a cancel is the handler's own
            if isinstance(exc, RuntimeError) and "event loop" in str(exc):
                raise _NeedsLoop(event.kind) from exc  # asyncio.sleep(), a lock... wanted a loop
            if isinstance(exc, UnknownChannel) and exc.channel_id == conn.channel_id:
                # The harness's connection is in no manager: on a server, this would have worked.
                raise _NotInManager(event.kind) from exc
            # As on a server: the client gets a code, the traceback goes to the log. And to
            # errors, for the test to look at.
            self.errors.append(exc)
            logger.error("custom handler failed (kind %r)", event.kind, exc_info=True)
            return conn.reply_error(event.kind, event.rchan, "handler_error", "the handler failed")
        finally:
            current_channel.reset(channel)
            current_identity.reset(identity)
            conn.handler_done(event.size)
        return conn.reply(event.kind, event.rchan, result)


class _NeedsLoop(RuntimeError):
    def __init__(self, kind: str) -> None:
        super().__init__(
            f"the handler for {kind!r} waits on I/O or a timer, which needs an event loop:"
            " test it over dara_ws_core.memory.MemoryServer instead"
        )


class _NotInManager(RuntimeError):
    def __init__(self, kind: str) -> None:
        super().__init__(
            f"the handler for {kind!r} reached the harness's own channel through the manager"
            " (send_and_wait, send_message, close_channel...), which knows only the connections"
            " it serves: test it over dara_ws_core.memory.MemoryServer instead"
        )


def _run_to_completion(coro: Coroutine[Any, Any, Any], kind: str) -> Any:
    try:
        for _ in range(MAX_STEPS):
            if coro.send(None) is not None:
                raise _NeedsLoop(kind)
    except StopIteration as done:
        return done.value
    finally:
        coro.close()
    raise RuntimeError(f"the handler for {kind!r} did not finish in {MAX_STEPS} steps")


# --------------------------------------------------------------------------- strategies


def _st() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as exc:
        raise ImportError(
            'dara_ws_core.testing strategies need hypothesis: pip install "dara-ws-core[testing]"',
            name=exc.name,
        ) from exc
    return strategies


def json_values(max_leaves: int = 8) -> SearchStrategy[Any]:
    """Any JSON value a browser could send (finite numbers, any text without lone surrogates)."""
    st = _st()
    scalars = (st.none() | st.booleans() | st.integers(-(2**53), 2**53)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
    return st.recursive(  # type: ignore[no-any-return]
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                    max_size=4),
        max_leaves=max_leaves,
    )


def custom_frames(kinds: Iterable[str], data: SearchStrategy[Any] | None = None) -> SearchStrategy[str]:
    """Client custom messages for ``kinds``, as requests (``__rchan``) or not."""
    st = _st()

    def frame(kind: str, value: Any, rchan: str | None) -> str:
        message: dict[str, Any] = {"kind": kind, "data": value}
        if rchan is not None:
            message["__rchan"] = rchan
        return json.dumps({"type": "custom", "message": message})

    return st.builds(  # type: ignore[no-any-return]
        frame, st.sampled_from(sorted(kinds)), data if data is not None else json_values(),
        st.none() | st.uuids(version=4).map(str),
    )


def answer_frames(rchans: Iterable[str], value: SearchStrategy[Any] | None = None) -> SearchStrategy[str]:
    """Client answers to server requests ``rchans`` (plain, or one part of a chunked answer)."""
    st = _st()

    def frame(rchan: str, message: Any, count: int | None) -> str:
        body: dict[str, Any] = {"type": "message", "channel": rchan, "message": message}
        if count is not None:
            body["chunk_count"] = count
        return json.dumps(body)

    return st.builds(  # type: ignore[no-any-return]
        frame, st.sampled_from(sorted(rchans)), value if value is not None else json_values(),
        st.none() | st.integers(1, 4),
    )


def hostile_frames() -> SearchStrategy[str | bytes]:
    """Frames no stock client sends, each with a defined outcome in the protocol: binary, not
    JSON, JSON that is not an object, NaN and Infinity, nesting too deep, unknown types, invalid
    fields, lone surrogate escapes, and arbitrary text."""
    st = _st()
    return st.one_of(  # type: ignore[no-any-return]
        st.binary(max_size=64),
        st.text(max_size=64),
        st.sampled_from([
            "[1, 2]", "null", '"text"',
            '{"type":"custom","message":{"kind":"k","data":NaN}}',
            '{"type":"custom","message":{"kind":"k","data":[Infinity,-Infinity]}}',
            '{"type":"custom","message":{"kind":"k","data":"\\ud800"}}',
            '{"type":"ping"}', '{"type":"nope"}', '{"type":"message","channel":1}',
            '{"type":"custom","message":{"data":1}}', "[" * 300 + "]" * 300,
        ]),
    )


def client_frames(kinds: Iterable[str], rchans: Iterable[str] = ()) -> SearchStrategy[str | bytes]:
    """Anything a client may send: pings, custom messages for ``kinds``, answers for
    ``rchans``, and hostile frames."""
    st = _st()
    strategies = [st.just('{"type":"ping","message":null}'), custom_frames(kinds), hostile_frames()]
    rchans = list(rchans)
    if rchans:
        strategies.append(answer_frames(rchans))
    return st.one_of(*strategies)  # type: ignore[no-any-return]
