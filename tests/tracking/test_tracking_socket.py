"""`/ws/track/<deliveryId>/?token=` over the real Redis channel layer: the snapshot on connect,
the relayed location/ETA events, status updates, and closing itself at the end."""
import json
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.utils import timezone

from common.actors import Actor
from common.broadcast import send_now
from config.asgi import application
from tracking import selectors as tracking
from tracking.events import DeliveryEtaUpdatedEvent, DeliveryLocationUpdatedEvent
from workflows.deliveries import assignment_create, delivery_advance, delivery_cancel
from workflows.drivers import driver_location_record
from tracking.selectors import DeliverySnapshotMessage, DeliveryStatusUpdatedMessage
from tests.api import client_for, token_for
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, driver_at_dropoff, km_north
from tests.typecheck import assert_event_shape
from tests.sockets import refusal

pytestmark = pytest.mark.django_db(transaction=True)


def connect(delivery, token=None):
    token = delivery.tracking_token if token is None else token
    return WebsocketCommunicator(application, f"/ws/track/{delivery.pk}/?token={token}")


def driver_on(delivery, **kwargs):
    driver = DriverFactory(name="Maria Lopez", phone="+34 612 345 678", location=km_north(-2), **kwargs)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return driver


def status_body(delivery):
    return client_for(None).get(f"/v2/orders/{delivery.seller_order_id}/delivery-status?token={delivery.tracking_token}").json()


def test_bad_links_are_closed_with_4401_and_no_hint():
    delivery = DeliveryFactory()
    other = DeliveryFactory()

    async def scenario():
        for path in (
            f"/ws/track/{delivery.pk}/",
            f"/ws/track/{delivery.pk}/?token=",
            f"/ws/track/{delivery.pk}/?token=wrong",
            f"/ws/track/{delivery.pk}/?token={other.tracking_token}",
            f"/ws/track/{other.pk}/?token={delivery.tracking_token}",
            f"/ws/track/not-a-uuid/?token={delivery.tracking_token}",
            f"/ws/track/{delivery.pk}/?token={'x' * 500}",
        ):
            comm = WebsocketCommunicator(application, path)
            assert await refusal(comm) == 4401, path

    async_to_sync(scenario)()


def test_a_repeated_token_is_read_as_the_http_side_reads_it_the_last_one():
    delivery = DeliveryFactory()
    good, bad = delivery.tracking_token, "wrong"
    page = client_for(None).get(f"/v2/orders/{delivery.seller_order_id}/delivery-status?token={good}&token={bad}")
    assert page.status_code == 404

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/track/{delivery.pk}/?token={good}&token={bad}")
        assert await refusal(comm) == 4401
        comm = WebsocketCommunicator(application, f"/ws/track/{delivery.pk}/?token={bad}&token={good}")
        assert (await comm.connect())[0]
        assert (await comm.receive_json_from(timeout=5))["type"] == "delivery_snapshot"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_the_customer_gets_a_snapshot_then_location_eta_and_status_updates_then_a_final_close():
    delivery = DeliveryFactory(prep_time_minutes=0)
    driver = driver_on(delivery)
    actor = Actor("driver", driver.pk)
    expected_snapshot = {"type": "delivery_snapshot", **status_body(delivery)}

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        snapshot = await comm.receive_json_from(timeout=5)
        assert_event_shape(snapshot, DeliverySnapshotMessage)
        assert snapshot == expected_snapshot
        assert snapshot["status"] == "assigned" and snapshot["driver"]["name"] == "Maria L."

        # A fix through the real endpoint: the location, and the ETA (the first fix is due).
        response = await database_sync_to_async(client_for(driver.user).post)(
            f"/v2/drivers/{driver.pk}/location", {"lat": km_north(-1).y, "lon": km_north(-1).x, "speed": 10, "heading": 5},
            format="json",
        )
        assert response.status_code == 200
        location = await comm.receive_json_from(timeout=5)
        assert_event_shape(location, DeliveryLocationUpdatedEvent)
        assert location["deliveryId"] == str(delivery.pk) and location["speed"] == 36.0
        eta_event = await comm.receive_json_from(timeout=5)
        assert_event_shape(eta_event, DeliveryEtaUpdatedEvent)

        # Steps: a status update (the status body, fresh) for each change, ETA refreshes between.
        for step, status in (("pickup-started", None), ("pickup-completed", "picked_up"), ("delivery-started", "in_transit")):
            await database_sync_to_async(delivery_advance)(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=actor)
            if status is None:
                assert await comm.receive_nothing(timeout=0.3)  # pickup-started changes no status
                continue
            messages = [await comm.receive_json_from(timeout=5), await comm.receive_json_from(timeout=5)]
            update = next(m for m in messages if m["type"] == "delivery_status_updated")
            assert_event_shape(update, DeliveryStatusUpdatedMessage)
            assert update["status"] == status and "driverId" not in update and update["driver"]["phone"] == "***-***-5678"
            assert {m["type"] for m in messages} == {"delivery_status_updated", "delivery_eta_updated"}

        await database_sync_to_async(driver_at_dropoff)(driver, delivery)  # at the door; nothing for the customer
        await database_sync_to_async(delivery_advance)(
            delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-completed", actor=actor
        )
        final = await comm.receive_json_from(timeout=5)
        assert final == {
            "type": "delivery_status_updated", "status": "delivered",
            "trackingUrl": delivery.tracking_url, "deliveryId": str(delivery.pk),
        }
        assert (await comm.receive_output(timeout=5)) == {"type": "websocket.close", "code": 1000}

    async_to_sync(scenario)()


