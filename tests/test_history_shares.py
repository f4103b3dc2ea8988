"""A sender's share of ONE user's history: a client may have at most a :data:`HISTORY_SHARES`-th
of a user's ``max_messages`` and ``max_bytes`` waiting for them, and room under the user's bounds
is made from what is written or expired only, never from another sender's message still
waiting (review 17 #4: one client telling a user ``max_messages`` messages flushed everyone
else's kept messages to that user). The pure outbox, then one process on every transport."""

from __future__ import annotations

from dara_ws_core import CustomServerMessage, DaraClient, ServerConfig
from dara_ws_core.outbox import HISTORY_SHARES, BusRefusals, OutboxLimits, UserOutbox

from .stacks import Stack
from .test_outbox import MakeStack
from .test_outbox_shares import add_tell

TIMEOUT = 5.0


def leased(outbox: UserOutbox, user_id: str) -> list[bytes]:
    """The frames a new connection of the user would get."""
    return [entry.frame for entry in outbox.lease(user_id, "c1", 2.0, lambda _: True)]


def test_one_sender_cannot_flush_another_senders_message_out_of_a_users_history() -> None:
    """The review's case: bob tells the victim one message, mallory 100 (the user's count bound):
    she keeps her quarter and is refused the rest; bob's message is still there."""
    limits = OutboxLimits()
    share = limits.history_messages
    assert share == limits.max_messages // HISTORY_SHARES == 25
    outbox = UserOutbox(limits)
    assert outbox.add("victim", b"bob", now=1, sender="bob")
    kept = [outbox.add("victim", b"spam %d" % i, now=1, sender="mallory") for i in range(100)]
    assert all(kept[:share]) and not any(kept[share:])
    assert outbox.refused == outbox.refused_sender == 100 - share
    assert leased(outbox, "victim") == [b"bob"] + [b"spam %d" % i for i in range(share)]


def test_a_sender_has_at_most_a_quarter_of_a_users_bytes_waiting() -> None:
    limits = OutboxLimits(max_bytes=1000)
    assert limits.history_bytes == 250
    outbox = UserOutbox(limits)
    assert outbox.add("victim", b"b" * 10, now=1, sender="bob")
    kept = [outbox.add("victim", b"x" * 100, now=1, sender="mallory") for _ in range(5)]
    assert [bool(k) for k in kept] == [True, True, False, False, False]
    assert not outbox.add("other", b"x" * 251, now=1, sender="mallory")  # over a share by itself
    assert outbox.add("other", b"x" * 251, now=1)  # server code: up to max_bytes, as before
    assert leased(outbox, "victim") == [b"b" * 10, b"x" * 100, b"x" * 100]


def test_a_full_history_refuses_a_client_and_lets_server_code_push_out_the_oldest() -> None:
    """Four senders at their share fill a history: a fifth client is refused (no message still
    waiting is dropped for it), server code keeps today's rule (the oldest goes), and once the
    user has read them, what is written makes room and the shares are free again."""
    limits = OutboxLimits(max_messages=8)
    outbox = UserOutbox(limits)
    assert outbox.add("victim", b"bob", now=1, sender="bob")
    for k in range(3):
        assert all(outbox.add("victim", b"s%d" % k, now=1, sender=f"s{k}") for _ in range(2))
    assert outbox.add("victim", b"s3", now=1, sender="s3")  # eight: full
    assert not outbox.add("victim", b"late", now=1, sender="carol")
    assert not outbox.add("victim", b"s3", now=1, sender="s3")  # its own are waiting too
    assert leased(outbox, "victim")[0] == b"bob"
    ids = [outbox.add("victim", b"server", now=1)]  # the application's own: the oldest goes
    assert ids[0] and leased(outbox, "victim")[0] == b"s0"
    assert outbox.settle("victim", "c1", str(ids[0]))  # the user has them all
    assert all(outbox.add("victim", b"s0 again", now=2, sender="s0") for _ in range(2))
    assert outbox.add("victim", b"carol", now=2, sender="carol")
    assert leased(outbox, "victim") == [b"s0 again"] * 2 + [b"carol"]
    assert outbox.pending("victim") == 3


def test_expired_messages_make_room_for_a_client() -> None:
    limits = OutboxLimits(max_messages=4, max_age=10)
    outbox = UserOutbox(limits)
    for k in range(4):
        assert outbox.add("victim", b"old", now=1, sender=f"s{k}")
    assert not outbox.add("victim", b"new", now=5, sender="s9")
    assert outbox.add("victim", b"new", now=12, sender="s9")
    assert leased(outbox, "victim") == [b"new"]


async def test_a_client_telling_a_user_many_messages_keeps_only_its_share(make_stack: MakeStack) -> None:
    """The review's script on a live server: bob tells the victim, mallory floods the victim;
    she is told ``False`` past her share, and the victim gets bob's message first."""
    config = ServerConfig(outbox_messages=8)
    async with make_stack(config=config) as stack:
        add_tell(stack)
        await tell_then_flood(stack)
        victim = await stack.client("victim:s1")
        assert await texts(victim, 3) == ["from bob", "spam 0", "spam 1"]


async def texts(client: DaraClient, n: int) -> list[object]:
    """The data of the next ``n`` custom messages ``client`` receives."""
    got = []
    for _ in range(n):
        message = await client.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage)
        got.append(message.message.data)
    return got


async def tell_then_flood(stack: Stack) -> list[bool]:
    """bob tells the victim one message, then mallory tells it 8 (the user's bound): whether
    each of hers was kept, as ``tell`` answered."""
    bob = await stack.client("bob:s1")
    assert await bob.request("tell", {"user": "victim", "text": "from bob"}) is True
    mallory = await stack.client("mallory:s1")
    kept = [await mallory.request("tell", {"user": "victim", "text": f"spam {i}"}) for i in range(8)]
    if stack.manager.backplane is None:
        assert kept == [True] * 2 + [False] * 6
    return kept


def test_the_buss_refusal_of_a_share_of_one_history_holds_for_that_user_only() -> None:
    """With a bus, a refusal of the sender's share of one user's history is remembered for
    that (sender, user) only: its messages to other users, and others' to that user, are still
    offered."""
    refusals = BusRefusals()
    refusals.refuse_history("mallory", "victim", until=5.0)
    assert not refusals.keeps("mallory", 1.0, user_id="victim")
    assert refusals.keeps("mallory", 1.0, user_id="other") and refusals.keeps("bob", 1.0, user_id="victim")
    assert refusals.keeps("mallory", 1.0)  # a caller that does not say the user
    assert refusals.keeps("mallory", 6.0, user_id="victim")  # over
    refusals.refuse_history(None, "victim", until=5.0)
    assert refusals.keeps(None, 1.0, user_id="victim")  # server code's are never refused so
