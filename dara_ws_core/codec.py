"""The codec between frames and envelopes (protocol.md sections 2, 3 and 6). Pure.

Decoding a frame is one call (:func:`decode_client_frame`, one pydantic-core pass over the JSON,
after checks that bound what the frame may cost); encoding is one call (:func:`encode`, or
:func:`build_frame` for the loose payloads the manager accepts). Frames are ``bytes`` of UTF-8
JSON so a broadcast encodes once and every recipient's queue holds the same object, and they are
always strict JSON (RFC 8259), whatever the application or a peer hands over.
"""

from __future__ import annotations

__all__ = [
    "MAX_NESTING_DEPTH",
    "MAX_NUMBER_DIGITS",
    "MOST_STRINGS_LEFT_OUT",
    "NOT_UTF8",
    "PONG_FRAME",
    "AnswerFrame",
    "ClientFrame",
    "CustomBody",
    "CustomFrame",
    "PingFrame",
    "build_frame",
    "count_json_values",
    "decode_answer",
    "decode_client_frame",
    "decode_client_input",
    "decode_server_frame",
    "dumps",
    "encode",
    "held_text_bytes",
    "utf8_size_exceeds",
]

import functools
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr, Literal, TypedDict, cast

import pydantic_core
from pydantic_core import CoreConfig, SchemaValidator, ValidationError
from pydantic_core import core_schema as cs

from .exceptions import CloseCode, FrameTooLarge, InvalidFrame, InvalidMessage, ProtocolError

if TYPE_CHECKING:
    from pydantic import BaseModel, TypeAdapter

    from .messages import ClientMessage, LoosePayload, ServerMessage

# A server decodes client frames to plain dicts (below), and builds frames from dicts: pydantic
# itself, and the envelope models of dara_ws_core.messages, are imported only by what uses them
# (decode_client_frame, a model handed to build_frame or encode, the client). A server process
# that never meets a model starts without them: pydantic and the first model's schema are about
# 4 MiB of RSS (issue 14).


class PingFrame(TypedDict):
    """A decoded ``ping`` (:class:`~dara_ws_core.messages.ClientPing`)."""

    type: Literal["ping"]
    message: Any


class AnswerFrame(TypedDict):
    """A decoded answer or answer part (:class:`~dara_ws_core.messages.DaraClientMessage`)."""

    type: Literal["message"]
    channel: str
    chunk_count: int | None
    chunk_index: int | None
    message: Any


class CustomBody(TypedDict):
    """What a custom message carries (:class:`~dara_ws_core.messages.CustomClientMessagePayload`);
    ``rchan`` is read from the wire's ``__rchan``."""

    rchan: str | None
    kind: str
    data: Any


class CustomFrame(TypedDict):
    """A decoded custom message (:class:`~dara_ws_core.messages.CustomClientMessage`)."""

    type: Literal["custom"]
    message: CustomBody


#: A client frame as the server decodes it: the fields of the envelope models, without a model.
ClientFrame = PingFrame | AnswerFrame | CustomFrame


def _client_schema() -> cs.CoreSchema:
    """The client envelopes of protocol.md section 3, as the models of
    :mod:`~dara_ws_core.messages` validate them (tests/test_codec.py checks both agree), to dicts."""

    def optional(schema: cs.CoreSchema, alias: str | None = None) -> cs.TypedDictField:
        return cs.typed_dict_field(cs.with_default_schema(cs.nullable_schema(schema), default=None),
                                   validation_alias=alias)

    def tag(value: str) -> cs.TypedDictField:
        return cs.typed_dict_field(cs.literal_schema([value]))

    anything = cs.typed_dict_field(cs.with_default_schema(cs.any_schema(), default=None))
    body = cs.typed_dict_schema({"rchan": optional(cs.str_schema(), "__rchan"),
                                 "kind": cs.typed_dict_field(cs.str_schema()), "data": anything})
    return cs.tagged_union_schema({
        "ping": cs.typed_dict_schema({"type": tag("ping"), "message": anything}),
        "message": cs.typed_dict_schema({
            "type": tag("message"), "channel": cs.typed_dict_field(cs.str_schema()),
            "chunk_count": optional(cs.int_schema(strict=True)),
            "chunk_index": optional(cs.int_schema(strict=True)), "message": anything}),
        "custom": cs.typed_dict_schema({"type": tag("custom"), "message": cs.typed_dict_field(body)}),
    }, discriminator="type")


#: Frames are parsed without pydantic-core's string cache. The cache is process-wide (16384
#: strings) and, on by default, would keep the ids and values of peers' frames (every answer's
#: channel, every request's ``__rchan``: all distinct) alive after their connection closed, up to
#: about 1.5 MiB; ids are never looked up again, and parsing them is faster without the cache.
_NO_STRING_CACHE = CoreConfig(cache_strings=False)

