"""Churn and soak on every transport (issue 5, part 2), at a size set by ``DARA_SOAK_SCALE``.

``DARA_SOAK_SCALE`` is the fraction of the full run (10,000 connect/disconnect cycles and 100,000
messages) to do per transport: 0.01 by default (100 cycles, 1,000 messages: a second or two), 0.1
in CI (1,000 and 10,000), 1 for the full run (``python -m tests.soak`` prints its figures).
Deselect with ``-m "not soak"``.
"""

from __future__ import annotations

import os

import pytest

from .soak import FULL_CYCLES, FULL_MESSAGES, RSS_MARGIN, run_soak

SCALE = float(os.environ.get("DARA_SOAK_SCALE", "0.01"))


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_churn_and_soak_leave_nothing_behind(transport_name: str) -> None:
    cycles = max(20, round(FULL_CYCLES * SCALE))
    messages = max(200, round(FULL_MESSAGES * SCALE))
    [report] = await run_soak(transport_name, cycles, messages, workers=16, clients=8)
    figures = "\n".join(report.lines())
    assert report.errors == [], figures
    assert report.cycles == cycles
    # Every request in flight at a disconnect failed with ConnectionClosed: none hung, none
    # was answered by someone else.
    assert report.requests_in_flight_failed == cycles - report.rejected_handshakes, figures
    assert report.messages == report.messages_received == messages, figures
    assert report.messages_lost == report.out_of_order == 0, figures
    assert report.leftover == (0, 0, 0, 0, 0, 0), figures
    assert report.rss_growth <= RSS_MARGIN, figures
