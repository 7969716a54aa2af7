"""Side effects after commit: socket broadcasts and Celery enqueues (STYLE rule 4).

A workflow that emits several events in one transaction opens a `broadcast_batch()` inside its
atomic block: its events are then sent together after commit, in one hop into the event loop
(`send_many`), instead of one `async_to_sync` per group per event. Everything else holds as
for a single event: nothing is sent for a transaction (or savepoint) that rolls back, a Redis
failure is logged and never raised, and each group gets the events of one thread (a request, a
task, the fix consumer) in the order they were emitted, also when a send outlasts its caller's
wait (what the thread emits meanwhile waits behind it).

Where the events go from: under the ASGI server (a sync view in its worker thread) they are
sent on the server's event loop, as `async_to_sync` does (the lean API handler's request
threads name that loop with `bind_server_loop`). In a process with no event loop of its
own (`manage.py consume_fixes`, Celery workers, shell), `async_to_sync` would start a new loop
per call, and the channel layers, which keep their Redis connections per loop, would connect
anew for every event (a TCP connect and redis-py's client-info lookup per call: a third of the
stream consumer's CPU at 200 fixes/s, bench/README.md "Tracking fan-out"). There the events go
through one long-lived loop in a daemon thread of the process (`_sender_loop`), whose
connections are reused. The sync caller waits for its send at most `SEND_WAIT_SECONDS`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from asgiref.sync import SyncToAsync
from celery import current_app
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from common.hooks import event_emitted
from common.metrics import LIVE_EVENTS_DROPPED
from common.redis import RedisFailed, RedisUnavailable, breaker, get_redis, is_timeout, redis_address

logger = logging.getLogger(__name__)

OPS_GROUP = "ops"
# Every `delivery_location_updated` (one a fix of a driver on a delivery), for the ops sockets
# that want them (SPEC: /ws/ops/ gets "all of the above"); the console's live map asks for
# none (`?locations=0`) and follows the per-second `driver_positions` digest of OPS_GROUP.
OPS_LOCATIONS_GROUP = "ops.locations"
# The channel layer (settings.CHANNEL_LAYERS) of the customers' groups, "delivery.<id>":
# Redis pub/sub, for fan-out to thousands of tracking sockets. Every other group is on the
# default layer.
TRACKING_LAYER = "tracking"

Entry = tuple[Sequence[str], Mapping[str, Any]]


def driver_group(driver_id) -> str:
    return f"driver.{driver_id}"


def delivery_group(delivery_id) -> str:
    return f"delivery.{delivery_id}"


def layer_alias(group: str) -> str:
    """The channel layer a group lives on."""
    return TRACKING_LAYER if group.startswith("delivery.") else DEFAULT_CHANNEL_LAYER


def _message(event: Mapping[str, Any]) -> dict:
    return {"type": event["type"], "event": dict(event)}


async def _send_all(entries: Sequence[Entry]) -> None:
    """Each group's messages in order; different groups concurrently, each on its layer."""
    by_group: dict[str, list[dict]] = {}
    for groups, event in entries:
        message = _message(event)
        for group in groups:
            by_group.setdefault(group, []).append(message)

    async def to_group(layer, group: str, messages: list[dict]) -> None:
        for message in messages:
            try:
                await layer.group_send(group, message)
            except Exception as exc:  # Redis down or full: live events are best-effort
                _tell_breaker(exc, _layers_address())
                LIVE_EVENTS_DROPPED.labels("send_failed").inc()
                logger.warning("broadcast to %s failed for %s", group, message["type"], exc_info=True)

    async def to_layer(layer, batches: dict[str, list[dict]]) -> None:
        try:
            failed = await layer.group_send_many(batches)
        except Exception as exc:  # e.g. Redis down before any group was tried
            failed = dict.fromkeys(batches, exc)
        for exc in {id(exc): exc for exc in failed.values()}.values():
            _tell_breaker(exc, _layers_address())
        for group, exc in failed.items():
            LIVE_EVENTS_DROPPED.labels("send_failed").inc(len(batches[group]))
            logger.warning("broadcast to %s failed for %s", group, [m["type"] for m in batches[group]],
                           exc_info=(type(exc), exc, exc.__traceback__))

    by_layer: dict[str, dict[str, list[dict]]] = {}
    for group, messages in by_group.items():
        by_layer.setdefault(layer_alias(group), {})[group] = messages
    sends = []
    for alias, batches in by_layer.items():
        layer = get_channel_layer(alias)
        if layer is None:
            continue
        if hasattr(layer, "group_send_many"):  # one round trip for every group's members
            sends.append(to_layer(layer, batches))
        else:
            sends += [to_group(layer, g, ms) for g, ms in batches.items()]
    await asyncio.gather(*sends)


