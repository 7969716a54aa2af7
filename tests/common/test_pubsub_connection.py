"""The pub/sub layer's connection to Redis (common.channels._Shard): a subscription holds once
`subscribe` returns (Redis confirmed it), and when a dropped connection comes back the sockets
that may have missed events meanwhile are closed with 1012 to reconnect and reload."""
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings

from common.channels import CoalescingPubSubChannelLayer, LayerUnavailable, _Shard
from common.metrics import PUBSUB_RECONNECTS
from config.asgi import application
from tests.api import token_for
from tests.factories import OpsUserFactory

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


class Link:
    """A TCP proxy to the tests' Redis holding what the client writes for `delay` seconds (a
    command reaches Redis that long after redis-py has written it), and that can be cut (its
    connections closed, new ones closed at once) and restored: Redis away for a while. Or
    stalled: the connections open now carry nothing more either way and stay open (a Redis
    stuck, a half-open connection whose peer still acknowledges), new ones work."""

    def __init__(self, delay: float = 0):
        self.delay = delay
        self.down = False
        self.silent = False  # (new connections taken and never answered: packets dropped)
        self.writers = []
        self.stalls: list[asyncio.Event] = []  # (one per connection carried)
        self.taken = 0  # (connections taken)
        self.hearing = asyncio.Event()  # (cleared: what clients write is no longer read)
        self.hearing.set()

    def stall(self):
        for stalled in self.stalls:
            stalled.set()

    def cut(self):
        self.down = True
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        db = urlsplit(django_settings.REDIS_URL).path
        self.url = f"redis://127.0.0.1:{port}{db}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.taken += 1
        if self.down:
            writer.close()
            return
        if self.silent:
            while await reader.read(65536):
                pass
            return
        self.writers.append(writer)
        target = urlsplit(django_settings.REDIS_URL)
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port or 6379)
        stalled = asyncio.Event()
        self.stalls.append(stalled)

        async def pipe(source, sink, delay, gate=None):
            try:
                while (gate is None or await gate.wait()) and (data := await source.read(65536)):
                    await asyncio.sleep(delay)
                    if stalled.is_set():
                        continue  # (read and dropped: the sender's TCP sees it taken)
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, self.delay, self.hearing), pipe(up_reader, writer, 0), return_exceptions=True)


@contextlib.asynccontextmanager
async def through_link(name: str, delay: float = 0, **options):
    """A pub/sub layer of its own (prefix `name-<random>`) that reaches Redis through a Link
    (its connections made with `options`), and a client straight to Redis: (link, layer, direct)."""
    async with Link(delay=delay) as link:
        layer = CoalescingPubSubChannelLayer(hosts=[{"address": link.url, **options}], prefix=f"{name}-{uuid.uuid4().hex[:8]}")
        direct = aioredis.from_url(django_settings.REDIS_URL)
        try:
            yield link, layer, direct
        finally:
            await layer.flush()
            await direct.aclose()


async def until(condition, seconds: float = 5.0) -> None:
    """Wait for `condition()` to hold, polling (no fixed sleep that a loaded machine outruns)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def until_async(read, condition, seconds: float = 5.0):
    """Wait for `condition(await read())` to hold; returns the last value read."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition(value := await read()):
        assert asyncio.get_running_loop().time() < deadline, f"condition not met in time: {value!r}"
        await asyncio.sleep(0.02)
    return value


def group_channel(layer, group: str) -> str:
    return layer._get_layer()._get_group_channel_name(group)


def test_a_group_joined_is_subscribed_at_redis_when_group_add_returns():
    """redis-py's SUBSCRIBE returns once written: a consumer that joined its groups and then
    accepted could miss an event published before Redis had read the command (here 0.3 s
    later). Now group_add returns once Redis has confirmed."""
    async def scenario():
        async with through_link("confirm", delay=0.3) as (link, layer, direct):
            channel = await layer.new_channel()
            await layer.group_add("ops", channel)
            group = group_channel(layer, "ops")
            subscribed = dict(await direct.pubsub_numsub(group))[group.encode()]
            await direct.publish(group, layer.serialize({"type": "probe"}))
            return subscribed, await asyncio.wait_for(layer.receive(channel), 5)

    assert async_to_sync(scenario)() == (1, {"type": "probe"})


