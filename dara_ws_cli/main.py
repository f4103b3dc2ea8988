"""dara-ws: the demo server and a probe client.

`dara-ws serve` runs a small example application on ws://127.0.0.1:8000/api/core/ws:

- echo (custom request): replies with what it got;
- chat (custom message): broadcast to every other connection as a "chat" custom push (at most
  64 KiB of text: each reader gets a copy); answers {"delivered": true}, or with --redis-url
  while Redis is down {"delivered": false, "bus": "down"}: only this process's connections got it;
- ask (custom request): the server asks the client back (send_and_wait) and replies with the
  client's answer, showing both correlation directions;
- tell (custom request, {"user": ..., "text": ...}): a "tell" custom push to every connection of
  that user, on whichever process (with --redis-url) it is (a text of at most 1024 characters: it
  is kept in the user's history); answers "delivered" as chat does, and "kept": false when the
  user's history (or, Redis down, this process's spool) refused it: a connection of the user
  opened later does not get it, nor, Redis down, do the user's connections on other processes;
- whoami (custom request): replies with the serving process's pid (and worker number under
  --workers), to see which process a client landed on;
- a "clock" custom push to everyone every --clock seconds.

`--workers N` runs N such processes on one port (SO_REUSEPORT; see dara_ws_cli.workers), and
`--loop uvloop` runs the event loop on uvloop.

Identity: ?token=NAME (or the dara_session_token cookie) names the user; connections without a
token are anonymous, which this demo allows explicitly.

`dara-ws probe URL` connects, prints the channel, runs echo and ask, and exits. It connects with
whichever client library is installed: websockets (the websockets or asgi extra), else aiohttp.

Mistakes a first run makes (a missing extra, a port out of range, a --host or --redis-url that
names nothing, a port in use, a probe URL that is not ws:// or finds no endpoint, no server to
probe) end with one line on stderr and exit status 2 (cannot run as asked) or 1 (the run failed),
not a traceback.
"""

from __future__ import annotations

__all__ = ["CLIError", "build_demo", "build_parser", "main", "raise_open_files_limit"]

import argparse
import asyncio
import contextlib
import errno
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from dara_ws_core import (
    AuthenticationFailed,
    BackplaneError,
    ConnectionClosed,
    DaraWSError,
    Endpoint,
    HandshakeRequest,
    Identity,
    ServerConfig,
    WebsocketManager,
    __version__,
    allow_anonymous,
    build_frame,
    connection_cap,
    current_channel,
    extract_token,
    quiet_accept_errors,
)
from dara_ws_core.transport import TrustedProxies

logger = logging.getLogger("dara_ws_cli")

#: Characters of a `tell` text (it is kept in the user's history, see `outbox_bytes`).
TELL_MAX_TEXT = 1024
#: Characters of a `chat` text (or of its JSON, for anything else): every other connection gets
#: a copy, so one client's big messages would multiply into every reader's queue.
CHAT_MAX_TEXT = 64 * 1024

#: The extra each adapter needs, for the message when it is missing.
_EXTRAS = {"websockets": "websockets", "aiohttp": "aiohttp", "asgi": "asgi", "picows": "picows"}