def send_many(entries: Sequence[Entry]) -> None:
    """Send several (groups, event) pairs in one hop into the event loop; a channel-layer
    failure is logged, never raised."""
    if not entries:
        return
    sink = getattr(_local, "event_sink", None)
    if sink is not None:
        sink(entries)
        return
    if breaker.is_open(_layers_address()):  # a hung Redis: do not wait for it again
        logger.warning("broadcast of %d events skipped: Redis unavailable", len(entries))
        _dropped("redis_unavailable", entries)
        return
    tail = getattr(_local, "tail", None)
    behind = tail is not None and not tail.done()  # this thread's last send is running late
    if behind and _joined_queued(entries):  # (adds no send to the loop: allowed past the limit)
        return
    if _late.count >= MAX_LATE_SENDS:  # a slow Redis: do not pile more onto the loop
        logger.warning("broadcast of %d events skipped: %d sends already running late", len(entries), _late.count)
        _dropped("backlog", entries)
        return
    loop = getattr(_local, "server_loop", None)
    if loop is None or not loop.is_running():
        loop = _server_loop() or _sender_loop()
    if behind:
        _send_behind(tail, entries, loop)
        return
    future = asyncio.run_coroutine_threadsafe(_send_all(entries), loop)
    try:
        future.result(timeout=SEND_WAIT_SECONDS)
    except concurrent.futures.TimeoutError:  # (not counted by the breaker: a busy loop makes it too)
        logger.warning("broadcast of %d events not sent within %.1f s: it goes on without the caller",
                       len(entries), SEND_WAIT_SECONDS)
        _late.started(future)
        _local.tail, _local.queued = future, None
        return
    except Exception:
        logger.warning("broadcast of %d events failed", len(entries), exc_info=True)
        _dropped("send_failed", entries)
    _local.tail = _local.queued = None


def _joined_queued(entries: Sequence[Entry]) -> bool:
    """Whether `entries` were dealt with by the batch waiting behind this thread's late send:
    added to it, or skipped because it is full. False when no batch waits (or it has started)."""
    queued = getattr(_local, "queued", None)
    if queued is None:
        return False
    joined = queued.add(entries)
    if joined is None:
        return False
    if not joined:
        logger.warning("broadcast of %d events skipped: %d events already wait behind a late send",
                       len(entries), MAX_QUEUED_EVENTS)
        _dropped("backlog", entries)
    return True


def _send_behind(tail: concurrent.futures.Future, entries: Sequence[Entry], loop) -> None:
    """Send `entries` once this thread's late send `tail` has ended, without waiting, in a new
    batch (`send_many` first offers them to the batch already waiting, if any: so at most one
    send runs late and one waits per thread, whatever the thread emits meanwhile)."""
    queued = _Queued(entries)
    future = asyncio.run_coroutine_threadsafe(_send_queued(tail, queued), loop)
    _late.started(future)
    _local.tail, _local.queued = future, queued


async def _send_queued(previous: concurrent.futures.Future, queued: _Queued) -> None:
    await asyncio.wait([asyncio.wrap_future(previous)])  # (its failure, if any, was logged)
    await _send_all(queued.take())


