"""Layering, read from the source with ``ast``: the core imports no transport library, optional
extras are imported inside functions only, each adapter imports its own library only, the pure
modules import nothing that does I/O, and the core's own import graph has no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "dara_ws_core"
TRANSPORTS = ROOT / "transports"

#: Network libraries: never imported by the core, not even lazily (the adapters wrap them).
TRANSPORT_LIBRARIES = frozenset({"websockets", "aiohttp", "starlette", "uvicorn", "socketio",
                                 "redis"})
#: Optional extras of the core: imported inside a function of the one module that needs them.
OPTIONAL_EXTRAS = {"jwt": {"jwt.py"}, "opentelemetry": {"telemetry.py", "telemetry_hooks.py"}}
#: What each adapter package wraps; an adapter imports no other adapter's library.
ADAPTERS = {
    "dara_ws_websockets": frozenset({"websockets"}),
    "dara_ws_aiohttp": frozenset({"aiohttp"}),
    # uvicorn serves WebSockets through websockets' sans-I/O protocol, which the adapter bounds
    # (handshake time, pong backpressure): the [asgi] extra installs it.
    "dara_ws_asgi": frozenset({"starlette", "uvicorn", "websockets"}),
    "dara_ws_redis": frozenset({"redis"}),
    "dara_ws_picows": frozenset({"picows"}),
}
#: Third-party packages the core may import at module level: its only dependency.
CORE_DEPENDENCIES = frozenset({"pydantic", "pydantic_core", "typing_extensions"})
#: The pure layer (no I/O, no event loop).
PURE_MODULES = ("messages.py", "codec.py", "chunks.py", "correlation.py", "exceptions.py", "registry.py",
                "connection.py", "upgrade.py", "backplane/contract.py", "backplane/wire.py")
IO_MODULES = frozenset({"asyncio", "socket", "selectors", "select", "ssl", "threading",
                        "subprocess", "multiprocessing", "concurrent"})


@dataclass(frozen=True)
class Import:
    top: str  # first component of the imported module ("" for a relative import)
    in_function: bool
    line: int

    def where(self, path: Path) -> str:
        return f"{path.relative_to(ROOT)}:{self.line} imports {self.top}"


class _Collector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.depth = 0
        self.found: list[Import] = []

    def add(self, name: str, node: ast.AST) -> None:
        top = name.partition(".")[0]
        self.found.append(Import(top, self.depth > 0, getattr(node, "lineno", 0)))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        # ``if TYPE_CHECKING:`` never runs: its imports count as deferred, like a function's.
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.add("" if node.level else node.module or "", node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x") and __import__("x") count as imports of "x".
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self.add(node.args[0].value, node)
        self.generic_visit(node)


def imports_of(path: Path) -> list[Import]:
    collector = _Collector()
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.found


def sources(directory: Path) -> Iterator[Path]:
    return iter(sorted(directory.rglob("*.py")))


#: dara_ws_core.integrations sits above the adapters (it serves a framework's app through one):
#: the core never imports it, and it imports its framework and adapter inside functions only.
INTEGRATIONS = CORE / "integrations"
INTEGRATION_FILES = list(sources(INTEGRATIONS))
CORE_FILES = [path for path in sources(CORE) if INTEGRATIONS not in path.parents]


def core_id(path: Path) -> str:
    return path.relative_to(CORE).as_posix()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


CORE_MODULES = {module_name(path): path for path in [*CORE_FILES, *INTEGRATION_FILES]}


def internal_imports(path: Path) -> set[str]:
    """The core modules a core file imports anywhere (``TYPE_CHECKING`` blocks and functions
    included: a cycle hidden there is still a cycle of the design). Importing ``a.b.c`` runs
    ``a.b`` first, so it counts as importing both, unless ``a.b`` is the importer's own package
    (already running); never the root package, which imports every module by design."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets += [f"{module}.{alias.name}" if f"{module}.{alias.name}" in CORE_MODULES
                        else module for alias in node.names]
    # The importer's own packages are already being imported when it runs: not an edge.
    own = {name.rsplit(".", depth)[0] for depth in range(name.count(".") + 1)}
    found = set()
    for target in targets:
        parts = target.split(".")
        for depth in range(2, len(parts) + 1):  # its parent packages, but not the root
            ancestor = ".".join(parts[:depth])
            if ancestor in CORE_MODULES and ancestor not in own:
                found.add(ancestor)
    return found


