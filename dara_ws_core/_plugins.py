"""The core's own pydantic models and validators are built without pydantic plugins.

Pydantic loads every installed plugin (the ``pydantic`` entry point group) the first time any
process builds a validator, whoever builds it. ``logfire``, which ``dara-core`` depends on,
registers one whose import costs about 20 MiB of RSS (logfire, OpenTelemetry's SDK, ``requests``,
``rich``). Without this, a process that only imports the core pays that at start, for plugins that
would only instrument the validation of every frame.

The models of an application are untouched: its first model loads the plugins as before. An
explicit ``PYDANTIC_DISABLE_PLUGINS`` (even empty, which loads them all) is the application's
decision and is left as it is, for the core's models too.

The variable is process-wide while it is set: a model another thread builds meanwhile is built
without plugins too. It is set while the envelope models are first built (at their first use,
:mod:`dara_ws_core.messages`: a server that never meets a model never builds them), while Dara's
first-party payloads are, and around the first build of the model validators of the codec
(``decode_client_frame``, the client's first decode).
"""

from __future__ import annotations

__all__ = ["plugins_off", "plugins_off_until"]

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_VAR = "PYDANTIC_DISABLE_PLUGINS"
_OFF = "__all__"


def plugins_off_until() -> Callable[[], None]:
    """Turn pydantic plugins off for the validators built until the returned function is called
    (for a module body, which a ``with`` block would hide from the API documentation)."""
    if _VAR in os.environ:
        return _nothing
    os.environ[_VAR] = _OFF

    def restore() -> None:
        if os.environ.get(_VAR) == _OFF:
            del os.environ[_VAR]

    return restore


def _nothing() -> None:
    return None


@contextmanager
def plugins_off() -> Iterator[None]:
    """The same, as a context manager, around one build."""
    restore = plugins_off_until()
    try:
        yield
    finally:
        restore()
