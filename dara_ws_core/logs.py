"""One logger per connection, carrying who the record is about (websockets' ``LoggerAdapter``
pattern): every record a connection writes has ``channel``, ``user`` and ``transport`` attributes,
without an ``extra={...}`` at each call. ``docs/how-to/logging.md`` shows them in JSON logs.
"""

from __future__ import annotations

__all__ = ["ConnectionLogger"]

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any


class ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """A ``LoggerAdapter`` whose context (``channel``, ``user``, ``transport``, or ``path`` for a
    handshake) is merged with the ``extra`` of each call (``kind``, ``rchan``...), the call's
    keys winning. The standard adapter replaces the call's ``extra`` with its own before
    Python 3.13."""

    def __init__(self, logger: logging.Logger, context: Mapping[str, object]) -> None:
        super().__init__(logger, dict(context))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = self.extra if not extra else {**(self.extra or {}), **extra}
        return msg, kwargs
