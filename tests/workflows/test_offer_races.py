"""Races on offers with real threads and real transactions: exactly one winner, constraints hold."""
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction

from audit.models import DeliveryAuditLog
from workflows import drivers as availability
from common.actors import Actor
from common.exceptions import Conflict
from workflows.dispatching import delivery_dispatch
from dispatch.models import Assignment, Delivery
from workflows import offers
from offers.models import DriverOffer
from tests.factories import DeliveryFactory, OfferFactory, online_driver
from tests.concurrency import behind_lock, race

pytestmark = pytest.mark.django_db(transaction=True)


def make_offer(km=0.5):
    driver = online_driver(km=km)
    delivery = DeliveryFactory()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return driver, delivery, offer


def test_accept_reject_expire_and_withdraw_race_on_one_offer_with_one_winner():
    for attempt in range(5):
        driver, delivery, offer = make_offer()
        online_driver(km=1.5)  # somewhere for the delivery to go next
        due = offer.expires_at + timedelta(seconds=1)
        actor = Actor("driver", driver.pk)
        calls = [
            lambda: ("accepted", offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=actor)),
            lambda: ("rejected", offers.offer_reject(offer_id=offer.pk, driver_id=driver.pk, reason="other", actor=actor)),
            lambda: ("expired", offers.offer_expire(offer_id=offer.pk, now=due) or None),
            lambda: ("withdrawn", availability.availability_end_shift(driver_id=driver.pk, actor=actor)),
        ]
        results, errors = race(calls)

        offer.refresh_from_db()
        winners = [name for name, value in results if value is not None]
        assert all(isinstance(e, Conflict) for e in errors), errors
        if offer.status == "ACCEPTED":
            # the driver is busy now, so ending the shift was refused, and nothing else won
            assert winners == ["accepted"], (winners, errors)
            assert Assignment.objects.filter(delivery=delivery, status="active").count() == 1
        else:
            assert offer.status in ("REJECTED", "EXPIRED", "CANCELLED")
            assert not Assignment.objects.filter(delivery=delivery).exists()
        assert DriverOffer.objects.filter(delivery=delivery, status="PENDING").count() <= 1
        assert DriverOffer.objects.filter(delivery=delivery, status="ACCEPTED").count() <= 1


def test_many_accepts_of_one_offer_make_one_assignment():
    driver, delivery, offer = make_offer()
    actor = Actor("driver", driver.pk)
    results, errors = race([lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=actor)] * 6)
    assert len(results) == 1 and len(errors) == 5
    assert all(isinstance(e, Conflict) for e in errors)
    assert Assignment.objects.filter(delivery=delivery).count() == 1
    assert Delivery.objects.get(pk=delivery.pk).offer_acceptance_count == 1


def test_the_sweep_and_the_scheduled_task_expire_an_offer_once():
    driver, delivery, offer = make_offer()
    due = offer.expires_at + timedelta(seconds=1)
    results, errors = race(
        [lambda: offers.offer_expire(offer_id=offer.pk, now=due), lambda: offers.offers_expire_overdue(now=due)] * 2
    )
    assert not errors
    assert sum(int(r) for r in results) == 1
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="offer_expired").count() == 1


def test_two_dispatches_of_one_delivery_make_one_pending_offer():
    for _ in range(3):
        online_driver(km=0.5)
    delivery = DeliveryFactory()
    results, errors = race([lambda: delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())] * 4)
    assert not errors
    assert sorted(r.outcome for r in results) == ["already_offered"] * 3 + ["offered"]
    assert DriverOffer.objects.filter(delivery=delivery, status="PENDING").count() == 1


def test_two_deliveries_racing_for_one_driver_get_one_offer():
    driver = online_driver(km=0.5)
    deliveries = DeliveryFactory.create_batch(4)
    results, errors = race([lambda d=d: delivery_dispatch(delivery_id=d.pk, actor=Actor.system()) for d in deliveries])
    assert not errors
    assert [r.outcome for r in results].count("offered") == 1
    assert DriverOffer.objects.filter(driver=driver, status="PENDING").count() == 1


