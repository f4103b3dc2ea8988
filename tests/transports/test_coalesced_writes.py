"""Coalesced writes on the websockets, aiohttp and picows adapters (``SupportsCork``), counted
on real sockets.

The server's asyncio transports get a counting ``write`` and their sockets a counting ``send``
(the real socket, its class swapped for a subclass that counts and calls through), so these tests
see the system calls a burst really costs; the clients are plain ``websockets`` clients reading
the frames as they arrive. picows writes its own frames (pongs, closes, an awaited ``send``) with
a ``send()`` from C while asyncio's buffer is empty, which no counter here sees: on picows a
corked frame is one that appears in the counted writes, and order is checked by the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.frames import Frame, Opcode

from dara_ws_aiohttp import AiohttpTransport
from dara_ws_aiohttp import serve as aiohttp_serve
from dara_ws_core import Endpoint, Identity, ServerConfig, WebSocketHandler, WebsocketManager, token_authenticator
from dara_ws_core.codec import build_frame
from dara_ws_core.driver import THROUGH_AFTER, THROUGH_MIN_CONNECTIONS, _flusher, fan_out_through, write_through
from dara_ws_core.exceptions import CloseCode
from dara_ws_core.stats import Counters
from dara_ws_core.transport import SupportsCork, text_frame_header
from dara_ws_picows import PicowsTransport
from dara_ws_picows import serve as picows_serve
from dara_ws_websockets import WebsocketsTransport, serve
from tests.helpers import eventually
from tests.hostile import TEXT, HostileClient, open_channel
from tests.stacks import running_stack

TIMEOUT = 10.0

#: send()/sendmsg() system calls per socket file descriptor, counted by ``_CountingSocket``.
SENDS: collections.Counter[int] = collections.Counter()


class _CountingSocket(socket.socket):
    """A real socket that counts its send system calls (same layout: ``__class__`` swaps)."""

    __slots__ = ()

    def send(self, data: Any, flags: int = 0) -> int:
        SENDS[self.fileno()] += 1
        return super().send(data, flags)

    def sendmsg(self, *args: Any) -> int:
        SENDS[self.fileno()] += 1
        return super().sendmsg(*args)


class Wire:
    """What one server-side connection writes from now on: ``write`` calls and send syscalls."""

    def __init__(self, conn: ServerConnection | Any) -> None:
        # websockets' connection, aiohttp's frame writer, or picows' WSTransport
        transport: Any = getattr(conn, "underlying_transport", None) or conn.transport
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        transport._sock.__class__ = _CountingSocket  # the real socket, counted
        SENDS[self.fd] = 0
        self.writes: list[bytes] = []
        write = transport.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            self.writes.append(bytes(data))
            write(data)

        transport.write = counting_write

    @property
    def sends(self) -> int:
        return SENDS[self.fd]

    def frames(self) -> list[tuple[int, bytes]]:
        """The (opcode, payload) of every frame written (server frames are not masked)."""
        return server_frames(b"".join(self.writes))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of the whole server frames (not masked) ``data`` holds."""
    out, pos = [], 0
    while pos < len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        out.append((opcode, data[pos:pos + length]))
        pos += length
    assert pos == len(data), "a write ended inside a frame"
    return out


def arrived(client: ClientConnection) -> list[Any]:
    """The messages in the client's socket that its loop has not read yet (peeked, left there)."""
    with socket.fromfd(client.transport.get_extra_info("socket").fileno(), socket.AF_INET,
                       socket.SOCK_STREAM) as peek:  # a duplicate of the client's socket
        try:
            data = peek.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = b""
    return [json.loads(payload)["message"] for _, payload in server_frames(data)]


class Served:
    def __init__(self, manager: WebsocketManager, native: Any, url: str, adapter: str) -> None:
        self.manager, self.native, self.url, self.adapter = manager, native, url, adapter

    async def clients(self, n: int) -> list[ClientConnection]:
        """``n`` connected clients whose init frame has arrived (nothing corked any more)."""
        clients = await asyncio.gather(*(ws_connect(f"{self.url}?token=u{i}", compression=None)
                                         for i in range(n)))
        for client in clients:
            assert json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))["type"] == "init"
        await eventually(lambda: len(self.manager.handlers) == n, "every channel registered")
        return list(clients)

    def wires(self) -> list[Wire]:
        if self.adapter == "websockets":
            return [Wire(conn) for conn in self.native.connections]
        # The writer of each connection's aiohttp WebSocketResponse, or its picows WSTransport.
        return [Wire(getattr(h._sink.transport._ws, "_writer", h._sink.transport._ws))  # type: ignore[union-attr]
                for h in self.manager.handlers.values()]