def test_the_scanner_sees_module_level_lazy_and_dynamic_imports() -> None:
    tree = ast.parse(
        "import a.b\nfrom c import d\nfrom . import e\n"
        "def f():\n    import g\n    importlib.import_module('h.i')\n"
        "class K:\n    async def m(self):\n        from j import k\n"
    )
    collector = _Collector()
    collector.visit(tree)
    assert [(i.top, i.in_function) for i in collector.found] == [
        ("a", False), ("c", False), ("", False), ("g", True), ("h", True), ("j", True),
    ]


def test_the_core_sources_are_found() -> None:
    names = {core_id(path) for path in CORE_FILES}
    assert {"__init__.py", *PURE_MODULES, "queue.py", "backplane/__init__.py"} <= names


def test_the_graph_reader_resolves_relative_absolute_and_package_imports() -> None:
    graph = {name: internal_imports(path) for name, path in CORE_MODULES.items()}
    assert "dara_ws_core.backplane.contract" in graph["dara_ws_core.backplane"]
    assert "dara_ws_core.exceptions" in graph["dara_ws_core.backplane.wire"]
    # manager -> backplane.contract (TYPE_CHECKING) also runs the backplane package.
    assert {"dara_ws_core.backplane", "dara_ws_core.backplane.contract"} <= graph[
        "dara_ws_core.manager"]
    assert "dara_ws_core" not in set().union(*graph.values())


def test_the_core_import_graph_has_no_cycle() -> None:
    graph = {name: internal_imports(path) for name, path in CORE_MODULES.items()}
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name):], name])
            pytest.fail(f"import cycle: {cycle}")
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("path", CORE_FILES, ids=core_id)
def test_the_core_imports_no_transport_library_anywhere(path: Path) -> None:
    bad = [i.where(path) for i in imports_of(path) if i.top in TRANSPORT_LIBRARIES]
    assert bad == []


@pytest.mark.parametrize("path", CORE_FILES, ids=core_id)
def test_optional_extras_and_adapters_are_imported_only_inside_functions(path: Path) -> None:
    bad = []
    for found in imports_of(path):
        home = OPTIONAL_EXTRAS.get(found.top)
        if home is not None and (core_id(path) not in home or not found.in_function):
            bad.append(found.where(path))
        if found.top in ADAPTERS and not found.in_function:
            bad.append(found.where(path))
    assert bad == []


#: Packages of this repository built on the core: the core imports none of them, not even lazily
#: (the command line imports every adapter; the adapters import the core).
ABOVE_THE_CORE = frozenset({*ADAPTERS, "dara_ws_cli"})


@pytest.mark.parametrize("path", CORE_FILES, ids=core_id)
def test_the_core_imports_no_adapter_or_the_command_line_anywhere(path: Path) -> None:
    bad = [i.where(path) for i in imports_of(path) if i.top in ABOVE_THE_CORE]
    assert bad == []


def test_the_command_line_is_outside_the_core() -> None:
    assert not (CORE / "cli.py").exists() and (ROOT / "dara_ws_cli" / "__init__.py").is_file()


@pytest.mark.parametrize("path", CORE_FILES, ids=core_id)
def test_the_core_imports_only_the_stdlib_and_pydantic_at_module_level(path: Path) -> None:
    allowed = set(sys.stdlib_module_names) | CORE_DEPENDENCIES | {"", "dara_ws_core"}
    bad = [i.where(path) for i in imports_of(path) if not i.in_function and i.top not in allowed]
    assert bad == []


@pytest.mark.parametrize("name", PURE_MODULES)
def test_the_pure_core_imports_nothing_that_does_io(name: str) -> None:
    path = CORE / name
    bad = [i.where(path) for i in imports_of(path) if i.top in IO_MODULES]
    assert bad == []


