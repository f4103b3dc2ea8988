"""The asyncio driver of one accepted connection: transport in, transport out, nothing decided.

:class:`ConnectionDriver` owns the transport, the send task, the close and the abort timer of one
connection, and runs its receive loop. It creates the channel's
:class:`~dara_ws_core.handler.WebSocketHandler` with itself as the handler's
:class:`~dara_ws_core.handler.Sink`; ownership goes one way: driver -> handler -> the pure
:class:`~dara_ws_core.connection.ServerConnection`, which makes every protocol decision. The
driver reads frames and hands them down, writes the frames that come up, and closes when told to
(or when the transport ends).
"""

from __future__ import annotations

__all__ = ["ConnectionDriver", "close_quietly"]

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import handler as _handler
from .auth import Identity
from .exceptions import CloseCode, ConnectionClosed
from .handler import NEVER_THROUGH, WebSocketHandler, current_channel, current_identity
from .logs import current_source
from .queue import OutboundQueue
from .stats import Counters, transport_label
from .transport import (
    SupportsCork,
    SupportsDisconnected,
    SupportsPush,
    SupportsSendNowait,
    SupportsWriter,
    Transport,
    TurnShares,
    supports,
)

if TYPE_CHECKING:
    from .manager import WebsocketManager

logger = logging.getLogger("dara_ws_core")

#: Frames one connection handles before it lets the others run, whatever its buffer holds.
_YIELD_EVERY = 16
#: Messages the connections of one client address handle in one turn of the event loop,
#: together (four connections' worth of ``_YIELD_EVERY``): past it, its connections wait for their
#: place, four a turn, each then handling up to ``_YIELD_EVERY``. Per connection alone, a client
#: with 64 connections had 64 times ``_YIELD_EVERY`` handled in each turn (each a broadcast to
#: every connection, with the demo's ``chat``), and every other client's pushes waited seconds
#: for each turn. Every address together handle at most four such shares a turn: once more than
#: four are busy, each address's share (and what each of its connections may handle from the
#: place it waited for) is that divided among them, so that many addresses together hold a turn
#: no longer than four do.
HANDLED_PER_TURN = TurnShares(4 * _YIELD_EVERY, wake=4, grant=_YIELD_EVERY, total=16 * _YIELD_EVERY)

#: Seconds a connection the server closes waits, at most, for the bus to have the
#: acknowledgement of what it wrote before its close frame goes (a quarter of ``close_timeout``
#: if shorter). Only that connection waits.
FINAL_ACK_WAIT = 1.0

#: A connection whose messages make fan-outs queue frames past their recipients' bounds (a
#: client rebroadcast faster than others read, see ``OutboundQueue.take_burst``) is held back
#: once those frames reach this fraction of the queue bounds (1/4: 1,024 frames or 4 MiB by
#: default) within ``send_timeout``: its reading pauses until the queues caught up, so the
#: burst costs it time rather than costing its readers their connections.
ORIGIN_SHARE = 4

#: Longest pause of such a connection's reading, in seconds (also at most ``send_timeout`` and
#: half of ``ping_timeout``: a client whose frames are not read cannot answer pings either).
MAX_ORIGIN_PAUSE = 10.0
#: How many of the queues a connection's fan-outs took past their bounds its pause waits for (the
#: first ones of the window): enough for any burst's readers to set the pace, bounded whatever the
#: number of connections.
MAX_OWED_QUEUES = 256


class _Owed:
    """The fan-out frames one connection caused to be queued past bounds, in the current window,
    and the queues they went to (at most ``MAX_OWED_QUEUES``: the ones a pause waits for)."""

    __slots__ = ("bytes", "frames", "last", "over", "queues", "since", "timer")

    def __init__(self, now: float) -> None:
        self.since = now
        self.frames = self.bytes = 0
        self.last: bytes | None = None  # the frame last counted: a fan-out counts once
        self.over = False
        self.queues: dict[OutboundQueue, None] = {}  # an ordered set
        #: Ends the window for a connection that goes quiet (see ConnectionDriver.owe).
        self.timer: asyncio.TimerHandle | None = None


