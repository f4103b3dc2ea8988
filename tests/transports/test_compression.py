"""No transport negotiates permessage-deflate (RFC 7692), whatever the client offers and however
the server library is set up, on real sockets on 127.0.0.1.

Compression is off in every adapter's ``serve()``; under a uvicorn the application runs itself
(``uvicorn app:app``, whose ``ws_per_message_deflate`` is on unless told), websockets inflated a
message as its frames arrived, up to ``ws_max_size``, where the frame headers (and so
``max_receiving_total_bytes``) count only its compressed bytes: six connections that each sent a
15 KB fragment inflating to 15 MiB, never finished, made the server hold some 90 MiB, with the
receiving budget at 92 KB. The bounded protocol that hooks such a server turns compression off.
"""

from __future__ import annotations

import json
import zlib

import pytest

from dara_ws_core import ServerConfig
from tests.hostile import CLOSE, TEXT, HostileClient
from tests.stacks import TRANSPORTS, served_port

TOKEN_PATH = "/api/core/ws?token=mallory:s1"
CONFIG = ServerConfig(ping_interval=None)
OFFERS = [
    "permessage-deflate",
    "permessage-deflate; client_max_window_bits",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover, permessage-deflate",
]


def _deflated(data: bytes) -> bytes:
    """``data`` compressed as one permessage-deflate message (RFC 7692 7.2.1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize("served", [*sorted(t for t in TRANSPORTS if t != "memory"), "uvicorn-defaults"])
async def test_no_transport_negotiates_compression_and_a_compressed_frame_closes_with_1002(served: str) -> None:
    ping = json.dumps({"type": "ping", "message": None}).encode()
    async with served_port(served, CONFIG) as port:
        for offer in OFFERS:
            async with await HostileClient.open(port) as client:
                response = await client.handshake(TOKEN_PATH, [("Sec-WebSocket-Extensions", offer)])
                assert response.status == 101, response
                assert response.header("Sec-WebSocket-Extensions") is None, response
                assert json.loads((await client.read_frame()).text)["type"] == "init"
                client.send_frame(TEXT, ping)  # uncompressed: served
                assert json.loads((await client.read_frame()).text)["type"] == "pong"
        # A compressed fragment that would inflate to 4 MiB: RSV1 without an extension.
        async with await HostileClient.open(port) as client:
            assert (await client.handshake(TOKEN_PATH, [("Sec-WebSocket-Extensions", OFFERS[0])])).status == 101
            await client.read_frame()
            client.send_frame(TEXT, _deflated(b'{"type":"ping","message":"' + b"x" * (4 << 20)), rsv=4, fin=False)
            closing = await client.read_frame()
            assert (closing.opcode, closing.close_code) == (CLOSE, 1002)
