"""A sender's share of the outbox: one sender (a user, or every anonymous connection from one
address) takes at most a fraction of each bound the outbox shares (messages, users, bytes), and
the last fraction stays for senders holding little and for server code. The pure outbox, then
one process on every transport with anonymous clients reconnecting."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from dara_ws_core import (
    AnonymousIdentity,
    CustomServerMessage,
    HandshakeRequest,
    Identity,
    ServerConfig,
    allow_anonymous,
)
from dara_ws_core.auth import token_authenticator
from dara_ws_core.handler import current_channel, current_identity
from dara_ws_core.logs import current_source
from dara_ws_core.outbox import (
    ADDRESS_SHARES,
    SENDER_SHARES,
    SENDER_SMALL,
    OutboxLimits,
    UserOutbox,
    address_of,
    anonymous_sender,
    sender_of,
)

from .stacks import Stack, verify_token
from .test_outbox import MakeStack

TIMEOUT = 5.0


def test_one_sender_takes_at_most_its_share_of_the_bytes_and_everyone_else_is_still_kept() -> None:
    """The review's case: well under its message quota, one sender of big frames to made-up
    users used to fill ``max_total_bytes``, and then nobody's message was kept, server code's
    included, for ``max_age``. Its bytes waiting now stop at a 16th of the bound."""
    limits = OutboxLimits(max_messages=10, max_bytes=1000, max_age=100, max_total_bytes=16_000)
    assert limits.sender_bytes == 16_000 // SENDER_SHARES == 1000
    outbox = UserOutbox(limits)
    kept = [outbox.add(f"made-up-{i}", b"x" * 100, now=1, sender="mallory") for i in range(40)]
    assert sum(1 for kid in kept if kid) == 10 and all(kept[:10])
    assert outbox.charged("mallory") == 10 and outbox.charged_bytes("mallory") == 1000
    assert outbox.refused == outbox.refused_sender == 30
    assert outbox.add("made-up-x", b"x", now=1, sender="mallory") == 0  # even one byte more
    assert outbox.add("bob", b"x" * limits.history_bytes, now=2, sender="alice")
    assert outbox.add("carol", b"x" * 900, now=2)  # server code, charged to nobody
    # A message written to its user leaves the sender's bytes: room for one more.
    outbox.ack("made-up-0", kept[0])
    assert outbox.charged_bytes("mallory") == 900
    assert outbox.add("made-up-40", b"y" * 100, now=3, sender="mallory")
    assert not outbox.add("made-up-41", b"y", now=3, sender="mallory")
    # A frame bigger than the share is never kept for a sender (server code's still is).
    small = UserOutbox(OutboxLimits(max_bytes=1000, max_total_bytes=8000))
    assert not small.add("u", b"x" * 501, now=1, sender="alice") and small.refused_sender == 1
    assert small.add("u", b"x" * 501, now=1)


def test_the_last_shares_of_the_bytes_are_for_senders_holding_little_then_server_code_alone(
) -> None:
    """Fourteen senders, each within its share, fill all but the last two 16ths: a fifteenth
    sender of big frames is refused there, while senders holding little are still kept, up to
    all but the last 16th; that one is server code's alone, up to the process's bound."""
    limits = OutboxLimits(max_messages=10, max_bytes=400, max_age=100, max_total_bytes=16_000)
    outbox = UserOutbox(limits)
    for k in range(14):
        assert all(outbox.add(f"u{k}-{i}", b"x" * 100, now=1, sender=f"s{k}") for i in range(10))
    sixteenth = limits.max_total_bytes // SENDER_SHARES
    assert outbox.total_bytes == 14_000 == limits.max_total_bytes - 2 * sixteenth
    assert not outbox.add("v", b"x" * 100, now=1, sender="big")  # would hold 100 > 1000 // 64
    assert outbox.refused_sender == 1
    small = limits.sender_bytes // SENDER_SMALL
    assert outbox.add("w", b"x" * small, now=1, sender="alice")  # holds little: kept
    assert not outbox.add("w", b"x", now=1, sender="alice")  # no longer little
    kept = [outbox.add(f"small{i}", b"x" * small, now=1, sender=f"small{i}") for i in range(80)]
    assert sum(1 for kid in kept if kid) == (sixteenth - small) // small  # the next 16th, no more
    assert outbox.total_bytes <= limits.max_total_bytes - sixteenth
    room = (limits.max_total_bytes - outbox.total_bytes) // 100
    assert room == 10 and all(outbox.add(f"server{i}", b"x" * 100, now=1) for i in range(room))
    assert not outbox.add("carol", b"x" * 100, now=1)  # the process's own bound
    assert outbox.refused == 2 + 80 - 65 + 1 and outbox.refused_sender == 2 + 80 - 65


def test_a_sender_creates_at_most_its_share_of_the_users_and_the_last_shares_stay_for_others(
) -> None:
    """Each message waiting may hold a history: a sender's quota is at most a 16th of
    ``max_users``; once 14 senders hold theirs, a sender with nothing waiting still gets one in,
    up to all but the last 16th, and server code up to ``max_users``."""
    limits = OutboxLimits(max_messages=10, max_bytes=100, max_age=100, max_users=160)
    assert limits.sender_messages == 10
    outbox = UserOutbox(limits)
    for k in range(16):
        kept = [outbox.add(f"u{k}-{i}", b"x", now=1, sender=f"s{k}") for i in range(12)]
        assert sum(1 for kid in kept if kid) == (10 if k < 14 else 1)
    assert outbox.users == 142
    kept = [outbox.add(f"bob{i}", b"x", now=1, sender=f"fresh{i}") for i in range(12)]
    assert sum(1 for kid in kept if kid) == 8 and outbox.users == 150  # no sender past 15/16
    assert all(outbox.add(f"server-{i}", b"x", now=1) for i in range(10))
    assert not outbox.add("one-too-many", b"x", now=1) and outbox.users == 160


def test_an_anonymous_sender_is_its_address_an_ipv6_one_its_64() -> None:
    assert anonymous_sender("192.0.2.7") == anonymous_sender("::ffff:192.0.2.7") != anonymous_sender("192.0.2.8")
    assert anonymous_sender("2001:db8:1:2::1") == anonymous_sender("2001:db8:1:2:ffff::9")
    assert anonymous_sender("2001:db8:1:2::1") != anonymous_sender("2001:db8:1:3::1")
    assert anonymous_sender(None) != anonymous_sender("192.0.2.7")
    assert anonymous_sender("192.0.2.7").startswith("\0")  # no authenticator's user id
    anonymous = allow_anonymous()(HandshakeRequest("/"))
    assert isinstance(anonymous, AnonymousIdentity) and anonymous.anonymous
    assert not Identity(user_id="u", session_id="s").anonymous


def test_no_user_id_a_client_picks_is_charged_as_an_address() -> None:
    # With the demo's tokens a client names its own user: one named like an address's sender
    # would draw on (or use up) that address's anonymous share.
    forged = Identity(user_id=anonymous_sender("10.0.0.1"), session_id="s")
    assert sender_of(forged, "127.0.0.1") != anonymous_sender("10.0.0.1")
    assert sender_of(forged, "127.0.0.1") != sender_of(Identity(user_id="x", session_id="s"), None)
    assert sender_of(Identity(user_id="alice", session_id="s"), "10.0.0.1") == "alice"
    guest = allow_anonymous()(HandshakeRequest("/"))
    assert isinstance(guest, Identity)
    assert sender_of(guest, "10.0.0.1") == anonymous_sender("10.0.0.1")
    assert sender_of(None, "2001:db8:1:2::/64") == anonymous_sender("2001:db8:1:2::7")  # host_of's key


def test_a_send_made_once_its_connection_is_gone_is_still_charged_to_its_user() -> None:
    # A handler's task can outlive its connection: what it keeps is still the user's, not its
    # address's anonymous share.
    from dara_ws_core import WebsocketManager
    from dara_ws_core.handler import current_channel, current_identity
    from dara_ws_core.logs import current_source

    manager = WebsocketManager()

    def inside() -> tuple[str | None, str | None]:
        current_channel.set("gone")  # no such handler (any more)
        current_identity.set(Identity(user_id="alice", session_id="s"))
        current_source.set("10.0.0.1")
        return manager._sender()

    assert contextvars.copy_context().run(inside) == ("alice", address_of("10.0.0.1"))
    assert manager._sender() == (None, None)  # outside any connection: server code


def anonymous_or_token() -> Any:
    """Anonymous without a token (as the CLI demo), else the tests' ``user:session`` tokens."""
    anonymous, tokens = allow_anonymous(), token_authenticator(verify_token)

    def authenticate(request: HandshakeRequest) -> Identity | Any:
        return tokens(request) if "token" in request.query else anonymous(request)

    return authenticate