class _Queued:
    """A thread's events waiting for its late send to end, to go together after it."""

    def __init__(self, entries: Sequence[Entry]):
        self.entries = list(entries)
        self._taken = False
        self._lock = threading.Lock()

    def add(self, entries: Sequence[Entry]) -> bool | None:
        """True: added; False: full (not added); None: already being sent (not added)."""
        with self._lock:
            if self._taken:
                return None
            if len(self.entries) + len(entries) > MAX_QUEUED_EVENTS:
                return False
            self.entries.extend(entries)
            return True

    def take(self) -> list[Entry]:
        with self._lock:
            self._taken = True
            return self.entries


# A sync caller (a request thread, a task) waits at most this long for its events to go out (a
# few ms as a rule); then the send goes on in the background without it. A hung Redis costs
# the send the channel layer's socket timeout (redis-py's 5 s; 15 s with CHANNELS_LAYER=core,
# whose receive blocks for 5), which is what
# every request and task touching it used to wait, twice before the breaker opened. While it
# runs late, what the same thread emits waits behind it in one batch and the caller does not
# wait at all: a thread's events stay in order (`_send_behind`).
SEND_WAIT_SECONDS = 1.0
# Sends running past their caller's wait, or waiting behind one, at most, in a process. While
# Redis is slow but answering (the breaker counts only timeouts), every request thread would
# leave more on the event loop, each holding its events and a connection; past this many, sends
# are skipped (logged, and counted in `live_events_dropped_total{reason="backlog"}`) until they
# drain. And at most this many events wait behind one thread's late send (the fix consumer
# emits ~200 a second), the rest skipped and counted the same way.
MAX_LATE_SENDS = 200
MAX_QUEUED_EVENTS = 2000


class _LateSends:
    """How many sends are running late or waiting behind one (thread-safe)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def started(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self.count += 1
        future.add_done_callback(self._ended)

    def _ended(self, _future) -> None:
        with self._lock:
            self.count -= 1


_late = _LateSends()


def _forget_late_sends_in_child() -> None:
    """A forked child has no loop to finish the parent's sends: it starts with none."""
    global _late
    _late = _LateSends()
    _local.__dict__.pop("tail", None)
    _local.__dict__.pop("queued", None)


os.register_at_fork(after_in_child=_forget_late_sends_in_child)


def _dropped(reason: str, entries: Sequence[Entry]) -> None:
    LIVE_EVENTS_DROPPED.labels(reason).inc(sum(len(groups) for groups, _ in entries))


def _layers_address() -> str:
    """The Redis server of the channel layers (both on REDIS_URL), as the breaker names it."""
    return redis_address(settings.REDIS_URL)


def _broker_address() -> str | None:
    url = current_app.conf.broker_url or ""
    return redis_address(url) if url.split("://", 1)[0] in ("redis", "rediss", "unix") else None


def _tell_breaker(exc: BaseException, address: str | None) -> None:
    if address is not None and is_timeout(exc):
        breaker.timed_out(address)


def publish_retry_errback(exc: BaseException, interval: float) -> None:
    """kombu's callback on each failed attempt of a publish (config/celery.py puts it in the
    publish retry policy): a timeout counts for the breaker at once, not once per publish, and
    a publish stops retrying as soon as the breaker opens (a hung broker cost the first request
    two publishes of two attempts each, 8 s)."""
    broker = _broker_address()
    _tell_breaker(exc, broker)
    if broker is not None and breaker.is_open(broker):
        raise exc


_sender_lock = threading.Lock()
_sender: tuple[int, asyncio.AbstractEventLoop] | None = None


def bind_server_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Send this thread's events on `loop`: for a request thread the ASGI server runs sync code
    on without `sync_to_async` (config.asgi.LeanApiHandler); None unbinds."""
    _local.server_loop = loop


def _server_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the ASGI server this sync code runs under (via `sync_to_async`), if
    any: the events are sent there."""
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    return loop if loop is not None and loop.is_running() else None


