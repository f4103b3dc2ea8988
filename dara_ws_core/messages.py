"""Message envelopes (protocol.md sections 2 and 3): the models of every frame, both ways.

Pure: no I/O, no event loop. Turning frames into these models and back is
:mod:`dara_ws_core.codec`'s job.

Wire notes:

* ``__rchan``, ``__response_for``, ``__typename`` and ``__error`` are left out of the JSON when
  ``None`` (section 3); all other ``None`` values are kept, including inside application payloads.
* First-party payloads carry their ``__typename`` as a class attribute; the stock client routes on
  the *top-level* ``__typename`` only.

The first-party payloads (``TaskNotificationMessage`` ... ``ServerVariableMessage``) are built on
first use of their names (PEP 562): a server that never sends one never builds their validators.
"""

from __future__ import annotations

__all__ = [
    "ActionMessage",
    "BackendStoreMessage",
    "BackendStorePatchMessage",
    "ClientMessage",
    "ClientPing",
    "CustomClientMessage",
    "CustomClientMessagePayload",
    "CustomServerMessage",
    "CustomServerMessagePayload",
    "DaraClientMessage",
    "DaraServerMessage",
    "ErrorInfo",
    "InitMessage",
    "InitPayload",
    "LoosePayload",
    "PongMessage",
    "ServerErrorMessage",
    "ServerMessage",
    "ServerMessagePayload",
    "ServerVariableMessage",
    "TaskNotificationMessage",
    "TypedPayload",
    "VariableRequestMessage",
]

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from ._plugins import plugins_off_until

if TYPE_CHECKING:  # through the root, which imports them on first use (see __getattr__)
    from dara_ws_core import (
        ActionMessage,
        BackendStoreMessage,
        BackendStorePatchMessage,
        ServerErrorMessage,
        ServerVariableMessage,
        TaskNotificationMessage,
        VariableRequestMessage,
    )

# Every model below is built without pydantic plugins (see _plugins); restored at the end.
_restore_plugins = plugins_off_until()


def _is_none(value: object) -> bool:
    return value is None


def _optional_alias(alias: str) -> Any:
    # An optional wire field that is left out of the JSON when None (protocol.md section 3).
    return Field(default=None, alias=alias, exclude_if=_is_none)


_CONFIG = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

# --------------------------------------------------------------------------- client -> server


class ClientPing(BaseModel):
    """``{"type":"ping","message":null}``: the stock client's 5 s heartbeat; answered with pong."""

    model_config = _CONFIG
    type: Literal["ping"] = "ping"
    message: Any = None


class DaraClientMessage(BaseModel):
    """A response to a server request (``send_and_wait``): ``channel`` is the request's ``__rchan``.

    With ``chunk_count`` it is one of N parts; ``chunk_index`` **[ext]** orders parts that may
    arrive out of order. Both are JSON integers or null, strictly: ``true`` or ``"2"`` is an
    invalid field (the frame is dropped, protocol.md section 6), never read as 1 or 2.
    """

    model_config = _CONFIG
    type: Literal["message"] = "message"
    channel: str
    chunk_count: int | None = Field(default=None, strict=True)
    chunk_index: int | None = Field(default=None, strict=True, exclude_if=_is_none)
    message: Any = None


class CustomClientMessagePayload(BaseModel):
    """Payload of a client custom message; ``rchan`` (``__rchan``) asks for a reply."""

    model_config = _CONFIG
    rchan: str | None = _optional_alias("__rchan")
    kind: str
    data: Any = None


class CustomClientMessage(BaseModel):
    """A custom message from the client, routed to the handler registered for its kind."""

    model_config = _CONFIG
    type: Literal["custom"] = "custom"
    message: CustomClientMessagePayload


ClientMessage = ClientPing | DaraClientMessage | CustomClientMessage

# --------------------------------------------------------------------------- server -> client


class ServerMessagePayload(BaseModel):
    """An application payload (extra keys allowed), optionally a request or a reply."""

    model_config = ConfigDict(extra="allow", **_CONFIG)
    rchan: str | None = _optional_alias("__rchan")
    response_for: str | None = _optional_alias("__response_for")


class TypedPayload(ServerMessagePayload):
    """Base of the first-party payloads; ``__typename__`` goes to the envelope's ``__typename``."""

    model_config = ConfigDict(extra="ignore", **_CONFIG)
    __typename__: ClassVar[str]


class DaraServerMessage(BaseModel):
    """A ``type: message`` frame: first-party (with ``__typename``) or application (without)."""

    model_config = _CONFIG
    type: Literal["message"] = "message"
    typename: str | None = _optional_alias("__typename")
    # SerializeAsAny: a first-party payload keeps its own fields (not just the base class's).
    message: SerializeAsAny[ServerMessagePayload]

    @classmethod
    def create(cls, payload: ServerMessagePayload) -> DaraServerMessage:
        """Wrap a payload, taking ``__typename`` from a first-party payload's class."""
        return cls(typename=getattr(payload, "__typename__", None), message=payload)


class ErrorInfo(BaseModel):
    """``__error`` **[ext]** of a failed custom request: a code and a message, no traceback."""

    model_config = _CONFIG
    code: str
    message: str


class CustomServerMessagePayload(ServerMessagePayload):
    kind: str
    data: Any = None
    error: ErrorInfo | None = _optional_alias("__error")


class CustomServerMessage(BaseModel):
    """A custom push, a custom request (``__rchan``) or a reply (``__response_for``)."""

    model_config = _CONFIG
    type: Literal["custom"] = "custom"
    message: SerializeAsAny[CustomServerMessagePayload]


class InitPayload(BaseModel):
    model_config = _CONFIG
    channel: str


class InitMessage(BaseModel):
    """Always the first frame after accept: the connection's new channel id."""

    model_config = _CONFIG
    type: Literal["init"] = "init"
    message: InitPayload


class PongMessage(BaseModel):
    model_config = _CONFIG
    type: Literal["pong"] = "pong"
    message: None = None


ServerMessage = InitMessage | PongMessage | DaraServerMessage | CustomServerMessage

#: What the manager's send methods accept: a plain dict or a payload model.
LoosePayload = dict[str, Any] | ServerMessagePayload

_restore_plugins()

#: Dara's first-party payloads: defined in ``dara_ws_core._payloads`` (on top of this module),
#: which the package root imports the first time one of these names is read (see the docstring).
_FIRST_PARTY = frozenset({
    "ActionMessage", "BackendStoreMessage", "BackendStorePatchMessage", "ServerErrorMessage",
    "ServerVariableMessage", "TaskNotificationMessage", "VariableRequestMessage",
})


def __getattr__(name: str) -> Any:
    if name not in _FIRST_PARTY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import dara_ws_core  # the root, which imports everything: not a cycle of the layers

    value = getattr(dara_ws_core, name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value
