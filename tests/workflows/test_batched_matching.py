"""batched_matching (workflows/matching.py): the window, the minimum-cost matching, the target
wait, re-entry after a rejection or expiry, the unassigned way, and the round's statement count.
Races with real threads: tests/workflows/test_batched_matching_races.py."""
import itertools
import random
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from analytics.models import DriverPerformance
from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Delivery
from escalation.models import UnassignedOrder
from offers.models import DriverOffer
from availability.geo import index_driver
from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory, km_north
from tracking import eta
from zones.models import DriverZonePreference
from workflows import locks, offers
from workflows.dispatching import delivery_dispatch, dispatch_next_locked, unassigned_retry
from dispatch.tasks import run_matching_round
from workflows.matching import (
    INFEASIBLE,
    assign_min_cost,
    matching_round,
    matching_round_when_due,
    matching_rounds_run,
)
from workflows.unit import unit_of_work

pytestmark = pytest.mark.django_db

# A minute ahead of the real clock: drivers made at the real time have fresh fixes then.
T0 = timezone.now().replace(microsecond=0) + timedelta(minutes=1)
CENTRE = (10.95, 30.55)  # the middle of ZoneFactory's default box
OTHER_BOX = (30.70, 10.90, 30.80, 11.00)
OTHER_CENTRE = (10.95, 30.75)


def at(km, centre=CENTRE):
    """A point `km` north of the zone's centre (negative: south)."""
    return km_north(km, lat=centre[0], lon=centre[1])


def matching_zone(**kwargs):
    return ZoneFactory(**{"dispatch_policy": "batched_matching", "matching_window_seconds": 5, **kwargs})


def driver_at(km, centre=CENTRE, **kwargs):
    """An available driver with a fresh fix `km` north of the zone's centre, in the GEO index."""
    driver = DriverFactory(location=at(km, centre), **kwargs)
    index_driver(driver_id=driver.pk, availability=driver.availability, lat=driver.location.y,
                 lon=driver.location.x, recorded_at=driver.location_recorded_at)
    return driver


def dispatch_automatically(delivery, now=None):
    """What creation, a rejection, an expiry or the retry job do: the automatic dispatch."""
    with unit_of_work():
        locked = locks.lock_delivery(delivery.pk, select_related=("zone",))
        return dispatch_next_locked(locked, actor=Actor.system(), now=now or timezone.now(), no_pending_offer=True)


def new_delivery(zone, km=0.0, centre=CENTRE, **kwargs):
    delivery = DeliveryFactory(zone=zone, pickup_location=at(km, centre), **kwargs)
    return delivery, dispatch_automatically(delivery)


def pending(delivery):
    return DriverOffer.objects.filter(delivery=delivery, status="PENDING").first()


def pickup_km(offer):
    return offer.offer_payload["estimatedDistanceKm"]


# ------------------------------------------------------------------------- the window


def test_a_new_delivery_in_a_matching_zone_is_not_offered_at_once_but_waits(integration):
    zone = matching_zone()
    driver_at(0.5)
    with time_machine.travel(T0, tick=False):
        r = integration.post("/v2/deliveries", {
            "sellerOrderId": "MATCH-1", "storeName": "Store", "prepTimeMinutes": 5,
            "pickupLocation": {"lat": CENTRE[0], "lon": CENTRE[1]},
            "dropoffLocation": {"lat": CENTRE[0] + 0.01, "lon": CENTRE[1]},
        }, format="json")

    assert r.status_code == 201, r.content
    assert r.json()["currentOfferId"] is None
    delivery = Delivery.objects.get(pk=r.json()["id"])
    assert (delivery.zone_id, delivery.matching_since) == (zone.pk, T0)
    assert not DriverOffer.objects.exists()
    assert list(DeliveryAuditLog.objects.filter(delivery=delivery).values_list("event_type", flat=True)) == ["created"]