def test_changes_in_quick_succession_each_reach_the_customer_with_their_own_status():
    """The socket read the row for each change when it got to it: steps done back to back (or
    a socket among hundreds, reading late) gave pending, in transit twice, delivered."""
    delivery = DeliveryFactory(prep_time_minutes=0)
    driver = driver_on(delivery)
    actor = Actor("driver", driver.pk)

    def walk():
        for step in ("pickup-started", "pickup-completed", "delivery-started"):
            delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=actor)
        driver_at_dropoff(driver, delivery)
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-completed", actor=actor)

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        assert (await comm.receive_json_from(timeout=5))["status"] == "assigned"
        await database_sync_to_async(walk)()  # all committed before the socket reads any of them
        updates = []
        while True:
            output = await comm.receive_output(timeout=5)
            if output["type"] == "websocket.close":
                break
            message = json.loads(output["text"])
            if message["type"] == "delivery_status_updated":
                assert_event_shape(message, DeliveryStatusUpdatedMessage)
                updates.append(message)
        return updates

    updates = async_to_sync(scenario)()
    assert [u["status"] for u in updates] == ["picked_up", "in_transit", "delivered"]
    assert all("driver" not in u for u in updates)  # read once it was over: no driver any more
    assert updates[-1] == {"type": "delivery_status_updated", "status": "delivered",
                           "trackingUrl": delivery.tracking_url, "deliveryId": str(delivery.pk)}


def test_a_cancelled_delivery_sends_its_final_state_and_closes_even_before_assignment():
    delivery = DeliveryFactory()

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        assert (await comm.receive_json_from(timeout=5))["status"] == "pending"

        await database_sync_to_async(delivery_cancel)(delivery_id=delivery.pk, reason="ops: store closed", actor=Actor.system())
        final = await comm.receive_json_from(timeout=5)
        assert final["type"] == "delivery_status_updated" and final["status"] == "cancelled"
        assert "ops: store closed" not in str(final)  # ops' reason stays internal
        assert (await comm.receive_output(timeout=5))["type"] == "websocket.close"

    async_to_sync(scenario)()


def test_connecting_to_a_finished_delivery_gets_only_the_final_state_and_a_close():
    delivery = DeliveryFactory()
    driver = driver_on(delivery)
    delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-failed", reason="gate locked",
                     actor=Actor("driver", driver.pk))

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        snapshot = await comm.receive_json_from(timeout=5)
        assert snapshot == {"type": "delivery_snapshot", "status": "failed", "trackingUrl": delivery.tracking_url,
                            "deliveryId": str(delivery.pk)}
        assert (await comm.receive_output(timeout=5))["type"] == "websocket.close"

    async_to_sync(scenario)()


