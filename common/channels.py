"""The channel layer: channels_redis with a connection pool that waits instead of failing.

redis-py's asyncio pool defaults to 100 connections per event loop and raises
MaxConnectionsError beyond that: thousands of sockets connecting or closing at once (a
socket storm) each take one for group_add/group_discard, and the overflow turned into
exceptions and dropped sockets. This pool is sized by setting and makes a caller wait for a
free connection (up to a timeout) instead, and connections are reused. After the storm the
pool keeps at most CHANNELS_REDIS_MAX_IDLE idle connections (those idle longer than
CHANNELS_REDIS_IDLE_SECONDS beyond the cap are closed), so Redis's count returns to its
baseline seconds after the storm instead of staying at its peak (~184 idle connections were
still held 20 minutes later).

The pool's connections also deliver a task's cancellation that redis-py drops: with a
socket_timeout set (the hosts' CHANNELS_REDIS_SOCKET_TIMEOUT) it writes each command under
asyncio.wait_for, and on Python 3.11 wait_for returns normally when the task is cancelled
just as the write completes (CPython gh-86296, fixed in 3.12). A consumer's receive task,
cancelled when its socket closed, then went on with BZPOPMIN every 5 s and its socket's
application never ended (the socket storm tests waited out their 30 s disconnect timeout).

`group_send_many` sends several groups' messages with one round trip for all their member
lists (a request's events, `common.broadcast.send_many`): `group_send` reads the members with
two commands per message, and most of a request's groups (ops, a driver's) have few or no
sockets. The members of a shard's groups are read by one script (one command to pack and one
reply to parse: redis-py's per-command cost was most of a request's event sending), and a
group's messages go to its members by one script per shard, in order, where `group_send`
makes two round trips a message.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection, _wrap_close
from channels_redis.utils import create_pool
from django.conf import settings

from common.metrics import LIVE_EVENTS_DROPPED, PUBSUB_RECONNECTS
from common.redis import TickBatcher

logger = logging.getLogger(__name__)

# A group's messages, in order, to each of its members' channels (the expired messages of
# those channels dropped first, each channel's capacity respected): what `group_send` does
# with a pipeline and a script per message, in one script. KEYS: the channel keys (n);
# ARGV: message i's payload for key j at (i-1)*n+j, for m messages; then each key's
# capacity; then the time, m, the expiry cutoff and the expiry in seconds. A message's score
# (the order receivers pop them in) is the time, or just above the channel's newest message
# if that is later: each message above the one before it, so a channel's messages from these
# scripts come out in the order sent (one score for all would let the random prefix of each
# payload decide; scores run ahead of the clock would put a later send's behind them).
_GROUP_SEND_MANY_LUA = """
    local n = #KEYS
    local now = tonumber(ARGV[#ARGV - 3])
    local m = tonumber(ARGV[#ARGV - 2])
    local cutoff = ARGV[#ARGV - 1]
    local expiry = ARGV[#ARGV]
    local over_capacity = 0
    for j=1,n do
        redis.call('ZREMRANGEBYSCORE', KEYS[j], 0, cutoff)
        local score = now
        local newest = redis.call('ZREVRANGE', KEYS[j], 0, 0, 'WITHSCORES')
        if newest[2] and tonumber(newest[2]) >= score then
            score = tonumber(newest[2]) + 0.000001
        end
        local capacity = tonumber(ARGV[m * n + j])
        local added = false
        for i=1,m do
            if redis.call('ZCARD', KEYS[j]) < capacity then
                redis.call('ZADD', KEYS[j], score, ARGV[(i - 1) * n + j])
                score = score + 0.000001
                added = true
            else
                over_capacity = over_capacity + 1
            end
        end
        if added then
            redis.call('EXPIRE', KEYS[j], expiry)
        end
    end
    return over_capacity
"""

# Every group's members, the expired ones dropped first: what `group_send` does with two
# commands per group, for all the groups of a shard in one script (one reply to parse).
_GROUP_MEMBERS_LUA = """
    local members = {}
    for i=1,#KEYS do
        redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, ARGV[1])
        members[i] = redis.call('ZRANGE', KEYS[i], 0, -1)
    end
    return members
"""


class DeliversCancellation:
    """On a redis-py connection class: a command write never swallows its task's
    cancellation (see above)."""

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        task = asyncio.current_task()
        requested = task.cancelling() if task is not None else 0
        await super().send_packed_command(command, check_health)
        if task is not None and task.cancelling() > requested:
            # Cancelled while the command went out, and wait_for returned anyway. The reply
            # will not be read: close the connection, as redis-py does for a cancelled write.
            await self.disconnect(nowait=True)
            raise asyncio.CancelledError


@functools.cache
def delivering_cancellation(connection_class: type) -> type:
    """`connection_class` (plain, TLS or Unix socket, as the URL's scheme says) with
    DeliversCancellation."""
    return type(connection_class.__name__, (DeliversCancellation, connection_class), {})


class IdleCappedBlockingPool(aioredis.BlockingConnectionPool):
    """A blocking pool that, once a burst is over, keeps at most `max_idle` idle connections:
    connections idle for `idle_seconds` beyond the cap are closed by a timer. During a burst
    nothing is closed (that would only make the storm reconnect)."""

    def __init__(self, *args, max_idle: int = 16, idle_seconds: float = 5.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_idle, self.idle_seconds = max_idle, idle_seconds
        self._reaper: asyncio.TimerHandle | None = None

    async def release(self, connection):
        connection._released_at = time.monotonic()
        await super().release(connection)
        if len(self._available_connections) > self.max_idle and self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.idle_seconds, self._reap_soon)

    def _reap_soon(self) -> None:
        self._reaper = None
        asyncio.ensure_future(self.reap())

    async def reap(self) -> int:
        """Close the connections idle for idle_seconds beyond the cap; returns how many."""
        cutoff = time.monotonic() - self.idle_seconds
        surplus = []
        async with self._condition:
            # LIFO: the pool hands out from the end, so the front holds the longest idle.
            while (len(self._available_connections) > self.max_idle
                   and getattr(self._available_connections[0], "_released_at", 0) <= cutoff):
                surplus.append(self._available_connections.pop(0))
        for extra in surplus:
            await extra.disconnect()
        if len(self._available_connections) > self.max_idle and self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.idle_seconds, self._reap_soon)
        return len(surplus)


class PooledRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index):
        host = dict(self.hosts[index])
        address = host.pop("address")
        # What from_url does, with the URL's connection class wrapped.
        options = {**host, **parse_url(address)}
        connection_class = delivering_cancellation(options.pop("connection_class", aioredis.Connection))
        return IdleCappedBlockingPool(
            connection_class=connection_class,
            max_connections=settings.CHANNELS_REDIS_MAX_CONNECTIONS,
            timeout=settings.CHANNELS_REDIS_POOL_TIMEOUT,
            max_idle=settings.CHANNELS_REDIS_MAX_IDLE,
            idle_seconds=settings.CHANNELS_REDIS_IDLE_SECONDS,
            **options,
        )

    async def group_send_many(self, batches: Mapping[str, Sequence[dict]]) -> dict[str, BaseException]:
        """Send each group its messages, in order, as `group_send` would one by one, but read
        every group's members (dropping the expired ones first) in one script (one round trip)
        per Redis shard; a group with no member costs nothing more. Groups are sent to
        concurrently. Returns the groups whose send failed, with the error (the caller logs:
        live events are best-effort), so one group's failure does not stop the others."""
        by_index: dict[int, list[str]] = {}
        for group in batches:
            assert self.require_valid_group_name(group), "Group name not valid"
            by_index.setdefault(self.consistent_hash(group), []).append(group)
        members: dict[str, list[str]] = {}
        failed: dict[str, BaseException] = {}
        cutoff = int(time.time()) - self.group_expiry

        async def read_members(index: int, groups: list[str]) -> None:
            keys = [self._group_key(group) for group in groups]
            try:
                replies = await self.connection(index).eval(_GROUP_MEMBERS_LUA, len(keys), *keys, cutoff)
            except Exception as exc:
                failed.update(dict.fromkeys(groups, exc))
                return
            for group, names in zip(groups, replies):
                members[group] = [x.decode("utf8") for x in names]

        await asyncio.gather(*(read_members(i, gs) for i, gs in by_index.items()))

        async def to_group(group: str) -> None:
            try:
                await self._send_to_members(group, members[group], batches[group])
            except Exception as exc:
                failed[group] = exc

        await asyncio.gather(*(to_group(g) for g, names in members.items() if names))
        return failed

    async def _send_to_members(self, group: str, channel_names: list[str], messages: Sequence[dict]) -> None:
        """The second half of channels_redis's `group_send`, for several messages: put them on
        these channels in order (expired messages dropped first, capacity respected), one
        script per shard for all of them."""
        if not messages:
            return
        payloads: dict[str, list[bytes]] = {}
        for message in messages:
            keys_by_index, key_to_message, key_to_capacity = self._map_channel_keys_to_connection(channel_names, message)
            for key, payload in key_to_message.items():
                payloads.setdefault(key, []).append(payload)
        now = time.time()
        cutoff = int(now) - int(self.expiry)
        for index, channel_keys in keys_by_index.items():
            args = [payloads[k][i] for i in range(len(messages)) for k in channel_keys]
            args += [key_to_capacity[k] for k in channel_keys] + [now, len(messages), cutoff, self.expiry]
            over = await self.connection(index).eval(_GROUP_SEND_MANY_LUA, len(channel_keys), *channel_keys, *args)
            if over > 0:
                logger.info("%s of %s messages over capacity in group %s", over, len(channel_keys) * len(messages), group)


class _ShardPublisher(TickBatcher):
    """One Redis shard's publishes, auto-pipelined (`common.redis.TickBatcher`; the shard's
    client has its own socket timeout)."""

    def __init__(self, shard):
        super().__init__()
        self.shard = shard

    async def _flush(self, items: list) -> list:
        self.shard._ensure_redis()
        pipe = self.shard._redis.pipeline(transaction=False)
        for channel, payload in items:
            pipe.publish(channel, payload)
        await pipe.execute()
        return [None] * len(items)


class _Coalescer:
    """Per event loop: publishes go out in one pipeline per Redis shard, at most one pipeline
    in flight per shard; what arrives meanwhile goes with the next. Under load the batch grows
    instead of the queue of waiters on the shard's lock."""

    def __init__(self):
        self.shards: dict[object, _ShardPublisher] = {}

    async def publish(self, shard, channel: str, payload: bytes) -> None:
        publisher = self.shards.get(shard)
        if publisher is None:
            publisher = self.shards[shard] = _ShardPublisher(shard)
        await publisher.submit((channel, payload))


# What a socket's queue holds once it has overflowed: its consumer closes the socket (1013).
SOCKET_BEHIND = {"type": "socket.behind"}


class _SocketQueue(asyncio.Queue):
    """A socket's messages in its web process, at most `maxsize`. Past it the socket has fallen
    behind (its client, or its process, slower than its events): what waits is dropped and the
    consumer told (`socket.behind`: it closes the socket with 1013, and the client reconnects
    and reloads its state), and nothing more is queued for it. Dropping the oldest instead lost
    events with no sign to anyone (an audit: 263 consoles on one busy process got 407 of 576
    status changes each, and stayed open). Counted in live_events_dropped_total{reason=
    "socket_behind"}."""

    def __init__(self, maxsize: int, behind: bytes):
        super().__init__(maxsize)
        self._behind = behind
        self.fell_behind = False

    def put_nowait(self, item):
        if self.fell_behind:
            LIVE_EVENTS_DROPPED.labels("socket_behind").inc()
            return
        if self.full():
            dropped = self.qsize() + 1
            while not self.empty():
                self.get_nowait()
            self.fell_behind = True
            LIVE_EVENTS_DROPPED.labels("socket_behind").inc(dropped)
            logger.warning("a socket fell %d events behind: closing it", dropped)
            item = self._behind
        super().put_nowait(item)


class LayerUnavailable(RedisError):
    """Redis did not confirm a subscription in time (`_Shard.confirm_seconds`)."""


class ConnectsOnce:
    """A connection that one task at a time connects (or disconnects), and that other tasks see
    as not connected until that is done. redis-py's pub/sub connection is shared by the layer's
    receive loop and every subscribe, and any of them reconnects it when it finds it dropped:
    two at once each ran the handshake on the other's socket (a reply read by the wrong task:
    "unknown subcommand 'SETINFO'"), or one disconnected what the other was connecting
    ("'NoneType' object has no attribute 'writelines'"), and a socket connecting just then
    failed its handshake with a 500 (a socket audit: 10 drops under 300 connects a second).

    A task whose read or write failed on a socket that another task has since replaced does not
    close the new one (each task's last socket is remembered by generation): it did, and its
    reconnect told every socket of the process a second time (a review: 17–23 reconnects for 15
    drops)."""

    _connect_lock: asyncio.Lock | None = None
    _connecting: asyncio.Task | None = None
    _generation = 0  # (sockets this connection has opened)

    @property
    def is_connected(self):
        connecting = self._connecting
        return super().is_connected and (connecting is None or connecting is asyncio.current_task())

    def _turn(self) -> asyncio.Lock:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        return self._connect_lock

    def _note_use(self) -> None:
        task = asyncio.current_task()
        if task is not None and self._connecting is not task:
            used = self.__dict__.get("_used")
            if used is None:
                used = self.__dict__["_used"] = weakref.WeakKeyDictionary()
            used[task] = self._generation

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        task = asyncio.current_task()
        if self._connecting is task:  # (its own handshake's commands)
            return await super().connect_check_health(check_health, retry_socket_connect)
        async with self._turn():
            self._connecting = task
            was = self._writer
            try:
                return await super().connect_check_health(check_health, retry_socket_connect)
            finally:
                if self._writer is not None and self._writer is not was:
                    self._generation += 1
                self._connecting = None

    async def send_packed_command(self, command, check_health: bool = True):
        self._note_use()
        return await super().send_packed_command(command, check_health)

    async def read_response(self, *args, **kwargs):
        self._note_use()
        return await super().read_response(*args, **kwargs)

    async def disconnect(self, *args, **kwargs):
        task = asyncio.current_task()
        failed = kwargs.get("nowait") or kwargs.get("error") is not None
        if task is None or self._connecting is task or self._connect_lock is None:
            return await self._close(failed, *args, **kwargs)
        used = self.__dict__.get("_used", {}).get(task)
        async with self._turn():
            if failed and used is not None and used != self._generation:
                return None  # (an error on a socket since replaced: the new one stays)
            return await self._close(failed, *args, **kwargs)

    async def _close(self, failed: bool, *args, **kwargs):
        if failed and self._writer is not None:
            # (after an error, what waits to be written goes too: a peer that reads nothing, a
            # Redis stuck, held a closed socket open until it took that, for good)
            self._writer.transport.abort()
        return await super().disconnect(*args, **kwargs)


@functools.cache
def connecting_once(connection_class: type) -> type:
    """`connection_class` (plain, TLS or Unix socket, as the URL's scheme says) with ConnectsOnce."""
    return type(connection_class.__name__, (ConnectsOnce, connection_class), {})


# What each socket of a web process is told when its pub/sub connection to Redis comes back
# (`_Shard`): its consumer closes the socket with 1012, after `delay`.
LAYER_RECONNECTED = "layer.reconnected"
# After a reconnect a process's sockets are closed at about this many a second (their clients
# reconnect, each reading its state afresh), over RECONNECT_SPREAD_MAX seconds at most (past
# 30,000 sockets in one process, faster).
RECONNECT_SPREAD_RATE = 500
RECONNECT_SPREAD_MAX = 60.0


class _Shard(RedisSingleShardConnection):
    """channels_redis's connection to one Redis shard, that says when it lost messages and
    when a subscription holds.

    - **Reconnects.** redis-py reconnects a dropped pub/sub connection and subscribes again,
      silently: what was published meanwhile never reaches this process, and its sockets stayed
      open, showing a fleet that had moved on (a driver without the offer made to them, a
      customer without "delivered"). When the connection comes back, every socket whose
      channel or group is on this shard is told (`layer.reconnected`); its consumer closes it
      with 1012 (service restart), and the client reconnects and reads its state. The closes
      are spread (about RECONNECT_SPREAD_RATE a second) so that thousands of tracking pages do
      not all reconnect in the same second. Counted in channel_layer_pubsub_reconnects_total.
      (channels_redis's pub/sub layer takes `on_reconnect` and never calls it:
      django/channels_redis#406.)
    - **Subscriptions confirmed.** redis-py's SUBSCRIBE returns once the command is written;
      `subscribe` here returns once Redis has confirmed it (the receive loop reads the
      confirmations channels_redis skipped), so "joined, then accepted" holds: an event
      published after the client sees its socket open reaches it. A confirmation Redis owes
      for a subscription since unsubscribed is not taken for the new one.
    - **A connection that says nothing.** A connection whose peer stops answering without
      closing it (a Redis paused or stuck, a proxy whose Redis is gone, a half-open connection
      whose TCP peer still acknowledges: keep-alive sees nothing wrong) was listened on for good,
      its sockets open and silent. After `ping_seconds` without a word from Redis the receive
      loop sends a PING; no answer within `answer_seconds` and the connection is dropped and made
      again (a reconnect, as above: its sockets are closed with 1012 once it is back). A
      reconnect Redis does not answer gives up after the connection's socket timeout
      (`pubsub_hosts`: 5 s) and is tried again a second later."""

    confirm_seconds = 5.0
    retry_seconds = 1.0  # (between reads while the connection fails)
    ping_seconds = 5.0  # (silence on the connection before a PING)
    answer_seconds = 10.0  # (for the PING's answer)

    def __init__(self, host, channel_layer):
        super().__init__(host, channel_layer)
        self._watched = None  # the pub/sub connection whose reconnects are watched
        self._confirming: dict[str, asyncio.Future] = {}
        self._unsubscribing: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._failing = False
        self._reconnects = 0
        self._failed_at: float | None = None  # (loop time of the last failed connect or read)
        self._heard_at: float | None = None  # (loop time Redis last said anything on the connection)
        self._pinged_at: float | None = None  # (loop time of the PING not yet answered)

    async def subscribe(self, channel):
        loop = asyncio.get_running_loop()
        async with self._lock:
            confirmed = self._confirming.get(channel)
            if channel not in self._subscribed_to:
                self._ensure_redis()
                self._ensure_receiver()
                if self._failed_at is not None and loop.time() - self._failed_at < self.retry_seconds and not self._connected():
                    # (Redis away or dropping packets: one attempt a second goes out, the others
                    # fail at once instead of each waiting its turn under this lock, 5 s apiece)
                    raise LayerUnavailable("the pub/sub connection to Redis failed a moment ago")
                confirmed = self._confirming[channel] = loop.create_future()
                reconnects = self._reconnects
                try:
                    async with asyncio.timeout(self.confirm_seconds):  # (a Redis that never answers)
                        try:
                            await self._pubsub.subscribe(channel)
                        except RedisConnectionError:
                            if self._reconnects == reconnects:
                                raise
                            await self._pubsub.subscribe(channel)  # (redis-py reconnected, then raised what made it)
                except BaseException as error:
                    self._confirming.pop(channel, None)
                    if isinstance(error, (RedisError, OSError)):
                        self._failed_at = loop.time()
                        raise
                    if isinstance(error, TimeoutError):
                        self._failed_at = loop.time()
                        raise LayerUnavailable(f"Redis did not take a subscription within {self.confirm_seconds} s") from None
                    raise
                self._subscribed_to.add(channel)
                self._watch()
                self._wake.set()
        if confirmed is not None and not confirmed.done():
            # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # lands as the confirmation arrives, CPython gh-86296)
            try:
                async with asyncio.timeout(self.confirm_seconds):
                    await asyncio.shield(confirmed)
            except TimeoutError:
                raise LayerUnavailable(f"Redis did not confirm a subscription within {self.confirm_seconds} s") from None

    async def unsubscribe(self, channel):
        """Forgotten here at once, whatever Redis says: redis-py keeps a channel in its list
        until Redis confirms the UNSUBSCRIBE, and subscribes its list again on a reconnect, so a
        socket that closed while the connection was down (its UNSUBSCRIBE failed, or its answer
        was lost with the connection) stayed subscribed for good, told of every reconnect, and
        channels_redis logged an ERROR for each."""
        async with self._lock:
            if channel not in self._subscribed_to:
                return
            self._subscribed_to.remove(channel)
            confirmed = self._confirming.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)  # (its waiter is leaving; a new subscribe waits anew)
            self._ensure_redis()
            self._ensure_receiver()
            self._pubsub.channels.pop(next(iter(self._pubsub._normalize_keys({channel: None}))), None)
            self._unsubscribing[channel] += 1
            reconnects = self._reconnects
            try:
                await self._pubsub.unsubscribe(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                # (the connection's subscriptions went with it; no answer will come. A reconnect
                # meanwhile has already forgotten what was owed.)
                if self._reconnects == reconnects:
                    self._owed_unsubscribe(channel)
                logger.debug("unsubscribed %s while the connection was down: %r", channel, error)

    async def flush(self):
        await super().flush()
        self._watched = None
        self._heard_at = self._pinged_at = None  # (the next connection is a new one)
        self._unsubscribing.clear()
        for confirmed in self._confirming.values():
            if not confirmed.done():
                confirmed.set_result(None)  # (the layer starts afresh; its waiters go on)
        self._confirming.clear()

    def _ensure_redis(self):
        if self._redis is None:
            pool = create_pool(self.host)
            pool.connection_class = connecting_once(pool.connection_class)
            self._redis = aioredis.Redis(connection_pool=pool)
            self._pubsub = self._redis.pubsub()

    def _connected(self) -> bool:
        connection = self._pubsub.connection if self._pubsub is not None else None
        return connection is not None and connection.is_connected

    def _watch(self) -> None:
        connection = self._pubsub.connection
        if connection is not None and connection is not self._watched:
            # (after the connection's first connect: called on reconnects only, after
            # redis-py's own callback has subscribed again; held as a weak method)
            connection.register_connect_callback(self._reconnected)
            self._watched = connection

    def _reconnected(self, connection) -> None:
        self._reconnects += 1
        self._failing = False
        self._failed_at = None
        self._heard_at, self._pinged_at = asyncio.get_running_loop().time(), None
        self._unsubscribing.clear()  # (the replies owed on the old connection never come)
        # redis-py has just sent SUBSCRIBE again for every channel: until Redis confirms, a
        # socket joining one of them waits, as for a first subscription
        loop = asyncio.get_running_loop()
        for channel in self._subscribed_to:
            if channel not in self._confirming:
                self._confirming[channel] = loop.create_future()
        layer = self.channel_layer
        told = {c for c in layer.channels if layer._get_shard(c) is self}
        for group, members in layer.groups.items():
            if layer._get_shard(group) is self:
                told |= members
        told &= layer.channels.keys()
        PUBSUB_RECONNECTS.inc()
        logger.warning("the channel layer's pub/sub connection to Redis came back: what was published "
                       "meanwhile is lost; %d sockets told to reconnect (1012)", len(told))
        spread = min(RECONNECT_SPREAD_MAX, len(told) / RECONNECT_SPREAD_RATE)
        serialize = layer.channel_layer.serialize
        for channel in told:
            layer.channels[channel].put_nowait(serialize({"type": LAYER_RECONNECTED, "delay": random.uniform(0, spread)}))

    def _owed_unsubscribe(self, channel: str) -> None:
        """One UNSUBSCRIBE answer of `channel` fewer to wait for."""
        if self._unsubscribing[channel] > 1:
            self._unsubscribing[channel] -= 1
        else:
            del self._unsubscribing[channel]

    def _received(self, message) -> None:
        kind = message["type"]
        if kind == "pong":
            return  # (the receive loop's PING answered: `_probe`)
        name = message["channel"]
        if isinstance(name, bytes):
            name = name.decode()
        if kind == "subscribe":
            if self._unsubscribing[name] > 0:
                return  # (owed for a subscription since unsubscribed)
            confirmed = self._confirming.pop(name, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind == "unsubscribe":
            self._owed_unsubscribe(name)
        else:
            self._receive_message(message)

    def _ensure_receiver(self):
        if self._receive_task is None:
            # (in a context of its own: it outlives the socket whose subscribe started it, and
            # its log lines carried that socket's request id)
            self._receive_task = asyncio.get_running_loop().create_task(self._do_receiving(), context=contextvars.Context())

    async def _do_receiving(self):
        """channels_redis's receive loop, reading the subscriptions' confirmations too, and
        woken by a first subscription instead of polling every 0.1 s (a confirmation waited
        up to 0.1 s)."""
        loop = asyncio.get_running_loop()
        while True:
            reconnects = self._reconnects
            try:
                if self._pubsub and self._pubsub.subscribed:
                    message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=0.1)
                    self._failing = False
                    if message is not None:
                        self._heard_at, self._pinged_at = loop.time(), None
                        self._received(message)
                    else:
                        await self._probe(loop.time())
                else:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), 0.1)
                    except asyncio.TimeoutError:
                        pass
            except (asyncio.CancelledError, asyncio.TimeoutError, GeneratorExit):
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                if self._reconnects != reconnects:
                    continue  # (redis-py reconnected, then raised what made it: `_reconnected` has told)
                # (Redis restarting or away: once, not every second while it is; the next
                # read reconnects, and `_reconnected` says when it is back)
                if not self._failing:
                    logger.warning("the channel layer's pub/sub connection to Redis failed (%s): reconnecting", error)
                self._failing = True
                self._failed_at = asyncio.get_running_loop().time()
                await asyncio.sleep(self.retry_seconds)
            except BaseException:
                logger.exception("Unexpected exception in receive task")
                await asyncio.sleep(1)

    async def _probe(self, now: float) -> None:
        """After `ping_seconds` of silence, a PING; unanswered for `answer_seconds`, the
        connection is dropped (the next read makes it again). Judged after a read that found
        nothing, and once more without waiting: a read whose timer fired as the answer came in
        (the loop held up meanwhile) returned nothing with the answer already buffered, and a
        healthy connection was dropped (a review: 4 runs in 10 with the loop blocked 1 s)."""
        if self._pinged_at is not None:
            if now - self._pinged_at < self.answer_seconds:
                return
            message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=0)
            if message is not None:
                self._heard_at, self._pinged_at = now, None
                self._received(message)
                return
            if self._pinged_at is None:
                return  # (the read found the connection dropped and made it again: a new one)
            self._pinged_at = None
            error = RedisTimeoutError(f"no answer to a PING within {self.answer_seconds:g} s")
            # (nowait with the error: at once, unless a subscribe made a new socket meanwhile)
            await self._pubsub.connection.disconnect(nowait=True, error=error)
            raise error
        if self._heard_at is None:
            self._heard_at = now
        elif now - self._heard_at >= self.ping_seconds:
            self._pinged_at = now
            await self._pubsub.ping()  # (a write the peer does not take times out: socket timeout)


class _BoundedLoopLayer(RedisPubSubLoopLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shards = [_Shard(shard.host, self) for shard in self._shards]

    async def _subscribe_to_channel(self, channel):
        self.channels[channel] = _SocketQueue(self.channel_layer.capacity, self.channel_layer.serialize(SOCKET_BEHIND))
        shard = self._get_shard(channel)
        try:
            await shard.subscribe(channel)
        except BaseException:
            # (Redis away, its confirmation late, or the socket gone meanwhile: the channel's
            # name never reaches its consumer, so nothing else would unsubscribe it; it stayed
            # subscribed, with a queue, and was told of every reconnect)
            self.channels.pop(channel, None)
            try:
                await asyncio.shield(shard.unsubscribe(channel))
            except BaseException:  # noqa: BLE001 - the error that brought us here is the one to raise
                logger.warning("a channel that failed to subscribe is left subscribed", exc_info=True)
            raise


class CoalescingPubSubChannelLayer(RedisPubSubChannelLayer):
    """channels_redis's pub/sub layer (both layers: settings.CHANNEL_LAYERS) whose group sends
    are pipelined. channels_redis publishes one message per round trip under a per-shard lock
    that subscribes also take, so a worker's concurrent fixes (and a socket storm's subscribes)
    queued behind one another; here the publishes of a loop tick, and those arriving while a
    pipeline is in flight, go in one pipeline (`_Coalescer`). The messages and what a
    subscriber receives are unchanged.

    A socket's queue in the web process holds at most `capacity` messages (CONFIG; 1,000, as
    the core layer's channels); past it the socket is closed (`_SocketQueue`): channels_redis's
    queue is unbounded, and a client reading slower than its events arrive (an ops console on
    every fix) grew the process's memory without end."""

    def __init__(self, *args, capacity: int = 1000, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity = capacity

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _BoundedLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer

    async def forget_channel(self, channel: str) -> None:
        """Drop a consumer's channel once it has ended: its queue and its subscription.
        channels_redis does it when the consumer's pending receive is cancelled, but a receive
        cancelled before it started (a channel message dispatched, then the client's close:
        the consumer made a new receive and cancelled it at once) never runs, and the channel
        stayed subscribed, with its queue, for good (an audit: 67 of 100 sockets that closed
        just after a reconnect's 1012 notice)."""
        layer = self._get_layer()
        if layer.channels.pop(channel, None) is None:
            return
        try:
            await layer._get_shard(channel).unsubscribe(channel)
        except RedisError as error:
            logger.debug("channel %s left subscribed: %r", channel, error)

    def _coalescer(self) -> _Coalescer:
        layer = self._get_layer()
        coalescer = layer.__dict__.get("_coalescer")
        if coalescer is None:
            coalescer = layer._coalescer = _Coalescer()
        return coalescer

    async def group_send(self, group, message):
        layer = self._get_layer()
        channel = layer._get_group_channel_name(group)
        await self._coalescer().publish(layer._get_shard(channel), channel, self.serialize(message))

    async def group_send_many(self, batches: Mapping[str, Sequence[dict]]) -> dict[str, BaseException]:
        """As `PooledRedisChannelLayer.group_send_many`: each group's messages in order (one
        pipeline keeps the order), all groups at once; returns the groups whose send failed."""
        layer = self._get_layer()
        coalescer = self._coalescer()
        sends = []
        for group, messages in batches.items():
            channel = layer._get_group_channel_name(group)
            shard = layer._get_shard(channel)
            sends += [(group, coalescer.publish(shard, channel, self.serialize(m))) for m in messages]
        results = await asyncio.gather(*(s for _, s in sends), return_exceptions=True)
        return {group: r for (group, _), r in zip(sends, results) if isinstance(r, BaseException)}
