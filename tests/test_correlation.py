"""The correlation table (protocol.md section 4): a state machine against a model; unit tests."""

from __future__ import annotations

import itertools
import json
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

from dara_ws_core.config import ServerConfig
from dara_ws_core.correlation import (
    CHUNK_ADDRESS_SHARES,
    CHUNK_SHARES,
    PART_BYTES,
    PART_VALUES,
    PROCESS_CHUNKS,
    ChunkBudget,
    Completed,
    Failed,
    Ignored,
    Partial,
    PendingRequests,
)
from dara_ws_core.exceptions import ChunkError, RequestError, TooManyPendingRequests
from dara_ws_core.messages import DaraClientMessage

from . import strategies as S

MAX_PENDING = 4
MAX_CHUNKS = 4
MAX_BYTES = 4 * PART_BYTES + 24
MAX_VALUES = 12
#: The process's bounds, of which the channel's are its fair share; and what the other channels
#: of the process hold: the room they leave below the process's last share (kept for small
#: answers, which no part of this channel is) is below the channel's own, so both are reached.
TOTAL_BYTES, TOTAL_VALUES = CHUNK_SHARES * MAX_BYTES, CHUNK_SHARES * MAX_VALUES
OTHER_BYTES = TOTAL_BYTES - MAX_BYTES - (MAX_BYTES - 40)
OTHER_VALUES = TOTAL_VALUES - MAX_VALUES - 9

#: Payloads only need to be told apart (their codec is tested in test_messages); strings of
#: 1- to 4-byte characters check that parts are counted in UTF-8 bytes.
payloads = (st.none() | st.integers() | st.lists(st.integers(), max_size=2)
            | st.text(alphabet="aé€😀", max_size=4))


def wire_size(payload: Any) -> int:
    """A part's size as the table must count it: compact JSON in UTF-8 bytes."""
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def held_size(payload: Any) -> int:
    """What a part's strings hold decoded (PEP 393): 1, 2 or 4 bytes a character by the widest
    of them, for a non-ASCII one with its terminator's extra bytes and the UTF-8 copy that
    encoding it (the table's size check) leaves cached in it."""
    if not isinstance(payload, str):
        return 0
    widest = max((ord(char) for char in payload), default=0)
    if widest < 0x80:
        return len(payload)
    width = 1 if widest < 0x100 else 2 if widest < 0x10000 else 4
    return (len(payload) + 1) * width + len(payload.encode())


def cost(payload: Any) -> tuple[int, int]:
    """What the table must count for holding a part: its bytes (compact JSON, or what its
    strings hold decoded when that is more) and values, and a part's own."""
    return max(wire_size(payload), held_size(payload)) + PART_BYTES, value_count(payload) + PART_VALUES


def value_count(payload: Any) -> int:
    """A part's JSON values as the table must count them, by walking it. The count is made on
    the text, as for a frame (an upper bound): an empty list counts as holding one value (its
    opening bracket announces one), and a string holding commas or brackets counts them too,
    which never happens in ``payloads``."""
    if isinstance(payload, list):
        return 1 + (sum(value_count(item) for item in payload) or 1)
    if isinstance(payload, dict):
        return 1 + (sum(value_count(item) for item in payload.values()) or 1)
    return 1


def response(
    rchan: str, message: Any = None, chunk_count: int | None = None, chunk_index: int | None = None
) -> DaraClientMessage:
    return DaraClientMessage(
        channel=rchan, message=message, chunk_count=chunk_count, chunk_index=chunk_index
    )


def is_uuid4(rchan: str) -> bool:
    try:
        parsed = uuid.UUID(rchan)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == rchan


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, eq=False)
class Waiter:
    """An opaque waiter (the asyncio layer uses a future); ``serial`` names it for the model."""

    serial: int


@dataclass
class ModelEntry:
    waiter: Waiter
    count: int | None = None
    indexed: bool | None = None
    parts: dict[int, Any] = field(default_factory=dict)
    size: int = 0
    values: int = 0


@dataclass(frozen=True)
class Expect:
    kind: str  # "completed" | "failed" | "partial" | "ignored"
    value: Any = None