def test_the_database_refuses_a_second_pending_or_accepted_offer():
    driver, delivery, offer = make_offer()
    other = online_driver(km=0.7)
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=delivery, driver=other)  # second pending per delivery
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=DeliveryFactory(), driver=driver)  # second pending per driver
    DriverOffer.objects.filter(pk=offer.pk).update(status="ACCEPTED")
    with pytest.raises(IntegrityError), transaction.atomic():
        OfferFactory(delivery=delivery, driver=other, status="ACCEPTED")


def test_changing_a_pending_offer_takes_its_drivers_lock_first_so_dispatch_never_deadlocks():
    """The interleaving a benchmark once hit: dispatch holds driver X (skip-locked) and inserts
    an offer for X while X's pending offer is being accepted. The accept must wait for X before
    touching the offer, so the insert fails at once on the unique index instead of waiting on
    the accept (which would wait on X: a deadlock)."""
    import threading
    import time as _time

    from django.db import OperationalError, connections

    driver, delivery, offer = make_offer()
    other = DeliveryFactory()
    holding = threading.Event()
    release = threading.Event()
    outcome = {}

    def dispatcher():
        try:
            with transaction.atomic():
                locked = type(driver).objects.select_for_update(of=("self",)).get(pk=driver.pk)
                holding.set()
                release.wait(20)
                try:
                    with transaction.atomic():
                        OfferFactory(delivery=other, driver=locked)
                    outcome["insert"] = "inserted"
                except IntegrityError:
                    outcome["insert"] = "unique violation at once"
        except OperationalError as exc:
            outcome["insert"] = f"database error: {exc.__class__.__name__}"
        finally:
            connections.close_all()

    def accepter():
        try:
            offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
            outcome["accept"] = "accepted"
        except Exception as exc:
            outcome["accept"] = exc.__class__.__name__
        finally:
            connections.close_all()

    a = threading.Thread(target=dispatcher)
    a.start()
    assert holding.wait(10)
    b = threading.Thread(target=accepter)
    b.start()
    # wait until the accept is blocked on a row lock (it must be waiting for the driver)
    deadline = _time.monotonic() + 10
    with connection.cursor() as cur:
        while _time.monotonic() < deadline:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
            if cur.fetchone()[0] >= 1:
                break
            _time.sleep(0.02)
    release.set()
    a.join(30)
    b.join(30)

    assert outcome == {"insert": "unique violation at once", "accept": "accepted"}


def test_a_reassign_that_waited_on_an_accept_supersedes_the_offer_that_accept_made():
    """The accept holds the delivery while the reassign, which found no accepted offer (it was
    still pending), waits for it. Before: the reassign went on with the offer left ACCEPTED
    beside the ended assignment, and every later accept of the delivery was a 500 (the
    one-accepted-offer rule). Deterministic: the accept commits only once the reassign waits."""
    from workflows.deliveries import delivery_reassign

    driver, delivery, offer = make_offer()
    nxt = online_driver(km=1.5)

    behind_lock(
        lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk)),
        lambda: delivery_reassign(delivery_id=delivery.pk, reason="ops", actor=Actor.system()),
    )

    offer.refresh_from_db()
    assert offer.status == "CANCELLED" and offer.cancellation_reason == "reassigned"
    assert Assignment.objects.get(delivery=delivery, driver=driver).status == "cancelled"
    next_offer = DriverOffer.objects.get(delivery=delivery, driver=nxt, status="PENDING")
    offers.offer_accept(offer_id=next_offer.pk, driver_id=nxt.pk, actor=Actor("driver", nxt.pk))  # was the 500
    assert Assignment.objects.get(delivery=delivery, status="active").driver_id == nxt.pk