def test_importing_the_core_loads_no_transport_library_or_extra() -> None:
    # Integrations load their framework when used; importing one alone must not (it only
    # checks the installed version).
    modules = sorted(set(CORE_MODULES) - {"dara_ws_core"})
    forbidden = sorted(TRANSPORT_LIBRARIES | set(OPTIONAL_EXTRAS) | ABOVE_THE_CORE)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))\n"
    )
    assert run_python(code) == "[]"


def run_python(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter from the repository root."""
    # Pydantic plugins installed alongside (logfire's, a dara-core dependency) import
    # opentelemetry themselves when a model is built: not an import of ours.
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False, env={**os.environ, "PYDANTIC_DISABLE_PLUGINS": "__all__"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


#: What each integration serves an app of, and through which adapter.
INTEGRATION_FRAMEWORKS = {"dara.py": frozenset({"dara", "fastapi", "jwt", "dara_ws_asgi"})}


def test_every_integration_is_known() -> None:
    names = {path.name for path in INTEGRATION_FILES} - {"__init__.py"}
    assert names == set(INTEGRATION_FRAMEWORKS)


@pytest.mark.parametrize("path", INTEGRATION_FILES, ids=lambda path: path.name)
def test_an_integration_imports_its_framework_and_adapter_lazily_and_nothing_else(path: Path) -> None:
    allowed = INTEGRATION_FRAMEWORKS.get(path.name, frozenset())
    bad = []
    for found in imports_of(path):
        above = found.top in TRANSPORT_LIBRARIES | ABOVE_THE_CORE | {"dara", "fastapi", "jwt"}
        if above and (found.top not in allowed or not found.in_function):
            bad.append(found.where(path))
    assert bad == []


def test_the_core_never_imports_an_integration() -> None:
    graph = {name: internal_imports(path) for name, path in CORE_MODULES.items()}
    bad = sorted(name for name in graph if not name.startswith("dara_ws_core.integrations")
                 and any(target.startswith("dara_ws_core.integrations") for target in graph[name]))
    assert bad == []


# --------------------------------------------------------------------------- adapters


def test_every_adapter_package_is_known() -> None:
    packages = {p.name for p in TRANSPORTS.iterdir() if p.is_dir() and not p.name.startswith(".")
                and p.name != "__pycache__"}
    assert packages <= set(ADAPTERS), f"add {packages - set(ADAPTERS)} to ADAPTERS"


@pytest.mark.parametrize("package", sorted(ADAPTERS))
def test_each_adapter_imports_only_its_own_library(package: str) -> None:
    files = list(sources(TRANSPORTS / package)) if (TRANSPORTS / package).is_dir() else []
    if not files:
        pytest.skip(f"{package} has no source yet")
    others = (TRANSPORT_LIBRARIES - ADAPTERS[package]) | (set(ADAPTERS) - {package})
    bad = [i.where(path) for path in files for i in imports_of(path) if i.top in others]
    assert bad == []


def test_a_websockets_server_process_loads_no_client_side_or_optional_module() -> None:
    # What a server needs and nothing more (process RSS before the first connection).
    code = (
        "import sys, dara_ws_core, dara_ws_websockets\n"
        f"print(sorted(set(sys.modules) & set({SERVER_UNWANTED!r})))\n"
    )
    assert run_python(code) == "[]"


#: What a server process never loads: the websockets client (with urllib.request, http.client and
#: email for its proxy support), the core's client side and in-memory transport, the envelope
#: models and pydantic (a server decodes and builds frames without them), Dara's
#: first-party payload models, the telemetry, JWT, backplane and test helpers, the Redis
#: backplane and the integrations, the libraries of the optional extras and the command line's
#: metrics page; whoever uses them imports them.
SERVER_UNWANTED = ["websockets.asyncio.client", "urllib.request", "http.client",
                   "dara_ws_core.client", "dara_ws_core.memory", "dara_ws_core._payloads",
                   "dara_ws_core.telemetry", "dara_ws_core.telemetry_hooks", "dara_ws_core.jwt",
                   "dara_ws_core.backplane", "dara_ws_core.testing", "hypothesis",
                   "dara_ws_redis", "dara_ws_core.integrations", "redis", "jwt", "opentelemetry",
                   "dara_ws_cli.metrics", "prometheus_client", "pydantic", "dara_ws_core.messages"]


def test_the_demo_server_of_the_command_line_loads_no_client_side_or_optional_module() -> None:
    # What `dara-ws serve` imports before it listens: the command line, the demo app, the adapter.
    code = (
        "import sys\n"
        "from dara_ws_cli import build_demo, build_parser\n"
        "import dara_ws_websockets\n"
        "build_parser().parse_args(['serve'])\n"
        "build_demo()\n"
        f"print(sorted(set(sys.modules) & set({SERVER_UNWANTED!r})))\n"
    )
    assert run_python(code) == "[]"


def test_the_client_side_names_of_the_root_are_imported_on_first_use() -> None:
    code = (
        "import sys, dara_ws_core\n"
        "before = sorted({'dara_ws_core.client', 'dara_ws_core.memory'} & set(sys.modules))\n"
        "from dara_ws_core import DaraClient, PushedMessage, memory_pair\n"
        "from dara_ws_core import client, memory\n"
        "same = (DaraClient is client.DaraClient and PushedMessage is client.PushedMessage\n"
        "        and memory_pair is memory.memory_pair)\n"
        "print(before, same, 'DaraClient' in dir(dara_ws_core), hasattr(dara_ws_core, 'NoSuchName'))\n"
    )
    assert run_python(code) == "[] True True False"


def test_the_envelope_models_are_imported_on_first_use_and_are_the_same_everywhere() -> None:
    code = (
        "import sys, dara_ws_core\n"
        "before = sorted({'pydantic', 'dara_ws_core.messages'} & set(sys.modules))\n"
        "from dara_ws_core import DaraClientMessage, ServerMessagePayload\n"
        "from dara_ws_core import messages\n"
        "names = set(messages.__all__) & set(dara_ws_core.__all__)\n"
        "same = all(getattr(dara_ws_core, n) is getattr(messages, n) for n in names)\n"
        "print(before, same, len(names) >= 14, DaraClientMessage is messages.DaraClientMessage)\n"
    )
    assert run_python(code) == "[] True True True"


def test_the_first_party_payloads_are_built_on_first_use_and_are_the_same_everywhere() -> None:
    code = (
        "import sys, dara_ws_core, dara_ws_core.messages as messages\n"
        "before = 'dara_ws_core._payloads' in sys.modules\n"
        "from dara_ws_core import TaskNotificationMessage\n"
        "from dara_ws_core.messages import ServerErrorMessage\n"
        "from dara_ws_core import _payloads\n"
        "same = all(getattr(dara_ws_core, n) is getattr(messages, n) is getattr(_payloads, n)\n"
        "           for n in _payloads.__all__)\n"
        "listed = set(_payloads.__all__) <= set(messages.__all__) & set(dara_ws_core.__all__)\n"
        "print(before, same, listed, issubclass(ServerErrorMessage, messages.TypedPayload),\n"
        "      hasattr(messages, 'NoSuchName'))\n"
    )
    assert run_python(code) == "False True True True False"


def test_a_frame_is_built_while_another_thread_imports_pydantic() -> None:
    # A server imports no pydantic: build_frame tells a model apart by pydantic's module, if it
    # is there. While another thread imports it (a handler in a thread, the client, an
    # application's own import), the module is there half-built, without BaseModel yet: a
    # payload that is not exactly a dict (an OrderedDict, a defaultdict) failed with
    # AttributeError instead of being sent.
    code = (
        "import collections, sys, threading\n"
        "from dara_ws_core.codec import build_frame\n"
        "assert 'pydantic.main' not in sys.modules\n"
        "failed, imported = [], threading.Event()\n"
        "def load():\n"
        "    import pydantic.main\n"
        "    imported.set()\n"
        "thread = threading.Thread(target=load)\n"
        "thread.start()\n"
        "for _ in range(10**7):\n"
        "    if imported.is_set():\n"
        "        break\n"
        "    try:\n"
        "        assert build_frame(collections.OrderedDict(a=1)) == b'{\"type\":\"message\",\"message\":{\"a\":1}}'\n"
        "    except AttributeError as exc:\n"
        "        failed.append(exc)\n"
        "        break\n"
        "thread.join()\n"
        "print(failed)\n"
    )
    assert run_python(code) == "[]"
