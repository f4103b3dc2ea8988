"""``ClientFrameHeaders``: the frame headers a client may not send (RFC 6455 5.1, 5.2) are found
wherever the reads cut the stream, and nothing before them is held back longer than a header.
``close_frame_error``: the close frames a peer may not send (RFC 6455 5.5.1, 7.4).
``feed_held_later`` and ``end_after_held``: the frames held past a feed's share reach the library
before the peer's end of stream does."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core.transport import (
    FRAMES_PER_FEED,
    ClientFrameHeaders,
    RequestHead,
    close_frame_error,
    end_after_held,
    feed_held_later,
    sendable_close_code,
)


def frame(payload: bytes, form: int | None = None, *, mask: bool = True, declared: int | None = None) -> bytes:
    """A text frame whose length is written in ``form`` (7, 16 or 64 bits: the shortest if
    ``None``), as ``declared`` if given."""
    length = len(payload) if declared is None else declared
    form = form or (7 if length < 126 else 16 if length < 65536 else 64)
    bit = 0x80 if mask else 0
    head = {7: lambda: bytes([0x81, bit | length]),
            16: lambda: bytes([0x81, bit | 126]) + struct.pack("!H", length),
            64: lambda: bytes([0x81, bit | 127]) + struct.pack("!Q", length)}[form]()
    return head + (b"\0\0\0\0" if mask else b"") + payload


def feed_in_pieces(stream: bytes, size: int) -> tuple[bytes, str | None]:
    headers = ClientFrameHeaders()
    out = b"".join(headers.feed(stream[at : at + size]) for at in range(0, len(stream), size))
    return out, headers.refused


GOOD = [frame(b"a" * 5), frame(b"b" * 200), frame(b"c" * 70_000), frame(b""), frame(b"d" * 125),
        frame(b"e" * 126), frame(b"f" * 65535), frame(b"g" * 65536)]
BAD = {
    "unmasked frame": frame(b"x", mask=False),
    "payload length not in its shortest form": frame(b"x" * 15, 16),
    "payload length not in its shortest form ": frame(b"x" * 65535, 64),
    "payload length with its most significant bit set": frame(b"", 64, declared=1 << 63),
}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 64, 1 << 20])
def test_valid_frames_pass_whole_wherever_the_reads_cut_them(size: int) -> None:
    stream = b"".join(GOOD)
    assert feed_in_pieces(stream, size) == (stream, None)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 64, 1 << 20])
@pytest.mark.parametrize("why", sorted(BAD))
def test_a_forbidden_header_is_refused_and_what_came_before_it_is_passed(why: str, size: int) -> None:
    before = b"".join(GOOD[:3])
    out, refused = feed_in_pieces(before + BAD[why] + frame(b"after"), size)
    assert (out, refused) == (before, why.strip())


def test_a_header_cut_short_is_held_until_the_rest_comes() -> None:
    headers = ClientFrameHeaders()
    whole = frame(b"x" * 300)
    assert headers.feed(whole[:3]) == b""  # 3 of the 4 header bytes
    assert headers.feed(whole[3:]) == whole


def test_a_library_that_only_fails_on_its_own_parse_gets_a_reserved_opcode_in_place() -> None:
    headers = ClientFrameHeaders()
    good = frame(b"ok")
    assert headers.feed_failing(good + frame(b"x" * 15, 16)) == good + b"\x83\x80"
    assert headers.feed_failing(frame(b"more")) == b"", "nothing after a refusal"


# ---------------------------------------------------------------------------- RequestHead (review18 #7)

REQUEST = (b"GET /api/core/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@given(st.lists(st.sampled_from(GOOD[:6] + list(BAD.values())), max_size=6), st.data())
def test_the_request_goes_to_the_library_and_what_follows_is_checked_from_its_first_byte(
    frames: list[bytes], data: st.DataObject
) -> None:
    # However the reads cut the request and the frames behind it (a read may hold the end of
    # the blank line and a frame's start), the library gets the request, and the header checks
    # see the frames from their first byte: the same outcome as frames sent after the answer.
    stream = REQUEST + b"".join(frames)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    head = RequestHead()
    given_now = b"".join(head.feed(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True))
    assert given_now == REQUEST and head.ended
    assert bytes(head.behind) == stream[len(REQUEST) :]


def test_a_head_not_ended_holds_nothing_back() -> None:
    head = RequestHead()
    assert head.feed(REQUEST[:-1]) == REQUEST[:-1]  # the blank line's last byte is missing
    assert not head.ended and not head.behind
    assert head.feed(b"\n\x81") == b"\n" and bytes(head.behind) == b"\x81"
    assert head.feed(b"\x80") == b"" and bytes(head.behind) == b"\x81\x80"


def test_the_close_codes_a_close_frame_may_carry_are_rfc_6455s() -> None:
    sendable = [code for code in range(1 << 16) if sendable_close_code(code)]
    assert sendable == [*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", None),  # no code at all
        (struct.pack("!H", 1000), None),
        (struct.pack("!H", 4999) + "été".encode(), None),
        (struct.pack("!H", 1000) + b"x" * 123, None),
        (b"\x03", 1002),  # one byte: half a code
        *[(struct.pack("!H", code), 1002) for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)],
        (struct.pack("!H", 1000) + b"\xff", 1007),
        (struct.pack("!H", 1000) + b"\xc3", 1007),  # a character cut short
        (struct.pack("!H", 4000) + b"\xed\xa0\x80", 1007),  # a UTF-16 surrogate
        (struct.pack("!H", 5000) + b"\xff", 1002),  # the code is checked first
    ],
)
def test_a_close_frame_a_peer_may_not_send_is_failed_with_1002_or_1007(payload: bytes, error: int | None) -> None:
    assert close_frame_error(payload) == error


def _tiny_frame(rng: random.Random) -> bytes:
    """An empty or tiny frame of any kind a flood is made of: ping, pong, fragment, text."""
    first = rng.choice([0x89, 0x8A, 0x01, 0x00, 0x80, 0x81])
    payload = b"x" * rng.choice([0, 0, 1, 5, 20])
    return bytes([first, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


@pytest.mark.parametrize("seed", range(6))
def test_a_read_of_more_frames_than_a_feeds_share_is_handed_on_a_share_at_a_time_in_order(seed: int) -> None:
    # One read of tiny frames (256 KiB of empty pings is 43,000 frames) handed to websockets'
    # parser at once held the event loop for a second or more: a feed hands on at most
    # FRAMES_PER_FEED frames and holds the rest, whole, for the next (the adapter feeds again
    # on the next turn of the loop, reading paused). A read that comes meanwhile goes after.
    rng = random.Random(seed)
    frames = [_tiny_frame(rng) for _ in range(3 * FRAMES_PER_FEED + rng.randrange(FRAMES_PER_FEED))]
    starts, at = set(), 0
    for one in frames:
        starts.add(at)
        at += len(one)
    stream = b"".join(frames)
    # Where the first read ends: past the first two shares' frames.
    cut = rng.randrange(len(b"".join(frames[: 2 * FRAMES_PER_FEED])), len(stream))
    headers = ClientFrameHeaders()
    shares = [headers.feed(stream[:cut])]
    assert headers.more
    shares.append(headers.feed(stream[cut:]))  # the second read, while frames are held
    for _ in range(len(frames)):
        if not headers.more:
            break
        shares.append(headers.feed(b""))
    assert not headers.more and headers.refused is None
    assert b"".join(shares) == stream
    begin = 0
    for share in shares:
        started = sum(1 for at in range(begin, begin + len(share)) if at in starts)
        assert started <= FRAMES_PER_FEED, f"{started} frames handed on in one feed"
        begin += len(share)
    assert len(shares) > len(frames) // FRAMES_PER_FEED


def test_a_read_under_a_feeds_share_is_handed_on_whole_and_holds_nothing() -> None:
    stream = b"".join(frame(b"m" * 10) for _ in range(FRAMES_PER_FEED))
    headers = ClientFrameHeaders()
    assert headers.feed(stream) == stream
    assert not headers.more


class _Reading:
    """A transport as ``feed_held_later`` sees it: whether it reads, and its TLS context."""

    def __init__(self, sslcontext: object = None) -> None:
        self.reading = True
        self.sslcontext = sslcontext

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sslcontext if name == "sslcontext" else default


class _Connection:
    """An adapter's connection for ``feed_held_later`` and ``end_after_held``: what it hands its
    library, in order, the end of stream included."""

    def __init__(self, transport: _Reading) -> None:
        self.dara_frames: ClientFrameHeaders | None = ClientFrameHeaders()
        self.transport = transport
        self.library: list[bytes | None] = []  # None: the end of stream

    def data_received(self, data: bytes) -> None:
        frames = self.dara_frames
        assert frames is not None
        held = frames.more
        self.library.append(frames.feed(data))
        if frames.more and not held:
            feed_held_later(self)

    def dara_resumable(self) -> bool:
        return True

    def dara_ended(self) -> None:
        self.library.append(None)


def _three_shares() -> bytes:
    return frame(b"") * (3 * FRAMES_PER_FEED - 72)


async def test_an_end_of_stream_while_frames_are_held_reaches_the_library_after_the_last_share() -> None:
    # The library's flow control resumed reading meanwhile and the peer's end of stream was
    # read: the adapter keeps the transport open (True) and the end waits for the last share.
    connection = _Connection(_Reading())
    stream = _three_shares()
    connection.data_received(stream)
    assert not connection.transport.reading, "reading pauses while frames are held"
    assert end_after_held(connection)
    for _ in range(10):  # a share a turn of the loop
        if connection.library[-1:] == [None]:
            break
        await asyncio.sleep(0)
    assert connection.library[-1] is None and None not in connection.library[:-1]
    assert b"".join(share for share in connection.library if share is not None) == stream
    assert len(connection.library) == 4, "three shares, then the end"
    assert not connection.transport.reading, "no reading resumed after the end of stream"
    assert not end_after_held(connection), "nothing held: the end is handed on at once"


async def test_an_end_of_stream_over_tls_hands_every_held_frame_on_at_once() -> None:
    # asyncio ends a TLS connection whatever eof_received answers: no later share could come.
    connection = _Connection(_Reading(sslcontext=object()))
    stream = _three_shares()
    connection.data_received(stream)
    assert not end_after_held(connection)
    assert b"".join(share for share in connection.library if share is not None) == stream
    assert connection.dara_frames is not None and not connection.dara_frames.more