def test_other_deliveries_and_internal_event_types_never_reach_the_customer():
    delivery = DeliveryFactory()
    other = DeliveryFactory()
    driver_on(delivery)
    other_driver = driver_on(other)

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        await comm.receive_json_from(timeout=5)

        await database_sync_to_async(driver_location_record)(
            driver_id=other_driver.pk, lat=12.95, lon=77.6, recorded_at=timezone.now() + timedelta(seconds=1)
        )
        # An ops-only event that someone sends to the delivery's group is dropped, not a crash.
        await database_sync_to_async(send_now)(
            [f"delivery.{delivery.pk}"], {"type": "offer_created", "offerId": "x", "driverId": "secret"}
        )
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_ops_get_each_location_and_eta_event_and_the_digest_unless_they_ask_for_no_locations():
    """SPEC: /ws/ops/ gets "all of the above", `delivery_location_updated` included (it got only
    the per-second digest); the live map asks for none with `?locations=0`."""
    delivery = DeliveryFactory()
    driver = driver_on(delivery)
    ops_user = OpsUserFactory()

    async def types_until_quiet(comm) -> set:
        types = set()
        while not await comm.receive_nothing(timeout=1.0):
            types.add((await comm.receive_json_from(timeout=5))["type"])
        return types

    async def scenario():
        everything = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(ops_user)}")
        map_only = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(ops_user)}&locations=0")
        lists = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(ops_user)}&locations=0&positions=0")
        assert (await everything.connect())[0] and (await map_only.connect())[0] and (await lists.connect())[0]
        await database_sync_to_async(driver_location_record)(
            driver_id=driver.pk, lat=12.96, lon=77.59, recorded_at=timezone.now() + timedelta(seconds=1)
        )
        await database_sync_to_async(call_command)("consume_fixes", "--once")  # publishes the digest
        assert await types_until_quiet(everything) == {"delivery_location_updated", "driver_positions", "delivery_eta_updated"}
        assert await types_until_quiet(map_only) == {"driver_positions", "delivery_eta_updated"}
        assert await types_until_quiet(lists) == {"delivery_eta_updated"}  # (the console's lists: no digest)
        for comm in (everything, map_only, lists):
            await comm.disconnect()

    async_to_sync(scenario)()


def test_the_customer_status_never_exposes_internal_fields():
    delivery = DeliveryFactory()
    driver_on(delivery)

    body = tracking.tracking_message(tracking.Delivery.objects.get(pk=delivery.pk), kind="delivery_snapshot")

    assert set(body) <= set(DeliverySnapshotMessage.__annotations__) | {"type"}
    assert_event_shape(body, DeliverySnapshotMessage)


@pytest.mark.slow
def test_an_idle_customer_socket_survives_quiet_spells_longer_than_the_layers_blocking_read():
    """channels_redis blocks up to 5 s per read; the Redis client must not time out first."""
    delivery = DeliveryFactory()
    driver = driver_on(delivery)

    async def scenario():
        comm = connect(delivery)
        assert (await comm.connect())[0]
        await comm.receive_json_from(timeout=5)
        assert await comm.receive_nothing(timeout=11, interval=0.5)  # two blocking reads come back empty
        await database_sync_to_async(driver_location_record)(
            driver_id=driver.pk, lat=12.96, lon=77.59, recorded_at=timezone.now() + timedelta(seconds=1)
        )
        assert (await comm.receive_json_from(timeout=5))["type"] == "delivery_location_updated"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_the_customer_socket_opens_from_any_origin_the_logged_in_ones_do_not():
    """A tracker embedded on a seller's site was refused (403): the customer's socket has no
    cookie to protect, its link's token is its only credential."""
    delivery = DeliveryFactory()
    ops_user = OpsUserFactory()

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/track/{delivery.pk}/?token={delivery.tracking_token}",
                                     headers=[(b"origin", b"https://shop.example")])
        assert (await comm.connect(timeout=10))[0]
        assert (await comm.receive_json_from(timeout=5))["type"] == "delivery_snapshot"
        await comm.disconnect()
        ops = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(ops_user)}",
                                    headers=[(b"origin", b"https://shop.example")])
        assert (await ops.connect(timeout=10))[0] is False

    async_to_sync(scenario)()

