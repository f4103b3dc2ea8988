"""Shared fixtures: a server stack per transport (``make_stack``), and the hypothesis profile."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from dara_ws_core import logs

from .stacks import TRANSPORTS, Stack, running_stack

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


if os.environ.get("DARA_TEST_LOOP") == "uvloop":  # run every async test on uvloop instead

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _peer_record_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process-wide budget of peer-caused records for each test: one test's flood of
    bad input must not leave the next one's expected records unwritten."""
    budget = logs.PEER_RECORDS
    monkeypatch.setattr(logs, "PEER_RECORDS", logs.PeerRecordBudget(budget.burst, budget.rate))
    shares = logs.PEER_SHARES
    monkeypatch.setattr(logs, "PEER_SHARES", logs.SourceShares(shares.burst, shares.rate, shares.max_sources))
    app = logs.APP_RECORDS
    monkeypatch.setattr(logs, "APP_RECORDS", logs.PeerRecordBudget(app.burst, app.rate))
    monkeypatch.setattr(logs, "FIRST_FAILURES", logs.FirstFailures(logs.FIRST_FAILURES.limit))


@pytest.fixture(params=sorted(TRANSPORTS))
def transport_name(request: pytest.FixtureRequest) -> str:
    """Every transport of the contract suite: memory, websockets, aiohttp, asgi."""
    return str(request.param)


@pytest.fixture
def make_stack(transport_name: str) -> Callable[..., contextlib.AbstractAsyncContextManager[Stack]]:
    """``async with make_stack(config=..., authenticator=...) as stack:`` on the current transport."""
    return functools.partial(running_stack, transport_name)


@pytest.fixture
async def stack(transport_name: str) -> AsyncIterator[Stack]:
    """A server with default config and token auth (``user:session`` tokens)."""
    async with running_stack(transport_name) as s:
        yield s