@contextlib.asynccontextmanager
async def served(adapter: str = "websockets", **config: Any) -> AsyncIterator[Served]:
    manager = WebsocketManager(ServerConfig(**config))
    endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id="s")))
    if adapter == "aiohttp":
        async with aiohttp_serve(endpoint, "127.0.0.1", 0) as server:
            yield Served(manager, server.native, server.url, adapter)
        return
    if adapter == "picows":
        async with picows_serve(endpoint, "127.0.0.1", 0) as picows_server:
            yield Served(manager, picows_server.native, picows_server.url, adapter)
        return
    async with serve(endpoint, "127.0.0.1", 0, ping_interval=None) as server:
        yield Served(manager, server.native, server.url, adapter)


async def received(client: ClientConnection, n: int) -> list[Any]:
    return [json.loads(await asyncio.wait_for(client.recv(), TIMEOUT)) for _ in range(n)]


ADAPTERS = ["websockets", "aiohttp", "picows"]


def test_the_socket_transports_cork() -> None:
    assert issubclass(WebsocketsTransport, SupportsCork)
    assert issubclass(AiohttpTransport, SupportsCork)
    assert issubclass(PicowsTransport, SupportsCork)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_burst_of_broadcasts_costs_one_send_per_connection(adapter: str) -> None:
    n, burst = 300, 10
    async with served(adapter) as srv:
        clients = await srv.clients(n)
        wires = srv.wires()
        for i in range(burst):  # one loop iteration: no await suspends in between
            await srv.manager.broadcast({"n": i})
        got = await asyncio.gather(*(received(c, burst) for c in clients))
        assert all([m["message"]["n"] for m in msgs] == list(range(burst)) for msgs in got)
        assert [len(w.writes) for w in wires] == [1] * n
        assert [w.sends for w in wires] == [1] * n
        assert all(len(w.frames()) == burst for w in wires)
        for client in clients:
            await client.close()


async def test_broadcasts_in_separate_iterations_are_written_separately() -> None:
    async with served() as srv:
        (client,) = await srv.clients(1)
        (wire,) = srv.wires()
        for i in range(3):
            await srv.manager.broadcast({"n": i})
            await eventually(lambda: len(wire.writes) == i + 1, "a write per iteration")  # noqa: B023
        assert [m["message"]["n"] for m in await received(client, 3)] == [0, 1, 2]
        await client.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_burst_over_the_write_limit_queues_the_rest_and_keeps_the_order(adapter: str) -> None:
    # 200 frames of ~1 KiB: the cork takes them up to the 32 KiB write limit, the bounded queue
    # the rest, and the send task flushes the cork before its first awaited send.
    async with served(adapter) as srv:
        (client,) = await srv.clients(1)
        (wire,) = srv.wires()
        pad = "x" * 1000
        for i in range(200):
            await srv.manager.broadcast({"n": i, "pad": pad})
        assert [m["message"]["n"] for m in await received(client, 200)] == list(range(200))
        written = [json.loads(p)["message"]["n"] for _, p in wire.frames()]
        if adapter == "picows":  # picows' own awaited sends are not counted: the corked ones are
            assert written[:30] == list(range(30)) and written == sorted(written)
        else:
            assert written == list(range(200))
        assert len(wire.writes) < 100  # coalesced even past the limit
        await client.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("count", [1, 5])  # picows keeps a lone frame unframed: both ways
