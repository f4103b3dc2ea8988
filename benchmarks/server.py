"""A benchmark server process: ``python -m benchmarks.server --impl raw|sio|sio-asgi|ours``.

Binds 127.0.0.1 on a free port, prints ``{"event": "ready", "port": ..., "path": ...}`` and then
executes the orchestrator's commands from stdin (see ``COMMANDS``), answering each with
``{"event": "result", "id": ...}``. End of stdin, or ``--max-seconds``, stops it.

Implementations (one class each, same five operations):

* ``raw``: a hand-written minimal Dara-wire server on plain ``websockets`` (the baseline). It
  sends the same JSON frames as ours, so the same lean client measures both.
* ``sio`` / ``sio-asgi``: python-socketio ``AsyncServer`` on aiohttp / on uvicorn (ASGI).
* ``ours``: dara_ws_core's ``WebsocketManager`` behind the ``dara_ws_websockets`` adapter
  (``ours-aiohttp``, ``ours-asgi``, ``ours-picows``: behind the other adapters).
* ``raw-picows``: the same minimal Dara-wire server as ``raw``, on picows' callbacks.

Every server runs on the loop ``BENCH_LOOP`` names (``asyncio``, the default, or ``uvloop``;
``python -m benchmarks.run --loop uvloop`` sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .procs import emit, run_child, stdin_commands

DARA_PATH = "/api/core/ws"
MiB = 1024 * 1024
Payload = dict[str, Any]


class Impl:
    """The operations every benchmarked server offers to the command loop."""

    path = DARA_PATH

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    async def start(self) -> int:
        """Start listening on 127.0.0.1; return the port."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def conn_count(self) -> int:
        raise NotImplementedError

    async def ask(self) -> Any:
        """One server -> client request on the single connected client, answered."""
        raise NotImplementedError

    async def ask_loop(self, warmup: int, iters: int) -> list[int]:
        """Sequential round trips; nanoseconds of each measured one."""
        samples: list[int] = []
        for i in range(warmup + iters):
            t = time.perf_counter_ns()
            await self.ask()
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
        return samples

    async def broadcast(self, payload: Payload) -> None:
        raise NotImplementedError

    async def to_user(self, user: str, payload: Payload) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------------- raw


