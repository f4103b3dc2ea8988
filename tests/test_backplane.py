"""The backplane's routing logic, on the in-process bus: several managers sharing one
``MemoryBroker`` behave like several processes sharing Redis (same code, same failure handling),
fast and deterministic. The same scenarios on a real Redis with real processes are in
``test_backplane_redis.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core import (
    BackplaneError,
    Chunked,
    ChunkError,
    CloseCode,
    ConnectionClosed,
    CustomServerMessage,
    DaraClient,
    DaraClientMessage,
    DaraServerMessage,
    Request,
    RequestTimeout,
    ServerConfig,
    ServerVariableMessage,
    SlowConsumer,
    TooManyPendingRequests,
    UnknownChannel,
    VariableRequestMessage,
    WebsocketManager,
)
from dara_ws_core.backplane import (
    BroadcastDelivery,
    BusMessage,
    ChannelDelivery,
    Control,
    Failure,
    MemoryBackplane,
    MemoryBroker,
    RemoteCancel,
    RemoteReply,
    RemoteRequest,
    SequenceTracker,
    UserDelivery,
    decode_bus_message,
    encode_bus_message,
    error_of,
    failure_of,
)
from dara_ws_core.backplane.wire import CONTROL_SCOPES
from dara_ws_core.codec import build_frame

from .helpers import eventually
from .stacks import Stack, running_stack

TIMEOUT = 5.0
FAST = {"heartbeat_interval": 0.2, "backoff_initial": 0.01, "backoff_max": 0.05,
        "connect_timeout": 2.0}


# --------------------------------------------------------------------------- helpers


@dataclass
class Node:
    stack: Stack
    backplane: MemoryBackplane

    @property
    def manager(self) -> WebsocketManager:
        return self.stack.manager

    async def client(self, token: str = "alice:s1", **options: Any) -> DaraClient:
        """A connected client whose channel is registered in the directory."""
        client = await self.stack.client(token, **options)
        async with asyncio.timeout(TIMEOUT):
            await self.backplane.flush()
        return client


@contextlib.asynccontextmanager
async def cluster(
    n: int = 2, broker: MemoryBroker | None = None, config: ServerConfig | None = None,
    **options: Any,
) -> AsyncIterator[list[Node]]:
    """``n`` managers (nodes ``n0``, ``n1``...) sharing one broker, each with its own server."""
    broker = broker or MemoryBroker()
    async with contextlib.AsyncExitStack() as exits:
        nodes = []
        for i in range(n):
            backplane = MemoryBackplane(broker, node_id=f"n{i}", **{**FAST, **options})
            manager = WebsocketManager(config or ServerConfig(), backplane=backplane)
            exits.push_async_callback(backplane.stop)  # after the server below has shut down
            stack = await exits.enter_async_context(running_stack("memory", manager=manager))
            await backplane.start(manager)
            nodes.append(Node(stack, backplane))
        yield nodes


async def receive_payload(client: DaraClient, timeout: float = TIMEOUT) -> dict[str, Any]:
    message = await client.receive(timeout)
    assert isinstance(message, DaraServerMessage | CustomServerMessage)
    return message.message.model_dump(by_alias=True, exclude_none=True)


def never_answer(asked: asyncio.Event) -> Callable[[Request], Any]:
    """A responder that sets ``asked`` and never answers."""

    def respond(request: Request) -> Any:
        asked.set()
        return asyncio.get_running_loop().create_future()

    return respond


async def unanswered_request(
    asker: Node, owner: Node, timeout: float | None
) -> tuple[DaraClient, asyncio.Task[Any]]:
    """A ``send_and_wait`` from ``asker`` to a new client of ``owner`` that never answers;
    returns once the client has the request."""
    client = await owner.client()
    asked = asyncio.Event()
    client.on_request(never_answer(asked))
    assert client.channel is not None
    waiting = asyncio.create_task(
        asker.manager.send_and_wait(client.channel, {"q": 1}, timeout=timeout)
    )
    async with asyncio.timeout(TIMEOUT):
        await asked.wait()
    return client, waiting


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- the bus wire (pure)

FRAMES = st.binary(max_size=256)
IDS = st.text(min_size=1, max_size=40)
OPT_IDS = st.none() | IDS
MESSAGES: st.SearchStrategy[BusMessage] = st.one_of(
    st.builds(ChannelDelivery, IDS, FRAMES),
    st.builds(UserDelivery, IDS, OPT_IDS, FRAMES),
    st.builds(BroadcastDelivery, IDS, OPT_IDS, FRAMES, st.integers(0, 2**53)),
    st.builds(RemoteRequest, IDS, IDS, IDS, st.booleans(),
              st.none() | st.floats(min_value=0, max_value=1e6), FRAMES),
    st.builds(RemoteReply, IDS, FRAMES, st.none()),
    st.builds(RemoteReply, IDS, st.just(b""),
              st.builds(Failure, IDS, st.text(max_size=40), st.none() | st.integers(1000, 4999))),
    st.builds(RemoteCancel, IDS),
    st.builds(Control, IDS, st.sampled_from(CONTROL_SCOPES), IDS, st.integers(1000, 4999),
              st.text(max_size=40), st.integers(0, 2**53)),
)


@given(MESSAGES)
def test_bus_messages_round_trip(message: BusMessage) -> None:
    assert decode_bus_message(encode_bus_message(message)) == message


def test_bus_message_heads_are_parsed_without_the_process_wide_string_cache() -> None:
    # Two equal strings parsed with pydantic-core's (process-wide) cache would be one object.
    data = encode_bus_message(ChannelDelivery(str(uuid.uuid4()), b"{}"))
    first, second = decode_bus_message(data), decode_bus_message(data)
    assert isinstance(first, ChannelDelivery) and isinstance(second, ChannelDelivery)
    assert first.channel_id == second.channel_id
    assert first.channel_id is not second.channel_id


def test_a_bus_message_carries_the_frame_unchanged_after_its_header() -> None:
    frame = b'{"type":"message","message":{"text":"line\\nbreak"}}'
    data = encode_bus_message(ChannelDelivery("c1", frame))
    header, _, body = data.partition(b"\n")
    assert body == frame
    assert b"c1" in header


def test_a_sequence_tracker_counts_what_a_publisher_sent_in_between() -> None:
    tracker = SequenceTracker(max_publishers=2)
    assert tracker.observe("a", 1) == 0  # the first heard: nothing known missed
    assert tracker.observe("a", 2) == 0
    assert tracker.observe("a", 6) == 3  # 3, 4 and 5 never arrived
    assert tracker.observe("a", 1) == 0  # restarted with the same id: counted from there
    assert tracker.observe("a", 0) == 0  # unnumbered (an older peer)
    tracker.observe("b", 1)
    tracker.observe("c", 1)  # the third publisher: "a", heard least recently, is forgotten
    assert len(tracker) == 2
    assert tracker.observe("a", 9) == 0


@pytest.mark.parametrize("data", [
    b"", b"no header", b"[1]\n", b"{\"op\":\"nope\"}\n", b"{\"op\":\"ch\"}\n",
    b"{\"op\":\"ch\",\"ch\":1}\n", b"{\"op\":\"req\",\"id\":\"r\",\"reply_to\":\"n\",\"ch\":\"c\","
    b"\"custom\":1,\"timeout\":null}\n", b"not json\n{}",
    b"{\"op\":\"rep\",\"id\":\"r\",\"fail\":[]}\n",
    b"{\"op\":\"all\",\"origin\":\"n\",\"ignore\":null,\"seq\":-1}\n",
    b"{\"op\":\"all\",\"origin\":\"n\",\"ignore\":null,\"seq\":true}\n",
    b"{\"op\":\"ctl\",\"origin\":\"n\",\"scope\":\"user\",\"id\":\"u\",\"code\":1008,"
    b"\"reason\":\"\",\"at\":-5}\n",
])
def test_malformed_bus_messages_are_refused(data: bytes) -> None:
    with pytest.raises(BackplaneError):
        decode_bus_message(data)


@pytest.mark.parametrize("exc", [
    RequestTimeout("late"), ConnectionClosed(1001, "going away"), ChunkError("bad part"),
    TooManyPendingRequests("full"), SlowConsumer("slow"), UnknownChannel("c9"),
])
def test_a_remote_failure_is_raised_as_the_same_exception(exc: Exception) -> None:
    again = error_of(failure_of(exc), "c9")
    assert type(again) is type(exc)
    assert str(again) == str(exc)


def test_an_unexpected_remote_failure_leaks_no_internals() -> None:
    failure = failure_of(RuntimeError("secret path /etc/passwd"))
    assert "secret" not in failure.message
    assert isinstance(error_of(failure, "c"), BackplaneError)


# --------------------------------------------------------------------------- lifecycle


async def test_without_a_backplane_all_user_channels_are_the_local_ones() -> None:
    async with running_stack("memory") as stack:
        client = await stack.client("bob:s1")
        assert await stack.manager.get_all_user_channels("bob") == {client.channel}


async def test_start_attaches_the_backplane_to_a_manager_created_without_one() -> None:
    backplane = MemoryBackplane(MemoryBroker(), **FAST)
    manager = WebsocketManager()
    await backplane.start(manager)
    try:
        assert manager.backplane is backplane
        with pytest.raises(ValueError, match="another backplane"):
            await MemoryBackplane(MemoryBroker()).start(manager)
    finally:
        await backplane.stop()


async def test_start_fails_loudly_when_the_bus_is_unreachable() -> None:
    broker = MemoryBroker()
    broker.fail()
    backplane = MemoryBackplane(broker, **{**FAST, "connect_timeout": 0.2})
    with pytest.raises(BackplaneError, match="could not reach"):
        await backplane.start(WebsocketManager())


async def test_stop_unregisters_every_channel_of_the_node() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        await b.client("alice:s1")
        await a.client("alice:s2")
        assert len(broker.registered()[0]) == 2
    assert broker.registered() == (set(), set())


# --------------------------------------------------------------------------- routing


async def test_send_message_reaches_a_channel_on_another_node() -> None:
    async with cluster(2) as (a, b):
        client = await b.client()
        assert client.channel is not None
        await a.manager.send_message(client.channel, {"text": "hello"})
        assert await receive_payload(client) == {"text": "hello"}
        await a.manager.send_message(client.channel, {"kind": "k", "data": 1}, custom=True)
        assert await receive_payload(client) == {"kind": "k", "data": 1}


async def test_messages_from_one_node_arrive_in_the_order_they_were_sent() -> None:
    async with cluster(2) as (a, b):
        client = await b.client()
        assert client.channel is not None
        await a.manager.broadcast({"n": 0})
        await a.manager.send_message(client.channel, {"n": 1})
        await a.manager.send_message_to_user("alice", {"n": 2})
        await a.manager.broadcast({"n": 3})
        assert [await receive_payload(client) for _ in range(4)] == [{"n": i} for i in range(4)]


async def test_send_message_to_a_channel_nobody_holds_raises_unknown_channel() -> None:
    async with cluster(2) as (a, _):
        with pytest.raises(UnknownChannel):
            await a.manager.send_message("no-such-channel", {"x": 1})


async def test_messages_go_only_to_the_node_holding_the_channel() -> None:
    broker = MemoryBroker()
    async with cluster(3, broker) as (a, b, c):
        client = await b.client()
        assert client.channel is not None
        for i in range(5):
            await a.manager.send_message(client.channel, {"i": i})
        for i in range(5):
            assert await receive_payload(client) == {"i": i}
        assert b.backplane.stats.received == 5
        assert c.backplane.stats.received == 0
        assert broker.published.get(c.backplane.node_topic, 0) == 0
        assert broker.published[b.backplane.node_topic] == 5


async def test_broadcast_reaches_every_client_of_every_node_exactly_once() -> None:
    async with cluster(3) as nodes:
        clients = [await node.client(f"{user()}:s") for node in nodes for _ in range(2)]
        ignored = clients[3]
        await nodes[0].manager.broadcast({"n": 1}, ignore_channel=ignored.channel)
        await nodes[1].manager.broadcast({"n": 2})
        for client in clients:
            expected = [{"n": 2}] if client is ignored else [{"n": 1}, {"n": 2}]
            got = [await receive_payload(client) for _ in expected]
            # Per-sender order is kept; across senders it may interleave.
            assert sorted(got, key=lambda p: p["n"]) == expected
        # Nothing more arrives: a last broadcast is the next message everywhere.
        await nodes[2].manager.broadcast({"n": "end"})
        for client in clients:
            assert await receive_payload(client) == {"n": "end"}


async def test_a_broadcast_is_published_once_and_each_node_queues_one_frame_object() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        handlers = [b.manager.create_handler(f"h{i}") for i in range(3)]
        for handler in handlers:  # the init frame
            await handler.queue.get()
        await a.manager.broadcast({"big": "x" * 1000})
        async with asyncio.timeout(TIMEOUT):
            frames = [await handler.queue.get() for handler in handlers]
        assert all(frame is frames[0] for frame in frames)
        assert broker.published[a.backplane.broadcast_topic] == 1
        assert a.backplane.stats.published == 1
        assert b.backplane.stats.delivered == 3
        for handler in handlers:
            b.manager.remove_handler(handler.channel_id)


async def test_send_message_to_user_reaches_each_channel_of_the_user_once() -> None:
    broker = MemoryBroker()
    async with cluster(3, broker) as (a, b, c):
        uid = user()
        on_a = await a.client(f"{uid}:s1")
        on_b = [await b.client(f"{uid}:s2"), await b.client(f"{uid}:s3")]
        other = await c.client(f"{user()}:s1")
        await a.manager.send_message_to_user(uid, {"to": "user"}, ignore_channel=on_b[1].channel)
        assert await receive_payload(on_a) == {"to": "user"}
        assert await receive_payload(on_b[0]) == {"to": "user"}
        await a.manager.broadcast({"to": "all"})
        for client in (on_a, *on_b, other):  # no duplicate, and the ignored channel got nothing
            assert await receive_payload(client) == {"to": "all"}
        # Route by interest: only b holds the user's remote channels.
        assert broker.published.get(c.backplane.node_topic, 0) == 0


async def test_all_user_channels_span_every_node_and_forget_disconnected_ones() -> None:
    async with cluster(2) as (a, b):
        uid = user()
        on_a = await a.client(f"{uid}:s1")
        on_b = await b.client(f"{uid}:s2")
        everywhere = {on_a.channel, on_b.channel}
        assert await a.manager.get_all_user_channels(uid) == everywhere
        assert await b.manager.get_all_user_channels(uid) == everywhere
        assert a.manager.get_user_channels(uid) == {on_a.channel}  # the sync call stays local
        await on_b.close()
        await eventually(lambda: on_b.channel not in b.manager.handlers)
        async with asyncio.timeout(TIMEOUT):
            await b.backplane.flush()
        assert await a.manager.get_all_user_channels(uid) == {on_a.channel}


async def test_a_channel_that_just_left_is_unknown_before_the_directory_catches_up() -> None:
    async with cluster(2) as (a, _):
        a.manager.create_handler("leaving")
        async with asyncio.timeout(TIMEOUT):
            await a.backplane.flush()
        a.manager.remove_handler("leaving")  # its removal is not written yet
        with pytest.raises(UnknownChannel):
            await a.manager.send_message("leaving", {"x": 1})
        with pytest.raises(UnknownChannel):
            await a.manager.send_and_wait("leaving", {"x": 1}, timeout=1)
        assert a.backplane.stats.published == 0


# --------------------------------------------------------------------------- requests


async def test_send_and_wait_to_another_node_returns_the_answer() -> None:
    async with cluster(2) as (a, b):
        client = await b.client()
        seen: list[Request] = []

        def respond(request: Request) -> Any:
            seen.append(request)
            if request.custom:
                return {"custom": request.payload["data"]}
            if request.typename == "VariableRequestMessage":
                return Chunked(["a", "b", "c"], indexed=True, shuffle=True)
            return {"echo": request.payload["q"]}

        client.on_request(respond)
        assert client.channel is not None
        channel = client.channel
        assert await a.manager.send_and_wait(channel, {"q": 1}, timeout=TIMEOUT) == {"echo": 1}
        assert await a.manager.send_and_wait(
            channel, {"kind": "k", "data": 2}, custom=True, timeout=TIMEOUT
        ) == {"custom": 2}
        assert await a.manager.send_and_wait(
            channel, VariableRequestMessage(variable={"v": 1}), timeout=TIMEOUT
        ) == ["a", "b", "c"]
        assert seen[2].payload["variable"] == {"v": 1}
        assert a.backplane._waiting == {} and b.backplane._serving == {}


async def test_a_remote_answer_is_parsed_without_the_process_wide_string_cache() -> None:
    # Two equal strings parsed with pydantic-core's (process-wide) cache would be one object.
    value = str(uuid.uuid4())
    async with cluster(2) as (a, b):
        client = await b.client()
        client.on_request(lambda request: value)
        assert client.channel is not None
        first = await a.manager.send_and_wait(client.channel, {"q": 1}, timeout=TIMEOUT)
        second = await a.manager.send_and_wait(client.channel, {"q": 2}, timeout=TIMEOUT)
        assert first == second == value
        assert first is not second


REQUESTS = [
    ({"rchan": "app", "response_for": "app", "typename": "T", "a": None}, False),
    ({"kind": "k", "error": {"code": "app"}, "rchan": "app"}, True),
    (VariableRequestMessage(variable={"rchan": "x"}), False),
    (ServerVariableMessage(uid="u", sequence_number=3), False),
]


@pytest.mark.parametrize(("message", "custom"), REQUESTS)
async def test_a_request_reaches_a_remote_client_exactly_as_a_local_one_would(
    message: Any, custom: bool,
) -> None:
    async with cluster(2) as (a, b):
        local = a.manager.create_handler("local")
        remote = b.manager.create_handler("remote")
        async with asyncio.timeout(TIMEOUT):
            await b.backplane.flush()
            for handler in (local, remote):
                await handler.queue.get()  # init
        results = []
        for handler in (local, remote):
            asking = asyncio.create_task(
                a.manager.send_and_wait(handler.channel_id, message, custom=custom, timeout=5)
            )
            async with asyncio.timeout(TIMEOUT):
                wire = json.loads(await handler.queue.get())
            rchan = wire["message"].pop("__rchan")
            results.append(wire)
            handler.process_client_message(DaraClientMessage(channel=rchan, message={"ok": 1}))
            assert await asyncio.wait_for(asking, TIMEOUT) == {"ok": 1}
        assert results[0] == results[1]
        a.manager.remove_handler("local")
        b.manager.remove_handler("remote")


@pytest.mark.parametrize(("message", "custom"), REQUESTS)
async def test_a_relayed_request_reaches_the_remote_client_byte_for_byte_as_the_asker_encoded_it(
    message: Any, custom: bool,
) -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        remote = b.manager.create_handler("remote")
        async with asyncio.timeout(TIMEOUT):
            await b.backplane.flush()
            await remote.queue.get()  # init
        published: list[bytes] = []
        spy = broker.subscribe([b.backplane.node_topic], published.append)
        asking = asyncio.create_task(
            a.manager.send_and_wait("remote", message, custom=custom, timeout=5)
        )
        async with asyncio.timeout(TIMEOUT):
            wire = await remote.queue.get()
        broker.unsubscribe(spy)
        (request,) = [m for m in map(decode_bus_message, published) if isinstance(m, RemoteRequest)]
        # Encoded once by the asker, its __rchan being the request id; never re-encoded.
        assert wire == request.frame == build_frame(message, custom=custom,
                                                    rchan=request.request_id)
        remote.process_client_message(
            DaraClientMessage(channel=request.request_id, message={"ok": 1})
        )
        assert await asyncio.wait_for(asking, TIMEOUT) == {"ok": 1}
        b.manager.remove_handler("remote")


async def test_send_and_wait_to_another_node_times_out() -> None:
    async with cluster(2) as (a, b):
        client = await b.client()
        asked = asyncio.Event()
        client.on_request(never_answer(asked))
        assert client.channel is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout):
            await a.manager.send_and_wait(client.channel, {"q": 1}, timeout=0.3)
        assert 0.25 <= loop.time() - started < 2.0
        assert asked.is_set()
        handler = b.manager.handlers[client.channel]
        await eventually(lambda: handler.pending_count == 0)  # the owner gave up too


async def test_send_and_wait_to_another_node_fails_at_once_when_the_client_disconnects() -> None:
    async with cluster(2) as (a, b):
        client, waiting = await unanswered_request(a, b, timeout=30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(waiting, TIMEOUT)
        assert loop.time() - started < 2.0


async def test_a_request_without_timeout_fails_once_the_node_holding_the_channel_is_gone(
) -> None:
    """Review 7 item 7: nothing settled a remote request with no timeout once the node holding
    its channel died (no reply ever comes): it waited for ever."""
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        _, waiting = await unanswered_request(a, b, timeout=None)
        broker.cut(b.backplane.node_id)  # as dead: nobody listens on its topic any more
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(waiting, TIMEOUT)  # within two heartbeats (0.2 s each)
        assert caught.value.code == CloseCode.ABNORMAL
        assert a.backplane._waiting == {} and a.backplane._asked == {}


async def test_a_waiting_request_whose_node_only_blinked_is_not_failed() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        client, waiting = await unanswered_request(a, b, timeout=None)
        (request_id,) = a.backplane._asked
        broker.cut(b.backplane.node_id)
        await eventually(lambda: request_id in a.backplane._unheard)  # one check: not yet
        broker.mend(b.backplane.node_id)
        await eventually(lambda: request_id not in a.backplane._unheard)  # heard again
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await client.close()


async def test_cancelling_a_remote_request_stops_the_wait_on_the_owning_node() -> None:
    async with cluster(2) as (a, b):
        client, waiting = await unanswered_request(a, b, timeout=None)
        handler = b.manager.handlers[client.channel]
        assert handler.pending_count == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: handler.pending_count == 0)


async def test_send_and_wait_to_a_channel_nobody_holds_raises_unknown_channel() -> None:
    async with cluster(2) as (a, _):
        with pytest.raises(UnknownChannel):
            await a.manager.send_and_wait("no-such-channel", {"q": 1}, timeout=1)


async def test_an_invalid_request_payload_fails_on_the_asking_node() -> None:
    async with cluster(2) as (a, b):
        client = await b.client()
        assert client.channel is not None
        with pytest.raises(ValueError, match="kind"):
            await a.manager.send_and_wait(client.channel, {"no": "kind"}, custom=True)
        assert a.backplane.stats.published == 0


# --------------------------------------------------------------------------- faults


async def test_a_bus_outage_keeps_local_delivery_and_reports_what_was_not_published(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dara_ws_core.backplane")
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        local = await a.client(f"{user()}:s")
        remote = await b.client(f"{user()}:s")
        assert remote.channel is not None
        broker.fail()
        await eventually(lambda: not a.backplane.connected)
        await a.manager.broadcast({"during": "outage"})
        assert await receive_payload(local) == {"during": "outage"}  # local delivery works
        with pytest.raises(BackplaneError):
            await a.manager.send_message(remote.channel, {"x": 1})
        # Kept: it waits in the spool for the bus (kept once it is back), not counted lost.
        await a.manager.send_message_to_user("someone", {"x": 1})
        # Not kept (it skips a channel): at most once, as a broadcast; counted, not raised.
        await a.manager.send_message_to_user("someone", {"x": 2}, ignore_channel="other")
        assert a.backplane.stats.failed == 3
        assert "backplane disconnected" in caplog.text
        assert "backplane unavailable" in caplog.text
        broker.recover()
        async with asyncio.timeout(TIMEOUT):
            await a.backplane.wait_connected()
            await b.backplane.wait_connected()
        assert "3 message(s) for other processes could not be published" in caplog.text
        assert a.backplane.stats.reconnects == 1
        await eventually(lambda: broker.pending("someone") == 1)  # the spooled one, once
        await a.manager.send_message(remote.channel, {"after": "outage"})
        assert await receive_payload(remote) == {"after": "outage"}


async def test_kept_sends_wait_in_a_bounded_spool_and_only_a_full_spool_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dara_ws_core.backplane")
    broker = MemoryBroker()
    async with cluster(2, broker, max_spool=3) as (a, _):
        broker.fail()
        await eventually(lambda: not a.backplane.connected)
        for n in range(3):  # within the bound: taken, kept once the bus is back
            await a.manager.send_message_to_user("carol", {"n": n})
            await asyncio.sleep(0)  # each one fails on its own (spooled behind the others)
        with pytest.raises(BackplaneError, match="spool is full"):  # the caller is told
            await a.manager.send_message_to_user("carol", {"n": 3})
        # A revocation has room of its own: the kept messages never crowd it out.
        a.backplane.disconnect("user", "carol", 1008, "revoked")
        await eventually(lambda: len(a.backplane._spool) == 4, "the revocation spooled too")
        assert a.backplane.stats.failed == 1
        broker.recover()
        await eventually(lambda: broker.pending("carol") == 3)
        outbox = broker.outboxes["carol"]
        kept = [decode_bus_message(e.frame) for e in outbox.after("carol", None, broker.clock())[0]]
        assert [json.loads(m.frame)["message"]["n"] for m in kept  # type: ignore[union-attr]
                ] == [0, 1, 2]  # in order
        await eventually(lambda: "user:carol" in broker.revoked, "the revocation recorded")
        assert a.backplane.stats.failed == 1


async def test_kept_sends_made_at_once_while_down_are_kept_within_the_spools_bytes() -> None:
    """The spool's bounds count the kept messages already queued (not only the spooled ones):
    of kept sends made in one loop tick while the bus is down, each either raises or is kept,
    none dropped later for the spool's bytes."""
    broker = MemoryBroker()
    async with cluster(1, broker, max_spool_bytes=400) as (a,):
        broker.fail()
        await eventually(lambda: not a.backplane.connected)
        results = await asyncio.gather(*(a.manager.send_message_to_user(f"k{i}", {"n": i})
                                         for i in range(8)), return_exceptions=True)
        kept = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
        assert 0 < len(kept) < 8  # the case under test: the bound refused some
        assert all(isinstance(results[i], BackplaneError) for i in range(8) if i not in kept)
        await eventually(lambda: len(a.backplane._spool) == len(kept), "all of them spooled")
        assert a.backplane._spool_bytes <= 400
        assert a.backplane.stats.failed == 8 - len(kept)  # the refused ones only
        broker.recover()
        await eventually(lambda: all(broker.pending(f"k{i}") == 1 for i in kept))


