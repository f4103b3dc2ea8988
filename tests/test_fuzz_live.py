"""Live fuzzing (issue 5, part 1): hypothesis-driven bad clients beside well-behaved ones.

One server per transport serves every example, so damage would accumulate. An example opens one
or two well-behaved clients and one to three *bad* raw connections, then runs a drawn program that
interleaves server pushes, broadcasts and requests to the good clients with frames from the bad
ones: valid, near-valid (wrong types, unknown kinds and types, answers to other connections'
``__rchan``, invalid chunk sequences for their own pending request) and invalid (not JSON, not
an object, binary, oversized, frames after the close).

A small model predicts, from protocol.md sections 4 and 6, what each bad frame must cause: a
reply (pong, echo, ``unknown_kind`` error), nothing (dropped or ignored), the outcome of the
connection's own pending request (its value, or ``ChunkError``), or a close with 1003, 1007 or
1009. After each example:

* every bad connection got exactly the predicted replies in order, or its predicted close code;
* every server request ended as predicted (answered, ``ChunkError``, or ``ConnectionClosed``);
* every good client got every message meant for it, in order, and its answers were its own;
* no handler, registry entry, pending request or connection task is left, no internal error was
  logged, and the server still serves a new client;
* the noisy-neighbour invariant (issue 10, bounds in ``tests/helpers.py``): a *healthy* client that
  runs through the whole example, getting a per-user push every 10 ms and sending ``echo``
  requests, saw every push within ``PUSH_BOUND`` (1 s) of its due time and none lost, no request
  got ``busy``, ``timeout`` or went unanswered for ``REQUEST_TIMEOUT`` (2 s), and every frame it
  received was strict JSON.

``DARA_FUZZ_EXAMPLES`` sets the number of examples per transport (default 100, about 10 to 20 s
per transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dara_ws_core import (
    ChunkError,
    CloseCode,
    ConnectionClosed,
    DaraClient,
    Request,
    ServerConfig,
    Transport,
)

from .helpers import Healthy, eventually, ticker
from .stacks import Stack, running_stack
from .strategies import (
    binary_frames,
    dumps,
    ids,
    invalid_field_objects,
    json_non_object_texts,
    json_values,
    non_json_texts,
    unknown_type_objects,
)

MAX_SIZE = 4096
MAX_CHUNKS = 16
TIMEOUT = 10.0
EXAMPLES = int(os.environ.get("DARA_FUZZ_EXAMPLES", "100"))
#: The healthy client's pushes: often, since an example lasts some 50 ms.
HEALTHY_TICK = 0.01
CONFIG = ServerConfig(max_message_size=MAX_SIZE, max_chunks=MAX_CHUNKS, handler_timeout=5.0)

# --------------------------------------------------------------------------- the program

#: A bad frame, as drawn: a tag and its parameters; the frame itself is built at run time because
#: some frames name a pending ``__rchan`` only known then.
Spec = tuple[Any, ...]

bad_specs: st.SearchStrategy[Spec] = st.one_of(
    st.tuples(st.just("ping"), st.none() | json_values),
    st.tuples(st.just("echo"), json_values, st.booleans(), st.booleans()),
    st.tuples(st.just("unknown_kind"), ids.filter(lambda k: k != "echo"), st.booleans()),
    st.tuples(st.just("stray"), ids, st.none() | st.integers(), json_values),
    st.tuples(st.just("steal"), st.integers(0, 7), json_values),
    st.tuples(st.just("invalid_fields"), invalid_field_objects(), st.booleans()),
    st.tuples(st.just("unknown_type"), unknown_type_objects),
    st.tuples(st.just("non_object"), json_non_object_texts),
    st.tuples(st.just("not_json"), non_json_texts),
    st.tuples(st.just("binary"), binary_frames),
    st.tuples(st.just("oversized"), st.integers(MAX_SIZE + 1, 4 * MAX_SIZE)),
    st.tuples(st.just("answer"), json_values),
    st.tuples(st.just("bad_count"),
              st.sampled_from([0, -1, -(2**31), -(2**63), -(10**30), MAX_CHUNKS + 1, 10**6,
                               2**63, 10**30])),
    st.tuples(st.just("bad_index"), st.sampled_from([-1, 3, 10**20, -(10**20)])),
    st.tuples(st.just("part"), st.none() | st.integers(0, 1), json_values),
    st.tuples(st.just("client_close")),
)

steps: st.SearchStrategy[Spec] = st.one_of(
    st.tuples(st.just("bad"), st.integers(0, 2), bad_specs),
    st.tuples(st.just("bad"), st.integers(0, 2), bad_specs),  # bad frames are the point: twice
    st.tuples(st.just("push"), st.integers(0, 1)),
    st.tuples(st.just("user_push"), st.integers(0, 1)),
    st.tuples(st.just("broadcast")),
    st.tuples(st.just("good_request"), st.integers(0, 1), json_values),
    st.tuples(st.just("server_request"), st.integers(0, 1), json_values),
)

programs = st.tuples(st.integers(1, 2), st.integers(1, 3), st.lists(steps, min_size=1,
                                                                     max_size=25))

# --------------------------------------------------------------------------- the model


@dataclass
class Probe:
    """The model of one pending server request (protocol.md section 4), and its real task."""

    rchan: str
    task: asyncio.Task[Any]
    #: "pending", "done" (``value`` set) or "failed" (ChunkError).
    state: str = "pending"
    value: Any = None
    count: int | None = None
    indexed: bool | None = None
    parts: dict[int, Any] = field(default_factory=dict)

    def fail(self) -> None:
        self.state = "failed"

    def feed(self, count: int | None, index: int | None, value: Any) -> None:
        """A response frame for this request, as ``PendingRequests`` must treat it."""
        if self.state != "pending":
            return  # settled: ignored
        if count is None:
            if self.count is not None:
                self.fail()  # plain answer after chunked parts
            else:
                self.state, self.value = "done", value
            return
        if self.count is None:
            if not 1 <= count <= MAX_CHUNKS:
                self.fail()
                return
            self.count = count
        if count != self.count:
            self.fail()
            return
        indexed = index is not None
        if self.indexed is None:
            self.indexed = indexed
        elif self.indexed != indexed:
            self.fail()
            return
        position = len(self.parts) if index is None else index
        if not 0 <= position < self.count or position in self.parts:
            self.fail()
            return
        self.parts[position] = value
        if len(self.parts) == self.count:
            self.state, self.value = "done", [self.parts[i] for i in range(self.count)]


@dataclass
class BadConn:
    """A raw connection that misbehaves, and what it must have seen."""

    transport: Transport
    probe: Probe
    expected: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None  # the server must close with this
    client_closed: bool = False
    #: An oversized frame followed the closing one. Libraries that enforce the size limit as
    #: bytes arrive (websockets) may close with 1009 before the server's close frame goes out.
    late_oversized: bool = False

    @property
    def open(self) -> bool:
        return self.close_code is None and not self.client_closed


@dataclass
class Good:
    client: DaraClient
    name: str
    expected: list[dict[str, Any]] = field(default_factory=list)


def normalise(frame: dict[str, Any]) -> dict[str, Any]:
    """An error reply's message text is prose: compare its code only."""
    message = frame.get("message")
    if isinstance(message, dict) and isinstance(message.get("__error"), dict):
        error = {k: v for k, v in message["__error"].items() if k != "message"}
        frame = {**frame, "message": {**message, "__error": error}}
    return frame


