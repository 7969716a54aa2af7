"""`/ws/drivers/<id>/` over the real Redis channel layer."""
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator


from workflows import drivers as driver_workflows
from workflows.deliveries import assignment_create, delivery_cancel, delivery_reassign
from availability.events import AvailabilityChangedEvent
from common.actors import Actor
from common.errors import iso
from config.asgi import application
from dispatch.events import AssignmentCancelledEvent
from dispatch.models import Assignment
from tests.factories import CITY, DeliveryFactory, DriverFactory, OpsUserFactory, ZoneFactory, km_north, online_driver
from tests.typecheck import assert_event_shape
from tests.sockets import refusal
from tests.api import token_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_driver_gets_its_state_on_connect_and_its_availability_events():
    driver = DriverFactory(availability="offline")
    other = DriverFactory()
    actor = Actor("driver", driver.pk)

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}&snapshot=1")
        connected, _ = await comm.connect()
        assert connected
        snapshot = await comm.receive_json_from(timeout=5)
        assert snapshot["type"] == "availability_snapshot"
        assert snapshot["driverId"] == str(driver.pk) and snapshot["availability"] == "offline"

        await database_sync_to_async(driver_workflows.availability_resume)(driver_id=driver.pk, actor=actor)
        event = await comm.receive_json_from(timeout=5)
        assert_event_shape(event, AvailabilityChangedEvent)
        assert (event["fromState"], event["toState"]) == ("offline", "available")

        # another driver's change is not sent here
        await database_sync_to_async(driver_workflows.availability_end_shift)(driver_id=other.pk, actor=Actor.system())
        assert await comm.receive_nothing(timeout=0.3)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_driver_socket_refuses_bad_tokens_and_other_drivers():
    driver = DriverFactory()
    other = DriverFactory()
    ops_user = OpsUserFactory()

    async def scenario():
        for path, code in (
            (f"/ws/drivers/{driver.pk}/", 4401),
            (f"/ws/drivers/{driver.pk}/?token=bad", 4401),
            (f"/ws/drivers/{driver.pk}/?token={token_for(other.user)}", 4403),
            (f"/ws/drivers/{driver.pk}/?token={token_for(ops_user)}", 4403),
            (f"/ws/drivers/not-a-uuid/?token={token_for(driver.user)}", 4403),
        ):
            comm = WebsocketCommunicator(application, path)
            assert await refusal(comm) == code, path

    async_to_sync(scenario)()


def test_frames_from_the_client_are_ignored_and_the_socket_stays_live():
    """A frame that was not JSON (an app's keep-alive "ping") or a binary one raised out of the
    consumer: the socket dropped without a close code and the server logged an error."""
    driver = DriverFactory(availability="offline")

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}")
        connected, _ = await comm.connect()
        assert connected
        for frame in ({"text_data": "ping"}, {"bytes_data": b"\x00\xff"}, {"text_data": '{"type": "websocket.disconnect"}'},
                      {"text_data": "[1, 2]"}, {"text_data": '{"type": "offer_created", "event": {}}'}):
            await comm.send_to(**frame)
        assert await comm.receive_nothing(timeout=0.3)  # nothing answered, nothing closed

        await database_sync_to_async(driver_workflows.availability_resume)(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        assert (await comm.receive_json_from(timeout=5))["type"] == "availability_changed"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_a_driver_hears_of_each_delivery_taken_away_even_while_still_busy_with_another():
    """Cancelled or reassigned by ops: `assignment_cancelled` to that driver. With order
    stacking the driver stays busy with the other delivery, so no availability change says it."""
    zone = ZoneFactory(bbox=(CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2), stacking_enabled=True)
    driver = online_driver(km=0.02, vehicle_type="car")
    first, second, elsewhere = (
        DeliveryFactory(zone=zone, pickup_location=km_north(0), dropoff_location=km_north(2), prep_time_minutes=0)
        for _ in range(3)
    )
    for delivery in (first, second):
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    assignment_create(delivery_id=elsewhere.pk, driver_id=online_driver(km=1).pk, actor=Actor.system())
    ops_user = OpsUserFactory()
    ops, ops_token, driver_token = Actor.for_user(ops_user), token_for(ops_user), token_for(driver.user)

    async def scenario():
        # the driver's app sends its token as on the REST API, in the header
        auth = [(b"authorization", f"Token {driver_token}".encode())]
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?snapshot=1", headers=auth)
        connected, _ = await comm.connect()
        assert connected
        assert (await comm.receive_json_from(timeout=5))["availability"] == "busy"
        ops_comm = WebsocketCommunicator(application, f"/ws/ops/?token={ops_token}")
        assert (await ops_comm.connect())[0]

        await database_sync_to_async(delivery_cancel)(delivery_id=first.pk, reason="store closed", actor=ops)
        event = await comm.receive_json_from(timeout=5)
        assert_event_shape(event, AssignmentCancelledEvent)
        assignment = await database_sync_to_async(Assignment.objects.get)(delivery=first)
        assert event == {
            "type": "assignment_cancelled", "assignmentId": str(assignment.pk), "deliveryId": str(first.pk),
            "driverId": str(driver.pk), "reason": "delivery_cancelled", "cancelledAt": iso(assignment.ended_at),
        }
        assert await comm.receive_nothing(timeout=0.3)  # still busy with the second

        await database_sync_to_async(delivery_reassign)(delivery_id=second.pk, reason="too slow", actor=ops)
        event = await comm.receive_json_from(timeout=5)
        assert (event["type"], event["deliveryId"], event["reason"]) == ("assignment_cancelled", str(second.pk), "reassigned")
        freed = await comm.receive_json_from(timeout=5)
        assert (freed["type"], freed["fromState"], freed["toState"]) == ("availability_changed", "busy", "available")

        # another driver's delivery cancelled: nothing here
        await database_sync_to_async(delivery_cancel)(delivery_id=elsewhere.pk, reason="x", actor=ops)
        assert await comm.receive_nothing(timeout=0.3)
        await comm.disconnect()

        # ops saw all three (among the deliveries' and drivers' other events)
        seen = []
        while len(seen) < 3:
            event = await ops_comm.receive_json_from(timeout=5)
            if event["type"] == "assignment_cancelled":
                seen.append((event["deliveryId"], event["reason"]))
        assert seen == [(str(first.pk), "delivery_cancelled"), (str(second.pk), "reassigned"),
                        (str(elsewhere.pk), "delivery_cancelled")]
        await ops_comm.disconnect()

    async_to_sync(scenario)()


async def _connected(driver) -> WebsocketCommunicator:
    """The driver's own socket with its snapshot asked for, open (the snapshot not read yet)."""
    comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}&snapshot=1")
    connected, _ = await comm.connect()
    assert connected
    return comm


