"""TLS on every socket transport: ``serve(..., ssl=context)`` serves ``wss://``, says so in its
``url``, and a real TLS client (websockets' and aiohttp's) completes a round trip through it.

The certificate is self-signed, made here for 127.0.0.1 (the ``cryptography`` package of the test
extra), and the clients trust it alone: a handshake on the wrong scheme or with no TLS at all
fails, so the round trip proves the bytes went through the server's context.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dara_ws_core import DaraClient, Endpoint, Identity, ServerConfig, Transport, WebsocketManager

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
    """The socket is counted against max_connections only once its TLS handshake is done: one
    that never starts it is held no longer than an unfinished WebSocket handshake (asyncio's
    default would hold it 60 s)."""
    serve = importlib.import_module(adapter).serve
    endpoint = _endpoint(ServerConfig(handshake_timeout=0.5))
    async with serve(endpoint, "127.0.0.1", 0, ssl=server_context(certificate)) as server:
        await _dropped_after_half_a_second(server.port)


async def test_a_hooked_uvicorn_of_the_application_drops_a_tls_handshake_never_made_after_handshake_timeout(
    certificate: tuple[Path, Path],
) -> None:
    """The same bound when the application runs uvicorn itself, with its certificate files, and
    hooks it (as the ASGI adapter's lifespan does, in the loop uvicorn serves in)."""
    import socket

    import uvicorn

    from dara_ws_asgi import asgi_app
    from dara_ws_asgi.uvicorn import hook_uvicorn

    endpoint = _endpoint(ServerConfig(handshake_timeout=0.5))
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
        await _dropped_after_half_a_second(sock.getsockname()[1])
    finally:
        await endpoint.shutdown(grace=0)
        server.should_exit = True
        await task
        sock.close()