_CLIENT_VALIDATOR = SchemaValidator(_client_schema(), _NO_STRING_CACHE)


def _adapter(union: Any) -> TypeAdapter[Any]:
    """A validator of ``union`` (a union of envelope models), told apart by their ``type``."""
    from typing import Annotated

    from pydantic import ConfigDict, Field, TypeAdapter

    from ._plugins import plugins_off

    with plugins_off():  # the core's own validator (see _plugins)
        return TypeAdapter(Annotated[union, Field(discriminator="type")],
                           config=ConfigDict(cache_strings=False))


@functools.cache
def _client_adapter() -> TypeAdapter[ClientMessage]:
    # The client envelopes as models, for decode_client_frame (not on a server's path).
    from .messages import ClientMessage

    return _adapter(ClientMessage)


@functools.cache
def _server_adapter() -> TypeAdapter[ServerMessage]:
    # Built on first use: only clients decode server frames, and the validator costs a server
    # process memory for nothing.
    from .messages import ServerMessage

    return _adapter(ServerMessage)


#: Outbound frames are strict JSON (RFC 8259) whatever the application hands us: a float that is
#: NaN or infinite becomes ``null``, as JavaScript's ``JSON.stringify`` does. ``NaN`` on the wire
#: would make the stock client's ``JSON.parse`` throw on the frame, and a broadcast would carry it
#: to every client.
_INF_NAN: Any = "null"


def dumps(value: Any) -> bytes:
    """Encode a plain value (dicts, lists, models inside) to strict JSON ``bytes``.

    The one JSON encoder of the library: every frame built from plain values goes through it.
    Raises ``pydantic_core.PydanticSerializationError`` for values JSON cannot carry (including
    strings with lone surrogates).
    """
    return _strict(pydantic_core.to_json(value, by_alias=True, inf_nan_mode=_INF_NAN))


def encode(message: BaseModel) -> bytes:
    """Encode an envelope model to a frame (UTF-8 JSON ``bytes``)."""
    return _strict(message.__pydantic_serializer__.to_json(message, by_alias=True))


def _strict(frame: bytes) -> bytes:
    # A model's own ``ser_json_inf_nan="constants"`` wins over ``inf_nan_mode``, for the model
    # and for everything inside it, wherever it sits in the value: such a frame carries the
    # constants. It is parsed back and re-encoded, which maps them to null. Both words may also
    # sit inside a string, which only the parse tells apart; a frame without them costs the scan.
    # find(), not ``in``: ``in`` on bytes first tries its operand as an integer (a byte value),
    # and CPython raises and clears a TypeError for it each time: a per-user send cost 71,400
    # instructions with ``in``, 69,000 with find() (callgrind, server side, websockets adapter).
    if (frame.find(b"NaN") >= 0 or frame.find(b"Infinity") >= 0) and not _is_strict_json(frame):
        value = pydantic_core.from_json(frame, allow_inf_nan=True, cache_strings=False)
        return pydantic_core.to_json(value, inf_nan_mode=_INF_NAN)
    return frame


#: What an adapter hands on for a text message that is not UTF-8, when it decodes the message only
#: once the core takes it (:func:`~dara_ws_core.transport.late_text`): not JSON, so the core refuses
#: it with 1007 (protocol.md section 6), in order, once the frames before it are answered; told
#: apart from other bad JSON by identity, for the close reason.
NOT_UTF8 = "\ufffd (not UTF-8)"

#: The pong frame never changes (:class:`~dara_ws_core.messages.PongMessage`, encoded).
PONG_FRAME: bytes = b'{"type":"pong","message":null}'

_ENVELOPE_TYPES = frozenset({"message", "custom"})


