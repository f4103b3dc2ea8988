"""Many processes as one (issue 12), on the in-process bus: revocation reaching every node, the
connection limit counted on all of them atomically, no stall of other nodes behind a local slow
client, and the per-user outbox delivered on whichever node the user lands. The same on a real
Redis with real processes: ``test_cluster_redis.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dara_ws_core import (
    BackplaneError,
    CloseCode,
    ConnectionClosed,
    DaraClient,
    DaraServerMessage,
    Identity,
    ServerConfig,
)
from dara_ws_core.backplane import Gap, MemoryBroker
from dara_ws_core.backplane.broker import _wall_ms
from dara_ws_core.codec import build_frame

from .helpers import LOAD_FACTOR, eventually
from .stacks import HandshakeRejected
from .test_backplane import TIMEOUT, cluster, user

# A correctness bound, not a speed target: below the 2 s a stuck client used to cost (send_timeout),
# with room for a loaded machine (tests/helpers.py) that never reaches the stall it is there for.
NO_STALL = min(1.0 * LOAD_FACTOR, 1.8)


async def closed_with(client: DaraClient) -> int:
    """Wait for the server to close ``client``; the close code."""
    with pytest.raises(ConnectionClosed) as caught:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await client.receive(TIMEOUT)
    return caught.value.code


async def payloads(client: DaraClient, n: int) -> list[dict[str, object]]:
    out = []
    for _ in range(n):
        message = await client.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        out.append(message.message.model_dump())
    return out


# --------------------------------------------------------------------------- item 1: revocation


async def test_disconnect_user_closes_the_users_connections_on_every_node() -> None:
    async with cluster(3) as nodes:
        who = user()
        here, there, elsewhere = [await n.client(f"{who}:s{i}") for i, n in enumerate(nodes)]
        bystander = await nodes[1].client(f"{user()}:s")
        await nodes[0].manager.broadcast({"ok": 0})
        assert (await payloads(bystander, 1)) == [{"ok": 0}]
        assert nodes[0].manager.disconnect_user(who) == 1  # the local one, closed at once
        for client in (here, there, elsewhere):
            assert await closed_with(client) == CloseCode.POLICY_VIOLATION
        await nodes[0].manager.broadcast({"ok": 1})
        assert (await payloads(bystander, 1)) == [{"ok": 1}]  # other users keep their connection


async def test_disconnect_session_closes_only_that_session_on_every_node() -> None:
    async with cluster(2) as nodes:
        who = user()
        revoked = await nodes[1].client(f"{who}:old")
        kept = await nodes[1].client(f"{who}:new")
        assert nodes[0].manager.disconnect_session("old") == 0
        assert await closed_with(revoked) == CloseCode.POLICY_VIOLATION
        await nodes[0].manager.send_message_to_user(who, {"still": "here"})
        assert await payloads(kept, 1) == [{"still": "here"}]


async def test_close_channel_of_a_channel_on_another_node_closes_it() -> None:
    async with cluster(2) as nodes:
        client = await nodes[1].client(f"{user()}:s")
        assert client.channel is not None
        assert await nodes[0].manager.close_channel_everywhere(client.channel, 4000, "bye") is False
        assert await closed_with(client) == 4000


async def test_revocation_everywhere_raises_when_the_bus_is_unreachable() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker=broker) as nodes:
        who = user()
        local = await nodes[0].client(f"{who}:s")
        broker.fail()
        await eventually(lambda: not nodes[0].backplane.connected)
        with pytest.raises(BackplaneError):
            await nodes[0].manager.disconnect_user_everywhere(who)
        assert await closed_with(local) == CloseCode.POLICY_VIOLATION  # closed here regardless
        # Not lost either: it waits in the spool, and is recorded once the bus is back.
        assert f"user:{who}" not in broker.revoked
        broker.recover()
        await eventually(lambda: f"user:{who}" in broker.revoked)


async def test_a_revocation_published_late_spares_a_login_made_since_on_every_path() -> None:
    """Node 0 revokes the user while it is cut off from the bus; the user logs in again on node
    1 meanwhile. Once node 0 is back, the revocation closes the old connection only: live (its
    message carries the time it was asked for) and from the record alike."""
    broker = MemoryBroker()
    async with cluster(2, broker=broker) as nodes:
        who = user()
        old = await nodes[1].client(f"{who}:s1")
        origin, node = nodes[0].backplane, nodes[1].backplane
        broker.cut(origin.node_id)
        await eventually(lambda: not origin.connected)
        nodes[0].manager.disconnect_user(who)
        await eventually(lambda: len(origin._spool) == 1, "the revocation waits in the spool")
        revoke = origin._spool[0][0].revoke
        assert revoke is not None
        await eventually(lambda: _wall_ms() >= revoke[3] - (node._clock_offset or 0)
                         + node._clock_error, "the revocation is surely past")
        new = await nodes[1].client(f"{who}:s2")
        broker.mend(origin.node_id)
        assert await closed_with(old) == CloseCode.POLICY_VIOLATION
        await eventually(lambda: f"user:{who}" in broker.revoked, "recorded")
        node._revoke_unchecked = True
        await node._check_revoked()
        await nodes[0].manager.send_message_to_user(who, {"still": "here"})
        assert await payloads(new, 1) == [{"still": "here"}]


# --------------------------------------------------------------------------- item 1: the limit


async def test_the_connection_limit_counts_the_users_connections_on_every_node() -> None:
    config = ServerConfig(max_connections_per_user=2)
    async with cluster(3, config=config) as nodes:
        who = user()
        await nodes[0].client(f"{who}:a")
        await nodes[1].client(f"{who}:b")
        with pytest.raises(HandshakeRejected):
            await nodes[2].stack.connect(f"{who}:c")
        await nodes[2].client(f"{user()}:x")  # other users are not affected


async def test_concurrent_admissions_on_different_nodes_never_exceed_the_limit() -> None:
    config = ServerConfig(max_connections_per_user=1)
    async with cluster(3, config=config) as nodes:
        identity = Identity(user_id=user(), session_id="s")
        admitted = await asyncio.gather(*(
            n.manager.admit(str(uuid.uuid4()), identity) for n in nodes for _ in range(3)))
        assert admitted.count(True) == 1


async def test_a_dead_nodes_connections_stop_counting_after_the_expiry() -> None:
    now = [0.0]
    broker = MemoryBroker(clock=lambda: now[0])
    config = ServerConfig(max_connections_per_user=1)
    async with cluster(2, broker=broker, config=config) as nodes:
        identity = Identity(user_id=user(), session_id="s")
        assert await nodes[0].manager.admit("ghost", identity)  # never served: as a dead node
        assert not await nodes[1].manager.admit("second", identity)
        now[0] += nodes[0].backplane.expiry + 1
        assert await nodes[1].manager.admit("third", identity)


# --------------------------------------------------------------------------- item 2: no stall


@pytest.mark.parametrize("fan_out", ["broadcast", "user"])
async def test_a_stuck_local_client_never_delays_another_node(fan_out: str) -> None:
    config = ServerConfig(max_queue_messages=8, send_timeout=2.0)  # policy: wait
    async with cluster(2, config=config) as nodes:
        who = user()
        stuck = await nodes[0].stack.connect(f"{who}:stuck")  # never reads
        await eventually(lambda: len(nodes[0].manager.get_user_channels(who)) == 1)
        (stuck_channel,) = nodes[0].manager.get_user_channels(who)
        handler = nodes[0].manager.handlers[stuck_channel]
        remote = await nodes[1].client(f"{who}:remote", max_queue=100_000)
        worst = 0.0
        for i in range(200):
            started = time.monotonic()
            if fan_out == "broadcast":
                await nodes[0].manager.broadcast({"i": i})
            else:
                await nodes[0].manager.send_message_to_user(who, {"i": i})
            assert (await payloads(remote, 1)) == [{"i": i}]
            worst = max(worst, time.monotonic() - started)
            if handler.closed:
                break
        assert handler.closed, "the stuck client never fell behind"
        assert worst < NO_STALL
        await stuck.close()


# --------------------------------------------------------------------------- item 3: outbox


async def test_the_outbox_is_delivered_on_whichever_node_the_user_lands_once_in_order() -> None:
    async with cluster(3) as nodes:
        who = user()
        for i in range(5):  # from three nodes, one after another (each one published first:
            sender = nodes[i % 3]  # the order is the bus's, per sender as the calls were made)
            await sender.manager.send_message_to_user(who, {"i": i})
            async with asyncio.timeout(TIMEOUT):
                await sender.backplane.flush()
        assert sum(n.backplane.stats.kept for n in nodes) == 5
        first = await nodes[2].client(f"{who}:a")
        assert [p["i"] for p in await payloads(first, 5)] == [0, 1, 2, 3, 4]
        second = await nodes[1].client(f"{who}:b")
        await nodes[0].manager.send_message_to_user(who, {"i": 5})
        assert await payloads(first, 1) == [{"i": 5}] and await payloads(second, 1) == [{"i": 5}]
        assert first.received_nowait() == [] and second.received_nowait() == []


async def test_a_message_for_a_user_connected_on_another_node_is_delivered_not_kept() -> None:
    async with cluster(2) as nodes:
        who = user()
        client = await nodes[1].client(f"{who}:a")
        await nodes[0].manager.send_message_to_user(who, {"live": True})
        assert await payloads(client, 1) == [{"live": True}]
        assert nodes[0].backplane.stats.kept == 0


async def test_a_user_message_arriving_while_a_channel_is_admitted_follows_the_outbox() -> None:
    async with cluster(2) as nodes:
        who = user()
        await nodes[1].manager.send_message_to_user(who, {"i": 0})
        async with asyncio.timeout(TIMEOUT):
            await nodes[1].backplane.flush()
        identity = Identity(user_id=who, session_id="s")
        assert await nodes[0].manager.admit("arriving", identity)
        await nodes[0].manager.send_message_to_user(who, {"i": 1})  # before the handler exists
        handler = nodes[0].manager.create_handler("arriving", identity)  # no sink: all queued
        frames = [await handler.queue.get() for _ in range(len(handler.queue))]
        nodes[0].manager.remove_handler("arriving")
        assert [b'"i":0' in f for f in frames[1:]] == [True, False]  # after init: kept, live
        assert len(frames) == 3


async def test_kept_frames_a_channel_never_wrote_go_to_the_next_connection_on_another_node(
) -> None:
    async with cluster(3) as nodes:
        who = user()
        for i in range(3):
            await nodes[0].manager.send_message_to_user(who, {"i": i})
        async with asyncio.timeout(TIMEOUT):
            await nodes[0].backplane.flush()
        identity = Identity(user_id=who, session_id="s")
        assert await nodes[1].manager.admit("silent", identity)
        handler = nodes[1].manager.create_handler("silent", identity)  # no sink: never written
        assert len(handler.queue) == 4  # init and the three it leased
        meanwhile = await nodes[2].client(f"{who}:b")  # the lease is held by a live channel:
        await nodes[0].manager.broadcast({"fence": 0})  # nothing for this one (no duplicate)
        assert await payloads(meanwhile, 1) == [{"fence": 0}]
        await meanwhile.close()
        nodes[1].manager.remove_handler("silent")  # gone before writing: nothing acknowledged
        await eventually(lambda: not nodes[2].manager.get_user_channels(who))
        after = await nodes[2].client(f"{who}:c")
        assert [p["i"] for p in await payloads(after, 3)] == [0, 1, 2]
        await eventually(lambda: nodes[0].backplane.broker.pending(who) == 0)  # acknowledged
        again = await nodes[1].client(f"{who}:d")
        await nodes[0].manager.broadcast({"fence": 1})
        assert await payloads(again, 1) == [{"fence": 1}]  # nothing replayed twice


# --------------------------------------------------------------------------- item 4: gaps


async def cut_and_mend(broker: MemoryBroker, node: Any, during: Callable[[], Awaitable[None]],
                       ) -> None:
    """Cut ``node`` off the broker, run ``during``, mend it and wait until it is back and its
    recovery has run."""
    gaps = node.backplane.stats.gaps
    broker.cut(node.backplane.node_id)
    await eventually(lambda: not node.backplane.connected)
    await during()
    broker.mend(node.backplane.node_id)
    await eventually(lambda: node.backplane.stats.gaps > gaps)


@contextlib.asynccontextmanager
async def watched_pair(broker: MemoryBroker) -> AsyncIterator[tuple[list[Any], list[Any]]]:
    """Two nodes; what node 1's ``on_gap`` is told goes to the list yielded with them."""
    reports: list[tuple[str, Gap]] = []
    async with cluster(2, broker) as nodes:
        nodes[1].manager.on_gap = lambda u, gap: reports.append((u, gap))
        yield nodes, reports