def echo_reply(data: Any, rchan: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"kind": "echo", "data": data}
    if rchan is not None:
        message["__response_for"] = rchan
    return {"type": "custom", "message": message}


def error_reply(kind: str, rchan: str | None, code: str) -> dict[str, Any]:
    message: dict[str, Any] = {"kind": kind, "data": None, "__error": {"code": code}}
    if rchan is not None:
        message["__response_for"] = rchan
    return {"type": "custom", "message": message}


PONG = {"type": "pong", "message": None}

# --------------------------------------------------------------------------- sending


async def send_binary(transport: Transport, data: bytes) -> bool:
    """Send a binary frame from a client transport; ``False`` if it has no way to."""
    native = getattr(transport, "send_binary", None)  # memory, aiohttp
    if native is not None:
        await native(data)
        return True
    ws = getattr(transport, "_ws", None)  # websockets: bytes go out as a binary frame
    if ws is not None and hasattr(ws, "send"):
        import websockets

        try:
            await ws.send(data)
        except websockets.ConnectionClosed:
            raise ConnectionClosed() from None
        return True
    return False


def frame_for(bad: BadConn, spec: Spec, rchans: list[str], serial: str) -> tuple[str, Any]:
    """The frame to send for ``spec`` (``("text", str)`` or ``("binary", bytes)``), and the model
    updated with what it must cause."""
    tag = spec[0]
    own = bad.probe
    expect = bad.expected.append
    if tag == "ping":
        frame: dict[str, Any] = {"type": "ping"}
        if spec[1] is not None:
            frame["message"] = spec[1]
        expect(PONG)
        return "text", dumps(frame)
    if tag == "echo":
        _, data, with_rchan, extra = spec
        rchan = f"r-{serial}" if with_rchan else None
        message: dict[str, Any] = {"kind": "echo", "data": data}
        if rchan is not None:
            message["__rchan"] = rchan
        if extra:
            message["unexpected"] = {"extra": True}  # extra keys are tolerated
        if rchan is not None or data is not None:
            expect(echo_reply(data, rchan))
        return "text", dumps({"type": "custom", "message": message})
    if tag == "unknown_kind":
        _, kind, with_rchan = spec
        rchan = f"r-{serial}" if with_rchan else None
        message = {"kind": kind, "data": None}
        if rchan is not None:
            message["__rchan"] = rchan
        expect(error_reply(kind, rchan, "unknown_kind"))
        return "text", dumps({"type": "custom", "message": message})
    if tag == "stray":
        _, channel, count, value = spec
        return "text", dumps({"type": "message", "channel": f"stray-{channel}",
                              "chunk_count": count, "message": value})
    if tag == "steal":
        # An answer to another connection's pending request: ignored here, never resolves it.
        _, target, value = spec
        others = [r for r in rchans if r != own.rchan]
        channel = others[target % len(others)] if others else f"gone-{serial}"
        return "text", dumps({"type": "message", "channel": channel, "message": value})
    if tag == "invalid_fields":
        _, obj, aim_at_own = spec
        if aim_at_own and obj.get("type") == "message" and isinstance(obj.get("channel"), str):
            obj = {**obj, "channel": own.rchan}  # wrongly typed parts never touch the request
        return "text", dumps(obj)
    if tag == "unknown_type":
        return "text", dumps(spec[1])
    if tag in ("non_object", "not_json"):
        text = spec[1]
        bad.close_code = CloseCode.MESSAGE_TOO_BIG if len(text) > MAX_SIZE \
            else CloseCode.INVALID_PAYLOAD
        return "text", text
    if tag == "binary":
        data = spec[1]
        bad.close_code = CloseCode.MESSAGE_TOO_BIG if len(data) > MAX_SIZE \
            else CloseCode.UNSUPPORTED_DATA
        return "binary", data
    if tag == "oversized":
        bad.close_code = CloseCode.MESSAGE_TOO_BIG
        # A valid ping but for its size: answered with pong if the limit were not enforced.
        return "text", dumps({"type": "ping", "message": "x" * spec[1]})
    if tag == "answer":
        own.feed(None, None, spec[1])
        return "text", dumps({"type": "message", "channel": own.rchan, "chunk_count": None,
                              "message": spec[1]})
    if tag == "bad_count":
        own.feed(spec[1], None, None)
        return "text", dumps({"type": "message", "channel": own.rchan, "chunk_count": spec[1],
                              "message": None})
    if tag == "bad_index":
        own.feed(3, spec[1], None)
        return "text", dumps({"type": "message", "channel": own.rchan, "chunk_count": 3,
                              "chunk_index": spec[1], "message": None})
    if tag == "part":
        _, index, value = spec
        own.feed(2, index, value)
        part: dict[str, Any] = {"type": "message", "channel": own.rchan, "chunk_count": 2,
                                "message": value}
        if index is not None:
            part["chunk_index"] = index
        return "text", dumps(part)
    raise AssertionError(f"unknown spec {tag}")


