"""The per-user outbox: the pure bounded history, and one process without a backplane keeping what
``send_message_to_user`` sent to a user connected nowhere for the user's next connection."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core import (
    CustomServerMessage,
    DaraClient,
    DaraServerMessage,
    Identity,
    ServerConfig,
    WebsocketManager,
)
from dara_ws_core.outbox import (
    SENDER_SHARES,
    BusRefusals,
    ClosedWrites,
    DeliveryCursors,
    OutboxLimits,
    QueuedMarks,
    Stamped,
    UserOutbox,
    WriteLog,
    WrittenRun,
    id_key,
)

from .helpers import eventually
from .hostile import HostileClient
from .stacks import Stack, running_stack

MakeStack = Callable[..., AbstractAsyncContextManager[Stack]]

TIMEOUT = 5.0


async def numbers(client: DaraClient, n: int) -> list[int]:
    """The ``i`` of the next ``n`` messages ``client`` receives."""
    got = []
    for _ in range(n):
        message = await client.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        got.append(message.message.model_dump()["i"])
    return got


def test_the_outbox_hands_out_what_it_kept_oldest_first_and_once() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=3, max_bytes=100, max_age=10))
    for i in range(5):
        assert outbox.keep("alice", b"m%d" % i, now=i)
    assert outbox.take("alice", now=5) == [b"m2", b"m3", b"m4"]  # count bound: oldest dropped
    assert outbox.take("alice", now=5) == []
    assert outbox.evicted == 2


def test_the_outbox_drops_by_bytes_and_by_age_and_refuses_a_frame_over_the_byte_bound() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=100, max_bytes=10, max_age=10))
    assert not outbox.keep("alice", b"x" * 11, now=0)
    outbox.keep("alice", b"aaaa", now=0)
    outbox.keep("alice", b"bbbb", now=1)
    outbox.keep("alice", b"cccc", now=2)  # 12 bytes: the oldest goes
    assert outbox.take("alice", now=10.5) == [b"bbbb", b"cccc"]  # aaaa dropped by bytes
    outbox.keep("bob", b"old", now=0)
    assert outbox.take("bob", now=10) == []  # exactly max_age old: expired
    outbox.keep("carol", b"old", now=0)
    outbox.expire(now=20)
    assert len(outbox) == 0
    for i in range(5):  # appending sweeps users who never came back, now and then
        outbox.keep(f"gone-{i}", b"x", now=100)
    outbox.keep("dave", b"new", now=200)
    assert outbox.after("gone-0", None, now=0) == ([], 0)  # forgotten, number and all


def test_the_outbox_holds_at_most_max_users_and_never_drops_what_is_waiting_for_another() -> None:
    """A client sending to fresh user ids (the demo's ``tell``) must not grow the process without
    limit, nor wipe what is kept for others: beyond ``max_users``, a history all written (only
    the user's past) goes, the one sent to least recently first; while every history still waits
    for its user, the new message is refused instead, counted."""
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=100, max_users=3))
    alice = outbox.add("alice", b"a1", now=0)
    for i in range(3):
        outbox.keep(f"junk{i}", b"j", now=1)
    assert [e.frame for e in outbox.after("alice", None, now=2)[0]] == [b"a1"]  # still there
    assert outbox.after("junk2", None, now=2) == ([], 0)  # refused
    assert outbox.refused == 1 and outbox.users_evicted == 0
    assert outbox.keep("junk0", b"j", now=2)  # a user with a history has room for more
    outbox.ack("alice", alice)  # alice's connection wrote it: only her past is left
    assert outbox.keep("bob", b"b", now=3)
    assert outbox.after("alice", None, now=3) == ([], 0)  # dropped for bob
    assert [e.frame for e in outbox.after("bob", None, now=3)[0]] == [b"b"]
    assert outbox.users_evicted == 1 and outbox.evicted == 1
    assert not outbox.keep("carol", b"c", now=4)  # junk0, junk1 and bob all wait
    assert outbox.refused == 2


def test_a_full_outbox_looks_at_a_bounded_number_of_histories() -> None:
    """A refusal costs constant work, however many users wait: a flood of fresh user ids does
    not turn each send into a walk over every history."""
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=100, max_users=1000))
    for i in range(1000):
        assert outbox.keep(f"junk{i}", b"j", now=1)
    visited = _CountingUsers(outbox)
    assert not outbox.keep("late", b"x", now=2)
    assert visited.count <= 70


def test_a_full_outbox_drops_written_histories_however_many_wait_ahead_of_them() -> None:
    """The users sent to first are the offline ones, whose messages wait: however many of them
    come first, the histories all written behind them make room, and none that waits goes."""
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=100, max_users=1000))
    for i in range(300):  # offline users: their message waits
        assert outbox.keep(f"offline{i}", b"w", now=1)
    for i in range(700):  # online users: theirs were written
        outbox.ack(f"online{i}", outbox.add(f"online{i}", b"x", now=1))
    assert all(outbox.keep(f"new{i}", b"n", now=2) for i in range(200))
    assert outbox.refused == 0 and outbox.users_evicted == 200
    assert all(outbox.pending(f"offline{i}") == 1 for i in range(300))
    assert outbox.after("online0", None, now=2) == ([], 0)  # written longest ago: dropped first
    assert outbox.after("online200", None, now=2)[0]
    # A history sent to again is waiting again: no longer droppable, the next written one goes.
    outbox.keep("online200", b"again", now=3)
    assert outbox.keep("new200", b"n", now=3)
    assert outbox.pending("online200") == 1 and outbox.after("online201", None, now=3) == ([], 0)


def test_a_sender_over_its_quota_is_refused_and_other_senders_are_still_kept() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=2, max_bytes=100, max_age=10, max_per_sender=3))
    ids = [outbox.add(f"made-up{i}", b"j", now=1, sender="mallory") for i in range(3)]
    assert all(ids) and outbox.charged("mallory") == 3
    assert not outbox.add("made-up3", b"j", now=1, sender="mallory")
    assert outbox.refused == outbox.refused_sender == 1
    assert outbox.keep("victim", b"for you", now=1) and outbox.add("victim", b"hi", 1, "alice")
    assert outbox.after("made-up3", None, now=1) == ([], 0)
    # Written to its user: it leaves the sender's count.
    outbox.ack("made-up0", ids[0])
    assert outbox.charged("mallory") == 2
    assert outbox.add("made-up0", b"j", now=1, sender="mallory")
    # Dropped by the user's count bound: it leaves the count too.
    assert not outbox.add("made-up0", b"j", now=1, sender="mallory")
    assert outbox.add("made-up0", b"k", now=1)  # from server code: charged to nobody
    assert outbox.add("made-up0", b"k", now=1)  # the user's two slots: mallory's entry went
    assert outbox.charged("mallory") == 2
    # Expired with its history: the count is back to nothing.
    assert outbox.add("later", b"j", now=20, sender="mallory")
    assert outbox.charged("mallory") == 1 and outbox.charged("alice") == 0


def _check_books(outbox: UserOutbox) -> None:
    """The outbox's running counts against a recount from its histories."""
    histories = outbox._users
    droppable = {u: h for u, h in histories.items()
                 if h.lease is None and (not h.entries or h.entries[-1][0] <= h.written)}
    assert {u for u, h in histories.items() if h.droppable} == set(droppable)
    assert set(droppable) <= set(outbox._written)
    assert outbox._written_users == len(droppable)
    assert outbox._written_bytes == sum(h.size for h in droppable.values())
    assert outbox.total_bytes == sum(h.size for h in histories.values())
    assert outbox.users <= outbox.limits.max_users
    assert outbox.total_bytes <= outbox.limits.max_total_bytes
    charged: dict[str, list[int]] = {}
    places: dict[str, list[int]] = {}
    for history in histories.values():
        for kid, _, _, frame, sender, address in history.entries:
            if sender is not None and kid > history.written:
                for books, key in ((charged, sender), (places, address)):
                    if key is not None:
                        held = books.setdefault(key, [0, 0])
                        held[0] += 1
                        held[1] += len(frame)
    assert outbox._senders == charged and outbox._addresses == places
    limits = outbox.limits
    for held in charged.values():  # every sender within its share
        assert held[0] <= limits.sender_messages and held[1] <= limits.sender_bytes
    for held in places.values():  # every address within its share
        assert held[0] <= limits.address_messages and held[1] <= limits.address_bytes
    # What senders hold leaves server code's last share of the bytes.
    assert sum(held[1] for held in charged.values()) <= (
        limits.max_total_bytes - limits.max_total_bytes // SENDER_SHARES)


_OPS = st.lists(st.tuples(st.sampled_from(["add", "ack", "lease", "settle", "expire"]),
                          st.integers(0, 5), st.sampled_from([None, "s0", "s1"]),
                          st.integers(1, 40)), min_size=10, max_size=80)


@given(_OPS)
def test_the_outbox_books_always_match_its_histories(ops: list[tuple[str, int, str | None, int]],
                                                     ) -> None:
    """Whatever the sends, acknowledgements, leases and expiries: the counts the bounds decide on
    (droppable histories and their bytes, each sender's and each address's waiting messages) are
    exact, and within their shares."""
    outbox = UserOutbox(OutboxLimits(max_messages=3, max_bytes=60, max_age=30, max_users=8,
                                     max_total_bytes=150, max_per_sender=4))
    now = 0.0
    last: dict[str, int] = {}
    for op, user, sender, size in ops:
        uid = f"u{user}"
        now += size / 8
        if op == "add":
            kid = outbox.add(uid, b"x" * size, now, sender, (None, "a0", "a1")[size % 3])
            if kid:
                last[uid] = kid
        elif op == "ack" and uid in last:
            outbox.ack(uid, last[uid] - size % 2)
        elif op == "lease":
            outbox.lease(uid, sender or "h", now, lambda holder: holder == "s0")
        elif op == "settle":
            outbox.settle(uid, sender or "h", str(last[uid]) if uid in last and size % 3 else None)
        elif op == "expire":
            outbox.expire(now)
        _check_books(outbox)


def test_bus_refusals_hold_a_sender_until_its_count_expires_and_everyone_while_full() -> None:
    refusals = BusRefusals(max_senders=2)
    assert refusals.keeps("mallory", now=0) and refusals.keeps(None, now=0)
    refusals.refuse("mallory", full=False, until=10)
    assert not refusals.keeps("mallory", now=5) and refusals.keeps("alice", now=5)
    assert refusals.keeps(None, now=5)  # server code is charged to nobody
    assert refusals.keeps("mallory", now=10) and len(refusals) == 0  # expired: forgotten
    for sender in ("a", "b", "c"):
        refusals.refuse(sender, full=False, until=100)
    assert len(refusals) == 2 and refusals.keeps("a", now=1)  # bounded: the first forgotten
    refusals.refuse(None, full=True, until=20)
    assert not refusals.keeps(None, now=19) and not refusals.keeps("alice", now=19)
    assert refusals.keeps("alice", now=20) and not refusals.keeps("b", now=20)
    # An address refused: none of its senders is offered, others' and server code's are.
    refusals.refuse_address("\0anonymous 10.0.0.1", until=30)
    assert not refusals.keeps("tok1", now=25, address="\0anonymous 10.0.0.1")
    assert not refusals.keeps("tok2", now=25, address="\0anonymous 10.0.0.1")
    assert refusals.keeps("tok1", now=25, address="\0anonymous 10.0.0.2")
    assert refusals.keeps(None, now=25) and refusals.keeps("tok1", now=25)
    assert refusals.keeps("tok1", now=30, address="\0anonymous 10.0.0.1")  # over: forgotten
    assert len(refusals) == 2


def test_the_outbox_holds_at_most_max_total_bytes_of_all_users() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=100,
                                     max_total_bytes=250))
    ids = {}
    for i in range(10):
        outbox.keep(f"u{i}", b"x" * 60, now=i)
        ids[i] = outbox.add(f"u{i}", b"y" * 40, now=i)  # 100 bytes per user
        if i < 8:
            outbox.ack(f"u{i}", ids[i])  # written: only its past stays
    kept = [i for i in range(10) if outbox.after(f"u{i}", None, now=10)[0]]
    assert kept == [8, 9]  # 200 bytes: a third user would be 300
    assert outbox.users_evicted == 8 and outbox.evicted == 16
    outbox.keep("u9", b"z" * 50, now=11)  # a user's own bound first: its oldest goes
    assert [len(e.frame) for e in outbox.after("u9", None, now=11)[0]] == [40, 50]
    assert [len(e.frame) for e in outbox.after("u8", None, now=11)[0]] == [60, 40]
    assert not outbox.keep("u10", b"w" * 70, now=12)  # u8 and u9 (190 bytes) wait: refused
    assert outbox.refused == 1


def test_expiry_visits_only_the_users_it_forgets() -> None:
    """An append never walks every user (that blocked the loop with many): the users are in
    the order they were last sent to, so the expired ones are the first, and the walk stops at
    the first one kept."""
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=10))
    for i in range(10):
        outbox.keep(f"old{i}", b"x", now=0)
    for i in range(1000):
        outbox.keep(f"new{i}", b"x", now=5)
    visited = _CountingUsers(outbox)
    outbox.keep("late", b"x", now=10)  # every old user expired: forgotten at this append
    assert outbox.after("old9", None, now=10) == ([], 0)
    visited.count = 0
    outbox.keep("later", b"x", now=11)  # nothing expired: a constant amount of work
    assert visited.count <= 5
    assert outbox.after("new0", None, now=11)[1] == 1
    assert outbox.users_evicted == 0  # expiry is not a bound's loss


