"""batched_matching rounds racing each other and ops, with real threads and real transactions:
no driver and no delivery ever holds two pending offers, and nothing waits on anything forever."""
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from availability.models import Driver
from common.actors import Actor
from common.exceptions import Conflict
from offers.models import DriverOffer
from tests.concurrency import race
from dispatch.models import Delivery
from tests.factories import DeliveryFactory
from tests.workflows.test_batched_matching import at, dispatch_automatically, driver_at, matching_zone
from workflows import drivers as availability
from workflows import matching
from workflows.deliveries import delivery_cancel
from workflows.dispatching import delivery_dispatch

pytestmark = pytest.mark.django_db(transaction=True)
ATTEMPTS = 5


def waiting_zone(attempt: int, deliveries: int, drivers: int, now):
    """A matching zone of its own (far from the other attempts' drivers) with its drivers and
    its waiting deliveries."""
    west = 30.5 + 0.3 * attempt
    zone = matching_zone(bbox=(west, 10.90, west + 0.1, 11.00))
    centre = (10.95, west + 0.05)
    for n in range(drivers):
        driver_at(0.2 * n, centre=centre)
    waiting = []
    for n in range(deliveries):
        delivery = DeliveryFactory(zone=zone, pickup_location=at(0.15 * n, centre))
        assert dispatch_automatically(delivery, now=now).outcome == "waiting"
        waiting.append(delivery)
    return zone, waiting


def assert_no_double_offers():
    pending = DriverOffer.objects.filter(status="PENDING")
    assert not pending.values("driver").annotate(n=Count("pk")).filter(n__gt=1).exists()
    assert not pending.values("delivery").annotate(n=Count("pk")).filter(n__gt=1).exists()


@pytest.mark.parametrize("zone_lock", [True, False], ids=["advisory-lock", "row-locks-only"])
def test_two_rounds_of_one_zone_and_ops_at_the_same_moment_never_double_offer(zone_lock, monkeypatch):
    """Two workers run the zone's round at once while ops dispatch one of its deliveries.
    With the zone's advisory lock the second round waits, then finds nothing due; without it
    (row locks alone, SKIP LOCKED), the rounds split the rows. Either way: one pending offer at most per driver and per
    delivery, and the rounds that follow offer every driver."""
    if not zone_lock:
        monkeypatch.setattr(matching, "_zone_lock", lambda zone_id: None)
    for attempt in range(3):
        now = timezone.now()
        zone, deliveries = waiting_zone(attempt, deliveries=6, drivers=4, now=now)
        due = now + timedelta(seconds=5)
        calls = [
            lambda: matching.matching_round(zone_id=zone.pk, now=due),
            lambda: matching.matching_round(zone_id=zone.pk, now=due),
            lambda: delivery_dispatch(delivery_id=deliveries[0].pk, actor=Actor.system(), strict=True, now=due),
        ]
        results, errors = race(calls)

        assert all(isinstance(e, Conflict) for e in errors), errors  # ops: "already has a pending offer"
        assert_no_double_offers()
        offers = DriverOffer.objects.filter(status="PENDING", delivery__zone=zone)
        assert offers.count() <= 4
        # ops' delivery: offered by ops or by a round, or by nobody when the rounds took every driver
        assert offers.filter(delivery=deliveries[0]).count() <= 1

        # whatever the interleaving, the next rounds give every driver one delivery
        later = due
        for _ in range(3):
            later += timedelta(seconds=5)
            matching.matching_rounds_run(now=later)
        assert offers.count() == 4
        assert_no_double_offers()
        Delivery.objects.filter(zone=zone, matching_since__isnull=False).update(status="cancelled")


