"""The channel layer: channels_redis with a connection pool that waits instead of failing.

redis-py's asyncio pool defaults to 100 connections per event loop and raises
MaxConnectionsError beyond that: thousands of sockets connecting or closing at once (a
socket storm) each take one for group_add/group_discard, and the overflow turned into
exceptions and dropped sockets. This pool is sized by setting and makes a caller wait for a
free connection (up to a timeout) instead, and connections are reused. After the storm the
pool keeps at most CHANNELS_REDIS_MAX_IDLE idle connections (the least recently used beyond
that are closed as they come back), so Redis's count returns to its baseline at once instead
of staying at the storm's peak (~184 idle connections were still held 20 minutes later)."""
from __future__ import annotations

import redis.asyncio as aioredis
from channels_redis.core import RedisChannelLayer
from django.conf import settings


class IdleCappedBlockingPool(aioredis.BlockingConnectionPool):
    """A blocking pool that keeps at most `max_idle` idle connections."""

    def __init__(self, *args, max_idle: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_idle = max_idle

    async def release(self, connection):
        await super().release(connection)
        surplus = []
        async with self._condition:
            # LIFO: the pool hands out from the end, so the front holds the longest idle.
            while len(self._available_connections) > self.max_idle:
                surplus.append(self._available_connections.pop(0))
        for extra in surplus:
            await extra.disconnect()


class PooledRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index):
        host = dict(self.hosts[index])
        address = host.pop("address")
        return IdleCappedBlockingPool.from_url(
            address,
            max_connections=settings.CHANNELS_REDIS_MAX_CONNECTIONS,
            timeout=settings.CHANNELS_REDIS_POOL_TIMEOUT,
            max_idle=settings.CHANNELS_REDIS_MAX_IDLE,
            **host,
        )
