"""Order stacking (docs/dispatch.md, "Order stacking"): in a zone with it on, a busy driver
with room gets a second delivery from the same store whose drop-off adds at most the detour;
the database keeps every driver at or under its vehicle's capacity."""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from audit.models import DeliveryAuditLog
from availability import live
from availability.models import Driver
from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Assignment, Delivery
from offers.models import DriverOffer
from tracking import eta
from tracking.services import delivery_eta_refresh
from workflows import offers
from workflows.deliveries import assignment_create, delivery_advance, delivery_cancel, delivery_reassign
from workflows.dispatching import delivery_dispatch
from workflows.drivers import driver_location_record
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, DriverFactory, ZoneFactory, driver_at_dropoff, km_north, online_driver

pytestmark = pytest.mark.django_db

CITY_BBOX = (CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2)
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=dt_timezone.utc)
PLAIN_DISPATCH_QUERIES = 8  # a sequential dispatch that offers (delivery_dispatch)


def zone(stacking=True, **kwargs):
    return ZoneFactory(bbox=CITY_BBOX, stacking_enabled=stacking, **kwargs)


def order(zone_, *, pickup_km=0.0, dropoff_km=2.0, **kwargs):
    """A ready delivery `pickup_km` north of the store (the city centre), dropped off
    `dropoff_km` north of it; ready now."""
    return DeliveryFactory(
        zone=zone_, pickup_location=km_north(pickup_km), dropoff_location=km_north(dropoff_km),
        **{"prep_time_minutes": 0, **kwargs},
    )


def carrying(zone_, *, vehicle_type="car", n=1, km=0.02, **order_kwargs):
    """A driver at the store (`km` north of it) carrying `n` deliveries from it (ops assigned)."""
    driver = online_driver(km=km, vehicle_type=vehicle_type)
    carried = []
    for _ in range(n):
        d = order(zone_, **order_kwargs)
        assignment_create(delivery_id=d.pk, driver_id=driver.pk, actor=Actor.system())
        carried.append(d)
    driver.refresh_from_db()
    return driver, carried


def offered_to(delivery):
    offer = DriverOffer.objects.filter(delivery=delivery, status="PENDING").first()
    return offer.driver_id if offer else None


# --------------------------------------------------------------------------- candidates


def test_a_busy_driver_at_the_store_gets_the_second_order_and_accepts_it():
    z = zone()
    stacker, (first,) = carrying(z)
    online_driver(km=2.0)  # free, but 2 km away
    second = order(z, dropoff_km=2.3)

    result = delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert result.outcome == "offered" and result.offer.driver_id == stacker.pk
    found = DeliveryAuditLog.objects.get(delivery=second, event_type="driver_candidates_found")
    assert found.details["topCandidates"][0] == {**found.details["topCandidates"][0], "driverId": str(stacker.pk), "stacked": True}
    assert len(found.details["topCandidates"]) == 2

    offers.offer_accept(offer_id=result.offer.pk, driver_id=stacker.pk, actor=Actor.system())

    stacker.refresh_from_db()
    assert (stacker.availability, stacker.active_assignments, stacker.capacity) == ("busy", 2, 3)
    assert set(Assignment.objects.filter(driver=stacker, status="active").values_list("delivery_id", flat=True)) == {first.pk, second.pk}
    assigned = DeliveryAuditLog.objects.get(delivery=second, event_type="driver_assigned")
    assert assigned.details["stacked"] is True and assigned.details["activeAssignments"] == 2
    assert Delivery.objects.get(pk=second.pk).status == "assigned"


@pytest.mark.parametrize("zone_flag,global_flag,stacked", [
    (True, False, True),
    (False, True, False),  # the zone turned it off
    (None, True, True),  # the zone follows the setting
    (None, False, False),  # the default: off
])
def test_stacking_only_where_the_zone_or_the_setting_turns_it_on(settings, zone_flag, global_flag, stacked):
    settings.STACKING_ENABLED = global_flag
    z = zone(stacking=zone_flag)
    stacker, _ = carrying(z)
    free = online_driver(km=2.0)
    second = order(z)

    delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert offered_to(second) == (stacker.pk if stacked else free.pk)


