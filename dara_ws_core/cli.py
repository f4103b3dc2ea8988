"""``dara-ws``: the demo server and a probe client.

``dara-ws serve`` runs a small example application on 127.0.0.1:8000 at ``/api/core/ws``:

* ``echo`` (custom request): replies with what it got;
* ``chat`` (custom message): broadcast to every other connection as a ``chat`` custom push;
* ``ask`` (custom request): the server asks the client back (``send_and_wait``) and replies with
  the client's answer, showing both correlation directions;
* a ``clock`` custom push to everyone every ``--clock`` seconds.

Identity: ``?token=<name>`` (or the ``dara_session_token`` cookie) names the user; connections
without a token are anonymous, which this demo allows explicitly.

``dara-ws probe URL`` connects, prints the channel, runs ``echo`` and ``ask``, and exits.
"""

from __future__ import annotations

__all__ = ["build_demo", "main"]

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from .auth import Identity, allow_anonymous, extract_token
from .endpoint import Endpoint
from .exceptions import BackplaneError
from .handler import current_channel
from .manager import WebsocketManager
from .messages import build_frame
from .transport import HandshakeRequest

logger = logging.getLogger("dara_ws_core.demo")


def build_demo(manager: WebsocketManager | None = None) -> Endpoint:
    """The demo application: handlers registered on a manager, behind a demo authenticator."""
    manager = manager or WebsocketManager()
    anonymous = allow_anonymous()

    def authenticate(request: HandshakeRequest) -> Identity:
        token = extract_token(request)
        if token is None:
            return anonymous(request)  # type: ignore[return-value]  # sync by construction
        return Identity(user_id=token, session_id=token, token=token)

    def echo(channel_id: str, data: Any) -> Any:
        return data

    async def chat(channel_id: str, data: Any) -> dict[str, Any]:
        await manager.broadcast(
            {"kind": "chat", "data": {"from": channel_id, "text": data}},
            custom=True,
            ignore_channel=channel_id,
        )
        return {"delivered": True}

    async def ask(channel_id: str, data: Any) -> Any:
        answer = await manager.send_and_wait(
            current_channel.get(), {"question": data or "what is 6 * 7?"}, timeout=10
        )
        return {"you_answered": answer}

    manager.add_ws_handler("echo", echo)
    manager.add_ws_handler("chat", chat)
    manager.add_ws_handler("ask", ask)
    return Endpoint(manager, authenticate)


async def _clock(manager: WebsocketManager, interval: float) -> None:
    # Each process ticks its own clients only: with a backplane, a broadcast would give every
    # client one tick per process.
    while True:
        await asyncio.sleep(interval)
        frame = build_frame({"kind": "clock", "data": {"time": time.time()}}, custom=True)
        await manager.deliver_local(manager.handlers.values(), frame)


async def serve(args: argparse.Namespace) -> None:
    manager = WebsocketManager()
    backplane = None
    if args.redis_url:
        from dara_ws_redis import RedisBackplane

        backplane = RedisBackplane(args.redis_url)
        manager.backplane = backplane
    endpoint = build_demo(manager)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if backplane is not None:
        try:
            await backplane.start(manager)
        except BackplaneError as exc:
            raise SystemExit(f"dara-ws: cannot reach Redis at {args.redis_url}: {exc}") from None
    clock = loop.create_task(_clock(manager, args.clock)) if args.clock > 0 else None
    try:
        async with _serve(args.transport, endpoint, args.host, args.port) as port:
            print(f"dara-ws demo ({args.transport}) on ws://{args.host}:{port}{endpoint.path}",
                  flush=True)
            await stop.wait()
    finally:
        if clock is not None:
            clock.cancel()
        if backplane is not None:
            await backplane.stop()


@contextlib.asynccontextmanager
async def _serve(transport: str, endpoint: Endpoint, host: str, port: int) -> Any:
    if transport == "websockets":
        from dara_ws_websockets import port_of
        from dara_ws_websockets import serve as ws_serve

        async with ws_serve(endpoint, host, port) as server:
            yield port_of(server)
    elif transport == "aiohttp":
        from dara_ws_aiohttp import serve as aio_serve

        async with aio_serve(endpoint, host, port) as server:
            yield server.port
    elif transport == "asgi":
        from dara_ws_asgi import serve as asgi_serve

        async with asgi_serve(endpoint, host, port) as server:
            yield server.port
    else:
        raise SystemExit(f"unknown transport {transport!r}")


async def probe(args: argparse.Namespace) -> None:
    from dara_ws_websockets import connect

    from .client import DaraClient

    client = DaraClient(lambda: connect(args.url))
    client.on_request(lambda request: 42)
    async with client:
        print("channel:", client.channel)
        print("echo ->", await client.request("echo", {"hello": "world"}, timeout=5))
        print("ask  ->", await client.request("ask", "what is 6 * 7?", timeout=5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dara-ws", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the demo server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--transport", choices=["websockets", "aiohttp", "asgi"], default="websockets")
    s.add_argument("--clock", type=float, default=5.0, help="clock push interval (0: off)")
    s.add_argument("--redis-url", default=None, help="share clients with other processes")
    p = sub.add_parser("probe", help="connect to a demo server and try it")
    p.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/api/core/ws?token=probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args) if args.command == "serve" else probe(args))


if __name__ == "__main__":
    main()