class ConnectionDriver:
    """Runs one connection: create it with the transport and identity, then ``await run()``."""

    __slots__ = ("_abort_timer", "_address", "_clock", "_close_task", "_closed", "_context", "_cork", "_corked",
                 "_direct", "_flusher", "_held", "_loop", "_owed", "_sender", "_write", "handler", "manager",
                 "transport")

    def __init__(
        self, manager: WebsocketManager, transport: Transport, identity: Identity, channel_id: str
    ) -> None:
        self.manager = manager
        self.transport = transport
        self._loop = loop = asyncio.get_running_loop()
        # The loop's clock for every message read: on asyncio's own loops time() is
        # time.monotonic() behind a Python call of its own, so it is called directly (as the
        # handler's request deadlines do). Any other loop (uvloop) keeps its method.
        self._clock: Callable[[], float] = (
            time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time)
        # The transport's optional synchronous write (a frame written now, no task, no queue),
        # looked up once: a runtime protocol check costs microseconds, too much per frame.
        # With a cork, frames are appended to the transport's pending output and flushed once per
        # loop iteration for every corked connection: a burst costs one write per connection.
        # While the loop's fan-outs bring each connection one frame per iteration (nothing to
        # coalesce), a transport that also writes synchronously is written through instead
        # (see _Flusher); the handler's ``_wrote`` is the flusher's epoch of this connection's
        # last such write (NEVER_THROUGH: it cannot write through).
        self._write: Callable[[bytes], bool] | None
        # The transport's unchecked write, for the fan-outs written through (fan_out_through).
        self._direct: SupportsWriter | None = None
        through = False
        if supports(transport, SupportsCork):
            self._cork: _Cork | None = cast(_Cork, transport)
            self._flusher: _Flusher | None = _flusher(loop)
            self._write = self._write_corked
            if supports(transport, SupportsSendNowait):
                through = True
                if supports(transport, SupportsWriter):
                    self._direct = cast(SupportsWriter, transport)
        else:
            self._cork = self._flusher = None
            self._write = (cast(SupportsSendNowait, transport).send_nowait
                           if supports(transport, SupportsSendNowait) else None)
        self._corked = 0  # frames corked since the last flush
        self._sender: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._closed: ConnectionClosed | None = None
        # With a transport that pushes inbound messages (SupportsPush): the receive loop's
        # context, in which they are handled, and what a pushed message left for the loop.
        self._context: contextvars.Context | None = None
        self._held: Awaitable[None] | Exception | None = None
        self._owed: _Owed | None = None  # see owe()
        #: The client's address key (of the handshake's context), whose share of each turn's
        #: messages it handles within (HANDLED_PER_TURN); None: its own _YIELD_EVERY only.
        self._address: str | None = current_source.get()
        self.handler: WebSocketHandler = manager.create_handler(
            channel_id, identity, sink=self, now=loop.time(), transport=transport_label(transport),
            start=False,
        )
        if through:
            self.handler._wrote = 0
            if self._direct is not None:  # it takes the writer back the moment it drops it
                self._direct.writer_lost = self._writer_lost
        # What follows init may close the connection already (close() needs the handler).
        manager.start_handler(self.handler)

    # ------------------------------------------------------------------ Sink (from the handler)

    def write_now(self, frame: bytes) -> bool:
        # Never overtake frames a send task holds, nor write after the close was decided.
        if self._sender is not None or self._closed is not None:
            return False
        cork = self._cork
        if cork is None:
            write = self._write
            return write is not None and write(frame)
        # Inlined rather than split in calls: this runs once per recipient of every broadcast.
        flusher: _Flusher = self._flusher  # type: ignore[assignment]  # set with the cork
        if flusher.through and not self._corked:
            epoch = flusher.epoch
            handler = self.handler
            wrote = handler._wrote
            if flusher.swept is not None and wrote != -epoch:  # (-epoch: the sweep did not write it)
                flusher.settle()
                wrote = handler._wrote
            if wrote < epoch:  # nothing corked nor written this iteration: write through
                if not cork.send_nowait(frame):
                    return False
                handler._wrote = epoch
                flusher.written += 1
                if not flusher._scheduled:  # the pass still runs: it ends the iteration (epoch)
                    flusher._scheduled = True
                    self._loop.call_soon(flusher._flush)
                if handler._through is None:
                    self._offer_through(handler)
                return True
            if wrote == epoch:  # a second frame this iteration: a burst, corked from here
                flusher.doubled += 1
        return self._write_corked(frame)

    def _offer_through(self, handler: WebSocketHandler) -> None:
        """Hand the fan-outs written through (fan_out_through) this connection's write, if every
        condition of it holds now; whatever ends one of them takes it back (``_through = None``).
        Called after a frame written through here: no sender, nothing corked, not closed."""
        if handler.ack_at or handler._flush_goal is not None or handler._behind \
                or not handler.queue.idle:
            return
        direct = self._direct
        handler._through = self._cork.send_nowait if direct is None else direct.writer  # type: ignore[union-attr]

    def _writer_lost(self) -> None:
        self.handler._through = None

    def write_at_once(self, frame: bytes) -> bool:
        cork = self._cork
        if cork is None or self.handler._wrote == NEVER_THROUGH:  # no synchronous write beside a cork
            if not self.write_now(frame):
                return False
            self.flush()  # a no-op unless it was corked
            return True
        if self._sender is not None or self._closed is not None:
            return False
        if self._corked:  # what is corked goes first, in order
            self.flush()
        return cork.send_nowait(frame)

    def frames_queued(self) -> None:
        if self._sender is None and self._closed is None:
            self._sender = self._loop.create_task(self._send_queued())

    def close(self, code: int, reason: str) -> None:
        """The connection decided to close: what is queued goes out first, then the close frame;
        whatever is still open ``close_timeout`` later is aborted."""
        if self._closed is not None:
            return
        self._closed = ConnectionClosed(code, reason)
        self.handler._through = None
        self._arm_abort()
        # Frames queued before the close (replies within a rate limit, answers finished within
        # the shutdown grace) go out before the close frame: take them before the queue closes.
        queue, backlog = self.handler.queue, []
        while (frame := queue.get_nowait()) is not None:
            backlog.append(frame)
        self._close_task = self._loop.create_task(self._flush_and_close(backlog, code, reason))
        # The channel is dead for messaging now, even if the closing handshake with a peer that
        # does not read takes the transport's close timeout: unregister it at once. What of the
        # user's history the backlog holds is settled once written (_finish), not now: settled
        # now, it would count as unwritten and go to the user's next connection a second time.
        self.manager.remove_handler(self.handler.channel_id, self._closed, writing=True)

    # ------------------------------------------------------------------ coalesced writes

    def _write_corked(self, frame: bytes) -> bool:
        cork, flusher = self._cork, self._flusher
        if cork is None or flusher is None or not cork.send_corked(frame):
            return False
        flusher.frames += 1
        if not self._corked:
            self.handler._through = None
            flusher.add(self)
        self._corked += 1
        return True

    @property
    def corked(self) -> int:
        """Frames corked for the loop's flush, not written yet."""
        return self._corked

    def flush(self) -> None:
        """Write what this connection corked: called by the loop's flusher once per iteration,
        and before an awaited send or close so that nothing overtakes a corked frame."""
        cork = self._cork
        corked = self._corked
        if corked and cork is not None:
            self._corked = 0
            try:
                written = cork.flush()
            except Exception:  # a flush must never raise into the loop
                logger.debug("flush failed", exc_info=True)
                written = False
            if written is False:
                # The library closed the connection first and dropped them: they were counted
                # as written when corked. Not written, a kept per-user message among them goes
                # to the user's next connection (the connection is over: nothing follows them).
                self.handler.frames_dropped(corked)

    # ------------------------------------------------------------------ the connection

    async def run(self) -> None:
        """Serve the connection until it ends; returns when every trace of it is gone."""
        handler = self.handler
        current_channel.set(handler.channel_id)
        if handler.identity is not None:
            current_identity.set(handler.identity)
        if handler.queue:
            self.frames_queued()  # init
        hooks = self.manager.hooks
        if hooks is not None:  # on_connect, in this context, before the first frame
            hooks.connected(handler)
        # The receive loop is inlined here and nothing is built ahead (the exception that ends
        # the connection, bound methods): an idle connection holds one coroutine frame of ours.
        ended: ConnectionClosed | None = None
        handled = 0
        transport = self.transport
        if supports(transport, SupportsPush):
            self._context = contextvars.copy_context()  # current_channel and current_identity
        address = self._address
        shares, loop = HANDLED_PER_TURN, self._loop
        granted = 0  # messages it may still handle from the place it waited for
        try:
            while self._closed is None:
                if address is not None:
                    if granted:
                        granted -= 1
                    elif not shares.left_on(loop, address):
                        # Its address's connections handled their share of this turn: it waits
                        # for its place, behind the others of its address already waiting.
                        granted = await shares.wait(address)
                        continue
                owed = self._owed
                if owed is not None:
                    if owed.over:
                        await self._repay()
                        continue
                    if self._loop.time() - owed.since > (self.manager.config.send_timeout or MAX_ORIGIN_PAUSE):
                        self._drop_owed()  # what it owed is old: read at full speed again
                try:
                    if self._context is None:
                        frame: str | bytes | None = await transport.receive()
                    else:
                        frame = await cast(SupportsPush, transport).receive_pushed(self._pushed, _YIELD_EVERY)
                except ConnectionClosed as exc:
                    # Without its traceback: through this frame it would hold itself, and with
                    # it the whole connection, until the cyclic collector runs.
                    ended = exc.with_traceback(None)
                    break
                if frame is not None:
                    if address is not None:  # (a pushed message is counted by _pushed)
                        shares.spend_on(loop, address, 1)
                    if self._context is None:
                        pending = handler.receive_frame(frame, self._clock())
                    else:  # the context pushed messages are handled in (what a handler set)
                        pending = self._context.run(handler.receive_frame, frame, self._clock())
                    # Not kept until the next message: an idle connection would hold a copy of
                    # the last one it received (up to max_message_size) for as long as it idles.
                    frame = None
                else:  # handled in the transport's callback (_pushed): what it left for the loop
                    held, self._held = self._held, None
                    if isinstance(held, Exception):
                        raise held
                    pending = held
                if pending is not None:
                    try:
                        await pending
                    except ConnectionClosed as exc:
                        ended = exc.with_traceback(None)  # as above
                        break
                handled += 1
                if self._owed is not None:
                    # Its fan-outs are past readers' bounds: one message per iteration, so that
                    # what it sent is charged (owe) before the next is read, not 16 at once.
                    await asyncio.sleep(0)
                elif handled % _YIELD_EVERY == 0:
                    # A receive with frames already buffered returns without suspending: a
                    # client that keeps its buffer full would otherwise hold the loop for all.
                    await asyncio.sleep(0)
            else:
                ended = self._closed  # a close was decided: the handler already knows
        except asyncio.CancelledError:
            ended = ConnectionClosed(CloseCode.GOING_AWAY, "server shutting down")
            handler.close(ended.code, ended.reason)
            raise
        except Exception:
            handler.log.exception("connection failed")
            ended = ConnectionClosed(CloseCode.INTERNAL_ERROR, "internal error")
            handler.close(ended.code, ended.reason)
        finally:
            try:
                await self._finish(ended or ConnectionClosed(CloseCode.ABNORMAL, "connection lost"))
            finally:
                # Over: cut the cycles through this driver (the handler's sink, its own bound
                # write), so that the connection is freed now, not by the cyclic collector.
                self.handler._sink = None
                self._write = None
                self._drop_owed()
                if self._direct is not None:
                    self._direct.writer_lost = None

    def _pushed(self, frame: str | bytes) -> bool:
        """Handle one message in the transport's callback, as the receive loop would; ``False``
        when the loop must run: an awaitable to wait for, an error, a close (see
        :class:`~dara_ws_core.transport.SupportsPush`)."""
        try:
            pending = self._context.run(  # type: ignore[union-attr]  # set while pushing
                self.handler.receive_frame, frame, self._clock())
        except Exception as exc:  # the loop raises it, as if it had handled the message itself
            self._held = exc
            return False
        address = self._address
        # (Counted on the driver's loop, the running one: no look-up of it, see left_on.)
        if address is not None and HANDLED_PER_TURN.spend_on(self._loop, address, 1) <= 0:
            if pending is not None:
                self._held = pending
            return False  # its address's share of this turn is used: the loop waits for its place
        if pending is not None:
            self._held = pending
            return False
        # The loop runs while this connection's fan-outs are past readers' bounds (owe): one
        # message per iteration, held back once over its share.
        return self._closed is None and self._owed is None

    def owe(self, frame: bytes, queue: OutboundQueue) -> None:
        """A fan-out caused by this connection's message queued ``frame`` past the bounds of
        ``queue`` (``handler.charge_origin``): counted once per fan-out. Past its share
        (``ORIGIN_SHARE``) within ``send_timeout``, or past a sixteenth of the bounds once the
        queue is twice past them (several senders' bursts together), its reading pauses
        (``_repay``)."""
        owed = self._owed
        now = self._loop.time()
        config = self.manager.config
        window = config.send_timeout or MAX_ORIGIN_PAUSE
        if owed is None:
            self._owed = owed = _Owed(now)
            # The receive loop forgets an old window when the next message comes; a connection
            # that goes quiet would hold it (its last fan-out's frame, up to MAX_OWED_QUEUES
            # other connections' queues) for as long as it is quiet.
            owed.timer = self._loop.call_at(now + window, self._forget_owed, owed)
        elif now - owed.since > window:
            owed.since, owed.frames, owed.bytes = now, 0, 0  # an old burst: a new window
            owed.queues.clear()
            if owed.timer is None:
                owed.timer = self._loop.call_at(now + window, self._forget_owed, owed)
        if owed.last is not frame:
            owed.last = frame
            owed.frames += 1
            owed.bytes += len(frame)
        if len(owed.queues) < MAX_OWED_QUEUES:
            owed.queues[queue] = None
        frames, size = owed.frames * ORIGIN_SHARE, owed.bytes * ORIGIN_SHARE
        if frames >= config.max_queue_messages or size >= config.max_queue_bytes:
            owed.over = True  # its own share
        elif (len(queue) >= 2 * queue.max_messages or queue.nbytes >= 2 * queue.max_bytes) \
                and (frames * ORIGIN_SHARE >= config.max_queue_messages
                     or size * ORIGIN_SHARE >= config.max_queue_bytes):
            # Several senders' bursts together took this queue twice past its bounds: the ones
            # that sent a sixteenth of them are held back too. One that sent a message or two
            # into it is not: it did not make the burst.
            owed.over = True

    def _drop_owed(self) -> None:
        owed, self._owed = self._owed, None
        if owed is not None and owed.timer is not None:
            owed.timer.cancel()

    def _forget_owed(self, owed: _Owed) -> None:
        """The window of ``owed`` is over (its timer): forgotten, its pause too if it is still
        due (a fan-out from a task of the connection's, while it was quiet), as the receive loop
        forgets an old window. A window renewed since (``owe``) gets a timer again."""
        if self._owed is not owed:
            return
        owed.timer = None
        end = owed.since + (self.manager.config.send_timeout or MAX_ORIGIN_PAUSE)
        if self._loop.time() < end:
            owed.timer = self._loop.call_at(end, self._forget_owed, owed)
        else:
            self._owed = None

    async def _repay(self) -> None:
        """Hold this connection's reading until the queues its fan-outs took past their bounds
        caught up (or closed), at most ``MAX_ORIGIN_PAUSE`` (and ``send_timeout``, half
        ``ping_timeout``). Only those queues: a burst other senders caused is not its debt. A
        queue still behind after that is its reader's: the next fan-out closes it as slow."""
        owed, self._owed = self._owed, None
        if owed is None:
            return
        if owed.timer is not None:
            owed.timer.cancel()
        config = self.manager.config
        pause = min(t for t in (MAX_ORIGIN_PAUSE, config.send_timeout,
                                config.ping_timeout and config.ping_timeout / 2) if t)
        own = self.handler.queue
        waiting: list[tuple[OutboundQueue, asyncio.Future[None]]] = []
        for queue in owed.queues:
            waiter = queue.calm() if queue is not own else None
            if waiter is not None:
                waiting.append((queue, waiter))
        if not waiting:
            return
        self.handler.counters.senders_paused += 1
        self.handler.log.debug("its messages' fan-outs are past %d queues' bounds: reading paused",
                               len(waiting))
        try:
            await asyncio.wait([waiter for _, waiter in waiting], timeout=pause)
        finally:
            for queue, waiter in waiting:
                waiter.cancel()
                queue.forget_calm(waiter)

    async def _finish(self, ended: ConnectionClosed) -> None:
        self._arm_abort()
        closed = self._closed or ended
        manager, channel_id = self.manager, self.handler.channel_id
        # What is corked goes out now or, the connection being over, is counted as not written
        # before the channel's part of the user's history is settled.
        self.flush()
        if self._close_task is None and self.handler.task_count:
            # The peer ended it (its close frame, or the connection lost), maybe in the same read
            # as its last requests, whose handler tasks have not begun: one loop iteration for
            # them to start before the close cancels them, as when the close comes in a read of
            # its own (every transport alike: some libraries hand us the close at once).
            await asyncio.sleep(0)
        manager.remove_handler(channel_id, closed)
        if self._close_task is None:
            await _cancel(self._sender)
            if not self.transport.closed:
                await close_quietly(self.transport, CloseCode.NORMAL, "")
            self._drop_abort_timer()
            return
        # Read on while our close frame waits for the peer's: when the peer sent more than the
        # library buffers, its close frame is behind them, and the closing handshake would
        # stall until the library's close timeout (RFC 6455 section 1.4).
        drain = self._loop.create_task(_discard_until_closed(self.transport))
        try:
            await asyncio.shield(self._close_task)
        finally:
            await _cancel(drain)
            await _cancel(self._sender)  # done unless the close was cut short
            manager.handler_written(channel_id)  # what the backlog wrote (close)
        self._drop_abort_timer()

    def _drop_abort_timer(self) -> None:
        # The abort timer holds the transport, and through it every object of the connection,
        # for close_timeout: once the connection is over there is nothing left to abort.
        timer, transport = self._abort_timer, self.transport
        if (timer is not None and supports(transport, SupportsDisconnected)
                and cast(SupportsDisconnected, transport).disconnected):
            timer.cancel()  # drops its callback and arguments at once

    async def _send_queued(self) -> None:
        # Frames are written synchronously while the transport accepts them, and awaited (with
        # its backpressure) only when its write buffer is full.
        handler = self.handler
        queue, write, send, flushed = handler.queue, self._write, self.transport.send, \
            handler.frame_flushed
        try:
            while (frame := queue.get_nowait()) is not None:
                if write is None or not write(frame):
                    self.flush()  # what is corked goes first
                    await send(frame)
                flushed()
        except ConnectionClosed:
            pass
        except Exception:
            self.handler.log.exception("send failed")
            self.handler.close(CloseCode.INTERNAL_ERROR, "send failed")
        finally:
            self._sender = None

    async def _flush_and_close(self, backlog: list[bytes], code: int, reason: str) -> None:
        """Send what was queued before the close, then the close frame (bounded by the abort
        timer: a transport that cannot write any more is aborted, which ends this)."""
        if self._sender is not None:
            # It writes the frame it holds and stops: the queue is empty and closed.
            await asyncio.wait([self._sender])
        self.flush()  # what was corked before the close goes out first, in order
        try:
            for frame in backlog:
                await self.transport.send(frame)
                self.handler.frame_flushed()
        except Exception:  # gone meanwhile: the close below is a no-op then
            logger.debug("flush before close failed", exc_info=True)
        # What it wrote of the user's history is acknowledged before the close frame goes:
        # a client reconnecting elsewhere once it has it is not given it again. Bounded, and
        # well within close_timeout (the abort timer runs meanwhile).
        await self.manager.written_before_close(
            self.handler.channel_id, min(FINAL_ACK_WAIT, self.manager.config.close_timeout / 4))
        await close_quietly(self.transport, code, reason)

    def _arm_abort(self) -> None:
        # A peer that does not read never lets a closing handshake finish (our close frame sits
        # behind a full send buffer) and TCP keeps such a socket for minutes: whatever is still
        # open close_timeout after the close began is aborted. A no-op on a closed transport.
        if self._abort_timer is None:
            self._abort_timer = self._loop.call_later(
                self.manager.config.close_timeout, _abort_quietly, self.transport
            )