def add_tell(stack: Stack) -> None:
    manager = stack.manager

    async def tell(channel_id: str, data: Any) -> bool:
        return await manager.send_message_to_user(
            data["user"], {"kind": "tell", "data": data["text"]}, custom=True)

    manager.add_ws_handler("tell", tell)


async def test_anonymous_connections_from_one_address_share_one_quota(make_stack: MakeStack) -> None:
    """An anonymous identity is new for each connection: charged to it, a client reconnecting
    got a fresh quota each time and could fill the outbox's users. Charged to its address, the
    connections share one; a user's message and server code's are still kept."""
    config = ServerConfig(outbox_per_sender=4, outbox_users=1000)
    async with make_stack(config=config, authenticator=anonymous_or_token()) as stack:
        add_tell(stack)
        kept: list[bool] = []
        for _ in range(3):  # a client reconnecting, anonymous each time
            client = await stack.client(None)
            for _ in range(3):
                kept.append(await client.request("tell", {"user": f"made-up-{len(kept)}", "text": "x"}))
            await client.close()
        assert kept == [True] * 4 + [False] * 5
        assert stack.manager.outbox.charged(anonymous_sender("127.0.0.1")) == 4  # memory's too
        friend = await stack.client("alice:s1")
        assert await friend.request("tell", {"user": "victim", "text": "for you"}) is True
        assert await stack.manager.send_message_to_user("carol", {"t": 1}) is True
        victim = await stack.client("victim:s1")
        message = await victim.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage) and message.message.data == "for you"


