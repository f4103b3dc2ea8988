"""Message envelopes (protocol.md sections 2 and 3) and the codec between frames and models.

Pure: no I/O, no event loop. Decoding a frame is one call (:func:`decode_client_frame`, one
pydantic-core pass over the JSON); encoding is one call (:func:`encode`, or :func:`build_frame` for
the loose payloads the manager accepts). Frames are ``bytes`` of UTF-8 JSON so a broadcast encodes
once and every recipient's queue holds the same object.

Wire notes:

* ``__rchan``, ``__response_for``, ``__typename`` and ``__error`` are left out of the JSON when
  ``None`` (section 3); all other ``None`` values are kept, including inside application payloads.
* First-party payloads carry their ``__typename`` as a class attribute; the stock client routes on
  the *top-level* ``__typename`` only.
"""

from __future__ import annotations

__all__ = [
    "PONG_FRAME",
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
    "build_frame",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    "utf8_size_exceeds",
]

from typing import Annotated, Any, ClassVar, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, TypeAdapter, ValidationError

from .exceptions import CloseCode, FrameTooLarge, InvalidFrame, InvalidMessage


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
    arrive out of order.
    """

    model_config = _CONFIG
    type: Literal["message"] = "message"
    channel: str
    chunk_count: int | None = None
    chunk_index: int | None = Field(default=None, exclude_if=_is_none)
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

_CLIENT_ADAPTER: TypeAdapter[ClientMessage] = TypeAdapter(
    Annotated[ClientMessage, Field(discriminator="type")]
)

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


class TaskNotificationMessage(TypedPayload):
    """Task status. ``result`` may be set but is never sent: the client fetches it over HTTP."""

    __typename__ = "TaskNotificationMessage"
    status: Literal["PROGRESS", "COMPLETE", "ERROR", "CANCELED"]
    task_id: str
    progress: float | None = Field(default=None, exclude_if=_is_none)
    message: str | None = Field(default=None, exclude_if=_is_none)
    error: str | None = Field(default=None, exclude_if=_is_none)
    result: Any = Field(default=None, exclude=True)


class ServerErrorMessage(TypedPayload):
    """A server-side error shown by the client. Put a message here, never a traceback."""

    __typename__ = "ServerErrorMessage"
    error: str
    time: str


class VariableRequestMessage(TypedPayload):
    """The first-party server request: the client answers with the variable's value."""

    __typename__ = "VariableRequestMessage"
    variable: Any = None


class ActionMessage(TypedPayload):
    """One step of an action stream; ``action=None`` marks its end."""

    __typename__ = "ActionMessage"
    action: Any = None
    uid: str


class BackendStoreMessage(TypedPayload):
    __typename__ = "BackendStoreMessage"
    store_uid: str
    value: Any = None
    sequence_number: int


class BackendStorePatchMessage(TypedPayload):
    __typename__ = "BackendStorePatchMessage"
    store_uid: str
    patches: list[dict[str, Any]]
    sequence_number: int


class ServerVariableMessage(TypedPayload):
    __typename__ = "ServerVariableMessage"
    type_: Literal["ServerVariable"] = Field(default="ServerVariable", alias="__type")
    uid: str
    sequence_number: int


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

_SERVER_ADAPTER: TypeAdapter[ServerMessage] = TypeAdapter(
    Annotated[ServerMessage, Field(discriminator="type")]
)

#: What the manager's send methods accept: a plain dict or a payload model.
LoosePayload = dict[str, Any] | ServerMessagePayload

# --------------------------------------------------------------------------- codec

_to_json = pydantic_core.to_json


def encode(message: BaseModel) -> bytes:
    """Encode an envelope model to a frame (UTF-8 JSON ``bytes``)."""
    return message.__pydantic_serializer__.to_json(message, by_alias=True)


#: The pong frame never changes: encode it once.
PONG_FRAME: bytes = encode(PongMessage())