async def test_a_close_decided_while_corked_sends_the_corked_frames_first(adapter: str, count: int) -> None:
    async with served(adapter) as srv:
        (client,) = await srv.clients(1)
        (wire,) = srv.wires()
        (handler,) = srv.manager.handlers.values()
        for i in range(count):
            await srv.manager.broadcast({"n": i})
        handler.close(4321, "bye")  # same iteration: the frames above are still corked
        assert [m["message"]["n"] for m in await received(client, count)] == list(range(count))
        with pytest.raises(WsConnectionClosed) as caught:
            await asyncio.wait_for(client.recv(), TIMEOUT)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 4321
        # Once the socket is closed every write the close could have been followed by was made.
        await eventually(lambda: wire.transport.is_closing() and not srv.manager.handlers,
                         "the channel and its socket gone")
        frames = wire.frames()
        if adapter == "picows":  # picows writes its close frame and a lone frame itself (the
            assert [op for op, _ in frames] == ([1] * 5 if count > 1 else [])  # client saw them)
            return
        assert [op for op, _ in frames] == [1] * count + [8]  # the text frames, the close, nothing after
        assert frames[-1][1][:2] == (4321).to_bytes(2, "big")


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("count", [1, 5])
async def test_an_abort_while_corked_drops_the_frames_and_never_writes(adapter: str, count: int) -> None:
    async with served(adapter) as srv:
        (client,) = await srv.clients(1)
        (wire,) = srv.wires()
        (handler,) = srv.manager.handlers.values()
        for i in range(count):
            await srv.manager.broadcast({"n": i})
        wire.transport.abort()  # same iteration: the flush that follows must not write
        with pytest.raises(WsConnectionClosed):
            await asyncio.wait_for(client.recv(), TIMEOUT)
        await eventually(lambda: handler.closed, "the channel closed")
        assert wire.writes == [] and wire.sends == 0


async def test_a_round_trip_is_flushed_within_the_iteration() -> None:
    # send_and_wait corks its request like any frame: the flush must not wait for more traffic.
    async with served() as srv:
        (client,) = await srv.clients(1)
        (wire,) = srv.wires()
        (handler,) = srv.manager.handlers.values()

        async def answer() -> None:
            request = json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))
            await client.send(json.dumps({"type": "message", "channel": request["message"]["__rchan"],
                                          "message": {"ok": request["message"]["q"]}}))

        answering = asyncio.create_task(answer())
        assert await handler.send_and_wait({"q": 7}, timeout=TIMEOUT) == {"ok": 7}
        await answering
        assert len(wire.writes) == 1
        await client.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_request_is_written_before_send_and_wait_first_suspends(adapter: str) -> None:
    # A request waits for its answer: its frame goes out at once, with what was corked before
    # it (in order), not at the end of the loop iteration.
    async with served(adapter) as srv:
        (client,) = await srv.clients(1)
        (handler,) = srv.manager.handlers.values()
        await srv.manager.send_message(handler.channel_id, {"before": 1})  # corked
        assert arrived(client) == []
        request = handler.send_and_wait({"q": 7}, timeout=TIMEOUT)
        waiting = request.send(None)  # runs until it awaits the answer: no loop iteration
        sent = arrived(client)  # in the client's socket already
        assert sent[0] == {"before": 1}
        assert sent[1]["q"] == 7
        assert len(sent) == 2
        request.close()  # abandoned: its request is withdrawn (the round trip is tested above)
        assert waiting is not None
        assert len(handler.connection.pending) == 0
        frames = await received(client, 2)
        assert frames[0]["message"] == {"before": 1}
        assert frames[1]["message"]["q"] == 7
        # With nothing corked, on a transport that also writes synchronously, the request
        # schedules no flush pass of the loop either.
        flusher = _flusher(asyncio.get_running_loop())
        assert not flusher._scheduled
        request = handler.send_and_wait({"q": 8}, timeout=TIMEOUT)
        request.send(None)
        assert flusher._scheduled is (adapter == "aiohttp")
        assert arrived(client)[0]["q"] == 8
        request.close()
        assert (await received(client, 1))[0]["message"]["q"] == 8
        await client.close()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_the_corked_frame_header_is_what_websockets_serializes(size: int) -> None:
    payload = b"x" * size
    serialized = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert text_frame_header(size) + payload == serialized


async def test_a_keepalive_ping_from_picows_goes_after_the_corked_frames() -> None:
    # picows' keepalive timer calls the listener's send_user_specific_ping: called here within
    # the iteration that corked three frames, its ping must reach the client after them.
    async with served("picows") as srv:
        port = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        client = await HostileClient.open(port)
        assert (await client.handshake("/api/core/ws?token=u0")).status == 101
        assert json.loads((await client.read_frame()).text)["type"] == "init"
        await eventually(lambda: len(srv.manager.handlers) == 1, "the channel registered")
        (handler,) = srv.manager.handlers.values()
        transport: Any = handler._sink.transport  # type: ignore[union-attr]
        for i in range(3):
            await srv.manager.broadcast({"n": i})
        transport.send_user_specific_ping(transport._ws)
        frames = [await client.read_frame() for _ in range(4)]
        assert [f.opcode for f in frames] == [1, 1, 1, 9]
        assert [json.loads(f.text)["message"]["n"] for f in frames[:3]] == [0, 1, 2]
        client.abort()