def test_a_confirmation_owed_to_an_earlier_subscription_is_not_taken_for_a_new_one():
    """Redis answers SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE of one channel in order: the first
    confirmation, read after the unsubscribe was sent, says nothing of the second subscription."""
    async def scenario():
        shard = _Shard("redis://unused", channel_layer=None)
        shard._confirming["c"] = waiting = asyncio.get_running_loop().create_future()
        shard._unsubscribing["c"] = 1
        shard._received({"type": "subscribe", "channel": b"c", "data": 1})  # the first's
        first = waiting.done()
        shard._received({"type": "unsubscribe", "channel": b"c", "data": 0})
        shard._received({"type": "subscribe", "channel": b"c", "data": 1})  # the new one's
        return first, waiting.done(), dict(shard._unsubscribing)

    assert async_to_sync(scenario)() == (False, True, {})


def test_redis_away_for_a_while_then_back_tells_the_sockets_once_and_they_hear_what_comes_next(caplog):
    """Redis unreachable for ~1.5 s (each read fails, each reconnect is refused), then back: one
    warning that the connection failed, one that it came back, the channel told, and the group
    heard again."""
    async def scenario():
        async with through_link("away") as (link, layer, direct):
            channel = await layer.new_channel()
            await layer.group_add("ops", channel)
            link.cut()
            await asyncio.sleep(1.5)
            link.down = False
            told = await asyncio.wait_for(layer.receive(channel), 10)
            await direct.publish(group_channel(layer, "ops"), layer.serialize({"type": "probe"}))
            return told, await asyncio.wait_for(layer.receive(channel), 5)

    with caplog.at_level(logging.WARNING, logger="common.channels"):
        told, heard = async_to_sync(scenario)()

    assert told["type"] == "layer.reconnected" and 0 <= told["delay"] <= 0.01
    assert heard == {"type": "probe"}
    messages = [r.getMessage() for r in caplog.records if r.name == "common.channels"]
    assert [m.split(" (")[0].split(":")[0] for m in messages] == [
        "the channel layer's pub/sub connection to Redis failed",
        "the channel layer's pub/sub connection to Redis came back",
    ], messages


def _kill_pubsub_connection(connection) -> None:
    """Close, at the server, the Redis connection this process's layer subscribes on (as a
    Redis restart or a network drop would), and only that one: other test workers share Redis."""
    port = connection._writer.get_extra_info("sockname")[1]
    admin = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        (client,) = [c for c in admin.client_list(_type="pubsub") if c["addr"].endswith(f":{port}")]
        assert admin.client_kill_filter(_id=client["id"]) == 1
    finally:
        admin.close()


def test_sockets_are_closed_1012_when_their_pubsub_connection_comes_back(settings, caplog):
    """Redis drops the process's pub/sub connection; redis-py reconnects and subscribes again,
    silently, and what was published meanwhile never arrived: the sockets stayed open, out of
    date. Now each is closed with 1012 (its client reconnects and reloads), and a socket that
    connects afterwards hears what comes next."""
    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    token = token_for(OpsUserFactory())
    before = PUBSUB_RECONNECTS._value.get()

    async def scenario():
        url = f"/ws/ops/?token={token}&locations=0&positions=0"
        old = [WebsocketCommunicator(application, url) for _ in range(2)]
        for comm in old:
            assert (await comm.connect(timeout=10))[0]
        (shard,) = get_channel_layer()._get_layer()._shards
        await asyncio.to_thread(_kill_pubsub_connection, shard._pubsub.connection)
        closed = [await comm.receive_output(timeout=10) for comm in old]
        new = WebsocketCommunicator(application, url)
        assert (await new.connect(timeout=10))[0]
        await get_channel_layer().group_send("ops", {"type": "zone_health_updated", "event": {"type": "zone_health_updated"}})
        heard = await new.receive_json_from(timeout=10)
        await new.disconnect()
        for comm in old:
            await comm.disconnect(timeout=10)
        return closed, heard

    with caplog.at_level(logging.WARNING):
        closed, heard = async_to_sync(scenario)()

    assert closed == [{"type": "websocket.close", "code": 1012}] * 2
    assert heard == {"type": "zone_health_updated"}
    assert PUBSUB_RECONNECTS._value.get() - before == 1
    assert "2 sockets told to reconnect (1012)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # (a drop is a warning)