class _Cork(SupportsCork, SupportsSendNowait, Protocol):
    """A corking transport as the driver calls it (``send_nowait`` only when it has one)."""


class _Flusher:
    """The connections of one loop that corked frames this iteration, flushed together by one
    ``call_soon`` callback: one callback per iteration, not one per connection or frame. Bounded:
    a connection is added only when it corks with nothing corked (its ``_corked`` count), so
    once per iteration, plus once per awaited send that flushed it early. It holds no reference
    to the loop, which keys it weakly.

    It also picks, once per iteration, how the next one writes (:func:`write_through`): corked,
    or, while fan-outs bring each connection a single frame per iteration, written through
    (``send_nowait``: the same one system call, without the cork's second pass over every
    connection). A connection written through that gets a second frame in the same iteration
    corks it; enough of those and the cork is back for the next iteration."""

    __slots__ = ("_dirty", "_scheduled", "_streak", "doubled", "epoch", "frames", "swept", "through", "written")

    def __init__(self) -> None:
        self._dirty: list[ConnectionDriver] = []
        self._scheduled = False
        #: Iteration number (bumped by every pass), and this iteration's counts: frames corked,
        #: frames written through, and connections written through that got a second frame.
        self.epoch = 1
        self.frames = self.written = self.doubled = 0
        self.through = False
        self._streak = 0
        #: The recipients of this iteration's sweep (the first fan-out written through, see
        #: fan_out_through), whose ``_wrote`` it left for :meth:`settle` to set, or ``None``.
        self.swept: Collection[WebSocketHandler] | None = None

    def add(self, driver: ConnectionDriver) -> None:
        self._dirty.append(driver)
        if not self._scheduled:
            self._scheduled = True
            driver._loop.call_soon(self._flush)

    def settle(self) -> None:
        """Set ``_wrote`` of every connection this iteration's sweep wrote, before anything reads
        it (at most once per iteration, and only in one that writes more after its sweep). Those
        the sweep did not write hold ``-epoch``; a connection that joined the collection since
        counts as written: its next frame this iteration is corked, which only costs a flush."""
        swept, self.swept = self.swept, None
        if swept is None:
            return
        epoch = self.epoch
        skipped = -epoch
        for handler in swept:
            if handler._wrote not in (skipped, NEVER_THROUGH):
                handler._wrote = epoch

    def _flush(self) -> None:
        self._scheduled = False
        self.swept = None  # the iteration is over: no _wrote can be this epoch's any more
        self.epoch += 1
        dirty, self._dirty = self._dirty, []
        self.through, self._streak = write_through(
            self.through, self._streak, corked=len(dirty), frames=self.frames, written=self.written,
            doubled=self.doubled)
        self.frames = self.written = self.doubled = 0
        for driver in dirty:
            driver.flush()