def test_without_stacking_a_busy_driver_is_still_no_candidate_and_the_delivery_waits():
    z = zone(stacking=False)
    carrying(z)
    second = order(z)

    result = delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert result.outcome == "unassigned" and result.failure_reason == "all_drivers_busy"


@pytest.mark.parametrize("dropoff_km,max_detour,stacked", [
    (2.3, 10, True),  # 0.3 km past the first's door: ~3 min
    (10.0, 10, False),  # 8 km past it: ~27 min by car
    (10.0, 30, True),  # the zone allows 30 minutes
])
def test_the_detour_limit(dropoff_km, max_detour, stacked):
    z = zone(stacking_max_detour_minutes=max_detour)
    stacker, _ = carrying(z)
    second = order(z, dropoff_km=dropoff_km)

    result = delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert (offered_to(second) == stacker.pk) is stacked
    if not stacked:
        assert result.outcome == "unassigned"


def test_an_order_not_ready_for_long_counts_its_wait_at_the_store_as_detour():
    z = zone()
    stacker, _ = carrying(z)
    second = order(z, dropoff_km=2.1)
    Delivery.objects.filter(pk=second.pk).update(prep_time_minutes=15)  # the driver would wait 15 min

    delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert offered_to(second) is None


@pytest.mark.parametrize("pickup_km,stacked", [(0.2, True), (0.5, False)])
def test_the_pickup_radius(settings, pickup_km, stacked):
    settings.STACKING_PICKUP_RADIUS_METERS = 300
    z = zone(stacking_max_detour_minutes=30)
    stacker, _ = carrying(z)
    second = order(z, pickup_km=pickup_km)

    delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert (offered_to(second) == stacker.pk) is stacked


@pytest.mark.parametrize("steps,stacked", [
    ([], True),  # on the way to the store
    (["pickup-started", "pickup-completed"], True),  # picked up, still at the store
    (["pickup-started", "pickup-completed", "delivery-started"], False),  # left the store
])
def test_only_while_the_carried_order_has_not_left_the_store(steps, stacked):
    z = zone()
    stacker, (first,) = carrying(z)
    for name in steps:
        delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step=name, actor=Actor.system())
    second = order(z)

    delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert (offered_to(second) == stacker.pk) is stacked


@pytest.mark.parametrize("vehicle_type,carried,stacked", [
    ("bicycle", 1, True), ("bicycle", 2, False), ("car", 2, True), ("walking", 1, False),
])
def test_capacity_per_vehicle_type(vehicle_type, carried, stacked):
    z = zone()
    if carried == 1:
        stacker, _ = carrying(z, vehicle_type=vehicle_type)
    else:
        stacker, _ = carrying(z, vehicle_type=vehicle_type, n=carried, dropoff_km=2.0)
    second = order(z)

    delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert (offered_to(second) == stacker.pk) is stacked


def test_a_stacked_driver_never_has_two_pending_offers():
    z = zone()
    stacker, _ = carrying(z)
    a, b = order(z), order(z)
    delivery_dispatch(delivery_id=a.pk, actor=Actor.system())

    result = delivery_dispatch(delivery_id=b.pk, actor=Actor.system())

    assert offered_to(a) == stacker.pk
    assert result.outcome == "unassigned" and offered_to(b) is None
    assert DriverOffer.objects.filter(driver=stacker, status="PENDING").count() == 1