def test_a_round_and_ops_cancelling_a_waiting_delivery_leave_no_pending_offer_on_it():
    for attempt in range(ATTEMPTS):
        now = timezone.now()
        zone, deliveries = waiting_zone(attempt, deliveries=3, drivers=3, now=now)
        due = now + timedelta(seconds=5)
        target = deliveries[1]
        results, errors = race([
            lambda: matching.matching_round(zone_id=zone.pk, now=due),
            lambda: delivery_cancel(delivery_id=target.pk, reason="customer", actor=Actor.system(), now=due),
        ])

        assert not errors, errors
        target.refresh_from_db()
        assert target.status == "cancelled"
        assert not DriverOffer.objects.filter(delivery=target, status="PENDING").exists()
        assert_no_double_offers()


def test_ops_cancelling_a_delivery_while_a_round_offers_it_withdraws_that_offer(monkeypatch):
    """The interleaving forced: the round has locked the waiting delivery and is searching when
    ops cancel it (the cancel waits for the delivery's lock); the round offers it and commits;
    the cancel must then withdraw that offer (it used to miss it: it looks up the pending offer
    before it locks the delivery, and a dispatch committing in between went unseen)."""
    now = timezone.now()
    zone, [target] = waiting_zone(0, deliveries=1, drivers=1, now=now)
    searching, go_on = threading.Event(), threading.Event()
    real_search = matching.drivers_available_near

    def slow_search(**kwargs):
        searching.set()
        go_on.wait(10)
        return real_search(**kwargs)

    monkeypatch.setattr(matching, "drivers_available_near", slow_search)
    results = {}

    def round_():
        try:
            results["round"] = matching.matching_round(zone_id=zone.pk, now=now + timedelta(seconds=5))
        finally:
            connection.close()

    def cancel():
        try:
            results["cancel"] = delivery_cancel(delivery_id=target.pk, reason="customer", actor=Actor.system())
        except Exception as exc:
            results["cancel"] = exc
        finally:
            connection.close()

    a = threading.Thread(target=round_)
    a.start()
    assert searching.wait(10)
    b = threading.Thread(target=cancel)
    b.start()
    b.join(1)  # it waits for the delivery's lock
    go_on.set()
    a.join(10)
    b.join(10)

    assert len(results["round"].offered) == 1
    target.refresh_from_db()
    assert target.status == "cancelled", results
    assert not DriverOffer.objects.filter(delivery=target, status="PENDING").exists()
    assert DriverOffer.objects.get(delivery=target).status == "CANCELLED"


def test_a_driver_going_off_shift_while_a_round_offers_him_a_delivery_keeps_no_pending_offer(monkeypatch):
    """The interleaving forced: the round has locked its drivers when one of them ends his
    shift (the change waits for the driver's lock); the round offers him the delivery and
    commits; the shift's end must then withdraw that offer and the delivery wait again."""
    now = timezone.now()
    zone, [delivery] = waiting_zone(0, deliveries=1, drivers=1, now=now)
    [driver] = Driver.objects.all()
    drivers_locked, go_on = threading.Event(), threading.Event()
    real_facts = matching._driver_facts

    def slow_facts(ids, zone_id):
        drivers_locked.set()
        go_on.wait(10)
        return real_facts(ids, zone_id)

    monkeypatch.setattr(matching, "_driver_facts", slow_facts)
    results = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as exc:
            results[name] = exc
        finally:
            connection.close()

    a = threading.Thread(target=run, args=("round", lambda: matching.matching_round(zone_id=zone.pk, now=now + timedelta(seconds=5))))
    a.start()
    assert drivers_locked.wait(10)
    b = threading.Thread(target=run, args=("end_shift", lambda: availability.availability_end_shift(
        driver_id=driver.pk, actor=Actor.system())))
    b.start()
    b.join(1)  # it waits for the driver's lock
    go_on.set()
    a.join(10)
    b.join(10)

    assert not isinstance(results["end_shift"], Exception), results
    assert len(results["round"].offered) == 1
    driver.refresh_from_db()
    assert driver.availability == "shift_ended"
    assert not DriverOffer.objects.filter(driver=driver, status="PENDING").exists()
    assert DriverOffer.objects.get(driver=driver).status == "CANCELLED"
    delivery.refresh_from_db()
    assert delivery.current_offer_id is None and delivery.matching_since is not None  # waits again