class _CountingUsers(dict[str, object]):
    """The outbox's user table, counting the users looked at."""

    def __init__(self, outbox: UserOutbox) -> None:
        super().__init__(outbox._users)
        outbox._users = self  # type: ignore[assignment]
        self.count = 0

    def __getitem__(self, key: str) -> object:
        self.count += 1
        return super().__getitem__(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for key in super().__iter__():
            self.count += 1
            yield key

    def items(self):  # type: ignore[no-untyped-def]
        for item in super().items():
            self.count += 1
            yield item


def test_outbox_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutboxLimits(max_messages=0)
    with pytest.raises(ValueError):
        OutboxLimits(max_users=0)
    with pytest.raises(ValueError):
        ServerConfig(outbox_messages=-1)
    with pytest.raises(ValueError):
        ServerConfig(outbox_total_bytes=0)
    with pytest.raises(ValueError):
        ServerConfig(outbox_per_sender=0)


async def test_messages_to_a_user_connected_nowhere_reach_their_next_connection_in_order_once(
) -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        for i in range(5):
            await manager.send_message_to_user("alice", {"i": i})
        first = await stack.client("alice:s1")
        assert await numbers(first, 5) == [0, 1, 2, 3, 4]
        second = await stack.client("alice:s2")
        await manager.send_message_to_user("alice", {"i": 5})  # live: both channels get it
        for client in (first, second):
            message = await client.receive(TIMEOUT)
            assert isinstance(message, DaraServerMessage)
            assert message.message.model_dump()["i"] == 5
        assert first.received_nowait() == [] and second.received_nowait() == []  # exactly once


async def test_a_reconnect_with_a_new_channel_gets_what_was_sent_in_between() -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        before = await stack.client("alice:s1")
        await before.close()
        async with asyncio.timeout(TIMEOUT):  # the server's side of the close: no event
            while manager.get_user_channels("alice"):
                await asyncio.sleep(0.005)
        await manager.send_message_to_user("alice", {"task": "done"})
        after = await stack.client("alice:s1")
        message = await after.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump()["task"] == "done"


async def test_the_outbox_can_be_switched_off() -> None:
    async with running_stack("memory", config=ServerConfig(outbox_messages=0)) as stack:
        await stack.manager.send_message_to_user("alice", {"i": 0})
        assert len(stack.manager.outbox) == 0
        client = await stack.client("alice:s1")
        await stack.manager.send_message_to_user("alice", {"i": 1})
        message = await client.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump()["i"] == 1  # not 0: nothing was kept


async def test_a_message_for_a_channel_the_caller_ignores_is_not_kept() -> None:
    async with running_stack("memory") as stack:
        client = await stack.client("alice:s1")
        await stack.manager.send_message_to_user("alice", {"i": 0}, ignore_channel=client.channel)
        assert len(stack.manager.outbox) == 0


# --------------------------------------------------------------------------- read, then ack


def test_a_lease_hands_the_frames_to_one_live_holder_and_keeps_them_until_settled() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=10))
    for i in range(3):
        outbox.keep("alice", b"m%d" % i, now=0)
    live = {"a", "b"}
    first = outbox.lease("alice", "a", now=1, alive=live.__contains__)
    assert [e.frame for e in first] == [b"m0", b"m1", b"m2"]
    assert [e.n for e in first] == [1, 2, 3]
    assert outbox.lease("alice", "b", now=1, alive=live.__contains__) == []  # "a" delivers them
    assert not outbox.settle("alice", "b", None)  # not the holder: nothing changes
    outbox.keep("alice", b"m3", now=1)  # appended after the lease: an ack never covers it
    assert outbox.settle("alice", "a", first[1].id)  # "a" wrote m0 and m1, then closed
    again = outbox.lease("alice", "b", now=2, alive=live.__contains__)
    assert [e.frame for e in again] == [b"m2", b"m3"]  # from the first entry not written
    live.discard("b")  # "b" died without settling: its lease is void
    assert [e.frame for e in outbox.lease("alice", "c", now=3, alive=live.__contains__)] == [
        b"m2", b"m3"]
    assert outbox.settle("alice", "c", again[-1].id)
    assert len(outbox) == 0 and outbox.lease("alice", "d", now=3, alive=live.__contains__) == []
    # Written for the user, but kept in the history (for a process that missed them).
    assert [e.frame for e in outbox.after("alice", first[0].id, now=3)[0]] == [
        b"m1", b"m2", b"m3"]


