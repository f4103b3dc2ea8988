"""The per-user outbox: the pure bounded history, and one process without a backplane keeping what
``send_message_to_user`` sent to a user connected nowhere for the user's next connection."""

from __future__ import annotations

import asyncio

import pytest

from dara_ws_core import DaraClient, DaraServerMessage, Identity, ServerConfig
from dara_ws_core.outbox import OutboxLimits, UserOutbox

from .helpers import eventually
from .stacks import running_stack

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


def test_outbox_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutboxLimits(max_messages=0)
    with pytest.raises(ValueError):
        ServerConfig(outbox_messages=-1)


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
