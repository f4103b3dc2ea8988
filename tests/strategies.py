"""Hypothesis strategies for the pure core: JSON values, every envelope model, raw bad frames.

Sizes are bounded so a default-profile run stays fast; the shapes follow protocol.md sections 2-3.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

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

# --------------------------------------------------------------------------- JSON values

#: Keys an application payload cannot carry as plain extras: the wire aliases are the payload's
#: own fields, and pydantic reserves the field names too (see test_messages for the known limit).
RESERVED_PAYLOAD_KEYS = frozenset({"__rchan", "__response_for", "rchan", "response_for"})

#: Texts of every kind, surrogates excluded (a WebSocket text frame is valid UTF-8).
texts = st.text(max_size=12)
ids = st.text(alphabet=string.ascii_letters + string.digits + "-_:", min_size=1, max_size=16)
uuids = st.uuids(version=4).map(str)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_keys = st.text(max_size=8)


def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=3) | st.dictionaries(json_keys, children, max_size=3)


#: Any JSON value, nesting and size bounded.
json_values = st.recursive(json_scalars, _json_containers, max_leaves=8)
#: Any JSON object.
json_objects = st.dictionaries(json_keys, json_values, max_size=4)
#: JSON values that are not objects.
json_non_objects = json_scalars | st.lists(json_values, max_size=4)
#: Extra keys of an application payload (``ServerMessagePayload``).
payload_extras = st.dictionaries(
    json_keys.filter(lambda k: k not in RESERVED_PAYLOAD_KEYS), json_values, max_size=4
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


# --------------------------------------------------------------------------- server payloads

iso_times = st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
sequence_numbers = st.integers(min_value=0, max_value=2**53)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

json_patches = st.lists(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]),
         "path": st.text(max_size=10).map(lambda p: "/" + p)},
        optional={"value": json_values, "from": st.text(max_size=10).map(lambda p: "/" + p)},
    ),
    max_size=4,
)


@st.composite
def task_notifications(draw: st.DrawFn) -> TaskNotificationMessage:
    status = draw(st.sampled_from(["PROGRESS", "COMPLETE", "ERROR", "CANCELED"]))
    fields: dict[str, Any] = {"status": status, "task_id": draw(ids)}
    if status == "PROGRESS":
        fields["progress"] = draw(finite_floats)
        fields["message"] = draw(texts)
    if status == "ERROR":
        fields["error"] = draw(texts)
    # ``result`` may be set on any status: it must never reach the wire.
    fields["result"] = draw(optional(json_values))
    return TaskNotificationMessage(**fields)


server_errors = st.builds(ServerErrorMessage, error=texts, time=iso_times)
variable_requests = st.builds(VariableRequestMessage, rchan=uuids, variable=json_values)
action_messages = st.builds(ActionMessage, action=json_values, uid=ids)
backend_stores = st.builds(
    BackendStoreMessage, store_uid=ids, value=json_values, sequence_number=sequence_numbers
)
backend_store_patches = st.builds(
    BackendStorePatchMessage, store_uid=ids, patches=json_patches, sequence_number=sequence_numbers
)
server_variables = st.builds(ServerVariableMessage, uid=ids, sequence_number=sequence_numbers)

#: The seven first-party payloads, one strategy per class.
TYPED_PAYLOADS: dict[type[TypedPayload], st.SearchStrategy[Any]] = {
    TaskNotificationMessage: task_notifications(),
    ServerErrorMessage: server_errors,
    VariableRequestMessage: variable_requests,
    ActionMessage: action_messages,
    BackendStoreMessage: backend_stores,
    BackendStorePatchMessage: backend_store_patches,
    ServerVariableMessage: server_variables,
}
typed_payloads: st.SearchStrategy[TypedPayload] = st.one_of(*TYPED_PAYLOADS.values())


@st.composite
def app_payloads(draw: st.DrawFn) -> ServerMessagePayload:
    """An application payload: any extra keys, optionally a request or a reply."""
    return ServerMessagePayload(
        rchan=draw(optional(uuids)), response_for=draw(optional(uuids)), **draw(payload_extras)
    )


error_infos = st.builds(ErrorInfo, code=ids, message=texts)


@st.composite
def custom_server_payloads(draw: st.DrawFn) -> CustomServerMessagePayload:
    """A custom push, request (``__rchan``), reply (``__response_for``) or error reply."""
    shape = draw(st.sampled_from(["push", "request", "reply", "error"]))
    return CustomServerMessagePayload(
        kind=draw(ids),
        data=None if shape == "error" else draw(json_values),
        rchan=draw(uuids) if shape == "request" else None,
        response_for=draw(uuids) if shape in ("reply", "error") else None,
        error=draw(error_infos) if shape == "error" else None,
    )


# --------------------------------------------------------------------------- server envelopes

init_messages = st.builds(lambda c: InitMessage(message=InitPayload(channel=c)), uuids)
pong_messages = st.just(PongMessage())
typed_server_messages = typed_payloads.map(DaraServerMessage.create)
app_server_messages = app_payloads().map(DaraServerMessage.create)
custom_server_messages = custom_server_payloads().map(
    lambda p: CustomServerMessage(message=p)
)
server_messages = st.one_of(
    init_messages,
    pong_messages,
    typed_server_messages,
    app_server_messages,
    custom_server_messages,
)

# --------------------------------------------------------------------------- client envelopes

client_pings = st.builds(ClientPing, message=st.none() | json_values)


@st.composite
def client_responses(draw: st.DrawFn) -> DaraClientMessage:
    """A response: plain, a Dara chunk (no index) or an indexed chunk **[ext]**."""
    shape = draw(st.sampled_from(["plain", "chunk", "indexed"]))
    count = None if shape == "plain" else draw(st.integers(min_value=1, max_value=50))
    index = draw(st.integers(min_value=0, max_value=count - 1)) if count and shape == "indexed" \
        else None
    return DaraClientMessage(
        channel=draw(uuids), chunk_count=count, chunk_index=index, message=draw(json_values)
    )


client_customs = st.builds(
    lambda kind, data, rchan: CustomClientMessage(
        message=CustomClientMessagePayload(kind=kind, data=data, rchan=rchan)
    ),
    ids,
    json_values,
    optional(uuids),
)
client_messages = st.one_of(client_pings, client_responses(), client_customs)

# --------------------------------------------------------------------------- raw frames


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


#: Text that is not JSON: junk, and valid objects cut short.
non_json_texts = st.one_of(
    st.text(max_size=30).filter(lambda t: not _is_json(t)),
    st.sampled_from(["", "{", "}", "{'type': 'ping'}", '{"type":"ping",}', "nope", "[1,", '"a']),
    json_objects.map(dumps).flatmap(
        lambda t: st.integers(min_value=0, max_value=len(t) - 1).map(lambda n: t[:n])
    ),
)
#: JSON text whose value is not an object (1007).
json_non_object_texts = json_non_objects.map(dumps)
#: Binary frames, including bytes that would be a valid message as text (1003).
binary_frames = st.one_of(
    st.binary(max_size=64),
    client_messages.map(lambda m: m.model_dump_json(by_alias=True).encode()),
)

CLIENT_TYPES = ("ping", "message", "custom")
_MISSING: Any = object()

#: Objects whose ``type`` is missing, not a string, or not a client type (server types included).
unknown_type_objects = st.builds(
    lambda extra, type_: {**extra, "type": type_} if type_ is not _MISSING else extra,
    json_objects.map(lambda d: {k: v for k, v in d.items() if k != "type"}),
    st.one_of(
        st.just(_MISSING),
        st.sampled_from(["init", "pong", "PING", "Message", "", "customs"]),
        texts.filter(lambda t: t not in CLIENT_TYPES),
        json_non_objects.filter(lambda v: not isinstance(v, str)),
    ),
)

#: Values no lax validation turns into a string (``channel``, ``kind``, ``__rchan``).
not_strings = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(json_scalars, max_size=2), st.dictionaries(json_keys, json_scalars, max_size=2),
)
#: Values no lax validation turns into an int (``chunk_count``, ``chunk_index``).
not_ints = st.one_of(
    st.sampled_from(["abc", "", "1.5", "one", "0x10"]),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.lists(json_scalars, min_size=1, max_size=2),
    st.dictionaries(json_keys, json_scalars, min_size=1, max_size=2),
)


@st.composite
def invalid_field_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A known client ``type`` with a missing or wrongly-typed field (InvalidMessage)."""
    case = draw(st.sampled_from([
        "response_no_channel", "response_bad_channel", "response_bad_count",
        "response_bad_index", "custom_no_message", "custom_message_not_object",
        "custom_no_kind", "custom_bad_kind", "custom_bad_rchan",
    ]))
    response: dict[str, Any] = {
        "type": "message", "channel": draw(uuids), "message": draw(json_values)
    }
    custom: dict[str, Any] = {"kind": draw(ids), "data": draw(json_values)}
    if case == "response_no_channel":
        del response["channel"]
        return response
    if case == "response_bad_channel":
        return {**response, "channel": draw(not_strings)}
    if case == "response_bad_count":
        return {**response, "chunk_count": draw(not_ints)}
    if case == "response_bad_index":
        return {**response, "chunk_count": 2, "chunk_index": draw(not_ints)}
    if case == "custom_no_message":
        return {"type": "custom"}
    if case == "custom_message_not_object":
        return {"type": "custom", "message": draw(json_non_objects)}
    if case == "custom_no_kind":
        del custom["kind"]
    elif case == "custom_bad_kind":
        custom["kind"] = draw(not_strings)
    else:
        custom["__rchan"] = draw(not_strings.filter(lambda v: v is not None))
    return {"type": "custom", "message": custom}