class Raw(Impl):
    """Baseline: the least code that speaks the Dara wire on ``websockets`` (no framework).

    JSON is encoded per frame with the standard library, ``websockets.broadcast`` does fan-out
    (encoded once, written synchronously, no backpressure), and the server -> client round trip
    is a plain ``send`` then ``recv`` in the connection's own task: the pure transport cost.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.conns: dict[str, Any] = {}
        self.users: dict[str, set[Any]] = {}
        self.rt_jobs: asyncio.Queue[tuple[int, int, asyncio.Future[list[int]]]] = asyncio.Queue()

    async def start(self) -> int:
        from websockets.asyncio.server import serve

        # The same websockets options as the dara_ws_websockets adapter with ServerConfig defaults.
        self.server = await serve(
            self.handler, "127.0.0.1", 0, max_size=16 * MiB, backlog=4096,
            ping_interval=20, ping_timeout=20, compression=None,
        )
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    def conn_count(self) -> int:
        return len(self.conns)

    async def handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        cid = str(uuid.uuid4())
        query = parse_qs(urlsplit(ws.request.path).query)
        user = query.get("token", [cid])[0]
        self.conns[cid] = ws
        self.users.setdefault(user, set()).add(ws)
        try:
            await ws.send(json.dumps({"type": "init", "message": {"channel": cid}}))
            if query.get("bench") == ["rt"]:
                await self._rt_session(ws)
                return
            async for text in ws:
                frame = json.loads(text)
                kind = frame.get("type")
                if kind == "custom":
                    message = frame["message"]
                    reply = {"kind": message["kind"], "data": message.get("data")}
                    if "__rchan" in message:
                        reply["__response_for"] = message["__rchan"]
                    await ws.send(json.dumps({"type": "custom", "message": reply}))
                elif kind == "ping":
                    await ws.send('{"type":"pong","message":null}')
        except ConnectionClosed:
            pass
        finally:
            del self.conns[cid]
            peers = self.users[user]
            peers.discard(ws)
            if not peers:
                del self.users[user]

    async def _rt_session(self, ws: Any) -> None:
        """Run round-trip jobs on this connection, receiving in this same task (pure transport)."""
        closed = asyncio.ensure_future(ws.wait_closed())
        while True:
            job = asyncio.ensure_future(self.rt_jobs.get())
            await asyncio.wait((job, closed), return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                job.cancel()
                return
            warmup, iters, done = job.result()
            samples: list[int] = []
            try:
                for i in range(warmup + iters):
                    rchan = str(i)
                    t = time.perf_counter_ns()
                    await ws.send(json.dumps(
                        {"type": "message", "message": {"q": 1, "__rchan": rchan}}))
                    while True:
                        frame = json.loads(await ws.recv())
                        if frame.get("type") == "message" and frame.get("channel") == rchan:
                            break
                    if i >= warmup:
                        samples.append(time.perf_counter_ns() - t)
            except Exception as exc:
                done.set_exception(exc)
                raise
            done.set_result(samples)

    async def ask_loop(self, warmup: int, iters: int) -> list[int]:
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.rt_jobs.put_nowait((warmup, iters, done))
        return await done

    async def broadcast(self, payload: Payload) -> None:
        from websockets.asyncio.server import broadcast

        broadcast(self.conns.values(), json.dumps({"type": "message", "message": payload}))

    async def to_user(self, user: str, payload: Payload) -> None:
        from websockets.asyncio.server import broadcast

        peers = self.users.get(user)
        if peers:
            broadcast(peers, json.dumps({"type": "message", "message": payload}))


# ------------------------------------------------------------------------------ socketio


class Sio(Impl):
    """Peer: python-socketio ``AsyncServer`` (Engine.IO 4 over WebSocket), hosted by aiohttp."""

    path = "/socket.io/"
    async_mode = "aiohttp"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        import socketio

        self.sids: dict[str, str] = {}
        self.sio = socketio.AsyncServer(
            async_mode=self.async_mode, logger=False, engineio_logger=False,
            max_http_buffer_size=16 * MiB, **config,
        )

        async def connect(sid: str, environ: Any, auth: Any = None) -> None:
            user = (auth or {}).get("token") or sid
            self.sids[sid] = user
            await self.sio.enter_room(sid, user)

        async def disconnect(sid: str, *reason: Any) -> None:
            self.sids.pop(sid, None)

        async def echo(sid: str, data: Any) -> Any:
            return data

        self.sio.on("connect", connect)
        self.sio.on("disconnect", disconnect)
        self.sio.on("echo", echo)

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application()
        self.sio.attach(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port: int = self.runner.addresses[0][1]
        return port

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.runner.cleanup(), 5)

    def conn_count(self) -> int:
        return len(self.sids)

    async def ask(self) -> Any:
        return await self.sio.call("q", {"q": 1}, to=next(iter(self.sids)), timeout=5)

    async def broadcast(self, payload: Payload) -> None:
        await self.sio.emit("b", payload)

    async def to_user(self, user: str, payload: Payload) -> None:
        await self.sio.emit("b", payload, to=user)


class SioAsgi(Sio):
    """Peer: the same python-socketio server as an ASGI app under uvicorn."""

    async_mode = "asgi"

    async def start(self) -> int:
        import socketio
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            socketio.ASGIApp(self.sio), log_level="warning", lifespan="off", backlog=4096,
            access_log=False,
        )
        self.uvicorn = uvicorn.Server(config)
        self.task = asyncio.create_task(self.uvicorn.serve(sockets=[sock]))
        for _ in range(500):
            if self.uvicorn.started or self.task.done():
                break
            await asyncio.sleep(0.01)
        if not self.uvicorn.started:
            raise RuntimeError("uvicorn did not start within 5s")
        port: int = sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        self.uvicorn.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5)


# ---------------------------------------------------------------------------------- ours


class Ours(Impl):
    """dara_ws_core's manager behind the websockets adapter, configured from ``--config``.

    Every lean client passes ``?token=...``; the token is the user id (so per-user fan-out works
    the same as for the other implementations) and the session groups the user's tabs.
    """

    async def start(self) -> int:
        from dara_ws_core import (
            Endpoint,
            Identity,
            ServerConfig,
            WebsocketManager,
            token_authenticator,
        )

        self.manager = WebsocketManager(config=ServerConfig(**self.config))
        self.manager.custom_handlers.register("echo", lambda channel_id, data: data)

        def verify(token: str) -> Identity:
            return Identity(user_id=token, session_id=f"s-{token}")

        endpoint = Endpoint(self.manager, token_authenticator(verify))
        self.stack = contextlib.AsyncExitStack()
        return await self.serve(endpoint)

    async def serve(self, endpoint: Any) -> int:
        from dara_ws_websockets import serve

        self.server = await self.stack.enter_async_context(
            serve(endpoint, host="127.0.0.1", port=0, backlog=4096))
        return int(self.server.port)

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stack.aclose(), 10)

    def conn_count(self) -> int:
        return len(self.manager.handlers)

    async def ask(self) -> Any:
        channel_id = next(iter(self.manager.handlers))
        return await self.manager.send_and_wait(channel_id, {"q": 1}, timeout=5)

    async def broadcast(self, payload: Payload) -> None:
        await self.manager.broadcast(payload)

    async def to_user(self, user: str, payload: Payload) -> None:
        await self.manager.send_message_to_user(user, payload)

    def stats(self) -> dict[str, Any]:
        dropped = 0
        for handler in list(self.manager.handlers.values()):
            dropped += int(getattr(handler, "dropped", 0) or 0)
        return {"dropped": dropped}


class OursAiohttp(Ours):
    """The same manager and endpoint behind the aiohttp adapter."""

    async def serve(self, endpoint: Any) -> int:
        from dara_ws_aiohttp import serve

        server = await self.stack.enter_async_context(serve(endpoint, "127.0.0.1", 0))
        return int(server.port)


class OursAsgi(Ours):
    """The same manager and endpoint behind the ASGI adapter under uvicorn."""

    async def serve(self, endpoint: Any) -> int:
        from dara_ws_asgi import serve

        server = await self.stack.enter_async_context(serve(endpoint, "127.0.0.1", 0))
        return int(server.port)


class OursPicows(Ours):
    """The same manager and endpoint behind the picows adapter."""

    async def serve(self, endpoint: Any) -> int:
        from dara_ws_picows import serve

        server = await self.stack.enter_async_context(serve(endpoint, "127.0.0.1", 0, backlog=4096))
        return int(server.port)


class RawPicows(Impl):
    """Baseline on picows: the least code that speaks the Dara wire on picows' callbacks (what a
    hand-written picows server does per message), as ``Raw`` is on websockets. JSON with the
    standard library, fan-out as a loop of synchronous sends, the round trip as a send and a
    future the frame callback resolves. Authentication is the query's token, read in the factory.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.conns: dict[str, Any] = {}
        self.users: dict[str, set[Any]] = {}
        self.reply: asyncio.Future[None] | None = None
        self.rchan = ""
        self.text: Any = None  # picows' WSMsgType.TEXT, once started

    async def start(self) -> int:
        from picows import WSListener, WSMsgType, ws_create_server

        bench = self
        # Looked up once, as a hand-written server would: ``WSMsgType.TEXT`` in the fan-out
        # loop went through the enum's metaclass for every recipient (about 940 instructions of
        # 2,660 per delivery by callgrind): the bare server was a third slower than it needs be.
        self.text = text = WSMsgType.TEXT
        close = WSMsgType.CLOSE

        class Listener(WSListener):
            def __init__(self, cid: str, user: str) -> None:
                self.cid, self.user = cid, user

            def on_ws_connected(self, transport: Any) -> None:
                self.transport = transport
                bench.conns[self.cid] = transport
                bench.users.setdefault(self.user, set()).add(transport)
                transport.send(text, json.dumps({"type": "init", "message": {"channel": self.cid}}).encode())

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type is not text:
                    if frame.msg_type is close:  # the closing handshake, as websockets does it
                        transport.send_close(frame.get_close_code())
                        transport.disconnect()
                    return
                message = json.loads(frame.get_payload_as_bytes())
                kind = message.get("type")
                if kind == "message":
                    reply = bench.reply
                    if reply is not None and message.get("channel") == bench.rchan and not reply.done():
                        reply.set_result(None)
                elif kind == "custom":
                    body = message["message"]
                    answer = {"kind": body["kind"], "data": body.get("data")}
                    if "__rchan" in body:
                        answer["__response_for"] = body["__rchan"]
                    transport.send(text, json.dumps({"type": "custom", "message": answer}).encode())
                elif kind == "ping":
                    transport.send(text, b'{"type":"pong","message":null}')

            def on_ws_disconnected(self, transport: Any) -> None:
                bench.conns.pop(self.cid, None)
                peers = bench.users.get(self.user)
                if peers is not None:
                    peers.discard(transport)
                    if not peers:
                        del bench.users[self.user]

        def factory(request: Any) -> Any:
            cid = str(uuid.uuid4())
            query = parse_qs(urlsplit(request.path.decode()).query)
            return Listener(cid, query.get("token", [cid])[0])

        self.server = await ws_create_server(
            factory, "127.0.0.1", 0, max_frame_size=16 * MiB, backlog=4096,
            enable_auto_ping=bool(self.config.get("auto_ping", True)),  # (off: fanout_instructions)
            auto_ping_idle_timeout=20, auto_ping_reply_timeout=20,
            use_aiofastnet=bool(self.config.get("aiofastnet", False)),
        )
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self.server.close()

    def conn_count(self) -> int:
        return len(self.conns)

    async def ask(self) -> Any:
        transport = next(iter(self.conns.values()))
        self.rchan = rchan = uuid.uuid4().hex
        self.reply = asyncio.get_running_loop().create_future()
        transport.send(self.text, json.dumps(
            {"type": "message", "message": {"q": 1, "__rchan": rchan}}).encode())
        await asyncio.wait_for(self.reply, 5)

    async def broadcast(self, payload: Payload) -> None:
        frame = json.dumps({"type": "message", "message": payload}).encode()
        text = self.text
        for transport in list(self.conns.values()):
            transport.send(text, frame)

    async def to_user(self, user: str, payload: Payload) -> None:
        peers = self.users.get(user)
        if peers:
            frame = json.dumps({"type": "message", "message": payload}).encode()
            text = self.text
            for transport in list(peers):
                transport.send(text, frame)


