"""A batch round over the real driver sockets (`/ws/drivers/<id>/`, real Redis channel layer):
the winner hears `offer_accepted`, the other drivers of the round `offer_cancelled`."""
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from common.actors import Actor
from config.asgi import application
from offers.events import OfferCancelledEvent
from offers.models import DriverOffer
from tests.api import token_for
from tests.factories import CITY, DeliveryFactory, ZoneFactory, online_driver
from tests.typecheck import assert_event_shape
from workflows import offers
from workflows.dispatching import delivery_dispatch

pytestmark = pytest.mark.django_db(transaction=True)


async def next_of_type(comm, kind):
    while True:
        event = await comm.receive_json_from(timeout=5)
        if event["type"] == kind:
            return event


def test_the_losers_of_a_batch_hear_offer_cancelled_on_their_sockets():
    zone = ZoneFactory(bbox=(CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2), dispatch_policy="batch", offer_batch_size=3)
    a, b, c = (online_driver(km=km) for km in (0.5, 1.0, 1.5))
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    by_driver = {o.driver_id: o for o in DriverOffer.objects.filter(delivery=delivery, status="PENDING")}
    assert set(by_driver) == {a.pk, b.pk, c.pk}

    async def scenario():
        socks = {}
        for d in (a, b, c):
            socks[d.pk] = WebsocketCommunicator(application, f"/ws/drivers/{d.pk}/?token={token_for(d.user)}")
            connected, _ = await socks[d.pk].connect()
            assert connected
        won = by_driver[b.pk]
        await database_sync_to_async(offers.offer_accept)(offer_id=won.pk, driver_id=b.pk, actor=Actor("driver", b.pk))

        accepted = await next_of_type(socks[b.pk], "offer_accepted")
        assert accepted["offerId"] == str(won.pk)
        for loser in (a, c):
            event = await next_of_type(socks[loser.pk], "offer_cancelled")
            assert_event_shape(event, OfferCancelledEvent)
            assert event == {**event, "offerId": str(by_driver[loser.pk].pk), "driverId": str(loser.pk),
                             "deliveryId": str(delivery.pk), "reason": "taken_by_another_driver"}
        for comm in socks.values():
            await comm.disconnect()

    async_to_sync(scenario)()
