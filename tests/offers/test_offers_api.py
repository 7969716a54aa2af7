"""Offers over the API: the seed's cases plus every 404/409 path and BOLA."""
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from audit.models import DeliveryAuditLog
from dispatch.models import Assignment, Delivery
from offers.events import OfferAcceptedEvent, OfferCreatedEvent, OfferRejectedEvent
from offers.models import DriverOffer
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, DriverFactory, online_driver
from tests.fakes import SENT
from tests.typecheck import assert_event_shape

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def recording_push(settings):
    SENT.clear()
    settings.PUSH_BACKEND = "tests.fakes.RecordingPush"
    return SENT


def offer_url(driver, offer=None, action=None):
    base = f"/v2/drivers/{driver.pk}/offers"
    return base + (f"/{offer}" if offer else "") + (f"/{action}" if action else "")


def create_offer(ops, delivery, driver, **body):
    return ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(driver.pk), **body}, format="json")


def test_ops_create_an_offer_with_the_seed_payload(ops, delivery, listen, django_capture_on_commit_callbacks):
    driver = online_driver(km=2.0, vehicle_type="car")
    events = listen(f"driver.{driver.pk}")
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False):
        delivery.ready_at = timezone.now()
        delivery.save()
        with django_capture_on_commit_callbacks(execute=True):
            r = create_offer(ops, delivery, driver)

    assert r.status_code == 201, r.content
    body = r.json()
    assert body["success"] is True
    assert body["expiresAt"] == "2026-02-01T10:00:30Z"
    p = body["payload"]
    assert p["pickupLocation"] == {"lat": 12.9716, "lon": 77.5946}
    assert p["pickupStoreName"] == "Downtown Market"
    assert p["estimatedDistanceKm"] == pytest.approx(2.0, abs=0.01)
    # 2 km × 1.3 road factor at 25 km/h ≈ 6.2 min of travel vs 5 min of prep → 7 min
    assert p["estimatedPickupTimeMin"] == 7
    assert p["estimatedEarning"] == pytest.approx(30 + 8 * (2.0 + 2.48), abs=0.1)
    assert p["estimatedDeliveryTime"] > "2026-02-01T10:07:00Z"
    offer = DriverOffer.objects.get(pk=body["offerId"])
    assert offer.status == "PENDING"
    assert Delivery.objects.get(pk=delivery.pk).current_offer_id == offer.pk
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="driver_offer_sent", actor_type="admin").count() == 1
    (event,) = events.drain()
    assert_event_shape(event, OfferCreatedEvent)
    assert event["offerId"] == str(offer.pk) and event["payload"] == p
    assert SENT == [(str(driver.pk), event)]
    offer.refresh_from_db()
    assert offer.notification_sent_at is not None and offer.notification_method == "both"


def test_offer_expiry_is_10_to_120_seconds(ops, delivery):
    driver = online_driver()
    for bad in (9, 121, "soon", -1):
        body = assert_error(create_offer(ops, delivery, driver, expiresInSeconds=bad), 400)
        assert "expiresInSeconds" in body["details"]
    r = create_offer(ops, delivery, driver, expiresInSeconds=120)
    assert r.status_code == 201
    offer = DriverOffer.objects.get(pk=r.json()["offerId"])
    assert (offer.expires_at - offer.created_at).total_seconds() == 120


