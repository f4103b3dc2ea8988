"""The bus wire format (pure: no I/O, no event loop): what one node publishes to another.

One compact JSON header, a newline, then the body: a client frame exactly as the asking or
sending process encoded it, or a JSON answer. The header never contains a raw newline (JSON
escapes it), and the body is never decoded or re-encoded on the way: a frame published by one
process reaches the clients of another byte for byte.

Deliveries (to a channel, a user, everyone) carry ``sent``: the publisher's wall clock when it
published them, in integer milliseconds (header ``"t"``; 0: unknown), from which the receiver
computes the bus's lag. Wall clocks of two hosts agree only as well as they are synchronised
(NTP): the lag is as exact as that, and never negative (a receiver's clock behind reads 0).
"""

from __future__ import annotations

__all__ = [
    "BroadcastDelivery",
    "BusMessage",
    "ChannelDelivery",
    "Control",
    "RemoteCancel",
    "RemoteReply",
    "RemoteRequest",
    "SequenceTracker",
    "UserDelivery",
    "decode_bus_message",
    "encode_bus_message",
]

from dataclasses import asdict, dataclass
from typing import Any

import pydantic_core

from dara_ws_core.codec import dumps
from dara_ws_core.exceptions import BackplaneError

from .contract import Failure

_from_json = pydantic_core.from_json


@dataclass(frozen=True, slots=True)
class ChannelDelivery:
    """A frame for one channel, published to the node that holds it."""

    channel_id: str
    frame: bytes
    sent: int = 0


@dataclass(frozen=True, slots=True)
class UserDelivery:
    """A frame for a user's channels on the receiving node, except ``ignore``. ``sid`` and
    ``n``: the entry of the user's history it was appended to (:mod:`dara_ws_core.outbox`;
    the bus sets them as it appends it, ``None``/0 with the outbox off)."""

    user_id: str
    ignore: str | None
    frame: bytes
    sid: str | None = None
    n: int = 0
    sent: int = 0


@dataclass(frozen=True, slots=True)
class BroadcastDelivery:
    """A frame for every channel of every node but ``origin`` (which delivered it locally).
    ``seq`` numbers the broadcasts of ``origin`` from 1 (0: not numbered), so a node that
    missed some (its subscription was down) can tell how many (:class:`SequenceTracker`)."""

    origin: str
    ignore: str | None
    frame: bytes
    seq: int = 0
    sent: int = 0


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """``send_and_wait`` for a channel of the receiving node. ``frame`` is the request as the
    asking process encoded it, once, with ``__rchan`` set to ``request_id`` (a uuid4, as
    unpredictable as a local ``__rchan``): the owning node enqueues it as it is, never decoded
    and re-encoded. ``custom`` says which envelope it is (for logs; the owner does not need it)."""

    request_id: str
    reply_to: str
    channel_id: str
    custom: bool
    timeout: float | None
    frame: bytes


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


@dataclass(frozen=True, slots=True)
class Control:
    """Close connections on every node but ``origin`` (which closed its own): every channel of a
    user (``scope="user"``), of a session (``"session"``) or one channel (``"channel"``).
    Published on the broadcast topic: revocation must not depend on the directory being up to
    date (a channel registered a moment ago is not in it yet). ``when``: the moment the
    application asked for it, on the bus's clock in ms (header ``"at"``; 0: unknown): a receiver
    closes only the connections opened before it, so a revocation published late (retried from
    the spool after an outage) spares the connections opened since (the user logging in again)."""

    origin: str
    scope: str
    target: str
    code: int
    reason: str
    when: int = 0


#: The scopes of a :class:`Control` message.
CONTROL_SCOPES = ("user", "session", "channel")

BusMessage = (
    ChannelDelivery | UserDelivery | BroadcastDelivery | RemoteRequest | RemoteReply | RemoteCancel
    | Control
)