#: Connections one iteration's writes must reach to count as a fan-out, and fan-outs of a single
#: frame per connection in a row before writing through.
THROUGH_MIN_CONNECTIONS = 64
THROUGH_AFTER = 8


def write_through(through: bool, streak: int, *, corked: int, frames: int, written: int,
                  doubled: int) -> tuple[bool, int]:
    """Whether the next loop iteration writes through, and the new streak, from what this one
    did: ``corked`` connections holding ``frames`` corked frames, ``written`` frames written
    through, ``doubled`` of those connections given another frame in the same iteration.

    Written through stays while at most one connection in eight written through got a second
    frame (they cost two writes instead of one); corked turns to written through after
    ``THROUGH_AFTER`` fan-outs in a row to at least ``THROUGH_MIN_CONNECTIONS`` connections with
    (nearly: one in eight more) one frame each. Pure, for the tests."""
    if through:
        return (False, 0) if doubled * 8 > written else (True, 0)
    if corked >= THROUGH_MIN_CONNECTIONS and frames * 8 <= corked * 9:
        streak += 1
        return streak >= THROUGH_AFTER, streak
    if frames > corked:  # a burst was coalesced
        return False, 0
    return False, streak


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary())
#: The loop of the last fan-out (weakly) and its flusher: one tuple, replaced at once.
_current: tuple[Callable[[], asyncio.AbstractEventLoop | None], _Flusher | None] = (lambda: None, None)