def test_the_round_offers_only_once_the_window_has_passed_and_collects_what_arrived_meanwhile():
    zone = matching_zone(matching_window_seconds=5)
    near_first, near_second = driver_at(0.3), driver_at(2.3)
    with time_machine.travel(T0, tick=False) as clock:
        first, outcome = new_delivery(zone, km=0.0)
        assert outcome.outcome == "waiting"
        clock.shift(timedelta(seconds=3))
        second, _ = new_delivery(zone, km=2.0)

        clock.shift(timedelta(seconds=1))  # T0 + 4 s: the first has waited 4 s of 5
        assert matching_rounds_run() == 0
        assert not DriverOffer.objects.exists()

        clock.shift(timedelta(seconds=1))  # T0 + 5 s: the round, with both
        assert matching_rounds_run() == 2

    assert pending(first).driver_id == near_first.pk
    assert pending(second).driver_id == near_second.pk
    for delivery in (first, second):
        delivery.refresh_from_db()
        assert delivery.matching_since is None
        kinds = list(DeliveryAuditLog.objects.filter(delivery=delivery).values_list("event_type", flat=True))
        assert kinds == ["assignment_started", "driver_candidates_found", "driver_offer_sent"]
    found = DeliveryAuditLog.objects.get(delivery=first, event_type="driver_candidates_found")
    assert found.details["policy"] == "batched_matching"
    assert found.details["matching"]["deliveries"] == 2 and found.details["matching"]["greedy"] is False
    sent = DeliveryAuditLog.objects.get(delivery=first, event_type="driver_offer_sent")
    assert sent.details["payload"] == pending(first).offer_payload


def test_waiting_schedules_the_zones_round_for_the_end_of_the_window(django_capture_on_commit_callbacks, monkeypatch):
    zone = matching_zone(matching_window_seconds=7)
    driver = driver_at(0.5)
    sent = []
    monkeypatch.setattr(run_matching_round, "apply_async", lambda args, **options: sent.append((args, options)))
    with time_machine.travel(T0, tick=False):
        with django_capture_on_commit_callbacks(execute=True):
            delivery, _ = new_delivery(zone)

    assert sent == [((str(zone.pk),), {"eta": T0 + timedelta(seconds=7)})]
    # the task itself: nothing before the window ends, the round once it has
    assert matching_round_when_due(zone_id=str(zone.pk), now=T0 + timedelta(seconds=6)) == 0
    assert pending(delivery) is None
    assert matching_round_when_due(zone_id=str(zone.pk), now=T0 + timedelta(seconds=7)) == 1
    assert pending(delivery).driver_id == driver.pk
    assert matching_round_when_due(zone_id=str(zone.pk), now=T0 + timedelta(seconds=8)) == 0  # done


def test_a_round_at_its_delivery_cap_schedules_the_next_round_at_once(settings, django_capture_on_commit_callbacks, monkeypatch):
    settings.DISPATCH_MATCHING_MAX_DELIVERIES = 2
    zone = matching_zone(matching_window_seconds=5)
    for km in (0.2, 0.4, 0.6):
        driver_at(km)
    sent = []
    monkeypatch.setattr(run_matching_round, "apply_async", lambda args, **options: sent.append((args, options)))
    with time_machine.travel(T0, tick=False) as clock:
        deliveries = [new_delivery(zone, km=km)[0] for km in (0.0, 0.1, 0.2)]
        clock.shift(timedelta(seconds=5))
        sent.clear()
        with django_capture_on_commit_callbacks(execute=True):
            assert len(matching_round(zone_id=zone.pk).offered) == 2  # the two oldest
        assert sent == [((str(zone.pk),), {"eta": T0 + timedelta(seconds=5)})]  # the rest: now
        assert matching_round_when_due(zone_id=str(zone.pk)) == 1

    assert all(pending(d) is not None for d in deliveries)


def test_window_zero_offers_at_once_and_other_policies_are_untouched():
    instant = matching_zone(matching_window_seconds=0)
    driver_at(0.5)
    delivery, result = new_delivery(instant)
    assert result.outcome == "offered" and pending(delivery) is not None

    sequential = ZoneFactory(bbox=OTHER_BOX, dispatch_policy="sequential", matching_window_seconds=30)
    driver_at(0.5, centre=OTHER_CENTRE)
    delivery, result = new_delivery(sequential, centre=OTHER_CENTRE)
    assert result.outcome == "offered"
    delivery.refresh_from_db()
    assert delivery.matching_since is None


