"""The ASGI adapter once its socket is gone (review 12 #2): uvicorn reports a lost connection to
the application only when it reads, and a connection held back by the core does not read. Its
sends stop at once instead of writing to the dead socket, which asyncio logs once per write.

Real uvicorn on 127.0.0.1 with a raw client.
"""

from __future__ import annotations

import json
import logging

import pytest

from dara_ws_core import ConnectionClosed, ServerConfig
from dara_ws_core.exceptions import CloseCode
from dara_ws_core.transport import SupportsDisconnected
from tests.helpers import eventually, run_on
from tests.hostile import HostileClient, open_channel
from tests.stacks import Stack, running_stack

TIMEOUT = 10.0
#: Frames sent to the dead socket in one burst: asyncio warns from the fifth write on.
BURST = 50


async def _lost_unnoticed(stack: Stack) -> tuple[HostileClient, str, object]:
    """A client gone while the server does not read its socket (what uvicorn does while the
    application does not read: the core holding the connection back), so nothing has told the
    server yet. Returns the client, its channel and the server's transport for it."""
    assert stack.port is not None
    client, channel = await open_channel(stack.port)
    transport = stack.manager.handlers[channel]._sink.transport  # type: ignore[union-attr]
    socket = transport._socket
    assert socket is not None, "the socket behind uvicorn's send is found"
    socket.pause_reading()
    client.abort()
    await client.wait_disconnected()
    return client, channel, transport


async def test_sends_to_a_socket_found_gone_raise_connection_closed_without_writing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    async with running_stack("asgi", config=ServerConfig(ping_interval=None)) as stack:
        _, channel, transport = await _lost_unnoticed(stack)
        assert isinstance(transport, SupportsDisconnected) and not transport.disconnected
        frame = json.dumps({"type": "message", "message": "x" * 1024}).encode()
        raised = 0
        for _ in range(BURST):  # one burst, as a sender drains its queue: no loop iteration between
            try:
                await transport.send(frame)  # type: ignore[attr-defined]
            except ConnectionClosed as exc:
                assert exc.code == CloseCode.ABNORMAL
                raised += 1
        # The peer's end of stream or reset is found by the first writes, and every send after
        # raises instead of writing again.
        assert raised >= BURST - 3, f"only {raised} of {BURST} sends refused"
        assert not [r for r in caplog.records if r.name == "asyncio"], "writes to a dead socket logged"
        await eventually(lambda: transport.disconnected, "the transport reports the socket gone")
        await eventually(lambda: channel not in stack.manager.handlers, "the channel unregistered")


async def test_fan_outs_to_a_client_gone_unnoticed_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The review's case through the core: broadcasts queued for a connection whose peer left
    # while it was not read are written by its sender in one burst.
    caplog.set_level(logging.WARNING, logger="asyncio")
    async with running_stack("asgi", config=ServerConfig(ping_interval=None)) as stack:
        _, channel, _ = await _lost_unnoticed(stack)
        for n in range(BURST):
            await stack.manager.broadcast({"n": n, "pad": "x" * 1024})
        await eventually(lambda: channel not in stack.manager.handlers, "the channel unregistered")
        assert not [r for r in caplog.records if r.name == "asyncio"], "writes to a dead socket logged"


async def _aborted(stack_config: ServerConfig) -> bool:
    async with running_stack("asgi", config=stack_config) as stack:
        assert stack.port is not None
        client, channel = await open_channel(stack.port)
        transport = stack.manager.handlers[channel]._sink.transport  # type: ignore[union-attr]
        transport.abort()
        return await client.wait_disconnected(TIMEOUT)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_transport_finds_its_socket_and_aborts_it_on_either_loop(loop: str) -> None:
    # uvicorn runs on uvloop where it is installed (its default loop, "auto"), whose transports
    # are no asyncio.Transport subclasses: the socket was not found there, and abort(), the
    # lost-socket checks and ``disconnected`` did nothing.
    assert run_on(loop, _aborted(ServerConfig(ping_interval=None)))
