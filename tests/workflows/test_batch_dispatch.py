"""Batch and broadcast dispatch (issue 16): rounds of offers, first accept wins, the next round
only when none of the round is pending, and sequential dispatch unchanged."""
from datetime import timedelta

import pytest
import time_machine
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.models import DeliveryAuditLog
from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Assignment, Delivery
from escalation.models import UnassignedOrder
from offers.events import OfferCancelledEvent, OfferCreatedEvent
from offers.models import DriverOffer
from tests.api import assert_error, client_for
from tests.factories import CITY, DeliveryFactory, OfferFactory, ZoneFactory, online_driver
from tests.typecheck import assert_event_shape
from workflows import drivers as availability
from workflows import offers
from workflows.deliveries import delivery_cancel
from workflows.dispatching import delivery_dispatch, unassigned_retry
from workflows.escalations import escalation_check

pytestmark = pytest.mark.django_db

CITY_BBOX = (CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2)  # lon min, lat min, lon max, lat max
NEW = {
    "sellerOrderId": "BATCH-1", "storeName": "Downtown Market",
    "pickupLocation": {"lat": CITY[0], "lon": CITY[1]}, "dropoffLocation": {"lat": 12.99, "lon": 77.6},
    "prepTimeMinutes": 5,
}


def batch_zone(size=3, **kwargs):
    return ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=size, **kwargs)


def drivers_at(*kms):
    return [online_driver(km=km) for km in kms]


def pending(delivery):
    return list(DriverOffer.objects.filter(delivery=delivery, status="PENDING").order_by("slot"))


def current_offer_id(delivery):
    return Delivery.objects.values_list("current_offer_id", flat=True).get(pk=delivery.pk)


def accept(offer):
    return offers.offer_accept(offer_id=offer.pk, driver_id=offer.driver_id, actor=Actor("driver", offer.driver_id))


def reject(offer):
    return offers.offer_reject(offer_id=offer.pk, driver_id=offer.driver_id, reason="too_far", actor=Actor("driver", offer.driver_id))


# ----------------------------------------------------------------------- batch


def test_a_batch_zone_offers_the_top_n_ranked_drivers_at_once(django_assert_max_num_queries):
    zone = batch_zone(size=3)
    near, mid, far, farther, farthest = drivers_at(0.5, 1.0, 1.5, 2.0, 2.5)
    delivery = DeliveryFactory(zone=zone)

    # One INSERT for the three offers (and one SKIP LOCKED claim of the three drivers): the
    # statement count does not grow with the batch (pinned here at its measured 9).
    with django_assert_max_num_queries(9) as captured:
        result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    inserts = [q["sql"] for q in captured.captured_queries if q["sql"].startswith('INSERT INTO "driver_offers"')]
    assert len(inserts) == 1

    assert result.outcome == "offered"
    made = pending(delivery)
    assert [o.driver_id for o in made] == [near.pk, mid.pk, far.pk]
    assert [o.slot for o in made] == [1, 2, 3]
    assert [o.pk for o in result.offers] == [o.pk for o in made] and result.offer.pk == made[0].pk
    assert len({o.expires_at for o in made}) == 1
    assert current_offer_id(delivery) == made[0].pk  # the best-ranked pending offer
    sent = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="driver_offer_sent")
    assert sorted(r.details["driverId"] for r in sent) == sorted(str(d.pk) for d in (near, mid, far))
    assert not DriverOffer.objects.filter(driver__in=[farther, farthest]).exists()


def test_the_batch_size_and_policy_come_from_the_settings_outside_every_zone(settings):
    settings.DISPATCH_POLICY = "batch"
    settings.DISPATCH_BATCH_SIZE = 2
    drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory()  # no zone: the global settings
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    assert [o.slot for o in pending(delivery)] == [1, 2]


