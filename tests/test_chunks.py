"""Chunk reassembly (protocol.md section 4): any split reassembles, any bad sequence fails fast."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dara_ws_core.chunks import ChunkAssembler
from dara_ws_core.exceptions import ChunkError, ProtocolError

from . import strategies as S

LIMITS: dict[str, Any] = {"max_chunks": 64, "max_bytes": 2**20}

#: Parts only need to be told apart (their codec is tested in test_messages).
parts = st.none() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2)
part_lists = st.lists(parts, min_size=1, max_size=16)
json_part_lists = st.lists(S.json_values, min_size=1, max_size=8)


def split(value: list[Any], size: int) -> list[list[Any]]:
    """Split a list in parts of ``size`` items (the last may be shorter), at least one part."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [[]]


def feed_all(
    assembler: ChunkAssembler, parts: list[Any], indexes: list[int] | None = None
) -> list[Any] | None:
    """Feed every part; check nothing completes early and the counters follow."""
    count = assembler.expected
    result = None
    for n, i in enumerate(indexes if indexes is not None else range(len(parts))):
        assert result is None, "completed before the last part"
        result = assembler.feed(
            parts[i], chunk_count=count, chunk_index=None if indexes is None else i
        )
        assert assembler.received == n + 1
    return result


@given(st.lists(parts, max_size=40), st.integers(min_value=1, max_value=50))
def test_any_value_split_in_any_chunk_size_reassembles(value: list[Any], size: int) -> None:
    parts = split(value, size)
    assembler = ChunkAssembler(len(parts), max_chunks=len(parts), max_bytes=0)
    result = feed_all(assembler, parts)
    assert result is not None
    assert [item for part in result for item in part] == value


@given(json_part_lists | part_lists)
def test_unindexed_parts_complete_in_arrival_order(parts: list[Any]) -> None:
    assembler = ChunkAssembler(len(parts), **LIMITS)
    assert assembler.expected == len(parts)
    assert assembler.received == 0
    assert feed_all(assembler, parts) == parts


@given(part_lists.flatmap(lambda p: st.tuples(st.just(p), st.permutations(range(len(p))))))
def test_indexed_parts_complete_in_index_order_whatever_the_arrival(
    case: tuple[list[Any], list[int]],
) -> None:
    parts, arrival = case
    assembler = ChunkAssembler(len(parts), **LIMITS)
    assert feed_all(assembler, parts, indexes=list(arrival)) == parts


def test_parts_that_are_none_are_kept() -> None:
    assembler = ChunkAssembler(3, **LIMITS)
    assert assembler.feed(None, chunk_count=3, chunk_index=2) is None
    assert assembler.feed(None, chunk_count=3, chunk_index=0) is None
    assert assembler.feed(1, chunk_count=3, chunk_index=1) == [None, 1, None]


def test_a_single_part_completes_at_once() -> None:
    assert ChunkAssembler(1, **LIMITS).feed("only", chunk_count=1) == ["only"]


def test_chunk_error_fails_the_request_but_not_the_connection() -> None:
    assert issubclass(ChunkError, ProtocolError)
    assert ChunkError("x").close_code is None


# --------------------------------------------------------------------------- invalid sequences


@given(st.integers(max_value=0))
def test_a_chunk_count_below_one_is_refused(count: int) -> None:
    with pytest.raises(ChunkError):
        ChunkAssembler(count, **LIMITS)


@given(st.integers(min_value=1, max_value=10**30), st.integers(min_value=1, max_value=100))
def test_a_chunk_count_above_the_limit_is_refused_without_allocating(
    count: int, max_chunks: int
) -> None:
    if count <= max_chunks:
        assert ChunkAssembler(count, max_chunks=max_chunks, max_bytes=0).expected == count
    else:
        with pytest.raises(ChunkError):
            ChunkAssembler(count, max_chunks=max_chunks, max_bytes=0)


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=-5, max_value=30),
       st.integers(min_value=0, max_value=19), st.booleans())
def test_a_part_whose_count_disagrees_with_the_first_fails(
    count: int, other: int, fed: int, indexed: bool
) -> None:
    assume(other != count)
    fed = min(fed, count - 1)
    assembler = ChunkAssembler(count, **LIMITS)
    for i in range(fed):
        assembler.feed(i, chunk_count=count, chunk_index=i if indexed else None)
    with pytest.raises(ChunkError):
        assembler.feed("x", chunk_count=other, chunk_index=fed if indexed else None)


