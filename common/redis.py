"""One Redis client per process for derived state (GEO index, caches, throttles)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time

import redis
from django.conf import settings
from redis.connection import parse_url

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


class RedisBreakerOpen(redis.exceptions.ConnectionError):
    """Raised at once, instead of waiting out a timeout, by a call to a Redis that has just timed
    out again and again (`RedisBreaker`)."""


# What a Redis call raises when Redis is down or slow; callers catch this and degrade.
RedisUnavailable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# Redis down, or refusing a command (OOM, a read-only replica after a failover, NOGROUP…):
# what a caller that must not fail on Redis catches
RedisFailed = (redis.exceptions.RedisError, *RedisUnavailable)


class RedisBreaker:
    """A Redis that hangs (a paused or partitioned server, a failover whose old address drops
    packets) costs every call its whole timeout: a request made four or five Redis calls, and
    its after-commit broadcast waited for the channel layer's 15 s, so one hung Redis stalled
    every write for seconds. After REDIS_BREAKER_TIMEOUTS timeouts to one server within
    REDIS_BREAKER_SECONDS, this process's calls to it fail at once (`RedisBreakerOpen`, a
    ConnectionError: every caller already degrades on it) for REDIS_BREAKER_SECONDS; then one
    call goes through as a probe (the others still fail at once): its success closes the
    breaker, its timeout opens it again.

    What counts: timeouts of a command on its connection only (not a wait for a free pooled
    connection, not the fast lane's own timeout: both grow with load), and timeouts within half
    REDIS_SOCKET_TIMEOUT of the last one counted are one stall (one slow reply that timed out
    every call in flight at once), so only a Redis that stays silent call after call opens it."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._timeouts: dict[str, list[float]] = {}
        self._open_until: dict[str, float] = {}
        self._probe_until: dict[str, float] = {}

    def allow(self, address: str) -> bool:
        """Whether a call to `address` may go out now (the first after the open spell is the probe)."""
        if address not in self._open_until:
            return True
        now = self._clock()
        with self._lock:
            until = self._open_until.get(address)
            if until is None:
                return True
            if now < until or now < self._probe_until.get(address, 0.0):
                return False
            self._probe_until[address] = now + settings.REDIS_BREAKER_SECONDS
            return True

    def is_open(self, address: str) -> bool:
        """True while calls to `address` should not be made: open, or its probe out (a caller
        that cannot tell the breaker of an answer asks this; it never takes the probe)."""
        until = self._open_until.get(address)
        if until is None:
            return False
        now = self._clock()
        return now < until or now < self._probe_until.get(address, 0.0)

    def check(self, address: str) -> None:
        if not self.allow(address):
            raise RedisBreakerOpen(f"Redis at {address} timed out just now; not waiting for it again yet")

    def succeeded(self, address: str) -> None:
        """A call to `address` was answered: a probe closes the breaker."""
        if address in self._open_until:
            with self._lock:
                self._open_until.pop(address, None)
                self._probe_until.pop(address, None)
                self._timeouts.pop(address, None)

    def timed_out(self, address: str) -> None:
        seconds = settings.REDIS_BREAKER_SECONDS
        if seconds <= 0:
            return
        now = self._clock()
        with self._lock:
            until = self._open_until.get(address)
            if until is not None:
                if now < until:
                    return  # a call sent before it opened: not a new failure
                self._open_until[address] = now + seconds  # the probe (or a call beside it) timed out
                self._probe_until.pop(address, None)
                return
            seen = self._timeouts.get(address, [])
            if seen and now - seen[-1] < settings.REDIS_SOCKET_TIMEOUT / 2:
                return  # the same stall
            recent = [t for t in seen if now - t < seconds] + [now]
            if len(recent) < settings.REDIS_BREAKER_TIMEOUTS:
                self._timeouts[address] = recent
                return
            self._timeouts.pop(address, None)
            self._open_until[address] = now + seconds
        logger.warning("Redis at %s timed out %d times: calls to it fail at once for %.1f s",
                       address, len(recent), seconds)

    def reset(self) -> None:
        with self._lock:
            self._timeouts.clear()
            self._open_until.clear()
            self._probe_until.clear()


breaker = RedisBreaker()


def is_timeout(exc: BaseException) -> bool:
    """A command that timed out waiting for Redis (redis-py's timeout, a socket's, asyncio's),
    also as the cause of another error (kombu wraps redis-py's) — but not a ConnectionError
    caused by a timeout: that is a wait for a free pooled connection, which grows with load."""
    if isinstance(exc, redis.exceptions.ConnectionError):
        return False
    return any(isinstance(e, (redis.exceptions.TimeoutError, TimeoutError))
               for e in (exc, exc.__cause__, exc.__context__) if e is not None)


@functools.lru_cache(maxsize=32)
def redis_address(url: str) -> str:
    """How the breaker names the server of `url`: host:port, or the socket's path."""
    options = parse_url(url)
    return options.get("path") or f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


def _address(connection) -> str:
    address = connection.__dict__.get("_breaker_address")
    if address is None:
        address = connection._breaker_address = getattr(connection, "path", None) or f"{connection.host}:{connection.port}"
    return address


class TimeoutCounting:
    """On a redis-py (sync) connection class: a command's timeout is told to the breaker (once
    per call: a connect inside a command raises through both). Plain try blocks, not a context
    manager: every Redis command of the web and the consumer runs through these."""

    def connect_check_health(self, *args, **kwargs):
        try:
            return super().connect_check_health(*args, **kwargs)
        except redis.exceptions.TimeoutError as exc:
            _count(self, exc)
            raise

    def send_packed_command(self, *args, **kwargs):
        try:
            return super().send_packed_command(*args, **kwargs)
        except redis.exceptions.TimeoutError as exc:
            _count(self, exc)
            raise

    def read_response(self, *args, **kwargs):
        try:
            return super().read_response(*args, **kwargs)
        except redis.exceptions.TimeoutError as exc:
            _count(self, exc)
            raise


def _count(connection, exc: BaseException) -> None:
    if not getattr(exc, "_breaker_counted", False):
        exc._breaker_counted = True
        breaker.timed_out(_address(connection))


@functools.cache
def timeout_counting(connection_class: type) -> type:
    """`connection_class` (plain, TLS or Unix socket, as the URL's scheme says) with TimeoutCounting."""
    return type(connection_class.__name__, (TimeoutCounting, connection_class), {})


class GuardedPipeline(redis.client.Pipeline):
    breaker_address = ""

    def execute(self, raise_on_error: bool = True):
        if self.command_stack or self.watching:
            breaker.check(self.breaker_address)
        result = super().execute(raise_on_error)
        breaker.succeeded(self.breaker_address)
        return result


class GuardedRedis(redis.Redis):
    """A client that asks the breaker before each command or pipeline, before it takes a pooled
    connection (a healthy connection is not closed for it), and tells it of each answer."""

    breaker_address = ""

    def execute_command(self, *args, **options):
        breaker.check(self.breaker_address)
        result = super().execute_command(*args, **options)
        breaker.succeeded(self.breaker_address)
        return result

    def pipeline(self, transaction=True, shard_hint=None) -> GuardedPipeline:
        pipe = GuardedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.breaker_address = self.breaker_address
        return pipe


def unguarded(client: redis.Redis) -> redis.Redis:
    """The same pool without the breaker's gate (the health check asks Redis itself)."""
    plain = client.__dict__.get("_unguarded")
    if plain is None:
        plain = client._unguarded = redis.Redis(connection_pool=client.connection_pool)
    return plain


def get_redis(url: str | None = None) -> redis.Redis:
    """The process's client for `url` (default REDIS_URL), its calls gated by the breaker."""
    url = url or settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                options = parse_url(url)  # what from_url does, with the URL's connection class wrapped
                connection_class = timeout_counting(options.pop("connection_class", redis.Connection))
                kwargs = {
                    "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
                    "socket_connect_timeout": settings.REDIS_SOCKET_TIMEOUT,
                    "health_check_interval": 30,
                    "decode_responses": True,
                }
                kwargs.update(options)  # the URL's own options win, as with from_url
                pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
                client = GuardedRedis(connection_pool=pool)
                client.breaker_address = redis_address(url)
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
