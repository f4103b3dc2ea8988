"""A sender's share of one user's history on a real ``redis-server`` (``_ROUTE_USER``): one
client flooding a user keeps a quarter of ``outbox_messages`` waiting and is refused the rest,
so another client's kept message to that user is still delivered (review 17 #4); what the user
reads frees the share (``_SETTLE``). Real servers on 127.0.0.1, the stock client, every served
transport."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import ServerConfig

from .stacks import running_stack
from .test_history_shares import tell_then_flood, texts
from .test_kept_delivery import SERVED
from .test_outbox_bounds_redis import _Manager, add_tell, hash_fields

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0


@pytest.mark.parametrize("transport", SERVED)
async def test_a_client_flooding_a_user_cannot_flush_another_clients_message_in_redis(
    redis_server: RedisServer, transport: str,
) -> None:
    bus = _Manager(redis_server, ServerConfig(outbox_messages=8))
    async with bus as manager, running_stack(transport, manager=manager) as stack:
        add_tell(manager)
        kept = await tell_then_flood(stack)
        await bus.backplane.flush()
        # A quarter of 8 kept: 2. The bus's first refusal is answered after the call (as for
        # the other bounds); from then on, for a while, mallory's messages to the victim are not
        # offered, and her messages to other users still are.
        assert kept[:2] == [True, True]
        assert 1 <= bus.backplane.stats.outbox_refused <= 6
        assert not bus.backplane.keeps("mallory", user_id="victim")
        assert bus.backplane.keeps("mallory", user_id="other") and bus.backplane.keeps("bob", user_id="victim")
        meta = f"{bus.namespace}:outbox-meta:victim"
        held = {k: int(v) for k, v in (await hash_fields(redis_server, meta)).items()
                if k.startswith(b"h:")}
        assert sorted(held.values()) == [1, 2]  # bob's one, mallory's two
        victim = await stack.client("victim:s1")
        assert await texts(victim, 3) == ["from bob", "spam 0", "spam 1"]

        async def nothing_held() -> bool:  # written: the shares are free again
            fields = await hash_fields(redis_server, meta)
            return not any(k.startswith((b"h:", b"hb:")) for k in fields)

        async with asyncio.timeout(TIMEOUT):  # polled as helpers.eventually does
            while not await nothing_held():
                await asyncio.sleep(0.005)