async def test_a_node_restarted_under_the_same_id_keeps_its_new_messages() -> None:
    """Two lives of node n0 number their kept messages alike (as if the clock stepped back):
    the broker keeps the second life's too, none answered as the first life's."""
    broker = MemoryBroker()
    for life in range(2):
        async with cluster(1, broker) as (a,):
            a.backplane._kids = itertools.count(1)
            await a.manager.send_message_to_user("restarted", {"n": life})
            async with asyncio.timeout(TIMEOUT):
                await a.backplane.flush()
    assert broker.pending("restarted") == 2


async def test_a_kept_send_once_stop_began_raises_rather_than_being_told_kept() -> None:
    """stop() ends the publishing: a kept send waiting for room in the outbox then, or made
    after, raises BackplaneError (nothing would publish it); none is queued."""
    async with cluster(1, max_outbox=1) as (a,):
        backplane = a.backplane
        publish, answer = backplane._publish_batch, asyncio.Event()

        async def held_link(batch: Any) -> Any:  # a fault: the bus answers late, if ever
            async with asyncio.timeout(TIMEOUT):
                await answer.wait()
            return await publish(batch)

        backplane._publish_batch = held_link  # type: ignore[method-assign]
        await a.manager.send_message_to_user("u", {"n": 0})  # in flight, held
        await eventually(lambda: not backplane._outbox)
        await a.manager.send_message_to_user("u", {"n": 1})  # fills the outbox
        waiting = asyncio.create_task(a.manager.send_message_to_user("u", {"n": 2}))
        await eventually(lambda: backplane._room_waiting == 1, "a sender waits for room")
        await backplane.stop()
        with pytest.raises(BackplaneError, match="stopped"):
            await waiting
        with pytest.raises(BackplaneError, match="stopped"):
            await a.manager.send_message_to_user("v", {"n": 3})
        assert not backplane._outbox


