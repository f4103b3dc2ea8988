"""``install(config)`` in a real Dara 1.30 app (dara_ws_core.integrations.dara).

Each Dara app is a process (tests/dara_app.py): Dara's own layer as the reference, the same app
with ``install``, two such apps sharing a real redis-server, and one started by the ``dara
start`` command line. A Python client plays the stock ``@darajs/core`` client (protocol.md):
it logs in over HTTP, connects with the ``dara_session_token`` cookie, reads ``init``, answers
the server's ``VariableRequestMessage`` with a ``type: message`` frame whose ``channel`` is the
request's ``__rchan``, and routes on the top-level ``__typename``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import websockets

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

ROOT = Path(__file__).resolve().parent.parent
DARA = Path(sys.executable).with_name("dara")
STEP_TIMEOUT = 10.0
START_TIMEOUT = 60.0
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PASSWORDS = {"alice": "pw-a", "bob": "pw-b"}


# --------------------------------------------------------------------------- Dara processes


class DaraApp:
    """tests/dara_app.py in its own process; ``port`` once it listens."""

    def __init__(self, layer: str, redis: str | None = None, cli_port: int | None = None) -> None:
        env = {**os.environ, "DARA_WS_TEST_LAYER": layer, "PYTHONUNBUFFERED": "1",
               "DARA_TEST_FLAG": "1"}
        env.pop("DARA_WS_TEST_REDIS", None)
        if redis is not None:
            env["DARA_WS_TEST_REDIS"] = redis
        if cli_port is None:
            command = [sys.executable, "-m", "tests.dara_app"]
        else:  # the CLI, headless: no JS build, no metrics server; it imports the config
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            command = [str(DARA), "start", "--config", "tests.dara_app:config", "--host",
                       "127.0.0.1", "--port", str(cli_port), "--skip-jsbuild", "--disable-metrics",
                       "--log", "INFO"]
        self.cli = cli_port is not None
        self.port = cli_port or 0
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, bufsize=0, start_new_session=True)

    def wait_ready(self) -> None:
        from .redis_server import read_line  # after pytest registered it as a plugin

        if self.cli:  # uvicorn's own line, on the port we chose
            read_line(self.process, lambda line: "Uvicorn running on" in line, START_TIMEOUT)
            return
        lines = read_line(self.process, lambda line: line.startswith("PORT "), START_TIMEOUT)
        self.port = int(lines[-1].split()[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def running(*apps: DaraApp) -> Iterator[tuple[DaraApp, ...]]:
    """Start several apps at once (they import Dara in parallel), stop them all at the end."""
    try:
        for app in apps:
            app.wait_ready()
        yield apps
    finally:
        for app in apps:
            app.stop()


@pytest.fixture(scope="module")
def apps(redis_server: RedisServer) -> Iterator[dict[str, DaraApp]]:
    """The reference (Dara's layer), ours, and two of ours sharing one redis-server."""
    names = {"dara": DaraApp("dara"), "ours": DaraApp("ours"),
             "node1": DaraApp("ours", redis_server.url), "node2": DaraApp("ours", redis_server.url)}
    with running(*names.values()):
        yield names


# --------------------------------------------------------------------------- the stock client


async def login(port: int, user: str) -> str:
    """``POST /api/auth/session`` as the login page does; the session cookie's value."""
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{port}/api/auth/session",
        json={"username": user, "password": PASSWORDS[user]},
    ) as response:
        assert response.status == 200, await response.text()
        # The cookie is Secure: a client on plain http keeps it only by reading the header.
        return response.cookies["dara_session_token"].value


