"""(6) Micro-benchmarks of the pure core: frame encoding, decoding and chunk reassembly.

Each operation has a ``raw`` version (what a hand-written server does with the standard library)
and an ``ours`` version calling dara_ws_core's pure layer. Operations are timed in this process,
up to ``iters`` calls (about 0.2 s) per repeat, median of 5 repeats.
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


def _time(op: Op, iters: int, budget_s: float = 0.2) -> float:
    """Median nanoseconds per call over 5 repeats of up to ``iters`` calls (fewer for slow
    operations: a repeat lasts about ``budget_s``)."""
    t = time.perf_counter_ns()
    for _ in range(10):
        op()
    estimate = max(1.0, (time.perf_counter_ns() - t) / 10)
    iters = max(10, min(iters, int(budget_s * 1e9 / estimate)))
    per_call = []
    for _ in range(5):
        t = time.perf_counter_ns()
        for _ in range(iters):
            op()
        per_call.append((time.perf_counter_ns() - t) / iters)
    return statistics.median(per_call)


def run(iters: int, impls: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    suites: dict[str, dict[str, Op] | str] = {}
    for impl in impls:
        try:
            suites[impl] = raw_ops() if impl == "raw" else ours_ops()
        except (ImportError, AttributeError) as exc:
            suites[impl] = f"unavailable: {exc}"
    for name in raw_ops():
        for impl in impls:
            suite = suites[impl]
            if isinstance(suite, str):
                rows.append(Row("codec", impl, note=suite, variant=name))
                continue
            try:
                ns = _time(suite[name], iters)
            except Exception as exc:  # a changed core API shows as a note, not a crash
                rows.append(Row("codec", impl, note=f"failed: {exc!r}", variant=name))
                continue
            rows.append(Row("codec", impl, {"ns_per_op": ns, "ops_per_s": 1e9 / ns},
                            variant=name))
    return rows
