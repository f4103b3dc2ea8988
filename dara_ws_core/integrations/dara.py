"""One line in a Dara 1.30 app swaps Dara's WebSocket layer for this library's.

::

    from dara_ws_core.integrations.dara import install

    install(config)  # config = ConfigurationBuilder(); before the app starts

The app and the stock Dara frontend stay as they are. What ``install`` does:

* serves ``/api/core/ws`` with an :class:`~dara_ws_core.endpoint.Endpoint` (through the ASGI
  adapter, as an ASGI middleware given to ``config.add_middleware``, so it answers before Dara's
  own route), authenticating with Dara's session check: the ``dara_session_token`` cookie,
  verified by Dara's ``verify_auth_token``, HTTP 403 before accept;
* at startup (``config.on_startup``) puts a :class:`DaraManager` where Dara's code looks the
  manager up: ``utils_registry['WebsocketManager']`` and the ``TaskManager``'s own reference;
  serves the handlers registered with ``config.add_ws_handler``; starts the backplane;
* keeps Dara's registries (``websocket_registry``, ``sessions_registry``,
  ``session_auth_token_registry``) filled as Dara's handler does, and sets Dara's context
  variables (``WS_CHANNEL``, ``USER``, ``SESSION_ID``, ``ID_TOKEN``) per connection and, refreshed
  from the registry as Dara does, per handler call.

It relies on private Dara APIs, listed in ``docs/how-to/dara.md``; importing this module checks
the installed dara-core against the versions it is tested with and raises ``ImportError``
otherwise. Dara is imported lazily: the core never needs it.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_DARA", "DaraManager", "dara_authenticator", "dara_server_config", "install"]

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import replace
from importlib import metadata
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from dara_ws_core.auth import Identity
from dara_ws_core.config import ServerConfig
from dara_ws_core.custom import CustomHandler
from dara_ws_core.endpoint import DEFAULT_PATH, Endpoint
from dara_ws_core.exceptions import (
    AuthenticationFailed,
    BackplaneError,
    ConnectionClosed,
    SlowConsumer,
    UnknownChannel,
)
from dara_ws_core.handler import _DEFAULT, WebSocketHandler
from dara_ws_core.manager import WebsocketManager
from dara_ws_core.messages import (
    CustomServerMessage,
    DaraServerMessage,
    LoosePayload,
    ServerMessagePayload,
)
from dara_ws_core.transport import HandshakeRequest

logger = logging.getLogger("dara_ws_core.dara")

#: The dara-core versions this integration is tested with (the ``[dara]`` extra pins the same).
SUPPORTED_DARA = ">=1.30,<1.31"

#: Where the Dara session's decoded token travels in ``Identity.claims``.
_TOKEN_DATA = "dara_token_data"


def _check_dara_version() -> str:
    try:
        found = metadata.version("dara-core")
    except metadata.PackageNotFoundError:
        raise ImportError('dara_ws_core.integrations.dara needs dara-core: '
                          'pip install "dara-ws-core[dara]"', name="dara") from None
    if found.split(".")[:2] != ["1", "30"]:
        raise ImportError(f"dara_ws_core.integrations.dara supports dara-core {SUPPORTED_DARA} (it "
                          f"relies on private Dara APIs), but dara-core {found} is installed")
    return found


_check_dara_version()


def dara_server_config(**changes: Any) -> ServerConfig:
    """The drop-in's defaults: :class:`ServerConfig`'s, changed where they would break a working
    Dara app (Dara enforces none of these on the socket), then ``changes``.

    * ``idle_timeout=None``: Dara closes no idle socket (the stock client pings every 5 s, but
      a tab whose timers the browser throttles must not be cut off).
    * identity expiry is not enforced (the :class:`Identity` has no ``expires_at``): Dara checks
      the session at the handshake only, and renews tokens over HTTP while the socket stays open.
    * ``handler_timeout=300`` and ``request_timeout=300`` (instead of 60 and 30): Dara has no
      limit at all; these stay finite so that nothing waits forever.
    * ``outbox_messages=0``: Dara drops a per-user message when the user has no connection; a
      kept BackendStore patch replayed to a later connection could be applied out of turn.
    """
    defaults = ServerConfig(idle_timeout=None, handler_timeout=300.0, request_timeout=300.0,
                            outbox_messages=0)
    return replace(defaults, **changes)


async def dara_authenticator(request: HandshakeRequest) -> Identity:
    """Dara 1.30's handshake check: the ``dara_session_token`` cookie (an opaque session handle
    or a raw JWT), verified with Dara's ``verify_auth_token`` and the app's auth config. Raises
    ``AuthenticationFailed`` (HTTP 403, nothing created) when it is missing or rejected."""
    import jwt
    from dara.core.auth.definitions import SESSION_TOKEN_COOKIE_NAME, AuthError
    from dara.core.auth.session import verify_auth_token
    from dara.core.internal.registries import auth_registry

    token = request.cookies.get(SESSION_TOKEN_COOKIE_NAME)
    if not token:
        raise AuthenticationFailed(f"no {SESSION_TOKEN_COOKIE_NAME} cookie")
    try:
        data = await verify_auth_token(auth_registry.get("auth_config"), token)
    except (jwt.PyJWTError, AuthError) as exc:
        raise AuthenticationFailed(f"session rejected: {type(exc).__name__}") from exc
    return Identity(user_id=data.identity_id, session_id=data.session_id, token=token,
                    claims=MappingProxyType({_TOKEN_DATA: data}))


class DaraManager(WebsocketManager):
    """This library's manager with the calls, the silence and the registries Dara's code expects.

    * Messages go through Dara's own ``WebsocketManager._construct_message`` and its send-side
      rules (no ``__dara_telemetry``, no ``result`` in a task notification), then are encoded
      once by the core: the frames equal Dara's, as parsed JSON.
    * ``send_message`` to a channel that is gone (or closing, or dropped as a slow consumer)
      does nothing, as in Dara; ``send_and_wait`` to a channel that is not connected returns
      ``None``, as in Dara; but a pending one fails with ``ConnectionClosed`` at once when its
      client leaves, and with ``RequestTimeout`` after ``request_timeout``.
    * A fan-out whose backplane is unreachable is logged, not raised: Dara's callers never
      expected a send to fail.
    """

    async def send_message(
        self, channel_id: str, message: LoosePayload | BaseModel, custom: bool = False
    ) -> None:
        try:
            await super().send_message(channel_id, _from_dara(message, custom), custom)
        except (UnknownChannel, ConnectionClosed, SlowConsumer) as exc:
            logger.debug("message to a gone channel dropped (%s)", type(exc).__name__,
                         extra={"channel": channel_id})
        except BackplaneError:
            logger.warning("backplane unreachable: message dropped", extra={"channel": channel_id})

    async def broadcast(
        self, message: LoosePayload | BaseModel, custom: bool = False,
        ignore_channel: str | None = None,
    ) -> None:
        try:
            await super().broadcast(_from_dara(message, custom), custom, ignore_channel)
        except BackplaneError:
            logger.warning("backplane unreachable: broadcast reached this process only")

    async def send_message_to_user(
        self, user_id: str, message: LoosePayload | BaseModel, custom: bool = False,
        ignore_channel: str | None = None,
    ) -> bool:
        try:
            return await super().send_message_to_user(user_id, _from_dara(message, custom),
                                                      custom, ignore_channel)
        except BackplaneError:
            logger.warning("backplane unreachable: user message reached this process only",
                           extra={"user": user_id})
            return False

    async def send_and_wait(
        self, channel_id: str, message: LoosePayload | BaseModel, custom: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Any:
        try:
            return await super().send_and_wait(channel_id, _from_dara(message, custom), custom,
                                               timeout)
        except UnknownChannel:
            return None

    def create_handler(self, channel_id: str, identity: Identity | None = None,
                       **options: Any) -> WebSocketHandler:
        handler = super().create_handler(channel_id, identity, **options)
        if identity is not None and _TOKEN_DATA in identity.claims:
            _register(channel_id, identity)
            # The driver runs the connection in the task calling this: what Dara's handler set
            # once per connection, before its receive loop.
            _enter_context(channel_id, identity)
        return handler

    def remove_handler(self, channel_id: str, exc: ConnectionClosed | None = None, *,
                       writing: bool = False) -> None:
        handler = self.handlers.get(channel_id)
        super().remove_handler(channel_id, exc, writing=writing)
        if handler is not None and handler.identity is not None:
            _unregister(channel_id, handler.identity)


def _from_dara(message: Any, custom: bool) -> BaseModel:
    """A Dara message (its envelope or payload models, or a dict) as the core's envelope, built
    by Dara's own rules and serialized as Dara's send loop does (``jsonable_encoder``, which
    applies the app's registered encoders)."""
    from dara.core.internal.websocket import WebsocketManager as DaraWebsocketManager
    from fastapi.encoders import jsonable_encoder

    if isinstance(message, (DaraServerMessage, CustomServerMessage, ServerMessagePayload)):
        return message  # already ours: the core encodes it
    envelope = DaraWebsocketManager._construct_message(None, message, custom)
    envelope._transport_consumed = True  # telemetry travels in spans, never in the frame
    body: dict[str, Any] = jsonable_encoder(envelope)
    payload = body.get("message")
    if body.get("type") == "message" and isinstance(payload, dict) and (
        payload.get("task_id") is not None and payload.get("status")
    ):
        payload.pop("result", None)  # the client fetches task results over HTTP
    if body.get("type") == "custom":
        return CustomServerMessage.model_validate(body)
    return DaraServerMessage.model_validate(body)


def _registries() -> tuple[Any, Any, Any]:
    from dara.core.internal.registries import (
        session_auth_token_registry,
        sessions_registry,
        websocket_registry,
    )

    return websocket_registry, sessions_registry, session_auth_token_registry


def _register(channel_id: str, identity: Identity) -> None:
    """channel -> session -> user in Dara's registries, as Dara's ``ws_handler`` does."""
    channels, sessions, tokens = _registries()
    session, user = identity.session_id, identity.user_id
    channels.set(session, (channels.get(session) if channels.has(session) else set()) | {channel_id})
    tokens.set(session, identity.claims[_TOKEN_DATA])
    sessions.set(user, (sessions.get(user) if sessions.has(user) else set()) | {session})


def _unregister(channel_id: str, identity: Identity) -> None:
    """Undo :func:`_register`; unlike Dara, leave no empty set and no stale session behind."""
    channels, sessions, tokens = _registries()
    session, user = identity.session_id, identity.user_id
    if not channels.has(session):
        return
    remaining = channels.get(session) - {channel_id}
    if remaining:
        channels.set(session, remaining)
        return
    channels.remove(session)
    if tokens.has(session):
        tokens.remove(session)
    if sessions.has(user):
        others = sessions.get(user) - {session}
        if others:
            sessions.set(user, others)
        else:
            sessions.remove(user)


def _enter_context(channel_id: str, identity: Identity) -> None:
    """Set Dara's context variables for this channel, with the session's latest token (a token
    refreshed over HTTP updates ``session_auth_token_registry``)."""
    from dara.core.auth.definitions import ID_TOKEN, SESSION_ID, USER, UserData
    from dara.core.internal.websocket import WS_CHANNEL

    _, _, tokens = _registries()
    data = identity.claims[_TOKEN_DATA]
    if tokens.has(identity.session_id):
        data = tokens.get(identity.session_id)
    WS_CHANNEL.set(channel_id)
    USER.set(UserData(identity_id=data.identity_id, identity_name=data.identity_name,
                      identity_email=data.identity_email, groups=data.groups))
    SESSION_ID.set(data.session_id)
    ID_TOKEN.set(data.id_token)


def _with_dara_context(manager: WebsocketManager, func: CustomHandler) -> CustomHandler:
    """Wrap a Dara ws handler so that it runs with Dara's context variables of its channel."""

    def enter(channel_id: str) -> None:
        handler = manager.handlers.get(channel_id)
        if handler is not None and handler.identity is not None:
            _enter_context(channel_id, handler.identity)

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def run_async(channel_id: str, data: Any) -> Any:
            enter(channel_id)
            return await func(channel_id, data)

        return run_async

    @functools.wraps(func)
    def run(channel_id: str, data: Any) -> Any:
        enter(channel_id)
        return func(channel_id, data)

    return run


Scope = MutableMapping[str, Any]
ASGICall = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                    Awaitable[None]]


