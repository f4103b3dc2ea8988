"""What the distribution ships: every import package of the repository, found by walking it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_in_the_distribution() -> None:
    # A subpackage missing from [tool.setuptools] packages is missing from the wheel and from a
    # strict editable install: it imports from a checkout and nowhere else.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(setuptools["packages"])
    roots = {name: ROOT / where for name, where in setuptools["package-dir"].items()}
    found = {
        ".".join([name, *init.parent.relative_to(root).parts])
        for name, root in roots.items()
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found == declared


def test_every_import_package_of_the_repository_is_mapped() -> None:
    # A package added at the top level or under transports/ without a package-dir entry would be
    # missed by the walk above, and by the wheel.
    mapped = {(ROOT / where).resolve() for where in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-dir"].values()}
    not_shipped = {"tests", "benchmarks"}  # in the sdist only (MANIFEST.in)
    candidates = [*ROOT.iterdir(), *(ROOT / "transports").iterdir()]
    packages = {path.resolve() for path in candidates
                if (path / "__init__.py").is_file() and path.name not in not_shipped}
    assert packages <= mapped, sorted(str(p.relative_to(ROOT)) for p in packages - mapped)
    assert (ROOT / "dara_ws_cli").resolve() in mapped


def _extra_closure(extra: str) -> set[str]:
    """The distribution names an extra brings, following this project's own extras and the
    installed distributions' requirements (extras of those included)."""
    from importlib import metadata

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names: set[str] = set()
    todo = [f"dara-ws-core[{extra}]"]
    for _ in range(10_000):  # bounded: the graph is small and every name is visited once
        if not todo:
            break
        requirement = todo.pop()
        match = re.match(r"([A-Za-z0-9_.\-]+)(?:\[([^\]]*)\])?", requirement)
        assert match is not None, requirement
        name = match.group(1).lower().replace("_", "-")
        wanted = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
        if name == "dara-ws-core":
            todo += [r for e in wanted for r in extras[e]]
            continue
        if ";" in requirement and "win32" in requirement.split(";", 1)[1] and "!=" not in requirement:
            continue
        if name in names:
            continue
        names.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for dep in requires:
            spec, _, marker = dep.partition(";")
            if "extra ==" in marker and not any(f'extra == "{e}"' in marker for e in wanted):
                continue
            todo.append(spec.strip())
    return names


def test_the_bench_extra_brings_everything_the_benchmarks_import() -> None:
    # A benchmark implementation whose library the [bench] extra lacks fails only on a machine
    # that installed the extra alone (ours-otel did: opentelemetry was in [test] only).
    import ast
    import sys
    from importlib import metadata

    own = {"benchmarks", "tests", "dara_ws_core", "dara_ws_cli", "dara_ws_websockets", "dara_ws_aiohttp",
           "dara_ws_asgi", "dara_ws_redis", "dara_ws_picows"}
    modules = set()
    for path in (ROOT / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules - own if m not in sys.stdlib_module_names and m != "__future__"}
    # Where a module is not installed here (the test venv lacks [bench]), the distribution is
    # named after it, but for these.
    named_otherwise = {"socketio": "python-socketio"}
    providers = metadata.packages_distributions()
    closure = _extra_closure("bench")
    missing = {m: providers.get(m) for m in third_party
               if not {d.lower().replace("_", "-")
                       for d in providers.get(m) or [named_otherwise.get(m, m)]} & closure}
    assert missing == {}


def test_every_extra_that_brings_websockets_asks_for_a_version_the_adapter_runs_on() -> None:
    # websockets 14 and 15 install under "websockets>=14" and fail every connection with 1011
    # (review19 #2): the extras ask for what the adapter checks at import.
    from dara_ws_websockets import MIN_WEBSOCKETS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = [req for reqs in extras.values() for req in reqs if re.match(r"websockets\b", req)]
    assert wanted, "no extra brings websockets"
    assert set(wanted) == {f"websockets>={MIN_WEBSOCKETS[0]}"}


@pytest.mark.parametrize(("found", "refused"), [("14.2", True), ("15.0.1", True), ("16.0", False),
                                                 ("17.4", False), ("16.1.dev0", False), ("main", False)])
def test_the_websockets_adapter_refuses_an_older_websockets_naming_what_to_install(found: str, refused: bool) -> None:
    from dara_ws_websockets import _check_websockets_version

    if refused:
        match = rf"websockets 16 or later, and {re.escape(found)} is installed.*pip install"
        with pytest.raises(ImportError, match=match):
            _check_websockets_version(found)
    else:
        _check_websockets_version(found)


def test_the_version_the_package_reports_is_the_one_it_is_built_with() -> None:
    # `dara-ws --version` and `dara_ws_core.__version__` read a literal (no metadata lookup at
    # import); it must move with pyproject's, or an installed build names the wrong release.
    import dara_ws_core

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dara_ws_core.__version__ == declared


def test_the_dara_how_to_installs_what_its_blocks_import() -> None:
    # A newcomer installs what the page says (its `pip install -e ".[...]"` lines) in a
    # fresh venv and runs its blocks: the client needed aiohttp, and the integration serves
    # through dara_ws_asgi, whose websockets dara-core does not bring (review19 leftovers #5).
    import ast
    import sys
    from importlib import metadata

    from .test_docs import blocks_of
    from .test_imports import ADAPTERS

    page = ROOT / "docs" / "how-to" / "dara.md"
    blocks = blocks_of(page)
    extras = {e.strip() for b in blocks if b.lang == "bash"
              for group in re.findall(r"(?:dara-ws-core|\.)\[([^\]]*)\]", b.code) for e in group.split(",")}
    assert "dara" in extras
    closure = set().union(*(_extra_closure(e) for e in extras))
    libraries: set[str] = set()
    for block in blocks:
        if block.lang != "python":
            continue
        for node in ast.walk(ast.parse(block.code)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if name.startswith("dara_ws_core.integrations.dara"):
                    libraries |= ADAPTERS["dara_ws_asgi"]  # what it serves with
                elif top in ADAPTERS:
                    libraries |= ADAPTERS[top]
                elif top not in sys.stdlib_module_names and top not in {"dara_ws_core", "__future__"}:
                    libraries.add(top)
    providers = metadata.packages_distributions()
    missing = {m for m in libraries
               if not {d.lower().replace("_", "-") for d in providers.get(m) or [m]} & closure}
    assert missing == set(), f"{page.name} imports {sorted(missing)}, which dara-ws-core{sorted(extras)} lacks"
