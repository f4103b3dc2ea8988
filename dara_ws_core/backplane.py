"""The backplane: the same manager calls reach channels connected to other server processes.

A manager with no backplane keeps everything in its own process; that is the default and costs
nothing. Several processes behind a load balancer share a *bus* (Redis, see ``dara_ws_redis``)
through a backplane each::

    backplane = RedisBackplane("redis://127.0.0.1:6379/0")
    manager = WebsocketManager(config, backplane=backplane)
    await backplane.start(manager)     # subscribe, register this process's channels
    ...
    await endpoint.shutdown()          # close the clients first: their removals are published
    await backplane.stop()

Then ``send_message``, ``broadcast``, ``send_message_to_user`` and ``send_and_wait`` reach every
channel of the cluster, and ``await manager.get_all_user_channels(user_id)`` sees them all (the sync
``get_user_channels`` stays local: it cannot wait for the bus).

Design (what :class:`BrokerBackplane` implements over any bus):

* **Route by interest.** Each process (a *node*) subscribes to its own topic
  (``<namespace>:node:<node_id>``) and to one broadcast topic. A directory in the bus maps
  channel -> node and user -> {channel: node}; a message for a channel is published once, to the
  topic of the node holding it, so a process receives only what is meant for its clients (plus
  broadcasts), never every message of the cluster.
* **Encode once.** The manager encodes a frame once; the backplane prefixes a small routing header
  and publishes that one ``bytes`` object (once per destination node for a user's channels); the
  receiving node hands one ``bytes`` object to all of its recipients' queues.
* **Pipelined.** Everything a node publishes goes through one ordered outbox that a single task
  drains in batches (one bus round trip per batch, not per message), so messages from one
  process leave in the order its calls made them. A message for a channel is looked up and
  published in one step (one round trip on Redis: a small script).
* **Expiry, not goodbyes.** Directory entries carry an expiry that a heartbeat refreshes, so a
  process that dies leaves nothing registered beyond ``expiry`` seconds. Directory writes never
  block a connection: ``channel_added`` / ``channel_removed`` queue a change, one background task
  writes them in batches (:meth:`BrokerBackplane.flush` waits for them).
* **Requests across processes.** ``send_and_wait`` to a remote channel publishes a request to the
  owning node, which runs the channel's own ``send_and_wait`` and publishes the answer, or the
  failure (timeout, connection closed, chunk error...), to the asking node's topic; the asker
  raises the same exception it would for a local channel. A disconnecting client fails the
  request at once, as locally.
* **Faults.** When the bus is unreachable, local delivery keeps working; messages for other
  processes are counted in ``stats.failed`` and logged (once when the outage starts and once, with
  the count, when it ends), never silently dropped. Fan-out calls (``broadcast``,
  ``send_message_to_user``) do not raise for that; single-recipient calls (``send_message`` to a
  remote channel, ``send_and_wait``) raise :class:`~dara_ws_core.exceptions.BackplaneError`.
  Waiting requests fail at once with ``BackplaneError`` when the bus connection is lost (their
  answers could be lost too). The connection is retried with exponential backoff and jitter; once
  back, the node resubscribes and re-registers every channel it holds.

The bus wire (pure: :func:`encode_bus_message` / :func:`decode_bus_message`): one compact JSON
header, a newline, then the body (a client frame exactly as the manager encoded it, or a JSON
answer). The header never contains a raw newline (JSON escapes it).

:class:`MemoryBroker` + :class:`MemoryBackplane` are the in-process bus: several managers in one
process sharing a broker behave like several processes sharing Redis (same routing code, same
failure handling), which makes fast, deterministic tests of the routing logic possible.
"""

from __future__ import annotations

__all__ = [
    "Backplane",
    "BackplaneStats",
    "BroadcastDelivery",
    "BrokerBackplane",
    "BusMessage",
    "ChannelDelivery",
    "Failure",
    "MemoryBackplane",
    "MemoryBroker",
    "Publication",
    "RemoteCancel",
    "RemoteReply",
    "RemoteRequest",
    "UserDelivery",
    "decode_bus_message",
    "encode_bus_message",
    "error_of",
    "failure_of",
    "relayed_payload",
]

import abc
import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pydantic_core
from pydantic import BaseModel

from .exceptions import (
    BackplaneError,
    ChunkError,
    ConnectionClosed,
    DaraWSError,
    RequestTimeout,
    SlowConsumer,
    TooManyPendingRequests,
    UnknownChannel,
)
from .messages import LoosePayload, build_frame, decode_server_frame, dumps

if TYPE_CHECKING:
    from .auth import Identity
    from .handler import WebSocketHandler
    from .manager import WebsocketManager

logger = logging.getLogger("dara_ws_core.backplane")

_from_json = pydantic_core.from_json

#: (channel id, user id or None): one directory entry.
Entry = tuple[str, str | None]
#: What publishing did: (node holding the channel or None, receivers; -1: nothing published).
Routed = tuple[str | None, int]


@dataclass(frozen=True, slots=True)
class Publication:
    """One message to publish (set exactly one target): to ``topic``, to the node holding
    ``channel_id``, or to every other node holding channels of ``user_id``."""

    data: bytes
    topic: str | None = None
    channel_id: str | None = None
    user_id: str | None = None