@given(st.integers(min_value=2, max_value=20).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n - 1),
                        st.integers(min_value=1, max_value=n - 1))
))
def test_a_duplicate_index_fails(case: tuple[int, int, int]) -> None:
    count, index, before = case
    assembler = ChunkAssembler(count, **LIMITS)
    fed = [index, *[i for i in range(count) if i != index][: before - 1]]
    for i in fed:
        assert assembler.feed(i, chunk_count=count, chunk_index=i) is None
    with pytest.raises(ChunkError):
        assembler.feed("again", chunk_count=count, chunk_index=index)


@given(st.integers(min_value=1, max_value=20),
       st.integers(min_value=-(2**40), max_value=2**40))
def test_an_out_of_range_index_fails(count: int, index: int) -> None:
    assume(not 0 <= index < count)
    with pytest.raises(ChunkError):
        ChunkAssembler(count, **LIMITS).feed("x", chunk_count=count, chunk_index=index)


@given(st.integers(min_value=2, max_value=20).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=1, max_value=n - 1))
), st.booleans())
def test_mixing_indexed_and_unindexed_parts_fails(
    case: tuple[int, int], indexed_first: bool
) -> None:
    count, fed = case
    assembler = ChunkAssembler(count, **LIMITS)
    for i in range(fed):
        assembler.feed(i, chunk_count=count, chunk_index=i if indexed_first else None)
    with pytest.raises(ChunkError):
        assembler.feed("x", chunk_count=count, chunk_index=None if indexed_first else fed)


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=20),
       st.integers(min_value=0, max_value=20_000), st.booleans())
def test_the_byte_limit_fails_the_part_that_crosses_it(
    sizes: list[int], max_bytes: int, indexed: bool
) -> None:
    assembler = ChunkAssembler(len(sizes), max_chunks=len(sizes), max_bytes=max_bytes)
    total = 0
    for i, size in enumerate(sizes):
        total += size
        part: dict[str, Any] = {"chunk_count": len(sizes), "chunk_index": i if indexed else None, "size": size}
        if total > max_bytes:
            with pytest.raises(ChunkError):
                assembler.feed(i, **part)
            return
        result = assembler.feed(i, **part)
        assert (result is not None) == (i == len(sizes) - 1)
    assert total <= max_bytes


@given(
    st.integers(min_value=1, max_value=8),
    st.lists(
        st.tuples(
            st.integers(min_value=-2, max_value=10),
            st.none() | st.integers(min_value=-2, max_value=10),
            st.integers(min_value=0, max_value=40),
        ),
        max_size=30,
    ),
)
def test_any_sequence_completes_or_fails_within_its_bounds(
    count: int, frames: list[tuple[int, int | None, int]]
) -> None:
    """Whatever arrives, an assembler never holds more than ``count`` parts or more bytes than its
    limit, and after at most ``count`` accepted parts it has completed or failed."""
    assembler = ChunkAssembler(count, max_chunks=8, max_bytes=100)
    size_sum = 0
    for n, (chunk_count, index, size) in enumerate(frames):
        try:
            result = assembler.feed(n, chunk_count=chunk_count, chunk_index=index, size=size)
        except ChunkError:
            return
        size_sum += size
        assert size_sum <= 100
        assert assembler.received <= count
        if result is not None:
            assert len(result) == count
            assert assembler.received == count
            return
    assert assembler.received < count


@pytest.mark.parametrize("index", [None, 0, 9_999], ids=["unindexed", "first-index", "last-index"])
def test_an_announced_count_allocates_nothing_until_its_parts_arrive(index: int | None) -> None:
    # A client announcing 10 000 parts and sending one must cost one part, not a slot for each
    # announced part (80 KB): the count is compared with, never sized from.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assemblers = [ChunkAssembler(10_000, max_chunks=10_000, max_bytes=2**20) for _ in range(10)]
        for assembler in assemblers:
            assert assembler.feed(0, chunk_count=10_000, chunk_index=index) is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 10 * 1024, f"{held} bytes held for 10 one-part answers"
    assert all(assembler.received == 1 for assembler in assemblers)
