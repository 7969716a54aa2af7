"""A driver free again pulls the deliveries waiting near it (workflows.dispatching.driver_freed_pull):
a moment after the change, off the request, where the retry job took up to 30 s."""
from datetime import timedelta

import pytest
import time_machine
from django.test import TestCase
from django.utils import timezone

from availability.models import Driver
from common.actors import Actor
from common.broadcast import tasks_diverted
from dispatch.models import Delivery
from dispatch.tasks import driver_freed
from escalation.models import UnassignedOrder
from offers.models import DriverOffer
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, OpsUserFactory, ZoneFactory, driver_at_dropoff, km_north, online_driver
from workflows import drivers as availability
from workflows.deliveries import assignment_create, delivery_cancel, delivery_reassign
from workflows import offers
from workflows.dispatching import DRIVER_FREED_TRIES, delivery_dispatch
from zones.models import DriverZonePreference

pytestmark = pytest.mark.django_db


def _waiting(**kwargs) -> Delivery:
    """A delivery dispatched to nobody (an open unassigned record), at the city centre unless told."""
    delivery = DeliveryFactory(**kwargs)
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    return delivery


def _freed(call) -> list[tuple]:
    """`call()`, keeping the `dispatch.driver_freed` tasks it published: [(args, options)]."""
    enqueued = []
    with tasks_diverted(lambda name, args, options: name == "dispatch.driver_freed" and enqueued.append((args, options))):
        with TestCase.captureOnCommitCallbacks(execute=True):
            call()
    return enqueued


def _pending(delivery):
    return DriverOffer.objects.filter(delivery=delivery, status="PENDING").first()


def _on_break(km=1.0, **kwargs) -> Driver:
    driver = online_driver(km=km, **kwargs)
    availability.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="", actor=Actor("driver", driver.pk))
    return driver


def _resume(driver) -> tuple:
    """Resume `driver`; the arguments of the one look it published."""
    enqueued = _freed(lambda: availability.availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk)))
    assert len(enqueued) == 1 and enqueued[0][1] == {"countdown": 0.2, "expires": 30.2}
    return enqueued[0][0]


def test_a_driver_back_from_a_break_is_offered_the_delivery_waiting_next_to_it():
    driver = _on_break(km=1)
    delivery = _waiting()
    attempts = UnassignedOrder.objects.get(delivery=delivery).attempt_count

    args = _resume(driver)

    assert args == (str(driver.pk), Driver.objects.get(pk=driver.pk).last_availability_change.isoformat())
    assert _pending(delivery) is None  # (a moment later, off the request)
    assert driver_freed(*args) is True
    assert _pending(delivery).driver_id == driver.pk
    record = UnassignedOrder.objects.get(delivery=delivery)
    assert record.attempt_count == attempts  # the offer is the attempt; the record resolves on accept
    assert driver_freed(*args) is False  # (it has an offer now)


def test_finishing_a_delivery_frees_the_driver_for_the_oldest_waiting_one():
    driver = online_driver(km=0.2)
    first = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=first.pk, actor=Actor.system()).offer
    offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
    older = _waiting(pickup_location=km_north(1.5))  # ~1.3 km from the drop-off
    newer = _waiting(pickup_location=first.dropoff_location)  # at the drop-off
    api = client_for(driver.user)
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        assert api.post(f"/v2/drivers/{driver.pk}/deliveries/{first.pk}/{step}").status_code == 200
    driver_at_dropoff(driver, first)
    enqueued = _freed(lambda: api.post(f"/v2/drivers/{driver.pk}/deliveries/{first.pk}/delivery-completed"))

    assert len(enqueued) == 1
    assert driver_freed(*enqueued[0][0]) is True
    assert _pending(older).driver_id == driver.pk  # waiting longest, though farther
    assert _pending(newer) is None
    assert UnassignedOrder.objects.get(delivery=newer).attempt_count == 1  # the look stopped there


