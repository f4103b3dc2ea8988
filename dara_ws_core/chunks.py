"""Reassembly of chunked answers (protocol.md section 4). Pure and bounded.

A client may answer a server request in N parts, each a ``message`` frame with
``chunk_count: N``. Stock Dara clients send parts in order and without an index; our **[ext]**
``chunk_index`` lets parts arrive in any order. The answer is the list of part payloads, in arrival
order or in index order.

Everything that Dara accepted silently and that made it hang or grow is an error here: a
``chunk_count`` below 1 or above the limit, a part whose ``chunk_count`` disagrees with the first
part's, a duplicate or out-of-range index, mixing indexed and unindexed parts, and more bytes than
the limit.

Nothing is sized from the ``chunk_count`` a client declares: it is only compared with. The parts
are kept as they arrive (a list, or a dict by ``chunk_index``), so an answer that announces
10 000 parts and sends one holds one.
"""

from __future__ import annotations

__all__ = ["ChunkAssembler"]

from typing import Any

from .exceptions import ChunkError


class ChunkAssembler:
    """Collects the parts of one chunked answer.

    Create it with the ``chunk_count`` of the first part, then :meth:`feed` every part (the first
    included). ``feed`` returns the complete list when the last part arrives and ``None`` before;
    it raises :class:`ChunkError` on any inconsistency, after which the assembler must be dropped.
    It holds what was received, never a slot per announced part.
    """

    __slots__ = ("_count", "_indexed", "_max_bytes", "_parts", "_size")

    def __init__(self, chunk_count: int, *, max_chunks: int, max_bytes: int) -> None:
        if chunk_count < 1:
            raise ChunkError(f"chunk_count must be >= 1, got {chunk_count}")
        if chunk_count > max_chunks:
            raise ChunkError(f"chunk_count {chunk_count} exceeds the limit of {max_chunks}")
        self._count = chunk_count
        self._max_bytes = max_bytes
        # In arrival order; the first part with a chunk_index swaps in a dict by index.
        self._parts: list[Any] | dict[int, Any] = []
        self._size = 0
        self._indexed: bool | None = None

    @property
    def expected(self) -> int:
        """The number of parts announced by the first part."""
        return self._count

    @property
    def received(self) -> int:
        """The number of distinct parts received so far."""
        return len(self._parts)

    def feed(
        self, payload: Any, *, chunk_count: int, chunk_index: int | None = None, size: int = 0
    ) -> list[Any] | None:
        """Add one part; ``size`` is what it costs (its frame's length, or more), counted
        against the byte limit."""
        if chunk_count != self._count:
            raise ChunkError(
                f"chunk_count {chunk_count} disagrees with the first part's {self._count}"
            )
        indexed = chunk_index is not None
        if self._indexed is None:
            self._indexed = indexed
            if indexed:
                self._parts = {}
        elif self._indexed != indexed:
            raise ChunkError("a chunked answer mixes parts with and without chunk_index")
        self._size += size
        if self._size > self._max_bytes:
            raise ChunkError(f"chunked answer exceeds {self._max_bytes} bytes")
        parts = self._parts
        if type(parts) is list:
            parts.append(payload)
        else:
            assert isinstance(parts, dict) and chunk_index is not None
            if not 0 <= chunk_index < self._count:
                raise ChunkError(f"chunk_index {chunk_index} is out of range 0..{self._count - 1}")
            if chunk_index in parts:
                raise ChunkError(f"duplicate chunk_index {chunk_index}")
            parts[chunk_index] = payload
        if len(parts) < self._count:
            return None
        if type(parts) is list:
            return parts
        # As many distinct indexes in 0..count-1 as the count: every one of them is here.
        return [parts[index] for index in range(self._count)]