def _sender_loop() -> asyncio.AbstractEventLoop:
    """This process's long-lived loop for sending events from sync code (started on first
    use; a forked child, such as a Celery prefork worker, starts its own)."""
    global _sender
    with _sender_lock:
        if _sender is None or _sender[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="broadcast-sender", daemon=True).start()
            _sender = (os.getpid(), loop)
        return _sender[1]


def send_now(groups: Iterable[str], event: Mapping[str, Any]) -> None:
    """Send one event to groups; a channel-layer failure is logged, never raised."""
    send_many([(list(groups), dict(event))])


# ------------------------------------------------------------------------------ batches

_local = threading.local()


class _Batch:
    """The events of one workflow's transaction, sent by one callback after commit."""

    def __init__(self, connection):
        self.connection = connection
        self.start_sids = set(connection.savepoint_ids)
        self.entries: list[tuple[Entry, object | None]] = []  # (entry, savepoint marker)
        self.registered = False

    def add(self, entry: Entry) -> None:
        marker = None
        if set(self.connection.savepoint_ids) - self.start_sids:
            # Emitted inside a savepoint opened within the batch: Django drops this marker if
            # that savepoint rolls back, and the event goes with it.
            marker = _marker()
            transaction.on_commit(marker)
        self.entries.append((entry, marker))
        if not self.registered:
            # One callback at the place of the first event, tied to the savepoints that were
            # open when the batch began (not to any opened since), so it goes only if they do.
            self.connection.run_on_commit.append((set(self.start_sids), self.send, True))
            self.registered = True

    def close(self) -> None:
        """At the end of the batch, still inside the transaction: forget the events whose
        savepoint rolled back."""
        pending = {id(func) for _, func, _ in self.connection.run_on_commit}
        self.entries = [(e, m) for e, m in self.entries if m is None or id(m) in pending]

    def send(self) -> None:
        entries, self.entries = [e for e, _ in self.entries], []
        send_many(_distinct(entries))


