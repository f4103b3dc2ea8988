"""``ServerConfig.max_connections`` (review 10, item 11): one host opening connections in a loop
took every file descriptor of the process, and asyncio then logged a traceback for each socket it
failed to accept. With a cap, a handshake beyond it is refused with 503 and ``Retry-After`` on
every socket transport, the connections already open are unharmed, and a freed slot lets the
next client in."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest

from dara_ws_core import Admission, ConnectionSlots, ServerConfig, connection_cap, host_of, quiet_accept_errors

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


@pytest.mark.parametrize("transport", ["websockets", "picows"])
async def test_sockets_beyond_the_refused_ones_are_closed_at_once(transport: str) -> None:
    # Where the transport sees the socket before its request, a host opening sockets and
    # sending nothing holds at most max_connections + refusing_limit descriptors.
    config = ServerConfig(max_connections=1, ping_interval=None)
    async with running_stack(transport, config) as stack:
        assert stack.port is not None
        held = [await HostileClient.open(stack.port) for _ in range(1 + stack.endpoint.slots.refusing_limit)]
        try:
            await eventually(lambda: stack.endpoint.slots.refusing == stack.endpoint.slots.refusing_limit,
                             "every refusal slot taken")
            dropped = await HostileClient.open(stack.port)
            try:
                assert await dropped.wait_disconnected(5.0)
            finally:
                await dropped.close()
            assert stack.manager.stats().handshakes_rejected["full"] >= stack.endpoint.slots.refusing_limit + 1
        finally:
            for client in held:
                await client.close()
        await eventually(lambda: not stack.endpoint.slots.admitted and not stack.endpoint.slots.refusing,
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
