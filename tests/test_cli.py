"""The demo application (the README's main job), in memory and as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dara_ws_cli import build_demo
from dara_ws_cli.main import CHAT_MAX_TEXT
from dara_ws_core import (
    CustomServerMessage,
    DaraClient,
    MemoryServer,
    RemoteError,
    ServerConfig,
    WebsocketManager,
    connection_cap,
)

from .hostile import TOKEN_PATH, HostileClient, open_channel


async def test_demo_app_echo_chat_and_ask() -> None:
    endpoint = build_demo()
    server = MemoryServer(endpoint)
    alice = DaraClient(lambda: server.connect("/api/core/ws?token=alice"), ping_interval=None)
    bob = DaraClient(lambda: server.connect("/api/core/ws"), ping_interval=None)
    async with alice, bob:
        assert endpoint.manager.get_user_channels("alice") == {alice.channel}
        assert await alice.request("echo", {"x": [1, 2]}) == {"x": [1, 2]}
        assert await alice.request("chat", "hello") == {"delivered": True}
        pushed = await bob.receive(timeout=5)
        assert isinstance(pushed, CustomServerMessage)
        assert pushed.message.kind == "chat"
        assert pushed.message.data == {"from": alice.channel, "text": "hello"}
        assert alice.received_nowait() == []  # the sender is ignored
        bob.on_request(lambda request: request.payload["question"].upper())
        assert await bob.request("ask", "why?") == {"you_answered": "WHY?"}
    await endpoint.shutdown(grace=0)


async def test_demo_tell_refuses_a_text_that_would_fill_a_users_history() -> None:
    """``tell`` keeps its text in the user's history: one client must not push 1 MiB texts."""
    endpoint = build_demo()
    server = MemoryServer(endpoint)
    alice = DaraClient(lambda: server.connect("/api/core/ws?token=alice"), ping_interval=None)
    async with alice:
        with pytest.raises(RemoteError):
            await alice.request("tell", {"user": "victim", "text": "x" * 1025})
        with pytest.raises(RemoteError):
            await alice.request("tell", {"user": "v" * 257, "text": "hi"})
        assert endpoint.manager.outbox.after("victim", None, now=0)[1] == 0  # nothing kept
        assert await alice.request("tell", {"user": "alice", "text": "x" * 1024}) == {
            "delivered": True, "kept": True}
        pushed = await alice.receive(timeout=5)
        assert isinstance(pushed, CustomServerMessage)
        assert pushed.message.data == {"from": alice.channel, "text": "x" * 1024}
    await endpoint.shutdown(grace=0)


async def test_demo_tell_says_when_a_message_was_not_kept() -> None:
    """Past its sender's quota of kept messages, ``tell`` still delivers but answers
    ``"kept": false``: the client is told, and other senders' messages are still kept."""
    endpoint = build_demo(WebsocketManager(ServerConfig(outbox_per_sender=3)))
    server = MemoryServer(endpoint)
    mallory = DaraClient(lambda: server.connect("/api/core/ws?token=mallory"), ping_interval=None)
    alice = DaraClient(lambda: server.connect("/api/core/ws?token=alice"), ping_interval=None)
    async with mallory, alice:
        answers = [await mallory.request("tell", {"user": f"made-up-{i}", "text": "x"})
                   for i in range(5)]
        assert [a["kept"] for a in answers] == [True, True, True, False, False]
        assert all(a["delivered"] for a in answers)
        assert await alice.request("tell", {"user": "victim", "text": "hi"}) == {
            "delivered": True, "kept": True}
    await endpoint.shutdown(grace=0)