class CLIError(Exception):
    """A mistake reported as one line on stderr and an exit status, without a traceback."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _missing_extra(exc: ImportError) -> CLIError:
    # The adapters' own ImportError already names the pip command; anything else gets the generic one.
    message = str(exc)
    if "pip install" not in message:
        message = f'{message}: pip install "dara-ws-core[all]"'
    return CLIError(message, status=2)


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit: each connection is one descriptor.

    Returns ``(old, new)`` soft limits, or ``None`` where there is nothing to do (no ``resource``
    module, already at the hard limit, or the system refuses).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard == resource.RLIM_INFINITY and soft >= 1 << 20):
        return None
    # An infinite hard limit is not a valid soft one on every system (macOS): cap it.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open files limit from %d: %s", soft, exc)
        return None
    return soft, target


def build_demo(manager: WebsocketManager | None = None) -> Endpoint:
    """The demo application: handlers registered on a manager, behind a demo authenticator."""
    manager = manager or WebsocketManager()
    anonymous = allow_anonymous()

    def authenticate(request: HandshakeRequest) -> Identity:
        token = extract_token(request)
        if token is None:
            return anonymous(request)  # type: ignore[return-value]  # sync by construction
        return Identity(user_id=token, session_id=token, token=token)

    def echo(channel_id: str, data: Any) -> Any:
        return data

    async def chat(channel_id: str, data: Any) -> dict[str, Any]:
        if len(data if isinstance(data, str) else json.dumps(data)) > CHAT_MAX_TEXT:
            raise ValueError(f"a chat text is at most {CHAT_MAX_TEXT} characters")
        await manager.broadcast(
            {"kind": "chat", "data": {"from": channel_id, "text": data}},
            custom=True,
            ignore_channel=channel_id,
        )
        return _delivered(manager)

    async def ask(channel_id: str, data: Any) -> Any:
        answer = await manager.send_and_wait(
            current_channel.get(), {"question": data or "what is 6 * 7?"}, timeout=10
        )
        return {"you_answered": answer}

    manager.add_ws_handler("echo", echo)
    manager.add_ws_handler("chat", chat)
    async def tell(channel_id: str, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("user"), str):
            raise ValueError('tell needs {"user": USER, "text": ...}')
        text = data.get("text")
        if len(data["user"]) > 256 or (text is not None and len(str(text)) > TELL_MAX_TEXT):
            # Kept in the user's history: an unbounded text would let one client fill it.
            raise ValueError(f"tell's user is at most 256 characters, its text {TELL_MAX_TEXT}")
        # Charged to this connection's sender (its user; an anonymous one's address, shared by
        # every anonymous connection from it): beyond its share of the outbox waiting, or with
        # the outbox full, the message is delivered live but not kept ("kept": false).
        kept = await manager.send_message_to_user(
            data["user"], {"kind": "tell", "data": {"from": channel_id, "text": text}}, custom=True
        )
        return {**_delivered(manager), "kept": kept}

    def whoami(channel_id: str, data: Any) -> dict[str, Any]:
        return {"pid": os.getpid(), "worker": os.environ.get("DARA_WS_WORKER")}

    manager.add_ws_handler("ask", ask)
    manager.add_ws_handler("tell", tell)
    manager.add_ws_handler("whoami", whoami)
    return Endpoint(manager, authenticate)


def _delivered(manager: WebsocketManager) -> dict[str, Any]:
    """What a send answers: ``delivered`` only while the bus is up (or there is none). With
    Redis down the connections on this process got it, and no other (a kept ``tell`` reaches
    them once the bus is back): ``"delivered": false, "bus": "down"``."""
    if getattr(manager.backplane, "connected", True):
        return {"delivered": True}
    return {"delivered": False, "bus": "down"}


async def _clock(manager: WebsocketManager, interval: float) -> None:
    # Each process ticks its own clients only: with a backplane, a broadcast would give every
    # client one tick per process.
    while True:
        await asyncio.sleep(interval)
        frame = build_frame({"kind": "clock", "data": {"time": time.time()}}, custom=True)
        manager.deliver_local(manager.handlers.values(), frame)


async def _print_stats(manager: WebsocketManager, interval: float) -> None:
    # One JSON object per line on stdout: `dara-ws serve --stats-interval 1 | jq .connections`.
    while True:
        await asyncio.sleep(interval)
        print(json.dumps({"time": time.time(), "pid": os.getpid(), **manager.stats().as_dict()}), flush=True)


def open_files_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE, or ``None`` where there is none (no ``resource``
    module, or unlimited)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _max_connections(given: int | None) -> int | None:
    """``--max-connections``: as given (0: no cap), else from the open-files limit."""
    if given is not None:
        return given or None
    soft = open_files_limit()
    return None if soft is None else connection_cap(soft)


def _max_per_address(given: int | None, cap: int | None) -> int | None:
    """``--max-connections-per-address``: as given (0: no limit), else a quarter of the cap
    (none without a cap). Behind a reverse proxy every client has the proxy's address: name
    the proxy with ``--forwarded-allow-ips`` (each client is then counted by the address it
    names), or give 0."""
    if given is not None:
        return given or None
    return None if cap is None else max(1, cap // 4)


async def serve(args: argparse.Namespace) -> None:
    raised = raise_open_files_limit()
    if raised is not None:
        logger.info("open files limit raised from %d to %d (one per connection)", *raised)
    # Peers never take the last descriptors: beyond the cap a handshake is refused (503), and
    # what asyncio still fails to accept is logged as one line every few seconds, not one
    # traceback per socket.
    quiet_accept_errors(asyncio.get_running_loop())
    cap = _max_connections(args.max_connections)
    manager = WebsocketManager(ServerConfig(
        max_connections=cap,
        max_connections_per_address=_max_per_address(args.max_connections_per_address, cap),
        forwarded_allow_ips=args.forwarded_allow_ips,
    ))
    backplane = _backplane(args.redis_url)
    if backplane is not None:
        manager.backplane = backplane
    endpoint = build_demo(manager)
    stop = asyncio.Event()
    why: list[str] = []  # what stopped it, for the log

    def stop_on(sig: signal.Signals) -> None:
        why.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop_on, sig)
    if backplane is not None:
        try:
            # A worker started again (--bus-optional) serves through a Redis outage it starts
            # in, as the others do; a first start checks that Redis answers.
            await backplane.start(manager, wait=not args.bus_optional)
        except BackplaneError as exc:
            raise CLIError(f"cannot reach Redis at {backplane._where()}: {exc}") from None
    metrics: Any = contextlib.nullcontext(None)
    if args.metrics_port is not None:
        from .metrics import metrics_page, serve_metrics

        try:
            render = metrics_page(manager)
        except ImportError as exc:
            raise _missing_extra(exc) from None
        metrics = _serve_metrics(serve_metrics(render, args.host, args.metrics_port), args.host,
                                 args.metrics_port)
    clock = loop.create_task(_clock(manager, args.clock)) if args.clock > 0 else None
    stats = (loop.create_task(_print_stats(manager, args.stats_interval))
             if args.stats_interval > 0 else None)
    supervisor = await _stop_when_supervisor_gone(stop) if args.supervised else None
    try:
        listening = _serve(args.transport, endpoint, args.host, args.port, args.reuse_port)
        async with metrics as metrics_port, listening as port:
            if metrics_port is not None:
                worker = os.environ.get("DARA_WS_WORKER")
                whose = f"worker {worker} (pid {os.getpid()}): " if worker is not None else ""
                print(f"{whose}metrics on http://{_netloc(args.host, metrics_port)}/metrics", flush=True)
            loop_name = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            print(f"dara-ws demo ({args.transport}, {loop_name} loop) on"
                  f" ws://{_netloc(args.host, port)}{endpoint.path}", flush=True)
            await stop.wait()
            # Said before the drain, which may take shutdown_grace: an operator reading the log
            # of a process that went quiet sees why, on every transport.
            logger.info("stopping (%s): no new handshakes; closing %d connection(s) with 1001, "
                        "requests in flight given up to %g s", why[0] if why else "supervisor gone",
                        len(manager.handlers), manager.config.shutdown_grace)
        logger.info("stopped serving: every connection closed")
    finally:
        _ignore_stop_signals(loop)
        if supervisor is not None:
            # Its pipe closed on the way out (a failure of its own, or a stop): not a supervisor
            # gone, which the pipe's end would otherwise log.
            stop.set()
            supervisor.close()
        if clock is not None:
            clock.cancel()
        if stats is not None:
            stats.cancel()
        if backplane is not None:
            await backplane.stop()


class _SupervisorPipe(asyncio.Protocol):
    """A worker's stdin, the supervisor's pipe: nothing comes through it; its end means the
    supervisor is gone, and the worker stops as on SIGTERM (its clients get 1001)."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop.is_set():
            logger.warning("the supervisor is gone (its pipe ended): stopping this worker")
            self.stop.set()