def test_an_acknowledgement_never_moves_the_mark_past_entries_a_lease_holds_unwritten() -> None:
    """A second connection of the user gets nothing from the history while a live holder has
    the lease, only newer messages live: its acknowledgement of one of those says nothing of
    the leased ones, so the mark stays before them until the holder settles, and what the
    holder never wrote stays for the next lease."""
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=10))
    for i in range(4):
        outbox.keep("alice", b"m%d" % i, now=0)
    live = {"x", "y"}
    leased = outbox.lease("alice", "x", now=1, alive=live.__contains__)
    assert len(leased) == 4 and outbox.lease("alice", "y", now=1, alive=live.__contains__) == []
    outbox.ack("alice", leased[0].id)  # the holder wrote m0: true, it moves the mark
    newer = outbox.append("alice", b"m4", now=1)
    assert newer is not None
    outbox.ack("alice", newer.id)  # "y" wrote m4 live; m1..m3 it never had
    assert outbox.pending("alice") == 4
    live.discard("x")
    assert outbox.settle("alice", "x", leased[1].id)  # "x" wrote m0 and m1, then closed
    outbox.ack("alice", newer.id)  # still not past m2 and m3: nobody wrote them
    assert [e.frame for e in outbox.lease("alice", "z", now=2, alive=live.__contains__)] == [
        b"m2", b"m3", b"m4"]  # m4 again: a duplicate for the user, never a loss
    assert outbox.settle("alice", "z", newer.id)
    assert outbox.pending("alice") == 0
    outbox.keep("alice", b"m5", now=2)
    outbox.ack("alice", outbox.head("alice").id)  # type: ignore[union-attr]  # no lease: moves
    assert outbox.pending("alice") == 0