async def test_per_user_messages_sent_while_a_node_was_cut_off_are_recovered_in_order() -> None:
    broker = MemoryBroker()
    async with watched_pair(broker) as (nodes, reports):
        who = user()
        client = await nodes[1].client(f"{who}:a")
        await nodes[0].manager.send_message_to_user(who, {"i": 0})
        assert await payloads(client, 1) == [{"i": 0}]

        async def send() -> None:
            for i in range(1, 4):  # nobody listens on node 1's topic: kept for the user
                await nodes[0].manager.send_message_to_user(who, {"i": i})
            async with asyncio.timeout(TIMEOUT):
                await nodes[0].backplane.flush()

        await cut_and_mend(broker, nodes[1], send)
        await nodes[0].manager.send_message_to_user(who, {"i": 4})  # live again, after them
        assert [p["i"] for p in await payloads(client, 4)] == [1, 2, 3, 4]
        assert nodes[1].backplane.stats.recovered == 3 and nodes[1].backplane.stats.lost == 0
        assert [(u, g.recovered, g.lost) for u, g in reports] == [(who, 3, 0)]
        await eventually(lambda: broker.pending(who) == 0)  # written, then acknowledged


async def test_what_a_cut_off_node_missed_is_recovered_even_when_another_node_delivered_it(
) -> None:
    broker = MemoryBroker()
    async with watched_pair(broker) as (nodes, reports):
        who = user()
        here = await nodes[0].client(f"{who}:a")
        there = await nodes[1].client(f"{who}:b")
        await nodes[0].manager.broadcast({"b": -1})  # node 1 has heard node 0's broadcasts
        assert await payloads(there, 1) == [{"b": -1}]

        async def send() -> None:  # node 0's channel of the user gets them live, node 1 not
            for i in range(2):
                await nodes[0].manager.send_message_to_user(who, {"i": i})
            for i in range(3):
                await nodes[0].manager.broadcast({"b": i})
            async with asyncio.timeout(TIMEOUT):
                await nodes[0].backplane.flush()

        await cut_and_mend(broker, nodes[1], send)
        assert await payloads(there, 2) == [{"i": 0}, {"i": 1}]  # from the user's history
        assert nodes[1].backplane.stats.lost == 0 and nodes[1].backplane.stats.recovered == 2
        assert [(u, g.lost, g.recovered) for u, g in reports] == [(who, 0, 2)]
        await nodes[0].manager.broadcast({"b": 3})  # its sequence number reveals 3 missed
        assert await payloads(there, 1) == [{"b": 3}]  # broadcasts: at most once, counted
        assert nodes[1].backplane.stats.lost == 3
        assert [(u, g.broadcasts) for u, g in reports[1:]] == [(who, 3)]
        assert manager_stats_lost(nodes[1]) == 3
        assert len(await payloads(here, 7)) == 7  # node 0's own channel got everything
        assert there.received_nowait() == []  # nothing twice