# =========================================================================== the contract


class Backplane(Protocol):
    """What a :class:`~dara_ws_core.manager.WebsocketManager` needs to reach other processes.

    The manager calls the hooks; the application calls :meth:`start` and :meth:`stop`. Frames are
    ``bytes`` of UTF-8 JSON already encoded once by the manager.
    """

    async def start(self, manager: WebsocketManager) -> None:
        """Connect, subscribe and register the manager's channels; attaches itself to a manager
        created without a backplane. Raises ``BackplaneError`` if the bus cannot be reached."""

    async def stop(self) -> None:
        """Unregister this process's channels, fail waiting requests, disconnect. Idempotent."""

    def channel_added(self, channel_id: str, identity: Identity | None) -> None:
        """A channel connected here. Must not block: queue the directory write."""

    def channel_removed(self, channel_id: str, identity: Identity | None) -> None:
        """A channel of this process is gone. Must not block: queue the directory write."""

    async def send_to_channel(self, channel_id: str, frame: bytes) -> None:
        """Deliver a frame to a channel held by another process. Raises ``UnknownChannel`` if no
        live process holds it, ``BackplaneError`` if the bus is unreachable."""

    async def broadcast(self, frame: bytes, ignore_channel: str | None) -> None:
        """Deliver a frame to every channel of every *other* process (the caller delivered the
        local ones). Never raises for remote failures: they are counted and logged."""

    async def send_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None) -> None:
        """Deliver a frame to the user's channels on every *other* process. Never raises for
        remote failures: they are counted and logged."""

    async def request(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool,
        timeout: float | None,
    ) -> Any:
        """``send_and_wait`` to a channel held by another process; raises what the local call
        raises (``RequestTimeout``, ``ConnectionClosed``, ``ChunkError``...), plus
        ``UnknownChannel`` and ``BackplaneError``."""

    async def user_channels(self, user_id: str) -> set[str]:
        """Every connected channel of a user, on every process. Raises ``BackplaneError``."""


# =========================================================================== bus messages (pure)


@dataclass(frozen=True, slots=True)
class ChannelDelivery:
    """A frame for one channel, published to the node that holds it."""

    channel_id: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class UserDelivery:
    """A frame for a user's channels on the receiving node, except ``ignore``."""

    user_id: str
    ignore: str | None
    frame: bytes


