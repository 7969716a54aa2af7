"""On the core layer (CHANNELS_LAYER=core), a request's live events go through
`group_send_many` (common/channels.py): one scripted read of every group's members, then each
group with members gets its messages in order, exactly as one `group_send` per message would;
a group that fails is logged and does not stop the others. (The pub/sub default's batches are
what every socket test receives.)"""
import logging
import time

import pytest
import time_machine

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from common import broadcast
from common.channels import PooledRedisChannelLayer

pytestmark = pytest.mark.usefixtures("core_layer")


def test_the_default_layer_sends_batches():
    assert isinstance(get_channel_layer(), PooledRedisChannelLayer)


def test_a_batch_reaches_each_member_in_order_and_skips_empty_groups_without_group_send(listen, monkeypatch):
    ops, drv, both = listen("ops"), listen("driver.b1"), listen("ops", "driver.b1")

    async def no_group_send(self, group, message):
        raise AssertionError(f"group_send({group}) used for a batch")

    monkeypatch.setattr(PooledRedisChannelLayer, "group_send", no_group_send)
    broadcast.send_many([
        (["ops", "driver.b1", "driver.nobody"], {"type": "offer_created", "n": 0}),
        (["ops"], {"type": "offer_created", "n": 1}),
        (["driver.b1", "driver.nobody"], {"type": "offer_created", "n": 2}),
        (["ops"], {"type": "offer_created", "n": 3}),
    ])
    assert [e["n"] for e in ops.drain()] == [0, 1, 3]
    assert [e["n"] for e in drv.drain()] == [0, 2]
    assert sorted(e["n"] for e in both.drain()) == [0, 0, 1, 2, 3]


def test_many_messages_to_a_group_in_one_batch_arrive_in_order_at_every_member(listen):
    """One script puts all of a group's messages on its members' channels: each gets its own
    time, so they are received in order (messages of one time would come out in the random
    order of their serialized prefixes)."""
    first, second = listen("ops"), listen("ops")
    broadcast.send_many([(["ops"], {"type": "offer_created", "n": n}) for n in range(40)])
    assert [e["n"] for e in first.drain()] == list(range(40))
    assert [e["n"] for e in second.drain()] == list(range(40))


def test_a_later_batch_in_the_same_instant_comes_after_the_earlier_one(listen):
    """Each message scores just above the channel's newest: a batch's scores never run ahead of
    the next batch's, even when the clock has not moved between them."""
    ops = listen("ops")
    with time_machine.travel(time.time(), tick=False):
        broadcast.send_many([(["ops"], {"type": "offer_created", "n": n}) for n in range(20)])
        broadcast.send_many([(["ops"], {"type": "offer_created", "n": 20})])
    assert [e["n"] for e in ops.drain()] == list(range(21))


def test_a_full_channel_gets_no_more_and_the_others_still_do(listen, monkeypatch):
    full, other = listen("driver.cap"), listen("ops")
    layer = get_channel_layer()
    monkeypatch.setattr(layer, "get_capacity", lambda channel: 3 if channel == full.channel else 100)
    broadcast.send_many([(["driver.cap", "ops"], {"type": "offer_created", "n": n}) for n in range(5)])
    assert [e["n"] for e in full.drain()] == [0, 1, 2]
    assert [e["n"] for e in other.drain()] == [0, 1, 2, 3, 4]


def test_a_batch_leaves_out_members_whose_membership_expired(listen):
    layer = get_channel_layer()
    stale = listen("driver.stale")
    fresh = listen("driver.stale")

    async def expire(channel):  # as if it joined longer ago than group_expiry
        connection = layer.connection(layer.consistent_hash("driver.stale"))
        await connection.zadd(layer._group_key("driver.stale"), {channel: 1})

    async_to_sync(expire)(stale.channel)
    broadcast.send_many([(["driver.stale"], {"type": "offer_created", "n": 7})])
    assert [e["n"] for e in fresh.drain()] == [7]
    assert stale.drain() == []


def test_a_failing_group_is_logged_and_the_others_still_get_theirs(listen, monkeypatch, caplog):
    ops = listen("ops")
    listen("driver.broken")
    original = PooledRedisChannelLayer._send_to_members

    async def failing(self, group, channel_names, message):
        if group == "driver.broken":
            raise ConnectionError("boom")
        return await original(self, group, channel_names, message)

    monkeypatch.setattr(PooledRedisChannelLayer, "_send_to_members", failing)
    with caplog.at_level(logging.WARNING, logger="common.broadcast"):
        broadcast.send_many([(["driver.broken", "ops"], {"type": "offer_created", "n": 1})])
    assert [e["n"] for e in ops.drain()] == [1]
    assert any("driver.broken" in r.getMessage() for r in caplog.records)


def test_redis_down_for_a_batch_is_logged_never_raised(monkeypatch, caplog):
    async def down(self, batches):
        raise ConnectionError("redis down")

    monkeypatch.setattr(PooledRedisChannelLayer, "group_send_many", down)
    with caplog.at_level(logging.WARNING, logger="common.broadcast"):
        broadcast.send_many([(["ops"], {"type": "offer_created", "n": 1})])
    assert any("ops" in r.getMessage() for r in caplog.records)