def test_the_first_accept_wins_and_the_rest_of_the_batch_is_withdrawn(listen, django_capture_on_commit_callbacks):
    zone = batch_zone(size=3)
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    first, second, third = pending(delivery)
    to_a, to_c, to_ops = listen(f"driver.{a.pk}"), listen(f"driver.{c.pk}"), listen("ops")

    with django_capture_on_commit_callbacks(execute=True):
        result = accept(second)

    delivery.refresh_from_db()
    assert delivery.status == "assigned" and delivery.current_offer_id is None
    assert delivery.accepted_offer_id == second.pk
    assert Assignment.objects.get(delivery=delivery, status="active").driver_id == b.pk
    assert str(result.assignment_id)
    for withdrawn in (first, third):
        withdrawn.refresh_from_db()
        assert (withdrawn.status, withdrawn.cancellation_reason) == ("CANCELLED", "taken_by_another_driver")
        assert withdrawn.accepted_at is None
    cancelled_audit = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="offer_cancelled")
    assert sorted(r.details["offerId"] for r in cancelled_audit) == sorted([str(first.pk), str(third.pk)])
    (to_driver_a,) = [e for e in to_a.drain() if e["type"] == "offer_cancelled"]
    assert_event_shape(to_driver_a, OfferCancelledEvent)
    assert to_driver_a["offerId"] == str(first.pk) and to_driver_a["reason"] == "taken_by_another_driver"
    assert [e["offerId"] for e in to_c.drain() if e["type"] == "offer_cancelled"] == [str(third.pk)]
    ops_cancelled = sorted(e["offerId"] for e in to_ops.drain() if e["type"] == "offer_cancelled")
    assert ops_cancelled == sorted([str(first.pk), str(third.pk)])

    # A withdrawn offer can no longer be accepted or rejected.
    with pytest.raises(Conflict):
        accept(first)
    with pytest.raises(Conflict):
        reject(third)
    assert Assignment.objects.filter(delivery=delivery).count() == 1


def test_a_reject_closes_only_its_offer_and_the_next_round_waits_for_the_whole_batch():
    zone = batch_zone(size=2)
    a, b, c, d, e = drivers_at(0.5, 1.0, 1.5, 2.0, 2.5)
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    first, second = pending(delivery)

    r = reject(first)  # the current (best-ranked) offer: the current offer passes to the other one
    assert r.next_offer is None
    assert [o.pk for o in pending(delivery)] == [second.pk]
    assert current_offer_id(delivery) == second.pk

    r = reject(second)  # the batch is over: the next round goes to the next two, never offered before
    nxt = pending(delivery)
    assert [o.driver_id for o in nxt] == [c.pk, d.pk]
    assert [o.slot for o in nxt] == [1, 2]
    assert r.next_offer.pk == nxt[0].pk and current_offer_id(delivery) == nxt[0].pk

    for offer in nxt:
        reject(offer)
    (last,) = pending(delivery)  # one candidate left: a round of one
    assert last.driver_id == e.pk
    reject(last)
    assert pending(delivery) == [] and current_offer_id(delivery) is None
    record = UnassignedOrder.objects.get(delivery=delivery, resolved_at__isnull=True)
    assert record.failure_reason == "no_available_drivers"


def test_an_expired_batch_moves_on_once_every_offer_of_it_has_expired():
    zone = batch_zone(size=2)
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
        first, second = pending(delivery)
        t.shift(timedelta(seconds=31))
        assert offers.offer_expire(offer_id=second.pk)
        assert [o.pk for o in pending(delivery)] == [first.pk]  # nothing new while one still waits
        assert current_offer_id(delivery) == first.pk
        assert offers.offer_expire(offer_id=first.pk)
        (nxt,) = pending(delivery)
    assert nxt.driver_id == c.pk and nxt.slot == 1
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="offer_expired").count() == 2


def test_the_accept_of_an_overdue_batch_offer_is_a_409_and_expires_it_alone():
    zone = batch_zone(size=2)
    drivers_at(0.5, 1.0)
    delivery = DeliveryFactory(zone=zone)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
        first, second = pending(delivery)
        t.shift(timedelta(seconds=30))
        with pytest.raises(Conflict):
            accept(first)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == ("EXPIRED", "PENDING")
    assert not Assignment.objects.filter(delivery=delivery).exists()


def test_a_driver_going_on_break_withdraws_only_its_offer_of_the_batch():
    zone = batch_zone(size=2)
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    first, second = pending(delivery)

    availability.availability_take_break(driver_id=a.pk, duration_minutes=10, reason="", actor=Actor("driver", a.pk))

    first.refresh_from_db()
    assert (first.status, first.cancellation_reason) == ("CANCELLED", "driver_on_break")
    assert [o.pk for o in pending(delivery)] == [second.pk]  # c is not offered yet
    assert current_offer_id(delivery) == second.pk