# ---------------------------------------------------------------- written through (fan-outs of one frame)


async def fan_out_one_frame_per_iteration(srv: Served, times: int) -> None:
    for i in range(times):
        await srv.manager.broadcast({"n": i})
        await asyncio.sleep(0)  # the flusher's pass (scheduled first) ends the iteration


async def got_after_warm_up(clients: list[ClientConnection], expected: list[list[Any]]) -> None:
    """Each client got its ``expected`` messages (``n``) after the warm-up fan-outs, and nothing more."""
    got = await asyncio.gather(*(received(c, THROUGH_AFTER + 1 + len(e))
                                 for c, e in zip(clients, expected, strict=True)))
    assert [[m["message"]["n"] for m in msgs[THROUGH_AFTER + 1:]] for msgs in got] == expected
    assert not any(arrived(c) for c in clients)  # nothing more


def counting_offers(monkeypatch: pytest.MonkeyPatch) -> list[WebSocketHandler]:
    """The handlers ``WebSocketHandler.offer`` is called for (the checked path), until undone."""
    offered: list[WebSocketHandler] = []
    offer = WebSocketHandler.offer

    def counted_offer(handler: WebSocketHandler, frame: bytes, *args: Any, **kw: Any) -> bool:
        offered.append(handler)
        return offer(handler, frame, *args, **kw)

    monkeypatch.setattr(WebSocketHandler, "offer", counted_offer)
    return offered


def corked_now(handler: Any) -> bool:
    """Whether the connection's driver waits for the flusher's pass (picows writes uncounted)."""
    return handler._sink._corked  # type: ignore[no-any-return]


@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_fan_outs_of_one_frame_per_iteration_are_written_through(
    adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No burst to coalesce: after THROUGH_AFTER such fan-outs the cork is skipped, and a frame
    # is written within the broadcast call (one system call either way, one pass less), by the
    # fan-out loop itself (fan_out_through): no recipient goes through WebSocketHandler.offer.
    n = THROUGH_MIN_CONNECTIONS + 6
    async with served(adapter) as srv:
        clients = await srv.clients(n)
        wires, handlers = srv.wires(), list(srv.manager.handlers.values())
        await srv.manager.broadcast({"n": -1})
        assert all(corked_now(h) for h in handlers)  # first: corked, nothing written yet
        assert [len(w.writes) for w in wires] == [0] * n
        await asyncio.sleep(0)
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER)
        before = [len(w.writes) for w in wires]
        offered = counting_offers(monkeypatch)
        await srv.manager.broadcast({"n": THROUGH_AFTER})
        monkeypatch.undo()
        assert offered == []  # every recipient written by the fan-out loop
        assert not any(corked_now(h) for h in handlers)  # written through, within the call
        if adapter == "websockets":  # (picows writes it from C, uncounted)
            assert [len(w.writes) - b for w, b in zip(wires, before, strict=True)] == [1] * n
        got = await asyncio.gather(*(received(c, THROUGH_AFTER + 2) for c in clients))
        assert all([m["message"]["n"] for m in msgs] == list(range(-1, THROUGH_AFTER + 1)) for msgs in got)
        assert all(h.flushed == h.accepted for h in handlers)  # every frame counted as written
        for client in clients:
            await client.close()


async def test_a_burst_after_fan_outs_written_through_is_corked_again() -> None:
    n, burst = THROUGH_MIN_CONNECTIONS + 6, 10
    async with served() as srv:
        clients = await srv.clients(n)
        wires = srv.wires()
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        for first in (True, False):
            before = [len(w.writes) for w in wires]
            for i in range(burst):  # one iteration
                await srv.manager.broadcast({"n": i})
            await asyncio.sleep(0)
            writes = [len(w.writes) - b for w, b in zip(wires, before, strict=True)]
            # The first burst: its first frame written through, the rest corked (two writes);
            # the next one: corked from its first frame (one write per connection).
            assert writes == [2 if first else 1] * n
        got = await asyncio.gather(*(received(c, THROUGH_AFTER + 1 + 2 * burst) for c in clients))
        assert all([m["message"]["n"] for m in msgs[THROUGH_AFTER + 1:]] == list(range(burst)) * 2 for msgs in got)
        for client in clients:
            await client.close()