def test_a_first_connection_tells_no_socket(settings):
    """Only a connection that comes back closes sockets: the first one each loop opens does not."""
    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    token = token_for(OpsUserFactory())
    before = PUBSUB_RECONNECTS._value.get()

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token}&locations=0&positions=0")
        assert (await comm.connect(timeout=10))[0]
        await get_channel_layer().group_send("ops", {"type": "zone_health_updated", "event": {"n": 1}})
        heard = await comm.receive_json_from(timeout=10)
        quiet = await comm.receive_nothing(timeout=0.3)
        await comm.disconnect()
        return heard, quiet

    assert async_to_sync(scenario)() == ({"n": 1}, True)
    assert PUBSUB_RECONNECTS._value.get() == before


def _prefixes_for(**env_vars) -> list[str]:
    code = ("from django.conf import settings\n"
            "print(*(settings.CHANNEL_LAYERS[a]['CONFIG']['prefix'] for a in ('default', 'tracking')))")
    env = {k: v for k, v in os.environ.items() if k not in ("CHANNELS_PREFIX", "REDIS_URL")}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.base", **env_vars)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_deployments_on_two_databases_of_one_redis_server_get_their_own_pubsub_names():
    """Pub/sub channels belong to the Redis server, not to a database: two deployments on
    databases 0 and 1 of one server heard each other's events (a driver of one told of the
    other's offers) unless someone set CHANNELS_PREFIX."""
    assert _prefixes_for(REDIS_URL="redis://127.0.0.1:6379/0") == ["asgi", "asgi.tracking"]
    assert _prefixes_for(REDIS_URL="redis://127.0.0.1:6379/1") == ["asgi.db1", "asgi.db1.tracking"]
    assert _prefixes_for(REDIS_URL="unix:///run/redis.sock?db=2") == ["asgi.db2", "asgi.db2.tracking"]
    assert _prefixes_for(REDIS_URL="redis://127.0.0.1:6379/1", CHANNELS_PREFIX="city-a") == ["city-a", "city-a.tracking"]


def test_a_channel_whose_subscription_is_abandoned_or_unconfirmed_is_not_left_subscribed():
    """A socket gone while its channel waited for Redis's confirmation (or one whose
    confirmation came too late) never learns its channel's name, so nothing else would
    unsubscribe it: it stayed subscribed, with a queue, told of every reconnect."""
    async def scenario():
        async with through_link("abandon", delay=0.3) as (link, layer, direct):
            await layer.new_channel()  # (the connection made, one channel kept)
            waiting = asyncio.ensure_future(layer.new_channel())
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            loop_layer = layer._get_layer()
            (shard,) = loop_layer._shards
            shard.confirm_seconds = 0.1
            with pytest.raises(LayerUnavailable):
                await layer.new_channel()
            await until(lambda: len(shard._subscribed_to) == 1 and len(shard._pubsub.channels) == 1)
            return len(loop_layer.channels), len(shard._subscribed_to), len(shard._pubsub.channels)

    assert async_to_sync(scenario)() == (1, 1, 1)