def test_a_change_committed_while_the_socket_opens_is_in_the_snapshot_or_sent_after_it(monkeypatch):
    """The snapshot was read before the socket joined its group: a change committed in between
    reached nobody, and the app showed "offline" to an available driver until the next change
    (the audit: 1 connect in ~700 with a change 0–30 ms after it). The change lands here right
    after the connect authorised the driver, before anything else."""
    from availability import consumers

    driver = DriverFactory(availability="offline")
    authorised = consumers._own_driver

    async def authorised_then_changed(user, driver_id):
        found = await authorised(user, driver_id)
        await database_sync_to_async(driver_workflows.availability_resume)(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        return found

    monkeypatch.setattr(consumers, "_own_driver", authorised_then_changed)

    async def scenario():
        comm = await _connected(driver)
        snapshot = await comm.receive_json_from(timeout=5)
        assert snapshot["availability"] == "available"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_the_snapshot_holds_the_offers_made_while_the_app_was_away():
    """Events are sent once: an offer made while the socket was closed was only in
    GET /offers; the snapshot has each pending offer as its `offer_created`."""
    from offers.events import OfferCreatedEvent
    from workflows import offers as offer_flows

    driver = online_driver()
    offer = offer_flows.offer_create(delivery_id=DeliveryFactory().pk, driver_id=driver.pk, actor=Actor.system())

    async def scenario():
        comm = await _connected(driver)
        snapshot = await comm.receive_json_from(timeout=5)
        assert [o["offerId"] for o in snapshot["pendingOffers"]] == [str(offer.pk)]
        assert_event_shape(snapshot["pendingOffers"][0], OfferCreatedEvent)
        assert snapshot["pendingOffers"][0]["expiresAt"] == iso(offer.expires_at)
        assert snapshot["activeDeliveries"] == []
        await comm.disconnect()

    async_to_sync(scenario)()


def test_the_snapshot_holds_the_deliveries_the_driver_has_now_and_not_one_taken_away():
    """An app back from a dropped connection learns what it carries without another call; one
    reassigned meanwhile is left out (its `assignment_cancelled` went while the app was away)."""
    driver = online_driver()
    kept, taken = DeliveryFactory(), DeliveryFactory()
    ops = Actor.for_user(OpsUserFactory())
    assignment_create(delivery_id=taken.pk, driver_id=driver.pk, actor=ops)
    delivery_reassign(delivery_id=taken.pk, reason="customer moved", actor=ops)
    assignment_create(delivery_id=kept.pk, driver_id=driver.pk, actor=ops)
    kept.refresh_from_db()

    async def scenario():
        comm = await _connected(driver)
        snapshot = await comm.receive_json_from(timeout=5)
        assert snapshot["activeDeliveries"] == [
            {"deliveryId": str(kept.pk), "status": "assigned", "assignedAt": iso(kept.assigned_at)}]
        await comm.disconnect()

    async_to_sync(scenario)()


def test_an_accept_is_heard_before_the_driver_turns_busy():
    """The driver's app heard `availability_changed` (busy) before `offer_accepted`: "I have a
    job" before knowing which offer won (the seed: the offer is accepted, then the driver busy)."""
    from workflows import offers as offer_flows

    driver = online_driver()
    offer = offer_flows.offer_create(delivery_id=DeliveryFactory().pk, driver_id=driver.pk, actor=Actor.system())

    async def scenario():
        comm = await _connected(driver)
        assert (await comm.receive_json_from(timeout=5))["type"] == "availability_snapshot"
        await database_sync_to_async(offer_flows.offer_accept)(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
        first, second = await comm.receive_json_from(timeout=5), await comm.receive_json_from(timeout=5)
        assert (first["type"], second["type"]) == ("offer_accepted", "availability_changed")
        assert second["toState"] == "busy"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_without_snapshot_1_the_first_message_is_the_spec_s_event():
    """The SPEC's driver socket gets offer_created, offer_expired, … and nothing else is
    promised: a client reading the first message after an offer for its `offer_created` read
    the `availability_snapshot` (now only with `&snapshot=1`)."""
    from workflows import offers as offer_flows

    driver = online_driver()

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}")
        assert (await comm.connect())[0]
        assert await comm.receive_nothing(timeout=0.2)
        offer = await database_sync_to_async(offer_flows.offer_create)(
            delivery_id=(await database_sync_to_async(DeliveryFactory)()).pk, driver_id=driver.pk, actor=Actor.system())
        first = await comm.receive_json_from(timeout=5)
        assert first["type"] == "offer_created" and first["offerId"] == str(offer.pk)
        await comm.disconnect()

    async_to_sync(scenario)()