def predict(entry: ModelEntry | None, payload: Any, count: int | None, index: int | None, *,
            held: tuple[int, int]) -> Expect:
    """What the protocol says one response frame does to one entry (protocol.md section 4);
    ``held`` is the bytes and values of parts stored for every pending entry of the channel."""
    if entry is None:
        return Expect("ignored")
    if count is None:
        return Expect("failed") if entry.count is not None else Expect("completed", payload)
    if entry.count is None:
        if not 1 <= count <= MAX_CHUNKS:
            return Expect("failed")
        entry.count = count
    if count != entry.count:
        return Expect("failed")
    indexed = index is not None
    if entry.indexed is None:
        entry.indexed = indexed
    elif entry.indexed != indexed:
        return Expect("failed")
    size, values = cost(payload)
    held_bytes, held_values = held[0] + size, held[1] + values
    # The limits are per channel, over every pending answer, and per process, whose last share
    # only takes the parts of channels holding under a 64th of their own bounds.
    if held_bytes > MAX_BYTES or held_values > MAX_VALUES:
        return Expect("failed")
    total_bytes, total_values = OTHER_BYTES + held_bytes, OTHER_VALUES + held_values
    if total_bytes > TOTAL_BYTES or total_values > TOTAL_VALUES:
        return Expect("failed")
    if ((total_bytes > TOTAL_BYTES - TOTAL_BYTES // CHUNK_SHARES
         or total_values > TOTAL_VALUES - TOTAL_VALUES // CHUNK_SHARES)
            and (held_bytes > MAX_BYTES // 64 or held_values > MAX_VALUES // 64)):
        return Expect("failed")
    position = len(entry.parts) if index is None else index
    if not 0 <= position < entry.count or position in entry.parts:
        return Expect("failed")
    entry.parts[position] = payload
    entry.size += size
    entry.values += values
    if len(entry.parts) == entry.count:
        return Expect("completed", [entry.parts[i] for i in range(entry.count)])
    return Expect("partial", (len(entry.parts), entry.count))


class PendingRequestsMachine(RuleBasedStateMachine):
    """Every request ends exactly once; the table never holds more than the model."""

    rchans = Bundle("rchans")

    def __init__(self) -> None:
        super().__init__()
        self.budget = ChunkBudget()
        self.budget.bytes, self.budget.values = OTHER_BYTES, OTHER_VALUES
        self.table: PendingRequests[Waiter] = PendingRequests(
            ServerConfig(max_pending_requests=MAX_PENDING, max_chunks=MAX_CHUNKS,
                         max_chunked_bytes=MAX_BYTES, max_chunked_values=MAX_VALUES,
                         max_chunked_total_bytes=TOTAL_BYTES, max_chunked_total_values=TOTAL_VALUES),
            budget=self.budget,
        )
        self.pending: dict[str, ModelEntry] = {}
        self.issued: set[str] = set()
        self.serials = itertools.count()
        self.opened: set[int] = set()  # serials of waiters
        self.ended: dict[int, str] = {}  # serial -> how it ended

    def end(self, waiter: Waiter, how: str) -> None:
        assert waiter.serial in self.opened
        assert waiter.serial not in self.ended, (
            f"ended twice: {self.ended[waiter.serial]} then {how}"
        )
        self.ended[waiter.serial] = how

    # ------------------------------------------------------------------ rules

    @rule(target=rchans)
    def open(self) -> Any:
        waiter = Waiter(next(self.serials))
        if len(self.pending) >= MAX_PENDING:
            with pytest.raises(TooManyPendingRequests):
                self.table.open(waiter)
            return multiple()
        rchan = self.table.open(waiter)
        assert is_uuid4(rchan)
        assert rchan not in self.issued, "an rchan is never reused"
        self.issued.add(rchan)
        self.opened.add(waiter.serial)
        self.pending[rchan] = ModelEntry(waiter)
        return rchan

    def answer(self, rchan: str, payload: Any, count: int | None = None,
               index: int | None = None) -> None:
        entry = self.pending.get(rchan)
        held = (sum(e.size for e in self.pending.values()),
                sum(e.values for e in self.pending.values()))
        expected = predict(entry, payload, count, index, held=held)
        outcome = self.table.receive(response(rchan, payload, count, index))
        event(f"outcome: {expected.kind}" + (f" of {entry.count} parts" if entry and entry.count else ""))
        if expected.kind == "ignored":
            assert outcome == Ignored(rchan)
            return
        assert entry is not None
        if expected.kind == "partial":
            assert outcome == Partial(rchan, *expected.value)
            assert rchan in self.table
            return
        del self.pending[rchan]
        if expected.kind == "completed":
            assert isinstance(outcome, Completed)
            assert outcome.value == expected.value
        else:
            assert isinstance(outcome, Failed)
            assert isinstance(outcome.error, ChunkError)
        assert outcome.rchan == rchan
        assert outcome.waiter is entry.waiter
        assert rchan not in self.table
        self.end(entry.waiter, expected.kind)

    @rule(rchan=rchans, payload=payloads)
    def answer_plain(self, rchan: str, payload: Any) -> None:
        self.answer(rchan, payload)

    @rule(
        rchan=rchans,
        payload=payloads,
        count=st.integers(min_value=-1, max_value=MAX_CHUNKS + 1),
        index=st.none() | st.integers(min_value=-1, max_value=MAX_CHUNKS + 1),
    )
    def answer_chunk(self, rchan: str, payload: Any, count: int, index: int | None) -> None:
        """Any chunk: valid or not, for a pending, ended or discarded request."""
        self.answer(rchan, payload, count, index)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), payload=payloads)
    def answer_valid_chunk(self, data: st.DataObject, payload: Any) -> None:
        """The next part of a well-formed chunked answer (so that completions happen)."""
        rchan = data.draw(st.sampled_from(list(self.pending)))  # insertion order: replayable
        entry = self.pending[rchan]
        if entry.count is None:
            count = data.draw(st.integers(min_value=1, max_value=MAX_CHUNKS))
            indexed = data.draw(st.booleans())
        else:
            count, indexed = entry.count, bool(entry.indexed)
        missing = [i for i in range(count) if i not in entry.parts]
        index = data.draw(st.sampled_from(missing)) if indexed and missing else None
        self.answer(rchan, payload, count, index)

    @rule(rchan=S.uuids, payload=payloads, count=st.none() | st.integers(1, MAX_CHUNKS))
    def answer_unknown_rchan(self, rchan: str, payload: Any, count: int | None) -> None:
        assert rchan not in self.issued
        before = len(self.table)
        assert self.table.receive(response(rchan, payload, count)) == Ignored(rchan)
        assert len(self.table) == before

    @rule(rchan=rchans)
    def discard(self, rchan: str) -> None:
        """The caller timed out or was cancelled (its ``finally``); idempotent."""
        self.table.discard(rchan)
        entry = self.pending.pop(rchan, None)
        if entry is not None:
            self.end(entry.waiter, "discarded")
        assert rchan not in self.table

    @rule()
    def close(self) -> None:
        waiters = self.table.close()
        assert sorted(w.serial for w in waiters) == sorted(
            e.waiter.serial for e in self.pending.values()
        )
        for entry in self.pending.values():
            self.end(entry.waiter, "closed")
        self.pending.clear()
        assert len(self.table) == 0
        assert self.table.close() == []

    # ------------------------------------------------------------------ invariants

    @invariant()
    def table_matches_the_model(self) -> None:
        assert len(self.table) == len(self.pending) <= MAX_PENDING
        assert set(self.table) == set(self.pending)
        for rchan, entry in self.pending.items():
            assert rchan in self.table
            assert self.table.waiter(rchan) is entry.waiter

    @invariant()
    def held_bytes_and_values_are_those_of_pending_parts(self) -> None:
        held = sum(e.size for e in self.pending.values())
        values = sum(e.values for e in self.pending.values())
        assert self.table.held_bytes == held <= MAX_BYTES
        assert self.table.held_values == values <= MAX_VALUES
        assert self.budget.bytes == OTHER_BYTES + held <= TOTAL_BYTES
        assert self.budget.values == OTHER_VALUES + values <= TOTAL_VALUES

    @invariant()
    def every_request_is_pending_or_ended_once(self) -> None:
        pending = {e.waiter.serial for e in self.pending.values()}
        assert pending.isdisjoint(self.ended)
        assert pending | set(self.ended) == self.opened

    def teardown(self) -> None:
        waiters = self.table.close()
        assert len(waiters) == len(self.pending)
        assert len(self.table) == 0
        assert list(self.table) == []
        assert (self.budget.bytes, self.budget.values) == (OTHER_BYTES, OTHER_VALUES)


TestPendingRequests = PendingRequestsMachine.TestCase
# Short runs, many of them: every rule is reachable within a few steps (MAX_PENDING is 4).
TestPendingRequests.settings = settings(stateful_step_count=30)


# --------------------------------------------------------------------------- outcomes


def test_a_plain_answer_completes_with_its_payload_and_removes_the_entry() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchan = table.open("w")
    assert table.waiter(rchan) == "w"
    assert table.receive(response(rchan, {"v": None})) == Completed(rchan, "w", {"v": None})
    assert rchan not in table
    assert table.receive(response(rchan, 1)) == Ignored(rchan), "already answered"


def test_tables_without_requests_share_nothing_that_a_request_can_reach() -> None:
    # Tables that never had a request share one empty dict (memory): a request on one must
    # neither appear in another, nor leave anything behind in what they share.
    first: PendingRequests[str] = PendingRequests()
    second: PendingRequests[str] = PendingRequests()
    rchan = first.open("w")
    assert rchan in first and rchan not in second and len(second) == 0
    with pytest.raises(KeyError):
        second.waiter(rchan)
    assert second.close() == [] and first.close() == ["w"]
    assert len(first) == 0 and len(PendingRequests()) == 0
    third: PendingRequests[str] = PendingRequests()
    third.discard(rchan)
    assert third.receive(response(rchan, 1)) == Ignored(rchan)
    assert list(third) == []


def test_a_chunked_answer_is_partial_until_its_last_part() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchan = table.open("w")
    assert table.receive(response(rchan, "b", 2, 1)) == Partial(rchan, 1, 2)
    assert table.receive(response(rchan, "a", 2, 0)) == Completed(rchan, "w", ["a", "b"])
    assert len(table) == 0


def test_a_chunked_answer_keeps_each_part_as_its_frame_decoded_it() -> None:
    # Decoded once, with its frame (bounded as a frame); the last part parses nothing, it only
    # makes the list: what the answer costs is spread over its frames.
    first, second = {"rows": [[1, 2], [3, 4]]}, ["é", None]
    table: PendingRequests[str] = PendingRequests()
    rchan = table.open("w")
    assert table.receive(response(rchan, second, 2, 1)) == Partial(rchan, 1, 2)
    outcome = table.receive(response(rchan, first, 2, 0))
    assert outcome == Completed(rchan, "w", [first, second])
    assert isinstance(outcome, Completed)
    assert outcome.value[0] is first and outcome.value[1] is second


def test_a_plain_answer_after_chunks_fails_the_request() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchan = table.open("w")
    table.receive(response(rchan, "a", 2))
    outcome = table.receive(response(rchan, "b"))
    assert isinstance(outcome, Failed)
    assert outcome.waiter == "w"
    assert isinstance(outcome.error, ChunkError)
    assert rchan not in table


@pytest.mark.parametrize(
    "frames",
    [
        [(0, None)],
        [(-3, None)],
        [(3, None), (2, None)],
        [(3, 0), (3, 0)],
        [(3, 3)],
        [(3, -1)],
        [(3, 0), (3, None)],
        [(3, None), (3, 1)],
        [(MAX_CHUNKS + 1, None)],
    ],
    ids=["zero", "negative", "disagreeing", "duplicate", "above", "below", "mixed",
         "mixed-other-way", "too-many"],
)
def test_an_invalid_chunk_sequence_fails_the_request(
    frames: list[tuple[int, int | None]],
) -> None:
    table: PendingRequests[str] = PendingRequests(max_chunks=MAX_CHUNKS)
    rchan = table.open("w")
    outcomes = [table.receive(response(rchan, n, count, index)) for n, (count, index) in
                enumerate(frames)]
    assert isinstance(outcomes[-1], Failed)
    assert all(isinstance(o, Partial) for o in outcomes[:-1])
    assert rchan not in table


def test_chunked_bytes_above_the_limit_fail_the_request() -> None:
    limit = 2 * PART_BYTES + 100
    table: PendingRequests[str] = PendingRequests(max_chunked_bytes=limit)
    rchan = table.open("w")
    assert isinstance(table.receive(response(rchan, "a" * 58, 3)), Partial)  # 60 bytes
    outcome = table.receive(response(rchan, "b" * 39, 3))  # 41 more
    assert isinstance(outcome, Failed)
    assert str(limit) in str(outcome.error)


def test_chunked_bytes_are_counted_in_utf8_not_in_characters() -> None:
    # 25 four-byte characters: 25 characters, 102 bytes with the quotes.
    table: PendingRequests[str] = PendingRequests(max_chunked_bytes=PART_BYTES + 100)
    rchan = table.open("w")
    outcome = table.receive(response(rchan, "\U0001f600" * 25, 2))
    assert isinstance(outcome, Failed)


def test_chunked_values_above_the_limit_fail_the_request() -> None:
    # Each part is small; the answer is not: it fails at the part that crosses the bound, not
    # after its last part arrived (nor, by then, decoded a hundred times what a frame may hold).
    table: PendingRequests[str] = PendingRequests(max_chunked_values=10)
    rchan = table.open("w")
    assert isinstance(table.receive(response(rchan, [1, 2, 3, 4], 5)), Partial)  # 5 values
    assert table.held_values == 5 + PART_VALUES
    outcome = table.receive(response(rchan, [[], [], [], [], []], 5))  # 6 more
    assert isinstance(outcome, Failed) and isinstance(outcome.error, ChunkError)
    assert "10 JSON values" in str(outcome.error)
    assert rchan not in table and table.held_values == 0 and table.held_bytes == 0


def test_the_error_of_a_failed_chunked_answer_keeps_none_of_its_parts() -> None:
    # The caller keeps the ChunkError as long as it likes (a future's exception, a log record):
    # that must not keep the refused answer's parts, as its traceback's frames would.
    class Part(list[int]):  # a list that a weak reference can watch
        pass

    table: PendingRequests[str] = PendingRequests(max_chunked_values=10)
    rchan = table.open("w")
    part = Part(range(5))
    watch = weakref.ref(part)
    assert isinstance(table.receive(response(rchan, part, 3)), Partial)
    outcome = table.receive(response(rchan, list(range(5)), 3))
    assert isinstance(outcome, Failed)
    error = outcome.error
    del part, outcome
    assert watch() is None, "the parts of a failed answer outlive it"
    assert error.__traceback__ is None


def test_chunked_values_are_counted_as_in_a_frame() -> None:
    # As a frame's: every comma and opening bracket, inside strings too (an upper bound), for a
    # part of up to 1,024 of them.
    table: PendingRequests[str] = PendingRequests(max_chunked_values=10)
    rchan = table.open("w")
    assert isinstance(table.receive(response(rchan, {"a": [None, {}]}, 2)), Partial)
    # {"a":[null,{}]}: 3 brackets, 1 comma, and the first value (and the part's own)
    assert table.held_values == 5 + PART_VALUES
    assert isinstance(table.receive(response(rchan, ",,,,,,", 2)), Failed)  # 7 more


def test_a_part_of_one_long_text_of_commas_is_charged_one_value() -> None:
    # Past 1,024 commas and brackets, the strings are left out of the count: a CSV file in a
    # string is one value. It was charged one per comma, and failed the answer.
    table: PendingRequests[str] = PendingRequests(max_chunked_values=100)
    rchan = table.open("w")
    csv = ",".join(["1"] * 5000)
    assert isinstance(table.receive(response(rchan, csv, 2)), Partial)
    assert table.held_values == 1 + PART_VALUES
    outcome = table.receive(response(rchan, [1] * 100, 2))  # the structure still counts
    assert isinstance(outcome, Failed)


def test_chunked_values_are_bounded_per_channel_not_only_per_answer() -> None:
    table: PendingRequests[str] = PendingRequests(max_chunked_values=10)
    first, second = table.open("a"), table.open("b")
    assert isinstance(table.receive(response(first, list(range(5)), 2)), Partial)  # 6 values
    outcome = table.receive(response(second, list(range(5)), 2))
    assert isinstance(outcome, Failed) and outcome.waiter == "b"
    assert table.held_values == 6 + PART_VALUES
    assert isinstance(table.receive(response(first, 1, 2)), Completed)
    assert table.held_values == 0


#: A process whose holders may each hold 256 values: small answers (a 64th of it) hold 4, which
#: is two parts of a word.
SHARED = ServerConfig(max_chunked_values=10**6, max_chunked_total_values=CHUNK_SHARES * 256)


def test_a_channel_takes_at_most_its_share_of_the_process_budget_whatever_its_own_bound() -> None:
    table: PendingRequests[str] = PendingRequests(SHARED, budget=ChunkBudget())
    assert table.max_chunked_values == 256
    assert table.max_chunked_bytes == ServerConfig().max_chunked_total_bytes // CHUNK_SHARES
    rchan = table.open("w")
    assert isinstance(table.receive(response(rchan, list(range(253)), 2)), Partial)  # 255
    refused = table.receive(response(rchan, 1, 2))
    assert isinstance(refused, Failed) and "on this channel exceed 256 JSON values" in str(refused.error)


def test_the_connections_of_one_user_share_one_share() -> None:
    budget = ChunkBudget()
    tabs = [PendingRequests[str](SHARED, budget=budget, user="alice") for _ in range(2)]
    other: PendingRequests[str] = PendingRequests(SHARED, budget=budget, user="bob")
    held = tabs[0].open("held")
    assert isinstance(tabs[0].receive(response(held, list(range(98)), 2)), Partial)  # 100
    refused = tabs[1].receive(response(tabs[1].open("second tab"), list(range(156)), 2))  # 158
    assert isinstance(refused, Failed) and "for this user exceed 256 JSON values" in str(refused.error)
    assert isinstance(other.receive(response(other.open("bob"), list(range(156)), 2)), Partial)
    assert (budget.users["alice"].values, budget.users["bob"].values) == (100, 158)
    tabs[0].discard(held)
    assert list(budget.users) == ["bob"], "a user holding nothing is not listed"


def test_the_users_of_one_address_share_a_quarter_of_the_process_whatever_their_names() -> None:
    budget = ChunkBudget()
    quarter = SHARED.max_chunked_total_values // CHUNK_ADDRESS_SHARES
    names = [PendingRequests[str](SHARED, f"name{n}", "192.0.2.1", budget=budget) for n in range(CHUNK_SHARES)]
    outcomes = [table.receive(response(table.open(f"r{n}"), list(range(126)), 2))
                for n, table in enumerate(names)]
    held = sum(isinstance(outcome, Partial) for outcome in outcomes)
    assert held == quarter // (126 + 1 + PART_VALUES), outcomes
    assert all(isinstance(outcome, Failed) and "from this client address" in str(outcome.error)
               for outcome in outcomes[held:])
    other: PendingRequests[str] = PendingRequests(SHARED, "other", "192.0.2.2", budget=budget)
    assert isinstance(other.receive(response(other.open("r"), list(range(126)), 2)), Partial)
    for table in (*names, other):
        table.close()
    assert (budget.bytes, budget.values, budget.users) == (0, 0, {})


def test_a_dozen_holders_cannot_deny_small_answers_to_the_others() -> None:
    # 15 clients hold their whole share: the process's last share stays for small answers,
    # which a 16th client still gets; its big one, or a small one growing, is refused.
    budget = ChunkBudget()
    holders = [PendingRequests[str](SHARED, budget=budget, user=f"big{n}") for n in range(15)]
    for table in holders:
        assert isinstance(table.receive(response(table.open("w"), list(range(254)), 2)), Partial)
    assert budget.values == 15 * 256
    late: PendingRequests[str] = PendingRequests(SHARED, budget=budget, user="late")
    big = late.receive(response(late.open("big"), [1, 2, 3, 4], 2))  # 6 values: no small answer
    assert isinstance(big, Failed) and "only small ones are taken" in str(big.error)
    small = late.open("small")
    assert isinstance(late.receive(response(small, "a", 2)), Partial)  # 2 values
    assert isinstance(late.receive(response(small, "b", 2)), Completed)  # 4: a small answer
    growing = late.open("growing")
    assert isinstance(late.receive(response(growing, "x", 3)), Partial)
    assert isinstance(late.receive(response(growing, "y", 3)), Partial)
    grown = late.receive(response(growing, "z", 3))
    assert isinstance(grown, Failed), "past a 64th of its share, a holder is no small one"
    # The last share fills up with small answers only, from 64 more clients; then none fits.
    smalls = [PendingRequests[str](SHARED, budget=budget, user=f"small{n}") for n in range(64)]
    for table in smalls:
        rchan = table.open("w")
        for part in "ab":
            assert isinstance(table.receive(response(rchan, part, 3)), Partial)
    assert budget.values == CHUNK_SHARES * 256
    full = late.receive(response(late.open("full"), 0, 2))
    assert isinstance(full, Failed) and "in this process exceed 4096 JSON values" in str(full.error)
    for table in holders + smalls:
        table.close()
    assert (budget.bytes, budget.values, budget.users) == (0, 0, {})


def test_the_process_budget_fails_new_and_growing_answers_on_every_channel() -> None:
    # Each channel is within its own bounds (400 bytes, its share); together they are not.
    config = ServerConfig(max_chunked_total_bytes=CHUNK_SHARES * 400)
    budget = ChunkBudget()
    tables = [PendingRequests[str](config, budget=budget) for _ in range(CHUNK_SHARES)]
    growing = tables[0].open("growing")
    assert isinstance(tables[0].receive(response(growing, "x", 3)), Partial)  # 3 + 128 bytes
    for table in tables[1:15]:
        assert isinstance(table.receive(response(table.open("w"), "x" * (398 - PART_BYTES), 2)), Partial)
    assert budget.bytes == 131 + 14 * 400
    last = tables[15]
    new = last.receive(response(last.open("new"), "x" * (398 - PART_BYTES), 2))
    assert isinstance(new, Failed) and "only small ones are taken" in str(new.error)
    assert isinstance(last.receive(response(last.open("fits"), "x" * (267 - PART_BYTES), 2)), Partial)
    assert budget.bytes == CHUNK_SHARES * 400 - 400, "up to the last share"
    grown = tables[0].receive(response(growing, "x", 3))
    assert isinstance(grown, Failed) and grown.waiter == "growing"
    assert budget.bytes == CHUNK_SHARES * 400 - 400 - 131
    for table in tables:
        table.close()
    assert budget.bytes == budget.values == 0


def test_every_end_of_a_chunked_answer_gives_its_share_back_to_the_process() -> None:
    budget = ChunkBudget()
    table: PendingRequests[str] = PendingRequests(budget=budget)
    ends: dict[str, Callable[[str], object]] = {
        "completed": lambda rchan: table.receive(response(rchan, 2, 2)),
        "failed": lambda rchan: table.receive(response(rchan, 2, 3)),
        "plain answer": lambda rchan: table.receive(response(rchan, 2)),
        "discarded": table.discard,
        "closed": lambda rchan: table.close(),
    }
    for how, end in ends.items():
        rchan = table.open(how)
        assert isinstance(table.receive(response(rchan, [1, 2], 2)), Partial)
        assert (budget.bytes, budget.values) == cost([1, 2]), how
        end(rchan)
        assert (budget.bytes, budget.values) == (0, 0), how


def test_a_table_dropped_while_holding_parts_gives_its_share_back() -> None:
    # Never closed (a user's own table, a test's): without this, the process would go on
    # refusing chunked answers for parts that nobody holds.
    budget = ChunkBudget()
    table: PendingRequests[str] = PendingRequests(budget=budget, user="alice")
    table.receive(response(table.open("w"), [1, 2], 2))
    assert (budget.bytes, budget.values) == cost([1, 2])
    assert (budget.users["alice"].bytes, budget.users["alice"].values) == cost([1, 2])
    del table
    assert (budget.bytes, budget.values, budget.users) == (0, 0, {})


def test_tables_share_the_process_budget_by_default() -> None:
    first: PendingRequests[str] = PendingRequests()
    second: PendingRequests[str] = PendingRequests(ServerConfig())
    before = (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values)
    for table in (first, second):
        table.receive(response(table.open("w"), [1, 2], 2))
    part_bytes, part_values = cost([1, 2])
    assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values) == (before[0] + 2 * part_bytes,
                                                             before[1] + 2 * part_values)
    first.close()
    second.close()
    assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values) == before


