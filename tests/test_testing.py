"""dara_ws_core.testing: what an application uses to property-test its handlers, without a loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core import ServerConfig, WebsocketManager
from dara_ws_core.connection import State
from dara_ws_core.handler import current_channel
from dara_ws_core.testing import (
    ProtocolHarness,
    client_frames,
    custom_frames,
    hostile_frames,
    json_values,
)


def app() -> WebsocketManager:
    manager = WebsocketManager(ServerConfig(max_handler_tasks=4))

    def echo(channel_id: str, data: Any) -> Any:
        return data

    async def double(channel_id: str, data: Any) -> Any:
        await asyncio.sleep(0)  # yields once: fine without a loop
        return {"twice": [data, data], "channel": current_channel.get()}

    def broken(channel_id: str, data: Any) -> Any:
        raise RuntimeError("secret detail")

    async def sleepy(channel_id: str, data: Any) -> Any:
        await asyncio.sleep(1)  # a real timer: needs a loop
        return data

    manager.add_ws_handler("echo", echo)
    manager.add_ws_handler("double", double)
    manager.add_ws_handler("broken", broken)
    manager.add_ws_handler("nan", lambda channel_id, data: float("nan"))
    manager.add_ws_handler("sleepy", sleepy)
    return manager


@given(json_values())
def test_echo_answers_with_what_it_got(value: Any) -> None:
    assert ProtocolHarness(app()).call("echo", value)["message"]["data"] == value


@given(json_values())
def test_async_handlers_run_to_completion_with_their_context(value: Any) -> None:
    harness = ProtocolHarness(app(), channel_id="c-42")
    assert harness.call("double", value)["message"]["data"] == {"twice": [value, value],
                                                                "channel": "c-42"}


def test_a_failing_handler_answers_an_error_without_its_details() -> None:
    reply = ProtocolHarness(app()).call("broken")
    assert reply["message"]["__error"]["code"] == "handler_error"
    assert "secret" not in str(reply)


def test_a_failing_handler_is_logged_with_its_traceback_and_kept_for_the_test(
        caplog: pytest.LogCaptureFixture) -> None:
    # The reply says only "handler_error": without the log (as a server writes it) and the
    # exception itself, a failing test said nothing of why.
    harness = ProtocolHarness(app())
    with caplog.at_level(logging.ERROR, "dara_ws_core.testing"):
        harness.call("broken")
    assert [str(e) for e in harness.errors] == ["secret detail"]
    [record] = [r for r in caplog.records if r.name == "dara_ws_core.testing"]
    assert record.exc_info is not None and "broken" in record.getMessage()


def test_a_handler_cancelled_from_within_gets_an_error_reply_as_on_a_server() -> None:
    manager = app()

    async def cancelled(channel_id: str, data: Any) -> Any:
        raise asyncio.CancelledError  # as awaiting something cancelled does

    manager.add_ws_handler("cancelled", cancelled)
    harness = ProtocolHarness(manager)
    assert harness.call("cancelled")["message"]["__error"]["code"] == "handler_error"
    assert [type(e) for e in harness.errors] == [asyncio.CancelledError]


def test_a_lambda_calling_an_async_function_is_run_to_completion() -> None:
    manager = app()

    async def double(data: Any) -> Any:
        return data * 2

    manager.add_ws_handler("double_it", lambda channel_id, data: double(data))
    assert ProtocolHarness(manager).call("double_it", 2)["message"]["data"] == 4


def test_a_handler_reaching_its_own_channel_through_the_manager_is_reported_clearly() -> None:
    # The harness's connection is in no manager: send_and_wait to it raised UnknownChannel, which
    # became a silent "handler_error" reply, where a server would have asked the client.
    manager = app()

    async def ask_back(channel_id: str, data: Any) -> Any:
        return await manager.send_and_wait(channel_id, {"sure?": data}, timeout=5)

    manager.add_ws_handler("ask_back", ask_back)
    with pytest.raises(RuntimeError, match=r"through the manager.*MemoryServer"):
        ProtocolHarness(manager).call("ask_back", 1)


def test_a_nan_result_goes_out_as_null() -> None:
    assert ProtocolHarness(app()).call("nan")["message"]["data"] is None


def test_a_handler_that_needs_a_loop_is_reported_clearly() -> None:
    with pytest.raises(RuntimeError, match="MemoryServer"):
        ProtocolHarness(app()).call("sleepy")


def test_server_requests_and_chunked_answers() -> None:
    harness = ProtocolHarness(app())
    rchan, frame = harness.request({"question": 1})
    assert frame["message"]["__rchan"] == rchan
    assert harness.answer(rchan, "part-1", chunks=2) == []
    harness.answer(rchan, "part-2", chunks=2)
    assert harness.answers[rchan] == ["part-1", "part-2"]


@given(st.lists(client_frames(["echo", "double", "broken", "nan"], ["r1"]), max_size=30))
def test_no_sequence_of_client_frames_makes_the_server_send_bad_json(frames: list[str | bytes]) -> None:
    harness = ProtocolHarness(app())
    for frame in frames:
        harness.receive(frame, after=0.01)  # every frame sent is parsed strictly: NaN would fail
    if harness.closed is not None:
        assert harness.state is State.CLOSING
        assert harness.closed.code in (1003, 1007, 1009)


@given(hostile_frames())
def test_hostile_frames_get_a_pong_an_error_reply_a_close_or_nothing(frame: str | bytes) -> None:
    harness = ProtocolHarness(app())
    sent = harness.receive(frame)
    assert all(f["type"] == "pong" or "__error" in f["message"] for f in sent)
    assert harness.closed is None or harness.closed.code in (1003, 1007, 1009)


@given(custom_frames(["echo"]))
def test_every_echo_request_gets_exactly_one_reply(frame: str) -> None:
    harness = ProtocolHarness(app())
    sent = harness.receive(frame)
    assert len(sent) <= 1