class StockClient:
    """What the stock client does on the socket, and every frame it received, in order."""

    def __init__(self, ws: Any, channel: str, answers: dict[str, Any]) -> None:
        self.ws = ws
        self.channel = channel
        self.answers = answers  # variable uid -> the value this tab holds
        self.frames: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int, cookie: str | None, answers: dict[str, Any] | None = None
                      ) -> StockClient:
        headers = [] if cookie is None else [("Cookie", f"dara_session_token={cookie}")]
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/api/core/ws",
                                      additional_headers=headers, open_timeout=STEP_TIMEOUT)
        init = json.loads(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT))
        assert init["type"] == "init" and set(init["message"]) == {"channel"}, init
        return cls(ws, init["message"]["channel"], answers or {})

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in self.ws:
                frame = json.loads(text)
                assert isinstance(frame, dict) and "type" in frame, frame
                if frame.get("__typename") == "VariableRequestMessage":
                    # VariableStateProvider: sendVariable(value, __rchan), chunk_count null.
                    uid = frame["message"]["variable"]["uid"]
                    await self.ws.send(json.dumps({
                        "channel": frame["message"]["__rchan"], "chunk_count": None,
                        "message": self.answers.get(uid, "__NOT_REGISTERED__"), "type": "message"}))
                self.frames.append(frame)
                self.changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], start: int = 0
                       ) -> dict[str, Any]:
        """The first frame from index ``start`` on that satisfies ``predicate``."""
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while True:
                    for frame in self.frames[start:]:
                        if predicate(frame):
                            return frame
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no such frame on {self.channel}; got {self.frames[start:]}") from None

    async def request(self, kind: str, data: Any) -> Any:
        """``sendCustomMessage(kind, data, true)``: the reply's data."""
        rchan = f"rchan-{next(self._ids)}"
        await self.ws.send(json.dumps({"message": {"data": data, "kind": kind, "__rchan": rchan},
                                       "type": "custom"}))
        reply = await self.wait_for(lambda f: f["type"] == "custom"
                                    and f["message"].get("__response_for") == rchan)
        return reply["message"]["data"]

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


@contextlib.asynccontextmanager
async def clients(*specs: tuple[int, str | None, dict[str, Any]]) -> AsyncIterator[list[StockClient]]:
    opened: list[StockClient] = []
    try:
        for port, cookie, answers in specs:
            opened.append(await StockClient.connect(port, cookie, answers))
        yield opened
    finally:
        for client in opened:
            await client.close()


def typed(typename: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    """Route as the stock client does: on the top-level ``__typename``."""
    return lambda f: f.get("__typename") == typename and all(
        f["message"].get(k) == v for k, v in fields.items())


async def layer(port: int) -> str:
    """Which WebSocket layer serves the app: the type of its manager."""
    async with clients((port, await login(port, "bob"), {})) as (tab,):
        return str(await tab.request("layer", None))


# --------------------------------------------------------------------------- one scenario


async def scenario(port: int) -> dict[str, Any]:
    """Drive Dara's internals that use the socket; return every frame each tab received during
    each step, with ids, times and tracebacks replaced by stable names."""
    alice, bob = await login(port, "alice"), await login(port, "bob")
    names: dict[str, str] = {}
    steps: dict[str, dict[str, list[str]]] = {}
    async with clients((port, alice, {"answer": 7}), (port, alice, {}), (port, bob, {})) as tabs:
        a1, a2, b1 = tabs
        names.update({a1.channel: "<A1>", a2.channel: "<A2>", b1.channel: "<B1>"})
        marks = [0, 0, 0]

        def step(name: str) -> None:
            steps[name] = {tab: [normalize(f, names) for f in client.frames[mark:]]
                           for tab, client, mark in zip(("A1", "A2", "B1"), tabs, marks, strict=True)}
            marks[:] = [len(client.frames) for client in tabs]

        me = await a1.request("whoami", None)
        names[me["session"]] = "<alice-session>"
        step("whoami")
        done = await a1.request("task", {"fail": False})
        names[done["task_id"]] = "<task-ok>"
        await a1.wait_for(typed("TaskNotificationMessage", task_id=done["task_id"], status="COMPLETE"))
        step("task complete")
        failed = await a1.request("task", {"fail": True})
        names[failed["task_id"]] = "<task-failed>"
        await a1.wait_for(typed("TaskNotificationMessage", task_id=failed["task_id"], status="ERROR"))
        await a1.wait_for(typed("ServerErrorMessage"), marks[0])
        step("task error")
        await a1.request("store", {"scope": "user", "value": {"n": 1}})
        await a2.wait_for(typed("BackendStoreMessage", store_uid="store-user"), marks[1])
        step("store per user")
        await b1.request("store", {"scope": "global", "value": {"g": 2}})
        for tab in (a1, a2):
            await tab.wait_for(typed("BackendStoreMessage", store_uid="store-global"))
        step("store global")
        await a1.request("server_variable", {"scope": "user", "value": 1})
        for tab, mark in ((a1, marks[0]), (a2, marks[1])):
            await tab.wait_for(typed("ServerVariableMessage", uid="sv-user"), mark)
        step("server variable per user")
        await b1.request("server_variable", {"scope": "global", "value": 2})
        for tab, mark in zip(tabs, marks, strict=True):
            await tab.wait_for(typed("ServerVariableMessage", uid="sv-global"), mark)
        step("server variable global")
        assert await a1.request("current", None) == {"value": 7}
        step("get_current_value")
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/api/boom", headers={"Cookie": f"dara_session_token={alice}"}
        ) as response:
            assert response.status == 500
        for tab, mark in ((a1, marks[0]), (a2, marks[1])):
            await tab.wait_for(typed("ServerErrorMessage"), mark)
        step("server error from HTTP")
        gone = "00000000-0000-4000-8000-000000000000"
        assert await a1.request("to_channel", {"channel": gone, "payload": {"x": 1}}) == {"sent": True}
        step("send to a gone channel")
    return {"whoami": me, "steps": steps}