def sending(node: Any, who: str, numbers: range) -> Callable[[], Awaitable[None]]:
    """What to do while a node is cut off: send ``numbers`` to ``who`` from ``node``."""
    async def send() -> None:
        for i in numbers:
            await node.manager.send_message_to_user(who, {"i": i})
        async with asyncio.timeout(TIMEOUT):
            await node.backplane.flush()

    return send


async def test_what_a_bound_dropped_before_a_cut_off_node_could_recover_it_is_reported() -> None:
    broker = MemoryBroker()
    reports: list[tuple[str, Gap]] = []
    async with cluster(2, broker, config=ServerConfig(outbox_messages=2)) as nodes:
        nodes[1].manager.on_gap = lambda u, gap: reports.append((u, gap))
        who = user()
        there = await nodes[1].client(f"{who}:b")
        await nodes[0].manager.send_message_to_user(who, {"i": 0})
        assert await payloads(there, 1) == [{"i": 0}]
        # Five while cut off: the history keeps the last two.
        await cut_and_mend(broker, nodes[1], sending(nodes[0], who, range(1, 6)))
        assert await payloads(there, 2) == [{"i": 4}, {"i": 5}]
        assert [(u, g.lost, g.recovered) for u, g in reports] == [(who, 3, 2)]
        assert nodes[1].backplane.stats.lost == 3


async def test_with_the_outbox_off_what_a_cut_off_node_missed_is_counted_lost() -> None:
    broker = MemoryBroker()
    reports: list[tuple[str, Gap]] = []
    async with cluster(2, broker, config=ServerConfig(outbox_messages=0)) as nodes:
        nodes[1].manager.on_gap = lambda u, gap: reports.append((u, gap))
        who = user()
        await nodes[1].client(f"{who}:b")
        # No history: nobody listens on node 1, noted in its ledger.
        await cut_and_mend(broker, nodes[1], sending(nodes[0], who, range(2)))
        assert [(u, g.lost, g.recovered) for u, g in reports] == [(who, 2, 0)]
        assert nodes[1].backplane.stats.lost == 2 and broker.outboxes == {}


async def test_an_entry_arriving_live_and_from_the_history_is_delivered_once() -> None:
    async with cluster(2) as nodes:
        who = user()
        client = await nodes[1].client(f"{who}:a")
        await nodes[0].manager.send_message_to_user(who, {"i": 0})
        assert await payloads(client, 1) == [{"i": 0}]
        nodes[1].manager.hold_users()  # as after a gap: live per-user deliveries wait
        await nodes[0].manager.send_message_to_user(who, {"i": 1})
        await eventually(lambda: len(nodes[1].manager._held.get(who, ())) == 1)
        await nodes[1].backplane._recover()  # reads i=1 from the history too
        await nodes[0].manager.send_message_to_user(who, {"i": 2})
        assert await payloads(client, 2) == [{"i": 1}, {"i": 2}]  # i=1 once, in order
        assert client.received_nowait() == []


async def test_a_gap_noticed_in_a_users_numbers_is_filled_from_the_history() -> None:
    broker = MemoryBroker()
    reports: list[tuple[str, Gap]] = []
    async with cluster(2, broker) as nodes:
        nodes[1].manager.on_gap = lambda u, gap: reports.append((u, gap))
        who = user()
        client = await nodes[1].client(f"{who}:a")
        await nodes[0].manager.send_message_to_user(who, {"i": 0})
        assert await payloads(client, 1) == [{"i": 0}]
        (channel,) = nodes[1].manager.get_user_channels(who)
        broker._users[who].clear()  # node 1's entry expired (a late heartbeat): no outage
        await nodes[0].manager.send_message_to_user(who, {"i": 1})  # for nobody: only kept
        async with asyncio.timeout(TIMEOUT):
            await nodes[0].backplane.flush()
        broker.write("n1", [(channel, who)], (), nodes[1].backplane.expiry)  # refreshed
        await nodes[0].manager.send_message_to_user(who, {"i": 2})  # number 3 after 1: a gap
        assert await payloads(client, 2) == [{"i": 1}, {"i": 2}]
        # Both from the history (2 was appended before it was published), 2 live once.
        assert [(u, g.recovered, g.lost) for u, g in reports] == [(who, 2, 0)]
        assert client.received_nowait() == []
        assert nodes[1].backplane.stats.gaps == 0  # no outage: the subscription never dropped


async def test_entries_after_the_bus_lost_its_data_are_still_new_to_a_node() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as nodes:
        who = user()
        client = await nodes[1].client(f"{who}:a")
        await nodes[0].manager.send_message_to_user(who, {"i": 0})
        assert await payloads(client, 1) == [{"i": 0}]
        (channel,) = nodes[1].manager.get_user_channels(who)
        broker.forget()  # a restart without persistence: histories and numbers gone
        broker.write("n1", [(channel, who)], (), nodes[1].backplane.expiry)  # re-registered
        await nodes[0].manager.send_message_to_user(who, {"i": 1})  # number 1 again, a new id
        assert await payloads(client, 1) == [{"i": 1}]  # not taken for one already handed over


async def test_live_frames_a_closing_connection_never_wrote_go_to_the_next_one_on_another_node(
) -> None:
    async with cluster(3) as nodes:
        who = user()
        identity = Identity(user_id=who, session_id="s")
        assert await nodes[1].manager.admit("silent", identity)
        handler = nodes[1].manager.create_handler("silent", identity)  # no sink: never written
        async with asyncio.timeout(TIMEOUT):
            await nodes[1].backplane.flush()
        for i in range(3):  # live, to node 1, which queues them
            await nodes[0].manager.send_message_to_user(who, {"i": i})
        await eventually(lambda: len(handler.queue) == 4)
        nodes[1].manager.remove_handler("silent")  # closed with them unwritten
        async with asyncio.timeout(TIMEOUT):
            await nodes[1].backplane.flush()
        after = await nodes[2].client(f"{who}:b")
        assert [p["i"] for p in await payloads(after, 3)] == [0, 1, 2]
        await eventually(lambda: nodes[0].backplane.broker.pending(who) == 0)  # now written


def manager_stats_lost(node: Any) -> int:
    """``stats.lost`` as ``manager.stats()`` reports it (what metrics read)."""
    backplane = node.manager.stats().backplane
    assert backplane is not None
    return int(backplane["lost"])


async def test_deliveries_held_back_for_a_recovery_that_never_comes_are_released_in_time(
) -> None:
    async with cluster(1, config=ServerConfig(handshake_timeout=0.3)) as (node,):
        who = user()
        client = await node.client(f"{who}:a")
        manager = node.manager
        assert manager.hold_users() == [who]
        assert manager.deliver_to_user(who, build_frame({"i": 0})) == 1  # held, not sent yet
        await manager.broadcast({"fence": True})  # not a per-user send: never held
        assert await payloads(client, 2) == [{"fence": True}, {"i": 0}]  # released in time
        assert manager._held == {}


async def test_a_send_held_after_a_gap_is_not_acknowledged_before_it_is_delivered() -> None:
    """Review item 6: a send from the process whose user is held back was acknowledged at once
    (recorded at a frame already written), so a connection closing before the recovery lost it."""
    async with cluster(2) as nodes:
        who = user()
        manager = nodes[0].manager
        client = await nodes[0].client(f"{who}:a")
        manager.hold_users()
        await manager.send_message_to_user(who, {"i": 0})  # held: not delivered yet
        async with asyncio.timeout(TIMEOUT):
            await nodes[0].backplane.flush()  # numbered by the bus
        manager._ack_now()  # an acknowledgement pass (one would come within 20 ms)
        async with asyncio.timeout(TIMEOUT):
            await nodes[0].backplane.flush()
        assert nodes[0].backplane.broker.pending(who) == 1  # not acknowledged
        await client.close()
        await eventually(lambda: not manager.get_user_channels(who))
        after = await nodes[1].client(f"{who}:b")
        assert await payloads(after, 1) == [{"i": 0}]  # from the history


async def test_a_held_send_is_acknowledged_once_delivered_after_the_recovery() -> None:
    async with cluster(1) as (node,):
        who = user()
        manager = node.manager
        client = await node.client(f"{who}:a")
        manager.hold_users()
        await manager.send_message_to_user(who, {"i": 0})
        async with asyncio.timeout(TIMEOUT):
            await node.backplane.flush()
        await node.backplane._recover()
        assert await payloads(client, 1) == [{"i": 0}]
        await eventually(lambda: node.backplane.broker.pending(who) == 0)  # written: acked