def test_offer_creation_conflicts_and_unknowns(ops, delivery):
    busy = DriverFactory(availability="busy")
    assert_error(create_offer(ops, delivery, busy), 409)  # driver not available (the SPEC's 409)
    free = online_driver()
    assert_error(ops.post("/v2/deliveries/00000000-0000-0000-0000-000000000000/offers", {"driverId": str(free.pk)}, format="json"), 404)
    assert_error(ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": "00000000-0000-0000-0000-000000000000"}, format="json"), 404)
    assert create_offer(ops, delivery, free).status_code == 201
    assert_error(create_offer(ops, delivery, online_driver()), 409)  # the delivery has a pending offer
    assert_error(create_offer(ops, DeliveryFactory(), free), 409)  # the driver has a pending offer
    assert_error(create_offer(ops, DeliveryFactory(status="delivered"), online_driver()), 409)
    assert DriverOffer.objects.count() == 1


def test_only_ops_create_offers(integration, driver_client, delivery, driver):
    assert_error(create_offer(integration, delivery, driver), 403)
    assert_error(create_offer(driver_client, delivery, driver), 403)


def test_accepting_creates_the_assignment_and_makes_the_driver_busy(ops, delivery, listen, django_capture_on_commit_callbacks):
    driver = online_driver()
    me = client_for(driver.user)
    events = listen("ops")
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        offer_id = create_offer(ops, delivery, driver).json()["offerId"]
        events.drain()
        t.shift(timedelta(seconds=5))
        with django_capture_on_commit_callbacks(execute=True):
            r = me.post(offer_url(driver, offer_id, "accept"), {"acceptedAt": "2026-02-01T09:00:00Z"}, format="json")

    assert r.status_code == 200, r.content
    body = r.json()
    assignment = Assignment.objects.get(delivery=delivery)
    assert body == {"success": True, "assignmentId": str(assignment.pk), "deliveryId": str(delivery.pk),
                    "driverId": str(driver.pk), "responseTimeMs": 5000}  # server clock, not the device's
    driver.refresh_from_db()
    delivery.refresh_from_db()
    assert driver.availability == "busy"
    assert delivery.status == "assigned" and delivery.accepted_offer_id == delivery.accepted_offer.pk
    assert delivery.current_offer_id is None and delivery.offer_acceptance_count == 1
    assert DriverOffer.objects.get(pk=offer_id).status == "ACCEPTED"
    kinds = list(DeliveryAuditLog.objects.filter(delivery=delivery).values_list("event_type", flat=True))
    assert kinds[-2:] == ["driver_accepted", "driver_assigned"]
    accepted = [e for e in events.drain() if e["type"] == "offer_accepted"]
    assert len(accepted) == 1
    assert_event_shape(accepted[0], OfferAcceptedEvent)
    assert accepted[0]["assignmentId"] == str(assignment.pk) and accepted[0]["responseTimeMs"] == 5000


def test_accept_and_reject_errors(ops, delivery):
    driver = online_driver()
    me = client_for(driver.user)
    other = online_driver()
    offer_id = create_offer(ops, delivery, driver).json()["offerId"]

    assert_error(me.post(offer_url(driver, "00000000-0000-0000-0000-000000000000", "accept")), 404)
    # BOLA: another driver cannot see, accept or reject it, under either id
    theirs = client_for(other.user)
    assert_error(theirs.post(offer_url(other, offer_id, "accept")), 404)
    assert_error(theirs.post(offer_url(driver, offer_id, "accept")), 404)
    assert_error(theirs.post(offer_url(driver, offer_id, "reject")), 404)
    assert_error(theirs.get(offer_url(driver)), 404)
    assert_error(ops.post(offer_url(driver, offer_id, "accept")), 403)
    assert_error(me.post(offer_url(driver, offer_id, "reject"), {"reason": "lazy"}, format="json"), 400)
    assert_error(me.post(offer_url(driver, offer_id, "accept"), {"acceptedAt": "yesterday"}, format="json"), 400)
    assert_error(me.post(offer_url(driver, offer_id, "accept"), {"acceptedAt": "2026-02-01"}, format="json"), 400)

    assert me.post(offer_url(driver, offer_id, "accept")).status_code == 200
    assert_error(me.post(offer_url(driver, offer_id, "accept")), 409)
    assert_error(me.post(offer_url(driver, offer_id, "reject")), 409)


def test_accepting_an_expired_offer_is_a_conflict_even_before_the_sweep(ops, delivery):
    driver = online_driver(km=0.5)
    nxt = online_driver(km=1.0)
    me = client_for(driver.user)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        offer_id = create_offer(ops, delivery, driver, expiresInSeconds=10).json()["offerId"]
        t.shift(timedelta(seconds=10))
        err = assert_error(me.post(offer_url(driver, offer_id, "accept")), 409)

    assert "expired" in err["message"]
    assert DriverOffer.objects.get(pk=offer_id).status == "EXPIRED"
    assert not Assignment.objects.exists()
    driver.refresh_from_db()
    assert driver.availability == "available"
    # the delivery moved on to the next candidate at once
    assert DriverOffer.objects.get(delivery=delivery, status="PENDING").driver_id == nxt.pk


def test_rejecting_offers_the_next_candidate_in_the_same_request(ops, delivery, listen, django_capture_on_commit_callbacks):
    first = online_driver(km=0.3)
    second = online_driver(km=0.8)
    events = listen("ops")
    offer_id = create_offer(ops, delivery, first).json()["offerId"]
    events.drain()

    with django_capture_on_commit_callbacks(execute=True):
        r = client_for(first.user).post(offer_url(first, offer_id, "reject"), {"reason": "too_far"}, format="json")

    assert r.status_code == 200, r.content
    body = r.json()
    nxt = DriverOffer.objects.get(delivery=delivery, status="PENDING")
    assert body == {"success": True, "nextOfferId": str(nxt.pk), "reason": "too_far"}
    assert nxt.driver_id == second.pk
    rejected = DriverOffer.objects.get(pk=offer_id)
    assert (rejected.status, rejected.rejection_reason) == ("REJECTED", "too_far")
    assert rejected.driver_response_time_ms is not None
    first.refresh_from_db()
    assert first.availability == "available"
    received = events.drain()
    rej = [e for e in received if e["type"] == "offer_rejected"]
    assert_event_shape(rej[0], OfferRejectedEvent)
    assert rej[0]["reason"] == "too_far"
    assert [e["type"] for e in received if e["type"] == "offer_created"] == ["offer_created"]
    audit = DeliveryAuditLog.objects.get(delivery=delivery, event_type="driver_rejected")
    assert audit.details == {"offerId": offer_id, "driverId": str(first.pk), "reason": "too_far"}


def test_rejecting_without_a_reason_records_other_and_with_nobody_left_records_unassigned(ops, delivery):
    only = online_driver()
    offer_id = create_offer(ops, delivery, only).json()["offerId"]

    r = client_for(only.user).post(offer_url(only, offer_id, "reject"))

    assert r.json() == {"success": True, "reason": "other"}
    record = delivery.unassigned_records.get()
    assert record.failure_reason == "no_available_drivers"  # the only driver near declined it


def test_a_drivers_offer_list_shows_pending_unexpired_by_default(ops, delivery):
    driver = online_driver()
    me = client_for(driver.user)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        offer_id = create_offer(ops, delivery, driver).json()["offerId"]
        listed = me.get(offer_url(driver)).json()["offers"]
        assert [o["id"] for o in listed] == [offer_id]
        assert set(listed[0]) >= {"id", "deliveryId", "status", "payload", "createdAt", "expiresAt"}
        assert "responseTimeMs" not in listed[0]  # the seed's `responseTimeMs?: number`: absent, not null, until answered
        t.shift(timedelta(seconds=31))
        assert me.get(offer_url(driver)).json()["offers"] == []  # expired, even before the sweep
        assert [o["id"] for o in me.get(offer_url(driver) + "?status=PENDING").json()["offers"]] == [offer_id]
    assert_error(me.get(offer_url(driver) + "?status=LOST"), 400)
    assert ops.get(offer_url(driver) + "?status=PENDING").status_code == 200


def test_delivery_offers_list_for_ops_owner_and_the_offered_driver(ops, integration, delivery):
    a, b = online_driver(km=0.2), online_driver(km=0.4)
    offer_id = create_offer(ops, delivery, a).json()["offerId"]
    client_for(a.user).post(offer_url(a, offer_id, "reject"))

    listed = ops.get(f"/v2/deliveries/{delivery.pk}/offers").json()["offers"]
    assert len(listed) == 2
    assert [isinstance(o.get("responseTimeMs"), int) for o in listed] == [o["driverId"] == str(a.pk) for o in listed]
    # the seed's nullable rejection reason: null but for the rejected offer (it read "")
    assert {o["driverId"]: o["rejectionReason"] for o in listed} == {str(a.pk): "other", str(b.pk): None}
    assert len(integration.get(f"/v2/deliveries/{delivery.pk}/offers").json()["offers"]) == 2
    b_offer = DriverOffer.objects.get(driver=b)
    client_for(b.user).post(offer_url(b, b_offer.pk, "accept"))
    mine = client_for(b.user).get(f"/v2/deliveries/{delivery.pk}/offers").json()["offers"]
    assert [o["driverId"] for o in mine] == [str(b.pk)]  # the driver sees only its own
    assert_error(client_for(DriverFactory().user).get(f"/v2/deliveries/{delivery.pk}/offers"), 404)


def test_delivery_offers_list_reads_no_delivery_row(ops, integration, delivery, django_assert_max_num_queries):
    """The list checks who may see the delivery with one `SELECT 1` and reads the page: the
    token lookup, that check, the page (no delivery row, no latest assignment)."""
    driver = online_driver()
    create_offer(ops, delivery, driver)
    for client in (ops, integration):
        with django_assert_max_num_queries(3):
            r = client.get(f"/v2/deliveries/{delivery.pk}/offers")
        assert [o["driverId"] for o in r.json()["offers"]] == [str(driver.pk)]
    assert_error(ops.get("/v2/deliveries/00000000-0000-0000-0000-000000000000/offers"), 404)