async def _stop_when_supervisor_gone(stop: asyncio.Event) -> asyncio.BaseTransport:
    """``--supervised``: set ``stop`` once stdin, the supervisor's pipe, ends. Returns the pipe's
    transport, to close on the way out."""
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: _SupervisorPipe(stop), pipe)
    return transport


def _netloc(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """From now on SIGINT and SIGTERM are ignored: the clients are closed, what is left is to
    exit. Ctrl-C reaches a worker twice (from the terminal, and from the supervisor passing it
    on), and once the loop is closed asyncio restores their default action: a signal arriving
    then killed the worker (status -15), which the supervisor took for a failed stop (exit 1).
    Blocked meanwhile, so that none comes between asyncio's handler and the ignoring."""
    stops = {signal.SIGINT, signal.SIGTERM}
    mask = getattr(signal, "pthread_sigmask", None)  # not on Windows
    if mask is not None:
        mask(signal.SIG_BLOCK, stops)
    try:
        for sig in stops:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    finally:
        if mask is not None:
            mask(signal.SIG_UNBLOCK, stops)


def _backplane(url: str | None) -> Any:
    """The ``RedisBackplane`` of ``--redis-url`` (not connected yet), or ``None`` without one."""
    if not url:
        return None
    try:
        from dara_ws_redis import RedisBackplane, _without_password
    except ImportError as exc:
        raise _missing_extra(exc) from None
    try:
        return RedisBackplane(url)
    except ValueError as exc:  # no scheme, unknown scheme, bad port
        raise CLIError(f"--redis-url {_without_password(url)}: {exc}", status=2) from None


def _import_adapter(transport: str) -> None:
    """Import the adapter of ``--transport``: a missing extra is a ``CLIError`` naming it."""
    try:
        if transport == "asgi" and importlib.util.find_spec("websockets") is None:
            # uvicorn imports its WebSocket implementation only when the first upgrade arrives.
            raise ImportError('dara_ws_asgi needs the websockets library: pip install "dara-ws-core[asgi]"')
        if transport in _EXTRAS:
            importlib.import_module(f"dara_ws_{transport}")
    except ImportError as exc:
        raise _missing_extra(exc) from None


def _listen_error(exc: OSError, host: str, port: int, option: str = "--port") -> CLIError:
    """What to say when ``host:port`` (given by ``option``) cannot be bound: one line, not a
    traceback."""
    if exc.errno == errno.EADDRINUSE:
        return CLIError(f"cannot listen on {host}:{port}: the address is already in use"
                        f" (another dara-ws? choose one with {option})")
    if isinstance(exc, socket.gaierror):  # a --host that names no address
        return CLIError(f"cannot listen on {host}:{port}: {exc.strerror} (check --host)", status=2)
    # Not available, not allowed, any other refusal of the system.
    return CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


@contextlib.asynccontextmanager
async def _serve_metrics(listener: contextlib.AbstractAsyncContextManager[int], host: str,
                         port: int) -> AsyncIterator[int]:
    """The metrics listener, a port it cannot bind (in use, not allowed) being one line and
    status 1 as the WebSocket port's is, not a traceback."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            real_port = await stack.enter_async_context(listener)
        except OSError as exc:
            raise _listen_error(exc, host, port, "--metrics-port") from None
        yield real_port


@contextlib.asynccontextmanager
async def _serve(transport: str, endpoint: Endpoint, host: str, port: int, reuse_port: bool = False) -> Any:
    try:
        async with _listen(transport, endpoint, host, port, reuse_port) as real_port:
            yield real_port
    except OSError as exc:
        raise _listen_error(exc, host, port) from None
    except OverflowError as exc:  # a port out of range given through the API, not argparse
        raise CLIError(f"cannot listen on {host}:{port}: {exc}", status=2) from None


@contextlib.asynccontextmanager
async def _listen(transport: str, endpoint: Endpoint, host: str, port: int, reuse_port: bool) -> Any:
    _import_adapter(transport)
    # SO_REUSEPORT (--workers): every socket transport's serve() takes reuse_port.
    options: dict[str, Any] = {"reuse_port": True} if reuse_port else {}
    if transport == "websockets":
        from dara_ws_websockets import serve as ws_serve

        async with ws_serve(endpoint, host, port, **options) as server:
            yield server.port
    elif transport == "aiohttp":
        from dara_ws_aiohttp import serve as aio_serve

        async with aio_serve(endpoint, host, port, **options) as server:
            yield server.port
    elif transport == "asgi":
        from dara_ws_asgi import serve as asgi_serve

        async with asgi_serve(endpoint, host, port, **options) as server:
            yield server.port
    elif transport == "picows":
        from dara_ws_picows import serve as picows_serve

        async with picows_serve(endpoint, host, port, **options) as server:
            yield server.port
    else:
        raise SystemExit(f"unknown transport {transport!r}")


def _probe_connector(url: str, timeout: float) -> Any:
    """A connector for ``url`` from whichever client library is installed: websockets, else aiohttp
    (picows has no client in this project; the asgi extra brings websockets)."""
    try:
        from dara_ws_websockets import connect
    except ImportError:
        pass
    else:
        return lambda: connect(url, open_timeout=timeout)
    try:
        from dara_ws_aiohttp import connect as aio_connect
    except ImportError:
        pass
    else:
        return lambda: asyncio.wait_for(aio_connect(url), timeout)
    raise CLIError(
        'dara-ws probe needs a WebSocket client library: pip install "dara-ws-core[websockets]"'
        ' (or "dara-ws-core[aiohttp]")', status=2,
    )


def _check_probe_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port out of range
    except ValueError as exc:
        raise CLIError(f"{url} is not a URL: {exc}", status=2) from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise CLIError(f"{url} is not a WebSocket URL: give ws://HOST:PORT/PATH (or wss://)", status=2)


def _handshake_status(exc: BaseException) -> int | None:
    """The HTTP status a client library's handshake refusal carries (websockets' InvalidStatus,
    aiohttp's WSServerHandshakeError), or None."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status", None)
    return status if isinstance(status, int) else None


async def probe(args: argparse.Namespace) -> None:
    from dara_ws_core import DaraClient  # the client side: `serve` never loads it

    _check_probe_url(args.url)
    client = DaraClient(_probe_connector(args.url, args.timeout))
    client.on_request(lambda request: 42)
    try:
        async with client:
            print("channel:", client.channel)
            print("echo ->", await client.request("echo", {"hello": "world"}, timeout=args.timeout))
            print("ask  ->", await client.request("ask", "what is 6 * 7?", timeout=args.timeout))
    except AuthenticationFailed:
        raise CLIError(f"{args.url} refused the handshake (HTTP 401/403)") from None
    except TimeoutError:  # RequestTimeout too
        raise CLIError(f"{args.url}: no answer within {args.timeout} s") from None
    except OSError as exc:  # refused, unreachable, unknown host
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc.strerror or str(exc)
        raise CLIError(f"cannot connect to {args.url}: {reason} (is `dara-ws serve` running?)") from None
    except (ConnectionClosed, DaraWSError) as exc:
        raise CLIError(f"{args.url}: {exc}") from None
    except Exception as exc:  # the client library's own: a refused handshake, a bad answer
        status = _handshake_status(exc)
        if status == 404:
            raise CLIError(f"{args.url}: HTTP 404, no WebSocket endpoint at this path"
                           " (the demo's is /api/core/ws)") from None
        if status is not None:
            raise CLIError(f"{args.url} refused the handshake with HTTP {status}") from None
        raise CLIError(f"{args.url}: {type(exc).__name__}: {exc}") from None


def _port(text: str) -> int:
    """argparse type of a TCP port: 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def _seconds(text: str) -> float:
    """argparse type of an interval: a finite number of seconds >= 0 (0: off)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive number of seconds, not {text}")
    return seconds


def _positive_seconds(text: str) -> float:
    """argparse type of a time limit: a finite number of seconds > 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return seconds


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, once: an option whose help explains its default, or whose default is
    "not given" (None), gets no "(default: ...)" added."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``dara-ws`` command line: plain-text help with every default shown."""
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="dara-ws",
        description="The dara-ws-core demo server and a probe client.",
        epilog="Run `dara-ws serve`, then `dara-ws probe` from another shell. Docs: docs/index.md.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,probe}")
    s = sub.add_parser(
        "serve",
        help="run the demo server",
        description=(
            "Run the demo application: echo, chat, ask, tell and whoami handlers and a clock push, on"
            " ws://HOST:PORT/api/core/ws. ?token=NAME names the user; no token is anonymous."
            " Stops cleanly (close 1001) on Ctrl-C or SIGTERM."
        ),
        formatter_class=formatter,
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port)")
    s.add_argument(
        "--transport", choices=["websockets", "aiohttp", "asgi", "picows"], default="websockets",
        help="adapter to serve with (each needs its extra: pip install \"dara-ws-core[NAME]\")",
    )
    s.add_argument("--clock", type=_seconds, default=5.0, help="clock push interval in seconds (0: off)")
    s.add_argument(
        "--stats-interval", type=_seconds, default=0.0, metavar="SECONDS",
        help="print the server's stats (WebsocketManager.stats()) as one JSON line this often (0: off)",
    )
    s.add_argument(
        "--metrics-port", type=_port, default=None, metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; needs the"
             " prometheus extra); with --workers N, worker i on PORT+i, the same port when it is"
             " started again",
    )
    s.add_argument(
        "--redis-url", default=None,
        help="share clients with other processes through this Redis (needs the redis extra)",
    )
    s.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="asyncio",
        help="event loop (uvloop needs its extra: pip install \"dara-ws-core[uvloop]\")",
    )
    s.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="server processes sharing the port (SO_REUSEPORT; every transport);"
             " with --redis-url they form one cluster; one that dies is started again",
    )
    s.add_argument(
        "--max-connections", type=int, default=None, metavar="N",
        help="connections and handshakes served at once per process, beyond which a handshake"
             " gets 503 (default: the open-files limit less a tenth, at least 256 spare; 0: no cap)",
    )
    s.add_argument(
        "--max-connections-per-address", type=int, default=None, metavar="N",
        help="of those, sockets one remote host may hold (IPv6: one /64) before its next handshake"
             " gets 503 (default: a quarter of --max-connections; 0: no limit). Behind a reverse"
             " proxy or load balancer every client has its address: name it with"
             " --forwarded-allow-ips, or give 0",
    )
    s.add_argument(
        "--forwarded-allow-ips", default=None, metavar="IPS",
        help="comma-separated addresses or networks of the reverse proxies whose X-Forwarded-For"
             " names the client, for every bound counted per address (as uvicorn's option; '*':"
             " whatever connects, the right-most address counting). Default: none, the header"
             " is ignored",
    )
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set on workers
    # Set on workers: stop (as on SIGTERM) once stdin, the supervisor's pipe, ends.
    s.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    # Set on workers started again: listen whether or not Redis answers yet.
    s.add_argument("--bus-optional", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser(
        "probe",
        help="connect to a demo server and try it",
        description="Connect to a demo server, print the channel, run echo and ask, and exit.",
        formatter_class=formatter,
    )
    p.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/api/core/ws?token=probe",
                   help="the server's WebSocket URL")
    p.add_argument("--timeout", type=_positive_seconds, default=5.0, help="seconds to wait for each step")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``dara-ws``; exits 2 when it cannot run as asked, 1 when the run fails."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.command == "serve" and (args.max_connections or 0) < 0:
            raise CLIError("--max-connections must be >= 0 (0: no cap)", status=2)
        if args.command == "serve" and (args.max_connections_per_address or 0) < 0:
            raise CLIError("--max-connections-per-address must be >= 0 (0: no limit)", status=2)
        if args.command == "serve" and args.forwarded_allow_ips is not None:
            try:
                TrustedProxies(args.forwarded_allow_ips)
            except ValueError as exc:
                raise CLIError(f"--forwarded-allow-ips: {exc}", status=2) from None
        if args.command == "serve" and args.workers != 1:
            raise SystemExit(asyncio.run(_supervise(args)))
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
            loop_factory=_loop_factory(args.loop) if args.command == "serve" else None
        ) as runner:
            runner.run(serve(args) if args.command == "serve" else probe(args))
    except CLIError as exc:
        print(f"dara-ws: {exc}", file=sys.stderr)
        raise SystemExit(exc.status) from None


def _loop_factory(name: str) -> Any:
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise CLIError('--loop uvloop needs uvloop: pip install "dara-ws-core[uvloop]"', status=2) from None
    return uvloop.new_event_loop


async def _supervise(args: argparse.Namespace) -> int:
    from .workers import supervise

    if args.workers < 1:
        raise CLIError("--workers must be at least 1", status=2)
    if args.metrics_port and args.metrics_port + args.workers - 1 > 65535:
        raise CLIError(f"--workers {args.workers} serve metrics on --metrics-port {args.metrics_port}"
                       f" and the {args.workers - 1} ports after it: past 65535", status=2)
    # A missing extra or a wrong --redis-url is one error here, not one per worker.
    _loop_factory(args.loop)
    _import_adapter(args.transport)
    _backplane(args.redis_url)
    if args.metrics_port is not None:
        from .metrics import require_exporter

        try:
            require_exporter()
        except ImportError as exc:
            raise _missing_extra(exc) from None
    return await supervise(args)