def test_an_offer_accepted_after_the_first_order_left_the_store_is_refused():
    z = zone()
    stacker, (first,) = carrying(z)
    second = order(z)
    offer = delivery_dispatch(delivery_id=second.pk, actor=Actor.system()).offer
    for name in ("pickup-started", "pickup-completed", "delivery-started"):
        delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step=name, actor=Actor.system())

    with pytest.raises(Conflict):
        offers.offer_accept(offer_id=offer.pk, driver_id=stacker.pk, actor=Actor.system())

    assert Delivery.objects.get(pk=second.pk).status == "ready"
    assert Driver.objects.get(pk=stacker.pk).active_assignments == 1


def test_ops_cannot_stack_a_delivery_from_another_store():
    z = zone()
    stacker, _ = carrying(z)
    elsewhere = order(z, pickup_km=3.0, dropoff_km=4.0)

    with pytest.raises(Conflict):
        assignment_create(delivery_id=elsewhere.pk, driver_id=stacker.pk, actor=Actor.system())


# ------------------------------------------------------------------------ the database


def test_the_database_refuses_an_assignment_above_the_capacity_of_a_bicycle():
    bike = DriverFactory(vehicle_type="bicycle")
    assert bike.capacity == 2
    Assignment.objects.create(delivery=DeliveryFactory(), driver=bike)
    Assignment.objects.create(delivery=DeliveryFactory(), driver=bike)

    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(delivery=DeliveryFactory(), driver=bike)
    with pytest.raises(IntegrityError), transaction.atomic():
        Driver.objects.filter(pk=bike.pk).update(active_assignments=3)
    with pytest.raises(IntegrityError), transaction.atomic():
        Driver.objects.filter(pk=bike.pk).update(active_assignments=-1)
    assert Driver.objects.get(pk=bike.pk).active_assignments == 2


def test_the_count_follows_every_change_of_an_assignment():
    car = DriverFactory(vehicle_type="car")
    a = Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    count = lambda: Driver.objects.get(pk=car.pk).active_assignments  # noqa: E731
    assert count() == 3

    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    Assignment.objects.filter(pk=a.pk).update(status="completed")
    assert count() == 2
    Assignment.objects.filter(pk=a.pk).update(status="completed")  # no change, no count
    assert count() == 2
    Assignment.objects.filter(pk=a.pk).update(status="active")
    assert count() == 3
    Assignment.objects.filter(pk=a.pk).delete()
    assert count() == 2


def test_a_full_save_of_a_stale_driver_row_does_not_write_the_count_back():
    car = DriverFactory(vehicle_type="car")
    stale = Driver.objects.get(pk=car.pk)
    Assignment.objects.create(delivery=DeliveryFactory(), driver=car)

    stale.name = "Renamed"
    stale.save()

    assert Driver.objects.get(pk=car.pk).active_assignments == 1


def test_a_vehicle_that_carries_fewer_than_the_driver_has_is_refused():
    car = DriverFactory(vehicle_type="car")
    Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    Assignment.objects.create(delivery=DeliveryFactory(), driver=car)
    car.vehicle_type = "walking"

    with pytest.raises(ValidationError):
        car.full_clean()
    car.vehicle_type = "bicycle"
    car.full_clean()


# ------------------------------------------------------------- steps and availability


def test_the_driver_is_available_again_only_when_the_last_delivery_ends():
    z = zone()
    stacker, (first, second) = carrying(z, n=2)
    client = client_for(stacker.user)

    def step(delivery, name):
        r = client.post(f"/v2/drivers/{stacker.pk}/deliveries/{delivery.pk}/{name}", {}, format="json")
        assert r.status_code == 200, r.content
        return r.json()

    for name in ("pickup-started", "pickup-completed"):  # both picked up at the store
        step(first, name)
        step(second, name)
    step(first, "delivery-started")
    driver_at_dropoff(stacker, first)
    assert step(first, "delivery-completed")["status"] == "delivered"

    stacker.refresh_from_db()
    assert (stacker.availability, stacker.active_assignments) == ("busy", 1)

    step(second, "delivery-started")
    driver_at_dropoff(stacker, second)
    step(second, "delivery-completed")
    stacker.refresh_from_db()
    assert (stacker.availability, stacker.active_assignments) == ("available", 0)


