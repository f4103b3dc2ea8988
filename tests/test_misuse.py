"""A newcomer's mistakes get an error that names them, at the call that made them.

Wrong arguments to the constructors and to ``add_ws_handler`` are refused where they are given,
not later as an unrelated failure; a wrong ``timeout`` for ``send_and_wait`` raises its own
``TypeError`` (its cleanup never masks it) and leaves the connection usable; the client says it
is not connected yet, drops late replies to requests it gave up on, and ``Chunked`` refuses to be
empty. Servers are real, on every served transport, over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dara_ws_core import Request

from .stacks import Stack


async def test_a_wrong_send_and_wait_timeout_raises_its_own_type_error(make_stack: Any) -> None:
    """The request is neither sent nor left pending; the next one on the channel is answered."""
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        client = await stack.client()
        asked: list[Any] = []

        def respond(request: Request) -> Any:
            asked.append(request.payload)
            return request.payload["q"]

        client.on_request(respond)
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None, not str"):
            await stack.manager.send_and_wait(client.channel, {"q": 1}, timeout="5")  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            assert await stack.manager.send_and_wait(client.channel, {"q": 2}, timeout=5) == 2
        assert asked == [{"q": 2}]
