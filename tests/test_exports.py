"""The public namespace: every module declares ``__all__``, and the package root re-exports the
public API (as websockets' ``tests/test_exports.py`` checks its own)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import pytest

import dara_ws_core

#: Modules used through their own namespace, never from the root: the backplane
#: (``from dara_ws_core.backplane import ...``, implemented in ``dara_ws_redis``) and the optional
#: JWT authenticator (``from dara_ws_core.jwt import jwt_authenticator``).
NAMESPACED_MODULES = frozenset({"backplane", "jwt"})

#: Names a module exports for the other modules or for adapters, and that the root leaves out.
NOT_REEXPORTED: dict[str, frozenset[str]] = {
    # Who shares a per-user bound: for the handler and the manager.
    "auth": frozenset({"Holder", "holder_of", "run_authenticator"}),
    "client": frozenset({"Connector"}),
    # The connection's events are read through their module, like h11's events.
    "connection": frozenset({"AnswerIgnored", "CloseConnection", "CustomReceived", "Event", "HandlingTally",
                             "HANDLING_ADDRESS_SHARES", "HANDLING_SHARES", "PROCESS_HANDLING", "FrameDropped",
                             "RequestCompleted", "RequestFailed", "SendFrame"}),
    "correlation": frozenset({"CHUNK_ADDRESS_SHARES", "CHUNK_SHARES", "PART_BYTES", "PART_VALUES", "PROCESS_CHUNKS",
                              "ChunkBudget", "Completed", "Failed", "Ignored", "Outcome", "Partial", "new_rchan"}),
    "custom": frozenset({"CustomHandler", "DispatchHost", "HandlerSpec", "HandlerThreads"}),
    "driver": frozenset({"ConnectionDriver", "close_quietly"}),
    # Hooks are registered with WebsocketManager.on_connect / on_disconnect; their types are read
    # through the module, like custom's.
    "lifecycle": frozenset({"DISCONNECT_ADDRESS_SHARES", "ConnectHook", "ConnectionHooks", "DisconnectHook", "Hook"}),
    "handler": frozenset({"Sink"}),
    "codec": frozenset({"MAX_NESTING_DEPTH", "MAX_NUMBER_DIGITS", "MOST_STRINGS_LEFT_OUT", "NOT_UTF8", "PONG_FRAME",
                        "count_json_values", "decode_answer", "decode_client_input", "dumps", "held_text_bytes",
                        "utf8_size_exceeds",
                        # What a server decodes a client frame to (decode_client_input), no model.
                        "AnswerFrame", "ClientFrame", "CustomBody", "CustomFrame", "PingFrame"}),
    "messages": frozenset({"InitPayload", "TypedPayload"}),
    # RepeatedRecords: for the adapters, on their libraries' loggers.
    "logs": frozenset({"ConnectionLogger", "RepeatedRecords"}),
    "queue": frozenset({"ADDRESS_SHARES", "BURST", "PROCESS_QUEUED", "TOTAL_SHARES", "OutboundQueue", "QueuedBytes",
                        "address_queued"}),
    # The per-user history's bookkeeping, shared by the manager and the backplanes.
    "outbox": frozenset({"ADDRESS_SHARES", "HISTORY_SHARES", "SENDER_SHARES", "SENDER_SMALL", "BusRefusals",
                         "ClosedWrites", "DeliveryCursors", "QueuedMarks", "Stamped", "WriteLog", "WrittenRun",
                         "address_of",
                         "anonymous_sender", "id_key", "sender_of"}),
    # Imported from its module, like the [jwt] extra's helpers: it needs the [otel] extra.
    "telemetry": frozenset({"instrument"}),
    # What instrument() installs: the [otel] extra's hooks, never used directly.
    "telemetry_hooks": frozenset({"DaraTelemetry", "TimedQueue", "TimedSink", "frame_type"}),
    # The manager's running totals and the transport label are read through the snapshot.
    "stats": frozenset({"Counters", "collect", "transport_label"}),
    # Test helpers are imported from dara_ws_core.testing, as websockets' are.
    "testing": frozenset({"ProtocolHarness", "answer_frames", "client_frames", "custom_frames",
                          "hostile_frames", "json_values"}),
    # The one check of an opening request, for the adapters (protocol.md section 5).
    "upgrade": frozenset({"MAX_HEADERS", "MAX_HEADER_LINE", "NOT_FOUND", "UNPARSABLE", "Refusal", "RequestLine",
                          "Target", "check_target", "check_upgrade_request", "connection_upgrades", "loose_line_ends",
                          "normalize_path", "parse_request_line", "read_target", "refusal_of_request_line"}),
    # The socket adapters' TLS listener, counting sockets from their TCP accept.
    "tls": frozenset({"CountedTLS"}),
    # TrustedProxies: what ServerConfig.forwarded_allow_ips is read as, for the endpoint.
    "transport": frozenset({"ClientFrameHeaders", "FRAMES_PER_FEED_FLOOR", "MAX_PIPELINED", "NOT_UTF8",
                            "PARSED_PER_TURN", "PROCESS_RECEIVING",
                            "TurnShares",
                            # For adapters: asyncio protocols that read into one buffer.
                            "READ_BUFFER_SIZE", "SharedBufferReads",
                            "RECEIVING_ADDRESS_SHARES", "RECEIVING_RESERVE", "RECEIVING_SHARES", "RECEIVING_SMALL",
                            "ReceivingBudget", "ReceivingCharge", "RequestHead", "TrustedProxies", "address_key",
                            "close_frame_error", "SupportsCork", "SupportsDisconnected", "SupportsPush",
                            "SupportsSendNowait", "SupportsWriter", "HoldsFrames", "end_after_held",
                            "feed_held_later", "held_behind_request", "hold_behind_request", "late_text",
                            "read_behind_request", "parse_cookies", "sendable_close_code", "supports",
                            "text_frame_header"}),
}

#: Names a subpackage's module exports for its siblings, and that the subpackage leaves out.
NOT_REEXPORTED_BY_SUBPACKAGE: dict[str, frozenset[str]] = {
    "backplane.node": frozenset({"BatchRefused", "cancel_task", "wait_event"}),
    # An integration is imported by name only: importing dara_ws_core.integrations must not
    # check for (or need) every framework.
    "integrations.dara": frozenset({"DaraManager", "SUPPORTED_DARA", "dara_authenticator",
                                    "dara_server_config", "install"}),
}

#: Root attributes that are not names of a submodule.
ROOT_ONLY = frozenset({"__version__"})


def public_modules() -> dict[str, ModuleType]:
    return {
        info.name: importlib.import_module(f"dara_ws_core.{info.name}")
        for info in pkgutil.iter_modules(dara_ws_core.__path__)
        if not info.name.startswith("_")
    }


MODULES = public_modules()


def subpackage_modules() -> dict[str, ModuleType]:
    """``"package.module"`` -> module, for the modules of the core's subpackages."""
    found = {}
    for package_name, package in MODULES.items():
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            name = f"{package_name}.{info.name}"
            found[name] = importlib.import_module(f"dara_ws_core.{name}")
    return found