async def test_a_connection_writing_newer_messages_never_acknowledges_a_lease_it_never_had(
) -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        for i in range(3):
            await manager.send_message_to_user("alice", {"i": i})
        identity = Identity(user_id="alice", session_id="s")
        manager.create_handler("silent", identity)  # leases them, writes nothing
        reader = await stack.client("alice:s2")  # the lease is live: nothing from the history
        await manager.send_message_to_user("alice", {"i": 3})
        assert await numbers(reader, 1) == [3]  # written at once: acknowledged (capped)
        await reader.close()
        manager.remove_handler("silent")  # closed without writing what it leased
        after = await stack.client("alice:s3")
        assert await numbers(after, 4) == [0, 1, 2, 3]


def test_an_acknowledgement_only_moves_the_written_mark_forward() -> None:
    outbox = UserOutbox(OutboxLimits(max_messages=10, max_bytes=100, max_age=10))
    entries = [outbox.append("alice", b"m%d" % i, now=0) for i in range(4)]
    assert all(e is not None for e in entries)
    outbox.ack("alice", entries[2].id)  # type: ignore[union-attr]
    outbox.ack("alice", entries[0].id)  # type: ignore[union-attr]  # late: changes nothing
    assert outbox.pending("alice") == 1
    assert outbox.take("alice", now=1) == [b"m3"]
    outbox.ack("bob", "7")  # nothing kept for bob: nothing to acknowledge
    assert outbox.pending("bob") == 0


async def test_frames_a_connection_never_wrote_go_to_the_next_connection() -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        for i in range(3):
            await manager.send_message_to_user("alice", {"i": i})
        identity = Identity(user_id="alice", session_id="s")
        handler = manager.create_handler("silent", identity)  # no sink: nothing is ever written
        assert len(handler.queue) == 4  # init and the three kept frames
        manager.remove_handler("silent")  # gone before writing them: not acknowledged
        client = await stack.client("alice:s2")
        assert await numbers(client, 3) == [0, 1, 2]
        await eventually(lambda: len(manager.outbox) == 0)  # written, then acknowledged
        again = await stack.client("alice:s3")
        await manager.broadcast({"fence": True})
        message = await again.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump() == {"fence": True}  # nothing replayed twice


