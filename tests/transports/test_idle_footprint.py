"""What an idle connection holds on the websockets adapter, pinned without measuring memory:
the per-connection objects that could be shared or created lazily stay shared or uncreated.
And, on every socket transport, nothing of the last large message it received (measured:
tracemalloc, or for picows' read buffer which keeps its size, the pages in RAM).

Real connections over 127.0.0.1; each check names the saving it keeps (issue 14, item 5).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import mmap
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect

from dara_ws_core import Endpoint, Identity, ServerConfig, WebsocketManager, token_authenticator
from dara_ws_core.queue import OutboundQueue
from dara_ws_picows import serve as picows_serve
from dara_ws_websockets import _ServerConnection, serve
from tests.helpers import eventually
from tests.hostile import TEXT, HostileClient, open_channel
from tests.stacks import TRANSPORTS, Stack, running_stack

TIMEOUT = 10.0


def _our_await_chain(coro: Coroutine[Any, Any, Any]) -> list[str]:
    """The qualified names of the coroutines of this project that ``coro`` is suspended in,
    outermost first."""
    names: list[str] = []
    current: Any = coro
    for _ in range(50):  # bounded: a chain is a handful of frames
        code = getattr(current, "cr_code", None)
        if code is None:
            break
        if "dara_ws" in code.co_filename:
            names.append(code.co_qualname)
        current = current.cr_await
    return names


async def test_an_idle_connection_holds_no_queue_task_set_or_index_set_of_its_own() -> None:
    manager = WebsocketManager(ServerConfig())
    endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id=t)))
    async with serve(endpoint, "127.0.0.1", 0, ping_interval=None) as server:
        clients = [await ws_connect(f"{server.url}?token=u{i}", compression=None) for i in range(3)]
        try:
            for client in clients:  # the init frame went through the queue and out
                assert json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))["type"] == "init"
            await eventually(lambda: len(manager.handlers) == 3 and not any(
                h.queue for h in manager.handlers.values()), "every init frame sent")
            shared = OutboundQueue(1, 1)._frames  # the deque every empty queue shares
            for handler in manager.handlers.values():
                assert handler.queue._frames is shared  # drained: no deque of its own
                assert handler._tasks is None  # no handler task ever ran: no task set
                assert handler._log is None  # nothing logged: no logger adapter
            # One bound method is every handler's on_ack_at, not one bound per connection.
            assert len({id(h.on_ack_at) for h in manager.handlers.values()}) == 1
            # No request ever sent: every correlation table is the one shared empty dict.
            assert len({id(h.connection.pending._entries) for h in manager.handlers.values()}) == 1
            # Identities without claims share one read-only empty mapping.
            assert len({id(h.identity.claims) for h in manager.handlers.values()  # type: ignore[union-attr]
                        }) == 1
            # One channel per user and session: indexed by its id, not by a set of one.
            assert all(isinstance(v, str) for v in manager.registry._users.values())
            assert all(isinstance(v, str) for v in manager.registry._sessions.values())
            # Our coroutines an idle connection's task is suspended in: the endpoint, the
            # driver's receive loop and the transport's receive_pushed, which waits on a future
            # of its own (no adapter wrapper, no separate receive-loop coroutine).
            chains = [_our_await_chain(t.get_coro()) for t in asyncio.all_tasks()]  # type: ignore[arg-type]
            assert [c for c in chains if "Endpoint.serve" in c] == [["Endpoint.serve", "ConnectionDriver.run",
                             "WebsocketsTransport.receive_pushed"]] * 3
        finally:
            for client in clients:
                await client.close()


async def test_an_idle_connection_adds_nothing_to_websockets_attribute_dict() -> None:
    # The adapter's own per-connection state (the identity, the push hand-over) lives in slots:
    # as keys added to websockets' connection dict after websockets' own, they gave each
    # connection a dict of its own (1.6 KiB) instead of one sharing its keys with the other
    # connections (0.3 KiB): CPython 3.11 shares 29 keys at most, and fewer when many connections
    # are built before the first one sets its last attribute. (Whether websockets' own keys stay
    # shared depends on that history too, so the size itself is not pinned here.)
    manager = WebsocketManager(ServerConfig())
    endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id=t)))
    async with serve(endpoint, "127.0.0.1", 0, ping_interval=None) as server:
        clients = [await ws_connect(f"{server.url}?token=u{i}", compression=None) for i in range(3)]
        try:
            for client in clients:  # now waiting in receive_pushed, the hand-over set
                assert json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))["type"] == "init"
            ours = list(server.native.connections)
            assert len(ours) == 3
            for ws in ours:
                assert isinstance(ws, _ServerConnection)
                assert ws.dara_push is not None and ws.dara_identity is not None
                assert not {"dara_push", "dara_identity", "_paused_for_writes"} & set(vars(ws))
        finally:
            for client in clients:
                await client.close()


#: A fresh process (the key table is the class's, for the life of the process) serving 64
#: connections that all connect at once: it prints whether every connection's attribute dict
#: shares its keys, i.e. is smaller than a plain dict of the same attributes.
_OVERLAPPING_HANDSHAKES = textwrap.dedent("""
    import asyncio, sys
    from websockets.asyncio.client import connect
    from dara_ws_core import Endpoint, Identity, ServerConfig, WebsocketManager, token_authenticator
    from dara_ws_websockets import serve

    async def main():
        manager = WebsocketManager(ServerConfig())
        endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id=t)))
        async with serve(endpoint, "127.0.0.1", 0, ping_interval=None) as server:
            clients = await asyncio.gather(*(connect(f"{server.url}?token=u{i}", compression=None)
                                             for i in range(64)))
            for _ in range(100):  # bounded: every connection registered
                if len(manager.handlers) == 64:
                    break
                await asyncio.sleep(0.05)
            shared = [sys.getsizeof(vars(ws)) < sys.getsizeof(dict(vars(ws)))
                      for ws in server.native.connections]
            print(len(shared), all(shared))
            for client in clients:
                await client.close()

    asyncio.run(main())
