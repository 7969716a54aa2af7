"""A socket that reports itself open already receives its groups' events.

The consumer joins its groups before it accepts; accepting first left a window in which the
client (the support queue, the ops console) believed itself live while the group did not yet
hold its channel, and an event committed in that window was lost. A slow `group_add` (a busy
Redis) makes the window wide enough to hit every time."""
import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.pubsub import RedisPubSubLoopLayer

from common.broadcast import OPS_GROUP
from config.asgi import application
from escalation.events import SUPPORT_EVENTS_GROUP
from tests.factories import OpsUserFactory, SupportUserFactory
from tests.api import token_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_group_add(monkeypatch):
    original = RedisPubSubLoopLayer.group_add  # (the default layer's, per event loop)

    async def slow(self, group, channel):
        await asyncio.sleep(0.3)
        return await original(self, group, channel)

    monkeypatch.setattr(RedisPubSubLoopLayer, "group_add", slow)


def _first_event_after_open(path: str, group: str) -> dict:
    event = {"type": "support_ticket_created", "ticketId": "probe"}

    async def scenario():
        comm = WebsocketCommunicator(application, path)
        connected, _ = await comm.connect(timeout=5)
        assert connected
        # The instant the client sees the socket open, an event is committed elsewhere.
        await get_channel_layer().group_send(group, {"type": "support_ticket_created", "event": event})
        try:
            return await comm.receive_json_from(timeout=3)
        finally:
            await comm.disconnect()

    return async_to_sync(scenario)()


def test_the_support_socket_gets_an_event_sent_the_moment_it_opens(slow_group_add):
    agent = SupportUserFactory()
    got = _first_event_after_open(f"/ws/support/?token={token_for(agent)}", SUPPORT_EVENTS_GROUP)
    assert got["ticketId"] == "probe"


def test_the_ops_socket_gets_an_event_sent_the_moment_it_opens(slow_group_add):
    staff = OpsUserFactory()
    got = _first_event_after_open(f"/ws/ops/?token={token_for(staff)}", OPS_GROUP)
    assert got["ticketId"] == "probe"