def test_an_answer_for_an_unknown_rchan_is_ignored() -> None:
    table: PendingRequests[str] = PendingRequests()
    table.open("w")
    assert table.receive(response("nope", 1)) == Ignored("nope")
    assert table.receive(response("nope", 1, 2, 0)) == Ignored("nope")
    assert len(table) == 1


def test_discard_forgets_a_request_and_is_idempotent() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchan = table.open("w")
    table.discard(rchan)
    table.discard(rchan)
    table.discard("never-opened")
    assert rchan not in table
    assert table.receive(response(rchan, 1)) == Ignored(rchan), "a late answer is ignored"
    with pytest.raises(KeyError):
        table.waiter(rchan)


def test_close_returns_every_waiter_and_leaves_nothing() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchans = [table.open(f"w{i}") for i in range(5)]
    table.receive(response(rchans[0], "part", 2))
    assert sorted(table.close()) == [f"w{i}" for i in range(5)]
    assert len(table) == 0
    for rchan in rchans:
        assert table.receive(response(rchan, 1, 2)) == Ignored(rchan)


def test_the_pending_limit_refuses_one_more_and_frees_on_answer() -> None:
    table: PendingRequests[int] = PendingRequests(max_pending=2)
    first = table.open(1)
    table.open(2)
    with pytest.raises(TooManyPendingRequests):
        table.open(3)
    assert issubclass(TooManyPendingRequests, RequestError)
    assert len(table) == 2
    table.receive(response(first, None))
    table.open(3)