def test_a_delivery_out_of_reach_is_left_alone_until_it_reaches_the_wide_radius(settings):
    settings.DISPATCH_RADIUS_KM, settings.DISPATCH_WIDE_RADIUS_KM = 5, 10
    driver = _on_break(km=8)
    delivery = _waiting()
    args = _resume(driver)

    assert driver_freed(*args) is False
    assert UnassignedOrder.objects.get(delivery=delivery).attempt_count == 1  # not even tried

    UnassignedOrder.objects.filter(delivery=delivery).update(escalation_level=2)
    assert driver_freed(*args) is True
    assert _pending(delivery).search_radius_km == 10


def test_a_zones_own_radius_counts(settings):
    settings.DISPATCH_RADIUS_KM = 5
    zone = ZoneFactory(search_radius_km=2)
    driver = _on_break(km=3)
    delivery = _waiting(zone=zone)
    assert driver_freed(*_resume(driver)) is False
    assert _pending(delivery) is None
    assert UnassignedOrder.objects.get(delivery=delivery).attempt_count == 1  # not even tried


def test_a_delivery_the_driver_was_offered_before_or_in_a_zone_it_refuses_is_not_tried():
    driver = online_driver(km=1)
    offered_before = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=offered_before.pk, actor=Actor.system()).offer
    offers.offer_reject(offer_id=offer.pk, driver_id=driver.pk, reason="too_far", actor=Actor("driver", driver.pk))
    availability.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="", actor=Actor("driver", driver.pk))
    zone = ZoneFactory()
    refused = _waiting(zone=zone)
    DriverZonePreference.objects.create(driver=driver, zone=zone, preference="UNAVAILABLE")
    tried = dict(UnassignedOrder.objects.values_list("delivery_id", "attempt_count"))
    assert set(tried) == {offered_before.pk, refused.pk}

    assert driver_freed(*_resume(driver)) is False

    assert dict(UnassignedOrder.objects.values_list("delivery_id", "attempt_count")) == tried
    assert not DriverOffer.objects.filter(status="PENDING").exists()


def test_a_driver_that_changed_since_or_got_an_offer_or_has_no_fresh_fix_pulls_nothing(settings):
    driver = _on_break(km=1)
    delivery = _waiting()
    args = _resume(driver)
    availability.availability_take_break(driver_id=driver.pk, duration_minutes=5, reason="", actor=Actor("driver", driver.pk))
    assert driver_freed(*args) is False  # on a break again
    stale_args, args = args, _resume(driver)
    assert driver_freed(*stale_args) is False  # back, but that is the later resume's look to take

    other = DeliveryFactory(pickup_location=km_north(30))
    offers.offer_create(delivery_id=other.pk, driver_id=driver.pk, actor=Actor.system())
    assert driver_freed(*args) is False  # busy with an offer
    assert UnassignedOrder.objects.get(delivery=delivery).attempt_count == 1  # (not tried)

    DriverOffer.objects.filter(delivery=other).update(status="REJECTED")
    Delivery.objects.filter(pk=other.pk).update(current_offer=None)
    with time_machine.travel(timezone.now() + timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS + 60)):
        assert driver_freed(*args) is False  # its fix is stale by now
    assert UnassignedOrder.objects.get(delivery=delivery).attempt_count == 1
    assert _pending(delivery) is None
    assert driver_freed(*args) is True


def test_deliveries_ops_must_start_or_a_matching_round_holds_are_left_to_them(integration):
    driver = _on_break(km=1)
    r = integration.post("/v2/deliveries", {
        "sellerOrderId": "MANUAL-1", "storeName": "S", "pickupLocation": {"lat": 12.9716, "lon": 77.5946},
        "dropoffLocation": {"lat": 12.99, "lon": 77.6}, "autoDispatch": False,
    }, format="json")
    manual = Delivery.objects.get(pk=r.json()["id"])
    UnassignedOrder.objects.create(
        delivery=manual, location=manual.pickup_location, failure_reason="unassigned",
        first_attempt_at=timezone.now(), last_attempt_at=timezone.now(),
    )
    in_round = [_waiting() for _ in range(DRIVER_FREED_TRIES)]
    Delivery.objects.filter(pk__in=[d.pk for d in in_round]).update(matching_since=timezone.now())
    free = _waiting()  # waiting least long: the others, not tried, leave it a try

    assert driver_freed(*_resume(driver)) is True
    assert list(DriverOffer.objects.filter(status="PENDING").values_list("delivery_id", flat=True)) == [free.pk]
    assert UnassignedOrder.objects.get(delivery=manual).attempt_count == 1  # ops' to start, not even tried


