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


class ScriptBatcher:
    """Auto-pipelining of one Lua script on an async client (redis.asyncio): the calls made in
    one loop tick, and those made while a pipeline is in flight, go out together as one
    pipeline of EVALSHA — each call still atomic on its own, each caller gets its own reply or
    error — with at most one pipeline in flight. A request then costs Redis and the process a
    share of one write and one read instead of its own; under load the batch grows instead of
    the number of round trips. (The pattern of `common.channels._Coalescer`, for replies.)

    One per client (`for_client`), used from that client's event loop only. A pipeline that
    has not answered after `timeout` seconds fails its calls with TimeoutError (the client has
    no socket timeout of its own, and no caller must wait forever behind a hung Redis)."""

    def __init__(self, client, script: str, timeout: float):
        self.client, self.script, self.sha, self.timeout = client, script, _sha(script), timeout
        self.pending: list[tuple[list, list, asyncio.Future]] = []
        self.running: asyncio.Task | None = None  # (the loop keeps only weak references to tasks)

    @classmethod
    def for_client(cls, client, script: str, timeout: float) -> ScriptBatcher:
        batchers = client.__dict__.setdefault("_script_batchers", {})
        batcher = batchers.get(script)
        if batcher is None:
            batcher = batchers[script] = cls(client, script, timeout)
        return batcher

    async def call(self, keys: list, args: list):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((keys, args, future))
        if self.running is None:
            self.running = asyncio.ensure_future(self._drain())  # after this tick's calls
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with asyncio.timeout(self.timeout):
                        replies = await self._execute(batch)
                except Exception as exc:  # noqa: BLE001 - each caller gets the error
                    replies = [exc] * len(batch)
                for (_, _, future), reply in zip(batch, replies):
                    if future.done():  # the caller gave up (its own timeout, a closed connection)
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.running = None

    async def _execute(self, batch) -> list:
        replies = await self._pipeline([(keys, args) for keys, args, _ in batch])
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:  # Redis forgot the script (a restart, SCRIPT FLUSH): load it once, run those again
            await self.client.script_load(self.script)
            for i, reply in zip(missing, await self._pipeline([batch[i][:2] for i in missing])):
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