async def test_held_deliveries_are_bounded_in_bytes_too() -> None:
    """Review item 7: beyond ``max_queue_bytes`` held for a user, deliveries go out at once."""
    config = ServerConfig(max_queue_bytes=16384, max_queue_messages=4096)
    async with cluster(1, config=config) as (node,):
        who = user()
        manager = node.manager
        client = await node.client(f"{who}:a")
        manager.hold_users()
        frames = [build_frame({"i": i, "b": "x" * 3000}) for i in range(10)]
        fit = 16384 // len(frames[0])  # 5
        for frame in frames:
            manager.deliver_to_user(who, frame)
        assert len(manager._held[who]) == fit and manager._held[who].size <= 16384
        got = await payloads(client, 10 - fit)  # the rest went out at once
        assert [p["i"] for p in got] == list(range(fit, 10))
        manager.recover(who, (), 0)
        assert [p["i"] for p in await payloads(client, fit)] == list(range(fit))


async def test_acknowledgements_for_one_user_are_coalesced_while_one_is_being_published() -> None:
    """Review item 10: acknowledgements bypass the publish queue's bound, so one per user per
    tick piled up while the bus was slow. One per user is in the queue at a time; the newest
    that came meanwhile follows it (the latest wins)."""
    async with cluster(1) as (node,):
        who = user()
        for i in range(5):  # nobody connected: kept
            await node.manager.send_message_to_user(who, {"i": i})
        backplane = node.backplane
        async with asyncio.timeout(TIMEOUT):
            await backplane.flush()
        history = backplane.broker.outboxes[who]
        ids = [e.id for e in history.after(who, None, backplane.broker.clock())[0]]
        assert len(ids) == 5 and backplane.broker.pending(who) == 5
        queued = len(backplane._outbox)
        for entry_id in ids[:4]:  # four passes' worth while the first is not published yet
            backplane.ack(who, entry_id)
        assert len(backplane._outbox) == queued + 1
        await eventually(lambda: backplane.broker.pending(who) == 1)  # up to the fourth
        backplane.ack(who, ids[4])
        await eventually(lambda: backplane.broker.pending(who) == 0)
        assert backplane._acks_in_flight == {} and backplane._acks_next == {}


async def test_an_own_send_the_bus_has_not_answered_yet_is_no_gap_and_arrives_once() -> None:
    """Review 7 item 4: a process hands its own send to the user's connection here before the
    bus numbers it; a live entry from another process numbered after it arrived before the
    bus's answer, looked like a gap, and the history read then handed the own send over twice."""
    broker = MemoryBroker()
    async with cluster(2, broker) as (here, there):
        reports: list[tuple[str, Gap]] = []
        here.manager.on_gap = lambda u, gap: reports.append((u, gap))
        who = user()
        client = await here.client(f"{who}:a")
        await there.manager.send_message_to_user(who, {"i": 0})  # number 1, live
        assert await payloads(client, 1) == [{"i": 0}]
        answered = asyncio.Event()
        publish = here.backplane._publish_batch

        async def slow_answer(batch: Any) -> Any:  # numbered by the bus, its answer on the way
            results = await publish(batch)
            await answered.wait()
            return results

        here.backplane._publish_batch = slow_answer  # type: ignore[method-assign]
        await here.manager.send_message_to_user(who, {"i": 1})  # handed over here at once
        await eventually(lambda: broker.history(who, None)[1] == 2)  # number 2, not answered
        received = here.backplane.stats.received
        await there.manager.send_message_to_user(who, {"i": 2})  # number 3 skips 2 here
        await eventually(lambda: here.backplane.stats.received > received)
        answered.set()
        assert await payloads(client, 2) == [{"i": 1}, {"i": 2}]
        await there.manager.send_message_to_user(who, {"i": 3})
        assert await payloads(client, 1) == [{"i": 3}]  # nothing twice in between
        assert reports == [] and here.backplane.stats.recovered == 0  # no gap, nothing read


