"""Every code block of README.md and docs/ runs, so the documentation cannot rot (issue 9).

A block is run according to the HTML comment on the line before its fence (blank lines allowed):

* no comment (python): saved as a script in the page's scratch folder and run to completion;
* ``<!-- test: run NAME -->``: the same, saved as ``NAME`` first (bash blocks: run with bash);
* ``<!-- test: server NAME -->``: saved as ``NAME`` and started in the background; the page's port
  must start listening, the blocks after it run against it, and it is stopped with SIGINT (as
  Ctrl-C would) at the next server block or the end of the page;
* ``<!-- test: pytest NAME -->``: saved as ``NAME`` and run with pytest;
* ``<!-- test: skip REASON -->``: not run, for a stated reason (kept rare).

Every block of a page runs in one scratch folder, so a later block may import an earlier file. The
port ``8000`` in a page is replaced by a free port, and ``6379`` by a real redis-server's (from
``tests/redis_server.py``). Finally, ``mkdocs build --strict`` must pass.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.redis_server"]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!-- test: (run|server|pytest|skip)\b\s*(.*?)\s*-->$")
BLOCK_TIMEOUT = 90.0
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    action: str  # "", run, server, pytest, skip
    arg: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang or 'text'})"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        directive = DIRECTIVE.match(lines[previous].strip()) if previous >= 0 else None
        action, arg = (directive.group(1), directive.group(2)) if directive else ("", "")
        found.append(Block(page, start + 1, opening.group(1), "\n".join(body) + "\n", action, arg))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUN_PAGES = [page for page in PAGES if any(b.action != "skip" for b in blocks_of(page))]


def test_every_block_is_run_or_says_why_not() -> None:
    assert len(PAGES) > 5 and ALL_BLOCKS
    for block in ALL_BLOCKS:
        if block.action == "skip":
            assert len(block.arg) > 10, f"{block}: say why the block is not run"
        elif block.lang not in ("python", "bash"):
            pytest.fail(f"{block}: a {block.lang or 'plain'} block must be run (bash) or skipped with a reason")
        if block.action in ("server", "pytest"):
            assert block.lang == "python" and block.arg.endswith(".py"), f"{block}: needs a .py file name"


def test_most_python_blocks_run() -> None:
    python = [b for b in ALL_BLOCKS if b.lang == "python"]
    skipped = [str(b) for b in python if b.action == "skip"]
    assert len(skipped) * 5 <= len(python), f"too many python blocks skipped: {skipped}"


def test_readme_keeps_its_two_setup_commands_first() -> None:
    first = blocks_of(ROOT / "README.md")[0]
    commands = [line.split("#")[0].strip() for line in first.code.splitlines() if line.split("#")[0].strip()]
    assert commands == ['pip install -e ".[websockets]" && dara-ws serve', "bash scripts/test"]


def test_nothing_links_outside_the_repository() -> None:
    for page in [*PAGES, ROOT / "pyproject.toml", ROOT / "CHANGELOG.md"]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/protocol.md" not in text, page


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[str], block: Block) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{block}: the server exited ({process.returncode}) before listening:\n{output}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port: there is no event to await across processes
    pytest.fail(f"{block}: nothing listened on {port} within {READY_TIMEOUT} s")


def _stop(process: subprocess.Popen[str], block: Block) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{block}: the server did not stop within 30 s of Ctrl-C:\n{output}")
    # Ctrl-C ends an asyncio program with KeyboardInterrupt unless it handles the signal itself.
    ended_by_interrupt = process.returncode != 0 and output.rstrip().endswith("KeyboardInterrupt")
    assert process.returncode == 0 or ended_by_interrupt, f"{block}: exit {process.returncode}:\n{output}"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_blocks_of_a_page_run(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = [b for b in blocks_of(page) if b.action != "skip"]
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dara-ws, mkdocs
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    servers: list[tuple[subprocess.Popen[str], Block]] = []
    try:
        for index, block in enumerate(blocks):
            code = re.sub(r"\b8000\b", str(port), block.code)
            if "6379" in code:
                redis = request.getfixturevalue("redis_server")
                code = re.sub(r"\b6379\b", str(redis.port), code)
            name = block.arg or f"block{index}.{'sh' if block.lang == 'bash' else 'py'}"
            (tmp_path / name).write_text(code, encoding="utf-8")
            if block.lang == "bash":
                command = ["bash", "-euo", "pipefail", name]
            elif block.action == "pytest":
                command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
            else:
                command = [sys.executable, name]
            if block.action == "server":
                while servers:  # one server per page at a time: the next one takes the port
                    _stop(*servers.pop())
                server = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                servers.append((server, block))
                _wait_listening(port, server, block)
                continue
            result = subprocess.run(command, cwd=tmp_path, env=env, text=True, capture_output=True,
                                    timeout=BLOCK_TIMEOUT, check=False)
            assert result.returncode == 0, f"{block} failed:\n{result.stdout}\n{result.stderr}"
    finally:
        for server, block in reversed(servers):
            _stop(server, block)


def test_the_documentation_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