def test_rchans_are_fresh_uuid4s() -> None:
    table: PendingRequests[int] = PendingRequests(max_pending=10_000)
    rchans = [table.open(i) for i in range(2000)]
    assert len(set(rchans)) == len(rchans)
    assert all(is_uuid4(r) for r in rchans)


def test_a_request_opens_under_a_given_rchan_and_a_duplicate_is_refused() -> None:
    table: PendingRequests[str] = PendingRequests()
    rchan = str(uuid.uuid4())  # encoded elsewhere (a request relayed by the backplane)
    assert table.open("first", rchan=rchan) == rchan
    with pytest.raises(ValueError, match="already pending"):
        table.open("second", rchan=rchan)
    assert len(table) == 1 and table.waiter(rchan) == "first", "the first request is untouched"
    assert table.receive(response(rchan, 1)) == Completed(rchan, "first", 1)
    assert table.open("third", rchan=rchan) == rchan, "free again once answered"


def test_chunked_bytes_are_bounded_per_channel_not_only_per_answer() -> None:
    # Two answers of 60 bytes each are each under the limit; together they are not.
    table: PendingRequests[str] = PendingRequests(max_chunked_bytes=300)
    first, second = table.open("a"), table.open("b")
    assert isinstance(table.receive(response(first, "a" * 58, 2)), Partial)
    assert table.held_bytes == 60 + PART_BYTES
    outcome = table.receive(response(second, "b" * 58, 2))
    assert isinstance(outcome, Failed) and outcome.waiter == "b"
    assert table.held_bytes == 60 + PART_BYTES  # the failed answer holds nothing
    table.discard(first)
    assert table.held_bytes == 0


