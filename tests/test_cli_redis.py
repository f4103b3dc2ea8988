"""The README's multi-process recipe: two demo servers behind one Redis deliver each other's
broadcasts (issue 6, "done when"); what the demo's requests answer while Redis is down."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from dara_ws_cli.main import build_demo
from dara_ws_core import CustomServerMessage, DaraClient, WebsocketManager
from dara_ws_redis import RedisBackplane
from dara_ws_websockets import connect, serve

from .helpers import eventually

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def two_demo_servers(redis_server: RedisServer) -> Iterator[list[int]]:
    ports, processes = [free_port(), free_port()], []
    try:
        for port in ports:
            process = subprocess.Popen(
                [sys.executable, "-m", "dara_ws_cli", "serve", "--port", str(port),
                 "--clock", "0", "--redis-url", redis_server.url],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            processes.append(process)
            assert process.stdout is not None
            line = process.stdout.readline()
            while "dara-ws demo" not in line:
                assert line, "a demo server exited before it was ready"
                line = process.stdout.readline()
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


async def test_two_demo_processes_deliver_each_others_chat(two_demo_servers: list[int]) -> None:
    urls = [f"ws://127.0.0.1:{port}/api/core/ws?token=u{port}" for port in two_demo_servers]
    first = DaraClient(lambda: connect(urls[0]), ping_interval=None)
    second = DaraClient(lambda: connect(urls[1]), ping_interval=None)
    async with first, second:
        assert await first.request("chat", "hello from 1", timeout=10) == {"delivered": True}
        pushed = await second.receive(timeout=10)
        assert isinstance(pushed, CustomServerMessage) and pushed.message.kind == "chat"
        assert pushed.message.data == {"from": first.channel, "text": "hello from 1"}
        assert await second.request("chat", "hello from 2", timeout=10) == {"delivered": True}
        back = await first.receive(timeout=10)
        assert isinstance(back, CustomServerMessage)
        assert back.message.data == {"from": second.channel, "text": "hello from 2"}
        assert first.received_nowait() == [] and second.received_nowait() == []  # exactly once


async def test_the_demos_tell_and_chat_say_delivered_only_while_the_bus_is_up(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """With Redis down, ``tell`` and ``chat`` reach this process's connections only (a kept
    ``tell`` reaches the others once Redis is back): they answered ``"delivered": true`` all
    the same. They say ``false`` and ``"bus": "down"`` now."""
    redis = redis_factory()
    manager = WebsocketManager()
    backplane = RedisBackplane(redis.url)
    manager.backplane = backplane
    await backplane.start(manager)
    try:
        async with serve(build_demo(manager), "127.0.0.1", 0) as server:
            def client(user: str) -> DaraClient:
                return DaraClient(lambda: connect(f"{server.url}?token={user}"), ping_interval=None,
                                  reconnect=False)

            async with client("alice") as alice, client("bob") as bob:
                told = {"user": "bob", "text": "up"}
                assert await alice.request("tell", told, timeout=10) == {"delivered": True, "kept": True}
                assert await _told_text(bob) == "up"
                redis.kill()
                await eventually(lambda: not backplane.connected, "the backplane sees Redis gone")
                told = {"user": "bob", "text": "down"}
                answer = await alice.request("tell", told, timeout=10)
                assert answer["delivered"] is False and answer["bus"] == "down", answer
                # Here it was delivered all the same: bob is on this process.
                assert await _told_text(bob) == "down"
                answer = await alice.request("chat", "down too", timeout=10)
                assert answer == {"delivered": False, "bus": "down"}, answer
                assert await _told_text(bob) == "down too"
    finally:
        await backplane.stop()


async def _told_text(client: DaraClient) -> str:
    pushed = await client.receive(timeout=10)
    assert isinstance(pushed, CustomServerMessage), pushed
    return str(pushed.message.data["text"])
