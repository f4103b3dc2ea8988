"""A sender's share of the outbox: one sender (a user, or every anonymous connection from one
address) takes at most a fraction of each bound the outbox shares (messages, users, bytes), and
the last fraction stays for senders holding little and for server code. The pure outbox, then
one process on every transport with anonymous clients reconnecting."""

from __future__ import annotations

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
from dara_ws_core.outbox import (
    SENDER_SHARES,
    SENDER_SMALL,
    OutboxLimits,
    UserOutbox,
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


def test_the_last_share_of_the_bytes_is_kept_for_senders_holding_little_and_server_code() -> None:
    """Fifteen senders, each within its share, fill all but the last 16th: a sixteenth sender of
    big frames is refused there, while one holding little, and server code, are still kept up to
    the process's bound."""
    limits = OutboxLimits(max_messages=10, max_bytes=400, max_age=100, max_total_bytes=16_000)
    outbox = UserOutbox(limits)
    for k in range(15):
        assert all(outbox.add(f"u{k}-{i}", b"x" * 100, now=1, sender=f"s{k}") for i in range(10))
    assert outbox.total_bytes == 15_000 == limits.max_total_bytes - limits.max_total_bytes // SENDER_SHARES
    assert not outbox.add("v", b"x" * 100, now=1, sender="big")  # would hold 100 > 1000 // 64
    assert outbox.refused_sender == 1
    small = limits.sender_bytes // SENDER_SMALL
    assert outbox.add("w", b"x" * small, now=1, sender="alice")  # holds little: kept
    assert not outbox.add("w", b"x", now=1, sender="alice")  # no longer little
    room = (limits.max_total_bytes - outbox.total_bytes) // 100
    assert room == 9 and all(outbox.add(f"server{i}", b"x" * 100, now=1) for i in range(room))
    assert not outbox.add("carol", b"x" * 100, now=1)  # the process's own bound
    assert outbox.refused == 3 and outbox.refused_sender == 2


def test_a_sender_creates_at_most_its_share_of_the_users_and_the_last_share_stays_for_others(
) -> None:
    """Each message waiting may hold a history: a sender's quota is at most a 16th of
    ``max_users``; once 15 senders hold theirs, a sender with nothing waiting still gets one in,
    and server code too, up to ``max_users``."""
    limits = OutboxLimits(max_messages=10, max_bytes=100, max_age=100, max_users=160)
    assert limits.sender_messages == 10
    outbox = UserOutbox(limits)
    for k in range(16):
        kept = [outbox.add(f"u{k}-{i}", b"x", now=1, sender=f"s{k}") for i in range(12)]
        assert sum(1 for kid in kept if kid) == (10 if k < 15 else 1)
    assert outbox.users == 151
    assert outbox.add("bob", b"x", now=1, sender="alice")
    assert all(outbox.add(f"server-{i}", b"x", now=1) for i in range(8))
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

    def inside() -> str | None:
        current_channel.set("gone")  # no such handler (any more)
        current_identity.set(Identity(user_id="alice", session_id="s"))
        current_source.set("10.0.0.1")
        return manager._sender()

    assert contextvars.copy_context().run(inside) == "alice"
    assert manager._sender() is None  # outside any connection: server code


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