def fan_out_through(handlers: Collection[WebSocketHandler], frame: bytes, skip: WebSocketHandler | None,
                    counters: Counters) -> tuple[int, list[WebSocketHandler]] | None:
    """The first pass of a fan-out while this loop writes through (see :class:`_Flusher`), or
    ``None`` when it does not. The handlers are one manager's, counting into ``counters``.

    The common case of ``WebSocketHandler.offer`` for every recipient but ``skip``, inlined: a
    connection whose driver handed it its transport's write (``_through``, see
    ``ConnectionDriver._offer_through``: nothing queued, corked nor being sent, nobody waiting
    for its frame numbers) and that was not written this iteration (``_wrote``) is written with
    it, no call in between. Returns how many were written so, and the other recipients (``skip``
    among them), in order, for the caller to ``offer`` the frame (which decides for them as
    usual: a second frame in the iteration is corked, a full queue takes its policy).

    The iteration's first such fan-out (its sweep) does not set ``_wrote`` for the recipients it
    writes, one store less each: the flusher keeps the collection until the end of the iteration
    and :meth:`_Flusher.settle` sets their marks only if something reads them in it (another
    fan-out, or ``ConnectionDriver.write_now``)."""
    global _current
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    current = _current
    if current[0]() is loop:
        flusher: _Flusher | None = current[1]
    else:  # another loop than the last fan-out's (a WeakKeyDictionary look-up costs a weakref)
        flusher = _FLUSHERS.get(loop)
        if flusher is None:
            return None
        _current = (weakref.ref(loop), flusher)
    if flusher is None or not flusher.through:
        return None
    if flusher.swept is not None:  # an earlier fan-out of this iteration swept: _wrote is read below
        flusher.settle()
    epoch = flusher.epoch
    rest: list[WebSocketHandler] = []
    handler: WebSocketHandler | None = None
    if skip is not None:  # as if written this iteration: left to the caller, which skips it
        kept, skip._wrote = skip._wrote, epoch
    try:
        if skip is None and not flusher.written:
            # The sweep: nothing written through yet this iteration (one fan-out per iteration,
            # k=1), so no recipient's _wrote can be this epoch and the loop need not read it, nor
            # set it: the collection is kept (swept) for settle() to set it, should anything this
            # iteration read it. Only those it does not write are marked (-epoch), off the loop's
            # common path. Set first: should a write raise, the others count as written too.
            flusher.swept = handlers
            for handler in handlers:
                if (write := handler._through) is not None and write(frame) is not False:
                    handler.accepted += 1  # and written: flushed too (see WebSocketHandler._behind)
                else:
                    rest.append(handler)
                    if handler._wrote != NEVER_THROUGH:
                        handler._wrote = -epoch
        else:
            for handler in handlers:
                # Not written this iteration, its write, then the write (a transport's
                # send_nowait may refuse).
                if handler._wrote < epoch and (write := handler._through) is not None \
                        and write(frame) is not False:
                    handler._wrote = epoch
                    handler.accepted += 1
                else:
                    rest.append(handler)
        written = len(handlers) - len(rest)
    except BaseException:  # (a write raised) those before it were written: counted, then raised
        written = -len(rest)
        for before in handlers:
            if before is handler:
                break
            written += 1
        raise
    finally:
        if skip is not None:
            skip._wrote = kept
        elif not written:  # a sweep that wrote none: nothing to settle
            flusher.swept = None
        if written:
            counters.frames_out += written
            counters.bytes_out += written * len(frame)
            flusher.written += written
            if not flusher._scheduled:  # the pass still runs: it ends the iteration (epoch)
                flusher._scheduled = True
                loop.call_soon(flusher._flush)
    return written, rest


