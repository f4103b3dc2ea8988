"""A backplane option an operator got wrong is refused when the backplane is made, naming it.

Before, a zero, a negative, a NaN or a string was taken and failed later, far from its cause:
``socket_timeout=0`` made a start against a Redis that answers report "could not reach the
backplane within 5.0 s", ``max_spool=0`` started and then refused every kept send, a NaN
``heartbeat_interval`` failed the start with "cannot convert float NaN to integer", and a
negative or NaN ``backoff_*`` or ``stop_drain`` waited for nothing at the first outage or stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dara_ws_core import WebsocketManager
from dara_ws_redis import RedisBackplane
from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

NAN = float("nan")

BAD = [
    ("socket_timeout", 0, ValueError, "must be > 0"),
    ("socket_timeout", -1, ValueError, "must be > 0"),
    ("socket_timeout", NAN, ValueError, "must be finite"),
    ("heartbeat_interval", NAN, ValueError, "must be finite"),
    ("heartbeat_interval", "5", TypeError, "must be a number of seconds"),
    ("expiry", NAN, ValueError, "must be finite"),
    ("revoke_ttl", NAN, ValueError, "must be finite"),
    ("connect_timeout", 0, ValueError, "must be > 0"),
    ("backoff_initial", -1, ValueError, "must be > 0"),
    ("backoff_max", NAN, ValueError, "must be finite"),
    ("stop_drain", -1, ValueError, "must be >= 0"),
    ("stop_drain", NAN, ValueError, "must be finite"),
    ("max_spool", 0, ValueError, "must be >= 1"),
    ("max_spool_bytes", -1, ValueError, "must be >= 1"),
    ("max_outbox", 1.5, TypeError, "must be an int"),
    ("publish_window", 0, ValueError, "must be >= 1"),
]


@pytest.mark.parametrize(("option", "value", "error", "message"), BAD,
                         ids=[f"{o}={v!r}" for o, v, _, _ in BAD])
def test_a_wrong_backplane_option_is_refused_at_once_naming_it(
    redis_server: RedisServer, option: str, value: Any, error: type[Exception], message: str,
) -> None:
    with pytest.raises(error, match=rf"RedisBackplane\.{option} {message}"):
        RedisBackplane(redis_server.url, namespace="options", **{option: value})


async def test_the_options_refused_are_wrong_not_redis(redis_server: RedisServer) -> None:
    """The same Redis takes a backplane with the defaults, and a kept send goes through: what
    the test above refuses is the option, not the server."""
    backplane = RedisBackplane(redis_server.url, namespace="options", stop_drain=0)
    manager = WebsocketManager(backplane=backplane)
    async with asyncio.timeout(10):
        await backplane.start(manager)
        try:
            assert await manager.send_message_to_user("nobody", {"kept": True}) is True
            await backplane.flush()
            assert backplane.stats.kept == 1
        finally:
            await backplane.stop()