@pytest.mark.parametrize("end", ["cancel", "reassign", "fail"])
def test_ending_one_of_two_otherwise_keeps_the_driver_busy(end):
    z = zone()
    stacker, (first, second) = carrying(z, n=2)
    if end == "cancel":
        delivery_cancel(delivery_id=first.pk, reason="customer changed their mind", actor=Actor.system())
    elif end == "reassign":
        delivery_reassign(delivery_id=first.pk, reason="too slow", actor=Actor.system())
    else:
        delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step="delivery-failed", reason="refused", actor=Actor.system())

    stacker.refresh_from_db()
    assert (stacker.availability, stacker.active_assignments) == ("busy", 1)
    assert list(Assignment.objects.filter(driver=stacker, status="active").values_list("delivery_id", flat=True)) == [second.pk]


def test_a_busy_driver_with_deliveries_still_cannot_take_a_break():
    z = zone()
    stacker, _ = carrying(z, n=2)
    r = client_for(stacker.user).post(f"/v2/drivers/{stacker.pk}/availability/take-break", {"durationMinutes": 15}, format="json")
    assert r.status_code == 409, r.content


# ----------------------------------------------------------------- tracking and ETA


def test_the_eta_of_the_second_delivery_counts_the_drop_off_before_it():
    with time_machine.travel(T0 - timedelta(seconds=60)):  # ticking: the first is assigned first
        z = zone()
        stacker, (first, second) = carrying(z, n=2, km=0.0)
    Delivery.objects.filter(pk=second.pk).update(dropoff_location=km_north(2.3))

    first_eta = delivery_eta_refresh(delivery_id=first.pk, now=T0)
    second_eta = delivery_eta_refresh(delivery_id=second.pk, now=T0)

    to_first = eta.travel_seconds(2.0, "car") + eta.HANDOVER_SECONDS
    then_second = eta.travel_seconds(0.3, "car") + eta.HANDOVER_SECONDS
    assert abs((first_eta.delivery_at - T0).total_seconds() - to_first) < 1
    assert abs((second_eta.delivery_at - T0).total_seconds() - (to_first + then_second)) < 1
    assert second_eta.pickup_at == T0  # at the store, the order ready
    stored = Delivery.objects.get(pk=second.pk)
    assert stored.eta_delivery_at == second_eta.delivery_at

    # Once the first is delivered (at its door), the second's ETA is a plain one again: from
    # there straight to its own door.
    for name in ("pickup-started", "pickup-completed"):  # both collected at the store
        delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step=name, actor=Actor.system(), now=T0)
        delivery_advance(delivery_id=second.pk, driver_id=stacker.pk, step=name, actor=Actor.system(), now=T0)
    delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step="delivery-started", actor=Actor.system(), now=T0)
    driver_at_dropoff(stacker, first, at=T0)
    delivery_advance(delivery_id=first.pk, driver_id=stacker.pk, step="delivery-completed", actor=Actor.system(), now=T0)
    alone = delivery_eta_refresh(delivery_id=second.pk, now=T0 + timedelta(seconds=1))
    assert abs((alone.delivery_at - T0).total_seconds() - 1 - then_second) < 1


def test_stacking_an_order_still_being_prepared_moves_the_first_customers_eta(django_capture_on_commit_callbacks):
    z = zone()
    with django_capture_on_commit_callbacks(execute=True):
        stacker, (first,) = carrying(z, km=0.0)
    before = Delivery.objects.get(pk=first.pk).eta_delivery_at
    second = order(z, dropoff_km=2.3, prep_time_minutes=4)  # the driver waits for it at the store

    with django_capture_on_commit_callbacks(execute=True):
        assignment_create(delivery_id=second.pk, driver_id=stacker.pk, actor=Actor.system())

    after = Delivery.objects.get(pk=first.pk).eta_delivery_at
    assert 200 < (after - before).total_seconds() < 260  # ~4 minutes later (less the time the test took)
    assert Delivery.objects.get(pk=second.pk).eta_delivery_at > after