def build_frame(
    payload: LoosePayload | BaseModel,
    *,
    custom: bool = False,
    rchan: str | None = None,
) -> bytes:
    """Encode a loose payload in its envelope, in one pass and without building envelope models.

    ``custom=False``: ``{"type":"message", ["__typename":T,] "message": payload}``.
    ``custom=True``: ``{"type":"custom","message":{"kind":...,"data":...}}``; the payload must have a
    ``kind``. ``rchan`` makes it a request (``message.__rchan``).

    A model that is already a whole envelope is sent as it is (by alias, strict JSON), never
    wrapped twice: ours, or another library's (such as Dara's own ``DaraServerMessage``) whose
    serialized form has a ``message`` object and a top-level ``type`` of ``message`` or
    ``custom``; its top-level ``__typename`` is what the stock client routes on. An envelope
    states its own type: ``custom`` is not consulted for it.

    Raises ``TypeError`` for a payload that is neither a dict nor a model, for a model that looks
    like an envelope but is not a valid one (a top-level ``__typename`` without ``type``, or a
    ``message`` that is not an object); ``ValueError`` for a custom payload without ``kind``; and
    ``pydantic_core.PydanticSerializationError`` for values JSON cannot carry.
    """
    # A plain dict, the usual payload, is told apart first: isinstance() against BaseModel goes
    # through its metaclass's subclass check (about a microsecond per frame).
    if type(payload) is not dict and _is_model(payload):
        from .messages import (
            CustomServerMessage,
            CustomServerMessagePayload,
            DaraServerMessage,
            ServerMessagePayload,
        )

        if isinstance(payload, (DaraServerMessage, CustomServerMessage)):
            if rchan is not None:
                payload = payload.model_copy(
                    update={"message": payload.message.model_copy(update={"rchan": rchan})}
                )
            return encode(payload)
        if not isinstance(payload, ServerMessagePayload):
            body = cast("BaseModel", payload).model_dump(mode="python", by_alias=True)
            if _foreign_envelope(body, cast("BaseModel", payload)):
                if rchan is not None:
                    body["message"] = {**body["message"], "__rchan": rchan}
                return dumps(body)
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
            envelope["message"] = {**body, "__rchan": rchan}
        return dumps(envelope)
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict or a pydantic model, not {type(payload).__name__}")
    if custom and "kind" not in payload:
        raise ValueError("a custom payload needs a 'kind' key")
    if rchan is not None:
        payload = {**payload, "__rchan": rchan}
    # dumps(), inlined: one Python call less per frame built.
    return _strict(pydantic_core.to_json({"type": "custom" if custom else "message", "message": payload},
                                         by_alias=True, inf_nan_mode=_INF_NAN))


def _is_model(value: object) -> bool:
    """Whether ``value`` is a pydantic model; pydantic is not imported for it (if it is not
    imported yet, nothing is a model; nor while another thread imports it: its module is
    there before its ``BaseModel``)."""
    base = getattr(sys.modules.get("pydantic.main"), "BaseModel", None)
    return base is not None and isinstance(value, base)


def _foreign_envelope(body: dict[str, Any], model: BaseModel) -> bool:
    """Whether another library's model, serialized to ``body``, is a whole envelope (sent as it
    is) rather than a payload (wrapped). ``__typename`` may be dropped from ``body``."""
    if "message" not in body or not ("type" in body or "__typename" in body):
        return False  # a payload, which may well have a "message" or a "type" field of its own
    kind = body.get("type")
    if kind is None:
        raise TypeError(f"{type(model).__name__} has a top-level __typename and a message but no "
                        "type: neither an envelope nor a payload; add type='message'")
    if kind not in _ENVELOPE_TYPES:
        return False  # a payload with fields named type and message, e.g. {"type":"progress"}
    if not isinstance(body["message"], dict):
        raise TypeError(f"{type(model).__name__} looks like a {kind!r} envelope but its message "
                        f"is {type(body['message']).__name__}, not an object")
    if body.get("__typename", "") is None:
        del body["__typename"]  # absent on the wire for application messages (protocol.md 3)
    return True


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


#: How deep JSON may nest in a frame: the limit of pydantic-core's parser (jiter), which refuses
#: deeper documents before building anything. A frame nested deeper is closed with 1009.
MAX_NESTING_DEPTH = 201
#: Most digits of a number literal before its fraction: the limit of pydantic-core's parser,
#: which is CPython's default for converting text to an integer (``sys.int_info``). A frame
#: with a longer number is closed with 1009.
MAX_NUMBER_DIGITS = 4300


def count_json_values(text: str | bytes, exact_above: int | None = None) -> int:
    """An upper bound of the number of JSON values in ``text``, without parsing it.

    Every value but the first follows a comma or an opening bracket. Counted everywhere, in three
    scans in C (about 1 ms per MiB), commas and brackets inside strings count too: a frame holding
    one long text of comma-separated values (a CSV file, say) would count as thousands of values.
    So when that count is over ``exact_above``, the strings are left out first (a few more scans
    in C), and the count is exact for the structure. A text holding more than
    :data:`MOST_STRINGS_LEFT_OUT` strings, or that is not JSON, keeps the first count.
    """
    if isinstance(text, str):
        count = _structure(text, ",", "[", "{")
        if exact_above is None or count <= exact_above:
            return count
        outside = _outside_strings(text, '"', "\\", "")
        return count if outside is None else _structure(outside, ",", "[", "{")
    count = _structure(text, b",", b"[", b"{")
    if exact_above is None or count <= exact_above:
        return count
    outside_bytes = _outside_strings(text, b'"', b"\\", b"")
    return count if outside_bytes is None else _structure(outside_bytes, b",", b"[", b"{")