def test_the_global_default_policy_applies_outside_every_zone(settings):
    settings.DISPATCH_POLICY = "batched_matching"
    settings.DISPATCH_MATCHING_WINDOW_SECONDS = 2
    driver = driver_at(0.4)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, result = new_delivery(None)
        assert result.outcome == "waiting"
        clock.shift(timedelta(seconds=1))
        assert matching_rounds_run() == 0
        clock.shift(timedelta(seconds=1))
        assert matching_rounds_run() == 1
    assert pending(delivery).driver_id == driver.pk


def test_ops_dispatching_a_waiting_delivery_offer_it_at_once():
    zone = matching_zone()
    driver = driver_at(0.5)
    delivery, _ = new_delivery(zone)

    result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system(), strict=True)

    assert result.outcome == "offered" and result.offer.driver_id == driver.pk
    assert matching_rounds_run(now=timezone.now() + timedelta(seconds=10)) == 0  # no second offer


# ------------------------------------------------------------------------- the matching


def test_matching_finds_the_minimum_total_pickup_where_sequential_greedy_does_not(settings):
    """A at 0 km, B at 2 km; X at 1.1 km (A 1.1, B 0.9), Y at -1.5 km (A 1.5, B 3.5).
    Greedy, A first (older): A→X, B→Y = 4.6 km. The optimum: A→Y, B→X = 2.4 km."""
    layout = {"x": 1.1, "y": -1.5}
    # sequential, in a zone of its own
    sequential = ZoneFactory(bbox=OTHER_BOX, dispatch_policy="sequential")
    seq_drivers = {name: driver_at(km, centre=OTHER_CENTRE) for name, km in layout.items()}
    seq_a, _ = new_delivery(sequential, km=0.0, centre=OTHER_CENTRE)
    seq_b, _ = new_delivery(sequential, km=2.0, centre=OTHER_CENTRE)
    assert pending(seq_a).driver_id == seq_drivers["x"].pk
    assert pending(seq_b).driver_id == seq_drivers["y"].pk
    greedy_km = pickup_km(pending(seq_a)) + pickup_km(pending(seq_b))

    zone = matching_zone()
    drivers = {name: driver_at(km) for name, km in layout.items()}
    with time_machine.travel(T0, tick=False) as clock:
        a, _ = new_delivery(zone, km=0.0)
        clock.shift(timedelta(seconds=1))
        b, _ = new_delivery(zone, km=2.0)
        clock.shift(timedelta(seconds=5))
        result = matching_round(zone_id=zone.pk)

    assert pending(a).driver_id == drivers["y"].pk
    assert pending(b).driver_id == drivers["x"].pk
    matched_km = pickup_km(pending(a)) + pickup_km(pending(b))
    assert matched_km == pytest.approx(2.4, abs=0.02)
    assert greedy_km == pytest.approx(4.6, abs=0.02)
    assert (result.deliveries, result.drivers, len(result.offered), result.waiting) == (2, 2, 2, 0)
    assert result.total_cost_seconds == pytest.approx(
        2 * settings.DISPATCH_MATCHING_NOT_PREFERRED_PENALTY_SECONDS + eta.travel_seconds(2.4, "car"), rel=1e-3
    )


