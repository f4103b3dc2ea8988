"""The manager's fan-out on every transport: one recipient never holds up the others.

protocol.md section 6: a client that does not read gets the slow-consumer policy; nobody else
notices. A fan-out (broadcast, per-user send) must therefore never wait on one recipient, whatever
the policy, the default ``wait`` included.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest

from dara_ws_core import ServerConfig, SlowConsumerPolicy
from dara_ws_core.exceptions import CloseCode

from .helpers import eventually
from .test_contract import next_payload

#: Small queues so that a client that never reads overflows within a few broadcasts.
SMALL: dict[str, Any] = {"max_queue_messages": 8, "max_queue_bytes": 256 * 1024, "send_timeout": 30.0,
         "close_timeout": 0.5}
PAD = "z" * 16 * 1024
MAX_SENDS = 2000


def completes_without_waiting(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` one step: it must finish without ever suspending (no await on anyone)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the call suspended: it waited on something")


@pytest.mark.parametrize("fan_out", ["broadcast", "user"])
@pytest.mark.parametrize("policy", list(SlowConsumerPolicy))
async def test_a_fan_out_never_waits_on_a_client_that_does_not_read(
    make_stack: Any, policy: SlowConsumerPolicy, fan_out: str
) -> None:
    # send_timeout is 30 s: with the old behaviour (wait for room) the first full queue
    # suspends the call, which completes_without_waiting reports at once.
    config = ServerConfig(slow_consumer_policy=policy, **SMALL)
    async with make_stack(config=config) as stack:
        manager = stack.manager
        healthy = await stack.client("bob:h", max_queue=100_000)
        stuck = await stack.connect("bob:s")  # never reads
        await eventually(lambda: len(manager.get_user_channels("bob")) == 2)
        stuck_channel = next(c for c in manager.get_user_channels("bob") if c != healthy.channel)
        stuck_handler = manager.handlers[stuck_channel]
        healthy_handler = manager.handlers[healthy.channel or ""]
        sent = 0
        while sent < MAX_SENDS and not stuck_handler.closed and stuck_handler.dropped == 0:
            payload = {"i": sent, "pad": PAD}
            if fan_out == "broadcast":
                completes_without_waiting(manager.broadcast(payload))
            else:
                completes_without_waiting(manager.send_message_to_user("bob", payload))
            sent += 1
            # A producer that lets the healthy client keep up: only the stuck one falls behind.
            await eventually(lambda: not healthy_handler.queue)
        assert sent < MAX_SENDS, "the stuck client never fell behind"
        if policy is SlowConsumerPolicy.DROP_OLDEST:
            assert stuck_channel in manager.handlers
        else:
            # wait and disconnect: the fan-out disconnects it (1013) instead of waiting.
            await eventually(lambda: stuck_channel not in manager.handlers)
            assert stuck_handler.close_reason is not None
            assert stuck_handler.close_reason.code == CloseCode.TRY_AGAIN_LATER
        received = [(await next_payload(healthy))["i"] for _ in range(sent)]
        assert received == list(range(sent))  # the healthy client lost nothing
        await stuck.close()


async def test_send_message_to_one_slow_channel_still_waits_under_wait(make_stack: Any) -> None:
    # A sender to one channel is the one to hold back (like websockets' send): it waits for
    # room up to send_timeout, then the client is disconnected with 1013.
    config = ServerConfig(**{**SMALL, "send_timeout": 0.2})
    async with make_stack(config=config) as stack:
        manager = stack.manager
        stuck = await stack.connect("carol:s")
        await eventually(lambda: len(manager.handlers) == 1)
        channel = next(iter(manager.handlers))
        suspended = False
        for i in range(MAX_SENDS):
            coro = manager.send_message(channel, {"i": i, "pad": PAD})
            try:
                coro.send(None)
            except StopIteration:
                continue
            coro.close()
            suspended = True
            break
        assert suspended, "a direct send to a full queue must wait (policy wait)"
        await stuck.close()


async def test_a_foreign_envelope_model_reaches_the_client_with_its_typename_on_top(
    make_stack: Any,
) -> None:
    # Dara's own DaraServerMessage (or an app's envelope model) handed to the manager: before
    # the fix it was wrapped again as a payload, and the top-level __typename the stock client
    # routes on was buried one level down.
    from pydantic import BaseModel, ConfigDict, Field

    from dara_ws_core.messages import DaraServerMessage

    class Payload(BaseModel):
        model_config = ConfigDict(extra="allow", serialize_by_alias=True)
        rchan: str | None = Field(default=None, alias="__rchan")

    class Envelope(BaseModel):
        model_config = ConfigDict(serialize_by_alias=True)
        type: str = "message"
        typename: str | None = Field(default=None, alias="__typename")
        message: Payload

    note = Envelope.model_validate({"__typename": "TaskNotificationMessage",
                                    "message": {"status": "COMPLETE", "task_id": "t1"}})
    async with make_stack() as stack:
        manager = stack.manager
        client = await stack.client("dora:s1")
        for send in (manager.send_message(client.channel, note), manager.broadcast(note),
                     manager.send_message_to_user("dora", note)):
            await send
            received = await client.receive(5)
            assert isinstance(received, DaraServerMessage)
            assert received.typename == "TaskNotificationMessage"
            assert received.message.model_extra == {"status": "COMPLETE", "task_id": "t1"}
            assert received.message.rchan is None


async def test_send_and_wait_goes_through_a_handler_subclasss_own_method() -> None:
    """The manager calls the handler's request directly (one call less per round trip) only
    for the core's own handler class: a subclass's ``send_and_wait`` is not bypassed."""
    from dara_ws_core import WebSocketHandler, WebsocketManager

    from .stacks import running_stack

    asked: list[Any] = []

    class Recording(WebSocketHandler):
        __slots__ = ()  # the same layout: the manager's handler can become one

        def send_and_wait(self, message: Any, *, custom: bool = False, timeout: Any = None
                          ) -> Coroutine[Any, Any, Any]:
            asked.append(message)
            return super().send_and_wait(message, custom=custom, timeout=timeout)

    class Manager(WebsocketManager):
        def create_handler(self, *args: Any, **kwargs: Any) -> WebSocketHandler:
            handler = super().create_handler(*args, **kwargs)
            handler.__class__ = Recording
            return handler

    async with running_stack("memory", manager=Manager(ServerConfig())) as stack:
        client = await stack.client()
        client.on_request(lambda request: {"twice": request.payload["n"] * 2})
        assert await stack.manager.send_and_wait(client.channel, {"n": 21}, timeout=5.0) == {"twice": 42}
    assert asked == [{"n": 21}]