#: Most strings :func:`count_json_values` leaves out of its count: past it, a text keeps the
#: count of every comma and bracket. Leaving them out costs a copy of the text and an object per
#: string, so it is bounded (the copy is freed at once); a text of this many strings is mostly
#: short strings, not one long text.
MOST_STRINGS_LEFT_OUT = 32_768
#: Where a count that charges memory (a client's inbox, a chunked answer's parts), rather than
#: deciding a limit, leaves strings out: a text of fewer values is charged at most this many.
_EXACT_ABOVE = 1024


def _structure(text: AnyStr, comma: AnyStr, bracket: AnyStr, brace: AnyStr) -> int:
    return text.count(comma) + text.count(bracket) + text.count(brace) + 1


def _outside_strings(text: AnyStr, quote: AnyStr, backslash: AnyStr, empty: AnyStr) -> AnyStr | None:
    """``text`` without its JSON strings (each with its quotes), or ``None`` when it holds more
    than :data:`MOST_STRINGS_LEFT_OUT` of them or its quotes do not pair up (it is not JSON).

    Escapes go first, escaped backslashes then escaped quotes, each pair left to right as a JSON
    parser reads them: every quote left opens or closes a string. A parser reading the text sees
    the same strings up to its first error, if it has one, so what is left outside still bounds
    what it builds. Pure.
    """
    if quote not in text:
        return None  # no string: the quick count is exact
    if backslash in text:
        text = text.replace(backslash + backslash, empty).replace(backslash + quote, empty)
    quotes = text.count(quote)
    if quotes % 2 or quotes > 2 * MOST_STRINGS_LEFT_OUT:
        return None
    return empty.join(text.split(quote)[::2])


#: The fixed part of a ``str`` (``sys.getsizeof`` less its characters): an ASCII one's, and a
#: non-ASCII one's (less 1 to 3 bytes of its terminator, at 2 or 4 bytes a character).
_STR_HEADER = sys.getsizeof("")
_WIDE_HEADER = sys.getsizeof("\xe9") - 1


def held_text_bytes(value: Any) -> int:
    """What the strings in a decoded JSON ``value`` (object keys included) hold in memory,
    beyond an empty string's fixed part each: their characters at 1, 2 or 4 bytes each, as
    CPython stores a ``str`` (PEP 393), where UTF-8 takes 1 to 4 bytes a character. One
    character past U+FFFF makes a whole string 4 bytes a character: an ASCII text of N bytes
    with one emoji in it takes 4N bytes decoded. Walks the value (iteratively: JSON nests up to
    :data:`MAX_NESTING_DEPTH`); ``sys.getsizeof`` is exact for a ``str`` and costs no scan. It
    counts the UTF-8 copy a non-ASCII string keeps once it has been encoded (by :func:`dumps`,
    say): memory it holds too. Pure."""
    size = 0
    stack = [value]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            size += sys.getsizeof(item) - (_STR_HEADER if item.isascii() else _WIDE_HEADER)
        elif kind is dict:
            for key, inner in item.items():
                size += sys.getsizeof(key) - (_STR_HEADER if key.isascii() else _WIDE_HEADER)
                push(inner)
        elif kind is list:
            extend(item)
    return size


def decode_client_frame(
    frame: str | bytes, max_size: int | None = None, *, max_values: int | None = None
) -> ClientMessage:
    """Decode one client frame to its model (protocol.md sections 2 and 6).

    Outcomes, each with its own reason:

    * ``bytes`` means a *binary* frame: ``InvalidFrame`` with close code 1003;
    * more than ``max_size`` bytes of UTF-8: ``FrameTooLarge`` (1009);
    * more than ``max_values`` JSON values (counted before parsing: what a frame may cost in
      memory and decoding time), nested deeper than :data:`MAX_NESTING_DEPTH`, or holding a
      number of more than :data:`MAX_NUMBER_DIGITS` digits: ``FrameTooLarge`` (1009);
    * not JSON, not a JSON object, or holding a number that is not finite: ``NaN`` /
      ``Infinity`` (not JSON, though many encoders write them) or a literal beyond a double's
      range such as ``1e400`` (JSON's grammar allows it, but it cannot be carried on: echoed, it
      would silently become ``null``): ``InvalidFrame`` (1007);
    * an object of unknown ``type`` or with invalid fields: ``InvalidMessage`` (the frame is
      dropped, the connection stays open).

    Accepted though strict parsers refuse it: a string escape of a lone UTF-16 surrogate (which
    ``JSON.stringify`` writes for a lone surrogate in a browser string) decodes to U+FFFD, as the
    browser's own UTF-8 encoder would have turned it. Only the protocol's wire keys are read
    (``__rchan``, never an application key named ``rchan``).

    A frame the connection stays open for is parsed once (see :func:`decode_client_input`).
    The models are built from what the server's decoder gives (:data:`ClientFrame`).
    """
    decoded = _decode(frame, max_size, max_values, answers=False)
    assert not isinstance(decoded, tuple)  # answers=False: never an answer's pair
    model: ClientMessage = _client_adapter().validate_python(decoded, by_alias=False, by_name=True)
    return model


