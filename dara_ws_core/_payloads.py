"""The first-party payloads of Dara's server (protocol.md section 3), built on first use.

Exported by :mod:`dara_ws_core.messages` and the package root; the root imports this module the
first time one of these names is read through either: their validators cost a server that never
sends one memory for nothing.
"""

from __future__ import annotations

__all__ = [
    "ActionMessage",
    "BackendStoreMessage",
    "BackendStorePatchMessage",
    "ServerErrorMessage",
    "ServerVariableMessage",
    "TaskNotificationMessage",
    "VariableRequestMessage",
]

from typing import Any, Literal

from pydantic import Field

from ._plugins import plugins_off_until
from .messages import TypedPayload, _is_none

# Built without pydantic plugins, like every model of the core (see _plugins); restored at the end.
_restore_plugins = plugins_off_until()


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


_restore_plugins()
