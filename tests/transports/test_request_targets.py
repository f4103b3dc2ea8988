"""One request target, one answer, on every socket transport: raw upgrade requests over real
sockets on 127.0.0.1 against websockets, aiohttp, ASGI under uvicorn and picows, whose libraries
decoded targets each their own way (uvicorn and aiohttp every percent-encoding, ``%2F`` too;
websockets and picows none) and took the absolute form (or not) each their own way. Every one
now answers what dara_ws_core.upgrade.check_target says of the raw target (tests/test_upgrade.py
tests the rule alone, on the same table), and its authenticator sees the normalized path."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
from aiohttp import web
from starlette.applications import Starlette
from starlette.routing import Mount

from dara_ws_aiohttp import add_route
from dara_ws_asgi import lifespan, websocket_route
from dara_ws_core import Endpoint, HandshakeRequest, Identity, ServerConfig, WebsocketManager, token_authenticator
from dara_ws_core.upgrade import check_target
from tests.hostile import handshake_request
from tests.stacks import TRANSPORTS, Stack, running_stack, verify_token
from tests.test_upgrade import ENDPOINT, TARGETS
from tests.transports.test_upgrade_requests import outcome

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
TIMEOUT = 10.0


def request_for(target: str) -> bytes:
    """An upgrade request for ``target``, as it is, whose token (a cookie) the stacks accept."""
    return handshake_request(target, [("Cookie", "dara_session_token=mallory:s1")])


def status_of(target: str) -> int:
    """What every transport answers ``target``: 101, or the rule's refusal."""
    refusal = check_target(target, ENDPOINT)
    return 101 if refusal is None else refusal.status


#: The review's cases and their kin, each of which some transport answered otherwise before
#: (in brackets: what websockets, aiohttp, ASGI and picows answered).
REVIEWED = {
    "/api%2Fcore%2Fws": 404,  # [404, 404, 101, 404]
    "/api/core/%77s": 101,  # [404, 101, 101, 404]
    "http://127.0.0.1:8000/api/core/ws": 101,  # [101, 400, 404, 400]
    "ws://127.0.0.1:8000/api/core/ws": 101,  # [101, 400, 404, 400]
    "ftp://example.com/api/core/ws": 400,  # [101, 400, 404, 400]
    "*": 400,  # [404, 400, 404, 400]
    "127.0.0.1:8000": 400,  # [404, 400, 404, 400]
    "/api/core/ws#top": 400,  # [101, 101, 404, 101]
    "/api/core/ws\x7f": 400,  # [404, 400, 400, 404]
}


@pytest.fixture(params=SOCKETS)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Stack, list[HandshakeRequest]]]:
    seen: list[HandshakeRequest] = []

    def authenticate(handshake: HandshakeRequest) -> Identity:
        seen.append(handshake)
        return verify_token(handshake.cookies["dara_session_token"])

    config = ServerConfig(ping_interval=None, handshake_timeout=2.0)
    async with running_stack(str(request.param), config, authenticate) as stack:
        yield stack, seen


def test_the_reviewed_targets_get_what_the_rule_says() -> None:
    assert {target: status_of(target) for target in REVIEWED} == REVIEWED
    assert set(REVIEWED) <= set(TARGETS)


async def test_every_transport_answers_each_request_target_with_the_same_status(
        served: tuple[Stack, list[HandshakeRequest]]) -> None:
    stack, seen = served
    assert stack.port is not None
    got = {}
    for target in TARGETS:
        result = await outcome(stack.port, request_for(target))
        got[target] = result.status
        assert result.status == 101 or result.closed, target  # a refused socket is let go
    assert got == {target: status_of(target) for target in TARGETS}
    # The authenticator saw each accepted target's path normalized: the endpoint's.
    assert {request.path for request in seen} == {ENDPOINT}
    assert len(seen) == sum(status == 101 for status in got.values())