def test_a_socket_refused_while_joining_its_groups_leaves_those_it_joined(settings, monkeypatch):
    """A refused socket never reaches `disconnect`: the groups it had joined kept its channel
    (this process subscribed to them, and each event looked it up) for good."""
    from common.channels import _BoundedLoopLayer as Layer

    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    token = token_for(OpsUserFactory())
    group_add = Layer.group_add

    async def failing_group_add(self, group, channel):
        await group_add(self, group, channel)
        if group.startswith("login"):
            raise LayerUnavailable("not confirmed")

    monkeypatch.setattr(Layer, "group_add", failing_group_add)

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token}&locations=0&positions=0")
        refused = await comm.connect(timeout=10)
        return refused, {group: members for group, members in get_channel_layer()._get_layer().groups.items() if members}

    assert async_to_sync(scenario)() == ((False, 1013), {})  # (no HTTP answer to send here: a close, 403)


def test_a_group_joined_right_after_a_reconnect_waits_for_its_subscription_again():
    """redis-py subscribes again on a reconnect without waiting: a socket joining a group this
    process already had returned at once, before Redis had the subscription back."""
    async def scenario():
        async with through_link("rejoin", delay=0.3) as (link, layer, direct):
            first, second = await layer.new_channel(), await layer.new_channel()
            await layer.group_add("ops", first)
            link.cut()
            await asyncio.sleep(0.3)
            link.down = False
            assert (await asyncio.wait_for(layer.receive(first), 10))["type"] == "layer.reconnected"
            await layer.group_add("ops", second)
            group = group_channel(layer, "ops")
            return dict(await direct.pubsub_numsub(group))[group.encode()]

    assert async_to_sync(scenario)() == 1


def test_a_redis_that_times_out_is_one_warning_not_an_error_a_second(caplog):
    """A Redis that takes connections and never answers (a failover's old address, a
    partition) fails each read with a timeout, not a connection error: it was logged as an
    unexpected ERROR, with its traceback, every few seconds."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class Silent:
        subscribed = True
        connection = None
        reads = 0

        async def get_message(self, **kwargs):
            Silent.reads += 1
            raise RedisTimeoutError("Timeout connecting to server")

    async def scenario():
        shard = _Shard("redis://unused", channel_layer=None)
        shard._pubsub = Silent()
        shard.retry_seconds = 0.01
        receiving = asyncio.ensure_future(shard._do_receiving())
        while Silent.reads < 5:
            await asyncio.sleep(0.01)
        receiving.cancel()

    with caplog.at_level(logging.WARNING):
        async_to_sync(scenario)()
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records] == [
        ("WARNING", "the channel layer's pub/sub connection to Redis failed")]


def test_the_layers_connections_to_redis_probe_an_idle_peer(settings):
    """A pub/sub connection whose Redis vanished without a word (a failover's old address, a
    partition) was listened on for the kernel's two hours: no reconnect, so no socket told.
    With TCP keep-alive it fails within ~25 s, and the reconnect tells the sockets."""
    import socket

    from config.settings.base import pubsub_hosts

    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] == pubsub_hosts(settings.REDIS_URL)
    assert settings.CHANNEL_LAYERS["tracking"]["CONFIG"]["hosts"] == pubsub_hosts(settings.REDIS_URL)

    async def scenario():
        layer = CoalescingPubSubChannelLayer(hosts=pubsub_hosts(settings.REDIS_URL), prefix=f"keep-{uuid.uuid4().hex[:8]}")
        try:
            await layer.new_channel()
            (shard,) = layer._get_layer()._shards
            sock = shard._pubsub.connection._writer.get_extra_info("socket")
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
        finally:
            await layer.flush()

    assert async_to_sync(scenario)() == (True, 10, 5, 3)


def test_two_tasks_finding_the_connection_dropped_connect_it_once():
    """The receive loop and a subscribe that both find the pub/sub connection dropped both
    reconnected it: each ran the handshake on the other's socket, or closed what the other
    was opening, and a socket connecting just then failed its handshake (500)."""
    from redis.asyncio.connection import Connection

    from common.channels import connecting_once

    async def scenario():
        async with Link(delay=0.05) as link:
            connection = connecting_once(Connection)(**aioredis.connection.parse_url(link.url))
            handshakes = []

            class Watcher:
                def seen(self, conn):
                    handshakes.append(conn._writer)

            watcher = Watcher()
            connection.register_connect_callback(watcher.seen)
            await asyncio.gather(*(connection.connect() for _ in range(4)))
            await connection.send_command("PING")
            reply = await connection.read_response()
            await connection.disconnect()
            return len(handshakes), reply

    assert async_to_sync(scenario)() == (1, b"PONG")


def test_a_socket_connecting_while_the_layer_fails_is_refused_503_with_one_warning(settings, monkeypatch, caplog):
    """Redis away while a socket connects: uvicorn answered the handshake 500 and logged a
    traceback per attempt (a socket audit: 991 in ten minutes of drops). Now a 503 with the
    error body and Retry-After, and one warning line."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from common.channels import _BoundedLoopLayer

    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    token = token_for(OpsUserFactory())

    async def refused(self, group, channel):
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(_BoundedLoopLayer, "group_add", refused)

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token}&locations=0&positions=0")
        comm.scope["extensions"] = {"websocket.http.response": {}}
        await comm.send_input({"type": "websocket.connect"})
        start = await comm.receive_output(timeout=10)
        body = await comm.receive_output(timeout=10)
        await comm.wait(timeout=10)
        return start, body

    with caplog.at_level(logging.WARNING):
        start, body = async_to_sync(scenario)()

    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"1"
    payload = json.loads(body["body"])
    assert payload["statusCode"] == 503 and payload["path"] == "/ws/ops/"
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == ["WARNING"]
    assert "OpsConsumer refused (503)" in caplog.text


