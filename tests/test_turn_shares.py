"""One client address's share of each turn of the event loop, whatever its number of connections.

Every connection was bounded per turn of the loop on its own (``FRAMES_PER_FEED`` frames handed
to its library's parser, ``_YIELD_EVERY`` messages handled), so a client with 64 connections had
64 of those shares in every turn: flooding JSON pings from 64 connections of one address held
the loop for 1 to 2 s a turn on websockets and uvicorn (64 x 1,024 frames parsed), and flooding
the demo's ``chat`` (a broadcast to every connection each) for up to 4 s, while every other
client's pushes waited. The connections of one address now share ``PARSED_PER_TURN`` and
``HANDLED_PER_TURN``; past them, a feed takes only a floor of frames a turn, and connections wait
for their place in turn (so that none of them waits for ever behind the others).

A share per address is then a bound per turn only while few addresses are busy: 48 addresses
(one client holding many, or many clients) each within its share had the loop parse 48 x 1,024
frames and handle 48 x 128 messages a turn. Past four addresses' worth, the shares of a turn
are now divided among the busy addresses.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from dara_ws_core import ServerConfig
from dara_ws_core.transport import (
    FRAMES_PER_FEED,
    FRAMES_PER_FEED_FLOOR,
    ClientFrameHeaders,
    ReceivingBudget,
    ReceivingCharge,
    TurnShares,
)

from . import test_hostile_transport
from .hostile import TEXT, HostileClient, encode_frame

#: The fixture ``async with socket_stack(config=...) as stack``, on every socket transport.
socket_stack = test_hostile_transport.socket_stack
MiB = 1024 * 1024


def test_without_a_running_loop_nothing_is_counted() -> None:
    shares = TurnShares(10)
    shares.spend("a", 50)
    assert shares.left("a") == 10 and not shares.used
    assert shares.left(None) > 10**12  # no address: never held back by a share


async def test_an_address_uses_its_share_of_a_turn_and_has_it_again_the_next() -> None:
    shares = TurnShares(10)
    turn = shares.turn
    shares.spend("a", 7)
    shares.spend("a", 2)
    shares.spend("b", 3)
    shares.spend(None, 100)  # not counted
    assert (shares.left("a"), shares.left("b"), shares.left("c")) == (1, 7, 10)
    shares.spend("a", 5)
    assert shares.left("a") == 0
    await asyncio.sleep(0)  # the next turn of the loop
    assert shares.turn == turn + 1
    assert (shares.left("a"), shares.left("b")) == (10, 10) and not shares.used


async def test_the_counts_given_the_running_loop_are_the_same_counts() -> None:
    """left_on / spend_on (the driver's and the frame headers' way: the loop they already know,
    not a look-up of it, which is a getpid() system call on Python 3.11) count in the same turn
    as left / spend, and a turn begun on another loop carries nothing over."""
    shares = TurnShares(10)
    loop = asyncio.get_running_loop()
    assert shares.left_on(loop, "a") == 10
    assert shares.spend_on(loop, "a", 7) == 3
    shares.spend("a", 2)
    assert shares.left_on(loop, "a") == shares.left("a") == 1
    assert shares.spend_on(loop, "a", 4) == -3 and shares.left_on(loop, "a") == 0
    other = asyncio.new_event_loop()
    try:
        assert shares.left_on(other, "a") == 10  # no turn of that loop has begun
    finally:
        other.close()
    await asyncio.sleep(0)  # the next turn
    assert shares.left_on(loop, "a") == 10 and not shares.used


def _pings(count: int) -> bytes:
    return encode_frame(TEXT, '{"type":"ping","message":null}', mask_key=b"abcd") * count


def _frames_in(data: bytes) -> int:
    return data.count(b"\x81\x9e")  # a masked text frame of 30 bytes: every ping's header


async def test_the_feeds_of_one_address_hand_on_one_feeds_share_a_turn_together() -> None:
    budget = ReceivingBudget()
    data = _pings(3000)

    def headers(address: str) -> ClientFrameHeaders:
        return ClientFrameHeaders(ReceivingCharge(256 * MiB, budget=budget, address=address))

    await asyncio.sleep(0)  # a turn of its own
    first, second, third, other = (headers("10.0.0.1"), headers("10.0.0.1"), headers("10.0.0.1"),
                                   headers("10.0.0.2"))
    assert _frames_in(first.feed(data)) == FRAMES_PER_FEED and first.more
    # The address's share is used: its other connections take a floor each, another address
    # its own share.
    assert _frames_in(second.feed(data)) == FRAMES_PER_FEED_FLOOR and second.more
    assert _frames_in(third.feed(data)) == FRAMES_PER_FEED_FLOOR
    assert _frames_in(other.feed(data)) == FRAMES_PER_FEED
    await asyncio.sleep(0)  # the next turn: the address has its share again, first come
    assert _frames_in(second.feed(b"")) == FRAMES_PER_FEED
    assert _frames_in(first.feed(b"")) == FRAMES_PER_FEED_FLOOR


async def test_many_addresses_divide_a_turn_among_them() -> None:
    # 48 addresses, one connection each, all with frames to parse in the same turn: four
    # addresses take a whole share, then the share is divided among those busy (at least the
    # floor a feed always takes). Before, each address took a whole share: 48 x 1,024 frames.
    budget = ReceivingBudget()
    data = _pings(3000)
    addresses = [f"10.0.1.{n}" for n in range(48)]
    feeds = [ClientFrameHeaders(ReceivingCharge(256 * MiB, budget=budget, address=a)) for a in addresses]
    await asyncio.sleep(0)  # a turn of its own
    first = [_frames_in(feed.feed(data)) for feed in feeds]
    assert sum(first) <= 5 * FRAMES_PER_FEED + FRAMES_PER_FEED_FLOOR * len(feeds), first
    await asyncio.sleep(0)  # the next turn: all 48 were busy in the last one, each has its part
    second = [_frames_in(feed.feed(b"")) for feed in feeds]
    part = 4 * FRAMES_PER_FEED // len(feeds)
    assert all(frames == part for frames in second), second
    assert sum(second) <= 4 * FRAMES_PER_FEED


async def _handled_per_turn(socket_stack: Any, addresses: list[str]) -> list[int]:
    """Connections from ``addresses`` (one each, each its own user) each have 200 messages for
    a handler that notes the turn of the loop it ran in, all written before the server reads
    any: how many were handled in each turn that handled any."""
    turns = [0]
    seen: dict[int, int] = {}
    counting = [True]

    def count_turns() -> None:
        turns[0] += 1
        if counting[0]:
            loop.call_soon(count_turns)

    def mark(channel_id: str, data: Any) -> None:
        seen[turns[0]] = seen.get(turns[0], 0) + 1

    loop = asyncio.get_running_loop()
    async with socket_stack(config=ServerConfig(ping_interval=None, idle_timeout=None)) as stack:
        stack.manager.add_ws_handler("mark", mark)
        assert stack.port is not None
        clients: list[HostileClient] = []
        try:
            for n, address in enumerate(addresses):
                client = await HostileClient.open(stack.port, local=address)
                clients.append(client)
                assert (await client.handshake(f"/api/core/ws?token=user{n}:s1")).status == 101
                await client.read_frame()
            burst = encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "mark", "data": 1}}),
                                 mask_key=b"abcd") * 200
            loop.call_soon(count_turns)
            for client in clients:  # in one step of this task: the server reads none meanwhile
                client.write(burst)
            async with asyncio.timeout(60):
                while sum(seen.values()) < len(addresses) * 200:
                    await asyncio.sleep(0.01)
        finally:
            counting[0] = False
            for client in clients:
                client.abort()
    return sorted(seen.values())


async def test_the_connections_of_one_address_handle_at_most_their_share_of_each_turn(
        socket_stack: Any) -> None:
    # 64 connections of one address (each its own user). Per connection alone, a turn handled
    # 16 of each connection's: 1,024. Now the address's connections handle 64 a turn, and four
    # of them waiting their place 16 each (a connection whose library hands it messages from its
    # read callback takes the one it was handed: about 135 in the busiest turn here).
    connections = 64
    handled = await _handled_per_turn(socket_stack, ["127.0.0.1"] * connections)
    # The counter's own callback may fall either side of a turn's work: two turns' worth at most.
    assert handled[-1] <= 2 * (4 * 16 + 2 * connections), handled[-5:]


async def test_many_addresses_together_handle_a_bounded_part_of_each_turn(socket_stack: Any) -> None:
    # 96 connections, four from each of 24 addresses (127.0.0.2 to 127.0.0.25). Each address
    # within its share (64 a turn, and four connections waiting their place 16 each), a turn
    # handled up to 24 x 128 of them (1,536 here). Now the addresses together handle four
    # addresses' worth (256), and each connection waiting its place is let in with its part of
    # that (a few messages, four of each address a turn; and the one its library hands it from
    # its read callback): about 400 in the busiest turn.
    addresses = [f"127.0.0.{n}" for n in range(2, 26) for _ in range(4)]
    handled = await _handled_per_turn(socket_stack, addresses)
    # Two turns' worth at most, as above.
    assert handled[-1] <= 2 * (16 * 16 + 4 * len(addresses)), handled[-5:]
async def test_connections_waiting_for_their_place_are_let_in_the_order_they_came() -> None:
    shares = TurnShares(2, wake=2)
    shares.spend("a", 2)
    waiters = [shares.wait("a") for _ in range(5)]
    other = shares.wait("b")
    waiters[1].cancel()  # a connection that closed while waiting gives up its place
    await asyncio.sleep(0)  # the next turn: the first two still waiting of each address
    assert waiters[0].done() and waiters[2].done() and not waiters[3].done() and other.done()
    await asyncio.sleep(0)
    assert waiters[3].done() and waiters[4].done() and not shares._waiting



def test_a_connection_waiting_on_one_threads_loop_has_its_place_whatever_another_loop_counts() -> None:
    # Two servers on event loops of two threads (a test suite's, an application's embedded one)
    # count in the same process-wide shares. A connection of one loop waiting for its place was
    # dropped by the other loop's next turn (taken for a waiter of a loop that had ended), and
    # its own loop's turn no longer woke anything: the connection waited for ever.
    shares = TurnShares(2)
    registered, other_turned = threading.Event(), threading.Event()
    outcome: list[object] = []

    async def waiting_loop() -> None:
        shares.spend("10.0.0.1", 2)
        waiter = shares.wait("10.0.0.1")
        registered.set()
        # Its loop is held (as by a long callback) while the other loop has a turn or two.
        assert other_turned.wait(10)
        try:
            await asyncio.wait_for(waiter, 5)
            outcome.append("placed")
        except TimeoutError:
            outcome.append("never placed")

    async def other_loop() -> None:
        assert registered.wait(10)
        for _ in range(3):
            shares.spend("10.0.0.2", 1)
            await asyncio.sleep(0)
        other_turned.set()

    threads = [threading.Thread(target=asyncio.run, args=(main(),)) for main in (waiting_loop, other_loop)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcome == ["placed"]
    assert not shares._waiting


def test_a_waiter_of_a_loop_that_ended_is_dropped_not_let_in_on_another() -> None:
    shares = TurnShares(1)
    left: list[asyncio.Future[int]] = []

    async def ends_waiting() -> None:
        shares.spend("a", 1)
        # The second's turn (one placed a turn) comes after its loop ended: never cancelled.
        left.extend((shares.wait("a"), shares.wait("a")))

    async def next_loop() -> None:
        shares.spend("a", 1)
        await asyncio.sleep(0)  # a turn of this loop

    loop = asyncio.new_event_loop()
    loop.run_until_complete(ends_waiting())
    loop.close()
    asyncio.run(next_loop())
    assert left[0].done() and not left[1].done() and not shares._waiting
