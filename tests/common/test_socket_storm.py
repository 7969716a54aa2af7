"""A socket storm: many sockets opening and closing at once, on the pub/sub layer (the default:
each gets the group's message, nothing is logged as an error) and on the core layer (CHANNELS_LAYER=core) they share a
small channel-layer pool (common/channels.py) and wait for a connection instead of failing
(redis-py's default pool raises MaxConnectionsError past its size), and the storm reuses the
pool's connections."""
import asyncio
import logging
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from config.asgi import application
from tests.factories import OpsUserFactory
from tests.api import token_for

pytestmark = pytest.mark.django_db(transaction=True)

SOCKETS = 60


async def close_all(comms) -> None:
    """Disconnect every socket and wait for each application to end by itself. (The
    communicator's disconnect() cancels an application still running at its timeout, and the
    consumer's clean-up swallows that: a consumer whose channel-layer receive had swallowed
    its own cancellation (common/channels.py) went unseen, 30 s later. Here it fails.)"""
    async def close(comm):
        await comm.send_input({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(asyncio.shield(comm.future), timeout=30)

    await asyncio.gather(*(close(c) for c in comms))


def test_a_storm_of_sockets_on_the_pub_sub_layer_connects_and_closes_without_errors(settings, caplog):
    settings.SOCKET_MAX_PER_CREDENTIAL = 0  # (all on one token)
    token = token_for(OpsUserFactory())

    async def storm():
        comms = [WebsocketCommunicator(application, f"/ws/ops/?token={token}") for _ in range(SOCKETS)]
        connected = await asyncio.gather(*(c.connect(timeout=30) for c in comms))
        await get_channel_layer().group_send("ops", {"type": "zone_health_updated", "event": {"type": "zone_health_updated"}})
        received = await asyncio.gather(*(c.receive_json_from(timeout=30) for c in comms))
        await close_all(comms)
        return connected, received

    with caplog.at_level(logging.WARNING):
        connected, received = async_to_sync(storm)()

    assert all(ok for ok, _ in connected) and len(received) == SOCKETS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_storm_of_sockets_on_a_small_pool_connects_and_closes_without_errors(settings, caplog, core_layer):
    settings.CHANNELS_REDIS_MAX_CONNECTIONS = 8  # far fewer than the sockets at once
    settings.SOCKET_MAX_PER_CREDENTIAL = 0  # (all on one token)
    token = token_for(OpsUserFactory())

    async def storm():
        comms = [WebsocketCommunicator(application, f"/ws/ops/?token={token}") for _ in range(SOCKETS)]
        connected = await asyncio.gather(*(c.connect(timeout=30) for c in comms))
        layer = get_channel_layer()
        await layer.group_send("ops", {"type": "zone_health_updated", "event": {"type": "zone_health_updated"}})
        received = await asyncio.gather(*(c.receive_json_from(timeout=30) for c in comms))
        await close_all(comms)
        pool = layer._layers[asyncio.get_running_loop()].get_connection(0).connection_pool
        opened = len(pool._available_connections) + len(pool._in_use_connections)
        return connected, received, opened

    with caplog.at_level(logging.WARNING):
        connected, received, opened = async_to_sync(storm)()

    assert all(ok for ok, _ in connected)
    assert len(received) == SOCKETS
    assert opened <= 8  # the storm reused the pool's connections
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or "MaxConnections" in r.getMessage()]


def test_after_a_storm_the_pool_keeps_only_its_idle_cap_open(settings, core_layer):
    """Redis's connection count returns to its baseline once the storm is over: the pool
    closes what it holds idle beyond CHANNELS_REDIS_MAX_IDLE after CHANNELS_REDIS_IDLE_SECONDS
    (a timer), and nothing while the burst lasts. Redis's own CLIENT LIST is the judge."""
    from common.redis import get_redis

    settings.CHANNELS_REDIS_MAX_CONNECTIONS = 40
    settings.SOCKET_MAX_PER_CREDENTIAL = 0  # (all on one token)
    settings.CHANNELS_REDIS_MAX_IDLE = 3
    settings.CHANNELS_REDIS_IDLE_SECONDS = 3600  # the timer never fires in this test: reap() is called
    token = token_for(OpsUserFactory())
    name = "storm-pool-test"

    def ours() -> int:
        return sum(1 for c in get_redis().client_list() if c.get("name") == name)

    def ours_once_redis_saw_the_closes(at_most: int) -> int:
        """Redis drops a client when it next reads that socket, and may answer CLIENT LIST on
        another connection first: ask until it has caught up (or 5 s have passed)."""
        deadline = time.monotonic() + 5
        while (count := ours()) > at_most and time.monotonic() < deadline:
            time.sleep(0.02)
        return count

    async def storm():
        layer = get_channel_layer()
        comms = [WebsocketCommunicator(application, f"/ws/ops/?token={token}") for _ in range(SOCKETS)]
        await asyncio.gather(*(c.connect(timeout=30) for c in comms))
        pool = layer._layers[asyncio.get_running_loop()].get_connection(0).connection_pool
        pool.connection_kwargs["client_name"] = name  # new connections name themselves
        for conn in pool._available_connections:  # and the ones already open are closed
            await conn.disconnect()
        pool._available_connections.clear()
        held = [await pool.get_connection() for _ in range(12)]  # a burst: 12 in use at once
        peak = ours()
        for conn in held:
            await pool.release(conn)
        during = ours()  # just released: still the burst, nothing closed
        timer_set = pool._reaper is not None
        pool.idle_seconds = 0  # as if the timer fired after the idle time
        closed = await pool.reap()
        after, idle = ours_once_redis_saw_the_closes(3), len(pool._available_connections)
        await close_all(comms)
        return peak, during, timer_set, closed, after, idle

    peak, during, timer_set, closed, after, idle = async_to_sync(storm)()

    assert peak >= 12 and during == peak and timer_set
    assert closed >= 9 and after <= 3 and idle <= 3


def _capacity(settings, n: int) -> None:
    layers = {alias: dict(layer, CONFIG=dict(layer["CONFIG"])) for alias, layer in settings.CHANNEL_LAYERS.items()}
    layers["default"]["CONFIG"]["capacity"] = n
    settings.CHANNEL_LAYERS = layers


def test_a_sockets_queue_past_the_layers_capacity_is_dropped_and_its_consumer_told(settings):
    """channels_redis's pub/sub queue is unbounded: a client reading slower than its events
    arrive grew the web process's memory without end. Past `capacity` what waits is dropped and
    the consumer told (`socket.behind`); dropping the oldest lost events with no sign."""
    from common.metrics import LIVE_EVENTS_DROPPED

    _capacity(settings, 5)
    before = LIVE_EVENTS_DROPPED.labels("socket_behind")._value.get()

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add("ops.capacity-test", channel)
        for n in range(8):
            await layer.group_send("ops.capacity-test", {"type": "probe", "n": n})
        await layer.group_send("ops.capacity-test", {"type": "probe", "n": "last"})
        queue = layer._get_layer().channels[channel]
        for _ in range(250):  # (until Redis has delivered them all to this process)
            if queue.fell_behind and LIVE_EVENTS_DROPPED.labels("socket_behind")._value.get() - before == 9:
                break
            await asyncio.sleep(0.02)
        return [await layer.receive(channel) for _ in range(queue.qsize())]

    assert async_to_sync(scenario)() == [{"type": "socket.behind"}]
    assert LIVE_EVENTS_DROPPED.labels("socket_behind")._value.get() - before == 9  # 5 waiting, the 6th, 3 after


def test_a_socket_that_fell_behind_is_closed_1013_to_reconnect_and_reload(settings):
    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    _capacity(settings, 2)
    token = token_for(OpsUserFactory())

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token}&locations=0&positions=0")
        assert (await comm.connect(timeout=10))[0]
        layer = get_channel_layer()._get_layer()
        (queue,) = [q for q in layer.channels.values() if not q.qsize()][-1:]  # (its consumer's, waiting)
        for n in range(3):  # faster than the consumer reads: no await between them
            queue.put_nowait(get_channel_layer().serialize({"type": "zone_health_updated", "event": {"n": n}}))
        closed = await comm.receive_output(timeout=10)
        await comm.disconnect()
        return closed

    assert async_to_sync(scenario)() == {"type": "websocket.close", "code": 1013}