@contextlib.asynccontextmanager
async def _uvicorn(app: Starlette) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started and not task.done():
                await asyncio.sleep(0.01)  # uvicorn sets no event for it
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def _aiohttp(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def _endpoint() -> Endpoint:
    return Endpoint(WebsocketManager(ServerConfig(ping_interval=None)), token_authenticator(verify_token))


async def _statuses(port: int, targets: list[str]) -> dict[str, int | None]:
    return {target: (await outcome(port, request_for(target))).status for target in targets}


def _below(prefix: str, cases: dict[str, int]) -> dict[str, int]:
    return {target.replace("/api", prefix + "/api", 1): status for target, status in cases.items()}


#: Targets Starlette routes to the endpoint (on its decoded path, below the mount point): the
#: adapter checks the raw target again, and answers what every transport answers.
STARLETTE_ROUTED = {
    "/api/core/ws": 101,
    "/api/core/%77s": 101,
    "/api%2Fcore%2Fws": 404,  # "/api/core/ws" to Starlette
}
#: The same for aiohttp's router, which keeps a %2F but routes a target of another scheme, with
#: userinfo or with a fragment on its path alone.
AIOHTTP_ROUTED = {
    "/api/core/ws": 101,
    "/api/core/%77s": 101,
    "http://127.0.0.1:8000/api/core/w%73": 101,
    "/api/core/ws#top": 400,
    "ftp://example.com/api/core/ws": 400,
    "http://user@example.com/api/core/ws": 400,
}


def _starlette(endpoint: Endpoint, prefix: str) -> Starlette:
    route = websocket_route(endpoint)
    return Starlette(routes=[Mount(prefix, routes=[route])] if prefix else [route], lifespan=lifespan(endpoint))


@pytest.mark.parametrize("prefix", ["", "/realtime"])
async def test_a_starlette_route_checks_the_raw_target_starlette_routed(prefix: str) -> None:
    async with _uvicorn(_starlette(_endpoint(), prefix)) as port:
        got = await _statuses(port, list(_below(prefix, STARLETTE_ROUTED)))
    assert got == _below(prefix, STARLETTE_ROUTED)


async def test_a_route_a_fastapi_router_puts_below_its_prefix_is_served_there() -> None:
    # include_router(prefix=...) copies the route to prefix + path, unmounted (root_path ""):
    # where a route sits is the router's to say, and the raw target is still checked.
    from fastapi import APIRouter, FastAPI

    endpoint = _endpoint()
    router = APIRouter()
    router.routes.append(websocket_route(endpoint))
    app = FastAPI(lifespan=lifespan(endpoint))
    app.include_router(router, prefix="/v1")
    cases = {"/v1/api/core/ws": 101, "/v1/api/core/%77s": 101, "/v1/api%2Fcore%2Fws": 404,
             "/api/core/ws": 403}  # no route there: Starlette's own refusal
    async with _uvicorn(app) as port:
        assert await _statuses(port, list(cases)) == cases


@pytest.mark.xfail(strict=True, reason="uvicorn puts an absolute-form target whole in the ASGI scope's path "
                   "(http://host/api/core/ws), on which Starlette's router matches no route: Starlette "
                   "refuses it (403) before the adapter sees it. dara_ws_asgi.serve() and asgi_app() serve it.")
async def test_a_starlette_route_serves_the_absolute_form() -> None:
    async with _uvicorn(_starlette(_endpoint(), "")) as port:
        assert await _statuses(port, ["http://127.0.0.1:8000/api/core/ws"]) == {
            "http://127.0.0.1:8000/api/core/ws": 101}


@pytest.mark.parametrize("prefix", ["", "/realtime"])
async def test_an_aiohttp_route_checks_the_raw_target_aiohttp_routed(prefix: str) -> None:
    endpoint = _endpoint()
    app = web.Application()
    if prefix:
        sub = web.Application()
        add_route(sub, endpoint)
        app.add_subapp(prefix, sub)
    else:
        add_route(app, endpoint)
    async with _aiohttp(app) as port:
        got = await _statuses(port, list(_below(prefix, AIOHTTP_ROUTED)))
    assert got == _below(prefix, AIOHTTP_ROUTED)