def decode_client_input(
    frame: str | bytes, max_size: int | None = None, *, max_values: int | None = None
) -> ClientFrame | tuple[str, Any]:
    """:func:`decode_client_frame` as a server decodes: to a :data:`ClientFrame` (the envelope's
    fields in dicts, no model), and a plain answer to a server request as :func:`decode_answer`
    gives it (``(channel, message)``), in the same parse.

    What a frame may cost the event loop is bounded by parses of it: a frame the connection
    stays open for (decoded, or dropped as an invalid message) is parsed once, whatever it
    holds: telling an answer from other frames, ``NaN`` from the word in a string, or a number
    beyond a double's range reuses the one parsed value, and lone surrogate escapes are
    replaced before the parse (a small frame, under ``_VALIDATE_JSON_MAX``, may be parsed
    twice for them). Only a frame that closes the connection may cost another parse, to name
    its fault. (Before, a frame holding ``"channel"``, the word ``NaN`` and a lone surrogate
    escape was parsed four times: 0.7 s of loop time for 16 MiB of long integers.)
    """
    if (type(frame) is str and (length := len(frame)) <= _VALIDATE_JSON_MAX and '"channel"' in frame
            and (max_size is None or length * 4 <= max_size)
            and (max_values is None or length <= max_values)):
        # A small frame naming a channel, the answer a requesting server gets for each request:
        # what _decode does for it (the size limits cannot be exceeded, nothing to repair
        # first: _decode_parsed), in this one frame, answer checks inline (four Python calls
        # less per answer).
        try:
            value = pydantic_core.from_json(frame, allow_inf_nan=False, cache_strings=False)
        except (ValueError, TypeError) as exc:
            return _unparsed(frame, exc, True, False)
        if type(value) is dict and value.get("type") == "message":  # _answer_of, inline
            channel = value.get("channel")
            if type(channel) is str and value.get("chunk_count") is None and value.get("chunk_index") is None:
                message = value.get("message")
                if type(message) is dict and len(message) <= _WALK_FIRST:  # _finite's first look
                    for item in message.values():
                        if type(item) in _MAY_HOLD_INFINITY:
                            break
                    else:
                        return channel, message
                if type(message) not in _MAY_HOLD_INFINITY or _finite(message, frame):
                    return channel, message
                raise InvalidFrame("a number beyond the range of a double")
        return _from_value(value, frame, True)
    return _decode(frame, max_size, max_values, answers=True)


#: Frames up to this size, holding none of the words that need a parsed value, are decoded in
#: one call of the validator (its own parse): the fastest way for the small frames of the hot
#: path. Larger ones are parsed first and validated from the value, so that every check reuses
#: it: what one more parse costs grows with the frame.
_VALIDATE_JSON_MAX = 4096


def _decode(frame: str | bytes, max_size: int | None, max_values: int | None, *,
            answers: bool) -> ClientFrame | tuple[str, Any]:
    if type(frame) is not str and isinstance(frame, (bytes, bytearray, memoryview)):
        raise InvalidFrame("binary frames are not supported", CloseCode.UNSUPPORTED_DATA)
    length = len(frame)
    if max_size is not None and length * 4 > max_size and utf8_size_exceeds(frame, max_size):
        raise FrameTooLarge(f"frame exceeds {max_size} bytes")
    if max_values is not None and length > max_values and count_json_values(frame, max_values) > max_values:
        raise FrameTooLarge(f"frame holds more than {max_values} JSON values")
    if (length > _VALIDATE_JSON_MAX or (answers and '"channel"' in frame)
            or "NaN" in frame or "Infinity" in frame):
        return _decode_parsed(frame, answers, False)
    try:
        message: ClientFrame = _CLIENT_VALIDATOR.validate_json(frame, by_alias=True, by_name=False)
    except ValidationError as exc:
        if frame is NOT_UTF8:
            raise InvalidFrame("text is not valid UTF-8") from None
        error = _classify(exc)
        if isinstance(error, _LoneSurrogate):
            return _decode_parsed(_replace_lone_surrogates(frame), answers, True)
        if isinstance(error, InvalidMessage):
            # Not a message we know, but a frame's own faults come first, as for a valid one:
            # 1e400 closes with 1007 whatever the envelope holds (this frame, small, holds no
            # NaN or Infinity).
            raise _not_strict(frame) or error from None
        raise error from None
    # A strict frame can only decode to an infinity from a literal beyond a double's range: a
    # small message (an answer, a ping) is walked at once, which decides exactly and costs less
    # than the scan; a bigger one is walked only if the scan finds a candidate literal.
    held = _infinity_within(message, _WALK_FIRST)
    if held is None:
        held = _may_overflow(frame) and _holds_infinity(message)
    if held:
        raise InvalidFrame("a number beyond the range of a double")
    return message


