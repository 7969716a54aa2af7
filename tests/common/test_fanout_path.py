"""The customers' fan-out path over the real Redis layers: sync senders (the stream consumer,
Celery) keep one loop and its connections; the tracking layer's pipelined publishes keep each
group's order and report a failed group."""
import asyncio
import uuid

import msgpack
import pytest
import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from common import broadcast
from common.broadcast import TRACKING_LAYER, delivery_group, send_many


def _subscribed(group: str):
    layer = get_channel_layer(TRACKING_LAYER)
    pubsub = redis.Redis.from_url(settings.REDIS_URL).pubsub()  # bytes: the messages are msgpack
    pubsub.subscribe(f"{layer._kwargs.get('prefix', 'asgi')}__group__{group}")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    return pubsub


def test_events_sent_from_sync_code_reuse_one_loop_and_its_connections():
    group = delivery_group(uuid.uuid4())
    pubsub = _subscribed(group)
    layer = get_channel_layer(TRACKING_LAYER)
    try:
        send_many([([group], {"type": "delivery_location_updated", "n": 1})])
        loop = broadcast._sender_loop()
        loop_layer = layer._layers[loop]
        redis_client = loop_layer._shards[0]._redis
        layers_before = len(layer._layers)
        for n in (2, 3):
            send_many([([group], {"type": "delivery_location_updated", "n": n})])
        got = []
        while len(got) < 3:
            message = pubsub.get_message(timeout=5)
            assert message is not None, got
            if message["type"] == "message":
                got.append(msgpack.unpackb(message["data"])["event"]["n"])
    finally:
        pubsub.close()
    assert got == [1, 2, 3]
    # The same loop, loop layer and Redis client served every call (async_to_sync made a new
    # loop, and with it new connections, per call).
    assert broadcast._sender_loop() is loop and layer._layers[loop] is loop_layer
    assert loop_layer._shards[0]._redis is redis_client and len(layer._layers) == layers_before


def test_concurrent_tracking_sends_arrive_in_order_and_a_failed_group_is_reported():
    group, other = delivery_group(uuid.uuid4()), delivery_group(uuid.uuid4())

    async def scenario():
        layer = get_channel_layer(TRACKING_LAYER)
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            await asyncio.gather(*(layer.group_send(group, {"type": "t", "n": n}) for n in range(40)))
            failed = await layer.group_send_many({group: [{"type": "t", "n": 40 + n} for n in range(5)], other: [{"type": "t"}]})
            assert failed == {}
            got = [(await asyncio.wait_for(layer.receive(channel), 5))["n"] for _ in range(45)]
            assert got == list(range(45))

            shard = layer._get_layer()._get_shard(f"{layer._get_layer().prefix}__group__{group}")
            working, shard._redis = shard._redis, redis.asyncio.Redis(port=1, socket_connect_timeout=1)
            try:
                failed = await layer.group_send_many({group: [{"type": "t", "n": 99}]})
                with pytest.raises(Exception):
                    await layer.group_send(group, {"type": "t", "n": 98})
            finally:
                await shard._redis.aclose()
                shard._redis = working
            assert list(failed) == [group]
        finally:
            await layer.group_discard(group, channel)

    async_to_sync(scenario)()
