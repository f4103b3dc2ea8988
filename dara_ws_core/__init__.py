"""dara-ws-core: the WebSocket messaging layer of Dara, transport-agnostic, on asyncio.

Layers, bottom up: ``messages`` / ``chunks`` / ``correlation`` (pure, no I/O), ``handler`` /
``manager`` / ``endpoint`` (asyncio), and transport adapters in separate packages
(``dara_ws_websockets``, ``dara_ws_aiohttp``, ``dara_ws_asgi``) that implement ``Transport``.

The client side (``DaraClient`` and its types), the in-memory transport and Dara's first-party
payloads (``TaskNotificationMessage`` and the like) are imported on first use of their names
(PEP 562): a server process that never uses them never loads them.
"""

from typing import TYPE_CHECKING, Any

from .auth import (
    SESSION_COOKIE,
    AnonymousIdentity,
    Authenticator,
    Identity,
    allow_anonymous,
    check_origin,
    extract_token,
    token_authenticator,
)
from .chunks import ChunkAssembler
from .codec import build_frame, decode_client_frame, decode_server_frame, encode
from .config import ServerConfig, SlowConsumerPolicy, connection_cap
from .connection import ServerConnection, State
from .correlation import PendingRequests
from .custom import CustomHandlerRegistry
from .endpoint import DEFAULT_PATH, Admission, ConnectionSlots, Endpoint, Evict, host_of, ws_handler
from .exceptions import (
    AuthenticationFailed,
    BackplaneError,
    ChunkError,
    CloseCode,
    ConnectionClosed,
    DaraWSError,
    EndpointClosed,
    FrameTooLarge,
    InvalidFrame,
    InvalidMessage,
    ProtocolError,
    RemoteError,
    RequestError,
    RequestTimeout,
    RevocationNotKept,
    SlowConsumer,
    TooManyPendingRequests,
    UnknownChannel,
    UnknownKind,
)
from .handler import WebSocketHandler, current_channel, current_identity
from .logs import quiet_accept_errors
from .manager import WebsocketManager, get_user_channels
from .outbox import OutboxLimits, UserOutbox
from .registry import ChannelRegistry
from .stats import ServerStats
from .transport import HandshakeRequest, Server, Transport

if TYPE_CHECKING:
    from ._payloads import (
        ActionMessage,
        BackendStoreMessage,
        BackendStorePatchMessage,
        ServerErrorMessage,
        ServerVariableMessage,
        TaskNotificationMessage,
        VariableRequestMessage,
    )
    from .client import Chunked, DaraClient, PushedMessage, Request
    from .memory import MemoryServer, MemoryTransport, memory_pair
    from .messages import (
        ClientMessage,
        ClientPing,
        CustomClientMessage,
        CustomClientMessagePayload,
        CustomServerMessage,
        CustomServerMessagePayload,
        DaraClientMessage,
        DaraServerMessage,
        ErrorInfo,
        InitMessage,
        LoosePayload,
        PongMessage,
        ServerMessage,
        ServerMessagePayload,
    )

__version__ = "0.2.0.dev0"

__all__ = [
    "DEFAULT_PATH",
    "SESSION_COOKIE",
    "ActionMessage",
    "Admission",
    "AnonymousIdentity",
    "AuthenticationFailed",
    "Authenticator",
    "BackendStoreMessage",
    "BackendStorePatchMessage",
    "BackplaneError",
    "ChannelRegistry",
    "ChunkAssembler",
    "ChunkError",
    "Chunked",
    "ClientMessage",
    "ClientPing",
    "CloseCode",
    "ConnectionClosed",
    "ConnectionSlots",
    "CustomClientMessage",
    "CustomClientMessagePayload",
    "CustomHandlerRegistry",
    "CustomServerMessage",
    "CustomServerMessagePayload",
    "DaraClient",
    "DaraClientMessage",
    "DaraServerMessage",
    "DaraWSError",
    "Endpoint",
    "EndpointClosed",
    "ErrorInfo",
    "Evict",
    "FrameTooLarge",
    "HandshakeRequest",
    "Identity",
    "InitMessage",
    "InvalidFrame",
    "InvalidMessage",
    "LoosePayload",
    "MemoryServer",
    "MemoryTransport",
    "OutboxLimits",
    "PendingRequests",
    "PongMessage",
    "ProtocolError",
    "PushedMessage",
    "RemoteError",
    "Request",
    "RequestError",
    "RequestTimeout",
    "RevocationNotKept",
    "Server",
    "ServerConfig",
    "ServerConnection",
    "ServerErrorMessage",
    "ServerMessage",
    "ServerMessagePayload",
    "ServerStats",
    "ServerVariableMessage",
    "SlowConsumer",
    "SlowConsumerPolicy",
    "State",
    "TaskNotificationMessage",
    "TooManyPendingRequests",
    "Transport",
    "UnknownChannel",
    "UnknownKind",
    "UserOutbox",
    "VariableRequestMessage",
    "WebSocketHandler",
    "WebsocketManager",
    "allow_anonymous",
    "build_frame",
    "check_origin",
    "connection_cap",
    "current_channel",
    "current_identity",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    "extract_token",
    "get_user_channels",
    "host_of",
    "memory_pair",
    "quiet_accept_errors",
    "token_authenticator",
    "ws_handler",
]

#: Names imported from their module on first access: what a server does not need.
_LAZY = {
    # The envelope models (pydantic), imported at their first use: a server decodes and builds
    # frames without them (see codec).
    "ClientMessage": "messages",
    "ClientPing": "messages",
    "CustomClientMessage": "messages",
    "CustomClientMessagePayload": "messages",
    "CustomServerMessage": "messages",
    "CustomServerMessagePayload": "messages",
    "DaraClientMessage": "messages",
    "DaraServerMessage": "messages",
    "ErrorInfo": "messages",
    "InitMessage": "messages",
    "LoosePayload": "messages",
    "PongMessage": "messages",
    "ServerMessage": "messages",
    "ServerMessagePayload": "messages",
    "Chunked": "client",
    "DaraClient": "client",
    "PushedMessage": "client",
    "Request": "client",
    "MemoryServer": "memory",
    "MemoryTransport": "memory",
    "memory_pair": "memory",
    # Dara's first-party payloads (also read through dara_ws_core.messages, which defers to here).
    "ActionMessage": "_payloads",
    "BackendStoreMessage": "_payloads",
    "BackendStorePatchMessage": "_payloads",
    "ServerErrorMessage": "_payloads",
    "ServerVariableMessage": "_payloads",
    "TaskNotificationMessage": "_payloads",
    "VariableRequestMessage": "_payloads",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
