"""The frame-header follower that makes the aiohttp server refuse unmasked client frames (RFC
6455 section 5.1), fed any byte stream split at any points; no socket, no loop."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dara_ws_aiohttp._masking import MaskedFramesOnly
from tests.hostile import BINARY, CLOSE, PING, TEXT, encode_frame


class _Reader:
    def __init__(self) -> None:
        self.fed = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += data
        return False, b""


class _Queue:
    def __init__(self) -> None:
        self.error: Any = None

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc


frames = st.tuples(
    st.sampled_from([TEXT, BINARY, PING, CLOSE]),
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]),
).map(lambda f: encode_frame(f[0], b"x" * (f[1] if f[0] in (TEXT, BINARY) else min(f[1], 125))))


@given(
    st.lists(frames, max_size=6), st.booleans(), st.lists(st.integers(1, 200_000), max_size=8),
    st.lists(st.integers(-14, 14), max_size=3),
)
def test_everything_before_the_first_unmasked_frame_is_fed_and_nothing_after(
    masked: list[bytes], add_unmasked: bool, cuts: list[int], near: list[int]
) -> None:
    good = b"".join(masked)
    stream = good + (encode_frame(TEXT, "bad", mask=False) + encode_frame(TEXT, "after")
                     if add_unmasked else b"")
    reader, queue = _Reader(), _Queue()
    checked = MaskedFramesOnly(reader, queue)
    cuts += [len(good) + n for n in near]  # splits inside the headers around the bad frame
    points = sorted({0, len(stream), *(c for c in cuts if 0 < c < len(stream))})
    ends = [checked.feed_data(stream[a:b])[0] for a, b in pairwise(points)]
    if add_unmasked:
        # The reader got every good frame, and at most the first byte of the bad one (its mask
        # bit is in the second), on which it cannot act.
        assert bytes(reader.fed) == stream[: len(reader.fed)]
        assert len(good) <= len(reader.fed) <= len(good) + 1
        assert queue.error is not None and queue.error.code == 1002
        assert ends[-1] is True
    else:
        assert bytes(reader.fed) == stream and queue.error is None and not any(ends)