def test_the_repair_migration_releases_deliveries_the_old_race_left_stuck():
    """offers 0004: the offer left ACCEPTED beside its assignment ended by a reassign becomes
    what a reassign makes it, and the delivery can be accepted again. Other accepted offers
    (an active assignment's) are left alone."""
    from importlib import import_module

    from workflows.deliveries import delivery_reassign

    repair = import_module("offers.migrations.0004_repair_offers_left_accepted_by_a_reassign").REPAIR
    stuck_driver, stuck, stuck_offer = make_offer()
    kept_driver, kept, kept_offer = make_offer(km=0.7)
    online_driver(km=1.5)
    for driver, offer in ((stuck_driver, stuck_offer), (kept_driver, kept_offer)):
        offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
    delivery_reassign(delivery_id=stuck.pk, reason="ops", actor=Actor.system())
    DriverOffer.objects.filter(pk=stuck_offer.pk).update(status="ACCEPTED", cancelled_at=None, cancellation_reason="")

    with connection.cursor() as cursor:
        cursor.execute(repair)

    stuck_offer.refresh_from_db()
    kept_offer.refresh_from_db()
    ended = Assignment.objects.get(offer_id=stuck_offer.pk)
    assert (stuck_offer.status, stuck_offer.cancellation_reason, stuck_offer.cancelled_at) == ("CANCELLED", "reassigned", ended.ended_at)
    assert kept_offer.status == "ACCEPTED"


def test_a_late_accepts_expiry_waits_for_the_offers_lock_instead_of_leaving_it_pending(monkeypatch):
    """A late accept answers 409 "expired" and expires the offer; another late accept of the
    same round held the offer (with the whole round) at that moment, the expiry skipped it, and
    the offer stayed pending, the next round waiting, until the sweep (up to 5 s later)."""
    _, _, held = make_offer()
    _, _, skipped = make_offer()
    late = held.expires_at + timedelta(seconds=1)

    assert behind_lock(hold=lambda: DriverOffer.objects.select_for_update().get(pk=held.pk),
                       call=lambda: offers.offer_expire(offer_id=held.pk, now=late, wait=True)) is True
    # the sweep and the offer's own timer still skip a held offer: its holder decides
    assert behind_lock(hold=lambda: DriverOffer.objects.select_for_update().get(pk=skipped.pk),
                       call=lambda: offers.offer_expire(offer_id=skipped.pk, now=late)) is False
    assert DriverOffer.objects.get(pk=held.pk).status == "EXPIRED"
    assert DriverOffer.objects.get(pk=skipped.pk).status == "PENDING"

    # and the accept's own expiry is the waiting one
    driver, _, offer = make_offer()
    calls = []
    real = offers.offer_expire
    monkeypatch.setattr(offers, "offer_expire", lambda **kw: calls.append(kw) or real(**kw))
    with pytest.raises(Conflict, match="has expired"):
        offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk),
                            now=offer.expires_at + timedelta(seconds=1))
    assert {"offer_id": offer.pk, "now": offer.expires_at + timedelta(seconds=1), "wait": True} in calls
    assert DriverOffer.objects.get(pk=offer.pk).status == "EXPIRED"


@pytest.mark.parametrize("policy", ["sequential", "batch"])
def test_a_driver_another_transaction_holds_counts_as_busy_not_as_nobody_near(policy, settings, monkeypatch):
    """Dispatch passes over a driver another transaction holds (SKIP LOCKED); the delivery's
    record then said `no_available_drivers` ("nobody near, or all declined") for a driver near
    and merely busy a moment."""
    from availability.models import Driver
    from escalation.models import UnassignedOrder

    from workflows import dispatching

    settings.DISPATCH_POLICY = policy
    monkeypatch.setattr(dispatching, "HELD_RECHECKS", 0)  # (no wait for held drivers: one held past it, as here for good)
    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()

    result = behind_lock(hold=lambda: Driver.objects.select_for_update().get(pk=driver.pk),
                         call=lambda: delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()))

    assert (result.outcome, result.failure_reason) == ("unassigned", "all_drivers_busy")
    assert UnassignedOrder.objects.get(delivery=delivery).failure_reason == "all_drivers_busy"