def test_a_socket_that_closes_while_redis_is_away_is_not_subscribed_again(caplog):
    """Its UNSUBSCRIBE failed with the connection: channels_redis logged an ERROR, and redis-py,
    which keeps a channel until Redis confirms, subscribed it again on the reconnect, for good
    (a socket audit: subscriptions of sockets long gone grew with every drop)."""
    async def scenario():
        async with through_link("gone") as (link, layer, direct):
            kept, gone = await layer.new_channel(), await layer.new_channel()
            receiving = asyncio.ensure_future(layer.receive(gone))
            await asyncio.sleep(0.05)
            link.cut()
            receiving.cancel()  # (what a consumer's end does: its receive is cancelled)
            with pytest.raises(asyncio.CancelledError):
                await receiving
            await asyncio.sleep(1.2)
            link.down = False
            assert (await asyncio.wait_for(layer.receive(kept), 10))["type"] == "layer.reconnected"

            async def counts():
                found = dict(await direct.pubsub_numsub(kept, gone))
                return found[kept.encode()], found[gone.encode()]

            await until_async(counts, lambda found: found[0] == 1)  # (subscribed again)
            return await counts()

    with caplog.at_level(logging.WARNING):
        assert async_to_sync(scenario)() == (1, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_drop_seen_by_several_tasks_is_one_reconnect():
    """The receive loop and the tasks subscribing all meet a dropped connection; one
    reconnects it, and one whose read failed on the old socket closed the new one afterwards:
    a second reconnect, every socket told again (a review: 17–23 reconnects for 15 drops)."""
    name = f"drops-{uuid.uuid4().hex[:8]}"

    async def scenario():
        layer = CoalescingPubSubChannelLayer(hosts=[{"address": django_settings.REDIS_URL, "client_name": name}], prefix=name)
        admin = aioredis.from_url(django_settings.REDIS_URL)
        channel = await layer.new_channel()
        (shard,) = layer._get_layer()._shards
        stop = False

        async def churn(n):
            i = 0
            while not stop:
                try:
                    await layer.group_add(f"g{n}-{i}", channel)
                    await layer.group_discard(f"g{n}-{i}", channel)
                except RedisError:
                    pass
                i += 1

        churning = [asyncio.ensure_future(churn(n)) for n in range(4)]
        kills = 0
        try:
            for _ in range(6):
                await asyncio.sleep(0.3)
                for client in await admin.client_list(_type="pubsub"):
                    if client.get("name") == name:
                        kills += await admin.client_kill_filter(_id=client["id"])
            await asyncio.sleep(1)
        finally:
            stop = True
            await asyncio.gather(*churning, return_exceptions=True)
            await layer.flush()
            await admin.aclose()
        return kills, shard._reconnects

    kills, reconnects = async_to_sync(scenario)()
    assert kills == 6 and reconnects == 6


def test_an_unsubscribe_failing_across_a_reconnect_leaves_the_group_joinable():
    """redis-py reconnects (a reconnect forgets the answers owed), then raises what made it: the
    count of UNSUBSCRIBE answers owed went to -1, and the next SUBSCRIBE's confirmation was
    taken for a stale one: the group could not be joined again (5 s, then 503)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario():
        shard = _Shard("redis://unused", channel_layer=None)

        class DroppedPubSub:
            channels = {"g": None}

            def _normalize_keys(self, data):
                return dict(data)

            async def unsubscribe(self, channel):
                shard._reconnects += 1  # (what a reconnect does meanwhile)
                shard._unsubscribing.clear()
                raise RedisConnectionError("Connection closed by server.")

        shard._redis, shard._pubsub, shard._receive_task = object(), DroppedPubSub(), object()
        shard._subscribed_to.add("g")
        await shard.unsubscribe("g")
        shard._confirming["g"] = confirmed = asyncio.get_running_loop().create_future()
        shard._received({"type": "subscribe", "channel": b"g", "data": 1})
        return shard._unsubscribing["g"], confirmed.done()

    assert async_to_sync(scenario)() == (0, True)


def test_a_unix_socket_redis_gets_no_tcp_options():
    """TCP keep-alive options made every connection to a unix:// Redis raise TypeError: no
    socket event reached anyone."""
    from channels_redis.utils import create_pool

    from config.settings.base import pubsub_hosts

    (host,) = pubsub_hosts("unix:///run/redis.sock?db=2")
    assert "socket_keepalive" not in host and host["socket_connect_timeout"] == 5.0
    create_pool(host).make_connection()  # (raised TypeError: unexpected keyword 'socket_keepalive')
    (tcp,) = pubsub_hosts("rediss://example.com:6380/1")
    create_pool(tcp).make_connection()
    assert tcp["socket_keepalive"] is True


def test_while_redis_is_away_sockets_connecting_are_refused_at_once_not_one_after_another():
    """Each subscribe waited its turn under the shard's lock for its own connect attempt: with
    Redis dropping packets (here: connections taken and never answered), 20 sockets connecting
    waited 20 attempts, one after another (0.5 s each here, 5 s in production; before this
    session, without end). Now one attempt a second goes out; the others are refused
    (LayerUnavailable: a 503) at once."""
    async def scenario():
        async with through_link("away-fast") as (link, layer, direct):
            await layer.new_channel()
            (shard,) = layer._get_layer()._shards
            shard.confirm_seconds = 0.5
            link.silent = True
            link.cut()
            await until(lambda: shard._failed_at is not None)  # (the receive loop saw it)
            started = asyncio.get_running_loop().time()
            results = await asyncio.gather(*(layer.new_channel() for _ in range(20)), return_exceptions=True)
            took = asyncio.get_running_loop().time() - started
            link.down = link.silent = False
            return [type(r).__name__ for r in results], took

    kinds, took = async_to_sync(scenario)()
    assert set(kinds) == {"LayerUnavailable"} and took < 2.0, (kinds, took)


def test_a_socket_closed_right_after_a_channel_message_leaves_no_subscription(settings):
    """A channel message dispatched, then the client's close: the consumer made a new receive
    and cancelled it before it ran, so channels_redis's clean-up (in that receive) never ran,
    and the socket's channel stayed subscribed, with its queue, for good (an audit: 67 of 100
    sockets closed just after a reconnect's notice; resubscribed at every reconnect since)."""
    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    token = token_for(OpsUserFactory())

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token}&locations=0&positions=0")
        assert (await comm.connect(timeout=10))[0]
        layer = get_channel_layer()
        loop_layer = layer._get_layer()
        (shard,) = loop_layer._shards
        (channel,) = loop_layer.channels  # (this socket's)
        loop_layer.channels[channel].put_nowait(layer.serialize({"type": "layer.reconnected", "delay": 5}))
        await comm.send_input({"type": "websocket.disconnect", "code": 1000})
        await comm.wait(timeout=10)
        return channel in loop_layer.channels, channel in shard._subscribed_to

    assert async_to_sync(scenario)() == (False, False)