def _decode_parsed(frame: str, answers: bool, repaired: bool) -> ClientFrame | tuple[str, Any]:
    """:func:`_decode` for a frame parsed first (strict: ``NaN`` refused), then checked and
    validated from its value: one parse (the value reused), whatever the frame holds."""
    if (not repaired and len(frame) > _VALIDATE_JSON_MAX and ("\\ud" in frame or "\\uD" in frame)
            and frame.count("\\") <= _MAX_ESCAPES):
        # Perhaps a lone surrogate escape: replaced before the parse (a scan costs less than a
        # parse that fails at the end of the frame, then another one).
        frame, repaired = _ESCAPE.sub(_replace_escape, frame), True
    try:
        value = pydantic_core.from_json(frame, allow_inf_nan=False, cache_strings=False)
    except (ValueError, TypeError) as exc:
        return _unparsed(frame, exc, answers, repaired)
    return _from_value(value, frame, answers)


def _unparsed(frame: str, exc: ValueError | TypeError, answers: bool,
              repaired: bool) -> ClientFrame | tuple[str, Any]:
    """:func:`_decode_parsed` for a ``frame`` the strict parser refused with ``exc``."""
    if isinstance(exc, TypeError):  # a str holding a lone surrogate (in process): the validator's outcome
        return _validated(_CLIENT_VALIDATOR.validate_json, frame)
    error = _json_error(str(exc))
    if isinstance(error, _LoneSurrogate) and not repaired:
        return _decode_parsed(_replace_lone_surrogates(frame), answers, True)
    raise _refusal(frame, error) from None


def _from_value(value: Any, frame: str, answers: bool) -> ClientFrame | tuple[str, Any]:
    """:func:`_decode_parsed` for ``value``, parsed from ``frame``: checked and validated."""
    if answers and (answer := _answer_of(value)) is not None:
        if _finite(answer[1], frame):
            return answer
        raise InvalidFrame("a number beyond the range of a double")
    if not _finite(value, frame):
        raise InvalidFrame("a number beyond the range of a double")
    return _validated(_CLIENT_VALIDATOR.validate_python, value)


def _finite(value: Any, frame: str) -> bool:
    """Whether ``value``, parsed from ``frame`` as strict JSON, holds no infinity: what only a
    number literal beyond a double's range decodes to. The usual value, a few plain ones, is
    looked at here; a bigger one is walked only if a scan of ``frame`` finds a candidate."""
    kind = type(value)
    if kind is not dict and kind is not list and kind is not float:
        return True  # a string, an int, a bool or null
    if kind is dict and len(value) <= _WALK_FIRST:
        for item in value.values():
            if type(item) in _MAY_HOLD_INFINITY:
                break
        else:
            return True
    held = _infinity_in(value, _WALK_FIRST)
    if held is None:
        held = _may_overflow(frame) and _infinity_in(value, None)
    return not held


def _validated(validate: Callable[..., ClientFrame], data: Any) -> ClientFrame:
    """``validate(data)`` (the client validator's ``validate_json`` or ``validate_python``),
    its errors as the protocol's."""
    try:
        return validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise _classify(exc) from None


def _refusal(frame: str, error: ProtocolError) -> ProtocolError:
    """What closes the connection for a ``frame`` the strict parser refused with ``error``:
    the parser's own fault, unless the frame is JSON but for ``NaN`` / ``Infinity``, which get
    theirs. The connection closes: telling them apart may cost another parse, once."""
    if frame is NOT_UTF8:
        return InvalidFrame("text is not valid UTF-8")
    if type(error) is InvalidFrame and ("NaN" in frame or "Infinity" in frame):
        try:
            pydantic_core.from_json(frame, allow_inf_nan=True, cache_strings=False)
        except ValueError as exc:
            error = _json_error(str(exc))  # its first fault, counting the constants as JSON
        else:
            return InvalidFrame("NaN and Infinity are not JSON")
    return InvalidFrame("frame is not valid JSON") if isinstance(error, _LoneSurrogate) else error


