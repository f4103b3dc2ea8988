"""The process-wide budget of the bytes of inbound messages still being received
(``ServerConfig.max_receiving_total_bytes``, review 16 #3): the pure accounting of
``ClientFrameHeaders`` and ``ReceivingCharge``, then peers holding unfinished messages on every
socket transport, on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from typing import Any

import pytest

from dara_ws_core import ServerConfig
from dara_ws_core.exceptions import CloseCode
from dara_ws_core.transport import (
    PROCESS_RECEIVING,
    RECEIVING_ADDRESS_SHARES,
    RECEIVING_RESERVE,
    RECEIVING_SHARES,
    RECEIVING_SMALL,
    ClientFrameHeaders,
    ReceivingBudget,
    ReceivingCharge,
)

from . import test_hostile_transport
from .helpers import eventually
from .hostile import CLOSE, CONTINUATION, PING, PONG, TEXT, HostileClient, encode_frame, open_channel

KiB = 1024
#: The fixture ``async with socket_stack(config=...) as stack``, on every socket transport.
socket_stack = test_hostile_transport.socket_stack


def _charged(total: int = 16 * 64 * KiB, holder: object = "u") -> tuple[ClientFrameHeaders, ReceivingBudget]:
    budget = ReceivingBudget()
    return ClientFrameHeaders(ReceivingCharge(total, holder, budget)), budget


# ---------------------------------------------------------------------------- pure accounting


def test_a_message_that_arrives_whole_in_one_read_is_never_counted() -> None:
    frames, budget = _charged()
    small, large = encode_frame(TEXT, "x" * 100), encode_frame(TEXT, "y" * (40 * KiB))
    data = small + large + encode_frame(PING, b"p") + small
    assert frames.feed(data) == data
    assert (budget.bytes, budget.holders) == (0, {})


def test_a_single_frame_counts_its_declared_length_from_its_header_until_its_payload_is_in() -> None:
    frames, budget = _charged()
    frame = encode_frame(TEXT, "z" * (50 * KiB))
    assert frames.feed(frame[:10]) == frame[:10]  # the 64-bit header and some of the mask key
    assert budget.bytes == 50 * KiB and budget.holders == {"u": 50 * KiB}
    frames.feed(frame[10 : 30 * KiB])
    assert budget.bytes == 50 * KiB
    frames.feed(frame[30 * KiB :])  # the payload's end: given back
    assert (budget.bytes, budget.holders) == (0, {})


def test_fragments_count_until_the_final_one_has_all_arrived_and_controls_between_count_nothing() -> None:
    frames, budget = _charged()
    first = encode_frame(TEXT, "a" * 1000, fin=False)
    middle = encode_frame(CONTINUATION, "b" * 100, fin=False)  # small: counted too
    final = encode_frame(CONTINUATION, "c" * 2000)
    frames.feed(first + encode_frame(PING, b"between") + middle)
    assert budget.bytes == 1100
    frames.feed(final[:50])
    assert budget.bytes == 3100, "the final fragment, from its header"
    frames.feed(final[50:])
    assert budget.bytes == 0
    frames.feed(encode_frame(TEXT, "d" * 10, fin=False))  # the next message starts afresh
    assert budget.bytes == 10
    frames.release()  # the connection ends
    assert (budget.bytes, budget.holders) == (0, {})


def test_a_frame_past_the_holders_share_is_refused_at_its_header_with_1009() -> None:
    share = 64 * KiB
    frames, budget = _charged(total=RECEIVING_SHARES * share)
    first = encode_frame(TEXT, "a" * (60 * KiB), fin=False)
    over = encode_frame(CONTINUATION, "b" * (8 * KiB))
    assert frames.feed(first + over[:20]) == first, "nothing of the refused frame reaches the library"
    assert (frames.refused_code, frames.refused) == (1009, "messages being received exceed their budget")
    assert (budget.bytes, budget.holders) == (0, {}), "refused: the connection's bytes are given back"
    failing, _ = _charged(total=RECEIVING_SHARES * share)
    out = failing.feed_failing(first + over)
    assert out.startswith(first) and out[len(first) :][:2] == b"\x81\xff", "a header over any max_size"


def test_holders_share_and_the_process_budget_bound_connections_together() -> None:
    budget = ReceivingBudget()
    total = RECEIVING_SHARES * 10_000
    alice = [ReceivingCharge(total, "alice", budget) for _ in range(3)]
    assert alice[0].take(6000) and alice[1].take(4000)
    assert not alice[2].take(1), "alice's connections share one share"
    others = [ReceivingCharge(total, f"u{i}", budget) for i in range(RECEIVING_SHARES - 1)]
    # The last 16th (the reserve) takes no holder's 10,000 bytes: 14 more fit, not 15.
    assert [charge.take(10_000) for charge in others] == [True] * (RECEIVING_SHARES - 2) + [False]
    assert budget.bytes == total - total // RECEIVING_RESERVE
    small = 10_000 // RECEIVING_SMALL
    smalls = [ReceivingCharge(total, f"small{i}", budget) for i in range(RECEIVING_SMALL + 1)]
    fit = total // RECEIVING_RESERVE // small  # small messages of others, there
    assert [charge.take(small) for charge in smalls] == [True] * fit + [False] * (len(smalls) - fit)
    assert not ReceivingCharge(total, "late", budget).take(small), "the process's budget is full"
    del smalls
    alice[0].release()
    late = ReceivingCharge(total, "late", budget)
    assert late.take(6000)
    del others
    assert budget.holders.keys() == {"alice", "late"}, "a charge dropped without release gives back"


def test_the_budgets_last_part_is_kept_for_holders_and_addresses_holding_little() -> None:
    # Peers from 16 addresses, within every share, fill what the budget has outside its
    # reserve; there only a small message of a holder, and of an address, holding little is
    # taken. Before, they filled it all, and every message that did not arrive in one read was
    # refused with 1009.
    budget = ReceivingBudget()
    total = RECEIVING_SHARES * 64 * KiB
    share, address_share = total // RECEIVING_SHARES, total // RECEIVING_ADDRESS_SHARES
    peers = [ReceivingCharge(total, f"peer{i}", budget, address=f"192.0.2.{i}") for i in range(16)]
    assert [peer.take(share) for peer in peers] == [True] * 15 + [False]
    assert budget.bytes == total - total // RECEIVING_RESERVE
    bystander = ReceivingCharge(total, "bystander", budget, address="198.51.100.1")
    assert not bystander.take(share // RECEIVING_SMALL + 1), "a big message is not taken in the reserve"
    assert bystander.take(share // RECEIVING_SMALL), "a small one is"
    assert not bystander.take(1), "nor another byte of that holder"
    # An address holding more than a 64th of its share has no part of the reserve, whoever holds.
    crowd = [ReceivingCharge(total, f"crowd{i}", budget, address="203.0.113.1") for i in range(5)]
    parts = address_share // share
    assert [charge.take(share // RECEIVING_SMALL) for charge in crowd] == [True] * parts + [False]
    for charge in (*peers, bystander, *crowd):
        charge.release()
    assert budget.bytes == 0 and not budget.holders


# ---------------------------------------------------------------------------- live, every transport


async def _outcome(client: HostileClient, timeout: float = 10.0) -> int | None:
    """The close code the server sends (pings answered meanwhile), or ``None`` if it sends
    none within ``timeout`` seconds (the connection is served)."""
    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        async with asyncio.timeout(timeout):
            for _ in range(100):
                frame = await client.read_frame(timeout=timeout)
                if frame.opcode == CLOSE:
                    return frame.close_code
    return None


async def _channel_from(local: str, port: int, user: str) -> HostileClient:
    """A raw client from the loopback address ``local``, past its handshake as ``user``."""
    client = await HostileClient.open(port, local=local)
    response = await client.handshake(f"/api/core/ws?token={user}:s1")
    assert response.status == 101, response
    assert json.loads((await client.read_frame()).text)["type"] == "init"
    return client


async def _ping(client: HostileClient) -> str:
    """The type of the server's answer to a protocol ping from ``client``."""
    client.write(encode_frame(TEXT, json.dumps({"type": "ping", "message": None})))
    frame = await client.read_frame()
    assert frame.opcode == TEXT, frame
    return str(json.loads(frame.text)["type"])


