"""The bounded outbound queue of a channel (protocol.md section 6, slow consumers)."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core.exceptions import ConnectionClosed
from dara_ws_core.queue import _BY_ADDRESS, ADDRESS_SHARES, PROCESS_QUEUED, TOTAL_SHARES, OutboundQueue, address_queued


async def settle() -> None:
    """Let every ready task run (a few loop iterations)."""
    for _ in range(5):
        await asyncio.sleep(0)


def drain(queue: OutboundQueue) -> list[bytes]:
    frames = []
    while (frame := queue.get_nowait()) is not None:
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------- bounds


async def test_frames_come_out_in_the_order_they_went_in() -> None:
    queue = OutboundQueue(max_messages=10, max_bytes=100)
    for frame in (b"a", b"b", b"c"):
        assert queue.offer(frame)
    assert [await queue.get() for _ in range(3)] == [b"a", b"b", b"c"]
    assert len(queue) == 0
    assert queue.nbytes == 0


def test_offer_refuses_a_frame_beyond_the_count_bound_and_changes_nothing() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=100)
    assert queue.offer(b"a")
    assert queue.offer(b"b")
    assert not queue.offer(b"c")
    assert (len(queue), queue.nbytes) == (2, 2)
    assert drain(queue) == [b"a", b"b"]


def test_offer_refuses_a_frame_once_the_backlog_reaches_the_byte_bound_and_changes_nothing() -> None:
    """The bound is on the backlog a frame joins: under it, a frame of any size is taken."""
    queue = OutboundQueue(max_messages=100, max_bytes=10)
    assert queue.offer(b"x" * 6)
    assert queue.offer(b"y" * 5), "6 < 10 queued: taken, whatever its own size"
    assert queue.nbytes == 11
    assert not queue.offer(b"w"), "11 >= 10 queued"
    assert (len(queue), queue.nbytes) == (2, 11)
    assert queue.get_nowait() == b"x" * 6
    assert queue.offer(b"z" * 4), "5 < 10"
    assert queue.nbytes == 9
    assert queue.offer(b"w"), "9 < 10"
    assert not queue.offer(b"v"), "10 queued"


def test_a_frame_as_big_as_the_bound_does_not_make_its_reader_slow() -> None:
    """A broadcast near ``max_message_size`` (= ``max_queue_bytes`` by default) behind one that
    is still being taken in is queued, not refused: the reader is one frame behind."""
    queue = OutboundQueue(max_messages=100, max_bytes=100)
    assert queue.offer(b"1" * 95)
    assert queue.offer(b"2" * 95)
    assert not queue.offer(b"3" * 95), "two whole frames behind: slow"
    assert queue.get_nowait() == b"1" * 95
    assert queue.offer(b"3" * 95)


def test_an_oversized_frame_is_accepted_while_the_backlog_is_under_the_bound() -> None:
    queue = OutboundQueue(max_messages=5, max_bytes=4)
    big = b"B" * 100
    assert queue.offer(big)
    assert queue.nbytes == 100
    assert not queue.offer(b"x")
    assert queue.get_nowait() is big
    assert queue.offer(b"x")
    assert queue.offer(big), "1 byte queued: under the bound"
    assert not queue.offer(b"y")


def test_drop_oldest_and_put_drops_the_oldest_frames_and_counts_them() -> None:
    queue = OutboundQueue(max_messages=3, max_bytes=100)
    for frame in (b"1", b"2", b"3"):
        queue.offer(frame)
    assert queue.drop_oldest_and_put(b"4") == 1
    assert queue.drop_oldest_and_put(b"5") == 1
    assert queue.dropped == 2
    assert drain(queue) == [b"3", b"4", b"5"]
    assert queue.drop_oldest_and_put(b"6") == 0, "room: nothing dropped"
    assert queue.dropped == 2


def test_drop_oldest_and_put_makes_byte_room_and_accepts_an_oversized_frame() -> None:
    queue = OutboundQueue(max_messages=10, max_bytes=10)
    for frame in (b"aaaa", b"bbbb", b"cc"):
        queue.offer(frame)
    assert queue.drop_oldest_and_put(b"dddddd") == 1, "10 queued: down to 6 < 10"
    assert queue.drop_oldest_and_put(b"ee") == 1, "12 queued: down to 8 < 10"
    assert drain(queue) == [b"cc", b"dddddd", b"ee"]
    queue.offer(b"eeeeeeeeee")
    assert queue.drop_oldest_and_put(b"F" * 50) == 1
    assert drain(queue) == [b"F" * 50]
    assert queue.dropped == 3


# --------------------------------------------------------------------------- waiting producers


def test_past_its_floor_a_queue_is_full_while_the_process_queues_hold_max_total() -> None:
    # Each queue within its own bounds (1,000 bytes), the process's queues together over
    # max_total (2,560): past a 256th of it (10 bytes), a queue takes no more, whatever its own
    # bounds leave; an empty queue still takes one frame, and under the total all is as before.
    start = PROCESS_QUEUED.bytes
    max_total = 2560 + start
    floor = max_total // TOTAL_SHARES
    others = [OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total) for _ in range(3)]
    mine = OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total)
    assert mine.offer(b"x" * floor)
    assert mine.offer(b"y" * 20)  # under the total: its own bounds only
    for queue in others:
        assert queue.offer(b"o" * 900)
    assert PROCESS_QUEUED.bytes - start >= 2560
    assert not mine.offer(b"z")
    assert mine.nbytes == floor + 20
    empty = OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total)
    assert empty.offer(b"e" * 500)  # a queue that holds nothing is never refused a frame
    assert not empty.offer(b"e")
    unbounded = OutboundQueue(max_messages=100, max_bytes=1000)
    assert unbounded.offer(b"u" * 500) and unbounded.offer(b"u" * 400)  # no max_total: as before
    empty.close()
    unbounded.close()
    drain(others[0])
    assert PROCESS_QUEUED.bytes - start < 2560
    assert mine.offer(b"z")  # the process back under its total


def test_the_queues_of_one_address_cannot_fill_max_total_and_hold_every_other_queue_to_its_floor() -> None:
    # One client's connections that do not read, each queue within its own bounds, filled the
    # process's max_total on their own: every other client's queue was then full past its
    # 256th (under drop_oldest, a reader a little behind lost frames). Past a quarter of
    # max_total for its address, a queue of that address is full past its floor instead.
    start = PROCESS_QUEUED.bytes
    max_total = 4000 + start
    share, floor = max_total // ADDRESS_SHARES, max_total // TOTAL_SHARES
    hog = "198.51.100.7"
    hogs = [OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total, address=hog) for _ in range(6)]
    taken = [sum(queue.offer(b"h" * 100) for _ in range(10)) for queue in hogs]
    assert share <= address_queued(hog) < share + 100 * len(hogs), taken
    assert taken[0] == 10 and all(n <= 1 + floor // 100 for n in taken[-3:]), taken  # past the share: its floor
    assert PROCESS_QUEUED.bytes < max_total  # the hog alone cannot fill the process
    bystander = OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total, address="203.0.113.9")
    assert all(bystander.offer(b"b" * 50) for _ in range(20))  # its own bounds only
    assert bystander.dropped == 0 and bystander.drop_oldest_and_put(b"b" * 10) == 1  # at max_bytes: its own bound
    # The hog's queues take again as their own readers drain them below the share.
    drain(hogs[0])
    assert hogs[0].offer(b"h" * 100) and hogs[0].offer(b"h" * 100)
    for queue in (*hogs, bystander):
        queue.close()
    assert address_queued(hog) == 0 and PROCESS_QUEUED.bytes == start
    assert hog not in _BY_ADDRESS  # an address with no queue left costs nothing


def test_the_process_tally_counts_what_the_queues_hold_and_forgets_closed_or_dropped_ones() -> None:
    start = PROCESS_QUEUED.bytes
    queue = OutboundQueue(max_messages=10, max_bytes=1000)
    queue.offer(b"a" * 100)
    queue.offer(b"b" * 50)
    assert PROCESS_QUEUED.bytes == start + 150
    queue.get_nowait()
    assert PROCESS_QUEUED.bytes == start + 50
    queue.drop_oldest_and_put(b"c" * 10)
    assert PROCESS_QUEUED.bytes == start + 60
    queue.close()
    assert PROCESS_QUEUED.bytes == start
    dropped = OutboundQueue(max_messages=10, max_bytes=1000)
    dropped.offer(b"d" * 70)
    assert PROCESS_QUEUED.bytes == start + 70
    del dropped  # never closed (an application's own queue): its bytes are given back
    assert PROCESS_QUEUED.bytes == start


async def test_a_putter_past_the_floor_waits_until_its_own_reader_drains_it() -> None:
    start = PROCESS_QUEUED.bytes
    max_total = 2560 + start
    floor = max_total // TOTAL_SHARES
    other = OutboundQueue(max_messages=100, max_bytes=10_000, max_total=max_total)
    assert other.offer(b"o" * 3000)  # the process over its total, for as long as it is unread
    mine = OutboundQueue(max_messages=100, max_bytes=1000, max_total=max_total)
    assert mine.offer(b"x" * floor) and not mine.offer(b"y")
    put = asyncio.ensure_future(mine.put(b"y", timeout=5))
    await settle()
    assert not put.done()
    assert mine.get_nowait() == b"x" * floor  # its reader takes one: room within the floor
    await asyncio.wait_for(put, 1)
    assert drain(mine) == [b"y"]
    other.close()


async def test_put_waits_for_room_and_resumes_when_get_frees_it() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    await queue.put(b"a")
    putter = asyncio.create_task(queue.put(b"b"))
    await settle()
    assert not putter.done()
    assert await queue.get() == b"a"
    await asyncio.wait_for(putter, 1)
    assert await queue.get() == b"b"


async def test_put_times_out_with_timeout_error_and_leaves_no_waiter() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    queue.offer(b"a")
    with pytest.raises(TimeoutError):
        await queue.put(b"b", timeout=0.01)
    assert drain(queue) == [b"a"]
    assert queue.offer(b"c"), "a timed-out put never blocks later offers"


async def test_an_offer_never_overtakes_a_waiting_put() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    queue.offer(b"a")
    putter = asyncio.create_task(queue.put(b"b"))
    await settle()
    assert await queue.get() == b"a"
    assert not queue.offer(b"c")
    await asyncio.wait_for(putter, 1)
    assert drain(queue) == [b"b"]


async def test_waiting_putters_are_served_in_order() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    queue.offer(b"0")
    putters = []
    for i in range(1, 5):
        putters.append(asyncio.create_task(queue.put(str(i).encode())))
        await settle()
    received = [await asyncio.wait_for(queue.get(), 1) for _ in range(5)]
    assert received == [b"0", b"1", b"2", b"3", b"4"]
    await asyncio.gather(*putters)


async def test_a_cancelled_putter_passes_its_wake_up_to_the_next() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    queue.offer(b"a")
    first = asyncio.create_task(queue.put(b"first"))
    await settle()
    second = asyncio.create_task(queue.put(b"second"))
    await settle()
    assert queue.get_nowait() == b"a"  # wakes ``first``...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.wait_for(second, 1)
    assert first.cancelled()
    assert drain(queue) == [b"second"]


async def test_a_putter_that_times_out_when_woken_passes_the_wake_up_on() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    queue.offer(b"a")
    first = asyncio.create_task(queue.put(b"first", timeout=0.05))
    second = asyncio.create_task(queue.put(b"second"))
    await settle()
    with pytest.raises(TimeoutError):
        await first
    assert queue.get_nowait() == b"a"
    await asyncio.wait_for(second, 1)
    assert drain(queue) == [b"second"]


async def test_a_big_frame_waiting_for_room_does_not_starve_forever() -> None:
    queue = OutboundQueue(max_messages=10, max_bytes=10)
    queue.offer(b"x" * 10)
    putter = asyncio.create_task(queue.put(b"B" * 50))
    await settle()
    assert not putter.done()
    assert queue.get_nowait() == b"x" * 10
    await asyncio.wait_for(putter, 1)
    assert drain(queue) == [b"B" * 50]


# --------------------------------------------------------------------------- close


async def test_close_wakes_the_getter_with_connection_closed() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=100)
    getter = asyncio.create_task(queue.get())
    await settle()
    queue.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(getter, 1)


async def test_close_wakes_every_putter_with_connection_closed_and_clears_memory() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=100)
    queue.offer(b"a")
    queue.offer(b"b")
    putters = [asyncio.create_task(queue.put(b"p%d" % i)) for i in range(3)]
    await settle()
    queue.close()
    results = await asyncio.wait_for(asyncio.gather(*putters, return_exceptions=True), 1)
    assert all(isinstance(r, ConnectionClosed) for r in results)
    assert queue.closed
    assert (len(queue), queue.nbytes) == (0, 0)
    assert queue.get_nowait() is None
    # No waiter survives the close.
    assert not queue._putters
    assert queue._getter is None


async def test_a_closed_queue_refuses_everything() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=100)
    queue.offer(b"a")
    queue.close()
    queue.close()  # idempotent
    with pytest.raises(ConnectionClosed):
        queue.offer(b"x")
    with pytest.raises(ConnectionClosed):
        queue.drop_oldest_and_put(b"x")
    with pytest.raises(ConnectionClosed):
        await queue.put(b"x")
    with pytest.raises(ConnectionClosed):
        await queue.get()
    assert queue.get_nowait() is None


# --------------------------------------------------------------------------- model


operations = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(min_value=0, max_value=12)),
        st.tuples(st.just("drop"), st.integers(min_value=0, max_value=12)),
        st.tuples(st.just("get"), st.just(0)),
        st.tuples(st.just("get_nowait"), st.just(0)),
    ),
    max_size=60,
)


@given(
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=0, max_value=20),
    operations,
)
async def test_any_sequence_of_offers_and_gets_matches_a_bounded_deque(
    max_messages: int, max_bytes: int, ops: list[tuple[str, int]]
) -> None:
    queue = OutboundQueue(max_messages=max_messages, max_bytes=max_bytes)
    model: deque[bytes] = deque()
    dropped = 0

    def fits(size: int) -> bool:
        return not model or (len(model) < max_messages and sum(map(len, model)) < max_bytes)

    for n, (op, size) in enumerate(ops):
        frame = n.to_bytes(2, "big") + b"." * size
        if op == "offer":
            expected = fits(len(frame))
            assert queue.offer(frame) is expected
            if expected:
                model.append(frame)
        elif op == "drop":
            lost = 0
            while not fits(len(frame)):
                model.popleft()
                lost += 1
            model.append(frame)
            assert queue.drop_oldest_and_put(frame) == lost
            dropped += lost
        elif op == "get" and model:
            assert await queue.get() == model.popleft()
        elif op == "get_nowait":
            assert queue.get_nowait() == (model.popleft() if model else None)
        assert list(queue._frames) == list(model)
        assert len(queue) == len(model)
        assert queue.nbytes == sum(map(len, model))
        assert queue.dropped == dropped
        # The byte bound holds but for the last frame taken.
        assert len(model) <= max_messages
        assert not model or queue.nbytes - len(model[-1]) < max(max_bytes, 1) or len(model) == 1


# --------------------------------------------------------------------------- fan-out bursts


def test_a_burst_is_taken_past_the_bounds_up_to_burst_times_them() -> None:
    queue = OutboundQueue(max_messages=100, max_bytes=10)
    assert queue.offer(b"x" * 10)
    assert not queue.offer(b"y")
    taken = 0
    while queue.take_burst(b"y" * 5, grace=None):
        taken += 1
        assert taken < 100
    assert queue.nbytes == 40  # BURST (4) times the bound: refused from there
    assert (taken, len(queue)) == (6, 7)
    assert not queue.take_burst(b"z", grace=None)
    assert queue.nbytes == 40  # a refusal changes nothing
    queue_by_count = OutboundQueue(max_messages=2, max_bytes=1000)
    for _ in range(2):
        queue_by_count.offer(b"a")
    assert [queue_by_count.take_burst(b"b", grace=None) for _ in range(7)] == [True] * 6 + [False]


def test_a_queue_full_for_longer_than_the_grace_is_refused_until_it_catches_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("dara_ws_core.queue.time.monotonic", lambda: clock[0])
    queue = OutboundQueue(max_messages=100, max_bytes=10)
    queue.offer(b"x" * 10)
    assert queue.take_burst(b"a", grace=2.0)  # full since 100.0
    clock[0] = 101.5
    assert queue.take_burst(b"b", grace=2.0)
    clock[0] = 102.5
    assert not queue.take_burst(b"c", grace=2.0), "full for 2.5 s"
    assert queue.get_nowait() == b"x" * 10  # 2 bytes left: caught up, the grace starts over
    assert queue.offer(b"c")
    queue.offer(b"d" * 10)
    clock[0] = 200.0
    assert queue.take_burst(b"e", grace=2.0)
    assert drain(queue) == [b"a", b"b", b"c", b"d" * 10, b"e"]