def test_cancelling_the_delivery_withdraws_the_whole_batch():
    zone = batch_zone(size=3)
    drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())

    delivery_cancel(delivery_id=delivery.pk, reason="customer changed mind", actor=Actor.system())

    statuses = set(DriverOffer.objects.filter(delivery=delivery).values_list("status", "cancellation_reason"))
    assert statuses == {("CANCELLED", "delivery_cancelled")}
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="offer_cancelled").count() == 3
    assert current_offer_id(delivery) is None


def test_auto_dispatch_false_once_ops_dispatched_it_gets_the_next_round(ops):
    """autoDispatch false waits for ops; once they dispatched it, the SPEC's rule holds: the
    round over, the next candidates get it."""
    zone = batch_zone(size=2)
    _a, _b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone, auto_dispatch=False)
    r = ops.post(f"/v2/deliveries/{delivery.pk}/dispatch", {}, format="json")  # ops dispatch: the zone's policy
    assert r.status_code in (200, 201), r.content
    first, second = pending(delivery)

    reject(first)  # the other offer of the round still waits
    assert pending(delivery) == [second]
    reject(second)  # the round is over: the next round, to the one candidate left
    assert [offer.driver_id for offer in pending(delivery)] == [c.pk]
    assert not UnassignedOrder.objects.filter(delivery=delivery).exists()


def test_an_ops_offer_stays_single_and_waits_for_the_batch(ops):
    zone = batch_zone(size=2)
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory(zone=zone, auto_dispatch=False)

    r = ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(a.pk)}, format="json")
    assert r.status_code == 201, r.content
    (single,) = pending(delivery)
    assert single.slot == 0

    reject(single)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())  # a round of the other two
    assert len(pending(delivery)) == 2
    r = ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(a.pk)}, format="json")
    assert_error(r, 409)
    assert "pending offer" in r.json()["message"]
    assert len(pending(delivery)) == 2


def test_the_retry_job_dispatches_an_unassigned_delivery_as_a_batch():
    zone = batch_zone(size=2)
    delivery = DeliveryFactory(zone=zone)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
        drivers_at(0.5, 1.0, 1.5)
        t.shift(timedelta(seconds=30))  # the job's next run
        assert unassigned_retry() == 1
        assert [o.slot for o in pending(delivery)] == [1, 2]
        t.shift(timedelta(seconds=30))
        assert unassigned_retry() == 0  # it has pending offers: not retried again


def test_the_level_2_escalation_searches_wide_with_a_batch():
    zone = batch_zone(size=2)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery = DeliveryFactory(zone=zone, ready_at=timezone.now())
        assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
        t.shift(timedelta(minutes=16))  # past level 2
        beyond = drivers_at(7.0, 7.5, 8.0)  # outside the 5 km radius, inside the 10 km wide one
        escalation_check()
        made = pending(delivery)
    assert [o.driver_id for o in made] == [beyond[0].pk, beyond[1].pk]
    assert [o.slot for o in made] == [1, 2]


# --------------------------------------------------------------------- broadcast


def test_broadcast_offers_every_eligible_driver_in_the_radius_up_to_the_cap():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="broadcast", broadcast_max_drivers=4, search_radius_km=3)
    inside = drivers_at(0.3, 0.6, 0.9, 1.2, 1.5, 1.8)
    on_break = online_driver(km=0.2, availability="on_break")
    outside = online_driver(km=4.0)
    delivery = DeliveryFactory(zone=zone)

    result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())

    made = pending(delivery)
    assert [o.driver_id for o in made] == [d.pk for d in inside[:4]]  # the cap, best-ranked first
    assert [o.slot for o in made] == [1, 2, 3, 4] and len(result.offers) == 4
    offered = set(DriverOffer.objects.filter(delivery=delivery).values_list("driver_id", flat=True))
    assert on_break.pk not in offered and outside.pk not in offered


