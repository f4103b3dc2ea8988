"""What the distribution ships: every import package of the repository, found by walking it."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
