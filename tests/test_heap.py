"""Giving the C heap's free pages back as a server starts (``dara_ws_core.heap``), measured as
what it is for: the resident memory of a fresh process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dara_ws_core.heap import release_free_heap

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# A fresh process fragments its C heap the way building models does (many blocks freed between
# blocks kept, so glibc cannot give the space back by itself), then starts an endpoint, and prints
# how much resident anonymous memory that start gave back, in MiB.
FRAGMENT_THEN_OPEN = """
import asyncio
from dara_ws_core import Endpoint, WebsocketManager

def anon_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no RssAnon")

async def authenticate(token):
    return None

endpoint = Endpoint(WebsocketManager(), authenticate)
blocks = [bytes(1000) for _ in range(40_000)]   # ~40 MiB, each block from malloc (over 512 bytes)
kept = blocks[::64]                              # one kept in 64: holes of 63 KB between them
del blocks
before = anon_mib()
{start}
print(round(before - anon_mib(), 1), len(kept))
"""


def given_back(start: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", FRAGMENT_THEN_OPEN.format(start=start)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    mib, kept = result.stdout.split()
    assert int(kept) == 625
    return float(mib)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_opening_an_endpoint_gives_the_heaps_free_pages_back() -> None:
    # About 39 MiB were freed in 63 KB holes; nearly all of their pages go back.
    assert given_back("endpoint.open()") > 25
    # Without the call, glibc keeps them (this is what the endpoint's start is for).
    assert given_back("pass") < 5


def test_release_free_heap_says_whether_the_c_library_can() -> None:
    assert release_free_heap() is GLIBC
    assert release_free_heap() is GLIBC  # looked up once, then called again