def test_the_write_mode_turns_through_after_a_streak_of_single_frame_fan_outs() -> None:
    fan_out = {"corked": THROUGH_MIN_CONNECTIONS, "frames": THROUGH_MIN_CONNECTIONS, "written": 0, "doubled": 0}
    through, streak = False, 0
    for _ in range(THROUGH_AFTER - 1):
        through, streak = write_through(through, streak, **fan_out)
        assert not through
    assert write_through(through, streak, **fan_out) == (True, 0 + THROUGH_AFTER)
    # Too few connections to be a fan-out: the streak neither grows nor ends.
    assert write_through(False, 3, corked=THROUGH_MIN_CONNECTIONS - 1, frames=THROUGH_MIN_CONNECTIONS - 1,
                         written=0, doubled=0) == (False, 3)
    # A burst coalesced: the streak starts again.
    assert write_through(False, 3, corked=100, frames=1000, written=0, doubled=0) == (False, 0)


def test_the_write_mode_corks_again_once_connections_get_two_frames_an_iteration() -> None:
    assert write_through(True, 0, corked=0, frames=0, written=1000, doubled=0) == (True, 0)
    assert write_through(True, 0, corked=125, frames=125, written=1000, doubled=125) == (True, 0)
    assert write_through(True, 0, corked=126, frames=1260, written=1000, doubled=126) == (False, 0)


# ---------------------------------------------------------------- the written-through fan-out loop (fan_out_through)


def server_socket(handler: Any) -> socket.socket:
    transport: Any = handler._sink.transport._ws
    native = getattr(transport, "underlying_transport", None) or transport.transport
    sock: socket.socket = native.get_extra_info("socket")
    return sock


#: Frames of ~4 KiB, a queue of 8: a client that stops reading falls behind within a few dozen.
STUCK = {"max_queue_messages": 8, "max_queue_bytes": 1 << 20, "close_timeout": 0.5}
BEHIND_WITHIN = 400


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest", "wait"])
@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_a_fan_out_written_through_leaves_a_client_that_stopped_reading_to_its_queue(
        adapter: str, policy: str) -> None:
    # While the loop writes through, every recipient that can take the frame at once is written
    # directly; the one that stopped reading (its transport paused, then its queue full) takes
    # the queue and its slow-consumer policy, and the others never wait for it nor lose a frame.
    n = THROUGH_MIN_CONNECTIONS + 2
    async with served(adapter, slow_consumer_policy=policy, **STUCK) as srv:
        clients = await srv.clients(n)
        port = int(srv.url.rsplit(":", 1)[1].split("/")[0])
        stuck = await HostileClient.open(port, rcvbuf=4096)
        assert (await stuck.handshake("/api/core/ws?token=stuck")).status == 101
        assert json.loads((await stuck.read_frame()).text)["type"] == "init"
        await eventually(lambda: len(srv.manager.handlers) == n + 1, "every channel registered")
        stuck_handler = next(h for h in srv.manager.handlers.values() if h.identity and h.identity.user_id == "stuck")
        healthy = [h for h in srv.manager.handlers.values() if h is not stuck_handler]
        server_socket(stuck_handler).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stuck.stop_reading()
        flusher = _flusher(asyncio.get_running_loop())
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        assert flusher.through
        frames_out = srv.manager.counters.frames_out
        accepted = {h: h.accepted for h in srv.manager.handlers.values()}
        pad, sent, paused_seen = "x" * 4000, 0, False
        while sent < BEHIND_WITHIN and stuck_handler.dropped == 0 and not stuck_handler.closed:
            await srv.manager.broadcast({"n": sent, "pad": pad})
            sent += 1
            await asyncio.sleep(0)  # one fan-out per iteration
            if adapter == "picows" and stuck_handler.queue:
                # Its transport refuses (writing paused): no unchecked writer is offered.
                paused_seen = paused_seen or stuck_handler._sink.transport.writer is None  # type: ignore[union-attr]
            await eventually(lambda: not any(h.queue for h in healthy), "the healthy ones keep up")
        assert sent < BEHIND_WITHIN, "the client that stopped reading never fell behind"
        assert flusher.through  # the fan-outs were written through all along
        assert paused_seen or adapter != "picows"
        if policy == "drop_oldest":
            assert stuck_handler.channel_id in srv.manager.handlers
            # Reading again, while the fan-outs go on: what its queue kept, then what came after
            # (written directly again once its queue is empty), in order.
            stuck.resume_reading()
            more = 40
            seen: list[int] = []
            for i in range(sent, sent + more):
                await srv.manager.broadcast({"n": i, "pad": pad})
                await asyncio.sleep(0)
                await eventually(lambda: not any(h.queue for h in healthy), "the healthy ones keep up")
            sent += more
            while not seen or seen[-1] != sent - 1:
                message = json.loads((await stuck.read_frame()).text)["message"]
                if "pad" in message:  # (not the frames of the first fan-outs)
                    seen.append(message["n"])
            assert seen == sorted(set(seen))  # in order, none twice, up to the last one
            if adapter == "picows":
                assert stuck_handler._sink.transport.writer is not None  # type: ignore[union-attr]
        else:  # never waited for: disconnected with 1013 at once
            await eventually(lambda: stuck_handler.channel_id not in srv.manager.handlers, "the stuck one is gone")
            assert stuck_handler.close_reason is not None
            assert stuck_handler.close_reason.code == 1013
        got = await asyncio.gather(*(received(c, THROUGH_AFTER + 1 + sent) for c in clients))
        assert all([m["message"]["n"] for m in msgs[THROUGH_AFTER + 1:]] == list(range(sent)) for msgs in got)
        assert all(h.flushed == h.accepted for h in healthy)  # every frame written, and counted so
        # Counted once per frame a channel took, whichever path took it.
        assert srv.manager.counters.frames_out - frames_out == sum(h.accepted - a for h, a in accepted.items())
        stuck.abort()
        for client in clients:
            await client.close()