@pytest.mark.parametrize("shape", ["fragments", "one-frame"])
async def test_peers_holding_unfinished_messages_past_the_budget_get_1009_and_a_bystander_is_served(
    socket_stack: Any, shape: str, request: pytest.FixtureRequest
) -> None:
    # A budget of 1 MiB (64 KiB a user); 24 users each start a 62 KiB message and never finish
    # it: 15 of them fit (the last 16th is kept for small messages), the others are closed
    # with 1009 as their bytes come, and the server
    # holds about the budget, not 24 messages. The bystander's small messages are served.
    config = ServerConfig(max_receiving_total_bytes=1024 * KiB, ping_interval=None, idle_timeout=None)
    async with socket_stack(config=config) as stack:
        if shape == "one-frame" and stack.transport == "picows":
            # Known limitation, kept visible (a strict xfail turns red the day it holds).
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=(
                "picows gathers a single frame in its own read buffer, which the budget does not see "
                "(see docs/deployment.md)")))
        assert stack.port is not None
        bystander, _ = await open_channel(stack.port, path="/api/core/ws?token=bystander:s1")
        # From six addresses, four users each: what one address may hold (a quarter) is not
        # what this test is about.
        peers = [await _channel_from(f"127.0.0.{2 + i % 6}", stack.port, f"u{i}") for i in range(24)]
        payload = '{"type":"ping","message":"' + "x" * (62 * KiB)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for peer in peers:
                if shape == "fragments":
                    for start in range(0, len(payload), 10 * KiB):
                        peer.write(encode_frame(CONTINUATION if start else TEXT, payload[start : start + 10 * KiB],
                                                fin=False))
                else:  # a whole message's frame, its payload cut short
                    peer.write(encode_frame(TEXT, payload + '"}')[: len(payload) // 2])
                await peer.drain()
                assert await _ping(bystander) == "pong"
            outcomes = await asyncio.gather(*(_outcome(peer, 3.0) for peer in peers))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # Which ones fit depends on the order the server reads them in, not how many.
        assert sorted(outcomes, key=str) == [CloseCode.MESSAGE_TOO_BIG] * 9 + [None] * 15, outcomes
        assert held < 3 * 1024 * KiB, f"{held} bytes held: about the budget, not 24 x 62 KiB"
        assert PROCESS_RECEIVING.bytes > 0
        # A held message completed is served, and what it held is given back.
        if shape == "fragments":
            held_one = peers[outcomes.index(None)]
            held_one.write(encode_frame(CONTINUATION, '"}'))
            frame = await held_one.read_frame()
            assert frame.opcode == TEXT and json.loads(frame.text)["type"] == "pong"
        assert await _ping(bystander) == "pong"
        for peer in peers:
            peer.abort()
        await eventually(lambda: PROCESS_RECEIVING.bytes == 0 and not PROCESS_RECEIVING.holders,
                         "every connection's bytes given back once it is gone", timeout=10)
        bystander.abort()


async def test_one_user_past_its_share_is_refused_while_others_still_fit(socket_stack: Any) -> None:
    config = ServerConfig(max_receiving_total_bytes=1024 * KiB, ping_interval=None, idle_timeout=None)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        mine = [(await open_channel(stack.port, path=f"/api/core/ws?token=greedy:s{i}"))[0] for i in range(2)]
        for client in mine:  # 2 x 40 KiB: past the 64 KiB a user may hold
            client.write(encode_frame(TEXT, "x" * (40 * KiB), fin=False))
            await client.drain()
        assert [await _outcome(mine[0], 1.0), await _outcome(mine[1])] == [None, CloseCode.MESSAGE_TOO_BIG]
        other, _ = await open_channel(stack.port, path="/api/core/ws?token=other:s1")
        other.write(encode_frame(TEXT, '{"type":"ping","message":"' + "y" * (40 * KiB), fin=False))
        other.write(encode_frame(PING, b"still-read"))
        frame = await other.read_frame()
        assert (frame.opcode, frame.payload) == (PONG, b"still-read")
        other.write(encode_frame(CONTINUATION, '"}'))
        assert json.loads((await other.read_frame()).text)["type"] == "pong"
        for client in (*mine, other):
            client.abort()
        await eventually(lambda: PROCESS_RECEIVING.bytes == 0, "given back", timeout=10)


async def test_the_users_of_one_address_cannot_hold_the_budget_that_others_messages_need(socket_stack: Any) -> None:
    # A budget of 1 MiB: 64 KiB a user, 256 KiB an address. One client names 16 users (free
    # where the authenticator lets anyone name themselves) and starts a 62 KiB message with each,
    # never finishing them: it held 992 KiB, and a bystander's 60 KiB message in parts was
    # refused with 1009. Now four of its messages fit, the rest are refused, and the bystander,
    # from another address, is served.
    config = ServerConfig(max_receiving_total_bytes=1024 * KiB, ping_interval=None, idle_timeout=None)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        names = [await _channel_from("127.0.0.1", stack.port, f"name{i}") for i in range(16)]
        payload = '{"type":"ping","message":"' + "x" * (62 * KiB)
        for client in names:
            for start in range(0, len(payload), 16 * KiB):
                client.write(encode_frame(CONTINUATION if start else TEXT, payload[start : start + 16 * KiB],
                                          fin=False))
            await client.drain()
        outcomes = await asyncio.gather(*(_outcome(client, 2.0) for client in names))
        bystander = await _channel_from("127.0.0.2", stack.port, "bystander")
        message = '{"type":"ping","message":"' + "y" * (60 * KiB) + '"}'
        for start in range(0, len(message), 10 * KiB):
            final = start + 10 * KiB >= len(message)
            bystander.write(encode_frame(CONTINUATION if start else TEXT, message[start : start + 10 * KiB],
                                         fin=final))
            await bystander.drain()
        frame = await bystander.read_frame()
        assert (frame.opcode, frame.close_code if frame.opcode == CLOSE else json.loads(frame.text)["type"]) == (
            TEXT, "pong")
        assert sorted(outcomes, key=str) == [CloseCode.MESSAGE_TOO_BIG] * 12 + [None] * 4, outcomes
        for client in (*names, bystander):
            client.abort()
        await eventually(lambda: PROCESS_RECEIVING.bytes == 0 and not PROCESS_RECEIVING.holders,
                         "every connection's bytes given back once it is gone", timeout=10)


def test_the_connections_of_one_address_share_a_quarter_whatever_users_they_name() -> None:
    budget = ReceivingBudget()
    total = RECEIVING_SHARES * 10_000
    quarter = total // RECEIVING_ADDRESS_SHARES
    names = [ReceivingCharge(total, f"name{i}", budget, address="192.0.2.1") for i in range(8)]
    taken = [charge.take(10_000) for charge in names]
    assert taken == [True] * (quarter // 10_000) + [False] * (8 - quarter // 10_000)
    other = ReceivingCharge(total, "other", budget, address="192.0.2.2")
    assert other.take(10_000), "another address has room"
    anonymous = ReceivingCharge(total, ("address", "192.0.2.1"), budget, address="192.0.2.1")
    assert not anonymous.take(1), "an anonymous holder of the full address too"
    names[0].release()
    assert anonymous.take(10_000)
    for charge in (*names, other, anonymous):
        charge.release()
    assert budget.bytes == 0 and not budget.holders


async def test_anonymous_clients_behind_a_trusted_proxy_are_held_each_to_its_own_share(socket_stack: Any) -> None:
    # A budget of 1 MiB (64 KiB a holder). Behind a proxy named in forwarded_allow_ips, every
    # anonymous client's socket comes from the proxy: their messages in progress were charged
    # together, under the proxy's address, to one 16th of the budget, so one guest holding a
    # 40 KiB message in parts got every other guest's next one refused with 1009. Each is now
    # held under the address its X-Forwarded-For names, as its chunk and thread shares are.
    from dara_ws_core import allow_anonymous

    config = ServerConfig(max_receiving_total_bytes=1024 * KiB, ping_interval=None, idle_timeout=None,
                          forwarded_allow_ips="127.0.0.1")
    async with socket_stack(config=config, authenticator=allow_anonymous()) as stack:
        assert stack.port is not None
        guests = []
        for i in range(2):
            guest = await HostileClient.open(stack.port)
            response = await guest.handshake("/api/core/ws", [("X-Forwarded-For", f"203.0.113.{i + 1}")])
            assert response.status == 101, response
            assert json.loads((await guest.read_frame()).text)["type"] == "init"
            guests.append(guest)
        for guest in guests:  # 2 x 40 KiB: one holder's 64 KiB if they were one
            guest.write(encode_frame(TEXT, '{"type":"ping","message":"' + "x" * (40 * KiB), fin=False))
            await guest.drain()
        assert [await _outcome(guest, 1.0) for guest in guests] == [None, None]
        for guest in guests:
            guest.write(encode_frame(CONTINUATION, '"}'))
            assert json.loads((await guest.read_frame()).text)["type"] == "pong"
            guest.abort()
        await eventually(lambda: PROCESS_RECEIVING.bytes == 0 and not PROCESS_RECEIVING.holders,
                         "given back", timeout=10)


async def test_clients_from_many_addresses_leave_the_budgets_reserve_to_small_messages(socket_stack: Any) -> None:
    # A budget of 1 MiB (64 KiB a user, 256 KiB an address). 24 clients, each from its own
    # address (127.0.0.2 to 127.0.0.25), start a 64 KiB message and never finish it: every
    # share holds, but 16 of them held the whole budget, and a bystander's 1 KiB message in two
    # fragments was refused with 1009. Now 15 fit, the last 16th of the budget is kept for
    # messages under a 64th of a share (1 KiB), and the bystander's 1 KiB message in parts is
    # served.
    config = ServerConfig(max_receiving_total_bytes=1024 * KiB, ping_interval=None, idle_timeout=None)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        bystander = await _channel_from("127.0.0.1", stack.port, "bystander")
        peers = [await _channel_from(f"127.0.0.{2 + i}", stack.port, f"u{i}") for i in range(24)]
        for peer in peers:
            start = '{"type":"ping","message":"'
            peer.write(encode_frame(TEXT, start + "x" * (64 * KiB - len(start)), fin=False))  # a user's share
            await peer.drain()
            assert await _ping(bystander) == "pong"  # read: what it holds is counted
        outcomes = await asyncio.gather(*(_outcome(peer, 2.0) for peer in peers))
        message = '{"type":"ping","message":"' + "y" * (KiB - 40) + '"}'
        half = len(message) // 2
        bystander.write(encode_frame(TEXT, message[:half], fin=False))
        bystander.write(encode_frame(PING, b"first-part-read"))
        frame = await bystander.read_frame()
        assert (frame.opcode, frame.payload) == (PONG, b"first-part-read"), frame
        bystander.write(encode_frame(CONTINUATION, message[half:]))
        frame = await bystander.read_frame()
        assert (frame.opcode, frame.close_code if frame.opcode == CLOSE else json.loads(frame.text)["type"]) == (
            TEXT, "pong")
        assert outcomes.count(None) == 15, outcomes
        for client in (*peers, bystander):
            client.abort()
        await eventually(lambda: PROCESS_RECEIVING.bytes == 0 and not PROCESS_RECEIVING.holders,
                         "every connection's bytes given back once it is gone", timeout=10)