@dataclass(frozen=True, slots=True)
class BroadcastDelivery:
    """A frame for every channel of every node but ``origin`` (which delivered it locally)."""

    origin: str
    ignore: str | None
    frame: bytes


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """``send_and_wait`` for a channel of the receiving node; ``frame`` is the request's envelope
    without ``__rchan`` (the owning channel's handler adds its own)."""

    request_id: str
    reply_to: str
    channel_id: str
    custom: bool
    timeout: float | None
    frame: bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a remote request failed: ``kind`` names the exception to raise on the asking side."""

    kind: str
    message: str
    code: int | None = None


@dataclass(frozen=True, slots=True)
class RemoteReply:
    """The answer to a :class:`RemoteRequest`: ``result`` (JSON) or ``failure``."""

    request_id: str
    result: bytes = b""
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class RemoteCancel:
    """The asker gave up (cancelled or timed out): the owner stops waiting for the client."""

    request_id: str


BusMessage = (
    ChannelDelivery | UserDelivery | BroadcastDelivery | RemoteRequest | RemoteReply | RemoteCancel
)


def encode_bus_message(message: BusMessage) -> bytes:
    """Encode a bus message: a JSON header, ``\\n``, the body (frame or answer, not re-encoded)."""
    head: dict[str, Any]
    body = b""
    if isinstance(message, ChannelDelivery):
        head, body = {"op": "ch", "ch": message.channel_id}, message.frame
    elif isinstance(message, UserDelivery):
        head = {"op": "user", "user": message.user_id, "ignore": message.ignore}
        body = message.frame
    elif isinstance(message, BroadcastDelivery):
        head = {"op": "all", "origin": message.origin, "ignore": message.ignore}
        body = message.frame
    elif isinstance(message, RemoteRequest):
        head = {"op": "req", "id": message.request_id, "reply_to": message.reply_to,
                "ch": message.channel_id, "custom": message.custom, "timeout": message.timeout}
        body = message.frame
    elif isinstance(message, RemoteReply):
        head = {"op": "rep", "id": message.request_id}
        if message.failure is not None:
            head["fail"] = asdict(message.failure)
        body = message.result
    elif isinstance(message, RemoteCancel):
        head = {"op": "cancel", "id": message.request_id}
    else:
        raise TypeError(f"not a bus message: {type(message).__name__}")
    return b"%b\n%b" % (dumps(head), body)


def _field(head: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = head.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BackplaneError(f"malformed bus message: bad {key!r}")
    return value


def decode_bus_message(data: bytes) -> BusMessage:
    """Decode a bus message; raises ``BackplaneError`` if it is malformed."""
    raw, sep, body = bytes(data).partition(b"\n")
    if not sep:
        raise BackplaneError("malformed bus message: no header")
    try:
        head = _from_json(raw)
    except ValueError:
        raise BackplaneError("malformed bus message: header is not JSON") from None
    if not isinstance(head, dict):
        raise BackplaneError("malformed bus message: header is not an object")
    op = head.get("op")
    opt_str = (str, type(None))
    if op == "ch":
        return ChannelDelivery(_field(head, "ch", str), body)
    if op == "user":
        return UserDelivery(_field(head, "user", str), _field(head, "ignore", opt_str), body)
    if op == "all":
        return BroadcastDelivery(_field(head, "origin", str), _field(head, "ignore", opt_str), body)
    if op == "req":
        timeout = head.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float)):
            raise BackplaneError("malformed bus message: bad 'timeout'")
        return RemoteRequest(_field(head, "id", str), _field(head, "reply_to", str),
                             _field(head, "ch", str), _field(head, "custom", bool),
                             None if timeout is None else float(timeout), body)
    if op == "rep":
        fail = head.get("fail")
        failure = None
        if fail is not None:
            if not isinstance(fail, dict):
                raise BackplaneError("malformed bus message: bad 'fail'")
            failure = Failure(_field(fail, "kind", str), _field(fail, "message", str),
                              _field(fail, "code", (int, type(None))))
        return RemoteReply(_field(head, "id", str), body, failure)
    if op == "cancel":
        return RemoteCancel(_field(head, "id", str))
    raise BackplaneError(f"malformed bus message: unknown op {op!r}")


def relayed_payload(frame: bytes) -> tuple[LoosePayload | BaseModel, bool]:
    """Turn a request's envelope (as the asking process encoded it, without ``__rchan``) back into
    what ``send_and_wait`` takes, so that the owning channel encodes exactly the same frame plus
    its own ``__rchan``: ``(payload, custom)``.

    Application payloads stay plain dicts (a model would read keys such as ``rchan`` as its
    fields); first-party payloads, which carry ``__typename``, go back into their envelope model.
    Raises ``BackplaneError`` for a frame that is not an envelope.
    """
    try:
        envelope = _from_json(frame)
    except ValueError:
        raise BackplaneError("malformed request: not JSON") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise BackplaneError("malformed request: not an envelope")
    kind = envelope.get("type")
    if kind not in ("message", "custom"):
        raise BackplaneError(f"malformed request: type {kind!r}")
    if "__typename" in envelope:
        return decode_server_frame(frame), kind == "custom"
    return envelope["message"], kind == "custom"


def failure_of(exc: BaseException) -> Failure:
    """The :class:`Failure` that carries ``exc`` to the asking process (no internals leak)."""
    if isinstance(exc, RequestTimeout):
        return Failure("timeout", str(exc))
    if isinstance(exc, ConnectionClosed):
        return Failure("closed", exc.reason, exc.code)
    if isinstance(exc, ChunkError):
        return Failure("chunk", str(exc))
    if isinstance(exc, TooManyPendingRequests):
        return Failure("busy", str(exc))
    if isinstance(exc, SlowConsumer):
        return Failure("slow", str(exc))
    if isinstance(exc, UnknownChannel):
        return Failure("unknown_channel", str(exc))
    return Failure("error", "the request failed on the process holding the channel")


def error_of(failure: Failure, channel_id: str) -> DaraWSError:
    """The exception the asking side raises for a remote :class:`Failure`."""
    kind = failure.kind
    if kind == "timeout":
        return RequestTimeout(failure.message)
    if kind == "closed":
        return ConnectionClosed(failure.code if failure.code is not None else 1006, failure.message)
    if kind == "chunk":
        return ChunkError(failure.message)
    if kind == "busy":
        return TooManyPendingRequests(failure.message)
    if kind == "slow":
        return SlowConsumer(failure.message)
    if kind == "unknown_channel":
        return UnknownChannel(channel_id)
    return BackplaneError(failure.message)


# =========================================================================== the routing logic


@dataclass(slots=True)
class BackplaneStats:
    """Counters of one node's backplane (for metrics and tests)."""

    #: Bus messages this node published.
    published: int = 0
    #: Bus messages this node received (its own broadcasts echoed back are not counted).
    received: int = 0
    #: Frames handed to local channels' queues from the bus (one per recipient).
    delivered: int = 0
    #: Messages for other processes that could not be published (bus unreachable or erroring):
    #: lost, and reported here and in the log.
    failed: int = 0
    #: Messages whose channel or node was gone by the time they were routed.
    undeliverable: int = 0
    #: Times the bus connection came back after being lost.
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BrokerBackplane(abc.ABC):
    """The routing logic of a backplane over a publish/subscribe bus with a key-value directory.

    Subclasses implement the bus primitives (``_bus_session``, ``_publish_batch``, the directory
    methods) and translate their library's errors into ``BackplaneError``; this class does the
    routing, the request/reply correlation, the directory upkeep and the fault handling.

    ``heartbeat_interval``: how often this node refreshes its directory entries;
    ``expiry`` (default 3 x the interval): how long entries outlive a node that stopped refreshing
    them; ``connect_timeout``: how long :meth:`start` waits for the bus; ``backoff_initial`` /
    ``backoff_max``: reconnection delays (exponential, with jitter); ``max_outbox``: messages
    waiting to be published before senders wait for room.
    """

    def __init__(
        self,
        *,
        node_id: str | None = None,
        namespace: str = "dara-ws",
        heartbeat_interval: float = 5.0,
        expiry: float | None = None,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        max_outbox: int = 10_000,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        expiry = 3 * heartbeat_interval if expiry is None else expiry
        if expiry <= heartbeat_interval:
            raise ValueError("expiry must be longer than heartbeat_interval")
        self.node_id = node_id or uuid.uuid4().hex
        self.namespace = namespace
        self.heartbeat_interval = heartbeat_interval
        self.expiry = expiry
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.node_topic = self.topic_of(self.node_id)
        self.broadcast_topic = f"{namespace}:broadcast"
        self.stats = BackplaneStats()
        self._manager: WebsocketManager | None = None
        self._running = False
        self._stopping = False
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._written_cond = asyncio.Condition()
        # Directory changes not written yet: channel -> (user, present). Later changes of the
        # same channel replace earlier ones, so a connect + disconnect in one batch coalesce.
        self._changes: dict[str, tuple[str | None, bool]] = {}
        self._version = 0
        self._written = 0
        self._refresh = True
        #: Requests this node asked: request id -> (future, channel id).
        self._waiting: dict[str, tuple[asyncio.Future[Any], str]] = {}
        self._serving: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # One ordered outbox for everything this node publishes: one task drains it in batches
        # (one round trip per batch), so publishing never costs a round trip per message and
        # messages leave in the order the manager's calls made them.
        self._outbox: deque[tuple[Publication, asyncio.Future[Routed] | None, str]] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_space = asyncio.Event()
        self._outbox_space.set()
        self._outbox_idle = asyncio.Event()
        self._outbox_idle.set()
        self.max_outbox = max_outbox
        self._publisher_task: asyncio.Task[None] | None = None
        self._bus_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._session_up = False
        self._down_since: float | None = None
        self._failed_at_down = 0
        self._warned = False

    def topic_of(self, node_id: str) -> str:
        """The bus topic a node listens on."""
        return f"{self.namespace}:node:{node_id}"

    @property
    def connected(self) -> bool:
        """Whether the bus subscription is up."""
        return self._connected.is_set()

    @property
    def manager(self) -> WebsocketManager:
        if self._manager is None:
            raise RuntimeError("the backplane is not started")
        return self._manager

    # ------------------------------------------------------------------ bus primitives

    @abc.abstractmethod
    async def _bus_session(self) -> None:
        """Connect and subscribe to ``node_topic`` and ``broadcast_topic``; call ``_bus_up()``
        once subscribed, then ``_on_bus_message(data)`` for each message, until the connection
        ends (return, or raise ``BackplaneError``). Called again, with backoff, after it ends."""

    @abc.abstractmethod
    async def _close_bus(self) -> None:
        """Release the bus connections (at :meth:`stop`)."""

    @abc.abstractmethod
    async def _publish_batch(self, batch: Sequence[Publication]) -> list[Routed]:
        """Publish a batch in order, in as few round trips as the bus allows; one result per
        publication (each looks up and publishes in one step, so none costs a round trip of its
        own):

        * to a topic: ``(None, receivers)``;
        * to a channel: ``(None, -1)`` if nobody holds it, ``(node, -1)`` if this node does
          (nothing published), else ``(node, receivers)`` after publishing to its node's topic;
        * to a user: published once to each *other* node holding channels of the user,
          ``(None, receivers in all)``; entries of nodes that nobody listens for are dropped.
        """

    @abc.abstractmethod
    async def _user_entries(self, user_id: str) -> dict[str, str]:
        """The user's live channels: channel -> node."""

    @abc.abstractmethod
    async def _write_directory(self, present: Sequence[Entry], absent: Sequence[Entry]) -> None:
        """Register ``present`` as held by this node (refreshing their expiry); unregister
        ``absent``."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, manager: WebsocketManager) -> None:
        """Connect, subscribe and register the manager's channels (see :class:`Backplane`)."""
        if self._running:
            raise RuntimeError("the backplane is already started")
        if manager.backplane is None:
            manager.backplane = self
        elif manager.backplane is not self:
            raise ValueError("the manager has another backplane")
        self._manager = manager
        self._running, self._stopping = True, False
        loop = asyncio.get_running_loop()
        self._bus_task = loop.create_task(self._run_bus(), name=f"backplane-bus-{self.node_id}")
        self._writer_task = loop.create_task(self._maintain(), name=f"backplane-dir-{self.node_id}")
        self._publisher_task = loop.create_task(self._publish_loop(),
                                                name=f"backplane-pub-{self.node_id}")
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connected.wait()
                await self.flush()
        except TimeoutError:
            await self.stop()
            raise BackplaneError(
                f"could not reach the backplane within {self.connect_timeout} s"
            ) from None
        logger.info("backplane started", extra={"node": self.node_id})

    async def stop(self) -> None:
        """Unregister this node's channels (best effort, bounded), let replies being served
        finish briefly, fail waiting requests with ``BackplaneError`` and disconnect.

        Call it after the endpoint's ``shutdown``, so that clients are closed first.
        """
        if not self._running:
            return
        self._stopping = True
        await _cancel(self._writer_task)
        if self._serving:
            await asyncio.wait(list(self._serving.values()), timeout=1.0)
        if self._connected.is_set():
            absent = [(c, u) for c, (u, there) in self._changes.items() if not there]
            absent += [(c, _user_of(h)) for c, h in self.manager.handlers.items()]
            try:
                async with asyncio.timeout(2.0):
                    await self._write_directory((), absent)
            except (BackplaneError, TimeoutError) as exc:
                logger.warning("backplane: could not unregister channels at stop (%s); "
                               "they expire in %.1f s", exc, self.expiry)
        for task in list(self._serving.values()):
            task.cancel()
        if self._connected.is_set():
            with contextlib.suppress(TimeoutError):  # let queued messages leave, briefly
                async with asyncio.timeout(1.0):
                    await self._outbox_idle.wait()
        await _cancel(self._publisher_task)
        self._drop_outbox(BackplaneError("the backplane stopped"))
        await _cancel(self._bus_task)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._serving.values(), *self._background, return_exceptions=True)
        self._fail_waiting(BackplaneError("the backplane stopped"))
        self._connected.clear()
        with contextlib.suppress(Exception):
            await self._close_bus()
        self._running = False

    async def wait_connected(self) -> None:
        """Wait until the bus subscription is up (wrap in ``asyncio.timeout``)."""
        await self._connected.wait()

    async def flush(self) -> None:
        """Wait until every channel change made so far is written to the directory and every
        queued message has left (published, or failed and counted). Wrap it in
        ``asyncio.timeout``: while the bus is unreachable it waits for the reconnection."""
        target = self._version
        async with self._written_cond:
            await self._written_cond.wait_for(lambda: self._written >= target)
        await self._outbox_idle.wait()

    # ------------------------------------------------------------------ manager hooks

    def channel_added(self, channel_id: str, identity: Identity | None) -> None:
        self._change(channel_id, identity, True)

    def channel_removed(self, channel_id: str, identity: Identity | None) -> None:
        self._change(channel_id, identity, False)

    def _change(self, channel_id: str, identity: Identity | None, present: bool) -> None:
        self._changes[channel_id] = (identity.user_id if identity is not None else None, present)
        self._version += 1
        self._wake.set()

    async def send_to_channel(self, channel_id: str, frame: bytes) -> None:
        data = encode_bus_message(ChannelDelivery(channel_id, frame))
        await self._route(channel_id, data, "message")

    async def broadcast(self, frame: bytes, ignore_channel: str | None) -> None:
        data = encode_bus_message(BroadcastDelivery(self.node_id, ignore_channel, frame))
        await self._post(Publication(data, topic=self.broadcast_topic), "broadcast")

    async def send_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None) -> None:
        data = encode_bus_message(UserDelivery(user_id, ignore_channel, frame))
        await self._post(Publication(data, user_id=user_id), "message to a user")

    async def request(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool,
        timeout: float | None,
    ) -> Any:
        frame = build_frame(message, custom=custom)  # the caller's errors surface here, once
        scope = asyncio.timeout(timeout)
        request_id = uuid.uuid4().hex
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        owner: str | None = None
        try:
            async with scope:
                self._waiting[request_id] = (waiter, channel_id)
                data = encode_bus_message(RemoteRequest(
                    request_id, self.node_id, channel_id, custom, timeout, frame))
                owner = await self._route(channel_id, data, "request")
                return await waiter
        except TimeoutError:
            if scope.expired():
                raise RequestTimeout(
                    f"no answer from channel {channel_id} within {timeout} s"
                ) from None
            raise
        finally:
            self._waiting.pop(request_id, None)
            if owner is not None and (not waiter.done() or waiter.cancelled()):
                waiter.cancel()
                # Timed out or cancelled here: the owner stops waiting for its client too.
                self._post_nowait(Publication(encode_bus_message(RemoteCancel(request_id)),
                                              topic=self.topic_of(owner)), "cancel")

    async def user_channels(self, user_id: str) -> set[str]:
        local = self.manager.registry.user_channels(user_id)
        if not self._connected.is_set():
            raise BackplaneError("the backplane is disconnected")
        entries = await self._user_entries(user_id)
        # This node's own entries may lag behind (a removal not written yet): trust the registry.
        return local | {c for c, node in entries.items() if node != self.node_id}

    # ------------------------------------------------------------------ publishing

    async def _route(self, channel_id: str, data: bytes, what: str) -> str:
        """Publish to the node holding ``channel_id``; return that node. Raises
        ``UnknownChannel`` if no live node holds it, ``BackplaneError`` (counted) if the bus is
        unreachable."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Routed] = loop.create_future()
        await self._post(Publication(data, channel_id=channel_id), what, done)
        owner, receivers = await done
        if owner is None or receivers < 0:
            raise UnknownChannel(channel_id)
        if receivers == 0:  # registered, but its node is not listening: dead or cut off
            self.stats.undeliverable += 1
            raise UnknownChannel(channel_id)
        return owner

    async def _post(self, publication: Publication, what: str,
                    done: asyncio.Future[Routed] | None = None) -> None:
        """Queue a publication (waiting for room if the outbox is full). Without ``done`` a
        failure is only counted and logged; with it, ``done`` gets the result or the
        ``BackplaneError`` (also counted)."""
        while len(self._outbox) >= self.max_outbox and self._connected.is_set():
            self._outbox_space.clear()
            await self._outbox_space.wait()
        self._post_nowait(publication, what, done)

    def _post_nowait(self, publication: Publication, what: str,
                     done: asyncio.Future[Routed] | None = None) -> None:
        if not self._connected.is_set():
            self._count_failure(what, None)
            if done is not None:
                done.set_exception(BackplaneError("the backplane is disconnected"))
            return
        self._outbox.append((publication, done, what))
        self._outbox_idle.clear()
        self._outbox_ready.set()

    async def _publish_loop(self) -> None:
        outbox = self._outbox
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                batch = [outbox.popleft() for _ in range(min(len(outbox), 1000))]
                self._outbox_space.set()
                try:
                    if not self._connected.is_set():
                        raise BackplaneError("the backplane is disconnected")
                    results = await self._publish_batch([p for p, _, _ in batch])
                except Exception as exc:
                    if not isinstance(exc, BackplaneError):  # a bug: log it, keep publishing
                        logger.exception("backplane: publishing failed",
                                         extra={"node": self.node_id})
                    for _, done, what in batch:
                        self._count_failure(what, exc)
                        if done is not None and not done.done():
                            done.set_exception(BackplaneError(str(exc)))
                    continue
                for (_, done, _), (owner, receivers) in zip(batch, results, strict=True):
                    if receivers >= 0:
                        self.stats.published += 1
                    if done is not None and not done.done():
                        done.set_result((owner, receivers))
            self._outbox_idle.set()

    def _drop_outbox(self, exc: BackplaneError) -> None:
        while self._outbox:
            _, done, what = self._outbox.popleft()
            self._count_failure(what, exc)
            if done is not None and not done.done():
                done.set_exception(exc)
        self._outbox_idle.set()

    def _count_failure(self, what: str, exc: BaseException | None) -> None:
        self.stats.failed += 1
        if exc is not None and self._connected.is_set():
            logger.warning("backplane: %s not published: %s", what, exc,
                           extra={"node": self.node_id, "failed": self.stats.failed})
        elif not self._warned:
            self._warned = True
            logger.warning("backplane unavailable: %s and further messages for other processes "
                           "are not published until it reconnects (counted in stats.failed)",
                           what, extra={"node": self.node_id, "failed": self.stats.failed})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ receiving

    def _on_bus_message(self, data: bytes) -> None:
        """Handle one message from the bus. Never blocks (deliveries are queue offers) and never
        raises: one bad message must not cost the subscription."""
        try:
            message = decode_bus_message(data)
        except BackplaneError as exc:
            logger.warning("backplane: dropped a message: %s", exc, extra={"node": self.node_id})
            return
        try:
            self._dispatch(message)
        except Exception:
            logger.exception("backplane: handling a message failed", extra={"node": self.node_id})

    def _dispatch(self, message: BusMessage) -> None:
        manager = self._manager
        if manager is None:
            return
        if isinstance(message, BroadcastDelivery):
            if message.origin == self.node_id:
                return  # our own broadcast, already delivered locally by the manager
            self.stats.received += 1
            self._deliver(manager.handlers.values(), message.frame, message.ignore)
            return
        self.stats.received += 1
        if isinstance(message, ChannelDelivery):
            handler = manager.handlers.get(message.channel_id)
            if handler is None or not self._deliver((handler,), message.frame, None):
                self.stats.undeliverable += 1
                logger.debug("backplane: message for a channel that is gone",
                             extra={"channel": message.channel_id})
        elif isinstance(message, UserDelivery):
            handlers = manager.handlers
            local = [handlers[c] for c in manager.registry.user_channels(message.user_id)
                     if c in handlers]
            self._deliver(local, message.frame, message.ignore)
        elif isinstance(message, RemoteRequest):
            task = asyncio.get_running_loop().create_task(self._serve(message))
            self._serving[message.request_id] = task
        elif isinstance(message, RemoteReply):
            self._settle(message)
        elif isinstance(message, RemoteCancel):
            serving = self._serving.get(message.request_id)
            if serving is not None:
                serving.cancel()

    def _deliver(
        self, handlers: Iterable[WebSocketHandler], frame: bytes, ignore: str | None
    ) -> int:
        # The manager's fan-out never waits: the bus reader is never held up by a slow client.
        assert self.manager is not None
        delivered = self.manager.deliver_local(handlers, frame, ignore)
        self.stats.delivered += delivered
        return delivered

    async def _serve(self, request: RemoteRequest) -> None:
        """Run a remote ``send_and_wait`` on the local channel and publish its outcome."""
        try:
            try:
                handler = self.manager.handlers.get(request.channel_id)
                if handler is None:
                    raise UnknownChannel(request.channel_id)
                payload, custom = relayed_payload(request.frame)
                result = await handler.send_and_wait(
                    payload, custom=custom, timeout=request.timeout
                )
                reply = RemoteReply(request.request_id, result=dumps(result))
            except DaraWSError as exc:
                reply = RemoteReply(request.request_id, failure=failure_of(exc))
            except Exception as exc:
                logger.exception("backplane: serving a remote request failed",
                                 extra={"channel": request.channel_id})
                reply = RemoteReply(request.request_id, failure=failure_of(exc))
        finally:
            self._serving.pop(request.request_id, None)
        self._post_nowait(Publication(encode_bus_message(reply),
                                      topic=self.topic_of(request.reply_to)), "reply")

    def _settle(self, reply: RemoteReply) -> None:
        entry = self._waiting.get(reply.request_id)
        if entry is None or entry[0].done():
            logger.debug("backplane: reply for an unknown or settled request",
                         extra={"request": reply.request_id})
            return
        waiter, channel_id = entry
        if reply.failure is not None:
            waiter.set_exception(error_of(reply.failure, channel_id))
            return
        try:
            waiter.set_result(_from_json(reply.result))
        except ValueError:
            waiter.set_exception(BackplaneError("malformed reply from the owning process"))

    def _fail_waiting(self, exc: BackplaneError) -> None:
        for waiter, _ in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)

    # ------------------------------------------------------------------ connection upkeep

    def _bus_up(self) -> None:
        """Called by ``_bus_session`` once subscribed."""
        self._session_up = True
        if self._down_since is not None:
            lost = self.stats.failed - self._failed_at_down
            self.stats.reconnects += 1
            logger.warning(
                "backplane reconnected after %.1f s; %d message(s) for other processes could "
                "not be published meanwhile (stats.failed = %d)",
                time.monotonic() - self._down_since, lost, self.stats.failed,
                extra={"node": self.node_id, "lost": lost},
            )
            self._down_since = None
        self._refresh = True  # the bus may have lost the directory (a restart): write it all
        self._version += 1
        self._wake.set()
        self._connected.set()

    def _bus_down(self, reason: str) -> None:
        self._connected.clear()
        if self._down_since is None and not self._stopping:
            self._down_since = time.monotonic()
            self._failed_at_down = self.stats.failed
            self._warned = False
            logger.warning("backplane disconnected (%s): local delivery continues; "
                           "reconnecting with backoff", reason, extra={"node": self.node_id})
        # Answers published while we are not subscribed are lost: fail their waits now.
        self._fail_waiting(BackplaneError("the backplane connection was lost"))

    async def _run_bus(self) -> None:
        delay = self.backoff_initial
        while True:
            self._session_up = False
            try:
                await self._bus_session()
                reason = "connection closed"
            except BackplaneError as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:
                logger.exception("backplane: bus session failed", extra={"node": self.node_id})
                reason = repr(exc)
            self._bus_down(reason)
            if self._session_up:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff, not a sync point
            delay = min(self.backoff_max, delay * 2)

    async def _maintain(self) -> None:
        """Write directory changes in batches, and refresh every entry each heartbeat."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        while True:
            if not self._connected.is_set():
                await self._connected.wait()
            delay = next_refresh - loop.time()
            if not self._refresh and not self._changes and delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            if not self._connected.is_set():
                continue
            full = self._refresh or loop.time() >= next_refresh
            self._refresh = False
            changes, self._changes = self._changes, {}
            version = self._version
            present, absent = self._plan(changes, full)
            try:
                await self._write_directory(present, absent)
            except Exception as exc:
                if isinstance(exc, BackplaneError):
                    logger.warning("backplane: directory write failed (%s); retrying", exc,
                                   extra={"node": self.node_id})
                else:  # a bug: log it, keep the directory alive
                    logger.exception("backplane: directory write failed",
                                     extra={"node": self.node_id})
                for channel_id, change in changes.items():
                    self._changes.setdefault(channel_id, change)
                self._refresh = self._refresh or full
                await asyncio.sleep(min(self.heartbeat_interval, 1.0))  # retry delay
                continue
            if full:
                next_refresh = loop.time() + self.heartbeat_interval
            async with self._written_cond:
                self._written = max(self._written, version)
                self._written_cond.notify_all()

    def _plan(
        self, changes: dict[str, tuple[str | None, bool]], full: bool
    ) -> tuple[list[Entry], list[Entry]]:
        handlers = self.manager.handlers
        absent = [(c, u) for c, (u, there) in changes.items() if not there]
        if full:
            present = [(c, _user_of(h)) for c, h in handlers.items()]
        else:
            present = [(c, u) for c, (u, there) in changes.items() if there and c in handlers]
        return present, absent


