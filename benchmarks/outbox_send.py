"""The per-user outbox's cost on ``send_message_to_user``, in one process (in-memory transport,
no backplane): microseconds per send with the outbox off and on, alternating runs, and the ratio
of the medians (same run: the machine may be shared).

    python -m benchmarks.outbox_send [--users 50] [--per-user 2] [--sends 20000] [--repeats 5]
"""

from __future__ import annotations

__all__ = ["main", "measure"]

import argparse
import asyncio
import statistics
import time

from dara_ws_core import (
    Endpoint,
    HandshakeRequest,
    Identity,
    MemoryServer,
    ServerConfig,
    WebsocketManager,
)


async def measure(outbox: int, *, users: int, per_user: int, sends: int) -> float:
    """Microseconds per ``send_message_to_user`` to users each with ``per_user`` connections
    whose clients read all the time (``outbox``: ``ServerConfig.outbox_messages``)."""
    manager = WebsocketManager(ServerConfig(outbox_messages=outbox))

    def identify(request: HandshakeRequest) -> Identity:
        user = request.query.get("u", "x")
        return Identity(user_id=user, session_id=user)

    endpoint = Endpoint(manager, identify)
    server = MemoryServer(endpoint, max_queue=sends + 10)
    clients = [await server.connect(f"/api/core/ws?u=u{i % users}", [])
               for i in range(users * per_user)]
    for client in clients:
        await client.receive()  # init

    async def drain(client: object) -> None:
        while True:
            await client.receive()  # type: ignore[attr-defined]

    readers = [asyncio.create_task(drain(client)) for client in clients]
    start = time.perf_counter()
    for i in range(sends):
        await manager.send_message_to_user(f"u{i % users}", {"i": i})
        if i % users == 0:
            await asyncio.sleep(0)  # let the readers read
    elapsed = time.perf_counter() - start
    for reader in readers:
        reader.cancel()
    await endpoint.shutdown(grace=0)
    await server.close()
    return elapsed / sends * 1e6


async def _main(args: argparse.Namespace) -> None:
    runs: dict[int, list[float]] = {0: [], 100: []}
    for _ in range(args.repeats):
        for outbox, times in runs.items():
            times.append(await measure(outbox, users=args.users, per_user=args.per_user,
                                       sends=args.sends))
    off, on = statistics.median(runs[0]), statistics.median(runs[100])
    print(f"outbox off {off:.2f} us/send ({min(runs[0]):.2f}-{max(runs[0]):.2f}), "
          f"on {on:.2f} us/send ({min(runs[100]):.2f}-{max(runs[100]):.2f}), "
          f"ratio {on / off:.2f} (of the minima {min(runs[100]) / min(runs[0]):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--per-user", type=int, default=2)
    parser.add_argument("--sends", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
