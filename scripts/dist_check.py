"""One extra at a time, from the installed wheel: does it do what the README does with it?

Run by ``scripts/check-dist`` inside a fresh virtualenv holding the wheel with exactly one extra
(``python dist_check.py websockets``); the working directory is outside the source tree, so every
import comes from the wheel. Exits non-zero with a message on the first failure.
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ADAPTERS = {
    "websockets": "dara_ws_websockets",
    "aiohttp": "dara_ws_aiohttp",
    "asgi": "dara_ws_asgi",
    "redis": "dara_ws_redis",
    "picows": "dara_ws_picows",
}


def _endpoint() -> Any:
    from dara_ws_core import Endpoint, Identity, WebsocketManager, token_authenticator

    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    return Endpoint(manager, token_authenticator(lambda token: Identity(user_id=token, session_id=token)))


async def _echo_through(client_factory: Any) -> None:
    from dara_ws_core import DaraClient

    async with DaraClient(client_factory, ping_interval=None) as client:
        answer = await client.request("echo", {"hello": "wheel"}, timeout=10)
    assert answer == {"hello": "wheel"}, answer


def _other_adapters_name_their_extra(own: str) -> None:
    """Every adapter whose extra is not installed fails with the pip command to run."""
    for extra, module in ADAPTERS.items():
        if extra == own or (own == "asgi" and extra == "websockets"):  # [asgi] brings websockets
            continue
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                check=False, timeout=60)
        expected = f'pip install "dara-ws-core[{extra}]"'
        assert result.returncode != 0 and expected in result.stderr.splitlines()[-1], (module, result.stderr)


async def check_websockets() -> None:
    from dara_ws_websockets import connect, serve

    endpoint = _endpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server:
        url = f"{server.url}?token=alice"
        await _echo_through(lambda: connect(url))


def _cli_names_the_missing_extra() -> None:
    """The CLI names the extra it lacks, in one line (exit status 2)."""
    dara_ws = str(Path(sys.executable).with_name("dara-ws"))  # the venv's script; it is not activated
    result = subprocess.run([dara_ws, "serve", "--transport", "aiohttp", "--port", "0"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == (
        'dara-ws: dara_ws_aiohttp needs the aiohttp library: pip install "dara-ws-core[aiohttp]"'
    ), result.stderr


async def check_aiohttp() -> None:
    from dara_ws_aiohttp import connect, serve

    async with serve(_endpoint(), "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.port}/api/core/ws?token=alice"
        await _echo_through(lambda: connect(url))


async def check_picows() -> None:
    """The picows adapter serves; the [picows] extra has no other client than picows' own."""
    import json

    from picows import WSListener, WSMsgType, ws_connect

    from dara_ws_picows import serve

    frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Client(WSListener):
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type is WSMsgType.TEXT:
                frames.put_nowait(json.loads(frame.get_payload_as_bytes()))

    async with serve(_endpoint(), "127.0.0.1", 0) as server:
        transport, _ = await ws_connect(Client, f"{server.url}?token=alice")
        assert (await asyncio.wait_for(frames.get(), 10))["type"] == "init"
        request = {"kind": "echo", "data": {"hello": "wheel"}, "__rchan": "r1"}
        transport.send(WSMsgType.TEXT, json.dumps({"type": "custom", "message": request}).encode())
        reply = await asyncio.wait_for(frames.get(), 10)
        assert reply["message"]["data"] == {"hello": "wheel"}, reply
        transport.disconnect()


async def check_asgi() -> None:
    import uvicorn

    from dara_ws_asgi import asgi_app, serve
    from dara_ws_websockets import connect

    endpoint = _endpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server:
        await _echo_through(lambda: connect(f"ws://127.0.0.1:{server.port}/api/core/ws?token=a"))
    # What the README says: uvicorn with its defaults (ws="auto") on asgi_app(endpoint).
    endpoint = _endpoint()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(asgi_app(endpoint), log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        for _ in range(200):  # bounded: 10 s
            if uv.started:
                break
            assert not task.done(), "uvicorn stopped during startup"
            await asyncio.sleep(0.05)
        assert uv.started, "uvicorn did not start within 10 s"
        await _echo_through(lambda: connect(f"ws://127.0.0.1:{port}/api/core/ws?token=a"))
    finally:
        await endpoint.shutdown(grace=1)
        uv.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


async def check_redis(port: int) -> None:
    from dara_ws_core import ServerConfig, WebsocketManager
    from dara_ws_redis import RedisBackplane

    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as conn:
            if conn.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "redis-server did not listen within 10 s"
        await asyncio.sleep(0.05)
    backplane = RedisBackplane(f"redis://127.0.0.1:{port}/0")
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(manager)
    assert await manager.get_all_user_channels("nobody") == set()
    await backplane.stop()


def _run_with_redis() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (scripts/test installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(asyncio.wait_for(check_redis(port), 120))
    finally:
        redis.terminate()
        redis.wait(timeout=10)


async def check_jwt() -> None:
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from dara_ws_core import HandshakeRequest
    from dara_ws_core.auth import run_authenticator
    from dara_ws_core.jwt import jwt_authenticator

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for private, alg in ((rsa_key, "RS256"), (ec_key, "ES256")):
        auth = jwt_authenticator(private.public_key(), algorithms=[alg], audience="dara")
        token = pyjwt.encode({"sub": "alice", "aud": "dara", "exp": int(time.time()) + 60}, private,
                             algorithm=alg)
        request = HandshakeRequest.build(f"/api/core/ws?token={token}", [], None)
        identity = await run_authenticator(auth, request)
        assert identity.user_id == "alice", identity


def main() -> None:
    extra = sys.argv[1]
    if extra in ADAPTERS:
        importlib.import_module(ADAPTERS[extra])
        _other_adapters_name_their_extra(extra)
    else:
        result = subprocess.run([sys.executable, "-c", "import dara_ws_websockets"], capture_output=True,
                                text=True, check=False, timeout=60)
        assert 'pip install "dara-ws-core[websockets]"' in result.stderr, result.stderr
    if extra == "redis":
        _run_with_redis()
    else:
        asyncio.run(asyncio.wait_for(globals()[f"check_{extra}"](), 120))
    if extra == "websockets":
        _cli_names_the_missing_extra()
    print(f"[{extra}] ok")


if __name__ == "__main__":
    main()