def decode_answer(
    frame: str | bytes, max_size: int | None = None, *, max_values: int | None = None
) -> tuple[str, Any] | None:
    """The ``channel`` and ``message`` of a frame that is a plain answer to a server request,
    decoded without building a model; ``None`` for anything else, for
    :func:`decode_client_frame` to decide (:func:`decode_client_input` does both in one parse).

    An answer is the one frame a server that sends requests gets for each of them, so it has a
    path of its own: one parse of the JSON, strict (``NaN`` refused), then checks of the few
    keys that make an answer. It returns only what :func:`decode_client_frame` would decode the
    same way to a :class:`~dara_ws_core.messages.DaraClientMessage` without ``chunk_count``: a
    JSON object with ``type`` ``"message"``, a string ``channel``, ``chunk_count`` and
    ``chunk_index`` absent or null, within the size limits, holding no infinite number. Anything
    else, valid or not (a chunk, a ping, a bad frame), gets ``None`` and is decided by the full
    decoder with every outcome it has.
    """
    if type(frame) is not str:
        return None
    if max_size is not None and len(frame) * 4 > max_size and utf8_size_exceeds(frame, max_size):
        return None
    if max_values is not None and len(frame) > max_values and count_json_values(frame, max_values) > max_values:
        return None
    try:
        value = pydantic_core.from_json(frame, allow_inf_nan=False, cache_strings=False)
    except (ValueError, TypeError):  # TypeError: a str holding a lone surrogate (in process)
        return None
    answer = _answer_of(value)
    return answer if answer is not None and _finite(answer[1], frame) else None


def _answer_of(value: Any) -> tuple[str, Any] | None:
    """``(channel, message)`` of a parsed frame shaped as a plain answer (an object of ``type``
    ``"message"``, a string ``channel``, no ``chunk_count`` or ``chunk_index``), else ``None``.
    Its message is not yet checked for infinities."""
    if type(value) is not dict or value.get("type") != "message":
        return None
    channel = value.get("channel")
    if type(channel) is not str or value.get("chunk_count") is not None or value.get("chunk_index") is not None:
        return None
    return channel, value.get("message")


def _class_table() -> bytes:
    # Every byte to its class: digit -> 0, e/E -> e, + - . as themselves, letters, _ and
    # non-ASCII -> a, anything else (quotes, brackets, commas, spaces) -> a space.
    table = bytearray(b" " * 256)
    for byte in range(256):
        char = chr(byte)
        if char.isdigit() and byte < 128:
            table[byte] = ord("0")
        elif char in "eE":
            table[byte] = ord("e")
        elif char in "+-.":
            table[byte] = byte
        elif byte >= 128 or char.isalpha() or char == "_":
            table[byte] = ord("a")
    return bytes(table)


_CLASSES = _class_table()
#: The shortest run of digits a literal with an exponent of at most two digits needs to
#: overflow: 1.8e308 is beyond a double, so with ``e99`` the integer part needs 210 digits (and
#: without an exponent, 309).
_LONG_DIGITS = b"0" * 210
#: Candidates looked at one by one; past it, the frame is walked (bounded by max_values anyway).
_MAX_CANDIDATES = 64


def _may_overflow(frame: str) -> bool:
    """Whether ``frame`` may hold a number literal beyond a double's range: a standalone token
    with an exponent of three digits or more, or 210 digits in a row. Scans in C (a class map of
    the text, then substring searches: about 2 ns a character), then looks at each candidate's
    neighbours, so the uuid in every answer's channel (``...-4d3e412a-...``) is no candidate.
    A false positive only costs a walk of the decoded data."""
    text = frame.encode("utf-8", "surrogatepass").translate(_CLASSES)
    if _LONG_DIGITS in text:
        return True
    candidates = 0
    for marker in (b"e000", b"e+000"):
        at = text.find(marker)
        while at != -1:
            candidates += 1
            if candidates > _MAX_CANDIDATES or _standalone_number(text, at, len(marker)):
                return True
            at = text.find(marker, at + 1)
    return False


def _standalone_number(text: bytes, exponent: int, marker: int) -> bool:
    start = exponent - 1
    while start >= 0 and text[start] in b"0.":
        start -= 1
    if start == exponent - 1:
        return False  # no mantissa: a word such as "be000"
    if start >= 0 and text[start] == ord("-"):
        start -= 1
    if start >= 0 and text[start] != ord(" "):
        return False  # inside a word or an id
    end = exponent + marker
    while end < len(text) and text[end] == ord("0"):
        end += 1
    return end == len(text) or text[end] == ord(" ")


_INFINITIES = (float("inf"), float("-inf"))
#: The decoded JSON types that are, or may hold, an infinite float.
_MAY_HOLD_INFINITY = frozenset({float, dict, list})
#: Values of a decoded message walked before the scan of its frame decides instead.
_WALK_FIRST = 16


