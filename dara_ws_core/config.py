"""Limits and timings, configured once and honoured by every transport."""

from __future__ import annotations

__all__ = ["ServerConfig", "SlowConsumerPolicy", "connection_cap"]

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .transport import TrustedProxies

MiB = 1024 * 1024


class SlowConsumerPolicy(StrEnum):
    """What happens when a channel's outbound queue is full (protocol.md section 6).

    * ``WAIT``: a sender to this one channel (``send_message``, ``send_and_wait``, a handler's
      reply) waits for room, up to ``ServerConfig.send_timeout``; then the client is disconnected
      with 1013. A fan-out (``broadcast``, ``send_message_to_user``, the backplane) never waits on
      one recipient: past the bounds it queues a burst (up to ``queue.BURST`` times them, while
      the queue has not stayed full for longer than ``send_timeout``), then disconnects the
      client with 1013 at once; so one slow client never delays anyone else, and a reader
      slower than a burst is not cut off for it. A connection whose messages cause such a burst
      (a rebroadcast) has its reading paused until the queues catch up (see
      ``driver.ORIGIN_SHARE``): the sender is slowed to its readers' pace.
    * ``DROP_OLDEST``: the oldest queued frames are discarded to make room (counted in
      ``WebSocketHandler.dropped``). Suits state pushes where only the newest value matters.
      A ``send_and_wait`` request discarded unsent fails at once with ``SlowConsumer``.
    * ``DISCONNECT``: a send to one channel does not wait: the client is closed with 1013 (try
      again later) at once, unless the queue is taking a burst of fan-outs (then it joins it).
      Fan-outs as under ``WAIT``.
    """

    WAIT = "wait"
    DROP_OLDEST = "drop_oldest"
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Server-side limits and timings. Every limit is finite by default.

    Sizes are in bytes of UTF-8 JSON, times in seconds; ``None`` disables a timer. A bound on
    what is held counts it as held: decoded, a text takes 1, 2 or 4 bytes a character (PEP 393;
    an ASCII text with one emoji, 4 times its UTF-8), so what waits is kept as its bytes, and
    what is kept decoded (chunked parts) counts its strings' width.
    """

    #: Largest inbound frame. 16 MiB like Dara's server (uvicorn's default): the stock client
    #: sends large answers in one frame. Larger frames close the connection with 1009. A frame
    #: is held while it is read and handled, not after: an idle connection keeps nothing of the
    #: largest message it received (on picows, whose read buffer keeps the size it grew to,
    #: the pages past 64 KiB of it are handed back to the system). Being handled, a message is
    #: held decoded, as its frame's text and its value: up to 4 times this each (an ASCII text
    #: with one emoji), one message at a time per connection; a message that waits for its
    #: connection is kept as its bytes (docs/deployment.md, "decoded text").
    max_message_size: int = 16 * MiB
    #: Most JSON values in one inbound frame, counted before it is decoded (an upper bound: every
    #: comma and opening bracket outside strings; a string is one value, whatever it holds).
    #: Decoded, a value takes up to ~120 bytes of Python objects (an object of distinct keys),
    #: and a frame is decoded in one go on the event loop: this bounds what one frame can cost in
    #: memory (~30 MB) and loop time (~70 ms on this project's 2-core CI machine). Above it the
    #: connection is closed with 1009. Raise it for applications whose clients answer with large
    #: tables (or let them answer in parts, which spreads the decoding over frames:
    #: ``max_chunked_values`` then bounds what they hold).
    max_message_values: int = 250_000
    #: Outbound queue bound per channel, in frames and in bytes.
    max_queue_messages: int = 4096
    max_queue_bytes: int = 16 * MiB
    #: Bytes queued for every connection of the process together (a frame queued for many
    #: connections counts for each). Once the queues hold this much, a queue is full past a
    #: 256th of it (1 MiB) for the frames that would take it further, so the slow-consumer
    #: policy applies to it there: without it, clients that read nothing and keep asking for
    #: replies made the process hold ``max_queue_bytes`` for each of their connections (20 such
    #: connections: about 400 MiB more RSS). A connection whose queue holds less, a reader
    #: keeping up, is never affected. The queues of one client address (see
    #: ``forwarded_allow_ips``) are held to that 256th once they hold a quarter of it together.
    max_queued_total_bytes: int = 256 * MiB
    slow_consumer_policy: SlowConsumerPolicy = SlowConsumerPolicy.WAIT
    #: With ``WAIT``: how long a sender waits for room before the client is disconnected (1013).
    send_timeout: float | None = 10.0
    #: Server -> client requests in flight per channel.
    max_pending_requests: int = 1024
    #: Default timeout of ``send_and_wait`` when the call gives none.
    request_timeout: float | None = 30.0
    #: Chunked answers: most parts of one answer, and most bytes (UTF-8 JSON, as on the wire)
    #: and JSON values (counted as in a frame, an upper bound) of parts held at once for all of a
    #: channel's pending answers, and for all the connections of one user together (anonymous
    #: connections, ``Identity.anonymous``, of one address together, as ``forwarded_allow_ips``
    #: finds it: one peer gets a fresh anonymous user with each connection, but not a fresh
    #: address). Each part
    #: counts 128 bytes and one value more than its JSON, for what holding it costs (a 1-byte
    #: part takes about a hundred bytes of Python objects), and a part holding non-ASCII text
    #: counts what its strings hold decoded if that is more than its JSON (1, 2 or 4 bytes a
    #: character: an ASCII text with one emoji, 4 times its UTF-8). Each part is decoded as its frame
    #: arrives (and is bounded as a frame: ``max_message_values``); held decoded, a value takes
    #: up to ~120 bytes, so the values bound what a user's parts hold in memory (~15 MB at
    #: worst), and the last part costs no more than any other. Beyond either bound the request
    #: fails with ``ChunkError``. A user never holds more than a 16th of the process's bounds
    #: (below), whatever these say: raise those with them.
    max_chunks: int = 10_000
    max_chunked_bytes: int = 16 * MiB
    max_chunked_values: int = 125_000
    #: The same two bounds for the parts held by every connection of the process together (16
    #: users' worth): beyond them, a new or growing chunked answer fails with ``ChunkError``,
    #: whichever connection sends it. Their last 16th only takes the parts of users holding under
    #: a 64th of their own bounds (a few small answers), so that while big answers fill the
    #: process, small ones still go through; and the connections of one client address (see
    #: ``forwarded_allow_ips``) hold at most a quarter of them, whatever users they name.
    max_chunked_total_bytes: int = 256 * MiB
    max_chunked_total_values: int = 2_000_000
    #: Most bytes of inbound messages still being received, by every connection of the process
    #: together: the fragments of an unfinished message, and a frame whose payload has not all
    #: arrived, counted from the payload length its header declares. One holder (a user's
    #: connections; the anonymous ones of an address) takes at most a 16th of it, the
    #: connections of one client address (whatever users they name; see
    #: ``forwarded_allow_ips``) a quarter, and one connection's message never more than
    #: ``max_message_size``. Its last 16th only takes the messages of holders that then hold
    #: at most a 64th of their share (256 KiB), from addresses holding at most a 64th of theirs
    #: (1 MiB), so that while big unfinished messages of many addresses fill it, small messages
    #: in parts still go through. A frame that would take its
    #: holder or the process past these is refused before its payload is read: the connection is
    #: closed with 1009. A message that arrives whole in one read is never counted.
    max_receiving_total_bytes: int = 256 * MiB
    #: Close connections that send nothing (not even the stock client's 5 s ping) for this long.
    idle_timeout: float | None = 60.0
    #: Protocol-level keepalive passed to the transport library (websockets/uvicorn style).
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    #: How long a closing handshake may wait for a peer that does not answer (then: abort).
    close_timeout: float = 5.0
    #: How long a client may take from connecting to completing its HTTP upgrade (then the
    #: socket is closed, whatever it sent), so that half-open handshakes cannot hold every slot
    #: (an upgrade request with a body is answered 400 at once, on every transport). An authenticator
    #: that has not answered within half of it rejects the handshake (403; counted as
    #: ``timeout`` in ``handshakes_rejected``).
    handshake_timeout: float = 10.0
    #: Custom handler tasks (async handlers) running at once per connection; beyond that the
    #: request gets a ``busy`` error reply.
    max_handler_tasks: int = 64
    #: What the custom messages whose handlers are running hold together per connection, counted
    #: as their frames hold it in memory (``sys.getsizeof`` of the text: 1, 2 or 4 bytes a
    #: character; the decoded value a handler keeps is of the same order). A message that would
    #: take a connection past it gets a ``busy`` error reply, as past ``max_handler_tasks``; the
    #: first one is always taken (``max_message_size`` bounds it). Without it, one client with a
    #: slow async handler to reach could make the process hold ``max_handler_tasks`` frames of
    #: ``max_message_size`` (64 x 16 MiB, more decoded) for each of its connections.
    max_handling_bytes: int = 32 * MiB
    #: The same for every connection of the process together. Once handlers hold this much, a
    #: message is ``busy`` for a connection whose handlers would hold more than a 256th of it
    #: (1 MiB): a connection whose requests are small is never refused by it. The connections of
    #: one client address (see ``forwarded_allow_ips``), whatever users they name, hold at most a
    #: quarter of it, and one user (an anonymous client: its address) a 16th with requests over
    #: that 256th; the first request of each is always taken.
    max_handling_total_bytes: int = 256 * MiB
    #: How long a custom handler may run before its request gets a ``timeout`` error reply.
    handler_timeout: float | None = 60.0
    #: Threads of the manager's own pool for ``in_thread`` handlers (started as needed; the
    #: loop's default executor is left to everything else). One user, or one remote address
    #: for anonymous connections (as ``forwarded_allow_ips`` finds it), holds at most an
    #: eighth of them (at least one): its handlers running, and those still running after their
    #: request timed out (a thread cannot be stopped; it counts until it returns); the users of
    #: one client address a quarter together (at least two eighths). The last eighth is kept
    #: for users holding none. A request never waits for a thread: beyond its
    #: user's share, or when no thread is free for it, it gets a ``busy`` error reply at once.
    handler_threads: int = 32
    #: ``on_disconnect`` hook tasks (:meth:`WebsocketManager.on_disconnect`: one per ended
    #: connection, each hook bounded by ``handler_timeout``) running at once; the connections of
    #: one client address hold at most a quarter of them. Beyond, an ended connection's
    #: ``on_disconnect`` hooks are not run: counted (``ServerStats.hooks["disconnect_dropped"]``)
    #: and logged at WARNING. Each task holds its ended connection's handler (about 10 KB).
    max_disconnect_hooks: int = 10_000
    #: Inbound rate limit per connection: ``rate_limit`` frames per ``rate_window`` seconds
    #: (``None`` disables). Beyond it the connection is closed with 1008.
    rate_limit: int | None = None
    rate_window: float = 1.0
    #: Grace period for in-flight handler replies at shutdown before connections close with 1001.
    shutdown_grace: float = 5.0
    #: Connections allowed per user (``None``: no limit); extra handshakes are rejected with 403
    #: (one that raced another handshake of the user past that check is closed with 1008 once
    #: upgraded: the count is exact only when the connection registers).
    #: With a backplane it counts the user's connections on every process (atomically, in the
    #: bus); if the bus is unreachable, on this process only.
    max_connections_per_user: int | None = None
    #: Sockets this process serves at once: connections plus handshakes in progress (``None``:
    #: no cap, as websockets and uvicorn, so that embedding the library changes nothing). Each
    #: is a file descriptor: without a cap, one host opening connections in a loop takes every
    #: descriptor of the process, and with them its logs, its backplane and every other client.
    #: At it, a socket that has not yet sent its whole upgrade request is closed to make room
    #: for a newly accepted one (counted as ``evicted`` in ``handshakes_rejected``): the oldest
    #: of the remote host holding the most such sockets, so silent sockets never keep out a
    #: client that completes its handshake, and a few hosts opening them in a loop close their
    #: own before a client alone in its handshake, however long its request takes to come. With none such, a
    #: handshake is refused with 503 and ``Retry-After`` (counted as ``full``); refused sockets
    #: waiting for that answer are bounded (``max_connections // 16 + 8``: the oldest still
    #: silent makes room for a newer one, else the newcomer is closed at once).
    #: :func:`connection_cap` gives a value that leaves the process headroom under its
    #: open-files limit; ``dara-ws serve`` uses it.
    max_connections: int | None = None
    #: Sockets one remote host may hold at once, counted as ``max_connections`` (``None``: no
    #: limit). At it, the host's own oldest socket still in its handshake makes room, else a
    #: handshake is refused the same way (counted as ``address``). Behind a load balancer or
    #: reverse proxy every socket has its address, and this would cap all clients together:
    #: name it in ``forwarded_allow_ips``, and its sockets are counted by the client each
    #: request names once it is read (refused with 403 then, the socket having been let in).
    #: ``dara-ws serve`` sets a quarter of its cap (``--max-connections-per-address``).
    max_connections_per_address: int | None = None
    #: The reverse proxies (load balancers) trusted to name the client in ``X-Forwarded-For``,
    #: as uvicorn's setting of that name: IP addresses and networks, in a comma-separated
    #: string or a sequence (``"10.0.0.0/8"``), or ``"*"`` for whatever connects (then the
    #: right-most address of the header counts, the one the proxy appended: uvicorn takes the
    #: left-most, which a client writes itself). ``None`` (the default): none, so a client
    #: never chooses the address it is counted as. For a request from one of them, the client's
    #: address is the right-most of the header that is not a trusted proxy (a malformed header:
    #: the proxy's own), and every bound counted per address once the request is read uses it
    #: (:class:`~dara_ws_core.transport.TrustedProxies`): the shares of anonymous connections
    #: (chunked parts, ``in_thread`` threads, the outbox's and the backplane spool's senders),
    #: the log shares, and ``max_connections_per_address``, whose sockets from a trusted proxy
    #: are counted by that client once their request is read rather than by the proxy.
    forwarded_allow_ips: str | Sequence[str] | None = None
    #: The per-user outbox (:mod:`dara_ws_core.outbox`): ``send_message_to_user`` to a user with no
    #: connection anywhere keeps the message, up to this many per user (``0`` disables), this many
    #: bytes and this many seconds, for the user's next connection. One sender (see
    #: ``outbox_per_sender``) has at most a quarter of a user's messages and bytes waiting, and at
    #: the user's bounds only what was written or expired makes room for it: a message still
    #: waiting is never dropped for a sender's, the new one is not kept instead
    #: (``send_message_to_user`` returns ``False``). Server code's messages drop the user's oldest.
    outbox_messages: int = 100
    outbox_bytes: int = 1 * MiB
    outbox_age: float = 300.0
    #: Bounds of the outbox as a whole: users with a history, and bytes of all of them (without a
    #: backplane, this process's; with Redis, per namespace, each counted in the window of
    #: ``outbox_age`` it was kept in, over the last one or two windows). Only what waits counts:
    #: a message once written to its user, or dropped by the user's bounds, no longer does, nor
    #: a user whose history is all written. At a bound, histories all written make room (the one
    #: written longest ago first; with Redis, they no longer count and expire on their own); a
    #: message still waiting for its user is never dropped for another's: the new message is
    #: then not kept (still delivered live; ``send_message_to_user`` returns ``False``), and
    #: logged. The last
    #: 16th of each is server code's alone (no sender's message is kept there), and the one
    #: before it is kept for senders holding under a 64th of their share (below) from addresses
    #: holding under a 64th of theirs: there, a sender holding more, or from an address holding
    #: more, is refused as over its share.
    outbox_users: int = 100_000
    outbox_total_bytes: int = 256 * MiB
    #: Most kept messages charged to one sender waiting for their users at once, and never more
    #: than a 16th of ``outbox_users``; their bytes are held to a 16th of ``outbox_total_bytes``
    #: (the sender's share of each bound it can fill). The sender is the user of the connection
    #: whose frame was being handled when ``send_message_to_user`` was called; for an anonymous
    #: identity (``AnonymousIdentity``, new for each connection), the connection's address
    #: (an IPv6 one by its /64; behind a proxy, see ``forwarded_allow_ips``): every anonymous
    #: connection from one address is one sender. A
    #: send from server code, outside any connection, is charged to nobody. Each kept message
    #: is also charged to its connection's address, named sender or not (as anonymous ones are
    #: keyed; none for a connection without one): the senders of one address hold together at
    #: most a quarter of ``outbox_users`` and of ``outbox_total_bytes``, so a client that names
    #: itself anew for each connection (as the demo's tokens allow) gets no share per name.
    #: Beyond either, that sender's messages (or its address's) are delivered live but not kept
    #: (``send_message_to_user`` returns ``False``), so one client filling its share costs its
    #: own messages, not everyone's. A message leaves the counts once written to its user,
    #: dropped by a bound or expired; with Redis too (the acknowledgement releases it), and the
    #: counters there also expire ``outbox_age`` after they were made.
    outbox_per_sender: int = 1000

    def __post_init__(self) -> None:
        # Every value checked here, naming the field: a zero, a negative or a string would
        # otherwise be taken and fail later, far from its cause (every handshake refused, every
        # connection closed, "'<' not supported between 'str' and 'int'").
        for name in _COUNTS_FROM_1:
            _check_number(name, getattr(self, name), int, 1, optional=False)
        for name in _OPTIONAL_COUNTS:
            _check_number(name, getattr(self, name), int, 1, optional=True)
        _check_number("outbox_messages", self.outbox_messages, int, 0, optional=False)
        for name in _SECONDS:
            _check_number(name, getattr(self, name), float, 0, optional=False, above=True)
        for name in _OPTIONAL_SECONDS:
            _check_number(name, getattr(self, name), float, 0, optional=True, above=True)
        _check_number("shutdown_grace", self.shutdown_grace, float, 0, optional=False)
        if self.forwarded_allow_ips is not None:
            if not isinstance(self.forwarded_allow_ips, str):  # a list: hashable, not shared
                object.__setattr__(self, "forwarded_allow_ips", tuple(self.forwarded_allow_ips))
            try:
                TrustedProxies(self.forwarded_allow_ips)
            except ValueError as exc:  # a bad address
                raise ValueError(f"ServerConfig.{exc}") from None
        if not isinstance(self.slow_consumer_policy, SlowConsumerPolicy):
            try:
                policy = SlowConsumerPolicy(self.slow_consumer_policy)
            except ValueError:
                choices = ", ".join(repr(p.value) for p in SlowConsumerPolicy)
                raise ValueError(f"ServerConfig.slow_consumer_policy must be one of {choices}, "
                                 f"not {self.slow_consumer_policy!r}") from None
            object.__setattr__(self, "slow_consumer_policy", policy)


_COUNTS_FROM_1 = ("max_message_size", "max_message_values", "max_queue_messages", "max_queue_bytes",
                  "max_queued_total_bytes",
                  "max_pending_requests", "max_chunks", "max_chunked_bytes", "max_chunked_values",
                  "max_chunked_total_bytes", "max_chunked_total_values", "max_receiving_total_bytes",
                  "max_handler_tasks", "max_handling_bytes", "max_handling_total_bytes", "handler_threads",
                  "max_disconnect_hooks",
                  "outbox_bytes", "outbox_users", "outbox_total_bytes", "outbox_per_sender")
_OPTIONAL_COUNTS = ("rate_limit", "max_connections_per_user", "max_connections", "max_connections_per_address")
_SECONDS = ("close_timeout", "handshake_timeout", "rate_window", "outbox_age")
_OPTIONAL_SECONDS = ("send_timeout", "request_timeout", "idle_timeout", "ping_interval", "ping_timeout",
                     "handler_timeout")


def _check_number(name: str, value: object, kind: type, least: int, *, optional: bool, above: bool = False,
                  owner: str = "ServerConfig") -> None:
    """Raise ``TypeError`` or ``ValueError``, naming the field (``owner.name``), unless ``value``
    is a number of ``kind`` (an int for a count; an int or a float for seconds, finite) at least
    ``least`` (above it, with ``above``), or ``None`` where ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        what = "an int" if kind is int else "a number of seconds"
        raise TypeError(f"{owner}.{name} must be {what}{' or None' if optional else ''}, "
                        f"not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{owner}.{name} must be finite{' (or None)' if optional else ''}, not {value}")
    if number < least or (above and number == least):
        bound = f"> {least}" if above else f">= {least}"
        raise ValueError(f"{owner}.{name} must be {bound}{' (or None)' if optional else ''}, "
                         f"not {value}")


def connection_cap(soft_limit: int) -> int:
    """A ``ServerConfig.max_connections`` for a process whose open-files soft limit is
    ``soft_limit`` (``resource.getrlimit(resource.RLIMIT_NOFILE)[0]``, after raising it): the
    limit less a reserve of a tenth of it, at least 256 descriptors, for everything that is not
    a client (listening sockets, log files, the backplane's connections, the refused sockets
    waiting for their 503), and never under 64. Pure: read the limit yourself."""
    return max(64, soft_limit - max(256, soft_limit // 10))