""")


def test_connections_whose_handshakes_overlap_all_share_their_attribute_keys() -> None:
    # websockets sets two attributes in connection_made; the adapter sets them when the
    # connection is built, so that the first connection puts every key in the class's table
    # before the next ones shrink the room it has left (see _ServerConnection).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", _OVERLAPPING_HANDSHAKES], cwd=root,
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "PYDANTIC_DISABLE_PLUGINS": "__all__"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "True"]


def _alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


@pytest.mark.parametrize("serve_with", [serve, picows_serve], ids=["websockets", "picows"])
@pytest.mark.parametrize("closer", ["client", "server"])
async def test_a_closed_connection_is_freed_at_once_not_close_timeout_later(
    serve_with: Callable[..., Any], closer: str
) -> None:
    # The abort timer armed at the close (close_timeout, here far longer than the wait) held the
    # transport and with it the whole connection; once the connection is over it is dropped.
    manager = WebsocketManager(ServerConfig(close_timeout=60.0))
    endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id=t)))
    async with serve_with(endpoint, "127.0.0.1", 0) as server:
        clients = [await ws_connect(f"ws://127.0.0.1:{server.port}{endpoint.path}?token=u{i}",
                                    compression=None) for i in range(3)]
        for client in clients:
            assert json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))["type"] == "init"
        await eventually(lambda: len(manager.handlers) == 3, "three connections")
        kind = type(next(iter(manager.handlers.values()))._sink.transport)  # type: ignore[union-attr]
        before = _alive(kind)  # other tests' transports may still be around: count ours
        assert before >= 3
        if closer == "client":
            for client in clients:
                await client.close()
        else:
            for channel_id in list(manager.handlers):  # no handler left bound to a local
                manager.handlers[channel_id].close(4000, "bye")
            for client in clients:
                await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        await eventually(lambda: endpoint.connection_count == 0, "every connection task done")
        await eventually(lambda: _alive(kind) == before - 3, "every transport freed", timeout=5.0)


def _present(kind: type) -> int:
    # Without collecting: objects only the cyclic collector would free are still listed.
    return sum(1 for o in gc.get_objects() if type(o) is kind)


@pytest.mark.parametrize("serve_with", [serve, picows_serve], ids=["websockets", "picows"])
async def test_a_closed_connection_is_freed_without_the_cyclic_collector(
    serve_with: Callable[..., Any],
) -> None:
    # The driver was the handler's sink and held a bound method of its own, and the exception
    # that ended the receive loop held the loop's frame: each closed connection stayed in memory,
    # whole, until the cyclic collector ran.
    manager = WebsocketManager(ServerConfig())
    endpoint = Endpoint(manager, token_authenticator(lambda t: Identity(user_id=t, session_id=t)))
    gc.collect()
    gc.disable()
    try:
        async with serve_with(endpoint, "127.0.0.1", 0) as server:
            clients = [await ws_connect(f"ws://127.0.0.1:{server.port}{endpoint.path}?token=u{i}",
                                        compression=None) for i in range(3)]
            for client in clients:
                assert json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))["type"] == "init"
            await eventually(lambda: len(manager.handlers) == 3, "three connections")
            handler = next(iter(manager.handlers.values()))
            kinds = [type(handler), type(handler._sink), type(handler._sink.transport)]  # type: ignore[union-attr]
            before = {kind: _present(kind) for kind in kinds}
            del handler
            for client in clients:
                await client.close()
            await eventually(lambda: endpoint.connection_count == 0, "every connection task done")
            await eventually(lambda: all(_present(kind) == before[kind] - 3 for kind in kinds),
                             "every handler, driver and transport freed", timeout=5.0)
    finally:
        gc.enable()


# ------------------------------------------------ what a large message leaves behind (review 12 #3)

#: A large message's payload: far over what any of the libraries keep of a small one.
LARGE = 1024 * 1024
#: What may stay allocated once the large message is handled: the connection's own small
#: objects (a few KiB) and the interpreter's noise, far under one copy of the message.
LEFT_BEHIND = 128 * 1024
SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")


async def _send_large_ping(stack: Stack) -> tuple[HostileClient, str]:
    """A raw client that sent one LARGE message, handled: its pong has come back."""
    assert stack.port is not None
    client, channel = await open_channel(stack.port)
    client.send_text(json.dumps({"type": "ping", "message": "x" * LARGE}))
    reply = await client.read_frame(timeout=TIMEOUT)
    assert reply.opcode == TEXT and json.loads(reply.text)["type"] == "pong"
    return client, channel


@pytest.mark.parametrize("transport", [t for t in SOCKETS if t != "picows"])
async def test_an_idle_connection_keeps_no_copy_of_the_last_large_message_it_sent(transport: str) -> None:
    # websockets' parser (the websockets and ASGI adapters: uvicorn parses with it too) keeps the
    # last frame it parsed until the next one comes, and the driver's receive loop kept the
    # last message in a local variable: an idle connection held one or two copies of the
    # largest message it last sent, up to max_message_size each, counted by no budget.
    config = ServerConfig(ping_interval=None, max_message_size=4 * LARGE)
    async with running_stack(transport, config=config) as stack:
        warm, _ = await open_channel(stack.port)  # type: ignore[arg-type]  # a socket stack
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            client, _ = await _send_large_ping(stack)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < LEFT_BEHIND, f"{held} bytes still held after a {LARGE}-byte message"
        # The connection goes on as before: the next large message is read and answered.
        client.send_text(json.dumps({"type": "ping", "message": "y" * LARGE}))
        assert json.loads((await client.read_frame(timeout=TIMEOUT)).text)["type"] == "pong"
        client.abort()
        warm.abort()


def _resident(view: memoryview) -> int:
    """Bytes of the whole memory pages inside ``view`` that are in RAM (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    page = mmap.PAGESIZE
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    first, end = -(-start // page) * page, (start + len(view)) // page * page
    pages = (end - first) // page
    if pages <= 0:
        return 0
    vector = ctypes.create_string_buffer(pages)
    assert libc.mincore(first, end - first, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector.raw) * page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore() as Linux defines it")
async def test_picows_hands_back_what_a_large_frame_grew_its_read_buffer_by() -> None:
    # picows grows its read buffer to hold the largest frame and never shrinks it: an idle
    # connection kept the pages of the largest message it ever sent. Once the frame is
    # handled, the pages past what the next read may fill go back to the system.
    from dara_ws_picows import READ_LIMIT

    config = ServerConfig(ping_interval=None, max_message_size=4 * LARGE)
    async with running_stack("picows", config=config) as stack:
        client, channel = await _send_large_ping(stack)
        listener = stack.manager.handlers[channel]._sink.transport  # type: ignore[union-attr]
        reads = listener._ws.underlying_transport.get_protocol()
        free = reads._protocol.get_buffer(-1)  # picows' whole read buffer past its unread bytes
        assert len(free) > LARGE, "the frame grew picows' read buffer"
        await eventually(lambda: _resident(free[READ_LIMIT:]) < LEFT_BEHIND,
                         "the pages the frame filled handed back", timeout=5.0)
        free.release()
        # The connection goes on as before: the next large message is read and answered.
        client.send_text(json.dumps({"type": "ping", "message": "y" * LARGE}))
        assert json.loads((await client.read_frame(timeout=TIMEOUT)).text)["type"] == "pong"
        client.abort()