def test_a_better_placed_free_driver_takes_the_delivery_and_the_freed_one_the_next():
    driver = _on_break(km=3)
    first = _waiting()
    second = _waiting(pickup_location=km_north(3.2))
    nearer = online_driver(km=0.1)  # came online after both were attempted

    assert driver_freed(*_resume(driver)) is True

    assert _pending(first).driver_id == nearer.pk  # its best candidate, as any dispatch
    assert _pending(second).driver_id == driver.pk


def test_a_driver_reassigned_away_from_a_delivery_ops_gave_it_is_not_handed_it_back():
    """Ops assign a delivery straight to a driver (no offer), then reassign it: nobody else is
    near, so it waits; the freed driver's look must not give it back to the driver ops took it
    from (no offer says it had it; its assignment does)."""
    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()
    ops = Actor.for_user(OpsUserFactory())
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=ops)
    enqueued = _freed(lambda: delivery_reassign(delivery_id=delivery.pk, reason="too slow", actor=ops))

    assert len(enqueued) == 1
    attempts = UnassignedOrder.objects.get(delivery=delivery, resolved_at__isnull=True).attempt_count
    assert driver_freed(*enqueued[0][0]) is False
    assert not DriverOffer.objects.filter(delivery=delivery, status="PENDING").exists()
    assert UnassignedOrder.objects.get(delivery=delivery).attempt_count == attempts  # not even tried


def test_the_retry_job_does_not_offer_a_delivery_back_to_the_driver_ops_took_it_from():
    """The same rule for every dispatch: a reassign's exclusion of the previous driver held only
    for its own dispatch, and a delivery ops had assigned straight (no offer) was offered back to
    that driver by the retry job 30 s later."""
    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()
    ops = Actor.for_user(OpsUserFactory())
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=ops)
    delivery_reassign(delivery_id=delivery.pk, reason="too slow", actor=ops)

    result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())

    assert result.outcome == "unassigned" and result.failure_reason == "no_available_drivers"
    other = online_driver(km=0.8)
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer.driver_id == other.pk


def test_deliveries_that_go_to_better_placed_drivers_are_no_tries_lost():
    """Four older deliveries each with a driver nearer than the freed one (freed at the same
    moment, say), and a newer one at the freed driver: the look goes past the four, each
    offered to its own driver, to the fifth (counting every dispatch, the look stopped after three
    and the driver beside the fifth waited for the retry job: a black-box audit, 4-26 s)."""
    driver = _on_break(km=4)
    spots = [0.0, 0.5, 1.0, 1.5]
    older = [_waiting(pickup_location=km_north(km)) for km in spots]
    beside = _waiting(pickup_location=km_north(4))
    nearer = [online_driver(km=km) for km in spots]

    assert driver_freed(*_resume(driver)) is True

    assert [_pending(d).driver_id for d in older] == [n.pk for n in nearer]
    assert _pending(beside).driver_id == driver.pk


def test_a_look_stops_after_three_dispatches_that_offered_nobody():
    from availability.geo import GEO_KEY
    from common.redis import get_redis

    driver = _on_break(km=1)
    deliveries = [_waiting(pickup_location=km_north(km)) for km in (0.0, 0.2, 0.4, 0.6)]
    args = _resume(driver)
    get_redis().zrem(GEO_KEY, str(driver.pk))  # (the search does not find it: each dispatch offers nobody)

    assert driver_freed(*args) is False

    attempts = [UnassignedOrder.objects.get(delivery=d).attempt_count for d in deliveries]
    assert attempts == [2] * DRIVER_FREED_TRIES + [1] * (len(deliveries) - DRIVER_FREED_TRIES)


