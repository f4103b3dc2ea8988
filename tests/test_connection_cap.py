"""``ServerConfig.max_connections`` (review 10, item 11): one host opening connections in a loop
took every file descriptor of the process, and asyncio then logged a traceback for each socket it
failed to accept. With a cap, a handshake beyond it is refused with 503 and ``Retry-After`` on
every socket transport, the connections already open are unharmed, and a freed slot lets the
next client in."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket

import pytest

from dara_ws_core import (
    Admission,
    ConnectionSlots,
    Endpoint,
    Evict,
    ServerConfig,
    WebsocketManager,
    allow_anonymous,
    connection_cap,
    host_of,
    quiet_accept_errors,
)

from .helpers import eventually
from .hostile import TOKEN_PATH, HostileClient, open_channel
from .stacks import TRANSPORTS, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
CAP = 5


def test_slots_admit_up_to_the_cap_then_refuse_a_few_then_drop() -> None:
    slots = ConnectionSlots(CAP)
    assert [slots.take() for _ in range(CAP)] == [Admission.ADMIT] * CAP
    refused = [slots.take() for _ in range(slots.refusing_limit)]
    assert refused == [Admission.REFUSE] * slots.refusing_limit
    assert slots.take() is Admission.DROP  # enough refused sockets wait for their 503
    slots.release(Admission.REFUSE)
    assert slots.take() is Admission.REFUSE
    slots.release(Admission.ADMIT)
    assert slots.take() is Admission.ADMIT
    assert (slots.admitted, slots.refusing) == (CAP, slots.refusing_limit)


def test_slots_per_address_refuse_one_host_and_admit_another() -> None:
    slots = ConnectionSlots(None, per_address=2)
    assert [slots.take("10.0.0.1") for _ in range(3)] == [Admission.ADMIT] * 2 + [Admission.REFUSE_ADDRESS]
    assert slots.take("10.0.0.2") is Admission.ADMIT
    assert slots.take(None) is Admission.ADMIT  # no address (a Unix socket): only the cap applies
    slots.release(Admission.ADMIT, "10.0.0.1")
    assert slots.take("10.0.0.1") is Admission.ADMIT
    for _ in range(3):
        slots.release(Admission.ADMIT, "10.0.0.1")  # one more than held: never below zero
    slots.release(Admission.ADMIT, "10.0.0.2")
    assert slots.by_address == {}  # no entry left for hosts that hold nothing


def test_an_ipv6_host_counts_as_its_64_network() -> None:
    # An IPv6 client usually holds a whole /64: counted per address, it would take a fresh one
    # for each connection and never reach max_connections_per_address (nor its log share).
    same = {host_of((f"2001:db8:1:2:{i:x}::{i:x}", 443, 0, 0)) for i in range(1, 50)}
    assert same == {"2001:db8:1:2::/64"}
    assert host_of(("2001:db8:1:3::1", 443, 0, 0)) == "2001:db8:1:3::/64"
    assert host_of(("fe80::1%eth0", 443, 0, 2)) == "fe80::/64"
    assert host_of(("::ffff:10.0.0.7", 443, 0, 0)) == "10.0.0.7"  # an IPv4 client on a dual stack
    assert host_of(("10.0.0.7", 443)) == "10.0.0.7"
    assert host_of(["::1", 443]) == "::/64"
    assert host_of(("not:an:address", 1)) == "not:an:address"
    assert host_of(None) is None and host_of("/tmp/sock") is None
    slots = ConnectionSlots(None, per_address=2)
    takes = [slots.take(host_of((f"2001:db8::{i:x}", 1, 0, 0))) for i in range(1, 4)]
    assert takes == [Admission.ADMIT] * 2 + [Admission.REFUSE_ADDRESS]


def test_slots_without_a_cap_admit_everyone() -> None:
    slots = ConnectionSlots(None)
    assert all(slots.take() is Admission.ADMIT for _ in range(100_000))


def test_the_cap_leaves_headroom_under_the_open_files_limit() -> None:
    assert connection_cap(1024) == 768  # 256 descriptors kept
    assert connection_cap(20_000) == 18_000  # a tenth kept
    assert connection_cap(100) == 64  # never below 64
    assert all(connection_cap(n) < n for n in range(65, 100_000, 97))


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ServerConfig(max_connections=0)
    assert ServerConfig().max_connections is None  # the library's default: no cap


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_handshake_beyond_max_connections_gets_503_and_a_freed_slot_lets_the_next_in(
    transport: str,
) -> None:
    async with running_stack(transport, ServerConfig(max_connections=CAP, ping_interval=None)) as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        assert stack.port is not None
        clients = [await stack.client(f"u{i}:s") for i in range(CAP)]
        extra = await HostileClient.open(stack.port)
        try:
            response = await extra.handshake(TOKEN_PATH)
            assert response.status == 503, response
            assert dict(response.headers).get("Retry-After", dict(response.headers).get("retry-after")) == "5"
        finally:
            await extra.close()
        assert stack.manager.stats().handshakes_rejected.get("full", 0) >= 1
        # The connections already open are unharmed.
        assert await clients[0].request("echo", 42, timeout=5) == 42
        await clients[-1].close()
        # Once its socket is gone, a slot is free again (the refused socket's too).
        await eventually(lambda: stack.endpoint.slots.admitted < CAP and not stack.endpoint.slots.refusing,
                         "the closed connection's slot freed")
        newcomer, _ = await open_channel(stack.port)
        await newcomer.close()
        assert await clients[1].request("echo", "still here", timeout=5) == "still here"


@pytest.mark.parametrize("transport", SOCKETS)
async def test_one_address_beyond_its_share_gets_503_while_another_gets_in(transport: str) -> None:
    from dara_ws_websockets import connect

    config = ServerConfig(max_connections_per_address=2, ping_interval=None)
    async with running_stack(transport, config) as stack:
        assert stack.port is not None
        held = [(await open_channel(stack.port))[0] for _ in range(2)]  # from 127.0.0.1
        try:
            extra = await HostileClient.open(stack.port)
            try:
                response = await extra.handshake(TOKEN_PATH)
                assert response.status == 503, response
            finally:
                await extra.close()
            assert stack.manager.stats().handshakes_rejected.get("address", 0) >= 1
            # Another host (every 127/8 address is this machine) has its own share.
            other = await connect(f"ws://127.0.0.1:{stack.port}{TOKEN_PATH}", local_addr=("127.0.0.2", 0),
                                  close_timeout=1)
            await other.close()
        finally:
            for client in held:
                await client.close()


def test_slots_evict_the_oldest_socket_still_in_its_handshake_never_a_settled_one() -> None:
    slots = ConnectionSlots(4)
    evict = [lambda i=i: True for i in range(8)]
    assert [slots.take(None, evict[i]) for i in range(4)] == [Admission.ADMIT] * 4
    slots.settle(evict[0])  # its request is whole: a client now, never evicted
    assert slots.victim(None) == (evict[1], Admission.ADMIT, None)  # the oldest still waiting
    slots.evicted(evict[1], Admission.ADMIT, None)
    assert slots.take(None, evict[4]) is Admission.ADMIT and slots.admitted == 4
    slots.release(Admission.ADMIT, None, evict[1])  # the evicted socket's own end: counted once
    assert slots.admitted == 4
    for i in (2, 3, 4):
        slots.settle(evict[i])
    assert slots.victim(None) is None  # only clients: the newcomer is refused (503)
    assert slots.take(None, evict[5]) is Admission.REFUSE
    for i in (0, 2, 3, 4):
        slots.release(Admission.ADMIT, None, evict[i])
    slots.release(Admission.REFUSE, None, evict[5])
    assert (slots.admitted, slots.refusing, slots.waiting, slots.by_address) == (0, 0, 0, {})


def test_slots_refused_sockets_waiting_make_room_for_newer_ones() -> None:
    slots = ConnectionSlots(1)
    assert slots.take(None) is Admission.ADMIT  # a client (no evict: never a victim)
    evict = [lambda i=i: True for i in range(slots.refusing_limit + 1)]
    assert {slots.take(None, key) for key in evict[:-1]} == {Admission.REFUSE}
    victim = slots.victim(None)
    assert victim == (evict[0], Admission.REFUSE, None)  # rather than the newcomer closed unread
    slots.evicted(*victim)
    assert slots.take(None, evict[-1]) is Admission.REFUSE and slots.refusing == slots.refusing_limit


def test_slots_drop_a_socket_no_answer_can_reach_and_evict_no_refused_one_for_it() -> None:
    # A TLS socket counted from its TCP accept, before its TLS handshake: no 503 can reach it,
    # so over a bound it is closed at once, and a refused socket waiting for its 503 does not
    # go to make room for it (it would be dropped all the same).
    slots = ConnectionSlots(2, per_address=1)
    assert slots.take("10.0.0.1", answerable=False) is Admission.ADMIT
    assert slots.take("10.0.0.1", answerable=False) is Admission.DROP  # its address is full
    assert slots.take("10.0.0.2", answerable=False) is Admission.ADMIT
    assert slots.take("10.0.0.3", answerable=False) is Admission.DROP  # the process is full
    assert (slots.admitted, slots.refusing) == (2, 0)  # nothing waits for an answer
    slots = ConnectionSlots(1)
    assert slots.take(None) is Admission.ADMIT  # a client (no evict: never a victim)
    evict = [lambda i=i: True for i in range(slots.refusing_limit)]
    assert {slots.take(None, key) for key in evict} == {Admission.REFUSE}
    assert slots.victim(None, answerable=False) is None
    assert slots.victim(None) == (evict[0], Admission.REFUSE, None)  # for one that can be answered


def test_slots_name_the_sockets_no_answer_can_reach_yet_for_a_shutdown_to_close() -> None:
    # The TLS sockets still in their TLS handshake, and only those: a plain socket waiting for
    # its request, or a TLS one handed over (settled) or gone, is not named.
    slots = ConnectionSlots(8, per_address=4)
    evict = [lambda i=i: True for i in range(5)]
    for i in range(3):
        assert slots.take("10.0.0.1", evict[i], answerable=False) is Admission.ADMIT
    assert slots.take("10.0.0.2", evict[3]) is Admission.ADMIT  # a plain socket, waiting
    assert slots.take("10.0.0.2", evict[4], answerable=False) is Admission.ADMIT
    slots.settle(evict[1])  # its TLS handshake done
    slots.release(Admission.ADMIT, "10.0.0.1", evict[2])  # gone
    victims = slots.unanswerable()
    assert victims == [(evict[0], Admission.ADMIT, "10.0.0.1"), (evict[4], Admission.ADMIT, "10.0.0.2")]
    assert slots.unanswerable() == []  # no longer waiting
    for victim in victims:
        slots.evicted(*victim)
        slots.release(Admission.ADMIT, victim[2], victim[0])  # their own end: counted once
    slots.release(Admission.ADMIT, "10.0.0.1", evict[1])
    slots.release(Admission.ADMIT, "10.0.0.2", evict[3])
    assert (slots.admitted, slots.refusing, slots.waiting, slots.by_address) == (0, 0, 0, {})


def test_slots_a_full_address_evicts_its_own_waiting_sockets_only() -> None:
    slots = ConnectionSlots(8, per_address=2)
    a, b = [lambda: True, lambda: True], [lambda: True, lambda: True]
    assert [slots.take("10.0.0.1", key) for key in a] == [Admission.ADMIT] * 2
    assert slots.take("10.0.0.2", b[0]) is Admission.ADMIT
    assert slots.victim("10.0.0.1") == (a[0], Admission.ADMIT, "10.0.0.1")  # not 10.0.0.2's
    slots.settle(a[1])
    assert slots.victim("10.0.0.1") is None  # its other socket is a client: 503 for the newcomer
    assert slots.victim("10.0.0.3") is None  # the process is not full: nothing to evict


def test_a_full_process_evicts_from_the_address_waiting_most_and_a_lone_handshake_last() -> None:
    # Review 17 (6): the globally oldest waiting socket went, so a few addresses opening silent
    # sockets in a loop evicted every client whose request took a round trip to arrive.
    slots = ConnectionSlots(6, per_address=4)
    keys = {name: [lambda: True for _ in range(4)] for name in ("client", "a", "b")}
    assert slots.take("10.0.0.1", keys["client"][0]) is Admission.ADMIT  # the oldest of all
    assert [slots.take("10.0.0.2", key) for key in keys["a"][:3]] == [Admission.ADMIT] * 3
    assert [slots.take("10.0.0.3", key) for key in keys["b"][:2]] == [Admission.ADMIT] * 2
    order = []
    for i in range(6):
        victim = slots.victim(f"10.0.1.{i}")
        assert victim is not None
        slots.evicted(*victim)
        order.append(victim[2])
        assert slots.take(f"10.0.1.{i}") is Admission.ADMIT  # a newcomer that settles at once
    # 10.0.0.2 held the most, then both held two (the first to get there goes first); once every
    # address holds one, the oldest overall: the client, taken first, then the others in turn.
    assert order == ["10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert slots.victim("10.0.1.9") is None and slots.waiting == 0


def test_the_most_crowded_address_is_tracked_through_any_takes_settles_and_evictions() -> None:
    rng = random.Random(17)
    slots = ConnectionSlots(24, per_address=8)
    held: list[tuple[Admission, str | None, Evict | None]] = []
    for _ in range(3000):
        address = rng.choice(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", None])
        step = rng.random()
        if step < 0.5:
            evict = (lambda: True) if rng.random() < 0.8 else None
            victim = slots.victim(address)
            if victim is not None:
                waited = {len(keys) for keys in slots._waiting_at.values()}
                # The victim's address held the most (now one fewer), or the address was full.
                assert victim[2] == address or len(slots._waiting_at.get(victim[2], ())) + 1 >= max(waited, default=0)
                slots.evicted(*victim)
            held.append((slots.take(address, evict), address, evict))
        elif step < 0.75 and held:
            if (key := rng.choice(held)[2]) is not None:
                slots.settle(key)
        elif held:
            slots.release(*held.pop(rng.randrange(len(held))))
        counts = {owner: len(keys) for owner, keys in slots._waiting_at.items()}
        assert slots._most == max(counts.values(), default=0)
        assert {n: set(crowd) for n, crowd in slots._crowds.items()} == {
            n: {owner for owner, count in counts.items() if count == n} for n in set(counts.values())}
    for socket_ in held:
        slots.release(*socket_)
    assert (slots.admitted, slots.refusing, slots.waiting, slots._most) == (0, 0, 0, 0)
    assert slots._crowds == {} and slots._waiting_at == {} and slots.by_address == {}


async def _bare_sockets(port: int, count: int) -> list[HostileClient]:
    """``count`` sockets connected in turn that never finish their request: every other one
    sends nothing, the others the start of a request head."""
    sockets = []
    for i in range(count):
        sockets.append(client := await HostileClient.open(port))
        if i % 2:
            client.write(b"GET /api/core/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web")
    return sockets


def test_a_socket_busy_when_asked_to_make_room_keeps_its_slot() -> None:
    endpoint = Endpoint(WebsocketManager(ServerConfig(max_connections=2)), allow_anonymous())
    asked: list[str] = []

    def busy() -> bool:  # a request is being served on it after all
        asked.append("busy")
        return False

    def idle() -> bool:
        asked.append("idle")
        return True

    assert endpoint.take_slot(None, busy) is Admission.ADMIT
    assert endpoint.take_slot(None, idle) is Admission.ADMIT
    assert endpoint.take_slot(None) is Admission.ADMIT  # the older, busy one is passed over
    assert asked == ["busy", "idle"]
    assert endpoint.take_slot(None) is Admission.REFUSE  # the busy one is no victim any more
    assert asked == ["busy", "idle"]
    assert endpoint.manager.stats().handshakes_rejected == {"evicted": 1, "full": 1}


@pytest.mark.parametrize("transport", SOCKETS)
async def test_sockets_that_send_nothing_never_keep_a_client_out(transport: str) -> None:
    # Review 12 (4): a host holding max_connections sockets without a byte sent (or part of a
    # request) locked every client out, and aiohttp and uvicorn did not count them at all (descriptors ran out).
    cap = 8
    config = ServerConfig(max_connections=cap, ping_interval=None)
    async with running_stack(transport, config) as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        assert stack.port is not None
        slots = stack.endpoint.slots

        def evicted() -> int:
            return stack.manager.stats().handshakes_rejected.get("evicted", 0)

        bare = await _bare_sockets(stack.port, 3 * cap)
        try:
            # Counted from their accept: past the cap, the oldest silent ones make room.
            await eventually(lambda: evicted() == 2 * cap, "the oldest silent sockets evicted")
            assert (slots.admitted, slots.refusing) == (cap, 0)
            for old in bare[:2 * cap]:
                assert await old.wait_disconnected(5.0)
            # A client that completes its handshake gets in: the oldest silent socket goes.
            client = await stack.client("u1:s")
            assert await client.request("echo", 1, timeout=5) == 1
            assert await bare[2 * cap].wait_disconnected(5.0)
            assert evicted() == 2 * cap + 1
            # More silent sockets evict silent ones only (the cap - 1 left, then the oldest of
            # their own), never the client.
            more = await _bare_sockets(stack.port, cap)
            try:
                await eventually(lambda: evicted() == 3 * cap + 1, "every earlier silent socket evicted")
                assert await client.request("echo", 2, timeout=5) == 2
                assert slots.admitted == cap
            finally:
                for extra in more:
                    await extra.close()
        finally:
            for socket_ in bare:
                await socket_.close()
        await eventually(lambda: slots.admitted == 1 and not slots.refusing and not slots.waiting,
                         "every silent socket's slot freed, the client's kept")


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_slow_client_gets_in_while_a_few_addresses_flood_silent_sockets(transport: str) -> None:
    # Review 17 (6): with the process full, each new silent socket evicted the oldest waiting
    # one, so a client whose request came a round trip after its connect (as over TLS, or a
    # slow link) was evicted before it arrived. The attackers' addresses now evict their own.
    cap = 12
    attackers = [f"127.0.0.{i}" for i in range(2, 6)]
    config = ServerConfig(max_connections=cap, max_connections_per_address=cap // 4, ping_interval=None)
    async with running_stack(transport, config) as stack:
        assert stack.port is not None
        slots = stack.endpoint.slots

        def evicted() -> int:
            return stack.manager.stats().handshakes_rejected.get("evicted", 0)

        flood: list[HostileClient] = []
        try:
            for i in range(cap):  # the process full of silent sockets
                flood.append(await HostileClient.open(stack.port, local=attackers[i % len(attackers)]))
            await eventually(lambda: slots.admitted == cap, "the silent sockets counted")
            slow = await HostileClient.open(stack.port)  # from 127.0.0.1: its request comes later
            flood.append(slow)
            await eventually(lambda: evicted() == 1 and "127.0.0.1" in slots.by_address, "the slow client admitted")
            for i in range(3 * cap):  # every socket waiting when it came is evicted ~three times over
                flood.append(await HostileClient.open(stack.port, local=attackers[i % len(attackers)]))
            await eventually(lambda: evicted() == 1 + 3 * cap, "the flood's evictions")
            assert not slow.lost
            response = await slow.handshake(TOKEN_PATH)
            assert response.status == 101, response
            assert await stack.client("u1:s") is not None  # a prompt client gets in too
        finally:
            for socket_ in flood:
                await socket_.close()


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_full_address_makes_room_from_its_own_silent_sockets(transport: str) -> None:
    from dara_ws_websockets import connect

    config = ServerConfig(max_connections=16, max_connections_per_address=4, ping_interval=None)
    async with running_stack(transport, config) as stack:
        assert stack.port is not None
        slots = stack.endpoint.slots
        bare = await _bare_sockets(stack.port, 8)  # from 127.0.0.1
        try:
            await eventually(lambda: stack.manager.stats().handshakes_rejected.get("evicted", 0) == 4,
                             "the address's oldest silent sockets evicted")
            assert slots.by_address == {"127.0.0.1": 4}
            # A client of the same host gets in past its own silent sockets, another host's too.
            mine, _ = await open_channel(stack.port)
            other = await connect(f"ws://127.0.0.1:{stack.port}{TOKEN_PATH}", local_addr=("127.0.0.2", 0),
                                  close_timeout=1)
            assert slots.by_address == {"127.0.0.1": 4, "127.0.0.2": 1}
            assert stack.manager.stats().handshakes_rejected.get("evicted", 0) == 5
            await other.close()
            await mine.close()
        finally:
            for socket_ in bare:
                await socket_.close()


@pytest.mark.parametrize("transport", SOCKETS)
async def test_refused_silent_sockets_make_room_for_newer_ones(transport: str) -> None:
    # Once every slot holds a client, a host's silent sockets take the refused ones' places
    # only until newer ones come: the newest get their 503, the oldest are closed.
    config = ServerConfig(max_connections=1, ping_interval=None)
    async with running_stack(transport, config) as stack:
        assert stack.port is not None
        slots = stack.endpoint.slots
        client, _ = await open_channel(stack.port)
        try:
            bare = await _bare_sockets(stack.port, slots.refusing_limit + 3)
            try:
                await eventually(lambda: stack.manager.stats().handshakes_rejected.get("evicted", 0) == 3,
                                 "the oldest refused silent sockets evicted")
                assert slots.refusing == slots.refusing_limit
                for old in bare[:3]:
                    assert await old.wait_disconnected(5.0)
                response = await bare[-1].handshake(TOKEN_PATH)
                assert response.status == 503, response
            finally:
                for socket_ in bare:
                    await socket_.close()
        finally:
            await client.close()
        await eventually(lambda: not slots.admitted and not slots.refusing and not slots.waiting,
                         "every slot freed")


async def test_accept_errors_are_logged_as_one_line_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop, interval=60.0)
    caplog.set_level(logging.ERROR)
    error = OSError(errno.EMFILE, "Too many open files")
    listener = socket.socket()
    try:
        for _ in range(500):  # what asyncio's accept loop reports for each failed accept()
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": error, "socket": listener})
        loop.call_exception_handler({"message": "something else"})
    finally:
        listener.close()
        loop.set_exception_handler(None)
    accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(accept) == 1 and accept[0].exc_info is None
    assert [r.getMessage() for r in caplog.records if r.getMessage() == "something else"] == ["something else"]