def test_new_rchans_are_distinct_uuid4_texts_with_every_variant_digit() -> None:
    from dara_ws_core.correlation import new_rchan

    rchans = [new_rchan() for _ in range(2000)]
    assert all(is_uuid4(rchan) for rchan in rchans)
    assert len(set(rchans)) == len(rchans)
    # The variant digit keeps two random bits: all four values occur (2000 draws: p(miss) ~ 0).
    assert {rchan[19] for rchan in rchans} == set("89ab")
    # And every other hex digit position is random: none is constant across the draws.
    assert all(len({rchan[i] for rchan in rchans}) > 1 for i in range(36) if i not in (8, 13, 14, 18, 23))


def test_rchans_come_from_draws_of_many_and_a_forked_child_never_reuses_the_parents() -> None:
    import os

    from dara_ws_core import correlation

    correlation.new_rchan()  # the pool now holds the rest of a draw
    assert correlation._rchans
    left = list(correlation._rchans)
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its pool and its next rchan, then leave at once
        try:
            os.write(write, f"{len(correlation._rchans)} {correlation.new_rchan()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        held, rchan = pipe.read().split()
    os.waitpid(pid, 0)
    assert held == "0"
    assert is_uuid4(rchan) and rchan not in left
    assert correlation._rchans == left  # the parent's pool is its own still


def test_a_completed_outcome_is_still_a_frozen_dataclass_however_it_is_built() -> None:
    import dataclasses

    outcome = Completed("r-1", "w", {"v": [1]})
    assert (outcome.rchan, outcome.waiter, outcome.value) == ("r-1", "w", {"v": [1]})
    assert outcome == Completed(rchan="r-1", waiter="w", value={"v": [1]})
    assert outcome != Completed("r-1", "w", None)
    assert dataclasses.replace(outcome, value=2).value == 2
    assert repr(outcome) == "Completed(rchan='r-1', waiter='w', value={'v': [1]})"
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.value = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Completed("r-1", "w")  # type: ignore[call-arg]