async def test_live_frames_a_closing_connection_never_wrote_go_to_the_next_connection() -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        identity = Identity(user_id="alice", session_id="s")
        handler = manager.create_handler("silent", identity)  # no sink: nothing is ever written
        for i in range(3):  # live: the user has a connection, which queues them
            await manager.send_message_to_user("alice", {"i": i})
        assert len(handler.queue) == 4 and manager.outbox.pending("alice") == 3
        manager.remove_handler("silent")  # closed with them unwritten: kept for the user
        client = await stack.client("alice:s2")
        assert await numbers(client, 3) == [0, 1, 2]
        await eventually(lambda: manager.outbox.pending("alice") == 0)  # written: acknowledged


async def test_frames_another_connection_of_the_user_wrote_are_not_handed_out_again() -> None:
    async with running_stack("memory") as stack:
        manager = stack.manager
        reader = await stack.client("alice:s1")
        handler = manager.create_handler("silent", Identity(user_id="alice", session_id="s"))
        for i in range(3):
            await manager.send_message_to_user("alice", {"i": i})
        assert await numbers(reader, 3) == [0, 1, 2]  # written to one connection of the user:
        await eventually(lambda: manager.outbox.pending("alice") == 0)  # delivered, for the user
        assert len(handler.queue) == 4
        manager.remove_handler("silent")
        after = await stack.client("alice:s3")
        await manager.broadcast({"fence": True})
        message = await after.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump() == {"fence": True}  # nothing handed out again


async def test_a_peer_that_stops_reading_then_disconnects_leaves_its_unwritten_frames_to_the_next(
) -> None:
    """On real sockets: the server writes what the peer's buffers take, queues the rest, and
    the peer goes away; the user's next connection gets exactly the frames never written."""
    config = ServerConfig(ping_interval=None, max_queue_messages=1000, max_queue_bytes=64 * 2**20,
                          outbox_messages=1000, outbox_bytes=64 * 2**20)
    async with running_stack("websockets", config=config) as stack:
        assert stack.port is not None
        peer = await HostileClient.open(stack.port, rcvbuf=4096)
        response = await peer.handshake("/api/core/ws?token=alice:s1")
        assert response.status == 101
        channel = json.loads((await peer.read_frame()).text)["message"]["channel"]
        peer.stop_reading()
        handler = stack.manager.handlers[channel]
        blob = "x" * 50_000
        total = 200  # 10 MB: more than the kernel's buffers on loopback take
        for i in range(total):  # far more than the socket buffers take: the queue fills
            await stack.manager.send_message_to_user("alice", {"i": i, "blob": blob})
        await eventually(lambda: len(handler.queue) > 0)
        peer.abort()
        await eventually(lambda: channel not in stack.manager.handlers)
        written = handler.flushed - 1  # init, then the per-user frames in order
        assert 0 < written < total
        client = await stack.client("alice:s2", max_queue=total)
        got = [int(p) for p in await numbers(client, total - written)]
        assert got == list(range(written, total))  # the unwritten ones, in order, once
        await stack.manager.broadcast({"fence": True})
        message = await client.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump() == {"fence": True}


# --------------------------------------------------------------------------- pure decisions


def test_a_write_log_acknowledges_what_each_connection_wrote_and_forgets_what_it_did_not() -> None:
    log = WriteLog(max_entries=100)
    for position, entry in ((2, "1"), (3, "2"), (4, "3")):
        log.record("a", position, "alice", entry)
    log.record("b", 2, "alice", "1")
    log.record("b", 3, "bob", "9")
    assert log.written({"a": 3, "b": 1}) == {"alice": "2"}  # a wrote frames 2 and 3
    assert len(log) == 3
    assert log.written({"a": 3, "b": 3}) == {"alice": "1", "bob": "9"}
    assert log.close("a", 3) == {}  # closed before writing frame 4: "3" is not acknowledged
    assert len(log) == 0
    log.record("c", 2, "alice", "4")
    assert log.written({}) == {} and len(log) == 0  # a channel that is gone: forgotten, unacked
    small = WriteLog(max_entries=2)
    for i in range(3):
        small.record("d", i + 1, "alice", str(i))
    assert len(small) == 2 and small.close("d", 9) == {"alice": "2"}


def test_a_written_run_acknowledges_only_as_far_as_the_connection_wrote_every_entry() -> None:
    run = WrittenRun(3, (100, 0))  # admitted when the user's newest entry was number 3
    assert run.add(2, "90-0", 1000) == "90-0"  # leased (before the admission): the lease covers it
    assert run.add(5, "120-0", 1000) is None  # 4 not written: nothing past it
    assert run.add(6, "121-0", 1000) is None
    assert run.add(4, "110-0", 1000) == "121-0"  # the gap filled: up to 6 at once
    assert run.add(8, "130-0", 1000) is None
    assert run.cover(7, 7) == "130-0"  # 7 was dropped by a bound: it holds nothing back
    assert run.cover(12, 14) is None and run.add(9, "140-0", 1000) == "140-0"
    assert run.add(11, "150-0", 1000) is None  # 10 missing: 11, and 12-14 dropped, wait
    assert run.add(10, "145-0", 1000) == "150-0" and run.n == 14


def test_a_written_run_starts_again_when_the_user_history_expired() -> None:
    run = WrittenRun(0, (0, 0))
    assert run.add(1, "100-0", 1000) == "100-0"
    assert run.add(2, "200-0", 1000) == "200-0"
    # Quiet for longer than the age: the history expired, numbered from 1 again, and entry 1
    # of the new one has not been written here yet.
    assert run.add(2, "1300-0", 1000) is None
    assert run.add(1, "1250-0", 1000) == "1300-0"
    assert run.add(1, "1400-0", 1000) == "1400-0"  # a number seen, yet newer: from 1 again