def quick_probe(layer, answer: float = 0.5) -> _Shard:
    """The layer's shard, probing its connection after 0.2 s of silence and giving up on it
    after `answer` seconds without an answer (5 s and 10 s in production)."""
    (shard,) = layer._get_layer()._shards
    shard.ping_seconds, shard.answer_seconds = 0.2, answer
    return shard


def test_a_connection_that_stops_answering_is_made_again_and_its_sockets_told(caplog):
    """A connection whose peer stops answering without closing it (a Redis stuck, a half-open
    connection whose TCP peer still acknowledges: keep-alive sees nothing wrong) was listened
    on for good, its sockets open and hearing nothing. Now an unanswered PING drops it; it is
    made again and the sockets are told (1012), and they hear what comes next."""
    async def scenario():
        async with through_link("stalled") as (link, layer, direct):
            channel = await layer.new_channel()
            shard = quick_probe(layer)
            await layer.group_add("ops", channel)
            link.stall()
            told = await asyncio.wait_for(layer.receive(channel), 10)
            await direct.publish(group_channel(layer, "ops"), layer.serialize({"type": "probe"}))
            return told["type"], await asyncio.wait_for(layer.receive(channel), 5), shard._reconnects

    with caplog.at_level(logging.WARNING, logger="common.channels"):
        told, heard, reconnects = async_to_sync(scenario)()

    assert (told, heard, reconnects) == ("layer.reconnected", {"type": "probe"}, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "common.channels"]
    assert [m.split(":")[0] for m in messages] == [
        "the channel layer's pub/sub connection to Redis failed (no answer to a PING within 0.5 s)",
        "the channel layer's pub/sub connection to Redis came back",
    ], messages