@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_a_fan_out_written_through_skips_the_ignored_channel_and_acknowledges_kept_frames(
        adapter: str) -> None:
    n = THROUGH_MIN_CONNECTIONS + 2
    async with served(adapter) as srv:
        clients = await srv.clients(n)
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        flusher = _flusher(asyncio.get_running_loop())
        assert flusher.through
        handlers = list(srv.manager.handlers.values())
        skipped = handlers[3]
        accepted = [h.accepted for h in handlers]
        await srv.manager.broadcast({"n": "all but one"}, ignore_channel=skipped.channel_id)
        took = [h.accepted - a for h, a in zip(handlers, accepted, strict=True)]
        assert took == [int(h is not skipped) for h in handlers]
        assert not any(corked_now(h) for h in handlers)  # written within the call
        # A per-user send kept in the outbox, the connection's second frame this iteration:
        # corked, and acknowledged once the loop's flush wrote it, not before.
        user = handlers[5].identity.user_id  # type: ignore[union-attr]
        await srv.manager.send_message_to_user(user, {"n": "kept"})
        assert srv.manager.outbox.pending(user) == 1
        assert handlers[5].flushed == handlers[5].accepted
        await eventually(lambda: srv.manager.outbox.pending(user) == 0, "acknowledged once flushed")
        by_user = {h.identity.user_id: h for h in handlers}  # type: ignore[union-attr]
        expected = [["all but one"] * (by_user[f"u{i}"] is not skipped) + ["kept"] * (f"u{i}" == user)
                    for i in range(n)]
        await got_after_warm_up(clients, expected)
        # Taken before the close: a driver that is over leaves its handler (no sink any more).
        transports: list[Any] = [h._sink.transport for h in handlers]  # type: ignore[union-attr]
        for client in clients:
            await client.close()
        if adapter == "picows":  # closed: no unchecked write is offered any more
            await eventually(lambda: not srv.manager.handlers, "every channel gone")
            assert all(t.writer is None for t in transports)


def test_the_fan_out_loop_follows_the_running_loops_write_mode() -> None:
    # fan_out_through keeps the last loop's flusher: another loop must get its own.
    async def fan_out(through: bool | None) -> tuple[int, list[Any]] | None:
        if through is not None:
            _flusher(asyncio.get_running_loop()).through = through
        return fan_out_through([], b"{}", None, Counters())

    assert fan_out_through([], b"{}", None, Counters()) is None  # no loop running
    assert asyncio.run(fan_out(None)) is None  # no connection on this loop: no flusher
    assert asyncio.run(fan_out(True)) == (0, [])
    assert asyncio.run(fan_out(False)) is None  # not the previous loop's mode
    assert asyncio.run(fan_out(True)) == (0, [])