async def test_demo_chat_refuses_a_text_every_reader_would_get_a_copy_of() -> None:
    """``chat`` multiplies what one client sends into every other reader's queue: bounded."""
    endpoint = build_demo()
    server = MemoryServer(endpoint)
    alice = DaraClient(lambda: server.connect("/api/core/ws?token=alice"), ping_interval=None)
    bob = DaraClient(lambda: server.connect("/api/core/ws?token=bob"), ping_interval=None)
    async with alice, bob:
        for too_big in ("x" * (CHAT_MAX_TEXT + 1), {"text": "x" * CHAT_MAX_TEXT}):
            with pytest.raises(RemoteError):
                await alice.request("chat", too_big)
        assert await alice.request("chat", "x" * CHAT_MAX_TEXT) == {"delivered": True}
        pushed = await bob.receive(timeout=5)
        assert isinstance(pushed, CustomServerMessage)
        assert pushed.message.data == {"from": alice.channel, "text": "x" * CHAT_MAX_TEXT}
        assert bob.received_nowait() == []  # the refused ones were never broadcast
    await endpoint.shutdown(grace=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dara_ws_serve_and_probe_as_processes() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", str(port), "--clock", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # the server prints its address when ready
        while "dara-ws demo" not in line:
            assert line, "the demo server exited before it was ready"
            line = server.stdout.readline()
        probe = subprocess.run(
            [sys.executable, "-m", "dara_ws_cli", "probe",
             f"ws://127.0.0.1:{port}/api/core/ws?token=probe"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        assert "echo -> {'hello': 'world'}" in probe.stdout
        assert "ask  -> {'you_answered': 42}" in probe.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert server.returncode == 0  # SIGTERM is a graceful stop


# A first run's mistakes: one line on stderr, an exit status, no traceback (issue 9, item 8).

_RUN_CLI = """
import sys
import time
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None  # what `import name` sees when the library is not installed
from dara_ws_cli import main
main(sys.argv[2:])
"""


def _run_cli(*args: str, without: tuple[str, ...] = (), timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RUN_CLI, ",".join(without), *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dara-ws: "), result.stderr
    return last


def test_help_is_plain_text_and_shows_defaults() -> None:
    for args in (["--help"], ["serve", "--help"], ["probe", "--help"]):
        result = _run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and ":func:" not in result.stdout and ":class:" not in result.stdout
    serve_help = _run_cli("serve", "--help").stdout
    assert "(default: 8000)" in serve_help
    assert "(default: websockets)" in serve_help
    assert "(default: 127.0.0.1)" in serve_help
    assert "(default: None)" not in serve_help  # options whose help explains the default show it once
    assert all(kind in " ".join(serve_help.split()) for kind in build_demo().manager.custom_handlers)
    version = _run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("dara-ws ")


@pytest.mark.parametrize(
    ("transport", "library", "extra"),
    [("websockets", "websockets", "websockets"), ("aiohttp", "aiohttp", "aiohttp"),
     ("asgi", "uvicorn", "asgi"), ("asgi", "websockets", "asgi"), ("picows", "picows", "picows")],
)
def test_serve_without_the_transports_extra_names_the_pip_command(
    transport: str, library: str, extra: str
) -> None:
    result = _run_cli("serve", "--transport", transport, "--port", "0", without=(library,))
    assert result.returncode == 2
    line = _one_line_error(result)
    assert f'pip install "dara-ws-core[{extra}]"' in line


def test_serve_with_redis_url_without_the_redis_extra_names_the_pip_command() -> None:
    result = _run_cli("serve", "--port", "0", "--redis-url", "redis://127.0.0.1:1/0", without=("redis",))
    assert result.returncode == 2
    assert 'pip install "dara-ws-core[redis]"' in _one_line_error(result)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_uvloop_without_uvloop_names_the_pip_command(workers: str) -> None:
    result = _run_cli("serve", "--port", "0", "--loop", "uvloop", "--workers", workers, without=("uvloop",))
    assert result.returncode == 2
    assert 'pip install "dara-ws-core[uvloop]"' in _one_line_error(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--metrics-port", "65535"], "past 65535"), (["--workers", "0"], "at least 1")],
)
def test_serve_with_workers_refuses_what_it_cannot_share(args: list[str], message: str) -> None:
    result = _run_cli("serve", "--port", "0", "--workers", "2", *args)
    assert result.returncode == 2
    assert message in _one_line_error(result)


@pytest.mark.parametrize(
    ("args", "library", "extra"),
    [(["--transport", "aiohttp"], "aiohttp", "aiohttp"), (["--transport", "asgi"], "starlette", "asgi"),
     (["--redis-url", "redis://127.0.0.1:1/0"], "redis", "redis"),
     (["--metrics-port", "0"], "prometheus_client", "prometheus")],
)
def test_serve_with_workers_names_a_missing_extra_once(
    args: list[str], library: str, extra: str, tmp_path: Path
) -> None:
    """As without --workers: one line and status 2, not one line per worker and status 1. The
    library is hidden from the workers too (they are new processes: a package that fails)."""
    (tmp_path / library).mkdir()
    (tmp_path / library / "__init__.py").write_text(f"raise ImportError('hidden', name={library!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--workers", "2", "--clock", "0", *args],
        check=False, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("dara-ws: ") == 1, result.stderr
    assert f'pip install "dara-ws-core[{extra}]"' in _one_line_error(result)


@pytest.mark.parametrize("url", ["redis://demo:hunter2@127.0.0.1:1/0", "http://demo:hunter2@127.0.0.1:1/0"])
def test_a_redis_url_that_cannot_serve_is_one_line_without_its_password(url: str) -> None:
    """Redis that is not there (port 1: nothing listens), or a URL that is not Redis's: the line
    names the URL as it may be logged, its password left out."""
    result = _run_cli("serve", "--port", "0", "--clock", "0", "--redis-url", url)
    assert result.returncode == (1 if url.startswith("redis") else 2), result.stderr
    line = _one_line_error(result)
    assert "://***@127.0.0.1:1/0" in line, line
    assert "hunter2" not in result.stderr + result.stdout
    # It never served: the log said "local delivery continues; reconnecting" before the start
    # gave up, as if it did.
    assert "local delivery continues" not in result.stderr, result.stderr
    assert "dara-ws demo" not in result.stdout, result.stdout


def test_a_redis_url_that_cannot_be_split_is_one_line_without_its_password() -> None:
    # urllib refuses an unbalanced bracket: showing the URL without its password split it again,
    # and the error became a traceback (status 1).
    result = _run_cli("serve", "--port", "0", "--clock", "0", "--redis-url", "redis://demo:hunter2@[::1")
    assert result.returncode == 2, result.stderr
    assert "redis://***" in _one_line_error(result)
    assert "hunter2" not in result.stderr + result.stdout


def test_serve_on_uvloop_answers_a_probe() -> None:
    pytest.importorskip("uvloop")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", str(port), "--clock", "0", "--loop", "uvloop",
         "--transport", "picows"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        for _ in range(50):
            line = server.stdout.readline()
            assert line, "the demo server exited before it was ready"
            if "dara-ws demo" in line:
                break
        assert "(picows, uvloop loop)" in line
        probe = subprocess.run(
            [sys.executable, "-m", "dara_ws_cli", "probe", f"ws://127.0.0.1:{port}/api/core/ws?token=p"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        assert "ask  -> {'you_answered': 42}" in probe.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert server.returncode == 0


@pytest.mark.parametrize("transport", ["websockets", "aiohttp", "asgi", "picows"])
def test_serve_on_a_port_in_use_says_so(transport: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli("serve", "--transport", transport, "--port", str(port), "--clock", "0")
    assert result.returncode == 1
    line = _one_line_error(result)
    assert f"127.0.0.1:{port}" in line
    assert "already in use" in line


def test_probe_on_a_dead_port_says_no_server_answers() -> None:
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = _run_cli("probe", f"ws://127.0.0.1:{port}/api/core/ws", "--timeout", "5")
    assert result.returncode == 1
    line = _one_line_error(result)
    assert "cannot connect" in line
    assert "connection refused" in line


def test_probe_without_a_client_library_names_the_pip_command() -> None:
    result = _run_cli("probe", without=("websockets", "aiohttp"))
    assert result.returncode == 2
    line = _one_line_error(result)
    assert 'pip install "dara-ws-core[websockets]"' in line and '"dara-ws-core[aiohttp]"' in line


# Review 19 (6): ordinary mistakes are one line and status 2 (usage) or 1 (the run failed).
@pytest.mark.parametrize(("args", "names"), [
    (["serve", "--port", "99999"], "--port"), (["serve", "--port", "-5"], "--port"),
    (["serve", "--port", "http"], "--port"), (["serve", "--metrics-port", "70000"], "--metrics-port"),
    (["serve", "--clock", "-1"], "--clock"), (["serve", "--clock", "nan"], "--clock"),
    (["serve", "--stats-interval", "-2"], "--stats-interval"),
    (["probe", "--timeout", "0"], "--timeout"), (["probe", "--timeout", "-1"], "--timeout"),
    (["probe", "--timeout", "nan"], "--timeout"),
])
def test_serve_refuses_options_out_of_range_as_usage_errors(args: list[str], names: str) -> None:
    result = _run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert f"argument {names}:" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "names"), [
    (["serve", "--host", "256.1.1.1", "--port", "0", "--clock", "0"], "256.1.1.1"),
    (["serve", "--host", "no-such-host.invalid", "--port", "0", "--clock", "0"], "--host"),
    (["serve", "--port", "0", "--redis-url", "127.0.0.1:6391"], "--redis-url"),
    (["serve", "--port", "0", "--redis-url", "http://127.0.0.1:6391"], "--redis-url"),
    (["serve", "--host", "256.1.1.1", "--port", "0", "--workers", "2", "--clock", "0"], "256.1.1.1"),
    (["serve", "--port", "0", "--workers", "2", "--redis-url", "127.0.0.1:6391"], "--redis-url"),
    (["probe", "http://127.0.0.1:8000/api/core/ws"], "not a WebSocket URL"),
    (["probe", "/api/core/ws"], "not a WebSocket URL"),
    (["probe", "ws://[::1/api/core/ws"], "not a URL"),
    (["probe", "ws://127.0.0.1:99999/api/core/ws"], "not a URL"),
])
def test_a_host_or_url_that_cannot_work_is_one_line_and_status_2(args: list[str], names: str) -> None:
    result = _run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert names in _one_line_error(result)


@pytest.mark.parametrize("client_library", ["websockets", "aiohttp"])
async def test_probe_uses_whichever_client_library_is_installed_and_says_what_a_404_means(
    client_library: str,
) -> None:
    # Review 19 (6, 7): an [aiohttp]-only install probes too; a wrong path is one line, not a traceback.
    from dara_ws_aiohttp import serve

    without = ("websockets",) if client_library == "aiohttp" else ("aiohttp",)
    async with serve(build_demo(), "127.0.0.1", 0) as server:
        async def run(url: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RUN_CLI, ",".join(without), "probe", url, "--timeout", "10",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        status, out, err = await run(f"ws://127.0.0.1:{server.port}/api/core/ws?token=p")
        assert status == 0, err
        assert "ask  -> {'you_answered': 42}" in out
        status, out, err = await run(f"ws://127.0.0.1:{server.port}/wrong/path")
    assert status == 1
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("dara-ws: ") and "HTTP 404" in err, err


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits (Linux)")
def test_serve_raises_its_open_files_limit_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = 256
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    # The process starts with a low soft limit, as under many login shells (ulimit -n 256).
    start_low = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from dara_ws_cli import main\n"
        "main(sys.argv[1:])\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", start_low, "serve", "--port", "0", "--clock", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        output: list[str] = []
        line = server.stdout.readline()
        while "dara-ws demo" not in line:
            assert line, "the demo server exited before it was ready:\n" + "".join(output)
            output.append(line)
            line = server.stdout.readline()
        limits = Path(f"/proc/{server.pid}/limits").read_text()
    finally:
        server.terminate()
        server.wait(timeout=20)
    row = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert row.split()[3] == expected, row  # "Max open files <soft> <hard> files"
    assert any(f"open files limit raised from {low}" in line for line in output), output


@pytest.mark.parametrize(("env", "expected"), [(None, "__all__"), ("", ""), ("other", "other")])
def test_the_command_line_loads_no_pydantic_plugin_unless_told(env: str | None, expected: str) -> None:
    # An installed plugin (logfire's, which dara-core brings) costs every process ~20 MiB at
    # start; the demo server builds nothing it instruments. An explicit setting wins.
    environ = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if env is not None:
        environ["PYDANTIC_DISABLE_PLUGINS"] = env
    code = ("import os, sys, dara_ws_cli, dara_ws_core\n"
            "print(os.environ['PYDANTIC_DISABLE_PLUGINS'], 'logfire' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=environ, check=False)
    assert result.returncode == 0, result.stderr
    value, logfire = result.stdout.rsplit(" ", 1)
    assert value == expected
    if expected == "__all__":
        assert logfire.strip() == "False"


LIMIT = 300  # open files, soft and hard (nothing to raise): connection_cap leaves 256 spare


NO_SHARE = ("--max-connections-per-address", "0")  # every test client is one host


async def _listening_port(server: asyncio.subprocess.Process) -> int:
    """The port a ``dara-ws serve`` process started with ``--port 0`` says it listens on."""
    assert server.stdout is not None
    line = ""
    for _ in range(20):
        line = (await asyncio.wait_for(server.stdout.readline(), 20)).decode()
        if "dara-ws demo" in line or not line:
            break
    assert "dara-ws demo" in line, line
    return int(line.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NOFILE"), reason="needs RLIMIT_NOFILE (POSIX)")
@pytest.mark.parametrize(("option", "cap", "beyond"), [
    (NO_SHARE, connection_cap(LIMIT), 503), (("--max-connections", "3", *NO_SHARE), 3, 503),
    (("--max-connections", "0"), connection_cap(LIMIT), 101),  # 0: no cap, and no share of it
    # Review 12 (4): by default one host holds a quarter of the cap at most.
    ((), connection_cap(LIMIT) // 4, 503), (("--max-connections", "20"), 5, 503),
    (("--max-connections", "20", "--max-connections-per-address", "7"), 7, 503),
])
async def test_serve_caps_its_connections_under_the_open_files_limit(
    option: tuple[str, ...], cap: int, beyond: int
) -> None:
    # Review 10, item 11: the demo's connections used every descriptor.
    limit = LIMIT
    start_capped = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
        "from dara_ws_cli import main\n"
        "main(sys.argv[1:])\n"
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", start_capped, "serve", "--port", "0", "--clock", "0", *option,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    clients: list[HostileClient] = []
    try:
        port = await _listening_port(server)
        for _ in range(cap):
            client, _ = await open_channel(port)
            clients.append(client)
        extra = await HostileClient.open(port)
        clients.append(extra)
        response = await extra.handshake(TOKEN_PATH)
        assert response.status == beyond, response
    finally:
        for client in clients:
            await client.close()
        server.terminate()
        await asyncio.wait_for(server.wait(), 20)


def test_serve_refuses_a_negative_max_connections() -> None:
    result = _run_cli("serve", "--port", "0", "--max-connections", "-1")
    assert result.returncode == 2
    assert "--max-connections must be >= 0" in _one_line_error(result)


def test_a_dead_worker_is_started_again_later_each_time_until_a_crash_loop() -> None:
    from dara_ws_cli.workers import DEATH_WINDOW, FIRST_DELAY, MAX_DEATHS, RestartPolicy

    policy = RestartPolicy()
    delays = [policy.died(float(t)) for t in range(MAX_DEATHS)]  # a death every second
    assert delays[:-1] == [FIRST_DELAY * 2 ** n for n in range(MAX_DEATHS - 1)]
    assert delays[-1] is None  # MAX_DEATHS within DEATH_WINDOW: give up
    spaced = RestartPolicy()
    # Deaths further apart than the window never add up to a crash loop, and start again soon.
    assert all(spaced.died(n * (DEATH_WINDOW + 1)) == FIRST_DELAY for n in range(3 * MAX_DEATHS))


def test_serve_refuses_a_negative_max_connections_per_address() -> None:
    result = _run_cli("serve", "--port", "0", "--max-connections-per-address", "-1")
    assert result.returncode == 2
    assert "--max-connections-per-address must be >= 0" in _one_line_error(result)


@pytest.mark.parametrize(("option", "value"), [
    ("--max-connections-per-address", "0"),  # off behind a proxy: in every worker
    ("--forwarded-allow-ips", "10.0.0.0/8"),  # the proxies trusted: by every worker
])
def test_workers_get_the_per_address_options_given(option: str, value: str) -> None:
    from dara_ws_cli.main import build_parser
    from dara_ws_cli.workers import worker_argv

    argv = worker_argv(build_parser().parse_args(["serve", "--workers", "2", option, value]), 8001)
    assert argv[argv.index(option) + 1] == value
    assert option not in worker_argv(build_parser().parse_args(["serve"]), 8001)


def test_serve_refuses_forwarded_allow_ips_that_are_no_addresses() -> None:
    result = _run_cli("serve", "--port", "0", "--forwarded-allow-ips", "10.0.0.1,proxy.internal")
    assert result.returncode == 2
    assert "--forwarded-allow-ips" in _one_line_error(result)


async def test_serve_behind_a_trusted_proxy_counts_each_client_by_the_address_it_names() -> None:
    # Review 18 (2): one address's share behind the proxy is each client's, not all of them.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--clock", "0",
        "--forwarded-allow-ips", "127.0.0.1", "--max-connections-per-address", "1",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    clients: list[HostileClient] = []
    try:
        port = await _listening_port(server)
        statuses = []
        for client_address in ("203.0.113.7", "198.51.100.9", "203.0.113.7"):
            client = await HostileClient.open(port)
            clients.append(client)
            response = await client.handshake(TOKEN_PATH, [("X-Forwarded-For", client_address)])
            statuses.append(response.status)
            if response.status == 101:  # served (its init sent): counted before the next one
                await client.read_frame()
        assert statuses == [101, 101, 403]
    finally:
        for client in clients:
            await client.close()
        server.terminate()
        await asyncio.wait_for(server.wait(), 20)


def _children(pid: int) -> set[int]:
    """The processes ``pid`` started (a supervisor's workers)."""
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _line_with(process: subprocess.Popen[str], text: str) -> str:
    assert process.stdout is not None
    for _ in range(200):  # bounded: the workers' lines and the supervisor's
        line = process.stdout.readline()
        assert line, f"dara-ws --workers ended before it said {text!r}"
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r}")


def test_ctrl_c_in_a_terminal_stops_the_workers_with_exit_0() -> None:
    """Ctrl-C signals the whole foreground process group: each worker gets SIGINT from the
    terminal and SIGTERM from the supervisor. The second came while a worker was exiting, after
    asyncio had restored the signal's default action, and killed it (status -15): exit 1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--workers", "2", "--clock", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _line_with(process, "dara-ws: 2 workers")
        os.killpg(process.pid, signal.SIGINT)  # the group this test made: the supervisor, its workers
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_urls_printed_for_an_ipv6_host_work_as_printed(workers: str) -> None:
    """``--host ::1`` printed ws://::1:PORT/..., which no client takes (``probe`` said the port
    could not be cast to an integer): the address goes in brackets, as in any URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--host", "::1", "--port", "0", "--clock", "0",
         "--workers", workers, "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = _line_with(process, "metrics on ").split()[-1]
        line = _line_with(process, "dara-ws demo" if workers == "1" else "dara-ws: 2 workers")
        url = line.split()[-1]
        assert url.startswith("ws://[::1]:") and metrics.startswith("http://[::1]:"), (line, metrics)
        probe = subprocess.run([sys.executable, "-m", "dara_ws_cli", "probe", url],
                               check=False, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize(("workers", "again"), [("1", signal.SIGTERM), ("2", signal.SIGINT)])
def test_a_stop_signal_repeated_until_the_server_has_exited_is_still_a_clean_stop(
    workers: str, again: signal.Signals
) -> None:
    """The race of the test above, made certain: SIGINT, then a signal every millisecond until
    the process is gone (a worker's, or the supervisor's: a Ctrl-C pressed again, which gave a
    KeyboardInterrupt traceback once the supervisor's loop was closing). Each one either asks
    for the stop again or is ignored; none kills the process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--clock", "0", "--workers", workers],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _line_with(process, "dara-ws demo" if workers == "1" else "dara-ws: 2 workers")
        process.send_signal(signal.SIGINT)
        for _ in range(30_000):  # bounded: 30 s of signals at most
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(again)
            time.sleep(0.001)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc")
@pytest.mark.parametrize("when", ["waiting to start it", "starting it"])
def test_workers_stopped_while_one_is_started_again_exit_0(when: str) -> None:
    """An operator's SIGTERM is a clean stop whatever the supervisor was doing: a worker that
    had died and was waiting for its restart, or was still starting (and dies of the SIGTERM
    before it can take it gracefully), is not a failure; exit status 0, as systemd expects."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--workers", "2", "--clock", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _line_with(process, "dara-ws: 2 workers")
        first = _children(process.pid)
        assert len(first) == 2
        os.kill(min(first), signal.SIGKILL)  # a worker this test started (through the supervisor)
        _line_with(process, "starting it again")  # the supervisor waits FIRST_DELAY
        if when == "starting it":
            for _ in range(500):  # bounded: the new worker appears after half a second
                if _children(process.pid) - first:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the dead worker was not started again")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
