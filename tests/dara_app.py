"""A small real Dara 1.30 app for tests/test_integration_dara.py, run in its own process.

Dara keeps its state in module-level registries, so each app is a process:
``python -m tests.dara_app`` (``_start_application`` under uvicorn, port 0, prints
``PORT <n>`` when it listens) or ``dara start --config tests.dara_app:config``. The environment
chooses the layer: ``DARA_WS_TEST_LAYER=dara`` (Dara's own, the reference) or ``ours`` (with
``install``), and ``DARA_WS_TEST_REDIS`` a Redis URL for the backplane.

Its ws handlers drive Dara's internals from a test client: task notifications through the
``TaskManager``, ``BackendStore`` and ``ServerVariable`` per user and global, ``get_current_value`` (a server request),
server errors (the HTTP catch-all, route ``GET /api/boom``), and the manager's own sends.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from dara.core import ConfigurationBuilder, ServerVariable, Variable
from dara.core.auth import MultiBasicAuthConfig
from dara.core.auth.definitions import SESSION_ID, USER
from dara.core.auth.routes import verify_session
from dara.core.base_definitions import BaseTask, TaskProgressUpdate
from dara.core.http import get
from dara.core.internal.registries import utils_registry
from dara.core.internal.websocket import WS_CHANNEL, DaraServerMessage
from dara.core.persistence import BackendStore
from fastapi import Depends

LAYER = os.environ.get("DARA_WS_TEST_LAYER", "dara")
USERS = {"alice": "pw-a", "bob": "pw-b"}

config = ConfigurationBuilder()
config.add_auth(MultiBasicAuthConfig(users=USERS))

USER_STORE = BackendStore(uid="store-user", scope="user")
GLOBAL_STORE = BackendStore(uid="store-global", scope="global")
ANSWER = Variable(default=0, uid="answer")
SERVER_VARIABLES = {"user": ServerVariable(scope="user", uid="sv-user"),
                    "global": ServerVariable(default=0, scope="global", uid="sv-global")}


class DemoTask(BaseTask):  # type: ignore[misc]  # dara ships no type information
    """A task run by Dara's TaskManager in this process: one progress update, then a result or
    an error (no worker pool needed)."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.notify_channels: list[str] = []
        self.cache_key = None
        self.reg_entry = None

    async def run(self, send_stream: Any = None) -> Any:
        await send_stream.send(TaskProgressUpdate(task_id=self.task_id, progress=50, message="half"))
        if self.fail:
            raise ValueError("the demo task failed")
        return {"answer": 42}

    async def cancel(self) -> None:
        return None


def manager() -> Any:
    return utils_registry.get("WebsocketManager")


def whoami(channel_id: str, data: Any) -> Any:
    user = USER.get()
    return {"channel_arg": channel_id, "ws_channel": WS_CHANNEL.get(), "session": SESSION_ID.get(),
            "user": None if user is None else user.identity_id}


def layer(channel_id: str, data: Any) -> Any:
    """Whose manager Dara's code finds: ``ours`` once ``install`` has swapped it."""
    return "ours" if type(manager()).__module__.startswith("dara_ws_core") else "dara"


async def run_task(channel_id: str, data: Any) -> Any:
    tasks = utils_registry.get("TaskManager")
    task = DemoTask(fail=bool(data.get("fail")))
    tasks.register_task(task)
    await tasks.run_task(task, ws_channel=channel_id)
    return {"task_id": task.task_id}


async def write_store(channel_id: str, data: Any) -> Any:
    store = USER_STORE if data["scope"] == "user" else GLOBAL_STORE
    await store.write(data["value"])
    return {"written": data["value"]}


async def write_server_variable(channel_id: str, data: Any) -> Any:
    await SERVER_VARIABLES[data["scope"]].write(data["value"])
    return {"written": data["value"]}


async def current_value(channel_id: str, data: Any) -> Any:
    return {"value": await ANSWER.get_current_value()}


async def ask(channel_id: str, data: Any) -> Any:
    request = DaraServerMessage.create("VariableRequestMessage", {"variable": {"uid": data["uid"]}})
    return {"answer": await manager().send_and_wait(data["channel"], request)}


async def broadcast(channel_id: str, data: Any) -> Any:
    await manager().broadcast(data)
    return {"sent": True}


async def to_user(channel_id: str, data: Any) -> Any:
    await manager().send_message_to_user(data["user"], data["payload"])
    return {"sent": True}


async def to_channel(channel_id: str, data: Any) -> Any:
    await manager().send_message(data["channel"], data["payload"])
    return {"sent": True}


def registries(channel_id: str, data: Any) -> Any:
    """Dara's registries as the app sees them: session -> channels, user -> sessions, and the
    sessions with a stored token."""
    from dara.core.internal.registries import (
        session_auth_token_registry,
        sessions_registry,
        websocket_registry,
    )

    return {"websocket": {k: sorted(v) for k, v in websocket_registry.get_all().items()},
            "sessions": {k: sorted(v) for k, v in sessions_registry.get_all().items()},
            "tokens": sorted(session_auth_token_registry.get_all())}


HANDLERS = {"whoami": whoami, "layer": layer, "registries": registries, "task": run_task,
            "store": write_store, "server_variable": write_server_variable,
            "current": current_value, "ask": ask, "broadcast": broadcast,
            "to_user": to_user, "to_channel": to_channel}
for kind, handler in HANDLERS.items():
    config.add_ws_handler(kind, handler)


AUTHENTICATED = Depends(verify_session)


def fail_after_auth(session: Any = AUTHENTICATED) -> None:
    # Raised in a dependency, outside the route's own error wrapper: the exception reaches
    # Dara's catch-all middleware, which pushes a ServerErrorMessage to the session's tabs.
    raise RuntimeError("boom from an HTTP route")


@get("boom", dependencies=[Depends(fail_after_auth)])  # type: ignore[untyped-decorator]
async def boom() -> None:
    return None


config.add_endpoint(boom)

if LAYER == "ours":
    from dara_ws_core.integrations.dara import install

    redis_url = os.environ.get("DARA_WS_TEST_REDIS")
    if redis_url:
        from dara_ws_redis import RedisBackplane

        install(config, backplane=RedisBackplane(redis_url, heartbeat_interval=1.0))
    else:
        install(config)


def main() -> None:
    import asyncio

    import uvicorn
    from dara.core.main import _start_application

    app = _start_application(config._to_configuration())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