async def test_a_kept_per_user_message_is_never_written_into_a_connection_picows_closed() -> None:
    # picows fails a connection by itself on a protocol error (here an unmasked client frame):
    # it sends its close frame at once and drops the TCP connection 10 ms later, telling its
    # listener only then, so the adapter's writer is still offered. A broadcast written through
    # in that window is merely lost with the connection; a per-user message that the history
    # keeps must not be counted as written there, or the history acknowledges it and the
    # user's next connection never gets it.
    async with running_stack("picows", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        clients = [await open_channel(stack.port) for _ in range(THROUGH_MIN_CONNECTIONS + 6)]
        victim = await HostileClient.open(stack.port)
        assert (await victim.handshake("/api/core/ws?token=victim:s9")).status == 101
        await victim.read_frame()  # init
        await eventually(lambda: len(stack.manager.handlers) == len(clients) + 1, "all connected")
        for i in range(THROUGH_AFTER + 2):
            await stack.manager.broadcast({"warm": i})
            await asyncio.sleep(0)
        assert _flusher(asyncio.get_running_loop()).through
        (channel,) = stack.manager.get_user_channels("victim")
        handler = stack.manager.handlers[channel]
        transport: Any = handler._sink.transport  # type: ignore[union-attr]
        victim.send_frame(TEXT, '{"type":"ping"}', mask=False)
        async with asyncio.timeout(5):  # one loop iteration at a time: the window is 10 ms
            while not transport._ws.is_close_frame_sent:
                await asyncio.sleep(0)
        assert transport._gone is None and channel in stack.manager.handlers  # within the window
        flushed = handler.flushed
        await stack.manager.send_message_to_user("victim", {"important": 1})
        assert handler.flushed == flushed  # not counted as written
        await eventually(lambda: channel not in stack.manager.handlers, "the victim's channel gone")
        again = await HostileClient.open(stack.port)
        assert (await again.handshake("/api/core/ws?token=victim:s9")).status == 101
        frames = [json.loads((await again.read_frame()).text) for _ in range(2)]
        assert frames[0]["type"] == "init"
        assert frames[1]["message"] == {"important": 1}  # replayed from the history
        for client in [victim, again, *(c for c, _ in clients)]:
            client.abort()


# ---------------------------------------------------------------- the write the fan-out holds (handler._through)


async def armed(srv: Served, handler: WebSocketHandler) -> None:
    """One fan-out per iteration until the connection's driver hands the fan-out its write again."""
    for i in range(200):  # bounded: each condition ends within a few iterations (ACK_INTERVAL)
        if handler._through is not None:
            return
        await srv.manager.broadcast({"n": f"again {i}"})
        await asyncio.sleep(0.005)
    raise AssertionError("the fan-out never got the connection's write back")


def frame(n: str) -> bytes:
    return build_frame({"n": n})


@pytest.mark.parametrize("condition", ["corked", "queued", "waited for", "acknowledged", "closed"])
@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_the_fan_out_stops_writing_through_a_connection_the_moment_a_condition_ends(
        adapter: str, condition: str) -> None:
    # The fan-out written through reads one attribute per recipient (its write, or None) and
    # the iteration it was last written in: whatever ends a condition of that write drops it at
    # once, so a fan-out later in the same iteration takes the checked path (offer), which
    # corks, queues, counts for whoever waits for a frame number, or skips a closed channel.
    n = THROUGH_MIN_CONNECTIONS + 2
    async with served(adapter, slow_consumer_policy="drop_oldest") as srv:
        clients = await srv.clients(n)
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        assert _flusher(asyncio.get_running_loop()).through
        by_user = {h.identity.user_id: h for h in srv.manager.handlers.values()}  # type: ignore[union-attr]
        handler, other = by_user["u1"], by_user["u2"]
        assert handler._through is not None  # handed over: the fan-outs write it directly
        accepted = handler.accepted
        expected = []
        waiting: asyncio.Task[int] | None = None
        # One loop iteration from here to the fan-out below (no await suspends in between but
        # the flush goal's, which needs its task to run first).
        if condition == "corked":  # the first frame of the iteration written, the second corked
            assert handler.offer(frame("one")) and handler.offer(frame("two"))
            assert corked_now(handler)
            expected = ["one", "two"]
        elif condition == "queued":  # a frame waits in the queue (its send task not run yet)
            await handler.enqueue_slow(frame("queued"))
            assert len(handler.queue) == 1
            expected = ["queued"]
        elif condition == "waited for":  # the next frame number is awaited (the outbox replay)
            waiting = asyncio.get_running_loop().create_task(handler.wait_flushed(accepted + 1, TIMEOUT))
            await eventually(lambda: handler._flush_goal is not None, "waiting")
        elif condition == "acknowledged":  # a kept entry is the next frame: acknowledged once written
            srv.manager._arm(handler, accepted + 1)
            assert handler.ack_at == accepted + 1
        else:
            handler.close(CloseCode.NORMAL, "bye")
        assert handler._through is None  # dropped at once
        if condition == "closed":  # (a list taken before: a backplane's or a per-user delivery)
            assert srv.manager.deliver_local([handler, other], frame("late")) == 1
            assert handler.accepted == accepted  # not written into the closing connection
            return
        await srv.manager.broadcast({"n": "fan-out"})
        assert handler.accepted == accepted + len(expected) + 1
        if condition == "waited for":
            assert handler._flush_goal is None  # counted, so the waiter was told
            assert waiting is not None and await waiting >= accepted + 1
        elif condition == "acknowledged":
            assert handler.ack_at != accepted + 1  # written: told (parked until the manager looks)
        # In order, behind whatever the condition held back.
        messages = await received(clients[1], THROUGH_AFTER + 1 + len(expected) + 1)
        assert [m["message"]["n"] for m in messages[THROUGH_AFTER + 1:]] == [*expected, "fan-out"]
        await armed(srv, handler)  # and handed back once the condition is over
        assert handler.flushed == handler.accepted
        for client in clients:
            await client.close()


@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_the_channel_a_fan_out_skipped_is_written_through_by_the_next_one(
        adapter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # ignore_channel: the fan-out loop marks the skipped channel as written this iteration for
    # its own pass (no test per recipient), then restores it: a second fan-out in the same
    # iteration writes it directly, and corks the others (their second frame).
    n = THROUGH_MIN_CONNECTIONS + 2
    async with served(adapter) as srv:
        clients = await srv.clients(n)
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        handlers = list(srv.manager.handlers.values())
        skipped = handlers[3]
        await srv.manager.broadcast({"n": "all but one"}, ignore_channel=skipped.channel_id)
        offered = counting_offers(monkeypatch)
        await srv.manager.broadcast({"n": "all"})
        monkeypatch.undo()
        assert skipped not in offered and len(offered) == n - 1  # the others: their second frame
        assert not corked_now(skipped) and all(corked_now(h) for h in handlers if h is not skipped)
        user = skipped.identity.user_id  # type: ignore[union-attr]
        expected = [["all"] if f"u{i}" == user else ["all but one", "all"] for i in range(n)]
        await got_after_warm_up(clients, expected)
        for client in clients:
            await client.close()


@pytest.mark.parametrize("adapter", ["websockets", "picows"])
async def test_a_frame_sent_after_a_fan_out_written_through_in_the_same_iteration_is_corked(
        adapter: str) -> None:
    # The first fan-out of an iteration leaves its recipients' "written this iteration" marks to
    # be set when something reads them: a frame for one of them later in the same iteration
    # (WebSocketHandler.offer, not the fan-out loop) is its second, corked for the flusher's pass,
    # not written through a second time; the other recipients are not touched.
    n = THROUGH_MIN_CONNECTIONS + 2
    async with served(adapter) as srv:
        clients = await srv.clients(n)
        await fan_out_one_frame_per_iteration(srv, THROUGH_AFTER + 1)
        handlers = list(srv.manager.handlers.values())
        one = handlers[5]
        await srv.manager.broadcast({"n": "all"})
        assert not any(corked_now(h) for h in handlers)  # written through
        await srv.manager.send_message(one.channel_id, {"n": "one"})
        assert corked_now(one) and not any(corked_now(h) for h in handlers if h is not one)
        user = one.identity.user_id  # type: ignore[union-attr]
        expected = [["all", "one"] if f"u{i}" == user else ["all"] for i in range(n)]
        await got_after_warm_up(clients, expected)
        for client in clients:
            await client.close()