def normalize(frame: dict[str, Any], names: dict[str, str]) -> str:
    """A frame as canonical JSON with known ids named, the server's own request ids and times
    blanked, and a traceback cut to its last line (the exception)."""

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            if key == "time":
                return "<time>"
            if key == "error":
                return value.strip().splitlines()[-1]
            if key == "__rchan" and value not in names:
                return "<server-rchan>"
            return UUID.sub(lambda m: names.get(m.group(), "<unknown-id>"), names.get(value, value))
        return value

    return json.dumps(walk(frame), sort_keys=True)


# --------------------------------------------------------------------------- tests


async def test_our_frames_equal_daras_for_the_same_actions(apps: dict[str, DaraApp]) -> None:
    reference, ours = await asyncio.gather(scenario(apps["dara"].port), scenario(apps["ours"].port))
    assert await layer(apps["dara"].port) == "dara" and await layer(apps["ours"].port) == "ours"
    for name, frames in reference["steps"].items():
        for tab in frames:  # per tab; a multicast's messages may come in either order
            assert sorted(ours["steps"][name][tab]) == sorted(frames[tab]), (name, tab)


async def test_dara_internals_reach_the_stock_client_through_our_layer(
    apps: dict[str, DaraApp],
) -> None:
    result = await scenario(apps["ours"].port)
    steps = result["steps"]
    # Handlers see Dara's context of their connection.
    me = result["whoami"]
    assert me["user"] == "alice" and me["ws_channel"] == me["channel_arg"] is not None
    frames = {name: [json.loads(f) for f in step["A1"]] for name, step in steps.items()}
    complete = [f for f in frames["task complete"] if f.get("__typename") == "TaskNotificationMessage"]
    assert [f["message"]["status"] for f in complete] == ["PROGRESS", "COMPLETE"]
    assert "result" not in complete[-1]["message"]  # fetched over HTTP by the client
    assert {f.get("__typename") for f in frames["task error"]} >= {
        "TaskNotificationMessage", "ServerErrorMessage"}
    # Per-user store: alice's other tab, never bob; global: every tab.
    assert steps["store per user"]["B1"] == []
    assert any('"store-user"' in f for f in steps["store per user"]["A2"])
    assert all(any('"store-global"' in f for f in steps["store global"][tab])
               for tab in ("A1", "A2", "B1"))
    assert any('"ServerErrorMessage"' in f for f in steps["server error from HTTP"]["A2"])
    assert not any('"sv-user"' in f for f in steps["server variable per user"]["B1"])
    variable = next(frame for frame in map(json.loads, steps["server variable global"]["B1"])
                    if frame.get("__typename") == "ServerVariableMessage")
    assert variable["message"]["__type"] == "ServerVariable"
    assert not any('"__dara_telemetry"' in f for step in steps.values() for fs in step.values()
                   for f in fs)