def _not_strict(frame: str) -> InvalidFrame | None:
    """The ``InvalidFrame`` (1007) for a frame that is JSON with NaN or Infinity, or that holds a
    number beyond a double's range; ``None`` for strict JSON (a frame without a model: the
    checks :func:`decode_client_frame` makes of a decoded message, on the raw value)."""
    if ("NaN" in frame or "Infinity" in frame) and not _is_strict_json(frame):
        return InvalidFrame("NaN and Infinity are not JSON")
    if _may_overflow(frame):
        try:
            value = pydantic_core.from_json(frame, allow_inf_nan=False, cache_strings=False)
        except (ValueError, TypeError):
            return None
        if _infinity_in(value, None):
            return InvalidFrame("a number beyond the range of a double")
    return None


def _holds_infinity(message: ClientFrame) -> bool:
    return bool(_infinity_within(message, None))


def _infinity_within(message: ClientFrame, budget: int | None) -> bool | None:
    """Whether the data of ``message`` holds an infinite float; ``None`` once more than
    ``budget`` values were looked at without deciding (``budget=None``: no limit)."""
    inner = message["message"]
    return _infinity_in(inner["data"] if message["type"] == "custom" else inner, budget)


def _infinity_in(value: Any, budget: int | None) -> bool | None:
    """Whether ``value`` (decoded JSON) holds an infinite float; ``None`` once more than
    ``budget`` values were looked at without deciding (``budget=None``: no limit)."""
    stack: list[Any] = [value]
    left = -1 if budget is None else budget
    while stack:
        if not left:
            return None
        left -= 1
        value = stack.pop()
        if type(value) is float:
            if value in _INFINITIES:
                return True
        elif type(value) is dict:
            stack.extend(value.values())
        elif type(value) is list:
            stack.extend(value)
    return False


def _is_strict_json(text: str | bytes) -> bool:
    # Both words may sit inside strings: only a parse that refuses the constants can tell.
    try:
        pydantic_core.from_json(text, allow_inf_nan=False, cache_strings=False)
    except ValueError:
        return False
    return True


#: An escaped surrogate pair (kept), a lone surrogate escape (replaced), or any other escape
#: (kept; matching it keeps the scan aligned, so ``\\ud800`` is a backslash and text).
_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\\.",
    re.DOTALL,
)
#: More escapes than this in a frame that needs surrogates replaced: refused (1007) rather than
#: rewritten, so one frame cannot cost the event loop more than a few milliseconds here.
_MAX_ESCAPES = 100_000


def _replace_escape(match: re.Match[str]) -> str:
    text = match.group()
    return "\\ufffd" if len(text) == 6 else text


def _replace_lone_surrogates(frame: str) -> str:
    if frame.count("\\") > _MAX_ESCAPES:
        raise InvalidFrame("lone surrogate escapes in a frame with too many escapes")
    return _ESCAPE.sub(_replace_escape, frame)


def decode_server_frame(frame: str | bytes) -> ServerMessage:
    """Decode one server frame (the client's side of the codec). Raises like the client decoder."""
    if isinstance(frame, bytes | bytearray | memoryview) and not isinstance(frame, bytes):
        frame = bytes(frame)
    try:
        return _server_adapter().validate_json(frame, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise _classify(exc) from None


class _LoneSurrogate(InvalidFrame):
    """Internal: the parser met a lone surrogate escape (the decoder replaces them, then retries)."""


def _json_error(detail: str) -> ProtocolError:
    """The error for text the parser refused, from its message (``detail``)."""
    if "recursion limit" in detail:
        return FrameTooLarge(f"JSON nested deeper than {MAX_NESTING_DEPTH} levels")
    if "surrogate" in detail or "hex escape" in detail:
        return _LoneSurrogate("lone surrogate escape")
    if "number out of range" in detail:
        # The parser refuses number literals of more than MAX_NUMBER_DIGITS digits, as
        # CPython refuses to convert longer ones (their conversion is quadratic): valid
        # JSON, refused as a cost, as deep nesting is.
        return FrameTooLarge(f"a number of more than {MAX_NUMBER_DIGITS} digits")
    return InvalidFrame("frame is not valid JSON")


def _classify(exc: ValidationError) -> ProtocolError:
    first = exc.errors(include_url=False, include_input=False)[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return _json_error(str(first.get("ctx", {}).get("error", "")))
    if loc == () and kind in ("dict_type", "model_type", "model_attributes_type"):
        return InvalidFrame("frame is not a JSON object")
    # Only the error's kind and location are kept: never echo peer input into logs verbatim.
    summary = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['type']}"
        for e in exc.errors(include_url=False, include_input=False)[:3]
    )
    return InvalidMessage(f"invalid message ({summary})")