def test_a_round_reaches_the_brute_force_optimum_with_acceptance_and_preference_penalties(settings):
    """6 deliveries, 8 drivers at seeded random spots (along a line: pickup distances are plain
    differences), 3 with declined offers (a lower acceptance rate), 3 PREFERRING the zone: the
    drivers the round picks cost the minimum total over all 20,160 assignments, costed here
    independently from the documented rule."""
    rng = random.Random(16)
    zone = matching_zone()
    spots = [round(rng.uniform(-2.5, 2.5), 3) for _ in range(8)]
    drivers = [driver_at(km) for km in spots]
    declined = {}
    for driver in drivers[:3]:
        declined[driver.pk] = rng.randint(1, 4)
        for _ in range(declined[driver.pk]):
            DriverOffer.objects.create(
                delivery=DeliveryFactory(status="cancelled"), driver=driver, status="REJECTED", offer_payload={},
                created_at=timezone.now(), expires_at=timezone.now() + timedelta(seconds=30),
            )
        # the ranking reads the running counters the answer workflows bump with each decline
        DriverPerformance.objects.create(driver=driver, offers_rejected=declined[driver.pk])
    for driver in drivers[3:6]:
        DriverZonePreference.objects.create(zone=zone, driver=driver, preference="PREFERRED")
    pickups = [round(rng.uniform(-2.5, 2.5), 3) for _ in range(6)]

    def cost(pickup, n):
        rate = 1 / (declined.get(drivers[n].pk, 0) + 1)
        preferred = 3 <= n < 6
        return (eta.travel_seconds(abs(spots[n] - pickup), "car")
                + settings.DISPATCH_MATCHING_ACCEPTANCE_PENALTY_SECONDS * (1 - rate)
                + (0 if preferred else settings.DISPATCH_MATCHING_NOT_PREFERRED_PENALTY_SECONDS))

    totals = sorted(
        sum(cost(pickup, n) for pickup, n in zip(pickups, perm, strict=True))
        for perm in itertools.permutations(range(8), 6)
    )
    assert totals[-1] - totals[0] > 600  # the choice matters

    with time_machine.travel(T0, tick=False) as clock:
        deliveries = [new_delivery(zone, km=km)[0] for km in pickups]
        clock.shift(timedelta(seconds=5))
        result = matching_round(zone_id=zone.pk)

    assert len(result.offered) == 6
    index = {d.pk: n for n, d in enumerate(drivers)}
    chosen = sum(cost(pickups[i], index[pending(d).driver_id]) for i, d in enumerate(deliveries))
    assert chosen == pytest.approx(totals[0], abs=0.5)
    assert result.total_cost_seconds == pytest.approx(totals[0], abs=0.5)


def test_assign_min_cost_never_returns_an_infeasible_pair_and_matches_as_many_as_it_can():
    costs = [[1.0, INFEASIBLE], [2.0, INFEASIBLE], [INFEASIBLE, INFEASIBLE]]
    assert assign_min_cost(costs) == [(0, 0)] or assign_min_cost(costs) == [(1, 0)]
    # cardinality first: (0,1)+(1,0) = 102 beats (0,0) alone = 1
    assert sorted(assign_min_cost([[1.0, 100.0], [2.0, INFEASIBLE]])) == [(0, 1), (1, 0)]
    assert assign_min_cost([]) == []


# ------------------------------------------------------------------------- the target wait


def test_the_window_never_carries_a_delivery_past_its_target_wait():
    zone = matching_zone(matching_window_seconds=10, target_wait_time_seconds=60)
    driver = driver_at(0.5)
    with time_machine.travel(T0, tick=False):
        # ready 45 s ago: 45 + 10 = 55 s ≤ 60 s, so it may wait for the round
        fits, result = new_delivery(zone, ready_at=T0 - timedelta(seconds=45))
        assert result.outcome == "waiting"
        # ready 51 s ago: the round could come at 61 s, past the target: offered at once
        late, result = new_delivery(zone, km=0.2, ready_at=T0 - timedelta(seconds=51))

    assert result.outcome == "offered"
    assert pending(late).driver_id == driver.pk
    late.refresh_from_db()
    assert late.matching_since is None
    assert pending(fits) is None


def test_in_a_round_a_delivery_at_its_target_wait_is_served_first():
    """One driver, two deliveries: the matching alone would give the driver to the nearer one
    (B); A would then wait another window past its target, so A is served first, greedily."""
    zone = matching_zone(matching_window_seconds=5, target_wait_time_seconds=120)
    driver = driver_at(0.0)
    with time_machine.travel(T0, tick=False) as clock:
        a, _ = new_delivery(zone, km=2.0, ready_at=T0 - timedelta(seconds=100))  # 100 + 5 ≤ 120: waits
        b, _ = new_delivery(zone, km=0.3)
        clock.shift(timedelta(seconds=16))  # A is now at 116 s: the next window would pass 120 s
        result = matching_round(zone_id=zone.pk)

    assert pending(a).driver_id == driver.pk
    assert pending(b) is None
    assert (result.greedy, len(result.offered), result.waiting) == (1, 1, 1)
    found = DeliveryAuditLog.objects.get(delivery=a, event_type="driver_candidates_found")
    assert found.details["matching"]["greedy"] is True
    b.refresh_from_db()
    assert b.matching_since == T0 + timedelta(seconds=16)  # it re-enters the next window