def test_a_reconnect_that_redis_never_answers_is_tried_again():
    """A stalled connection, dropped, meets a Redis that takes connections and never answers
    them (stuck, or a proxy whose Redis is gone): each reconnect gives up after the socket
    timeout (5 s in production, 0.5 s here) and the next goes out a second later; once Redis
    answers, the sockets are told and hear what comes next."""
    async def scenario():
        async with through_link("unanswered", socket_timeout=0.5) as (link, layer, direct):
            channel = await layer.new_channel()
            quick_probe(layer)
            await layer.group_add("ops", channel)
            taken = link.taken
            link.silent = True
            link.stall()
            await until(lambda: link.taken >= taken + 2, seconds=10)  # (two reconnects never answered)
            link.silent = False
            told = await asyncio.wait_for(layer.receive(channel), 10)
            await direct.publish(group_channel(layer, "ops"), layer.serialize({"type": "probe"}))
            return told["type"], await asyncio.wait_for(layer.receive(channel), 5)

    assert async_to_sync(scenario)() == ("layer.reconnected", {"type": "probe"})


def test_a_quiet_connection_that_answers_its_pings_is_kept():
    """The probe's PONG is an answer: a connection with nothing published on it for a while
    (three PINGs answered here) stays, and nobody is told anything."""
    async def scenario():
        async with through_link("quiet") as (link, layer, direct):
            channel = await layer.new_channel()
            shard = quick_probe(layer, answer=2.0)
            pongs = []
            received = shard._received
            shard._received = lambda message: pongs.append(message) if message["type"] == "pong" else received(message)
            await layer.group_add("ops", channel)
            await until(lambda: len(pongs) >= 3, seconds=10)
            await direct.publish(group_channel(layer, "ops"), layer.serialize({"type": "probe"}))
            heard = await asyncio.wait_for(layer.receive(channel), 5)
            return heard, shard._reconnects, link.taken

    assert async_to_sync(scenario)() == ({"type": "probe"}, 0, 1)