_handler.fan_out_through = fan_out_through


def _charge_origin(recipient: WebSocketHandler, frame: bytes) -> None:
    """``handler.charge_origin``: the connection whose message this fan-out runs for (the
    context's channel, when it is another connection of the same manager) owes it."""
    origin = current_channel.get(None)
    if origin is None or origin == recipient.channel_id:
        return
    sink = recipient._sink
    if not isinstance(sink, ConnectionDriver):
        return
    owner = sink.manager.handlers.get(origin)
    driver = owner._sink if owner is not None else None
    if isinstance(driver, ConnectionDriver):
        driver.owe(frame, recipient.queue)


_handler.charge_origin = _charge_origin


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        _FLUSHERS[loop] = flusher = _Flusher()
    return flusher


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _discard_until_closed(transport: Transport) -> None:
    with contextlib.suppress(Exception):  # ConnectionClosed ends it, as does any transport error
        while True:
            await transport.receive()


def _abort_quietly(transport: Transport) -> None:
    try:
        transport.abort()
    except Exception:  # aborting is the last resort; it must never raise into the loop
        logger.debug("abort failed", exc_info=True)


async def close_quietly(transport: Transport, code: int, reason: str) -> None:
    """Close ``transport`` with ``code``, never raising: the peer may be gone already."""
    try:
        await transport.close(code, reason[:120])
    except Exception:  # the peer may be gone already; closing is best effort
        logger.debug("close failed", exc_info=True)