def test_past_its_target_a_delivery_whose_drivers_all_went_to_older_ones_is_unassigned_as_sequential():
    zone = matching_zone(matching_window_seconds=5, target_wait_time_seconds=120)
    driver = driver_at(0.0)
    with time_machine.travel(T0, tick=False) as clock:
        older, _ = new_delivery(zone, km=0.5, ready_at=T0 - timedelta(seconds=110))
        younger, _ = new_delivery(zone, km=0.1, ready_at=T0 - timedelta(seconds=100))
        clock.shift(timedelta(seconds=16))  # both past 120 s by the next window
        result = matching_round(zone_id=zone.pk)

    assert pending(older).driver_id == driver.pk
    assert (result.greedy, result.unassigned, result.waiting) == (1, 1, 0)
    assert UnassignedOrder.objects.get(delivery=younger).failure_reason == "all_drivers_busy"
    younger.refresh_from_db()
    assert younger.matching_since is None  # the retry job serves it, at once (past its target)


def test_without_the_target_wait_rule_the_nearer_delivery_wins_the_driver():
    """The counterpart of the test above: neither near its target, the cheaper pair is matched."""
    zone = matching_zone(matching_window_seconds=5, target_wait_time_seconds=3600)
    driver = driver_at(0.0)
    with time_machine.travel(T0, tick=False) as clock:
        a, _ = new_delivery(zone, km=2.0, ready_at=T0 - timedelta(seconds=100))
        b, _ = new_delivery(zone, km=0.3)
        clock.shift(timedelta(seconds=16))
        result = matching_round(zone_id=zone.pk)

    assert pending(b).driver_id == driver.pk and pending(a) is None
    assert (result.greedy, result.waiting) == (0, 1)


# ------------------------------------------------------------------------- reject / expiry


@pytest.mark.parametrize("answer", ["reject", "expire"])
def test_a_rejected_or_expired_offer_re_enters_the_next_window(answer):
    zone = matching_zone(matching_window_seconds=5)
    first, second = driver_at(0.3), driver_at(1.0)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, _ = new_delivery(zone)
        clock.shift(timedelta(seconds=5))
        assert matching_rounds_run() == 1
        offer = pending(delivery)
        assert offer.driver_id == first.pk

        clock.shift(timedelta(seconds=2))
        if answer == "reject":
            outcome = offers.offer_reject(offer_id=offer.pk, driver_id=first.pk, reason="too far",
                                          actor=Actor("driver", first.pk))
            assert outcome.next_offer is None  # no immediate next candidate
        else:
            assert offers.offer_expire(offer_id=offer.pk, force=True)
        rejected_at = timezone.now()
        assert pending(delivery) is None
        delivery.refresh_from_db()
        assert delivery.matching_since == rejected_at

        clock.shift(timedelta(seconds=4))
        assert matching_rounds_run() == 0
        clock.shift(timedelta(seconds=1))
        assert matching_rounds_run() == 1

    assert pending(delivery).driver_id == second.pk  # never the first driver again


# ------------------------------------------------------------------------- nobody


def test_a_delivery_with_no_candidate_goes_the_unassigned_way_and_the_retry_brings_it_back():
    zone = matching_zone(matching_window_seconds=5)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, _ = new_delivery(zone)
        clock.shift(timedelta(seconds=5))
        result = matching_round(zone_id=zone.pk)
        assert (result.unassigned, result.offered) == (1, [])
        record = UnassignedOrder.objects.get(delivery=delivery)
        assert (record.failure_reason, record.attempt_count) == ("zone_empty", 1)
        delivery.refresh_from_db()
        assert delivery.matching_since is None  # out of the queue: the retry job has it

        driver = driver_at(0.5)
        clock.shift(timedelta(seconds=30))
        assert unassigned_retry() == 0  # it re-enters the window rather than being offered
        delivery.refresh_from_db()
        assert delivery.matching_since == timezone.now()
        clock.shift(timedelta(seconds=5))
        assert matching_rounds_run() == 1

    assert pending(delivery).driver_id == driver.pk
    kinds = list(DeliveryAuditLog.objects.filter(delivery=delivery).values_list("event_type", flat=True))
    assert kinds == ["assignment_started", "driver_candidates_found", "assignment_started",
                     "driver_candidates_found", "driver_offer_sent"]