def test_an_answer_that_came_in_as_the_read_gave_up_is_not_taken_for_silence():
    """The loop held up while a read waited: its timer and the PONG fire in one turn, the read
    returns nothing with the PONG buffered, and the probe took the silence for a dead
    connection (a review: 4 runs in 10 with the loop blocked 1 s after a PING). Now it reads
    once more, without waiting, before it drops anything."""
    class Connection:
        dropped = None

        async def disconnect(self, nowait=False, error=None):
            self.dropped = error

    class BufferedPong:
        connection = Connection()
        reads = 0

        async def get_message(self, ignore_subscribe_messages=False, timeout=0.0):
            self.reads += 1
            return {"type": "pong", "pattern": None, "channel": None, "data": b""}

    async def scenario():
        shard = _Shard("redis://unused", channel_layer=None)
        shard._pubsub = pubsub = BufferedPong()
        now = asyncio.get_running_loop().time()
        shard._pinged_at = now - shard.answer_seconds - 1
        await shard._probe(now)
        return pubsub.connection.dropped, shard._pinged_at, shard._heard_at == now, pubsub.reads

    assert async_to_sync(scenario)() == (None, None, True, 1)


def test_a_drop_for_no_answer_spares_a_socket_made_since():
    """The receive loop gives up on its socket while a subscribe has just made a new one (the
    connection dropped and remade meanwhile): the new socket stays (dropping it told every
    socket of the process twice)."""
    from redis.asyncio.connection import Connection

    from common.channels import connecting_once

    async def scenario():
        async with Link() as link:
            connection = connecting_once(Connection)(**aioredis.connection.parse_url(link.url))
            read, remade, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def receive_loop():
                await connection.send_command("PING")
                await connection.read_response()  # (this task's socket: the first)
                read.set()
                await remade.wait()
                await connection.disconnect(nowait=True, error=RedisError("no answer"))
                done.set()

            task = asyncio.ensure_future(receive_loop())
            await read.wait()
            await connection.disconnect()
            await connection.connect()  # (a subscribe's reconnect: a second socket)
            remade.set()
            await done.wait()
            await task
            await connection.send_command("PING")
            reply = await connection.read_response()
            await connection.disconnect()
            return link.taken, reply

    assert async_to_sync(scenario)() == (2, b"PONG")


def test_a_connection_closed_after_an_error_goes_at_once_with_what_waits_to_be_written():
    """A write to a peer that reads nothing (a Redis stuck) fails, and the connection is closed:
    the close waited for what was left to be written, so the socket stayed open, for good."""
    from redis.asyncio.connection import Connection

    from common.channels import connecting_once

    async def scenario():
        async with Link() as link:
            connection = connecting_once(Connection)(**aioredis.connection.parse_url(link.url))
            await connection.connect()
            link.hearing.clear()
            writer = connection._writer
            writer.write(b"x" * (32 * 1024 * 1024))  # (more than the kernels' buffers take)
            await until(lambda: writer.transport.get_write_buffer_size() > 0)
            sock = writer.get_extra_info("socket")
            await connection.disconnect(nowait=True, error=RedisError("Timeout writing to socket"))
            await until(lambda: sock.fileno() == -1, seconds=2)
            link.hearing.set()

    async_to_sync(scenario)()