def test_a_write_log_holds_an_acknowledgement_past_an_entry_the_connection_did_not_write() -> None:
    log = WriteLog(max_entries=100, age_ms=10_000)
    log.begin("a", 0, (0, 0))
    log.record("a", 2, "v", "101-0", 2)  # its process's own send, numbered after another's (1)
    assert log.written({"a": 2}) == {}  # entry 1 never written by it: not past it
    log.record("a", 3, "v", "100-0", 1)  # the other process's, arriving late
    assert log.written({"a": 3}) == {"v": "101-0"}
    log.record("a", 4, "v", "103-0", 4)
    assert log.close("a", 4) == {}  # closed with 3 never written: 4 is not acknowledged
    run = log.end("a")
    assert run is not None and log.end("a") is None
    closed = ClosedWrites(age_ms=10_000)
    closed.close("a", 5, 100.0, run)
    assert closed.acknowledges("a", 5, Stamped("102-0", 3, b""), 101.0) == "103-0"  # 3 then 4
    assert closed.acknowledges("a", 6, Stamped("104-0", 5, b""), 101.0) is None  # not written


def test_closed_writes_tell_a_late_number_whether_the_closed_connection_had_written_it() -> None:
    closed = ClosedWrites(max_channels=2, max_age=10.0)
    closed.close("a", 5, now=100.0)
    assert closed.wrote("a", 5, now=101.0) and closed.wrote("a", 2, now=101.0)
    assert not closed.wrote("a", 6, now=101.0)  # queued, never written: the next connection's
    assert not closed.wrote("unknown", 1, now=101.0)
    closed.close("b", 3, now=102.0)
    closed.close("c", 3, now=103.0)  # beyond the count: the oldest forgotten
    assert len(closed) == 2 and not closed.wrote("a", 1, now=103.0)
    assert closed.wrote("b", 3, now=111.9)
    assert not closed.wrote("b", 3, now=112.0) and len(closed) == 1  # beyond the age: forgotten
    closed.close("d", 1, now=200.0)  # a close expires the old ones too
    assert len(closed) == 1 and closed.wrote("d", 1, now=200.0)
    closed.close("d", 4, now=205.0)  # an id closed again: its newest count, kept from then on
    assert closed.wrote("d", 4, now=211.0) and len(closed) == 1


def test_queued_marks_acknowledge_the_last_entry_each_connection_wrote() -> None:
    marks = QueuedMarks(max_entries=100)
    for position, entry in ((2, 1), (3, 4), (5, 6)):
        marks.record("a", position, "alice", entry)
    marks.record("b", 4, "alice", 4)
    marks.record("c", 2, "bob", 5)
    flushed = {"a": 4, "b": 3, "c": 1}
    assert marks.written(flushed.get) == {"alice": 4}  # a wrote frames up to 4: entries 1 and 4
    assert len(marks) == 3
    flushed.update(b=4)
    assert marks.written(flushed.get) == {"alice": 4}  # b wrote entry 4 too: still 4
    assert len(marks) == 2
    assert marks.close("a", 4) is None  # closed before writing frame 5: 6 is not acknowledged
    assert marks.close("c", 2) == ("bob", 5) and len(marks) == 0
    marks.record("d", 2, "alice", 7)
    assert marks.written(lambda channel: None) == {} and len(marks) == 0  # gone: forgotten
    small = QueuedMarks(max_entries=2)
    for i in range(3):
        small.record("e", i + 1, "alice", i + 10)
    assert len(small) == 2 and small.written(lambda channel: 1) == {}  # the oldest forgotten
    assert small.close("e", 3) == ("alice", 12)


async def test_a_corked_kept_frame_is_acknowledged_once_the_loop_flushed_it() -> None:
    # Corked, a frame counts as written; a library that closes the connection by itself before
    # the loop's flush drops it (then un-counted). So it is acknowledged by the pass after the
    # flush, never at the send.
    async with running_stack("websockets", ServerConfig(outbox_messages=100)) as stack:
        manager = stack.manager
        client = await stack.client("alice:s1")
        handler = next(iter(manager.handlers.values()))
        await eventually(lambda: handler.flushed == handler.accepted)  # the init is out
        await manager.send_message_to_user("alice", {"i": 0})
        assert handler.flushed == handler.accepted  # corked by the send itself
        assert manager.outbox.pending("alice") == 1  # not acknowledged before the flush
        await eventually(lambda: manager.outbox.pending("alice") == 0, "acknowledged once flushed")
        assert len(manager._marks) == 0  # nothing left to track
        assert await numbers(client, 1) == [0]


class _CountingHandlers(dict[str, object]):
    """A manager's handler table, counting the channels looked up."""

    def __init__(self, handlers: dict[str, object]) -> None:
        super().__init__(handlers)
        self.count = 0

    def get(self, key: str, default: object = None) -> object:
        self.count += 1
        return super().get(key, default)


