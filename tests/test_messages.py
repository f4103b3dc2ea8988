"""Envelopes and codec (protocol.md sections 2, 3 and 6): round trips, wire shapes, bad input."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from dara_ws_core.codec import (
    PONG_FRAME,
    build_frame,
    decode_client_frame,
    decode_server_frame,
    encode,
)
from dara_ws_core.exceptions import (
    FrameTooLarge,
    InvalidFrame,
    InvalidMessage,
    ProtocolError,
)
from dara_ws_core.messages import (
    ActionMessage,
    BackendStoreMessage,
    BackendStorePatchMessage,
    ClientPing,
    CustomClientMessage,
    CustomClientMessagePayload,
    CustomServerMessage,
    CustomServerMessagePayload,
    DaraClientMessage,
    DaraServerMessage,
    ErrorInfo,
    InitMessage,
    InitPayload,
    PongMessage,
    ServerErrorMessage,
    ServerMessagePayload,
    ServerVariableMessage,
    TaskNotificationMessage,
    TypedPayload,
    VariableRequestMessage,
)

from . import strategies as S

NULL_ALIASES = ("__rchan", "__response_for", "__error")


def wire(frame: bytes | str) -> Any:
    return json.loads(frame)


# --------------------------------------------------------------------------- round trips


@given(S.server_messages)
def test_every_server_model_round_trips_through_decode_server_frame(message: BaseModel) -> None:
    frame = encode(message)
    assert isinstance(frame, bytes)
    decoded = decode_server_frame(frame)
    assert type(decoded) is type(message)
    assert wire(encode(decoded)) == wire(frame)
    # The client side receives text as often as bytes.
    assert wire(encode(decode_server_frame(frame.decode()))) == wire(frame)


@given(S.client_messages)
def test_every_client_model_round_trips_through_decode_client_frame(message: BaseModel) -> None:
    frame = encode(message)
    assert isinstance(frame, bytes)
    assert decode_client_frame(frame.decode()) == message


@pytest.mark.parametrize("cls", list(S.TYPED_PAYLOADS), ids=lambda c: c.__name__)
@given(data=st.data())
def test_each_first_party_payload_keeps_its_fields_and_typename(
    cls: type[TypedPayload], data: st.DataObject
) -> None:
    payload = data.draw(S.TYPED_PAYLOADS[cls])
    expected = payload.model_dump(mode="json", by_alias=True)
    assert expected, "a first-party payload always has fields on the wire"
    for frame in (encode(DaraServerMessage.create(payload)), build_frame(payload)):
        sent = wire(frame)
        assert sent == {"type": "message", "__typename": cls.__name__, "message": expected}
        decoded = decode_server_frame(frame)
        assert isinstance(decoded, DaraServerMessage)
        assert decoded.typename == cls.__name__
        assert decoded.message.model_dump(mode="json", by_alias=True) == expected


@given(S.typed_payloads | S.app_payloads())
def test_build_frame_of_a_payload_equals_encoding_its_envelope(
    payload: ServerMessagePayload,
) -> None:
    assert wire(build_frame(payload)) == wire(encode(DaraServerMessage.create(payload)))


@given(S.custom_server_payloads())
def test_build_frame_of_a_custom_payload_equals_encoding_its_envelope(
    payload: CustomServerMessagePayload,
) -> None:
    expected = wire(encode(CustomServerMessage(message=payload)))
    assert wire(build_frame(payload, custom=True)) == expected
    assert wire(build_frame(CustomServerMessage(message=payload))) == expected


# --------------------------------------------------------------------------- None on the wire


@given(S.server_messages)
def test_null_request_reply_and_typename_aliases_never_appear_on_the_wire(
    message: BaseModel,
) -> None:
    sent = wire(encode(message))
    assert sent.get("__typename", "absent") is not None
    if isinstance(message, DaraServerMessage) and message.typename is None:
        assert "__typename" not in sent
    body = sent["message"]
    if isinstance(body, dict):
        for alias in NULL_ALIASES:
            assert body.get(alias, "absent") is not None, alias


@given(S.payload_extras)
def test_none_values_of_application_payloads_are_kept(extras: dict[str, Any]) -> None:
    for payload in (extras, ServerMessagePayload(**extras)):
        assert wire(build_frame(payload)) == {"type": "message", "message": extras}


def test_none_inside_an_application_payload_is_kept_at_every_depth() -> None:
    extras = {"a": None, "b": [None, {"c": None}], "d": {"e": None}}
    for payload in (extras, ServerMessagePayload(**extras)):
        assert wire(build_frame(payload)) == {"type": "message", "message": extras}
        assert wire(build_frame(payload, rchan="r1"))["message"] == {**extras, "__rchan": "r1"}


def test_pong_carries_message_null() -> None:
    assert wire(PONG_FRAME) == {"type": "pong", "message": None}
    assert decode_server_frame(PONG_FRAME) == PongMessage()


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"message","channel":"r1","chunk_count":null,"message":null}',
        '{"type":"message","channel":"r1","message":null}',
        '{"type":"message","channel":"r1"}',
    ],
)
def test_a_plain_response_accepts_chunk_count_null_or_absent(frame: str) -> None:
    assert decode_client_frame(frame) == DaraClientMessage(channel="r1")


def test_a_plain_response_is_encoded_like_the_stock_client_writes_it() -> None:
    frame = encode(DaraClientMessage(channel="r1", message={"a": None}))
    assert wire(frame) == {"type": "message", "channel": "r1", "chunk_count": None,
                           "message": {"a": None}}


@pytest.mark.parametrize("frame", ['{"type":"ping","message":null}', '{"type":"ping"}'])
def test_a_ping_accepts_message_null_or_absent(frame: str) -> None:
    assert decode_client_frame(frame) == ClientPing()


def test_the_end_of_an_action_stream_keeps_action_null() -> None:
    sent = wire(build_frame(ActionMessage(action=None, uid="a1")))
    assert sent["message"] == {"action": None, "uid": "a1"}


def test_a_backend_store_value_of_none_is_kept() -> None:
    sent = wire(build_frame(BackendStoreMessage(store_uid="s", value=None, sequence_number=3)))
    assert sent["message"] == {"store_uid": "s", "value": None, "sequence_number": 3}


# --------------------------------------------------------------------------- wire shapes (3)

CHANNEL = "0b7c3c2e-56a6-4c1b-9b52-5d4f0e7f2a11"


# The examples of protocol.md section 3, as literal JSON, and what produces each.
SECTION_3: list[tuple[str, Any, str]] = [
    (
        "init",
        lambda: encode(InitMessage(message=InitPayload(channel=CHANNEL))),
        '{"type":"init","message":{"channel":"0b7c3c2e-56a6-4c1b-9b52-5d4f0e7f2a11"}}',
    ),
    ("pong", lambda: encode(PongMessage()), '{"type":"pong","message":null}'),
    (
        "typed message",
        lambda: build_frame(ActionMessage(action=None, uid="a1")),
        '{"type":"message","__typename":"ActionMessage","message":{"action":null,"uid":"a1"}}',
    ),
    ("message", lambda: build_frame({"x": [1, None]}), '{"type":"message","message":{"x":[1,null]}}'),
    (
        "request",
        lambda: build_frame({"x": 1}, rchan="r1"),
        '{"type":"message","message":{"x":1,"__rchan":"r1"}}',
    ),
    (
        "custom request",
        lambda: build_frame({"kind": "k", "data": 2}, custom=True, rchan="r1"),
        '{"type":"custom","message":{"kind":"k","data":2,"__rchan":"r1"}}',
    ),
    (
        "custom",
        lambda: build_frame(CustomServerMessagePayload(kind="k", data={"a": 1}), custom=True),
        '{"type":"custom","message":{"kind":"k","data":{"a":1}}}',
    ),
    (
        "custom reply",
        lambda: build_frame(
            CustomServerMessagePayload(kind="k", data=[1], response_for="r1"), custom=True
        ),
        '{"type":"custom","message":{"kind":"k","data":[1],"__response_for":"r1"}}',
    ),
    (
        "error",
        lambda: build_frame(
            CustomServerMessagePayload(
                kind="k",
                response_for="r1",
                error=ErrorInfo(code="unknown_kind", message="no handler"),
            ),
            custom=True,
        ),
        '{"type":"custom","message":{"kind":"k","data":null,"__response_for":"r1",'
        '"__error":{"code":"unknown_kind","message":"no handler"}}}',
    ),
]


@pytest.mark.parametrize(("make", "literal"), [c[1:] for c in SECTION_3], ids=[c[0] for c in SECTION_3])
def test_each_server_frame_has_the_exact_wire_shape_of_section_3(make: Any, literal: str) -> None:
    frame = make()
    assert wire(frame) == wire(literal)
    # Key order carries no meaning, but the codec keeps the documented order anyway.
    assert wire(decode_server_frame(literal).model_dump_json(by_alias=True)) == wire(literal)


TYPED_SHAPES: list[tuple[TypedPayload, dict[str, Any]]] = [
    (
        TaskNotificationMessage(status="PROGRESS", task_id="t1", progress=50, message="half"),
        {"status": "PROGRESS", "task_id": "t1", "progress": 50, "message": "half"},
    ),
    (
        TaskNotificationMessage(status="ERROR", task_id="t1", error="boom"),
        {"status": "ERROR", "task_id": "t1", "error": "boom"},
    ),
    (
        TaskNotificationMessage(status="CANCELED", task_id="t1"),
        {"status": "CANCELED", "task_id": "t1"},
    ),
    (
        ServerErrorMessage(error="bad", time="2024-01-02T03:04:05+00:00"),
        {"error": "bad", "time": "2024-01-02T03:04:05+00:00"},
    ),
    (
        VariableRequestMessage(rchan="r1", variable={"uid": "v1"}),
        {"__rchan": "r1", "variable": {"uid": "v1"}},
    ),
    (ActionMessage(action={"name": "x"}, uid="a1"), {"action": {"name": "x"}, "uid": "a1"}),
    (
        BackendStoreMessage(store_uid="s1", value=[1, 2], sequence_number=7),
        {"store_uid": "s1", "value": [1, 2], "sequence_number": 7},
    ),
    (
        BackendStorePatchMessage(
            store_uid="s1", patches=[{"op": "add", "path": "/a", "value": 1}], sequence_number=8
        ),
        {"store_uid": "s1", "patches": [{"op": "add", "path": "/a", "value": 1}],
         "sequence_number": 8},
    ),
    (
        ServerVariableMessage(uid="u1", sequence_number=2),
        {"__type": "ServerVariable", "uid": "u1", "sequence_number": 2},
    ),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    TYPED_SHAPES,
    ids=[f"{type(p).__name__}{getattr(p, 'status', '')}" for p, _ in TYPED_SHAPES],
)
def test_a_typed_message_has_the_exact_wire_shape(
    payload: TypedPayload, expected: dict[str, Any]
) -> None:
    shape = {"type": "message", "__typename": type(payload).__name__, "message": expected}
    assert wire(build_frame(payload)) == shape
    assert wire(encode(DaraServerMessage.create(payload))) == shape


@given(S.json_values)
def test_a_complete_task_notification_never_carries_its_result(result: Any) -> None:
    payload = TaskNotificationMessage(status="COMPLETE", task_id="t1", result=result)
    expected = {
        "type": "message",
        "__typename": "TaskNotificationMessage",
        "message": {"status": "COMPLETE", "task_id": "t1"},
    }
    assert wire(build_frame(payload)) == expected
    assert wire(encode(DaraServerMessage.create(payload))) == expected


def test_a_server_variable_message_is_marked_server_variable() -> None:
    sent = wire(build_frame(ServerVariableMessage(uid="u1", sequence_number=0)))
    assert sent["message"]["__type"] == "ServerVariable"
    assert sent["__typename"] == "ServerVariableMessage"


def test_an_application_message_has_no_typename() -> None:
    assert wire(build_frame({"x": 1})) == {"type": "message", "message": {"x": 1}}
    assert wire(encode(DaraServerMessage.create(ServerMessagePayload(x=1)))) == {
        "type": "message",
        "message": {"x": 1},
    }


# --------------------------------------------------------------------------- client frames (2)


def test_the_stock_client_frames_decode_to_their_models() -> None:
    assert decode_client_frame('{"type":"ping","message":null}') == ClientPing()
    assert decode_client_frame(
        '{"type":"message","channel":"r1","chunk_count":null,"message":{"v":1}}'
    ) == DaraClientMessage(channel="r1", message={"v": 1})
    assert decode_client_frame(
        '{"type":"message","channel":"r1","chunk_count":3,"message":"part"}'
    ) == DaraClientMessage(channel="r1", chunk_count=3, message="part")
    assert decode_client_frame(
        '{"type":"message","channel":"r1","chunk_count":3,"chunk_index":2,"message":"part"}'
    ) == DaraClientMessage(channel="r1", chunk_count=3, chunk_index=2, message="part")
    custom = decode_client_frame('{"type":"custom","message":{"kind":"k","data":[1,null]}}')
    assert isinstance(custom, CustomClientMessage)
    assert custom.message.kind == "k"
    assert custom.message.data == [1, None]
    assert custom.message.rchan is None
    request = decode_client_frame(
        '{"type":"custom","message":{"kind":"k","data":null,"__rchan":"c1"}}'
    )
    assert isinstance(request, CustomClientMessage)
    assert request.message.rchan == "c1"


def test_a_custom_request_encodes_its_rchan_and_leaves_it_out_when_null() -> None:
    request = CustomClientMessage(message=CustomClientMessagePayload(kind="k", rchan="c1"))
    assert wire(encode(request)) == {
        "type": "custom", "message": {"kind": "k", "data": None, "__rchan": "c1"},
    }
    push = CustomClientMessage(message=CustomClientMessagePayload(kind="k"))
    assert wire(encode(push)) == {"type": "custom", "message": {"kind": "k", "data": None}}


# --------------------------------------------------------------------------- build_frame


@given(S.json_objects, S.optional(S.uuids))
def test_build_frame_wraps_any_dict_unchanged(payload: dict[str, Any], rchan: str | None) -> None:
    before = json.dumps(payload)
    message = payload if rchan is None else {**payload, "__rchan": rchan}
    assert wire(build_frame(payload, rchan=rchan)) == {"type": "message", "message": message}
    assert json.dumps(payload) == before, "the caller's dict is never mutated"


@given(S.json_objects, S.ids, S.optional(S.uuids))
def test_build_frame_wraps_a_custom_dict_with_a_kind(
    payload: dict[str, Any], kind: str, rchan: str | None
) -> None:
    payload = {**payload, "kind": kind}
    message = payload if rchan is None else {**payload, "__rchan": rchan}
    assert wire(build_frame(payload, custom=True, rchan=rchan)) == {
        "type": "custom",
        "message": message,
    }


def test_build_frame_refuses_a_custom_payload_without_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_frame({"data": 1}, custom=True)
    with pytest.raises(ValueError, match="kind"):
        build_frame(ServerMessagePayload(data=1), custom=True)
    with pytest.raises(ValueError, match="kind"):
        build_frame(ActionMessage(uid="a"), custom=True)


@pytest.mark.parametrize("payload", [None, 1, "text", b"bytes", [1, 2], ("a",), {1, 2}])
def test_build_frame_refuses_a_payload_that_is_not_a_dict_or_model(payload: Any) -> None:
    with pytest.raises(TypeError):
        build_frame(payload)
    with pytest.raises(TypeError):
        build_frame(payload, custom=True, rchan="r1")


def test_build_frame_raises_for_values_json_cannot_carry() -> None:
    with pytest.raises(pydantic_core.PydanticSerializationError):
        build_frame({"x": object()})


@given(S.typed_payloads | S.app_payloads(), S.uuids)
def test_build_frame_injects_rchan_into_any_payload_model(
    payload: ServerMessagePayload, rchan: str
) -> None:
    original = payload.model_dump(by_alias=True)
    sent = wire(build_frame(payload, rchan=rchan))
    assert sent["message"]["__rchan"] == rchan
    assert {k: v for k, v in sent["message"].items() if k != "__rchan"} == {
        k: v for k, v in wire(build_frame(payload))["message"].items() if k != "__rchan"
    }
    assert payload.model_dump(by_alias=True) == original, "the payload is never mutated"


@given(S.server_messages.filter(lambda m: isinstance(m, DaraServerMessage | CustomServerMessage)),
       S.uuids)
def test_build_frame_injects_rchan_into_an_envelope(
    message: DaraServerMessage | CustomServerMessage, rchan: str
) -> None:
    sent = wire(build_frame(message, rchan=rchan))
    plain = wire(encode(message))
    assert sent["message"].pop("__rchan") == rchan
    plain["message"].pop("__rchan", None)
    assert sent == plain


def test_build_frame_injects_rchan_into_any_other_model() -> None:
    class Question(BaseModel):
        text: str
        extra: int | None = None

    sent = wire(build_frame(Question(text="?"), rchan="r1"))
    assert sent == {"type": "message", "message": {"text": "?", "extra": None, "__rchan": "r1"}}


# --------------------------------------------------------------------------- bad input (6)


@given(S.binary_frames)
def test_a_binary_frame_is_invalid_with_close_code_1003(frame: bytes) -> None:
    for data in (frame, bytearray(frame), memoryview(frame)):
        with pytest.raises(InvalidFrame) as info:
            decode_client_frame(data, max_size=1)  # type: ignore[arg-type]  # any bytes-like
        assert info.value.close_code == 1003


@given(S.non_json_texts | S.json_non_object_texts)
def test_text_that_is_not_a_json_object_is_invalid_with_close_code_1007(frame: str) -> None:
    with pytest.raises(InvalidFrame) as info:
        decode_client_frame(frame)
    assert info.value.close_code == 1007


@given(S.client_messages.map(lambda m: encode(m).decode()))
def test_a_frame_above_the_maximum_is_too_large_with_close_code_1009(frame: str) -> None:
    size = len(frame.encode())  # the limit counts UTF-8 bytes, as transport libraries do
    decode_client_frame(frame, max_size=size)
    with pytest.raises(FrameTooLarge) as info:
        decode_client_frame(frame, max_size=size - 1)
    assert info.value.close_code == 1009


def test_the_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(FrameTooLarge):
        decode_client_frame("x" * 100, max_size=10)


@given(S.unknown_type_objects | S.invalid_field_objects())
def test_an_object_of_unknown_type_or_invalid_fields_is_an_invalid_message(
    obj: dict[str, Any],
) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode_client_frame(S.dumps(obj))
    assert info.value.close_code is None, "the connection stays open"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"init","message":{"channel":"c"}}',
        '{"type":"pong","message":null}',
        '{"channel":"c","message":1}',
        '{"type":"message","message":1}',
        '{"type":"message","channel":"c","chunk_count":"many"}',
        # The chunk fields are integers, strictly: never read as 1 or 2 (protocol.md section 6).
        '{"type":"message","channel":"c","chunk_count":true,"message":1}',
        '{"type":"message","channel":"c","chunk_count":"2","message":1}',
        '{"type":"message","channel":"c","chunk_count":2.0,"message":1}',
        '{"type":"message","channel":"c","chunk_count":2,"chunk_index":"1","message":1}',
        '{"type":"message","channel":"c","chunk_count":2,"chunk_index":false,"message":1}',
        '{"type":"custom","message":{"data":1}}',
        '{"type":"custom","message":"k"}',
    ],
)
def test_known_bad_objects_are_invalid_messages(frame: str) -> None:
    with pytest.raises(InvalidMessage):
        decode_client_frame(frame)


SECRET = "s3cr3t-token-value"


@pytest.mark.parametrize(
    "frame",
    [
        f'{{"type":"{SECRET}"}}',
        f'{{"type":"message","channel":["{SECRET}"]}}',
        f'{{"type":"custom","message":{{"kind":{{"{SECRET}":1}}}}}}',
        f'{{"type":"message","channel":"c","chunk_count":"{SECRET}"}}',
        f"{SECRET} is not json",
        f'["{SECRET}"]',
    ],
)
def test_a_decoding_error_never_echoes_the_peers_input(frame: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(frame)
    assert SECRET not in str(info.value)


any_text = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40),
    S.non_json_texts,
    S.json_non_object_texts,
    S.json_objects.map(S.dumps),
    (S.unknown_type_objects | S.invalid_field_objects()).map(S.dumps),
    S.client_messages.map(lambda m: encode(m).decode()),
    S.server_messages.map(lambda m: encode(m).decode()),
)


@given(any_text, S.optional(st.integers(min_value=0, max_value=200)))
def test_any_text_decodes_to_a_model_or_raises_a_protocol_error(
    frame: str, max_size: int | None
) -> None:
    try:
        message = decode_client_frame(frame, max_size=max_size)
    except (InvalidFrame, InvalidMessage, FrameTooLarge):
        return
    assert isinstance(message, ClientPing | DaraClientMessage | CustomClientMessage)


# --------------------------------------------------------------------------- known limit


def test_an_application_key_named_rchan_is_not_a_request() -> None:
    decoded = decode_server_frame(build_frame({"rchan": "x", "response_for": "y"}))
    assert isinstance(decoded, DaraServerMessage)
    assert decoded.message.rchan is None
    assert decoded.message.response_for is None