class OursOtel(Ours):
    """``ours`` with telemetry on (issue 13's overhead bound): the SDK's meter provider
    aggregating every instrument (read by an in-memory reader, as a Prometheus scrape would) and
    its tracer provider recording every span (no exporter: the export is the collector's cost)."""

    async def serve(self, endpoint: Any) -> int:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        from dara_ws_core.telemetry import instrument

        instrument(self.manager, MeterProvider(metric_readers=[InMemoryMetricReader()]), TracerProvider())
        return await super().serve(endpoint)


IMPLS: dict[str, type[Impl]] = {"raw": Raw, "sio": Sio, "sio-asgi": SioAsgi, "ours": Ours,
                                "ours-aiohttp": OursAiohttp, "ours-asgi": OursAsgi, "ours-otel": OursOtel,
                                "ours-picows": OursPicows, "raw-picows": RawPicows}


# ------------------------------------------------------------------------------ commands


async def cmd_wait_conns(impl: Impl, n: int, timeout: float = 60) -> dict[str, Any]:
    """Wait until at least ``n`` connections are registered (polled: this is a harness)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while impl.conn_count() < n:
        if loop.time() > deadline:
            raise TimeoutError(f"{impl.conn_count()} of {n} connections after {timeout}s")
        await asyncio.sleep(0.02)
    return {"conns": impl.conn_count()}


async def cmd_ask(impl: Impl, warmup: int, iters: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    samples = await impl.ask_loop(warmup, iters)
    return {"samples": samples, "total_s": time.perf_counter() - t0}


async def cmd_broadcast(impl: Impl, m: int, r: int, per_iter: int = 0) -> dict[str, Any]:
    """``m`` broadcasts back to back; ``t0`` is taken just before the first one. With
    ``per_iter`` = k > 0, the loop runs one iteration after every k broadcasts (a burst of k
    per iteration: what a coalescing server can write in one system call per connection)."""
    t0 = time.monotonic()
    for i in range(m):
        await impl.broadcast({"bench": r, "n": i})
        if per_iter and (i + 1) % per_iter == 0:
            await asyncio.sleep(0)
    return {"t0": t0, "t_sent": time.monotonic()}


async def cmd_user_fanout(impl: Impl, m: int, r: int, user_ids: list[str]) -> dict[str, Any]:
    """``m`` messages to every user in turn; ``t0`` is taken just before the first one."""
    t0 = time.monotonic()
    for i in range(m):
        payload = {"bench": r, "n": i}
        for user in user_ids:
            await impl.to_user(user, payload)
    return {"t0": t0, "t_sent": time.monotonic()}


async def cmd_stream(impl: Impl, rate: float, seconds: float, pad: int) -> dict[str, Any]:
    """Broadcast at ``rate`` messages/s for ``seconds``, each stamped with its send time.

    The schedule is absolute, so a server that falls behind sends back to back (saturation).
    """
    filler = "x" * pad
    t0 = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = t0 + sent / rate
        if due > now:
            await asyncio.sleep(due - now)
        await impl.broadcast({"bench": 0, "n": sent, "t": time.monotonic(), "pad": filler})
        sent += 1
        await asyncio.sleep(0)  # even when behind schedule, let the server read and flush
    return {"t0": t0, "t_sent": time.monotonic(), "sent": sent, "conns": impl.conn_count()}


async def cmd_gc(impl: Impl) -> dict[str, Any]:
    gc.collect()
    return {"conns": impl.conn_count(), **impl.stats()}


COMMANDS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "wait_conns": cmd_wait_conns,
    "ask": cmd_ask,
    "broadcast": cmd_broadcast,
    "user_fanout": cmd_user_fanout,
    "stream": cmd_stream,
    "gc": cmd_gc,
}


async def amain(args: argparse.Namespace) -> None:
    impl = IMPLS[args.impl](json.loads(args.config))
    port = await impl.start()
    emit({"event": "ready", "port": port, "path": impl.path, "pid": os.getpid()})
    try:
        async for command in stdin_commands():
            name = command.pop("cmd")
            cid = command.pop("id", None)
            timeout = float(command.pop("timeout", 300))
            try:
                result = await asyncio.wait_for(COMMANDS[name](impl, **command), timeout)
            except Exception as exc:
                emit({"event": "error", "id": cid, "error": f"{name}: {exc!r}"})
                continue
            emit({"event": "result", "id": cid, **result})
    finally:
        await impl.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=sorted(IMPLS), required=True)
    parser.add_argument("--config", default="{}", help="JSON keyword arguments for the server")
    parser.add_argument("--max-seconds", type=float, default=900)
    run_child(amain, parser.parse_args())


if __name__ == "__main__":
    main()