def test_every_fix_of_a_stacked_driver_reaches_both_customers(listen, django_capture_on_commit_callbacks):
    z = zone()
    with django_capture_on_commit_callbacks(execute=True):
        stacker, (first, second) = carrying(z, n=2)
    assert live.known_state([str(stacker.pk)])[str(stacker.pk)][1] == (str(first.pk), str(second.pk))
    customers = listen(f"delivery.{first.pk}", f"delivery.{second.pk}")

    with django_capture_on_commit_callbacks(execute=True):
        r = client_for(stacker.user).post(
            f"/v2/drivers/{stacker.pk}/location", {"lat": km_north(0.1).y, "lon": km_north(0.1).x}, format="json"
        )
    assert r.status_code == 200 and r.json()["accepted"], r.content

    sent = [e["deliveryId"] for e in customers.drain() if e["type"] == "delivery_location_updated"]
    assert sorted(sent) == sorted([str(first.pk), str(second.pk)])

    # The database path names both as well, in the order assigned.
    result = driver_location_record(
        driver_id=stacker.pk, lat=km_north(0.2).y, lon=km_north(0.2).x, recorded_at=datetime.now(dt_timezone.utc),
    )
    assert result.active_delivery_ids == (str(first.pk), str(second.pk))

    with django_capture_on_commit_callbacks(execute=True):
        delivery_cancel(delivery_id=first.pk, reason="gone", actor=Actor.system())
    assert live.known_state([str(stacker.pk)])[str(stacker.pk)][1] == (str(second.pk),)


def test_the_reconcile_job_rebuilds_both_deliveries_of_a_driver():
    z = zone()
    stacker, (first, second) = carrying(z, n=2)

    live.active_reconcile()

    assert live.known_state([str(stacker.pk)])[str(stacker.pk)][1] == (str(first.pk), str(second.pk))


# ------------------------------------------------------------------------ query budget


def _dispatch_queries(stacking, django_assert_max_num_queries, limit):
    z = zone(stacking=stacking)
    carrying(z)
    online_driver(km=2.0)
    second = order(z)
    with django_assert_max_num_queries(limit), CaptureQueriesContext(connection) as ctx:
        result = delivery_dispatch(delivery_id=second.pk, actor=Actor.system())
    assert result.outcome == "offered"
    return [q["sql"] for q in ctx.captured_queries]


@pytest.mark.parametrize("stacking", [False, True])
def test_query_budget_of_a_dispatch_with_and_without_stacking(stacking, django_assert_max_num_queries):
    """The stacked search costs two statements (the busy drivers near the store, then what
    they carry), and nothing in a zone without stacking."""
    sql = _dispatch_queries(stacking, django_assert_max_num_queries, PLAIN_DISPATCH_QUERIES + (2 if stacking else 0))
    assert sum("x.pickup_location" in q for q in sql) == (1 if stacking else 0)


def test_a_batch_round_offers_a_stacked_driver_with_the_available_ones():
    z = zone(dispatch_policy="batch", offer_batch_size=3)
    stacker, _ = carrying(z)
    free = online_driver(km=2.0)
    second = order(z)

    result = delivery_dispatch(delivery_id=second.pk, actor=Actor.system())

    assert result.outcome == "offered"
    assert {o.driver_id for o in result.offers} == {stacker.pk, free.pk}
    offers.offer_accept(offer_id=next(o.pk for o in result.offers if o.driver_id == stacker.pk), driver_id=stacker.pk, actor=Actor.system())
    assert Driver.objects.get(pk=stacker.pk).active_assignments == 2
    assert DriverOffer.objects.get(delivery=second, driver=free).status == "CANCELLED"