@pytest.mark.parametrize("path", ["queued", "bus"])
async def test_the_acknowledgement_pass_looks_only_at_channels_that_wrote_something(path: str,
                                                                                    ) -> None:
    """Connections that stop reading (review item 5) must cost the 20 ms pass nothing: it looks
    at a channel only once its transport wrote a recorded entry. ``queued``: the outbox of a
    process without a backplane; ``bus``: deliveries numbered by a bus (the write log)."""
    manager = WebsocketManager(ServerConfig(outbox_messages=100))
    stuck = [manager.create_handler(f"c{i}", Identity(user_id=f"u{i}", session_id=f"s{i}"))
             for i in range(500)]  # no sink: nothing is ever written
    for i in range(500):
        if path == "queued":
            await manager.send_message_to_user(f"u{i}", {"i": i})
        else:
            manager.deliver_to_user(f"u{i}", b'{"i":0}', entry=Stamped(f"{i + 1}-0", 1, b""))
    assert len(manager._marks if path == "queued" else manager._writes) == 500
    assert manager._ack_timer is None  # nothing written: nothing to come back for
    handlers = _CountingHandlers(manager.handlers)  # type: ignore[arg-type]
    manager.handlers = handlers  # type: ignore[assignment]
    manager._ack_now()
    assert handlers.count == 0
    stuck[7].frames_done(2)  # its transport wrote the init and the entry
    assert manager._ack_timer is not None
    await eventually(lambda: manager._ack_timer is None)
    assert handlers.count <= 4  # that channel only
    if path == "queued":
        assert manager.outbox.pending("u7") == 0 and manager.outbox.pending("u8") == 1
    assert len(manager._marks if path == "queued" else manager._writes) == 499
    manager.remove_handler("c8")
    assert len(manager._marks if path == "queued" else manager._writes) == 498


async def test_on_a_real_socket_what_the_transport_writes_later_is_acknowledged() -> None:
    """The acknowledgements are driven by the transport's writes (no pass walks the channels):
    frames queued behind a full socket are acknowledged as the driver writes them."""
    config = ServerConfig(ping_interval=None, max_queue_messages=1000, max_queue_bytes=64 * 2**20,
                          outbox_messages=1000, outbox_bytes=64 * 2**20)
    async with running_stack("websockets", config=config) as stack:
        manager = stack.manager
        client = await stack.client("alice:s1", max_queue=200)
        blob = "x" * 50_000
        for i in range(100):  # 5 MB: more than the socket buffers take at once
            await manager.send_message_to_user("alice", {"i": i, "blob": blob})
        assert manager.outbox.pending("alice") > 0  # queued, not all written yet
        assert [int(p) for p in await numbers(client, 100)] == list(range(100))
        await eventually(lambda: manager.outbox.pending("alice") == 0)
        await eventually(lambda: manager._ack_timer is None)
        assert len(manager._marks) == 0


def test_delivery_cursors_hand_each_entry_over_once_and_count_what_a_bound_dropped() -> None:
    cursors = DeliveryCursors(max_users=2)
    assert cursors.fresh("alice", "5-0", 1) and not cursors.fresh("alice", "5-0", 1)
    assert not cursors.fresh("alice", "4-9", 1)  # older than what was handed over
    history = [Stamped("5-0", 1, b"a"), Stamped("6-0", 2, b"b"), Stamped("10-1", 3, b"c")]
    missed, lost = cursors.recover("alice", history, head=3)
    assert [e.frame for e in missed] == [b"b", b"c"] and lost == 0
    assert not cursors.fresh("alice", "10-1", 3)  # arrived from the history, then live: once
    missed, lost = cursors.recover("alice", [Stamped("20-0", 7, b"g")], head=8)
    assert [e.frame for e in missed] == [b"g"] and lost == 3  # numbers 4, 5, 6 were dropped
    assert cursors.recover("alice", [], head=10) == ([], 3)  # everything after it dropped
    assert cursors.recover("alice", [], head=10) == ([], 0)  # counted once
    cursors.own("bob", "30-0", 1)  # bob's channels here got it from this process's own send
    assert cursors.recover("bob", [Stamped("30-0", 1, b"x"), Stamped("31-0", 2, b"y")], 2)[0] == [
        Stamped("31-0", 2, b"y")]
    assert cursors.missing("bob", "32-0", 3) == 0 and cursors.fresh("bob", "32-0", 3)
    cursors.own("bob", "33-0", 4)
    assert cursors.missing("bob", "35-0", 6) == 1  # 4 was this process's own; 5 never came
    assert not cursors.missing("bob", "29-0", 9)  # older than the last one: not a gap
    cursors.advance("carol", "3-0", 4)
    assert cursors.last("carol") == "3-0" and "alice" not in cursors  # bounded: two users
    assert id_key("10-1") > id_key("9-5") > id_key("9") and id_key("12") == (12, 0)


def test_delivery_cursors_count_no_own_send_a_bound_dropped_as_lost() -> None:
    """A process's own sends reached the user's channels here before the bus numbered them:
    dropped from the history by a bound before a gap's recovery, they are not lost."""
    cursors = DeliveryCursors()
    cursors.advance("dan", "0", 0)  # admitted with an empty history
    for n in range(1, 5):
        cursors.own("dan", f"{40 + n}-0", n)
    # 1 to 4 were its own, 5 came from elsewhere and was dropped too: one lost.
    missed, lost = cursors.recover("dan", [Stamped("46-0", 6, b"f")], head=6)
    assert [e.frame for e in missed] == [b"f"] and lost == 1
    cursors.own("dan", "47-0", 7)
    assert cursors.recover("dan", [], head=8) == ([], 1)  # 7 its own, 8 dropped


