"""The channel layer: channels_redis with a connection pool that waits instead of failing.

redis-py's asyncio pool defaults to 100 connections per event loop and raises
MaxConnectionsError beyond that: thousands of sockets connecting or closing at once (a
socket storm) each take one for group_add/group_discard, and the overflow turned into
exceptions and dropped sockets. This pool is sized by setting and makes a caller wait for a
free connection (up to a timeout) instead; connections are reused, so Redis's count returns
to its baseline after the storm."""
from __future__ import annotations

import redis.asyncio as aioredis
from channels_redis.core import RedisChannelLayer
from django.conf import settings


class PooledRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index):
        host = dict(self.hosts[index])
        address = host.pop("address")
        return aioredis.BlockingConnectionPool.from_url(
            address,
            max_connections=settings.CHANNELS_REDIS_MAX_CONNECTIONS,
            timeout=settings.CHANNELS_REDIS_POOL_TIMEOUT,
            **host,
        )
