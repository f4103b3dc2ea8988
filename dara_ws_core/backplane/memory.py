"""The in-process bus: :class:`MemoryBroker` stands in for Redis, and :class:`MemoryBackplane`
is a backplane over it.

Several managers in one process sharing a broker behave like several processes sharing Redis
(same routing code, same failure handling), which makes fast, deterministic tests of the routing
logic possible; fault injection (:meth:`MemoryBroker.fail`, :meth:`MemoryBroker.forget`) and a
fake clock make outages and expiry testable without waiting.
"""

from __future__ import annotations

__all__ = ["MemoryBackplane", "MemoryBroker"]

import asyncio
import itertools
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, cast

from dara_ws_core.exceptions import BackplaneError
from dara_ws_core.outbox import OutboxLimits, Stamped, UserOutbox

from .broker import BrokerBackplane, Kept, Revocation
from .node import Entry, Publication, Routed
from .wire import stamp_message


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
        #: Per-user histories (as the Redis streams): user -> outbox of bus messages.
        self.outboxes: dict[str, UserOutbox] = {}
        self._entry_ids = itertools.count(1)  # never reset, as Redis's clock: ids never go back
        #: The gap ledger (as in Redis): node -> user -> messages nobody on it listened for.
        self.missed: dict[str, dict[str, int]] = {}
        self._cut: set[str] = set()
        #: Revocations recorded (as the Redis keys): ``scope:target`` -> (when in ms on
        #: ``clock``, code, reason, expiry).
        self.revoked: dict[str, tuple[int, int, str, float]] = {}
        # What each kept message's id was answered the first time (as the Redis keys), bounded.
        # Keyed by (node id and process life, number): unique across a node's lives.
        self._kids: dict[tuple[str, int], Routed] = {}

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

    def cut(self, node_id: str) -> None:
        """Cut one node off (its link down, the others unaffected) until :meth:`mend`: its
        subscription ends, its calls raise ``BackplaneError``, nobody listens on its topic."""
        self._cut.add(node_id)
        suffix = f":node:{node_id}"
        for sub in {s for subs in self._topics.values() for s in subs}:
            if any(t.endswith(suffix) for t in sub.topics) and not sub.lost.done():
                self.unsubscribe(sub)
                sub.lost.set_exception(BackplaneError("the link to the memory broker is cut"))

    def mend(self, node_id: str) -> None:
        self._cut.discard(node_id)

    def check_node(self, node_id: str) -> None:
        """Raise ``BackplaneError`` if the broker is unreachable, for everyone or ``node_id``."""
        self._check()
        if node_id in self._cut:
            raise BackplaneError("the link to the memory broker is cut")

    def listening(self, node_topic: str) -> bool:
        """Whether anyone subscribes to ``node_topic`` (as ``PUBSUB NUMSUB``)."""
        return bool(self._topics.get(node_topic))

    def forget(self) -> None:
        """Drop the whole directory (a restart that lost its data)."""
        self._owners.clear()
        self._users.clear()
        self._user_expiry.clear()
        self.outboxes.clear()
        self.missed.clear()
        self.revoked.clear()
        self._kids.clear()

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

    def revoke(self, target: str, code: int, reason: str, when: int, ttl: float) -> None:
        """Record a revocation of ``target`` (``scope:target``) asked for at ``when`` (ms on
        ``clock``) for ``ttl`` seconds after it, unless a later one of it is recorded (as the
        Redis script does)."""
        self._check()
        known = self.revoked.get(target)
        if known is None or known[3] <= self.clock() or known[0] < when:
            self.revoked[target] = (when, code, reason, when / 1000 + ttl)

    def revocations(self, targets: Sequence[str]) -> tuple[list[tuple[int, int, str] | None], int]:
        """The revocations recorded for ``targets`` and the clock now, in ms."""
        self._check()
        now = self.clock()
        found: list[tuple[int, int, str] | None] = []
        for target in targets:
            entry = self.revoked.get(target)
            found.append(None if entry is None or entry[3] <= now else entry[:3])
        return found, int(now * 1000)

    def publish_to_user(self, user_id: str, node_id: str, topic_of: Callable[[str], str],
                        data: bytes, keep: OutboxLimits | None = None, *,
                        kid: tuple[str, int] | None = None) -> Routed:
        """:meth:`_publish_to_user`, once per ``kid`` (the sender's node id and life, its number
        for the message): sent again, a kept message is answered as the first time (as the
        Redis script does)."""
        if kid is None:
            return self._publish_to_user(user_id, node_id, topic_of, data, keep)
        first = self._kids.get(kid)
        if first is None:
            first = self._kids[kid] = self._publish_to_user(user_id, node_id, topic_of, data, keep)
            if len(self._kids) > 100_000:
                del self._kids[next(iter(self._kids))]
        return first

    def _publish_to_user(self, user_id: str, node_id: str, topic_of: Callable[[str], str],
                         data: bytes, keep: OutboxLimits | None = None) -> Routed:
        """Publish once to every node but ``node_id`` holding channels of the user; entries of
        nodes nobody listens for are dropped once expired (as the Redis script does). With
        ``keep``, append ``data`` to the user's history first (the message published carries
        the entry's id and number); without, a node that did not hear it gets it counted in its
        gap ledger. Returns ``("<id> <n>" or None, receivers, -1 if none and kept)``."""
        self._check()
        stamp: Stamped | None = None
        if keep is not None:
            outbox = self.outboxes.get(user_id)
            if outbox is None or outbox.limits != keep:
                outbox = self.outboxes[user_id] = UserOutbox(keep, self._entry_ids)
            stamp = outbox.append(user_id, data, self.clock())
            if stamp is not None:
                data = stamp_message(data, stamp)
        fields = self._user(user_id)
        receivers: dict[str, int] = {}
        for node in set(fields.values()) - {node_id}:
            receivers[node] = self.publish(topic_of(node), data)
        for channel_id, node in list(fields.items()):
            if receivers.get(node) == 0 and self.owner(channel_id) != node:
                del fields[channel_id]  # dead (a node cut off keeps them until the expiry)
        total = sum(receivers.values())
        if stamp is not None:
            return f"{stamp.id} {stamp.n}", total if total else -1
        for node, n in receivers.items():  # not kept, and nobody there heard it: a gap
            if n == 0:
                ledger = self.missed.setdefault(node, {})
                ledger[user_id] = ledger.get(user_id, 0) + 1
        return None, total

    def attach(self, node_id: str, channel_id: str, user_id: str, expiry: float, *,
               limit: int | None, keep: OutboxLimits | None, topic_of: Callable[[str], str],
               ) -> tuple[bool, list[Kept], Kept | None]:
        """Refuse if the user has ``limit`` live channels, else register the channel and lease
        the user's history to it (with ``keep``): one step, as the Redis script."""
        self._check()
        if limit is not None and len(self.user_entries(user_id)) >= limit:
            return False, [], None
        self.write(node_id, [(channel_id, user_id)], (), expiry)
        if keep is None:
            return True, [], None
        outbox = self.outboxes.get(user_id)
        head = None if outbox is None else outbox.head(user_id)
        return (True, self.lease(node_id, channel_id, user_id, topic_of),
                None if head is None else (head.id, head.n, b""))

    def lease(self, node_id: str, channel_id: str, user_id: str,
              topic_of: Callable[[str], str]) -> list[Kept]:
        """Lease the user's unwritten entries to a channel of ``node_id`` (nothing if a live
        one holds it: registered, and its node listening)."""
        self._check()
        outbox = self.outboxes.get(user_id)
        if outbox is None:
            return []

        def alive(holder: Hashable) -> bool:
            node, channel = cast(tuple[str, str], holder)
            return self.listening(topic_of(node)) and self.owner(channel) == node

        kept = outbox.lease(user_id, (node_id, channel_id), self.clock(), alive)
        return [(e.id, e.n, e.frame) for e in kept]

    def history(self, user_id: str, after: str | None) -> tuple[list[Kept], int]:
        """The user's history after entry ``after`` (``None``: after the user's written
        mark), within the age, and their last number."""
        self._check()
        outbox = self.outboxes.get(user_id)
        if outbox is None:
            return [], 0
        entries, head = outbox.after(user_id, after or outbox.written(user_id), self.clock())
        return [(e.id, e.n, e.frame) for e in entries], head

    def settle(self, node_id: str, channel_id: str, user_id: str, upto: str | None) -> None:
        self._check()
        outbox = self.outboxes.get(user_id)
        if outbox is not None:
            outbox.settle(user_id, (node_id, channel_id), upto)

    def ack(self, user_id: str, upto: str) -> None:
        self._check()
        outbox = self.outboxes.get(user_id)
        if outbox is not None:
            outbox.ack(user_id, upto)

    def pending(self, user_id: str) -> int:
        """How many of the user's entries none of their connections has written (for tests)."""
        outbox = self.outboxes.get(user_id)
        return 0 if outbox is None else outbox.pending(user_id)

    def take_missed(self, node_id: str) -> dict[str, int]:
        self._check()
        return self.missed.pop(node_id, {})

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
        self.broker.check_node(self.node_id)
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
        broker.check_node(self.node_id)
        results: list[Routed] = []
        for publication in batch:
            if publication.topic is not None:
                revoke = publication.revoke
                if revoke is not None:
                    broker.revoke(*revoke, self.revoke_ttl)
                results.append((None, broker.publish(publication.topic, publication.data)))
                continue
            if publication.ack is not None:
                assert publication.user_id is not None
                broker.ack(publication.user_id, publication.ack)
                results.append((None, -1))
                continue
            if publication.user_id is not None:
                results.append(broker.publish_to_user(
                    publication.user_id, self.node_id, self.topic_of, publication.data,
                    publication.keep,
                    kid=None if publication.kid is None else (self.kid_scope, publication.kid)))
                continue
            assert publication.channel_id is not None
            owner = broker.owner(publication.channel_id)
            if owner is None or owner == self.node_id:
                results.append((owner, -1))
            else:
                results.append((owner, broker.publish(self.topic_of(owner), publication.data)))
        return results

    async def _user_entries(self, user_id: str) -> dict[str, str]:
        self.broker.check_node(self.node_id)
        return self.broker.user_entries(user_id)

    async def _write_directory(self, present: Sequence[Entry], absent: Sequence[Entry]) -> None:
        self.broker.check_node(self.node_id)
        self.broker.write(self.node_id, present, absent, self.expiry)

    async def _attach(self, channel_id: str, user_id: str, limit: int | None,
                      keep: OutboxLimits | None) -> tuple[bool, list[Kept], Kept | None]:
        self.broker.check_node(self.node_id)
        return self.broker.attach(self.node_id, channel_id, user_id, self.expiry, limit=limit,
                                  keep=keep, topic_of=self.topic_of)

    async def _history(self, user_id: str, after: str | None,
                       keep: OutboxLimits) -> tuple[list[Kept], int]:
        self.broker.check_node(self.node_id)
        entries, head = self.broker.history(user_id, after)
        return entries[-keep.max_messages:], head

    async def _settle_outbox(self, user_id: str, channel_id: str, upto: str | None) -> None:
        self.broker.check_node(self.node_id)
        self.broker.settle(self.node_id, channel_id, user_id, upto)

    async def _revocations(self, targets: Sequence[str]) -> tuple[list[Revocation | None], int]:
        self.broker.check_node(self.node_id)
        return self.broker.revocations(targets)

    async def _bus_clock(self) -> int:
        self.broker.check_node(self.node_id)
        return int(self.broker.clock() * 1000)

    async def _take_missed(self) -> dict[str, int]:
        self.broker.check_node(self.node_id)
        return self.broker.take_missed(self.node_id)

    async def _held_by(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        broker = self.broker
        broker.check_node(self.node_id)
        return [broker.owner(channel_id) == node and broker.listening(self.topic_of(node))
                for channel_id, node in pairs]
