"""One Redis client per process for derived state (GEO index, caches, throttles)."""
from __future__ import annotations

import asyncio
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
# Redis down, or refusing a command (OOM, a read-only replica after a failover, NOGROUP…):
# what a caller that must not fail on Redis catches
RedisFailed = (redis.exceptions.RedisError, *RedisUnavailable)


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


class TickBatcher:
    """Auto-pipelining: the items submitted in one loop tick, and those submitted while a flush
    is in flight, are flushed together, with at most one flush in flight; under load the batch
    grows instead of the number of round trips. Each submitter gets its own reply or error.
    Subclasses write `_flush(items) -> replies` (one per item, in order; an Exception instance
    is raised to that item's submitter). Used from one event loop only.

    `timeout`: a flush that has not finished after that many seconds fails its items with
    TimeoutError (for a client without a socket timeout of its own: no submitter waits forever
    behind a hung Redis); None: the client's own timeouts bound it."""

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout
        self.pending: list[tuple[object, asyncio.Future]] = []
        self.running: asyncio.Task | None = None  # (the loop keeps only weak references to tasks)

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.running is None:
            self.running = asyncio.ensure_future(self._drain())  # after this tick's submissions
        return await future

    async def _flush(self, items: list) -> list:
        raise NotImplementedError

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                items = [item for item, _ in batch]
                try:
                    async with asyncio.timeout(self.timeout):
                        replies = await self._flush(items)
                except Exception as exc:  # noqa: BLE001 - each submitter gets the error
                    replies = [exc] * len(batch)
                for (_, future), reply in zip(batch, replies):
                    if future.done():  # the submitter gave up (its own timeout, a closed connection)
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.running = None


class ScriptBatcher(TickBatcher):
    """One Lua script's calls on an async client (redis.asyncio), auto-pipelined (`TickBatcher`):
    a batch goes out as one pipeline of EVALSHA, each call still atomic on its own; a call
    answered NOSCRIPT (a restarted Redis, SCRIPT FLUSH) has the script loaded once and is sent
    again. One per client and script (`for_client`)."""

    def __init__(self, client, script: str, timeout: float):
        super().__init__(timeout)
        self.client, self.script, self.sha = client, script, _sha(script)

    @classmethod
    def for_client(cls, client, script: str, timeout: float) -> ScriptBatcher:
        batchers = client.__dict__.setdefault("_script_batchers", {})
        batcher = batchers.get(script)
        if batcher is None:
            batcher = batchers[script] = cls(client, script, timeout)
        return batcher

    async def call(self, keys: list, args: list):
        return await self.submit((keys, args))

    async def _flush(self, calls: list) -> list:
        replies = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            await self.client.script_load(self.script)
            for i, reply in zip(missing, await self._pipeline([calls[i] for i in missing])):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls) -> list:
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)


_shas: dict[str, str] = {}


def _sha(script: str) -> str:
    sha = _shas.get(script)
    if sha is None:
        sha = _shas[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha
