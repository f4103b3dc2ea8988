"""The demo application (the README's main job), in memory and as a real process."""

from __future__ import annotations

import socket
import subprocess
import sys

from dara_ws_core import CustomServerMessage, DaraClient, MemoryServer
from dara_ws_core.cli import build_demo


async def test_demo_app_echo_chat_and_ask() -> None:
    endpoint = build_demo()
    server = MemoryServer(endpoint)
    alice = DaraClient(lambda: server.connect("/api/core/ws?token=alice"), ping_interval=None)
    bob = DaraClient(lambda: server.connect("/api/core/ws"), ping_interval=None)
    async with alice, bob:
        assert endpoint.manager.get_user_channels("alice") == {alice.channel}
        assert await alice.request("echo", {"x": [1, 2]}) == {"x": [1, 2]}
        assert await alice.request("chat", "hello") == {"delivered": True}
        pushed = await bob.receive(timeout=5)
        assert isinstance(pushed, CustomServerMessage)
        assert pushed.message.kind == "chat"
        assert pushed.message.data == {"from": alice.channel, "text": "hello"}
        assert alice.received_nowait() == []  # the sender is ignored
        bob.on_request(lambda request: request.payload["question"].upper())
        assert await bob.request("ask", "why?") == {"you_answered": "WHY?"}
    await endpoint.shutdown(grace=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dara_ws_serve_and_probe_as_processes() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_core.cli", "serve", "--port", str(port), "--clock", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # the server prints its address when ready
        while "dara-ws demo" not in line:
            assert line, "the demo server exited before it was ready"
            line = server.stdout.readline()
        probe = subprocess.run(
            [sys.executable, "-m", "dara_ws_core.cli", "probe",
             f"ws://127.0.0.1:{port}/api/core/ws?token=probe"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        assert "echo -> {'hello': 'world'}" in probe.stdout
        assert "ask  -> {'you_answered': 42}" in probe.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert server.returncode == 0  # SIGTERM is a graceful stop
