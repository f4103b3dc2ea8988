"""TLS on every socket transport: ``serve(..., ssl=context)`` serves ``wss://``, says so in its
``url``, and a real TLS client (websockets' and aiohttp's) completes a round trip through it.

The certificate is self-signed, made here for 127.0.0.1 (the ``cryptography`` package of the test
extra), and the clients trust it alone: a handshake on the wrong scheme or with no TLS at all
fails, so the round trip proves the bytes went through the server's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import importlib
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dara_ws_core import DEFAULT_PATH, DaraClient, Endpoint, Identity, ServerConfig, Transport, WebsocketManager
from tests.helpers import eventually
from tests.hostile import HostileClient

TIMEOUT = 10.0
ADAPTERS = ("dara_ws_websockets", "dara_ws_aiohttp", "dara_ws_asgi", "dara_ws_picows")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """Trusts the test certificate alone, and checks that it names 127.0.0.1."""
    return ssl.create_default_context(cafile=str(certificate[0]))


async def _websockets(url: str, context: ssl.SSLContext) -> Transport:
    from dara_ws_websockets import connect

    return await connect(url, ssl=context, close_timeout=1)


async def _aiohttp(url: str, context: ssl.SSLContext) -> Transport:
    from dara_ws_aiohttp import connect

    return await connect(url, ssl=context)


CLIENTS: dict[str, Callable[[str, ssl.SSLContext], Awaitable[Transport]]] = {
    "websockets": _websockets,
    "aiohttp": _aiohttp,
}


def _endpoint(config: ServerConfig | None = None) -> Endpoint:
    manager = WebsocketManager(config or ServerConfig())
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    return Endpoint(manager, lambda request: Identity(user_id="alice", session_id="s1"))


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_serve_takes_a_tls_context(adapter: str, client: str, certificate: tuple[Path, Path]) -> None:
    serve = importlib.import_module(adapter).serve
    connect = CLIENTS[client]
    async with serve(_endpoint(), "127.0.0.1", 0, ssl=server_context(certificate)) as server:
        assert server.url == f"wss://127.0.0.1:{server.port}/api/core/ws"
        context = client_context(certificate)
        async with asyncio.timeout(TIMEOUT), DaraClient(lambda: connect(server.url, context),
                                                        ping_interval=None) as dara:
            assert await dara.request("echo", {"over": "tls"}, timeout=TIMEOUT) == {"over": "tls"}


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_plain_client_is_not_served_by_a_tls_server(adapter: str, certificate: tuple[Path, Path]) -> None:
    """The same port spoken to without TLS: no upgrade, whatever the library answers."""
    serve = importlib.import_module(adapter).serve
    async with serve(_endpoint(), "127.0.0.1", 0, ssl=server_context(certificate)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /api/core/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read(1024)
            assert not answer.startswith(b"HTTP/1.1 101")
        finally:
            writer.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_without_a_context_the_url_says_ws(adapter: str) -> None:
    serve = importlib.import_module(adapter).serve
    async with serve(_endpoint(), "127.0.0.1", 0) as server:
        assert server.url == f"ws://127.0.0.1:{server.port}/api/core/ws"


async def _dropped_after_half_a_second(port: int) -> None:
    """A TCP connection to ``port`` that never starts its TLS handshake is closed by the server
    after the endpoint's ``handshake_timeout`` (0.5 s here), not asyncio's 60 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.timeout(5.0):  # far below 60 s, far above 0.5 s
            assert await reader.read(1024) == b""
        assert loop.time() - start >= 0.4
    finally:
        writer.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_tls_handshake_never_made_is_dropped_after_handshake_timeout(
    adapter: str, certificate: tuple[Path, Path]
) -> None:
    """A socket that never starts its TLS handshake is held no longer than an unfinished
    WebSocket handshake (asyncio's default would hold it 60 s)."""
    serve = importlib.import_module(adapter).serve
    endpoint = _endpoint(ServerConfig(handshake_timeout=0.5))
    async with serve(endpoint, "127.0.0.1", 0, ssl=server_context(certificate)) as server:
        await _dropped_after_half_a_second(server.port)