def _user_of(handler: WebSocketHandler) -> str | None:
    return handler.identity.user_id if handler.identity is not None else None


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# =========================================================================== in-process bus


class _Subscription:
    __slots__ = ("callback", "lost", "topics")

    def __init__(self, topics: Collection[str], callback: Callable[[bytes], None]) -> None:
        self.topics = tuple(topics)
        self.callback = callback
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def deliver(self, data: bytes) -> None:
        if not self.lost.done():
            self.callback(data)


class MemoryBroker:
    """An in-process stand-in for Redis, shared by the :class:`MemoryBackplane` of several
    managers: topics (delivery on the next loop iteration, in order) and a directory whose entries
    expire on ``clock`` (pass a fake clock to test expiry without waiting).

    Fault injection: :meth:`fail` makes it unreachable (every subscription is lost, every call
    raises ``BackplaneError``) until :meth:`recover`; :meth:`forget` drops the directory, as a
    Redis restart without persistence does.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.available = True
        self._topics: dict[str, set[_Subscription]] = {}
        self._owners: dict[str, tuple[str, float]] = {}
        self._users: dict[str, dict[str, str]] = {}
        self._user_expiry: dict[str, float] = {}
        #: Messages published per topic (for tests of routing).
        self.published: dict[str, int] = {}

    def _check(self) -> None:
        if not self.available:
            raise BackplaneError("the memory broker is unavailable")

    def fail(self, reason: str = "the memory broker is unavailable") -> None:
        """Become unreachable: every subscription ends with ``BackplaneError``."""
        self.available = False
        subscriptions = {s for subs in self._topics.values() for s in subs}
        self._topics.clear()
        for sub in subscriptions:
            if not sub.lost.done():
                sub.lost.set_exception(BackplaneError(reason))

    def recover(self) -> None:
        self.available = True

    def forget(self) -> None:
        """Drop the whole directory (a restart that lost its data)."""
        self._owners.clear()
        self._users.clear()
        self._user_expiry.clear()

    def subscribe(self, topics: Collection[str], callback: Callable[[bytes], None]) -> _Subscription:
        self._check()
        sub = _Subscription(topics, callback)
        for topic in sub.topics:
            self._topics.setdefault(topic, set()).add(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        for topic in sub.topics:
            subs = self._topics.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._topics[topic]

    def publish(self, topic: str, data: bytes) -> int:
        self._check()
        self.published[topic] = self.published.get(topic, 0) + 1
        subs = self._topics.get(topic, ())
        loop = asyncio.get_running_loop()
        for sub in subs:
            loop.call_soon(sub.deliver, data)
        return len(subs)

    def owner(self, channel_id: str) -> str | None:
        self._check()
        entry = self._owners.get(channel_id)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self._owners[channel_id]
            return None
        return entry[0]

    def _user(self, user_id: str) -> dict[str, str]:
        expiry = self._user_expiry.get(user_id)
        if expiry is not None and expiry <= self.clock():
            self._users.pop(user_id, None)
            self._user_expiry.pop(user_id, None)
        return self._users.get(user_id, {})

    def publish_to_user(self, user_id: str, node_id: str, topic_of: Callable[[str], str],
                        data: bytes) -> int:
        """Publish once to every node but ``node_id`` holding channels of the user; entries of
        nodes nobody listens for are dropped (as the Redis script does)."""
        self._check()
        fields = self._user(user_id)
        receivers: dict[str, int] = {}
        for node in set(fields.values()) - {node_id}:
            receivers[node] = self.publish(topic_of(node), data)
        for channel_id, node in list(fields.items()):
            if receivers.get(node) == 0:
                del fields[channel_id]
        return sum(receivers.values())

    def user_entries(self, user_id: str) -> dict[str, str]:
        """Live entries of a user; stale ones (their channel expired or moved) are pruned."""
        self._check()
        fields = self._user(user_id)
        live = {c: n for c, n in fields.items() if self.owner(c) == n}
        for channel_id in set(fields) - set(live):
            del fields[channel_id]
        if not fields:
            self._users.pop(user_id, None)
            self._user_expiry.pop(user_id, None)
        return live

    def write(self, node_id: str, present: Sequence[Entry], absent: Sequence[Entry],
              expiry: float) -> None:
        self._check()
        until = self.clock() + expiry
        for channel_id, user_id in present:
            self._owners[channel_id] = (node_id, until)
            if user_id is not None:
                self._user(user_id)
                self._users.setdefault(user_id, {})[channel_id] = node_id
                self._user_expiry[user_id] = until
        for channel_id, user_id in absent:
            self._owners.pop(channel_id, None)
            if user_id is not None:
                fields = self._users.get(user_id)
                if fields is not None:
                    fields.pop(channel_id, None)
                    if not fields:
                        del self._users[user_id]
                        self._user_expiry.pop(user_id, None)

    def registered(self) -> tuple[set[str], set[str]]:
        """(channels, users) registered and not expired: for leak checks."""
        now = self.clock()
        channels = {c for c, (_, until) in self._owners.items() if until > now}
        users = {u for u in self._users if self._user_expiry.get(u, now) > now}
        return channels, users


class MemoryBackplane(BrokerBackplane):
    """A backplane over a :class:`MemoryBroker`: one per manager, several per broker."""

    def __init__(self, broker: MemoryBroker, **options: Any) -> None:
        super().__init__(**options)
        self.broker = broker

    async def _bus_session(self) -> None:
        sub = self.broker.subscribe((self.node_topic, self.broadcast_topic), self._on_bus_message)
        try:
            self._bus_up()
            await sub.lost
        finally:
            self.broker.unsubscribe(sub)

    async def _close_bus(self) -> None:
        return None

    async def _publish_batch(self, batch: Sequence[Publication]) -> list[Routed]:
        broker = self.broker
        results: list[Routed] = []
        for publication in batch:
            if publication.topic is not None:
                results.append((None, broker.publish(publication.topic, publication.data)))
                continue
            if publication.user_id is not None:
                results.append((None, broker.publish_to_user(
                    publication.user_id, self.node_id, self.topic_of, publication.data)))
                continue
            assert publication.channel_id is not None
            owner = broker.owner(publication.channel_id)
            if owner is None or owner == self.node_id:
                results.append((owner, -1))
            else:
                results.append((owner, broker.publish(self.topic_of(owner), publication.data)))
        return results

    async def _user_entries(self, user_id: str) -> dict[str, str]:
        return self.broker.user_entries(user_id)

    async def _write_directory(self, present: Sequence[Entry], absent: Sequence[Entry]) -> None:
        self.broker.write(self.node_id, present, absent, self.expiry)