def test_broadcast_below_its_cap_offers_all_in_the_same_statements_and_first_accept_wins(django_assert_max_num_queries):
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="broadcast", broadcast_max_drivers=25)
    everyone = drivers_at(*[0.2 * (i + 1) for i in range(12)])
    delivery = DeliveryFactory(zone=zone)
    with django_assert_max_num_queries(9):  # as many as a batch of 3: nothing per driver
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    made = pending(delivery)
    assert len(made) == 12
    assert {o.driver_id for o in made} == {d.pk for d in everyone}
    accept(made[2])
    assert set(DriverOffer.objects.filter(delivery=delivery).values_list("status", flat=True)) == {"ACCEPTED", "CANCELLED"}


def test_a_driver_with_a_pending_offer_elsewhere_is_not_in_the_round():
    zone = batch_zone(size=3)
    busy, free1, free2 = drivers_at(0.5, 1.0, 1.5)
    other = DeliveryFactory(zone=zone)
    offers.offer_create(delivery_id=other.pk, driver_id=busy.pk, actor=Actor.system())
    delivery = DeliveryFactory(zone=zone)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    assert [o.driver_id for o in pending(delivery)] == [free1.pk, free2.pk]


# ------------------------------------------------------------------- sequential


def test_sequential_is_unchanged_one_single_offer_at_a_time(settings):
    settings.DISPATCH_POLICY = "sequential"
    a, b = drivers_at(0.5, 1.0)
    delivery = DeliveryFactory(zone=ZoneFactory(bbox=CITY_BBOX))  # no policy of its own: the setting
    result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    (offer,) = pending(delivery)
    assert (offer.driver_id, offer.slot, result.offers) == (a.pk, 0, [offer])
    nxt = reject(offer).next_offer
    assert (nxt.driver_id, nxt.slot) == (b.pk, 0)
    assert current_offer_id(delivery) == nxt.pk


def test_the_database_keeps_a_single_offer_alone_and_a_round_in_distinct_slots():
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    delivery = DeliveryFactory()
    OfferFactory(delivery=delivery, driver=a)  # a single (sequential) offer, slot 0
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=delivery, driver=b)  # a second single offer
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=delivery, driver=b, slot=1)  # a round's offer beside a single one

    round_delivery = DeliveryFactory()
    OfferFactory(delivery=round_delivery, driver=b, slot=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=round_delivery, driver=c, slot=1)  # the same slot twice
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=round_delivery, driver=c, slot=0)  # a single offer beside a round
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=round_delivery, driver=c, slot=201)  # out of range
    OfferFactory(delivery=round_delivery, driver=c, slot=2)
    assert DriverOffer.objects.filter(delivery=round_delivery, status="PENDING").count() == 2


# --------------------------------------------------------------------------- API


def test_over_the_api_a_batch_delivery_is_offered_and_the_second_accept_is_a_409(integration, listen, django_capture_on_commit_callbacks):
    batch_zone(size=3)
    a, b, c = drivers_at(0.5, 1.0, 1.5)
    to_b = listen(f"driver.{b.pk}")

    with django_capture_on_commit_callbacks(execute=True):
        r = integration.post("/v2/deliveries", NEW, format="json")
    assert r.status_code == 201, r.content
    delivery = Delivery.objects.get(pk=r.json()["id"])
    made = pending(delivery)
    assert [o.driver_id for o in made] == [a.pk, b.pk, c.pk]
    assert r.json()["currentOfferId"] == str(made[0].pk)
    (created,) = [e for e in to_b.drain() if e["type"] == "offer_created"]
    assert_event_shape(created, OfferCreatedEvent)  # the seed's payload, unchanged
    assert set(created) == {"type", "offerId", "deliveryId", "payload", "expiresAt", "createdAt"}

    listed = client_for(b.user).get(f"/v2/drivers/{b.pk}/offers")
    assert [o["id"] for o in listed.json()["offers"]] == [str(made[1].pk)]

    won = client_for(c.user).post(f"/v2/drivers/{c.pk}/offers/{made[2].pk}/accept", {}, format="json")
    assert won.status_code == 200, won.content
    assert won.json()["assignmentId"]
    lost = client_for(a.user).post(f"/v2/drivers/{a.pk}/offers/{made[0].pk}/accept", {}, format="json")
    assert_error(lost, 409)
    assert "CANCELLED" in lost.json()["message"]
    assert client_for(b.user).get(f"/v2/drivers/{b.pk}/offers").json()["offers"] == []
    assert Assignment.objects.filter(delivery=delivery).count() == 1
