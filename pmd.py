"""Does any transport negotiate permessage-deflate? usage: python pmd.py"""
import asyncio, sys
sys.path.insert(0, "/tmp/review16")
from common import *
async def main(t):
    p, port = start_server(t)
    try:
        c = await HostileClient.open(port)
        r = await c.handshake("/api/core/ws?token=a", [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")])
        print(t, r.status, r.header("Sec-WebSocket-Extensions"))
        c.abort()
    finally:
        stop_server(p)
for t in ["websockets", "aiohttp", "asgi", "picows"]:
    asyncio.run(main(t))