def encode_bus_message(message: BusMessage) -> bytes:
    """Encode a bus message: a JSON header, ``\\n``, the body (frame or answer, not re-encoded)."""
    head: dict[str, Any]
    body = b""
    if isinstance(message, ChannelDelivery):
        head, body = {"op": "ch", "ch": message.channel_id}, message.frame
    elif isinstance(message, UserDelivery):
        head = {"op": "user", "user": message.user_id, "ignore": message.ignore}
        if message.sid is not None:
            head["sid"], head["n"] = message.sid, message.n
        body = message.frame
    elif isinstance(message, BroadcastDelivery):
        head = {"op": "all", "origin": message.origin, "ignore": message.ignore}
        if message.seq:
            head["seq"] = message.seq
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
    elif isinstance(message, Control):
        head = {"op": "ctl", "origin": message.origin, "scope": message.scope,
                "id": message.target, "code": message.code, "reason": message.reason}
        if message.when:
            head["at"] = message.when
    else:
        raise TypeError(f"not a bus message: {type(message).__name__}")
    if isinstance(message, ChannelDelivery | UserDelivery | BroadcastDelivery) and message.sent:
        head["t"] = message.sent
    return b"%b\n%b" % (dumps(head), body)


def stamp_message(data: bytes, entry: Any) -> bytes:
    """A :class:`UserDelivery` as encoded, with the history entry it became (``entry.id``,
    ``entry.n``) added to its header, as the Redis script does (the header is a JSON object:
    the fields go right after its opening brace)."""
    return b'{"sid":%b,"n":%d,%b' % (dumps(entry.id), entry.n, data[1:])


def _field(head: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = head.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BackplaneError(f"malformed bus message: bad {key!r}")
    return value


def _natural(head: dict[str, Any], key: str) -> int:
    """An optional whole number at least 0 (0 when absent)."""
    value = head.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackplaneError(f"malformed bus message: bad {key!r}")
    return value


def decode_bus_message(data: bytes) -> BusMessage:
    """Decode a bus message; raises ``BackplaneError`` if it is malformed."""
    raw, sep, body = bytes(data).partition(b"\n")
    if not sep:
        raise BackplaneError("malformed bus message: no header")
    try:
        # Without pydantic-core's string cache: heads carry ids seen once (codec._NO_STRING_CACHE).
        head = _from_json(raw, cache_strings=False)
    except ValueError:
        raise BackplaneError("malformed bus message: header is not JSON") from None
    if not isinstance(head, dict):
        raise BackplaneError("malformed bus message: header is not an object")
    op = head.get("op")
    opt_str = (str, type(None))
    if op == "ch":
        return ChannelDelivery(_field(head, "ch", str), body, _natural(head, "t"))
    if op == "user":
        return UserDelivery(_field(head, "user", str), _field(head, "ignore", opt_str), body,
                            _field(head, "sid", opt_str), _natural(head, "n"),
                            _natural(head, "t"))
    if op == "all":
        return BroadcastDelivery(_field(head, "origin", str), _field(head, "ignore", opt_str),
                                 body, _natural(head, "seq"), _natural(head, "t"))
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
    if op == "ctl":
        scope = _field(head, "scope", str)
        if scope not in CONTROL_SCOPES:
            raise BackplaneError(f"malformed bus message: unknown scope {scope!r}")
        return Control(_field(head, "origin", str), scope, _field(head, "id", str),
                       _field(head, "code", int), _field(head, "reason", str),
                       _natural(head, "at"))
    raise BackplaneError(f"malformed bus message: unknown op {op!r}")


class SequenceTracker:
    """The last sequence number seen from each publisher, to count what was missed between two
    (pure). A publisher's numbers start at 1 and grow by 1 per message on one topic, and one
    topic delivers in order, so a jump is messages this subscriber did not receive. A number
    at or below the last one seen is a publisher that restarted with the same id: its count
    starts over, nothing is counted missed. Remembers at most ``max_publishers`` (the least
    recently heard is forgotten: a forgotten publisher's next gap goes uncounted)."""

    def __init__(self, max_publishers: int = 1024) -> None:
        self.max_publishers = max_publishers
        self._last: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._last)

    def observe(self, publisher: str, seq: int) -> int:
        """Record ``seq`` from ``publisher``; how many of its messages were missed just before
        it (0 for an unnumbered message, a first message, or a restart)."""
        if seq <= 0:
            return 0
        last = self._last.pop(publisher, None)  # re-inserted: the most recently heard last
        self._last[publisher] = seq
        if len(self._last) > self.max_publishers:
            del self._last[next(iter(self._last))]
        if last is None or seq <= last:
            return 0
        return seq - last - 1
