"""Once a server's shutdown begins, it takes no new connection, on every socket transport.

A graceful shutdown closes each connection with 1001 and waits up to ``shutdown_grace`` for
them to go. The websockets adapter kept listening meanwhile, and answered every newcomer's
handshake with 403 (the endpoint was shut down): a client reconnecting after its 1001 that
landed on the same process took it for an authentication failure (``DaraClient`` waits
``backoff_max`` after one), where a refused connection sends it on to another process at once.
The listener now closes first, as on the other transports.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from dara_ws_core import ServerConfig
from tests.hostile import TOKEN_PATH, HostileClient, handshake_request, open_channel
from tests.stacks import TRANSPORTS, served_port

TIMEOUT = 10.0  # a bound on each wait, far above what any of them takes
#: The shutdown lasts while a client that never echoes the close holds its connection.
CONFIG = ServerConfig(ping_interval=None, close_timeout=5.0, shutdown_grace=5.0)
#: Each adapter's own serve(). (An application's own uvicorn, hooked, stops listening first in
#: the hook's shutdown, which its signal handler calls.)
SERVED = sorted(t for t in TRANSPORTS if t != "memory")


@pytest.mark.parametrize("name", SERVED)
async def test_no_connection_is_taken_once_the_shutdown_began(name: str) -> None:
    exits = contextlib.AsyncExitStack()
    port = await exits.enter_async_context(served_port(name, CONFIG))
    holder, _ = await open_channel(port)
    shutdown = asyncio.ensure_future(exits.aclose())
    try:
        assert await holder.read_close(TIMEOUT) == 1001  # the shutdown began, and lasts
        assert not shutdown.done()
        with pytest.raises(ConnectionRefusedError):
            newcomer = await HostileClient.open(port)
            response = await newcomer.handshake()  # what the old code answered: 403
            await newcomer.close()
            pytest.fail(f"a connection was taken during the shutdown, answered {response.status}")
    finally:
        holder.abort()
        async with asyncio.timeout(TIMEOUT):
            await shutdown


@pytest.mark.parametrize("name", SERVED)
async def test_a_request_still_incomplete_when_the_shutdown_began_is_not_answered_403(name: str) -> None:
    """A plain socket accepted before the shutdown, its upgrade request not finished: once it
    finishes it (within the shutdown's grace), it is answered 503 with a ``Retry-After``, or
    closed, as every handshake the shutdown overtakes. It was answered 403, which a client takes
    for a refused identity (``DaraClient`` waits ``backoff_max`` after one) rather than a
    server going away."""
    exits = contextlib.AsyncExitStack()
    port = await exits.enter_async_context(served_port(name, CONFIG))
    holder, _ = await open_channel(port)
    late = await HostileClient.open(port)
    late.write(handshake_request(TOKEN_PATH, complete=False))
    shutdown = asyncio.ensure_future(exits.aclose())
    try:
        assert await holder.read_close(TIMEOUT) == 1001  # the shutdown began, and lasts
        assert not shutdown.done()
        late.write(b"\r\n")  # the request is whole now
        try:
            response = await late.read_response(TIMEOUT)
        except (EOFError, ConnectionError):
            pass  # closed without an answer: as good
        else:
            assert response.status == 503, response
            assert response.header("Retry-After") is not None, response
    finally:
        holder.abort()
        late.abort()
        async with asyncio.timeout(TIMEOUT):
            await shutdown