def test_a_delivery_of_a_batched_matching_zone_enters_its_round_and_the_look_stops():
    from availability.geo import index_driver
    from tests.factories import DriverFactory

    zone = ZoneFactory(dispatch_policy="batched_matching", matching_window_seconds=5)
    centre = dict(lat=10.95, lon=30.55)  # ZoneFactory's box
    in_round = DeliveryFactory(zone=zone, pickup_location=km_north(0, **centre))
    UnassignedOrder.objects.create(delivery=in_round, location=in_round.pickup_location, failure_reason="zone_empty",
                                   first_attempt_at=timezone.now(), last_attempt_at=timezone.now())
    elsewhere = DeliveryFactory(pickup_location=km_north(0.5, **centre))
    UnassignedOrder.objects.create(delivery=elsewhere, location=elsewhere.pickup_location, failure_reason="zone_empty",
                                   first_attempt_at=timezone.now(), last_attempt_at=timezone.now())
    driver = DriverFactory(location=km_north(0.2, **centre))
    index_driver(driver_id=driver.pk, availability=driver.availability, lat=driver.location.y, lon=driver.location.x,
                 recorded_at=driver.location_recorded_at)
    availability.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="", actor=Actor("driver", driver.pk))

    assert driver_freed(*_resume(driver)) is False

    in_round.refresh_from_db()
    assert in_round.matching_since is not None  # the zone's next round has it, and weighs the driver
    assert not DriverOffer.objects.exists()
    assert UnassignedOrder.objects.get(delivery=elsewhere).attempt_count == 1


def test_a_driver_that_rejects_an_offer_is_offered_the_delivery_waiting_near_it():
    """Free of its offer, the driver looks at the waiting work as one free again does (it waited
    for the retry job); the delivery it rejected goes its own way (the next candidate)."""
    driver = online_driver(km=1)
    availability.availability_take_break(driver_id=driver.pk, duration_minutes=5, reason="", actor=Actor("driver", driver.pk))
    waiting = _waiting(pickup_location=km_north(1.2))
    _resume(driver)  # (its look would have found the waiting one: taken by the offer below first)
    offered = DeliveryFactory(pickup_location=km_north(3))
    offer = delivery_dispatch(delivery_id=offered.pk, actor=Actor.system()).offer
    assert offer.driver_id == driver.pk

    enqueued = _freed(lambda: offers.offer_reject(offer_id=offer.pk, driver_id=driver.pk, reason="too_far",
                                                  actor=Actor("driver", driver.pk)))

    assert len(enqueued) == 1
    assert driver_freed(*enqueued[0][0]) is True
    assert _pending(waiting).driver_id == driver.pk
    assert UnassignedOrder.objects.filter(delivery=offered, resolved_at__isnull=True).exists()  # nobody else


def test_a_driver_whose_offer_is_withdrawn_as_its_delivery_is_cancelled_is_offered_the_one_waiting_near_it():
    """The delivery beside the driver found nobody while the driver's offer for another was
    pending; that one's cancel frees the driver, as a reject does (it waited for the retry job,
    up to 30 s: a race audit, 9 of 20 runs)."""
    driver = online_driver(km=1)
    offered = DeliveryFactory(pickup_location=km_north(3))
    offer = delivery_dispatch(delivery_id=offered.pk, actor=Actor.system()).offer
    assert offer.driver_id == driver.pk
    waiting = _waiting(pickup_location=km_north(1.2))  # (the driver's offer is pending: nobody)

    enqueued = _freed(lambda: delivery_cancel(delivery_id=offered.pk, reason="customer_request", actor=Actor.system()))

    assert [(args[0], options) for args, options in enqueued] == [(str(driver.pk), {"countdown": 0.2, "expires": 30.2})]
    assert _pending(waiting) is None  # (a moment later, off the request)
    assert driver_freed(*enqueued[0][0]) is True
    assert _pending(waiting).driver_id == driver.pk