def build_frame(
    payload: LoosePayload | BaseModel,
    *,
    custom: bool = False,
    rchan: str | None = None,
) -> bytes:
    """Encode a loose payload in its envelope, in one pass and without building envelope models.

    ``custom=False``: ``{"type":"message", ["__typename":T,] "message": payload}``.
    ``custom=True``: ``{"type":"custom","message":{"kind":...,"data":...}}``; the payload must have a
    ``kind``. ``rchan`` makes it a request (``message.__rchan``). Raises ``TypeError`` for a payload
    that is neither a dict nor a model, ``ValueError`` for a custom payload without ``kind``, and
    ``pydantic_core.PydanticSerializationError`` for values JSON cannot carry.
    """
    if isinstance(payload, BaseModel):
        if isinstance(payload, (DaraServerMessage, CustomServerMessage)):
            if rchan is not None:
                payload = payload.model_copy(
                    update={"message": payload.message.model_copy(update={"rchan": rchan})}
                )
            return encode(payload)
        if custom and not isinstance(payload, CustomServerMessagePayload):
            raise ValueError("custom=True needs a CustomServerMessagePayload or a dict with 'kind'")
        envelope: dict[str, Any] = {"type": "custom" if custom else "message"}
        typename = getattr(payload, "__typename__", None)
        if typename is not None and not custom:
            envelope["__typename"] = typename
        if rchan is None:
            envelope["message"] = payload
        elif isinstance(payload, ServerMessagePayload):
            envelope["message"] = payload.model_copy(update={"rchan": rchan})
        else:
            # Another model has no ``__rchan`` field: model_copy would drop it silently.
            body = payload.model_dump(mode="json", by_alias=True)
            envelope["message"] = {**body, "__rchan": rchan}
        return _to_json(envelope, by_alias=True)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict or a pydantic model, not {type(payload).__name__}")
    if custom and "kind" not in payload:
        raise ValueError("a custom payload needs a 'kind' key")
    if rchan is not None:
        payload = {**payload, "__rchan": rchan}
    return _to_json({"type": "custom" if custom else "message", "message": payload})


def utf8_size_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` is over ``limit`` bytes in UTF-8, as transport libraries count.

    A character is 1 to 4 bytes, so the text is encoded only when its length cannot decide.
    """
    length = len(text)
    if length > limit:
        return True
    if length * 4 <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def decode_client_frame(frame: str | bytes, max_size: int | None = None) -> ClientMessage:
    """Decode one client frame to its model (protocol.md sections 2 and 6).

    ``bytes`` means a *binary* frame: ``InvalidFrame`` with close code 1003. Raises
    ``FrameTooLarge`` (1009) above ``max_size`` bytes of UTF-8, ``InvalidFrame`` (1007) for text that
    is not JSON or not a JSON object, and ``InvalidMessage`` (the frame is dropped, the connection
    stays open) for an object of unknown ``type`` or with invalid fields.
    """
    if isinstance(frame, bytes | bytearray | memoryview):
        raise InvalidFrame("binary frames are not supported", CloseCode.UNSUPPORTED_DATA)
    if max_size is not None and utf8_size_exceeds(frame, max_size):
        raise FrameTooLarge(f"frame exceeds {max_size} bytes")
    try:
        return _CLIENT_ADAPTER.validate_json(frame)
    except ValidationError as exc:
        raise _classify(exc) from None


def decode_server_frame(frame: str | bytes) -> ServerMessage:
    """Decode one server frame (the client's side of the codec). Raises like the client decoder."""
    if isinstance(frame, bytes | bytearray | memoryview) and not isinstance(frame, bytes):
        frame = bytes(frame)
    try:
        return _SERVER_ADAPTER.validate_json(frame)
    except ValidationError as exc:
        raise _classify(exc) from None


def _classify(exc: ValidationError) -> InvalidFrame | InvalidMessage:
    first = exc.errors(include_url=False, include_input=False)[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return InvalidFrame("frame is not valid JSON")
    if loc == () and kind in ("dict_type", "model_type", "model_attributes_type"):
        return InvalidFrame("frame is not a JSON object")
    # Only the error's kind and location are kept: never echo peer input into logs verbatim.
    summary = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['type']}"
        for e in exc.errors(include_url=False, include_input=False)[:3]
    )
    return InvalidMessage(f"invalid message ({summary})")