@contextlib.asynccontextmanager
async def _hooked_uvicorn(endpoint: Endpoint, certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """The port of a uvicorn server the application runs itself, with its certificate files,
    and hooks (as the ASGI adapter's lifespan does, in the loop uvicorn serves in)."""
    import socket

    import uvicorn

    from dara_ws_asgi import asgi_app
    from dara_ws_asgi.uvicorn import hook_uvicorn

    certfile, keyfile = certificate
    server = uvicorn.Server(uvicorn.Config(asgi_app(endpoint), lifespan="off", log_config=None,
                                           log_level="warning", ssl_certfile=str(certfile),
                                           ssl_keyfile=str(keyfile)))
    server.config.load()
    assert hook_uvicorn(endpoint, server)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:  # uvicorn has only this flag to tell
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        await endpoint.shutdown(grace=0)
        server.should_exit = True
        await task
        sock.close()


async def test_a_hooked_uvicorn_of_the_application_drops_a_tls_handshake_never_made_after_handshake_timeout(
    certificate: tuple[Path, Path],
) -> None:
    """The same bound when the application runs uvicorn itself, with its certificate files, and
    hooks it (as the ASGI adapter's lifespan does, in the loop uvicorn serves in)."""
    endpoint = _endpoint(ServerConfig(handshake_timeout=0.5))
    async with _hooked_uvicorn(endpoint, certificate) as port:
        await _dropped_after_half_a_second(port)


#: Every TLS server: each adapter's serve(ssl=), and a uvicorn the application runs and hooks.
TLS_SERVERS = (*ADAPTERS, "uvicorn-of-the-application")


@contextlib.asynccontextmanager
async def _tls_server(name: str, endpoint: Endpoint, certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """The port of ``endpoint`` served over TLS by ``name`` (one of :data:`TLS_SERVERS`)."""
    if name not in ADAPTERS:
        async with _hooked_uvicorn(endpoint, certificate) as port:
            yield port
        return
    serve = importlib.import_module(name).serve
    async with serve(endpoint, "127.0.0.1", 0, ssl=server_context(certificate)) as server:
        yield server.port


def _url(port: int, path: str = DEFAULT_PATH) -> str:
    return f"wss://127.0.0.1:{port}{path}"


async def _tls_round_trip(port: int, certificate: tuple[Path, Path], endpoint: Endpoint, **options: Any) -> None:
    """A TLS client (websockets', from ``options["local_addr"]`` if given) connects, is
    served a round trip while the endpoint counts its socket, and leaves."""
    from dara_ws_websockets import connect

    context = client_context(certificate)
    async with asyncio.timeout(TIMEOUT), DaraClient(
            lambda: connect(_url(port), ssl=context, close_timeout=1, **options), ping_interval=None) as dara:
        assert await dara.request("echo", {"over": "tls"}, timeout=TIMEOUT) == {"over": "tls"}
        assert endpoint.slots.admitted >= 1


def _slots_empty(endpoint: Endpoint) -> bool:
    slots = endpoint.slots
    return (slots.admitted, slots.refusing, slots.waiting, slots.by_address) == (0, 0, 0, {})


@pytest.mark.parametrize("name", TLS_SERVERS)
async def test_tcp_sockets_beyond_max_connections_are_closed_before_any_tls_and_a_tls_client_gets_in_after(
    name: str, certificate: tuple[Path, Path],
) -> None:
    """A TLS socket counts from its TCP accept: N+K sockets that never start their TLS
    handshake leave N open (K closed at once, long before handshake_timeout), never more; once
    they are gone every slot is free, and a TLS client is served. A listener with ssl= let
    them all in, counted nowhere until their TLS handshakes ended."""
    n, k = 3, 2
    endpoint = _endpoint(ServerConfig(max_connections=n, handshake_timeout=60.0))
    async with _tls_server(name, endpoint, certificate) as port:
        attackers = [await HostileClient.open(port) for _ in range(n + k)]
        try:
            await eventually(lambda: sum(a.lost for a in attackers) == k, f"{k} of the sockets closed", timeout=5)
            assert endpoint.slots.admitted == n
            assert endpoint.manager.stats().handshakes_rejected.get("evicted", 0) == k
        finally:
            for attacker in attackers:
                attacker.abort()
        await eventually(lambda: _slots_empty(endpoint), "every slot freed")
        await _tls_round_trip(port, certificate, endpoint)
        await eventually(lambda: _slots_empty(endpoint), "the client's slot freed")


@pytest.mark.parametrize("name", TLS_SERVERS)
async def test_tcp_sockets_beyond_max_connections_per_address_are_closed_before_any_tls(
    name: str, certificate: tuple[Path, Path],
) -> None:
    """One address holds max_connections_per_address TLS sockets at most, from their accept,
    while a TLS client from another address (every 127/8 address is this machine) is served."""
    per_address, k = 2, 3
    endpoint = _endpoint(ServerConfig(max_connections=8, max_connections_per_address=per_address,
                                      handshake_timeout=60.0))
    async with _tls_server(name, endpoint, certificate) as port:
        attackers = [await HostileClient.open(port) for _ in range(per_address + k)]
        try:
            await eventually(lambda: sum(a.lost for a in attackers) == k, f"{k} of the sockets closed", timeout=5)
            assert endpoint.slots.by_address == {"127.0.0.1": per_address}
            await _tls_round_trip(port, certificate, endpoint, local_addr=("127.0.0.2", 0))
        finally:
            for attacker in attackers:
                attacker.abort()
        await eventually(lambda: _slots_empty(endpoint), "every slot freed")
        await _tls_round_trip(port, certificate, endpoint)  # 127.0.0.1 again
        await eventually(lambda: _slots_empty(endpoint), "the client's slot freed")


@pytest.mark.parametrize("name", TLS_SERVERS)
async def test_a_tls_socket_holds_its_slot_from_accept_and_frees_it_once_however_it_ends(
    name: str, certificate: tuple[Path, Path],
) -> None:
    """Counted before its TLS handshake, a socket's slot is freed once whether its handshake
    times out, fails (no TLS at all, a client that does not trust the certificate), its
    upgrade is refused after it, or it closes normally: the counts return to zero."""
    import websockets

    from dara_ws_websockets import connect

    endpoint = _endpoint(ServerConfig(max_connections=8, max_connections_per_address=8, handshake_timeout=0.5))
    async with _tls_server(name, endpoint, certificate) as port:
        silent = [await HostileClient.open(port) for _ in range(3)]
        await eventually(lambda: endpoint.slots.admitted == 3, "the sockets counted before any TLS", timeout=5)
        for socket_ in silent:  # handshake_timeout
            assert await socket_.wait_disconnected(TIMEOUT)
        await eventually(lambda: _slots_empty(endpoint), "the timed-out sockets' slots freed")
        async with await HostileClient.open(port) as plain:  # no TLS: the handshake fails
            plain.write(b"GET /api/core/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert await plain.wait_disconnected(TIMEOUT)
        with pytest.raises(ssl.SSLError):  # the client refuses the certificate
            await connect(_url(port), ssl=ssl.create_default_context(), open_timeout=TIMEOUT)
        with pytest.raises(websockets.InvalidStatus):  # refused after the TLS handshake: 404
            await connect(_url(port, "/elsewhere"), ssl=client_context(certificate), open_timeout=TIMEOUT)
        await _tls_round_trip(port, certificate, endpoint)
        await eventually(lambda: _slots_empty(endpoint), "every slot freed")


@pytest.mark.parametrize("name", TLS_SERVERS)
async def test_tls_connections_end_with_no_error_logged(
    name: str, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS connection a client closes (with either client), or whose upgrade is refused
    after its TLS handshake, ends with no ERROR record: aiohttp's protocol read the socket's
    TLS context on the client's end of stream after closing it twice, which asyncio's TLS
    transport answers with an AttributeError, logged with a traceback per connection."""
    import websockets

    from dara_ws_websockets import connect

    endpoint = _endpoint(ServerConfig(max_connections=8))
    with caplog.at_level(logging.WARNING):
        async with _tls_server(name, endpoint, certificate) as port:
            context = client_context(certificate)
            for client in CLIENTS.values():
                connector = functools.partial(client, _url(port), context)
                async with asyncio.timeout(TIMEOUT), DaraClient(connector, ping_interval=None) as dara:
                    assert await dara.request("echo", 1, timeout=TIMEOUT) == 1
            with pytest.raises(websockets.InvalidStatus):
                await connect(_url(port, "/elsewhere"), ssl=context, open_timeout=TIMEOUT)
            await eventually(lambda: _slots_empty(endpoint), "every socket gone")
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors


class _HeldTLSClient:
    """A TLS 1.2 client driven by hand over a real socket: it sends its hello, reads the
    server's flight, and holds its last handshake message, so that the server has a socket in
    the middle of its TLS handshake for as long as the test wants."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int, certificate: tuple[Path, Path]) -> _HeldTLSClient:
        self = cls()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        context = client_context(certificate)
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the client's Finished comes last
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        self.writer.write(outgoing.read())  # its hello
        async with asyncio.timeout(TIMEOUT):
            for _ in range(16):  # the server's flight comes in a few reads
                data = await self.reader.read(65536)
                assert data, "the server closed the socket in its TLS handshake"
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                if outgoing.pending:  # its last message, held: the server waits for it
                    return self
        raise AssertionError("the server's TLS flight never came whole")

    async def ended_by_server(self) -> bool:
        """Whether the server closes the socket within ``TIMEOUT``."""
        try:
            async with asyncio.timeout(TIMEOUT):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.mark.parametrize("name", TLS_SERVERS)
async def test_a_tls_handshake_in_progress_when_serving_stops_is_closed_not_served_after(
    name: str, certificate: tuple[Path, Path],
) -> None:
    """Listening stops first, and a socket still in its TLS handshake then can never be
    served: the shutdown closes it and frees its slot. It was left to finish its handshake
    (up to handshake_timeout, a task of the server's outliving serve()), then answered 403 by
    the endpoint shut down: the answer a client gets nowhere else once listening stops."""
    endpoint = _endpoint(ServerConfig(max_connections=8, handshake_timeout=60.0))
    async with _tls_server(name, endpoint, certificate) as port:
        held = await _HeldTLSClient.open(port, certificate)
        assert endpoint.slots.admitted == 1
    try:
        assert await held.ended_by_server(), "the socket in its TLS handshake outlived the shutdown"
        await eventually(lambda: _slots_empty(endpoint), "its slot freed")
    finally:
        held.close()