SUBMODULES = subpackage_modules()


def isort_key(name: str) -> tuple[int, list[int | str]]:
    """ruff RUF022's "isort-style" order: CONSTANTS, then Classes, then the rest, naturally."""
    bare = name.lstrip("_")
    if bare.upper() == bare and any(c.isalpha() for c in bare) and len(bare) > 1:
        group = 0
    elif bare[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return group, natural


def test_every_name_of_the_root_all_exists() -> None:
    missing = [name for name in dara_ws_core.__all__ if not hasattr(dara_ws_core, name)]
    assert missing == []


def test_star_import_gives_exactly_the_root_all() -> None:
    namespace: dict[str, object] = {}
    exec("from dara_ws_core import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(dara_ws_core.__all__)


@pytest.mark.parametrize("module", [dara_ws_core, *MODULES.values()], ids=lambda m: m.__name__)
def test_all_is_declared_unique_sorted_and_resolvable(module: ModuleType) -> None:
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} declares no __all__"
    assert isinstance(names, list)
    assert len(set(names)) == len(names), "duplicates in __all__"
    assert names == sorted(names, key=isort_key), "__all__ is not sorted (ruff RUF022 order)"
    assert [name for name in names if not hasattr(module, name)] == []


@pytest.mark.parametrize(
    "name", sorted(set(MODULES) - NAMESPACED_MODULES), ids=lambda name: name
)
def test_the_root_reexports_each_modules_public_names(name: str) -> None:
    module = MODULES[name]
    left_out = NOT_REEXPORTED.get(name, frozenset())
    assert left_out <= set(module.__all__), f"stale NOT_REEXPORTED entries for {name}"
    missing = sorted(set(module.__all__) - left_out - set(dara_ws_core.__all__))
    assert missing == [], (
        f"re-export {missing} from dara_ws_core, or list them in NOT_REEXPORTED[{name!r}]"
    )
    for export in set(module.__all__) - left_out:
        assert getattr(dara_ws_core, export) is getattr(module, export), export


def test_every_root_name_comes_from_exactly_one_module() -> None:
    for export in set(dara_ws_core.__all__) - ROOT_ONLY:
        value = getattr(dara_ws_core, export)
        owners = [
            name for name, module in MODULES.items()
            if export in module.__all__ and getattr(module, export) is value
        ]
        assert len(owners) == 1, f"{export} is exported by {owners or 'no module'}"


def test_namespaced_and_left_out_names_name_real_modules() -> None:
    assert set(NOT_REEXPORTED) <= set(MODULES)
    assert NAMESPACED_MODULES.isdisjoint(NOT_REEXPORTED)


def test_the_backplane_is_a_package_with_its_modules() -> None:
    assert {"backplane.contract", "backplane.wire", "backplane.broker",
            "backplane.memory"} <= set(SUBMODULES)


@pytest.mark.parametrize("name", sorted(SUBMODULES), ids=lambda name: name)
def test_each_subpackage_module_declares_all_and_its_package_reexports_it(name: str) -> None:
    module = SUBMODULES[name]
    test_all_is_declared_unique_sorted_and_resolvable(module)
    package = MODULES[name.partition(".")[0]]
    left_out = NOT_REEXPORTED_BY_SUBPACKAGE.get(name, frozenset())
    assert left_out <= set(module.__all__), f"stale NOT_REEXPORTED_BY_SUBPACKAGE entries for {name}"
    missing = sorted(set(module.__all__) - left_out - set(package.__all__))
    assert missing == [], f"re-export {missing} from {package.__name__}"
    for export in set(module.__all__) - left_out:
        assert getattr(package, export) is getattr(module, export), export