def test_a_round_does_not_offer_a_delivery_back_to_the_driver_ops_took_it_from():
    """A delivery ops assigned straight (no offer) and then reassigned: the round's screening
    passes over that driver as it passes over one offered it before."""
    from dispatch.models import Assignment

    zone = matching_zone()
    with time_machine.travel(T0, tick=False) as clock:
        taken_from, other = driver_at(0.3), driver_at(2.0)
        delivery, _ = new_delivery(zone)
        Assignment.objects.create(delivery=delivery, driver=taken_from, status="cancelled", end_reason="reassigned")
        clock.shift(timedelta(seconds=5))
        result = matching_round(zone_id=zone.pk)

    assert [o.driver_id for o in result.offered] == [other.pk]


def test_a_delivery_that_loses_the_matching_waits_without_an_unassigned_record():
    zone = matching_zone()
    driver_at(0.0)
    with time_machine.travel(T0, tick=False) as clock:
        near, _ = new_delivery(zone, km=0.1)
        far, _ = new_delivery(zone, km=1.0)
        clock.shift(timedelta(seconds=5))
        result = matching_round(zone_id=zone.pk)

    assert (len(result.offered), result.waiting, result.unassigned) == (1, 1, 0)
    assert pending(near) is not None and pending(far) is None
    assert not UnassignedOrder.objects.exists()
    assert not DeliveryAuditLog.objects.filter(delivery=far).exists()  # nothing happened to it yet


def test_a_zone_switched_away_from_batched_matching_has_its_waiting_deliveries_offered_at_once():
    zone = matching_zone(matching_window_seconds=30)
    driver = driver_at(0.5)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, _ = new_delivery(zone)
        zone.dispatch_policy = "sequential"
        zone.save(update_fields=["dispatch_policy"])
        clock.shift(timedelta(seconds=1))
        assert matching_rounds_run() == 1
    assert pending(delivery).driver_id == driver.pk


def test_an_escalated_delivery_is_searched_within_the_wide_radius(settings):
    settings.DISPATCH_WIDE_RADIUS_KM = 10
    zone = matching_zone(search_radius_km=2)
    far = driver_at(6.0)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, _ = new_delivery(zone)
        clock.shift(timedelta(seconds=5))
        assert matching_round(zone_id=zone.pk).unassigned == 1
        UnassignedOrder.objects.filter(delivery=delivery).update(escalation_level=2)
        dispatch_automatically(delivery)
        clock.shift(timedelta(seconds=5))
        assert matching_rounds_run() == 1
    assert pending(delivery).driver_id == far.pk
    assert pending(delivery).search_radius_km == 10


# ------------------------------------------------------------------------- statements


def test_a_round_of_10_deliveries_and_20_drivers_is_a_bulk_round(django_assert_max_num_queries):
    zone = matching_zone()
    rng = random.Random(7)
    for _ in range(20):
        driver_at(rng.uniform(-3, 3))
    with time_machine.travel(T0, tick=False) as clock:
        for _ in range(10):
            new_delivery(zone, km=rng.uniform(-3, 3))
        clock.shift(timedelta(seconds=5))
        with django_assert_max_num_queries(BUDGET_10x20):
            offered = matching_rounds_run()
    assert offered == 10
    assert DriverOffer.objects.filter(status="PENDING").values("driver").distinct().count() == 10


# 10 + one per offer, whatever the number of drivers: zones due (2); the round's transaction
# (a savepoint here, inside the test's transaction: 2), its advisory lock, the deliveries, the
# drivers (locked), their screening facts, the pairs offered before (5); one INSERT … UPDATE per offer
# (10); the queue update (1) and the buffered audit rows (1).
BUDGET_10x20 = 21