def _distinct(entries: list[Entry]) -> list[Entry]:
    """The entries without repeats: an event identical to the last one the transaction sent to
    the same groups (two steps of one escalation each announcing the same ticket state) tells
    nobody anything. Only the last: a state that went A, B, A again must end on A."""
    last: dict[tuple[str, ...], bytes] = {}
    out = []
    for groups, event in entries:
        key, body = tuple(groups), orjson.dumps(event, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
        if last.get(key) != body:
            last[key] = body
            out.append((groups, event))
    return out


def _marker():
    def marker():
        return None

    return marker


@contextmanager
def broadcast_batch():
    """Collect the events emitted inside (by `broadcast_on_commit`) and send them together
    after the transaction commits. Open it inside the workflow's `transaction.atomic()`; a
    batch inside a batch joins the outer one."""
    outer = getattr(_local, "batch", None)
    connection = transaction.get_connection()
    if outer is not None or not connection.in_atomic_block:
        yield outer  # outside a transaction each event goes at once, as without a batch
        return
    batch = _Batch(connection)
    _local.batch = batch
    try:
        yield batch
    except BaseException:
        batch.entries = []
        raise
    finally:
        _local.batch = None
    batch.close()


def broadcast_on_commit(groups: Iterable[str], event: Mapping[str, Any]) -> None:
    """Send `event` to `groups` once the current transaction commits (at once outside one)."""
    entry = (list(groups), dict(event))
    event_emitted(entry[1])  # e.g. the webhook outbox, which writes in this transaction
    batch = getattr(_local, "batch", None)
    if batch is not None:
        batch.add(entry)
        return
    transaction.on_commit(lambda: send_many([entry]), robust=True)


@contextmanager
def _thread_sink(name: str, sink):
    """This thread's `name` sink is `sink` inside, the previous one again afterwards."""
    previous = getattr(_local, name, None)
    setattr(_local, name, sink)
    try:
        yield
    finally:
        setattr(_local, name, previous)


@contextmanager
def events_diverted(sink):
    """Inside, this thread's committed live events go to `sink(entries)` instead of the channel
    layers (the simulator: no socket listens to a simulated city). The webhook outbox still
    sees every event as it is emitted (`event_emitted`)."""
    with _thread_sink("event_sink", sink):
        yield


@contextmanager
def tasks_diverted(sink):
    """Inside, this thread's enqueues go to `sink(name, args, options)` after commit instead of
    the broker: the simulator (simulation/) plays the workers itself, on its own clock (an
    offer's push is the driver hearing of it, `offers.expire_offer` runs at its eta)."""
    with _thread_sink("task_sink", sink):
        yield


# How long an ops alert (e-mail, chat) whose publish failed is kept to be sent late.
OPS_ALERT_KEEP_SECONDS = 1800


def enqueue_task_on_commit(name: str, *args, durable_seconds: float | None = None, **options) -> None:
    """Enqueue the registered Celery task `name` after commit (a broker failure is logged).
    With `durable_seconds`, a publish that fails is kept in PostgreSQL and published again by
    the sweep for that long (common.deferred): for tasks nothing else re-sends.

    By name, so a lower layer can schedule work whose task lives in an interface module
    (tasks call workflows; workflows and services schedule tasks) without importing it."""
    if durable_seconds and options:
        raise ValueError("a durable task is published again without options: pass none")
    sink = getattr(_local, "task_sink", None)
    if sink is not None:
        transaction.on_commit(lambda: sink(name, args, options))
        return

    transaction.on_commit(lambda: publish(name, args, durable_seconds=durable_seconds, **options), robust=True)


def broker_is_open() -> bool:
    """The broker is a Redis the breaker says is hung (publishes are skipped)."""
    broker = _broker_address()
    return broker is not None and breaker.is_open(broker)


def publish(name: str, args=(), *, durable_seconds: float | None = None, **options) -> bool:
    """Publish the registered task `name`; False (logged) when the broker failed, or is a Redis
    the breaker says is hung (not waited for again; after its open spell one publish is the
    probe, and its answer closes the breaker). With `durable_seconds` a failed publish is kept
    for the sweep: at least once, since a publish that timed out may still have reached a
    Redis that was only slow."""
    broker = _broker_address()
    if broker is not None and not breaker.allow(broker):  # the first after an open spell probes
        logger.warning("enqueue of %s skipped: the broker's Redis is unavailable", name)
    else:
        try:
            _registered_task(name).apply_async(args=args, **options)
            if broker is not None:
                breaker.succeeded(broker)
            return True
        except Exception as exc:
            _tell_breaker(exc, broker)
            logger.warning("enqueue of %s failed", name, exc_info=True)
    if durable_seconds:
        from common.deferred import defer  # the model module: not at import time

        try:
            defer(name, args, seconds=durable_seconds)
        except Exception:
            logger.exception("keeping the failed publish of %s failed: it is lost", name)
    return False


# How long a queued kick keeps later commits from queueing another, at most (if its message is
# lost, the next commit after this queues a new one; the task's own sweep covers the gap).
KICK_TTL_MS = 5000


def kick_key(name: str) -> str:
    return f"kick:{name}"


def enqueue_kick_on_commit(name: str) -> None:
    """After commit, enqueue the argument-less Celery task `name`, which does whatever is due
    (e.g. deliver the pending webhook messages), unless one is already queued and has not
    started: every request that writes outbox rows kicks the webhook worker, and one queued
    kick serves them all (a Celery publish costs ~0.4 ms of the request's CPU, a Redis SET NX
    a tenth of that). The task calls `kick_started(name)` before it reads what is due, so a
    commit after that queues a new kick and nothing committed is left waiting for a kick.
    Redis down: enqueued as before; a failed enqueue frees the slot for the next commit."""
    sink = getattr(_local, "task_sink", None)
    if sink is not None:
        transaction.on_commit(lambda: sink(name, (), {}))
        return

    def _send():
        try:
            kicked = get_redis().set(kick_key(name), "1", nx=True, px=KICK_TTL_MS)
        except RedisUnavailable:
            kicked = True
        if kicked:
            _kick(name)

    transaction.on_commit(_send, robust=True)


def _kick(name: str, countdown: float = 0) -> None:
    """Publish the kick whose slot (`kick_key(name)`) the caller just took; a failed publish is
    logged and frees the slot for the next commit."""
    if not publish(name, countdown=countdown or None):
        try:
            get_redis().delete(kick_key(name))
        except RedisFailed:
            pass


def kick_started(name: str) -> None:
    """A kicked task (`enqueue_kick_on_commit`) starting, before it reads what is due: the
    next commit queues a new kick."""
    try:
        get_redis().delete(kick_key(name))
    except RedisUnavailable:
        pass


def enqueue_due_on_commit(
    name: str, due_key: str, item: str, value: str, *, fallback: tuple[str, tuple], countdown: float = 0,
) -> None:
    """After commit, mark `item` due in the Redis hash `due_key` (a later `value` for the same
    item replaces the earlier) and kick the argument-less task `name` as
    `enqueue_kick_on_commit` does, in one round trip; the task calls `kick_started(name)`, then
    takes what is due with `take_due` and says when it is done (`done_due`). Work that one task per item did (the ETA
    refresh after each status change) costs a request a pipeline instead of a Celery publish
    (~0.8 ms of its CPU each), and the worker one task per batch instead of per item. With a
    `countdown` (seconds) the kick runs that long after it was queued, so every item marked
    meanwhile rides on it: at most one message per countdown even when a worker is idle and
    takes each kick at once.
    Redis down: the task `fallback` = (name, args) is enqueued per item, as before; so it is
    inside `tasks_diverted` (the simulator plays the per-item tasks)."""
    sink = getattr(_local, "task_sink", None)
    fallback_name, fallback_args = fallback
    if sink is not None:
        transaction.on_commit(lambda: sink(fallback_name, fallback_args, {}))
        return

    def _send():
        try:
            pipe = get_redis().pipeline(transaction=False)
            pipe.hset(due_key, item, value)
            # the slot outlives the countdown: a queued kick keeps later commits from queueing more
            pipe.set(kick_key(name), "1", nx=True, px=KICK_TTL_MS + int(countdown * 1000))
            _, kicked = pipe.execute()
        except RedisFailed:
            logger.warning("could not mark %s due in %s; enqueued on its own", item, due_key, exc_info=True)
            publish(fallback_name, fallback_args)
            return
        if kicked:  # else a kick is queued and has not started: it takes this item too
            _kick(name, countdown)

    transaction.on_commit(_send, robust=True)


# What a run took stays in `<due key>:taken` (item -> "<lease deadline>|<run>|<value>") until
# the run says it is done, so the items of a run whose worker died (killed, out of memory, the
# hard time limit) go back to the due hash when the lease ends and the next run takes them.
# Redis's own clock (TIME) dates the leases: the workers' clocks may differ.
_TAKE_DUE_LUA = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local taken = redis.call('HGETALL', KEYS[2])
for i = 1, #taken, 2 do
  local v = taken[i + 1]
  local a = string.find(v, '|', 1, true)
  local b = a and string.find(v, '|', a + 1, true)
  -- the lease ended, or the run itself is back (Celery redelivered it: the same task id)
  local ends = b and tonumber(string.sub(v, 1, a - 1))
  if b and ((ends and ends <= now) or string.sub(v, a + 1, b - 1) == ARGV[2]) then
    redis.call('HSETNX', KEYS[1], taken[i], string.sub(v, b + 1))
    redis.call('HDEL', KEYS[2], taken[i])
  end
end
local due = redis.call('HGETALL', KEYS[1])
if #due == 0 then return due end
redis.call('DEL', KEYS[1])
local lease = string.format('%.6f', now + tonumber(ARGV[1])) .. '|' .. ARGV[2] .. '|'
for i = 1, #due, 2 do
  redis.call('HSET', KEYS[2], due[i], lease .. due[i + 1])
end
return due
"""
# Items the run `ARGV[1]` is done with, or `ARGV[2]` = "1": gives them back to the due hash
# first (unless a newer mark is there); an item another run has taken since is that run's.
_DONE_DUE_LUA = """
for i = 3, #ARGV do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  if v then
    local a = string.find(v, '|', 1, true)
    local b = string.find(v, '|', a + 1, true)
    if string.sub(v, a + 1, b - 1) == ARGV[1] then
      if ARGV[2] == '1' then redis.call('HSETNX', KEYS[1], ARGV[i], string.sub(v, b + 1)) end
      redis.call('HDEL', KEYS[2], ARGV[i])
    end
  end
end
return 0
"""
_due_scripts: dict[tuple[int, str], Any] = {}


def _due_script(client, source: str):
    script = _due_scripts.get((id(client), source))
    if script is None:
        script = _due_scripts[(id(client), source)] = client.register_script(source)
    return script


def taken_key(due_key: str) -> str:
    """Where a run's items wait until it is done; `due_key` carries a hash tag (`{eta}:due`)
    so both share a Redis Cluster slot."""
    return f"{due_key}:taken"


def take_due(due_key: str, run: str, lease_seconds: float) -> dict[str, str]:
    """What `enqueue_due_on_commit` marked due in `due_key` (item → its latest value), taken
    atomically for the run `run` (e.g. its task id) for `lease_seconds`: a mark after this is in
    the next take. The run calls `done_due` when it has done them (or `put_back_due` for those
    it did not get to); if it never does (its worker died), they are due again once the lease
    has ended, for the next take (a newer mark of an item wins). So the lease must outlast the
    run (the task's hard time limit). Empty when Redis is down (the items stay for the next
    take)."""
    try:
        client = get_redis()
        flat = _due_script(client, _TAKE_DUE_LUA)(keys=[due_key, taken_key(due_key)], args=[lease_seconds, run])
    except RedisFailed:
        logger.warning("could not take what is due in %s", due_key, exc_info=True)
        return {}
    return dict(zip(flat[::2], flat[1::2]))


def done_due(due_key: str, run: str, items: Iterable[str], *, put_back: bool = False) -> None:
    """The run `run` is done with `items` it took (`take_due`); with `put_back` it did not do
    them (its time ran out): each is due again for the next run (the sweep at the latest) unless
    a newer mark of it arrived meanwhile. Redis down: the lease ends instead, with the same
    effect for what it did not do (and those it did are done again)."""
    items = list(items)
    if not items:
        return
    try:
        client = get_redis()
        _due_script(client, _DONE_DUE_LUA)(keys=[due_key, taken_key(due_key)], args=[run, "1" if put_back else "0", *items])
    except RedisFailed:
        logger.warning("could not release %d items of %s", len(items), due_key, exc_info=True)


def put_back_due(due_key: str, run: str, items: Iterable[str]) -> None:
    """`done_due(..., put_back=True)`: the items the run took and did not do."""
    done_due(due_key, run, items, put_back=True)


def task_registered(name: str) -> bool:
    try:
        _registered_task(name)
    except KeyError:
        return False
    return True


_autodiscover_lock = threading.RLock()  # (a tasks module that enqueues while it is imported re-enters)


def _registered_task(name: str):
    tasks = current_app.tasks
    if name not in tasks:
        # Outside a worker the apps' tasks modules load lazily: autodiscover them once, one
        # thread at a time. Threads that asked while another was importing them got
        # NotRegistered (5 of 6 threads at once; a web process's first concurrent enqueues
        # after a start lost their tasks).
        with _autodiscover_lock:
            if name not in tasks:
                current_app.loader.import_default_modules()
    return tasks[name]
