"""Behind a reverse proxy every socket comes from the proxy's address. With the proxy trusted
(``ServerConfig.forwarded_allow_ips``), the client its ``X-Forwarded-For`` names is what every
bound counted per address counts once the request is read: anonymous clients behind it hold
shares of their own (``in_thread`` threads, chunked parts, the outbox's senders) and
``max_connections_per_address`` counts each of them. From anyone else, the header is ignored:
a client never picks the address it is counted as (review18 #2).

The pure parse (:class:`~dara_ws_core.transport.TrustedProxies`) first, then the same behaviour
on every transport: the proxy is the test's own client on 127.0.0.1, naming two clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dara_ws_core import (
    AnonymousIdentity,
    CloseCode,
    ConnectionClosed,
    DaraClient,
    HandshakeRequest,
    Identity,
    RemoteError,
    ServerConfig,
    Transport,
    WebsocketManager,
    allow_anonymous,
)
from dara_ws_core.correlation import PROCESS_CHUNKS
from dara_ws_core.endpoint import Endpoint
from dara_ws_core.outbox import anonymous_sender
from dara_ws_core.transport import MAX_FORWARDED_HOPS, TrustedProxies
from tests.helpers import eventually
from tests.stacks import HandshakeRejected, Stack, running_stack

TIMEOUT = 10.0
MakeStack = Callable[..., contextlib.AbstractAsyncContextManager[Stack]]
#: Two clients behind the proxy (documentation ranges: nothing here connects to them).
ALICE, MALLORY = "203.0.113.7", "198.51.100.9"


# ---------------------------------------------------------------------------- the parse (pure)


def test_a_trusted_proxys_header_names_the_right_most_address_that_is_no_trusted_proxy() -> None:
    proxies = TrustedProxies("127.0.0.1, 10.0.0.0/8")
    assert proxies.client_host("127.0.0.1", ALICE) == ALICE
    # The client wrote the left-most entry itself; the proxies appended the rest.
    assert proxies.client_host("127.0.0.1", f"192.0.2.1, {ALICE}, 10.1.2.3") == ALICE
    assert proxies.client_host("10.9.9.9", f"{ALICE},10.0.0.1,127.0.0.1") == ALICE
    # Every hop a trusted proxy: the client is one of them, the left-most.
    assert proxies.client_host("127.0.0.1", "10.0.0.1, 10.0.0.2") == "10.0.0.1"
    # Ports and brackets as some proxies write them; an IPv4-mapped peer is its IPv4 address.
    assert proxies.client_host("127.0.0.1", f"{ALICE}:4711") == ALICE
    assert proxies.client_host("::ffff:127.0.0.1", "[2001:db8::1]:4711") == "2001:db8::1"
    assert proxies.client_host("127.0.0.1", "2001:db8::1") == "2001:db8::1"


def test_a_header_from_anyone_else_or_malformed_leaves_the_sockets_peer() -> None:
    proxies = TrustedProxies(["127.0.0.1"])
    assert proxies.client_host("192.0.2.50", ALICE) == "192.0.2.50"  # not a proxy: ignored
    assert proxies.client_host(None, ALICE) is None  # a Unix socket: only "*" trusts it
    assert proxies.client_host("127.0.0.1", None) == "127.0.0.1"
    for malformed in ("", " ", "unknown", f"{ALICE}, _hidden", "not an address", ",", "[::1"):
        assert proxies.client_host("127.0.0.1", malformed) == "127.0.0.1", malformed
    # A garbled entry left of the client is past where reading stops.
    assert proxies.client_host("127.0.0.1", f"garbage, {ALICE}") == ALICE


def test_a_header_is_read_at_most_a_few_hops_from_the_right() -> None:
    proxies = TrustedProxies("10.0.0.0/8")
    hops = ", ".join(f"10.0.0.{n}" for n in range(1, 200))
    found = proxies.client_host("10.0.0.254", f"{ALICE}, {hops}")
    assert found != ALICE and found == f"10.0.0.{199 - MAX_FORWARDED_HOPS + 1}"


def test_any_peer_trusted_takes_the_right_most_address_only() -> None:
    anyone = TrustedProxies("*")
    # uvicorn's "*" takes the left-most entry, which the client writes: here, the one the
    # proxy that connected appended.
    assert anyone.client_host("192.0.2.50", f"6.6.6.6, {ALICE}") == ALICE
    assert anyone.client_host(None, ALICE) == ALICE


def test_trusted_proxies_are_checked_and_none_trusts_nobody() -> None:
    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        TrustedProxies("10.0.0.1, proxy.internal")
    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        ServerConfig(forwarded_allow_ips="10.0.0.0/33")
    assert not TrustedProxies("") and TrustedProxies("10.0.0.1")
    assert ServerConfig(forwarded_allow_ips=["10.0.0.1"]).forwarded_allow_ips == ("10.0.0.1",)
    # An IPv6 peer's address key (its /64) is trusted when a proxy may be in it.
    assert TrustedProxies("2001:db8::5").trusts("2001:db8::/64")
    assert not TrustedProxies("2001:db8::5").trusts("2001:db8:0:1::/64")


def test_the_endpoint_keys_the_client_as_every_address_share_does() -> None:
    endpoint = Endpoint(WebsocketManager(ServerConfig(forwarded_allow_ips="127.0.0.1")), allow_anonymous())
    request = HandshakeRequest.build("/", [("X-Forwarded-For", "2001:db8:1:2::7")], ("127.0.0.1", 1))
    assert endpoint.client_address(request) == "2001:db8:1:2::/64"  # an IPv6 client by its /64
    direct = Endpoint(WebsocketManager(ServerConfig()), allow_anonymous())
    assert direct.client_address(request) == "127.0.0.1"  # nobody trusted: the header ignored


# ---------------------------------------------------------------------------- every transport


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """What the slow handlers wait for; opened when the test ends, whatever happened."""
    event = threading.Event()
    yield event
    event.set()


def proxied_manager(gate: threading.Event, forwarded_allow_ips: str | None) -> WebsocketManager:
    """Eight threads (a share of one per address) and a kept per-user send."""
    manager = WebsocketManager(ServerConfig(handler_threads=8, forwarded_allow_ips=forwarded_allow_ips))

    def lookup(channel_id: str, data: Any) -> Any:
        if data == "slow":
            gate.wait(TIMEOUT)
        return {"ok": data}

    async def tell(channel_id: str, data: Any) -> bool:
        return await manager.send_message_to_user(data, {"kind": "tell"}, custom=True)

    manager.add_ws_handler("lookup", lookup, in_thread=True)
    manager.add_ws_handler("tell", tell)
    return manager


def forwarded_for(client: str) -> list[tuple[str, str]]:
    # The left-most entry is what a client would forge; the proxy appends the peer it saw.
    return [("X-Forwarded-For", f"192.0.2.1, {client}")]


async def behind_proxy(stack: Stack, client: str) -> DaraClient:
    """An anonymous client behind the proxy, as it names it."""
    connected = DaraClient(lambda: stack.connect(None, headers=forwarded_for(client)), ping_interval=None)
    await connected.connect()
    stack.clients.append(connected)
    return connected


async def held_chunk_share(stack: Stack, client: str) -> tuple[Transport, asyncio.Task[Any], str]:
    """A raw client behind the proxy holding the first of two parts of an answer."""
    transport = await stack.connect(None, headers=forwarded_for(client))
    channel = json.loads(await transport.receive())["message"]["channel"]
    asked = asyncio.create_task(stack.manager.send_and_wait(channel, {"q": 1}, timeout=TIMEOUT))
    rchan = json.loads(await transport.receive())["message"]["__rchan"]
    await transport.send(json.dumps({"type": "message", "channel": rchan, "chunk_count": 2,
                                     "chunk_index": 0, "message": "first"}).encode())
    return transport, asked, rchan


async def test_clients_behind_a_trusted_proxy_hold_shares_of_their_own(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    manager = proxied_manager(gate, "127.0.0.1")
    async with make_stack(manager=manager, authenticator=allow_anonymous()) as stack:
        mallory, alice = await behind_proxy(stack, MALLORY), await behind_proxy(stack, ALICE)
        slow = asyncio.create_task(mallory.request("lookup", "slow", timeout=TIMEOUT))
        threads = manager.custom_handlers.threads
        await eventually(lambda: threads.held(("address", MALLORY)) == 1, "mallory's thread taken")
        with pytest.raises(RemoteError) as refused:  # mallory's share is full, whatever connection...
            await (await behind_proxy(stack, MALLORY)).request("lookup", "slow", timeout=TIMEOUT)
        assert refused.value.code == "busy"
        # ...alice's is her own, not the proxy's.
        assert await alice.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
        assert threads.held(("address", "127.0.0.1")) == 0
        # Her kept message is charged to her address, not to the proxy's nor mallory's.
        assert await alice.request("tell", "nobody-yet", timeout=TIMEOUT) is True
        assert manager.outbox.charged(anonymous_sender(ALICE)) == 1
        assert manager.outbox.charged(anonymous_sender(MALLORY)) == 0
        assert manager.outbox.charged(anonymous_sender("127.0.0.1")) == 0
        # Parts of a chunked answer are held in her address's chunk share.
        transport, asked, rchan = await held_chunk_share(stack, ALICE)
        await eventually(lambda: ("address", ALICE) in PROCESS_CHUNKS.users, "alice's part held")
        assert ("address", "127.0.0.1") not in PROCESS_CHUNKS.users
        await transport.send(json.dumps({"type": "message", "channel": rchan, "chunk_count": 2,
                                         "chunk_index": 1, "message": "last"}).encode())
        assert await asked == ["first", "last"]
        await transport.close()
        gate.set()
        assert await slow == {"ok": "slow"}


@pytest.mark.parametrize("allowed", [None, "10.0.0.0/8"], ids=["nobody-trusted", "others-trusted"])
async def test_a_forwarded_header_from_an_untrusted_peer_is_ignored(
    make_stack: MakeStack, gate: threading.Event, allowed: str | None
) -> None:
    manager = proxied_manager(gate, allowed)
    async with make_stack(manager=manager, authenticator=allow_anonymous()) as stack:
        mallory, alice = await behind_proxy(stack, MALLORY), await behind_proxy(stack, ALICE)
        slow = asyncio.create_task(mallory.request("lookup", "slow", timeout=TIMEOUT))
        threads = manager.custom_handlers.threads
        await eventually(lambda: threads.held(("address", "127.0.0.1")) == 1, "the socket's address holds it")
        with pytest.raises(RemoteError) as refused:  # one address: one share, whatever they claim
            await alice.request("lookup", "fast", timeout=TIMEOUT)
        assert refused.value.code == "busy"
        assert threads.held(("address", MALLORY)) == threads.held(("address", ALICE)) == 0
        assert await alice.request("tell", "nobody-yet", timeout=TIMEOUT) is True
        assert manager.outbox.charged(anonymous_sender("127.0.0.1")) == 1
        assert manager.outbox.charged(anonymous_sender(ALICE)) == 0
        gate.set()
        assert await slow == {"ok": "slow"}


async def test_max_connections_per_address_counts_each_client_behind_a_trusted_proxy(
    make_stack: MakeStack,
) -> None:
    config = ServerConfig(max_connections_per_address=1, forwarded_allow_ips="127.0.0.1", ping_interval=None)
    async with make_stack(config=config) as stack:
        alice = await stack.connect("alice:s1", headers=forwarded_for(ALICE))
        # The proxy holds two sockets; each client one: the proxy is not capped as one address.
        bob = await stack.connect("bob:s1", headers=forwarded_for(MALLORY))
        for served in (alice, bob):  # counted once served (init): a handshake is checked
            assert json.loads(await served.receive())["type"] == "init"
        with pytest.raises(HandshakeRejected) as refused:  # a second one of alice's address
            await stack.connect("carol:s1", headers=forwarded_for(ALICE))
        assert refused.value.status == 403
        assert stack.manager.stats().handshakes_rejected.get("address") == 1
        await alice.close()
        await eventually(lambda: stack.endpoint.connection_count == 1, "alice's connection gone")
        again = await stack.connect("carol:s1", headers=forwarded_for(ALICE))
        for transport in (again, bob):
            await transport.close()


async def test_an_authenticator_may_name_the_clients_address(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    # A header the application's own proxy sets (not X-Forwarded-For): read by its authenticator.
    def from_real_ip(request: HandshakeRequest) -> Identity:
        guest = allow_anonymous()(request)
        assert isinstance(guest, AnonymousIdentity)
        return AnonymousIdentity(guest.user_id, guest.session_id, address=request.headers.get("x-real-ip"))

    manager = proxied_manager(gate, None)
    async with make_stack(manager=manager, authenticator=from_real_ip) as stack:
        client = DaraClient(lambda: stack.connect(None, headers=[("X-Real-IP", "2001:db8:1:2::7")]),
                            ping_interval=None)
        await client.connect()
        stack.clients.append(client)
        slow = asyncio.create_task(client.request("lookup", "slow", timeout=TIMEOUT))
        threads = manager.custom_handlers.threads
        await eventually(lambda: threads.held(("address", "2001:db8:1:2::/64")) == 1, "keyed by its /64")
        gate.set()
        assert await slow == {"ok": "slow"}


async def test_handshakes_of_one_client_that_raced_past_the_check_are_closed_once_served() -> None:
    # Both are authenticated before either is served (the in-memory server starts serving in a
    # task): the count is exact only where the connection registers, which closes the extra one.
    config = ServerConfig(max_connections_per_address=1, forwarded_allow_ips="127.0.0.1", ping_interval=None)
    async with running_stack("memory", config) as stack:
        both = await asyncio.gather(*(stack.connect(f"u{i}:s", headers=forwarded_for(ALICE)) for i in range(2)))
        frames = []
        for transport in both:
            with contextlib.suppress(ConnectionClosed):
                frames.append(json.loads(await transport.receive())["type"])
        assert frames == ["init"]
        assert stack.manager.stats().close_codes.get(CloseCode.POLICY_VIOLATION) == 1
        for transport in both:
            await transport.close()