# --------------------------------------------------------------------------- the test


class ErrorLog(logging.Handler):
    """Collects the server's ERROR records: an internal failure is a bug the fuzzer found."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def fuzz_stack(transport_name: str) -> AsyncIterator[Stack]:
    """One server for every example of a transport: damage would accumulate."""
    async with running_stack(transport_name, CONFIG) as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        yield stack


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("dara_ws_core")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


_examples = itertools.count()


async def receive_json(transport: Transport) -> dict[str, Any]:
    frame = await asyncio.wait_for(transport.receive(), TIMEOUT)
    value = json.loads(frame)
    assert isinstance(value, dict), value
    return value


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
@given(program=programs)
async def test_bad_clients_never_harm_the_server_or_good_clients(
    fuzz_stack: Stack, error_log: ErrorLog, program: tuple[int, int, list[Spec]]
) -> None:
    stack, manager = fuzz_stack, fuzz_stack.manager
    n_good, n_bad, program_steps = program
    example = next(_examples)
    error_log.records.clear()
    release = asyncio.Event()
    goods: list[Good] = []
    bads: list[BadConn] = []
    held: asyncio.Task[Any] | None = None
    # The noisy neighbour's victim: measured from the first step to the end of the example.
    healthy = Healthy(functools.partial(stack.connect, f"healthy:hs{example}"), ("tick",),
                      interval=HEALTHY_TICK)
    ticking: asyncio.Task[None] | None = None
    healthy_figures: dict[str, Any] | None = None
    try:
        await healthy.start(wait_ready=False)

        async def tick(payload: dict[str, Any]) -> None:
            await manager.send_message_to_user("healthy", payload, custom=True)

        ticking = asyncio.create_task(ticker(tick, "tick", HEALTHY_TICK))
        # Well-behaved clients; good 0 holds a request open until the end, as a steal target.
        for g in range(n_good):
            name = f"good{g}"
            client = DaraClient(functools.partial(stack.connect, f"{name}:gs{example}"),
                                ping_interval=None)

            async def respond(request: Request, name: str = name) -> Any:
                if request.payload.get("hold"):
                    await release.wait()
                return {"answer": request.payload.get("n"), "from": name}

            client.on_request(respond)
            await client.connect()
            goods.append(Good(client, name))
        held = asyncio.create_task(
            manager.send_and_wait(goods[0].client.channel or "", {"hold": True, "n": example},
                                  timeout=60)
        )
        held_handler = manager.handlers[goods[0].client.channel or ""]
        await eventually(lambda: held_handler.pending_count == 1, "held request pending")
        rchans = list(held_handler.pending_responses)

        # Bad connections, each with a server request pending that it may answer badly.
        for b in range(n_bad):
            transport = await stack.connect(f"bad{b}:bs{example}")
            init = await receive_json(transport)
            channel = init["message"]["channel"]
            task = asyncio.create_task(manager.send_and_wait(channel, {"probe": b}, timeout=60))
            request = await receive_json(transport)
            assert request["message"]["probe"] == b
            bads.append(BadConn(transport, Probe(request["message"]["__rchan"], task)))
            rchans.append(request["message"]["__rchan"])

        pushes = itertools.count()
        broadcasts: list[dict[str, Any]] = []
        for serial, step in enumerate(program_steps):
            kind = step[0]
            if kind == "bad":
                bad = bads[step[1] % n_bad]
                await run_bad_step(bad, step[2], rchans, f"{example}-{serial}")
            elif kind in ("push", "user_push"):
                good = goods[step[1] % n_good]
                payload = {"p" if kind == "push" else "u": next(pushes)}
                if kind == "push":
                    await manager.send_message(good.client.channel or "", payload)
                else:
                    await manager.send_message_to_user(good.name, payload)
                good.expected.append(payload)
            elif kind == "broadcast":
                payload = {"b": next(pushes)}
                await manager.broadcast(payload)
                broadcasts.append({"type": "message", "message": payload})
                for good in goods:
                    good.expected.append(payload)
            elif kind == "good_request":
                good = goods[step[1] % n_good]
                assert await good.client.request("echo", step[2], timeout=TIMEOUT) == step[2]
            elif kind == "server_request":
                good = goods[step[1] % n_good]
                n = next(pushes)
                answer = await manager.send_and_wait(good.client.channel or "", {"n": n},
                                                     timeout=TIMEOUT)
                assert answer == {"answer": n, "from": good.name}

        for b, bad in enumerate(bads):
            await check_bad(bad, broadcasts, f"{example}-{b}")
        release.set()
        assert await asyncio.wait_for(held, TIMEOUT) == {"answer": example, "from": "good0"}
        for good in goods:
            end = {"end": example}
            await manager.send_message(good.client.channel or "", end)
            received = [
                (await good.client.receive(timeout=TIMEOUT)).message.model_dump()
                for _ in range(len(good.expected) + 1)
            ]
            assert received == [*good.expected, end], good.name
    finally:
        release.set()
        if ticking is not None:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)
            healthy_figures = await healthy.stop()
        for bad in bads:
            with contextlib.suppress(Exception):
                await bad.transport.close()
        for good in goods:
            await good.client.close()
        # Every server request ends once its connection is gone.
        requests = [b.probe.task for b in bads] + ([held] if held is not None else [])
        await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), TIMEOUT)

    for bad in bads:
        await check_probe(bad)
    await eventually(lambda: not manager.handlers, "every handler removed")
    await eventually(lambda: stack.endpoint.connection_count == 0, "every connection task done")
    assert manager.registry.counts() == (0, 0, 0)
    assert [r.getMessage() for r in error_log.records] == []
    # The server is up: a new client is served.
    check = DaraClient(lambda: stack.connect(f"check:c{example}"), ping_interval=None)
    await check.connect()
    assert await check.request("echo", {"alive": example}, timeout=TIMEOUT) == {"alive": example}
    await check.close()
    await eventually(lambda: not manager.handlers, "the check client removed")
    assert healthy_figures is not None
    assert not healthy.violations(healthy_figures), healthy_figures


async def run_bad_step(bad: BadConn, spec: Spec, rchans: list[str], serial: str) -> None:
    if spec[0] == "client_close":
        # Even after a frame that makes the server close: the server may not have read it yet.
        bad.client_closed = True
        with contextlib.suppress(Exception):
            await bad.transport.close()
        return
    was_open = bad.open
    model = bad
    if not was_open:
        # Frames after the close: the model does not change, the send may fail or vanish.
        probe = Probe(bad.probe.rchan, bad.probe.task, state="done")
        model = BadConn(bad.transport, probe)
    kind, frame = frame_for(model, spec, rchans, serial)
    if not was_open and model.close_code == CloseCode.MESSAGE_TOO_BIG:
        bad.late_oversized = True
    event(f"bad frame: {spec[0]}{'' if was_open else ' after the close'}")
    if kind == "binary" and not await _try_binary(bad.transport, frame):
        return
    if kind == "text":
        with contextlib.suppress(ConnectionClosed):
            await bad.transport.send(frame.encode())


async def _try_binary(transport: Transport, data: bytes) -> bool:
    try:
        return await send_binary(transport, data)
    except ConnectionClosed:
        return True


async def check_bad(bad: BadConn, broadcasts: list[dict[str, Any]], serial: str) -> None:
    """Read what the server sent ``bad`` and compare it with the model.

    Replies and broadcasts are compared apart: the server reads a bad frame concurrently with
    the test's next broadcast, so only the order within each kind is defined.
    """
    if bad.client_closed:
        return
    replies: list[dict[str, Any]] = []
    pushed: list[dict[str, Any]] = []

    def record(frame: dict[str, Any]) -> None:
        is_broadcast = frame.get("type") == "message" and "b" in (frame.get("message") or {})
        (pushed if is_broadcast else replies).append(normalise(frame))

    if bad.close_code is None:
        sentinel = f"sentinel-{serial}"
        await bad.transport.send(dumps({"type": "custom", "message": {
            "kind": "echo", "data": "end", "__rchan": sentinel}}).encode())
        while True:
            try:
                frame = await receive_json(bad.transport)
            except ConnectionClosed as exc:
                raise AssertionError(f"closed unexpectedly ({exc}); got {replies}") from None
            if (frame.get("message") or {}).get("__response_for") == sentinel:
                break
            record(frame)
        assert replies == bad.expected
        assert pushed == broadcasts
        return
    try:
        while True:
            record(await receive_json(bad.transport))
    except ConnectionClosed as exc:
        late = bad.late_oversized and exc.code == CloseCode.MESSAGE_TOO_BIG
        assert exc.code == bad.close_code or late, (exc, bad.close_code)
    event(f"closed with {bad.close_code}")
    # Frames queued before the close may be cut off by it: prefixes, in order.
    assert replies == bad.expected[: len(replies)]
    assert pushed == broadcasts[: len(pushed)]


async def check_probe(bad: BadConn) -> None:
    probe = bad.probe
    event(f"server request: {probe.state}")
    try:
        result = await asyncio.wait_for(probe.task, TIMEOUT)
    except ChunkError:
        assert probe.state == "failed"
        return
    except ConnectionClosed as exc:
        # A library that enforces the size limit on arrival (uvicorn) may close with 1009 before
        # the server has read the frames sent ahead of the oversized one: then the request ends
        # with the close whatever those frames would have done to it (the answer among them, or
        # a frame that would have closed the connection with another code first).
        cut_short = exc.code == CloseCode.MESSAGE_TOO_BIG and (
            bad.close_code == CloseCode.MESSAGE_TOO_BIG or bad.late_oversized)
        assert probe.state == "pending" or cut_short, (probe.state, exc)
        if bad.close_code is not None and not bad.client_closed:
            late = bad.late_oversized and exc.code == CloseCode.MESSAGE_TOO_BIG
            assert exc.code == bad.close_code or late, (exc, bad.close_code)
        return
    assert probe.state == "done", (probe.state, result)
    assert result == probe.value