def test_delivery_cursors_tell_a_jump_explained_by_own_sends_from_a_real_gap() -> None:
    """Review 7 item 4: held live entries are looked at again once the process's own sends
    are numbered: a jump they fill is no gap, one they do not fill still is."""
    cursors = DeliveryCursors()
    assert not cursors.skips("dave", [Stamped("9-0", 5, b"")])  # nothing known: no gap
    assert cursors.fresh("dave", "1-0", 1)
    held = [Stamped("3-0", 3, b""), Stamped("4-0", 4, b"")]
    assert cursors.missing("dave", "3-0", 3) == 1 and cursors.skips("dave", held)
    cursors.own("dave", "2-0", 2)  # the bus answered: number 2 was this process's own send
    assert not cursors.skips("dave", held)
    assert cursors.skips("dave", [*held, Stamped("6-0", 6, b"")])  # 5 never came
    assert cursors.skips("dave", [Stamped("4-0", 4, b""), Stamped("3-0", 3, b"")])  # 3 late
    assert cursors.last("dave") == "1-0"  # it only looks


async def test_an_acknowledgement_pass_during_a_server_close_keeps_what_the_connection_wrote() -> None:
    # A connection the server closes leaves `handlers` at once but still writes its backlog
    # (remove_handler's `writing`). An acknowledgement pass that ran meanwhile took it for gone
    # and dropped its records, entries it had written included: the settle at the end of the
    # close then acknowledged nothing, and the user's next connection got them again.
    manager = WebsocketManager(ServerConfig())
    handler = manager.create_handler("c1", Identity(user_id="u", session_id="s"))
    acked: list[tuple[str, str | int]] = []
    manager._ack = lambda user_id, upto: acked.append((user_id, upto))  # type: ignore[method-assign]
    manager._writes.record("c1", handler.accepted + 1, "u", "7-0")  # its next frame is entry 7-0
    handler.accepted += 1
    handler.flushed = handler.accepted  # written
    manager.remove_handler("c1", writing=True)  # closing: still writing its backlog
    manager._dirty.add("c1")  # a stamp from the bus armed it meanwhile
    manager._ack_now()
    manager.handler_written("c1")
    assert acked == [("u", "7-0")]


async def test_one_client_sending_to_made_up_users_never_wipes_what_is_kept_for_another(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture,
) -> None:
    """The outbox is shared by every user of the process: a client that makes the server send
    to fresh user ids (the demo's ``tell``) fills its share of it (a 16th of ``outbox_users``),
    and then its own messages are the ones not kept, never the ones already waiting for someone
    else. The refusals are logged, boundedly."""
    config = ServerConfig(outbox_users=320)
    async with make_stack(config=config) as stack:
        manager = stack.manager

        async def tell(channel_id: str, data: Any) -> bool:
            await manager.send_message_to_user(data["user"], {"kind": "tell", "data": data["text"]},
                                               custom=True)
            return True

        manager.add_ws_handler("tell", tell)
        await manager.send_message_to_user("victim", {"kind": "tell", "data": "for you"}, custom=True)
        attacker = await stack.client("mallory:s1")
        with caplog.at_level(logging.WARNING, logger="dara_ws_core"):
            for i in range(200):
                assert await attacker.request("tell", {"user": f"made-up-{i}", "text": "junk"})
        victim = await stack.client("victim:s1")
        message = await victim.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage)
        assert (message.message.kind, message.message.data) == ("tell", "for you")
        refusals = [r for r in caplog.records if "its share of the outbox" in r.getMessage()]
        assert manager.outbox.refused == manager.outbox.refused_sender == 200 - config.outbox_users // 16
        assert 1 <= len(refusals) <= 12


async def test_a_sender_over_its_quota_gets_kept_false_and_other_senders_messages_are_kept(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture,
) -> None:
    """The report's flood: one client makes the server send to many made-up users. Its own
    messages stop being kept at its quota (and ``send_message_to_user`` says so, without
    raising), while a friend's message to an offline user is still kept and delivered; what
    reaches its user leaves the sender's count; sends from server code are charged to nobody."""
    config = ServerConfig(outbox_per_sender=5, outbox_users=1000)
    async with make_stack(config=config) as stack:
        manager = stack.manager

        async def tell(channel_id: str, data: Any) -> bool:
            return await manager.send_message_to_user(
                data["user"], {"kind": "tell", "data": data["text"]}, custom=True)

        manager.add_ws_handler("tell", tell)
        attacker = await stack.client("mallory:s1")
        with caplog.at_level(logging.WARNING, logger="dara_ws_core"):
            kept = [await attacker.request("tell", {"user": f"made-up-{i}", "text": "junk"})
                    for i in range(40)]
        assert kept == [True] * 5 + [False] * 35
        assert manager.outbox.charged("mallory") == 5 and manager.outbox.refused_sender == 35
        refusals = [r for r in caplog.records if "outbox_per_sender" in r.getMessage()]
        assert 1 <= len(refusals) <= 12
        friend = await stack.client("alice:s1")
        assert await friend.request("tell", {"user": "victim", "text": "for you"}) is True
        assert all([await manager.send_message_to_user(f"server-{i}", {"i": i}) for i in range(20)])
        victim = await stack.client("victim:s1")
        message = await victim.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage)
        assert (message.message.kind, message.message.data) == ("tell", "for you")
        # Delivered to their (real) user, the attacker's messages leave its count.
        bob = await stack.client("bob:s1")
        for i in range(5):
            assert await attacker.request("tell", {"user": "made-up-0", "text": i}) is False
        made_up = await stack.client("made-up-0:s1")
        message = await made_up.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage) and message.message.data == "junk"
        await eventually(lambda: manager.outbox.charged("mallory") == 4)
        assert await attacker.request("tell", {"user": "bob", "text": "hello"}) is True
        message = await bob.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage) and message.message.data == "hello"
        await eventually(lambda: manager.outbox.charged("mallory") == 4)
