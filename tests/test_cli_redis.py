"""The README's multi-process recipe: two demo servers behind one Redis deliver each other's
broadcasts (issue 6, "done when")."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import CustomServerMessage, DaraClient
from dara_ws_websockets import connect

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
