"""One Redis client per process for derived state (GEO index, caches, throttles)."""
from __future__ import annotations

import hashlib
import logging
import threading

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}

# What a Redis call raises when Redis is down or slow; callers catch this and degrade.
RedisUnavailable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def get_redis(url: str | None = None) -> redis.Redis:
    """The process's client for `url` (default REDIS_URL)."""
    url = url or settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
                    socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT,
                    health_check_interval=30,
                    decode_responses=True,
                )
                _clients[url] = client
    return client


def fleet_key(name: str) -> str:
    """A key of the live fleet state (driver positions, GEO index, fix stream, digests).

    Every such key carries the fleet's hash tag, `{<REDIS_FLEET_TAG>}:<name>`, so one Lua
    script or MULTI may touch several of them under Redis Cluster (they share a hash slot);
    a deployment running several cities gives each its own tag, and so its own slot/node."""
    return f"{{{settings.REDIS_FLEET_TAG}}}:{name}"


def evalsha_many(client: redis.Redis, script: str, calls) -> list:
    """`script` once per (keys, args) of `calls`, in one round trip: a pipeline of EVALSHA,
    each call atomic on its own; the replies in order. A Redis that forgot the script (a
    restart, SCRIPT FLUSH) has it loaded once and gets the pipeline again."""
    sha = _sha(script)
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        try:
            return pipe.execute()
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
            client.script_load(script)
    raise AssertionError("unreachable")


_shas: dict[str, str] = {}


def _sha(script: str) -> str:
    sha = _shas.get(script)
    if sha is None:
        sha = _shas[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha
