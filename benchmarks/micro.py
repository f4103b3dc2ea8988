"""(6) Micro-benchmarks of the pure core: frame encoding, decoding and chunk reassembly.

Each operation has a ``raw`` version (what a hand-written server does with the standard library)
and an ``ours`` version calling dara_ws_core's pure layer. Operations are timed in this process, up to
``iters`` calls (about 0.1 s) per repeat, median of 7 repeats alternating between implementations.
"""

from __future__ import annotations

__all__ = ["run"]

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from .stats import Row

PAYLOAD: dict[str, Any] = {"uid": "a1b2c3", "value": [1, 2, 3], "name": "state", "ok": True}
MESSAGE_FRAME = json.dumps({"type": "message", "message": PAYLOAD})
RESPONSE_FRAME = json.dumps(
    {"type": "message", "channel": "5f1d0c2e", "chunk_count": None, "message": PAYLOAD})
CHUNKS = 100
CHUNK_FRAMES = [
    json.dumps({"type": "message", "channel": "c1", "chunk_count": CHUNKS, "message": f"part{i}"})
    for i in range(CHUNKS)
]

Op = Callable[[], Any]


def raw_ops() -> dict[str, Op]:
    def encode_message() -> bytes:
        return json.dumps({"type": "message", "message": PAYLOAD}).encode()

    def decode_response() -> Any:
        frame = json.loads(RESPONSE_FRAME)
        return frame["channel"], frame["message"]

    def reassemble() -> list[Any]:
        parts: list[Any] = []
        for text in CHUNK_FRAMES:
            frame = json.loads(text)
            parts.append(frame["message"])
            if len(parts) == frame["chunk_count"]:
                return parts
        raise AssertionError("incomplete")

    return {"encode message": encode_message, "decode response": decode_response,
            f"reassemble {CHUNKS} chunks": reassemble}


def ours_ops() -> dict[str, Op]:
    """The same operations through dara_ws_core's pure layer (pydantic-core codec, assembler)."""
    from dara_ws_core import ChunkAssembler, DaraClientMessage, build_frame, decode_client_frame

    def encode_message() -> bytes:
        return build_frame(PAYLOAD)

    def decode_response() -> Any:
        frame = decode_client_frame(RESPONSE_FRAME)
        assert isinstance(frame, DaraClientMessage)
        return frame.channel, frame.message

    def reassemble() -> list[Any]:
        assembler: ChunkAssembler | None = None
        for text in CHUNK_FRAMES:
            frame = decode_client_frame(text)
            assert isinstance(frame, DaraClientMessage) and frame.chunk_count is not None
            if assembler is None:
                assembler = ChunkAssembler(frame.chunk_count, max_chunks=10_000,
                                           max_bytes=64 * 1024 * 1024)
            parts = assembler.feed(frame.message, chunk_count=frame.chunk_count,
                                   chunk_index=frame.chunk_index, size=len(text))
            if parts is not None:
                return parts
        raise AssertionError("incomplete")

    return {"encode message": encode_message, "decode response": decode_response,
            f"reassemble {CHUNKS} chunks": reassemble}


def _calibrate(op: Op, iters: int, budget_s: float) -> int:
    """Calls per repeat: ``iters``, or fewer for a slow operation (a repeat lasts ~``budget_s``)."""
    t = time.perf_counter_ns()
    for _ in range(10):
        op()
    estimate = max(1.0, (time.perf_counter_ns() - t) / 10)
    return max(10, min(iters, int(budget_s * 1e9 / estimate)))


def _repeat(op: Op, calls: int) -> float:
    t = time.perf_counter_ns()
    for _ in range(calls):
        op()
    return (time.perf_counter_ns() - t) / calls


def run(iters: int, impls: Sequence[str], repeats: int = 7, budget_s: float = 0.1) -> list[Row]:
    """Time every operation of every implementation: ``repeats`` repeats, alternating between
    the implementations (so a burst of background load hits them alike), median ns per call."""
    suites: dict[str, dict[str, Op] | str] = {}
    for impl in impls:
        try:
            suites[impl] = raw_ops() if impl == "raw" else ours_ops()
        except (ImportError, AttributeError) as exc:
            suites[impl] = f"unavailable: {exc}"
    rows: list[Row] = []
    for name in raw_ops():
        notes: dict[str, str] = {}
        ops: dict[str, tuple[Op, int]] = {}
        for impl, suite in suites.items():
            if isinstance(suite, str):
                notes[impl] = suite
                continue
            try:
                ops[impl] = (suite[name], _calibrate(suite[name], iters, budget_s))
            except Exception as exc:  # a changed core API shows as a note, not a crash
                notes[impl] = f"failed: {exc!r}"
        per_call: dict[str, list[float]] = {impl: [] for impl in ops}
        for _ in range(repeats):
            for impl, (op, calls) in ops.items():
                per_call[impl].append(_repeat(op, calls))
        for impl in impls:
            if impl in notes:
                rows.append(Row("codec", impl, note=notes[impl], variant=name))
            else:
                ns = statistics.median(per_call[impl])
                rows.append(Row("codec", impl, {"ns_per_op": ns, "ops_per_s": 1e9 / ns},
                                variant=name))
    return rows
