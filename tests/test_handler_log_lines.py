"""A log line about a handler that raised, timed out or returned what JSON cannot carry names the
handler (its kind and its function) in the message itself: the default ``logging`` format prints
no ``extra`` field, and the kind was only there. The extra fields stay. Real connections on the
in-memory transport and on websockets over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from dara_ws_core import RemoteError, ServerConfig, WebsocketManager
from dara_ws_core.client import Request

from .helpers import eventually
from .stacks import running_stack


@pytest.fixture
def default_format() -> Iterator[io.StringIO]:
    """What the project's records look like under ``logging.basicConfig()``'s own format."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    loggers = [logging.getLogger("dara_ws_core")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        yield out
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.removeHandler(handler)
            log.setLevel(level)


def sync_boom(channel_id: str, data: Any) -> Any:
    raise ValueError("boom")


async def async_boom(channel_id: str, data: Any) -> Any:
    raise ValueError("boom")


def thread_boom(channel_id: str, data: Any) -> Any:
    raise ValueError("boom")


async def too_slow(channel_id: str, data: Any) -> Any:
    await asyncio.sleep(60)


def not_json(channel_id: str, data: Any) -> Any:
    return object()  # JSON has no such value


CASES = {
    "sync_boom": ("ERROR:dara_ws_core:custom handler failed (kind 'sync_boom', "
                  f"{__name__}.sync_boom)"),
    "async_boom": ("ERROR:dara_ws_core:custom handler failed (kind 'async_boom', "
                   f"{__name__}.async_boom)"),
    "thread_boom": ("ERROR:dara_ws_core:custom handler failed (kind 'thread_boom', "
                    f"{__name__}.thread_boom)"),
    "too_slow": ("WARNING:dara_ws_core:custom handler timed out after 0.2 s (kind 'too_slow', "
                 f"{__name__}.too_slow)"),
    "not_json": ("ERROR:dara_ws_core:custom handler returned a value JSON cannot carry "
                 f"(kind 'not_json', {__name__}.not_json)"),
}


@pytest.mark.parametrize("transport", ["memory", "websockets"])
@pytest.mark.parametrize("kind", sorted(CASES))
async def test_a_failing_handler_is_named_in_the_default_format(
    kind: str, transport: str, default_format: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    manager = WebsocketManager(ServerConfig(handler_timeout=0.2, ping_interval=None))
    manager.add_ws_handler("sync_boom", sync_boom)
    manager.add_ws_handler("async_boom", async_boom)
    manager.add_ws_handler("thread_boom", thread_boom, in_thread=True)
    manager.add_ws_handler("too_slow", too_slow)
    manager.add_ws_handler("not_json", not_json)
    caplog.set_level(logging.INFO, "dara_ws_core")
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client("alice:s1")
        with pytest.raises(RemoteError):
            await client.request(kind, {}, timeout=5)
    lines = default_format.getvalue().splitlines()
    assert CASES[kind] in lines, lines
    [record] = [r for r in caplog.records if r.getMessage().startswith("custom handler")]
    assert record.__dict__["kind"] == kind  # the extra fields stay
    assert record.__dict__["channel"] == client.channel and record.__dict__["user"] == "alice"


async def test_a_failing_client_responder_is_named_in_the_default_format(
    default_format: io.StringIO,
) -> None:
    def answer(request: Request) -> Any:
        raise ValueError("boom")

    async with running_stack("websockets", ServerConfig(ping_interval=None)) as stack:
        client = await stack.client("alice:s1")
        client.on_request(answer)
        request = asyncio.ensure_future(stack.manager.send_and_wait(client.channel, {"q": 1}, timeout=5))
        try:
            await eventually(lambda: "responder" in default_format.getvalue(), "the record written")
        finally:
            request.cancel()
    [line] = [ln for ln in default_format.getvalue().splitlines() if ln.startswith("ERROR:")]
    assert line.startswith(f"ERROR:dara_ws_core.client:responder {__name__}."), line
    assert "answer failed for request" in line