class _SocketMiddleware:
    """ASGI middleware (``config.add_middleware``): WebSocket requests for the socket's path go
    to the endpoint, everything else to Dara's app. Dara puts app middlewares outermost."""

    def __init__(self, app: ASGICall, *, endpoint: Endpoint, path: str) -> None:
        from dara_ws_asgi import ASGIApp

        self.app = app
        self.path = path
        self.serve = ASGIApp(endpoint)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]  # behind `dara start --base-url`
            if path == self.path:
                await self.serve(scope, receive, send)
                return
        await self.app(scope, receive, send)


#: The attribute ``install`` marks a ``ConfigurationBuilder`` with (its manager).
_INSTALLED = "_dara_ws_manager"


def install(
    config: Any,
    *,
    server_config: ServerConfig | None = None,
    backplane: Any = None,
    path: str = DEFAULT_PATH,
) -> DaraManager:
    """Serve the Dara app's WebSocket with this library; call it on the app's
    ``ConfigurationBuilder`` before the app starts. Returns the manager that stands in for
    Dara's (usable once the app has started).

    ``server_config`` defaults to :func:`dara_server_config`; ``backplane`` (for example a
    ``dara_ws_redis.RedisBackplane``) spreads the app's sends over every process sharing it,
    started with the app and stopped after its connections are closed.

    Raises ``RuntimeError`` when called again on the same ``config``: the first middleware would
    serve the socket while Dara sent through the second manager, which holds no connection.
    """
    if getattr(config, _INSTALLED, None) is not None:
        raise RuntimeError("install(config) was already called on this ConfigurationBuilder:"
                           " use the manager it returned")
    manager = DaraManager(server_config or dara_server_config(), backplane=backplane)
    setattr(config, _INSTALLED, manager)
    endpoint = Endpoint(manager, dara_authenticator, path=path)
    config.add_middleware(_SocketMiddleware, endpoint=endpoint, path=path)

    async def startup() -> Callable[[], Awaitable[None]]:
        from dara.core.internal.registries import custom_ws_handlers_registry, utils_registry

        from dara_ws_asgi.uvicorn import hook_uvicorn

        for kind, func in custom_ws_handlers_registry.get_all().items():
            manager.custom_handlers.unregister(kind)  # an app started again in this process
            manager.custom_handlers.register(kind, _with_dara_context(manager, func))
        utils_registry.set("WebsocketManager", manager)
        utils_registry.get("TaskManager").ws_manager = manager  # it keeps its own reference
        hook_uvicorn(endpoint)  # clients get 1001 and in-flight replies before uvicorn's 1012
        if backplane is not None:
            await backplane.start(manager)

        async def cleanup() -> None:
            await endpoint.shutdown()
            if backplane is not None:
                await backplane.stop()

        return cleanup

    config.on_startup(startup)
    return manager
