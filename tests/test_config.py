"""ServerConfig refuses, naming the field, what would otherwise fail far from its cause."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from dara_ws_core import ServerConfig


@pytest.mark.parametrize(
    ("field", "value", "error", "says"),
    [
        ("handshake_timeout", 0, ValueError, "handshake_timeout must be > 0"),  # every handshake failed
        ("rate_limit", 0, ValueError, "rate_limit must be >= 1 (or None)"),  # every client closed 1008
        ("max_connections_per_user", 0, ValueError, "max_connections_per_user must be >= 1"),
        ("ping_interval", 0, ValueError, "ping_interval must be > 0 (or None)"),
        ("ping_interval", -1, ValueError, "ping_interval must be > 0"),
        ("max_queue_bytes", "1", TypeError, "max_queue_bytes must be an int, not str"),
        ("send_timeout", float("nan"), ValueError, "send_timeout must be finite"),
        ("idle_timeout", float("inf"), ValueError, "idle_timeout must be finite (or None)"),
        ("close_timeout", True, TypeError, "close_timeout must be a number of seconds, not bool"),
        ("max_connections", 2.5, TypeError, "max_connections must be an int or None, not float"),
        ("outbox_messages", -1, ValueError, "outbox_messages must be >= 0"),
        ("shutdown_grace", -0.1, ValueError, "shutdown_grace must be >= 0"),
        ("slow_consumer_policy", "drop-oldest", ValueError,
         "slow_consumer_policy must be one of 'wait', 'drop_oldest', 'disconnect', not 'drop-oldest'"),
        ("forwarded_allow_ips", "10.0.0.0/33", ValueError, "forwarded_allow_ips: '10.0.0.0/33'"),
    ],
)
def test_a_value_no_server_could_run_with_is_refused_naming_its_field(
    field: str, value: Any, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=f"^ServerConfig.{re.escape(says)}"):
        ServerConfig(**{field: value})


def test_the_defaults_and_the_documented_offs_are_taken() -> None:
    config = ServerConfig(shutdown_grace=0, outbox_messages=0, ping_interval=None, send_timeout=None,
                          max_connections=None, handshake_timeout=0.5, close_timeout=1)
    assert config.close_timeout == 1 and config.outbox_messages == 0
    assert dataclasses.replace(ServerConfig(), rate_limit=5).rate_limit == 5
