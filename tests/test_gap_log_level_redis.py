"""The level of the line a process logs after a gap in its Redis subscription, on a real
``redis-server`` behind a fault-injecting proxy (:mod:`tests.chaos_proxy`).

Every gap was a WARNING, "gap for 0 local user(s): 0 message(s) recovered from the outbox, 0
known lost" included, after every Redis restart or blink: an operator alerting on WARNING was
paged for the backplane doing its job (the outage itself is logged, as a WARNING, when the link
drops and when it is back). A gap is now a WARNING only when messages are known lost, and INFO
otherwise.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import ServerConfig
from dara_ws_core.backplane import Gap

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .stacks import running_stack
from .test_durable_redis import started
from .test_kept_delivery import connect, read_numbers

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2}


def _watched(caplog: pytest.LogCaptureFixture, prefix: str,
             ) -> tuple[str, ServerConfig, list[tuple[str, Gap]]]:
    """A namespace of its own, a history of 2 messages, the backplane's records captured from
    INFO, and the list ``on_gap`` is to fill."""
    caplog.set_level(logging.INFO, logger="dara_ws_core.backplane")
    return f"{prefix}-{uuid.uuid4().hex[:6]}", ServerConfig(outbox_messages=2), []


def _gap_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "backplane: gap for" in r.getMessage()]


@pytest.mark.parametrize("sent_meanwhile", [0, 5], ids=["nothing-lost", "lost"])
async def test_a_gap_is_a_warning_only_when_messages_are_known_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, sent_meanwhile: int,
) -> None:
    namespace = f"gaplog-{uuid.uuid4().hex[:6]}"
    config = ServerConfig(outbox_messages=2)  # 5 sent while cut off: 3 dropped from the history
    caplog.set_level(logging.INFO, logger="dara_ws_core.backplane")
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace, config, **FAST) as (owner, owner_bp),
                started(redis_server.url, namespace, config, **FAST) as (sender, _),
                running_stack("websockets", manager=owner) as stack):
        client = await connect(stack.port)  # user bob, on the process behind the proxy
        # One message handed to bob first: his process knows his history's numbering, so what
        # a bound drops meanwhile is counted (see the cluster docs' "Gaps after a bus outage").
        assert await sender.send_message_to_user("bob", {"n": -1})
        first: list[int] = []
        await read_numbers(client, first, quiet=0.5)
        assert first == [-1]
        gaps = owner_bp.stats.gaps
        caplog.clear()
        async with proxy.fault("drop", 1.0):
            await eventually(lambda: not owner_bp.connected, "the owner's link dropped")
            for n in range(sent_meanwhile):
                assert await sender.send_message_to_user("bob", {"n": n})
        await eventually(lambda: owner_bp.stats.gaps > gaps, "the owner's gap recovered", timeout=20)
        lines = _gap_lines(caplog)
        assert len(lines) == 1, [r.getMessage() for r in lines]
        disconnected = [r for r in caplog.records if "backplane disconnected" in r.getMessage()]
        assert disconnected and disconnected[0].levelno == logging.WARNING  # the outage is said
        if sent_meanwhile:
            assert owner_bp.stats.lost >= sent_meanwhile - 2
            assert lines[0].levelno == logging.WARNING, lines[0].getMessage()
        else:
            assert owner_bp.stats.lost == 0
            assert lines[0].levelno == logging.INFO, lines[0].getMessage()
        await client.close()


async def test_a_user_handed_nothing_yet_still_learns_what_a_gap_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bob's history is empty when his connection opens; while his process is cut off, 5 kept
    messages are sent to him and the history keeps 2. His process handed him nothing before, so
    it had no number to count the jump from: the gap said ``lost=0, recovered=2`` and ``on_gap``
    told the application there was nothing to resynchronise. The jump now counts from 0."""
    namespace, config, gapped = _watched(caplog, "gaplost")
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace, config, **FAST) as (owner, owner_bp),
                started(redis_server.url, namespace, config, **FAST) as (sender, _),
                running_stack("websockets", manager=owner) as stack):
        owner.on_gap = lambda user, gap: gapped.append((user, gap))
        client = await connect(stack.port)  # user bob, nothing in his history
        gaps = owner_bp.stats.gaps
        async with proxy.fault("drop", 1.0):
            await eventually(lambda: not owner_bp.connected, "the owner's link dropped")
            for n in range(5):
                assert await sender.send_message_to_user("bob", {"n": n})
        await eventually(lambda: owner_bp.stats.gaps > gaps, "the owner's gap recovered", timeout=20)
        got: list[int] = []
        await read_numbers(client, got, quiet=0.5)
        assert got == [3, 4]  # what the history kept, once, in order
        assert [(user, gap.lost, gap.recovered) for user, gap in gapped] == [("bob", 3, 2)]
        assert owner_bp.stats.lost == 3
        await client.close()


async def test_what_a_process_handed_its_own_users_is_not_counted_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bob's process sends him 5 kept messages while it is cut off: he gets them at once (a
    process's own sends are delivered locally first), and they wait in its spool. Once back, the
    bus appends them and his history keeps 2. The gap counted the 3 it dropped as lost (the
    operator's trial: "420 known lost" for users who had every message), and ``on_gap`` had the
    application resynchronise users who missed nothing."""
    namespace, config, gapped = _watched(caplog, "gapown")
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace, config, **FAST) as (owner, owner_bp),
                running_stack("websockets", manager=owner) as stack):
        owner.on_gap = lambda user, gap: gapped.append((user, gap))
        client = await connect(stack.port)  # user bob
        assert await owner.send_message_to_user("bob", {"n": -1})
        got: list[int] = []
        await read_numbers(client, got, quiet=0.5)
        gaps = owner_bp.stats.gaps
        async with proxy.fault("drop", 1.0):
            await eventually(lambda: not owner_bp.connected, "the owner's link dropped")
            for n in range(5):
                assert await owner.send_message_to_user("bob", {"n": n})
            await read_numbers(client, got, quiet=0.3)
        await eventually(lambda: owner_bp.stats.gaps > gaps, "the owner's gap recovered", timeout=20)
        await read_numbers(client, got, quiet=0.5)
        assert got == [-1, 0, 1, 2, 3, 4]  # each once, in order
        assert [(user, gap.lost) for user, gap in gapped] == [("bob", 0)]
        assert owner_bp.stats.lost == 0
        assert not [r for r in _gap_lines(caplog) if r.levelno >= logging.WARNING]
        await client.close()