async def test_a_handshake_without_a_valid_session_cookie_is_refused_with_403(
    apps: dict[str, DaraApp],
) -> None:
    for cookie in (None, "not-a-session"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await StockClient.connect(apps["ours"].port, cookie)
        assert refused.value.response.status_code == 403


async def test_a_pending_send_and_wait_fails_at_once_when_its_tab_closes(
    apps: dict[str, DaraApp],
) -> None:
    # Dara's waiter polled forever; ours fails with ConnectionClosed, and the handler that
    # asked gets an error reply [ext] instead of a promise that never settles.
    port = apps["ours"].port
    cookie = await login(port, "alice")
    async with clients((port, cookie, {})) as (asker,):
        silent = await StockClient.connect(port, cookie)
        silent.reader.cancel()  # reads nothing, answers nothing
        rchan = "rchan-ask"
        await asker.ws.send(json.dumps({"type": "custom", "message": {
            "kind": "ask", "data": {"channel": silent.channel, "uid": "answer"}, "__rchan": rchan}}))
        await silent.ws.recv()  # the request arrived
        await silent.ws.close()
        reply = await asker.wait_for(lambda f: f["message"].get("__response_for") == rchan)
        assert reply["message"]["__error"]["code"] == "handler_error"


async def test_two_dara_processes_share_broadcasts_user_sends_and_requests_over_redis(
    apps: dict[str, DaraApp],
) -> None:
    one, two = apps["node1"].port, apps["node2"].port
    alice1, alice2, bob2 = await login(one, "alice"), await login(two, "alice"), await login(two, "bob")
    async with clients((one, alice1, {}), (two, alice2, {"answer": 9}), (two, bob2, {})) as tabs:
        x1, x2, y2 = tabs
        assert await x1.request("broadcast", {"hello": "all"}) == {"sent": True}
        for tab in (x2, y2):
            await tab.wait_for(lambda f: f["type"] == "message" and f["message"] == {"hello": "all"})
        assert await y2.request("to_user", {"user": "alice", "payload": {"hi": "alice"}}) == {"sent": True}
        for tab in (x1, x2):
            await tab.wait_for(lambda f: f["message"] == {"hi": "alice"})
        # send_and_wait from process 1 to a tab on process 2, answered there.
        assert await x1.request("ask", {"channel": x2.channel, "uid": "answer"}) == {"answer": 9}
        # A BackendStore per user written on process 2 reaches alice's tab on process 1.
        await x2.request("store", {"scope": "user", "value": {"n": 3}})
        await x1.wait_for(typed("BackendStoreMessage", store_uid="store-user", value={"n": 3}))
        assert not any(f["message"] == {"hi": "alice"} or (f.get("__typename") == "BackendStoreMessage"
                       and f["message"].get("store_uid") == "store-user") for f in y2.frames)


async def test_the_dara_start_command_line_serves_the_socket_with_our_layer() -> None:
    from .redis_server import free_port

    port = free_port()
    app = DaraApp("ours", cli_port=port)
    with running(app):
        cookie = await login(port, "alice")
        async with clients((port, cookie, {"answer": 5})) as (tab,):
            me = await tab.request("whoami", None)
            assert await tab.request("layer", None) == "ours" and me["ws_channel"] == tab.channel
            assert await tab.request("current", None) == {"value": 5}
            done = await tab.request("task", {"fail": False})
            await tab.wait_for(typed("TaskNotificationMessage", task_id=done["task_id"],
                                     status="COMPLETE"))


async def test_dara_registries_follow_the_connections_and_keep_no_trace_of_closed_ones(
    apps: dict[str, DaraApp],
) -> None:
    # Dara's own handler leaves an empty channel set per session and every session of a user
    # forever; ours unregisters them with the last connection.
    port = apps["ours"].port
    alice, bob = await login(port, "alice"), await login(port, "bob")
    async with clients((port, bob, {})) as (watcher,):
        first, second = (await StockClient.connect(port, alice), await StockClient.connect(port, alice))
        seen = await watcher.request("registries", None)
        session = next(s for s, chans in seen["websocket"].items() if first.channel in chans)
        assert set(seen["websocket"][session]) == {first.channel, second.channel}
        assert session in seen["sessions"]["alice"] and session in seen["tokens"]
        await second.close()
        await first.close()
        for _ in range(200):  # the server notices the closes on its own time: bounded polling
            seen = await watcher.request("registries", None)
            if session not in seen["websocket"]:
                break
        assert session not in seen["websocket"] and session not in seen["tokens"]
        assert "alice" not in seen["sessions"]
        assert seen["websocket"] == {seen["sessions"]["bob"][0]: [watcher.channel]}


def test_install_twice_on_one_configuration_is_refused() -> None:
    """A second install added a second middleware and manager: the first served the socket,
    Dara sent through the second, and every send reached no one."""
    from dara.core import ConfigurationBuilder

    from dara_ws_core.integrations.dara import install

    config = ConfigurationBuilder()
    install(config)
    with pytest.raises(RuntimeError, match="already called"):
        install(config)
    install(ConfigurationBuilder())  # another app's configuration is its own


def test_a_dara_core_outside_the_tested_range_fails_at_import_naming_the_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata

    from dara_ws_core.integrations import dara

    monkeypatch.setattr(metadata, "version", lambda name: "1.31.0")
    with pytest.raises(ImportError, match=r"supports dara-core >=1.30,<1.31.*1\.31\.0 is installed"):
        dara._check_dara_version()

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(ImportError, match=r'pip install "dara-ws-core\[dara\]"'):
        dara._check_dara_version()