def test_the_drivers_of_a_round_another_took_or_that_was_cancelled_are_offered_the_one_waiting_near_them():
    bbox = (CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2)
    zone = ZoneFactory(bbox=bbox, dispatch_policy="broadcast", broadcast_max_drivers=4)
    winner, loser = online_driver(km=0.5), online_driver(km=1)
    taken, cancelled = DeliveryFactory(zone=zone), DeliveryFactory(zone=zone, pickup_location=km_north(0.1))
    made = {o.driver_id: o for o in delivery_dispatch(delivery_id=taken.pk, actor=Actor.system()).offers}
    assert set(made) == {winner.pk, loser.pk}
    waiting = _waiting(pickup_location=km_north(1.2))

    accepted = _freed(lambda: offers.offer_accept(offer_id=made[winner.pk].pk, driver_id=winner.pk,
                                                  actor=Actor("driver", winner.pk)))

    assert [args[0] for args, _ in accepted] == [str(loser.pk)]  # the winner is busy now: no look
    assert driver_freed(*accepted[0][0]) is True
    assert _pending(waiting).driver_id == loser.pk

    DriverOffer.objects.filter(delivery=waiting).update(status="REJECTED")  # (free again, quietly)
    Delivery.objects.filter(pk=waiting.pk).update(current_offer=None)
    third = online_driver(km=0.8)
    round_offers = delivery_dispatch(delivery_id=cancelled.pk, actor=Actor.system()).offers
    assert {o.driver_id for o in round_offers} == {loser.pk, third.pk}
    withdrawn = _freed(lambda: delivery_cancel(delivery_id=cancelled.pk, reason="customer_request", actor=Actor.system()))
    assert sorted(args[0] for args, _ in withdrawn) == sorted([str(loser.pk), str(third.pk)])


def test_an_expired_offer_takes_no_look():
    driver = online_driver(km=1)
    offered = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=offered.pk, actor=Actor.system()).offer
    assert _freed(lambda: offers.offer_expire(offer_id=offer.pk, force=True)) == []


def test_deliveries_another_worker_has_are_no_tries_lost(monkeypatch):
    """Drivers freed at once look at the same oldest deliveries together: one another look (or
    the retry job) holds is skipped (`_retry_one` finds it locked) and not counted, so the look
    still reaches the delivery beside this driver."""
    from workflows import dispatching

    driver = _on_break(km=3)
    held = [_waiting(pickup_location=km_north(km)) for km in (0.0, 0.3, 0.6)]
    beside = _waiting(pickup_location=km_north(3))
    real_lock = dispatching.locks.lock_delivery
    held_ids = {d.pk for d in held}
    monkeypatch.setattr(dispatching.locks, "lock_delivery",
                        lambda pk, **kw: None if pk in held_ids else real_lock(pk, **kw))

    assert driver_freed(*_resume(driver)) is True
    assert _pending(beside).driver_id == driver.pk


def test_a_driver_back_on_shift_without_a_fresh_fix_is_looked_at_again_once_its_fix_is_in(settings):
    """Back on shift after hours: the resume comes first and the app's fix just after it, so the
    look 0.2 s later found no fresh fix and gave up (the retry job offered it the waiting work,
    up to 30 s later). It looks once more, 5 s later; still no fix, it stops."""
    from availability.services import driver_location_update
    from tests.factories import CITY

    hours_ago = timezone.now() - timedelta(hours=3)
    driver = _on_break(km=1, location_recorded_at=hours_ago)
    delivery = _waiting()
    args = _resume(driver)

    again = _freed(lambda: driver_freed(*args))
    assert [(a, o) for a, o in again] == [((*args, True), {"countdown": 5, "expires": 35})]
    assert _pending(delivery) is None

    lat = CITY[0] + 1 / 111.195
    with TestCase.captureOnCommitCallbacks(execute=True):  # (the GEO index after commit)
        assert driver_location_update(driver_id=driver.pk, lat=lat, lon=CITY[1], recorded_at=timezone.now()).accepted
    assert _freed(lambda: driver_freed(*again[0][0])) == []  # (the second look publishes no third)
    assert _pending(delivery).driver_id == driver.pk


def test_a_second_look_that_still_finds_no_fix_publishes_no_third():
    driver = _on_break(km=1, location_recorded_at=timezone.now() - timedelta(hours=3))
    _waiting()
    args = _resume(driver)
    assert _freed(lambda: driver_freed(*args, True)) == []
    assert not DriverOffer.objects.filter(status="PENDING").exists()