async def test_a_sender_of_big_messages_stops_at_its_share_of_the_bytes(make_stack: MakeStack) -> None:
    """The same on a live server: a user telling made-up users big texts is refused at a 16th of
    ``outbox_total_bytes``, long before its message quota; another user's message is kept."""
    size = 2_000  # a frame is this and under 100 bytes more: ten fit in a 16th, eleven do not
    config = ServerConfig(outbox_total_bytes=16 * 10 * (size + 100), outbox_users=1000)
    async with make_stack(config=config) as stack:
        add_tell(stack)
        mallory = await stack.client("mallory:s1")
        kept = [await mallory.request("tell", {"user": f"made-up-{i}", "text": "x" * size})
                for i in range(15)]
        assert kept == [True] * 10 + [False] * 5
        friend = await stack.client("alice:s1")
        assert await friend.request("tell", {"user": "victim", "text": "x" * size}) is True


def test_names_minted_at_one_address_share_its_room_and_everyone_else_is_still_kept() -> None:
    """Review 18 #1: a sender's share was keyed by a name the client picks (the demo's tokens),
    so 512 names from one IPv4 address filled the whole outbox and then a fresh sender, and
    server code, were refused for ``max_age``. Every kept message is charged to its sender's
    address too: the names of one address hold a quarter of the users (and of the bytes)
    together, and a fresh sender from elsewhere and server code are still kept."""
    limits = OutboxLimits(max_users=1600)
    assert (limits.sender_messages, limits.address_messages) == (100, 1600 // ADDRESS_SHARES)
    outbox = UserOutbox(limits)
    address = address_of("203.0.113.7")
    kept_per_name = []
    for token in range(64):  # names are free: at most 64 here, each sending until refused
        sender = sender_of(Identity(user_id=f"tok{token}", session_id="s"), "203.0.113.7")
        count = 0
        while count <= limits.sender_messages and outbox.add(
                f"made-up-{token}-{count}", b"x" * 200, now=1, sender=sender, address=address):
            count += 1
        kept_per_name.append(count)
    assert kept_per_name == [100] * 4 + [0] * 60  # without the address's share: 64 x 100
    assert outbox.address_charged(address) == limits.address_messages == outbox.users
    assert outbox.add("bob", b"x", now=1, sender="alice", address=address_of("198.51.100.1"))
    assert outbox.add("carol", b"x", now=1)  # server code
    # Written to their users, the messages leave the address's count: room again.
    outbox.ack("made-up-0-0", outbox.add("made-up-0-0", b"y", now=2))
    assert outbox.address_charged(address) == limits.address_messages - 1
    assert outbox.add("made-up-64-0", b"x", now=2, sender="tok64", address=address)
    # The bytes too: big frames from fresh names stop at a quarter of max_total_bytes.
    heavy = UserOutbox(OutboxLimits(max_bytes=4000, max_total_bytes=64_000))  # a 1000-byte quarter
    sent = [heavy.add(f"big-{i}", b"x" * 1000, now=1, sender=f"tok{i // 4}", address=address)
            for i in range(64)]
    assert sum(1 for kid in sent if kid) == 16 and heavy.address_charged_bytes(address) == 16_000
    assert heavy.add("bob", b"x" * 1000, now=1, sender="alice", address=address_of("192.0.2.1"))


def test_names_minted_at_many_addresses_leave_server_code_its_own_sixteenth() -> None:
    """With many addresses (IPv6 /64s are nearly free), names fill what senders may take: all
    but the last two 16ths for those holding more than a little, the next 16th for senders
    holding little from addresses holding little; the last 16th stays server code's, whatever
    the senders do."""
    limits = OutboxLimits(max_users=1600)
    outbox = UserOutbox(limits)
    for net in range(40):  # forty /64s, each minting names until its address's share is held
        source = f"2001:db8:0:{net:x}::1"
        for token in range(10):
            sender = sender_of(Identity(user_id=f"tok{net}-{token}", session_id="s"), source)
            for i in range(limits.sender_messages):
                if not outbox.add(f"u{net}-{token}-{i}", b"x", now=1, sender=sender,
                                  address=address_of(source)):
                    break
    sixteenth = limits.max_users // SENDER_SHARES
    assert outbox.users == limits.max_users - sixteenth  # senders stop at 15/16
    # An address holding more than a little cannot use the kept 16th, even with a new name.
    assert not outbox.add("late", b"x", now=1, sender="tok-new",
                          address=address_of("2001:db8:0:0::1"))
    assert not outbox.add("late", b"x", now=1, sender="alice", address=address_of("192.0.2.1"))
    assert all(outbox.add(f"server-{i}", b"x", now=1) for i in range(sixteenth))
    assert outbox.users == limits.max_users


async def test_names_a_client_mints_share_its_addresss_room_of_the_outbox(
    make_stack: MakeStack,
) -> None:
    """The review's attack on a live server: a client reconnecting with a new token (a new named
    sender) each time tells made-up users until refused. Its names hold its address's share
    together (a quarter of ``outbox_users``), not a share each; server code and a sender from
    another address are still kept."""
    config = ServerConfig(outbox_users=320)  # a sender's share: 20; an address's: 80
    async with make_stack(config=config, authenticator=anonymous_or_token()) as stack:
        add_tell(stack)
        kept_per_name = []
        for token in range(6):
            client = await stack.client(f"tok{token}:s")
            kept = 0
            while kept <= 20 and await client.request(
                    "tell", {"user": f"made-up-{token}-{kept}", "text": "x"}):
                kept += 1
            kept_per_name.append(kept)
            await client.close()
        assert kept_per_name == [20, 20, 20, 20, 0, 0]
        assert stack.manager.outbox.address_charged(address_of("127.0.0.1")) == 80
        assert await stack.manager.send_message_to_user("carol", {"t": 1}) is True

        async def tell_from(source: str, user_id: str) -> bool:
            """A handler's send, in the context of a connection of ``user_id`` at ``source``."""

            def connection() -> None:
                current_channel.set(f"{user_id}'s")
                current_identity.set(Identity(user_id=user_id, session_id="s"))
                current_source.set(source)

            context = contextvars.copy_context()
            context.run(connection)
            send = stack.manager.send_message_to_user("bob", {"from": user_id})
            return await asyncio.get_running_loop().create_task(send, context=context)

        assert await tell_from("127.0.0.1", "tok99") is False  # one more name: the same room
        assert await tell_from("192.0.2.1", "alice") is True  # another address