async def test_a_client_the_server_closed_reconnecting_at_once_elsewhere_gets_nothing_twice(
) -> None:
    """Review 7 item 5: what a connection the server closes wrote was acknowledged after its
    close frame; a client reconnecting at once on another process got it again from the
    history (the acknowledgement still on its way over a slow link)."""
    async with cluster(2) as (here, there):
        who = user()
        client = await here.client(f"{who}:a")
        publish = here.backplane._publish_batch

        async def slow_link(batch: Any) -> Any:  # a fault: this node's link to the bus is slow
            await asyncio.sleep(0.05)
            return await publish(batch)

        here.backplane._publish_batch = slow_link  # type: ignore[method-assign]
        for i in range(3):
            await there.manager.send_message_to_user(who, {"i": i})
        assert await payloads(client, 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert client.channel is not None
        here.manager.close_channel(client.channel)
        assert await closed_with(client) == CloseCode.NORMAL
        again = await there.client(f"{who}:b")  # at once, on the other node
        await there.manager.send_message_to_user(who, {"fence": True})
        assert await payloads(again, 1) == [{"fence": True}]  # nothing read before, again


@pytest.mark.parametrize("closed_by", ["client", "server"])
async def test_what_a_connection_wrote_before_the_bus_numbered_it_is_not_sent_again(
    closed_by: str,
) -> None:
    """Review 8: a node hands its own per-user send to the user's connection here at once and
    learns its entry in the history only once the bus answers. A connection that closed before
    that (the client closing, or a server close whose wait for the bus ran out) was settled
    without those entries, and the numbers that came later were dropped: the user's next
    connection got again what the first had read. The same on Redis, every transport and kind
    of close: ``test_kept_delivery_redis.py``."""
    config = ServerConfig(close_timeout=0.4)  # a server close waits 0.1 s for the bus
    async with cluster(2, config=config) as (here, there):
        who = user()
        client = await here.client(f"{who}:a")
        publish, answer = here.backplane._publish_batch, asyncio.Event()

        async def held_link(batch: Any) -> Any:  # a fault: the bus answers this node late
            async with asyncio.timeout(TIMEOUT):
                await answer.wait()
            return await publish(batch)

        here.backplane._publish_batch = held_link  # type: ignore[method-assign]
        for i in range(3):
            await here.manager.send_message_to_user(who, {"i": i})
        assert await payloads(client, 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
        if closed_by == "client":
            await client.close()
        else:
            assert client.channel is not None
            here.manager.close_channel(client.channel)
            assert await closed_with(client) == CloseCode.NORMAL
        await eventually(lambda: not here.manager.handlers and not here.manager._writing,
                         "settled before the bus answered")
        assert here.backplane.stats.published == 0  # the case under test: nothing answered yet
        answer.set()
        backplane = here.backplane
        async with asyncio.timeout(TIMEOUT):
            await backplane.flush()  # the numbers are back, and what they acknowledge
        await eventually(lambda: not backplane._acks_in_flight and not backplane._acks_next)
        async with asyncio.timeout(TIMEOUT):
            await backplane.flush()
        again = await there.client(f"{who}:b")
        await there.manager.send_message_to_user(who, {"fence": True})
        assert await payloads(again, 1) == [{"fence": True}]  # nothing read before, again


async def test_a_connection_admitted_while_its_node_was_cut_off_gets_only_what_nobody_wrote(
) -> None:
    """Review 7 item 6: the recovery after the outage read such a user's whole history (no
    entry handed over here yet), so what an earlier connection had read came again."""
    broker = MemoryBroker()
    async with cluster(2, broker) as (sender, node):
        who = user()
        for i in range(3):  # connected nowhere: kept
            await sender.manager.send_message_to_user(who, {"i": i})
        async with asyncio.timeout(TIMEOUT):
            await sender.backplane.flush()
        first = await node.client(f"{who}:a")
        assert [p["i"] for p in await payloads(first, 3)] == [0, 1, 2]
        await eventually(lambda: broker.pending(who) == 0)  # written, acknowledged
        await first.close()
        await eventually(lambda: not node.manager.get_user_channels(who))
        later: list[DaraClient] = []

        async def connect() -> None:  # admitted on the local count, the history not read
            later.append(await node.stack.client(f"{who}:b"))

        await cut_and_mend(broker, node, connect)
        await sender.manager.send_message_to_user(who, {"fence": True})
        assert await payloads(later[0], 1) == [{"fence": True}]  # nothing it had already