async def test_after_a_restart_that_lost_the_directory_every_node_registers_again() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        uid = user()
        remote = await b.client(f"{uid}:s")
        assert remote.channel is not None
        broker.fail()
        broker.forget()
        broker.recover()
        await eventually(lambda: a.backplane.stats.reconnects == b.backplane.stats.reconnects == 1)
        async with asyncio.timeout(TIMEOUT):
            await b.backplane.flush()
        await a.manager.send_message(remote.channel, {"x": 1})
        assert await receive_payload(remote) == {"x": 1}
        assert await a.manager.get_all_user_channels(uid) == {remote.channel}


async def test_a_waiting_request_fails_at_once_when_the_bus_connection_is_lost() -> None:
    broker = MemoryBroker()
    async with cluster(2, broker) as (a, b):
        _, waiting = await unanswered_request(a, b, timeout=30)
        broker.fail()
        with pytest.raises(BackplaneError, match="lost"):
            await asyncio.wait_for(waiting, TIMEOUT)


async def test_a_dead_node_leaves_nothing_registered_beyond_the_expiry() -> None:
    now = [1000.0]
    broker = MemoryBroker(clock=lambda: now[0])
    async with cluster(2, broker, heartbeat_interval=60.0) as (a, b):
        uid = user()
        on_a = await a.client(f"{uid}:s1")
        on_b = await b.client(f"{uid}:s2")
        assert on_b.channel is not None
        # b dies: no goodbye, no more heartbeats (its subscription ends with the process).
        for task in (b.backplane._bus_task, b.backplane._writer_task):
            assert task is not None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(UnknownChannel):  # within the expiry: nobody listens for it
            await a.manager.send_message(on_b.channel, {"x": 1})
        assert on_b.channel in broker.registered()[0]
        # Within the expiry a node nobody listens for may only be cut off: its entries stay, and
        # what it missed is in the user's history (recovered if it comes back).
        await a.manager.send_message_to_user(uid, {"x": 1})
        async with asyncio.timeout(TIMEOUT):
            await a.backplane.flush()
        assert await receive_payload(on_a) == {"x": 1}
        assert broker._users[uid] == {on_a.channel: "n0", on_b.channel: "n1"}
        assert len(broker.outboxes[uid].after(uid, None, broker.clock())[0]) == 1
        assert broker.missed == {}
        now[0] += b.backplane.expiry + 1
        assert on_b.channel not in broker.registered()[0]
        # Past it, a message to the user drops the entries of the dead node.
        await a.manager.send_message_to_user(uid, {"x": 2})
        async with asyncio.timeout(TIMEOUT):
            await a.backplane.flush()
        assert await receive_payload(on_a) == {"x": 2}
        assert on_b.channel not in broker._users.get(uid, {})
        assert await a.manager.get_all_user_channels(uid) == {on_a.channel}
        with pytest.raises(UnknownChannel):
            await a.manager.send_message(on_b.channel, {"x": 1})
