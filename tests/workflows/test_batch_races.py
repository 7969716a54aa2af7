"""Races on batch and broadcast rounds with real threads and real transactions (issue 16): one
winner under any interleaving of accepts, rejects, expiries and cancels; no driver ever holds
two active assignments; a round is followed by exactly one next round."""
from datetime import timedelta

import pytest
from django.db.models import Count

from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Assignment, Delivery
from offers.models import DriverOffer
from tests.concurrency import race
from tests.factories import CITY, DeliveryFactory, ZoneFactory, online_driver
from workflows import drivers as availability
from workflows import offers
from workflows.deliveries import delivery_cancel
from workflows.dispatching import delivery_dispatch

pytestmark = pytest.mark.django_db(transaction=True)

CITY_BBOX = (CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2)


def accept_call(offer):
    return lambda: offers.offer_accept(offer_id=offer.pk, driver_id=offer.driver_id, actor=Actor("driver", offer.driver_id))


def reject_call(offer):
    return lambda: offers.offer_reject(
        offer_id=offer.pk, driver_id=offer.driver_id, reason="other", actor=Actor("driver", offer.driver_id)
    )


def dispatched_round(zone, n_drivers, *, km0=0.3):
    drivers = [online_driver(km=km0 + 0.2 * i) for i in range(n_drivers)]
    delivery = DeliveryFactory(zone=zone)
    result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    assert result.outcome == "offered"
    return drivers, delivery, list(DriverOffer.objects.filter(delivery=delivery, status="PENDING").order_by("slot"))


def assert_invariants():
    """What must hold after any race: per delivery at most one ACCEPTED offer and one active
    assignment, per driver at most one PENDING offer and one active assignment; a delivery
    that is no longer ready has no pending offer; `current_offer` is set exactly while one is
    pending, and is one of them."""
    def over_one(qs, key):
        return list(qs.values(key).annotate(n=Count("pk")).filter(n__gt=1))

    assert over_one(DriverOffer.objects.filter(status="ACCEPTED"), "delivery") == []
    assert over_one(DriverOffer.objects.filter(status="PENDING"), "driver") == []
    assert over_one(Assignment.objects.filter(status="active"), "delivery") == []
    assert over_one(Assignment.objects.filter(status="active"), "driver") == []
    for delivery in Delivery.objects.all():
        pending = set(DriverOffer.objects.filter(delivery=delivery, status="PENDING").values_list("pk", flat=True))
        if delivery.status != "ready":
            assert not pending, (delivery.status, pending)
        assert (delivery.current_offer_id is not None) == bool(pending), (delivery.current_offer_id, pending)
        if pending:
            assert delivery.current_offer_id in pending


def test_every_driver_of_a_batch_accepting_at_once_makes_one_winner():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=5)
    for _ in range(4):
        drivers, delivery, made = dispatched_round(zone, 5)
        assert len(made) == 5

        results, errors = race([accept_call(o) for o in made])

        assert len(results) == 1 and len(errors) == 4, (results, errors)
        assert all(isinstance(e, Conflict) for e in errors), errors
        winner = results[0].offer
        assert Assignment.objects.filter(delivery=delivery).count() == 1
        assert Assignment.objects.get(delivery=delivery).driver_id == winner.driver_id
        statuses = dict(DriverOffer.objects.filter(delivery=delivery).values_list("pk", "status"))
        assert statuses.pop(winner.pk) == "ACCEPTED"
        assert set(statuses.values()) == {"CANCELLED"}
        assert not DriverOffer.objects.filter(delivery=delivery, accepted_at__isnull=False).exclude(pk=winner.pk).exists()
        delivery.refresh_from_db()
        assert (delivery.status, delivery.accepted_offer_id, delivery.offer_acceptance_count) == ("assigned", winner.pk, 1)
        assert_invariants()
        # free the drivers for the next attempt
        DriverOffer.objects.filter(driver__in=drivers).update(status="CANCELLED")
        Assignment.objects.filter(delivery=delivery).update(status="cancelled")
        type(drivers[0]).objects.filter(pk__in=[d.pk for d in drivers]).update(availability="offline")


def test_a_broadcast_accepted_by_everyone_at_once_has_one_winner():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="broadcast", broadcast_max_drivers=8)
    drivers, delivery, made = dispatched_round(zone, 10)
    assert len(made) == 8

    results, errors = race([accept_call(o) for o in made])

    assert len(results) == 1 and len(errors) == 7 and all(isinstance(e, Conflict) for e in errors), errors
    assert DriverOffer.objects.filter(delivery=delivery, status="ACCEPTED").count() == 1
    assert DriverOffer.objects.filter(delivery=delivery, status="CANCELLED").count() == 7
    assert Assignment.objects.filter(delivery=delivery, status="active").count() == 1
    assert_invariants()


def test_accepts_rejects_expiries_and_the_delivery_cancel_of_one_batch_racing():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=4)
    for attempt in range(5):
        drivers, delivery, made = dispatched_round(zone, 6, km0=0.3 + attempt * 0.01)
        a, b, c, d = made
        due = a.expires_at + timedelta(seconds=1)
        calls = [
            accept_call(a),
            accept_call(b),
            reject_call(c),
            lambda: offers.offer_expire(offer_id=d.pk, now=due) or None,
            lambda: delivery_cancel(delivery_id=delivery.pk, reason="race", actor=Actor.system()),
        ]
        results, errors = race(calls)

        assert all(isinstance(e, Conflict) for e in errors), errors
        delivery.refresh_from_db()
        accepted = list(DriverOffer.objects.filter(delivery=delivery, status="ACCEPTED"))
        assert len(accepted) <= 1
        if accepted:
            assert accepted[0].pk in (a.pk, b.pk)
            assert Assignment.objects.filter(delivery=delivery).count() == 1
            assert delivery.status in ("assigned", "cancelled")  # the cancel may come after the accept
        else:
            assert not Assignment.objects.filter(delivery=delivery).exists()
            assert delivery.status == "cancelled"  # nobody took it, so the cancel won
        # no offer of the first round is left pending, and none was accepted but the winner
        for offer in made:
            offer.refresh_from_db()
            assert offer.status != "PENDING"
            assert offer.status != "ACCEPTED" or offer.pk == accepted[0].pk
        assert_invariants()
        # clean slate for the next attempt: these drivers leave
        DriverOffer.objects.filter(driver__in=drivers, status="PENDING").update(status="CANCELLED")
        Delivery.objects.filter(pk=delivery.pk).update(current_offer=None)
        Assignment.objects.filter(delivery=delivery).update(status="cancelled")
        type(drivers[0]).objects.filter(pk__in=[x.pk for x in drivers]).update(availability="offline")


def test_accept_against_the_expiry_of_the_same_batch_offer_and_a_sibling_going_on_break():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=3)
    for attempt in range(4):
        drivers, delivery, made = dispatched_round(zone, 3, km0=0.3 + attempt * 0.01)
        first, second, third = made
        # the accept's clock is just inside expiresAt, the expiry's just past it
        inside, past = first.expires_at - timedelta(milliseconds=500), first.expires_at + timedelta(seconds=1)
        actor = Actor("driver", first.driver_id)
        calls = [
            lambda: offers.offer_accept(offer_id=first.pk, driver_id=first.driver_id, actor=actor, now=inside),
            lambda: offers.offer_expire(offer_id=first.pk, now=past) or None,
            lambda: offers.offer_expire(offer_id=second.pk, now=past) or None,
            lambda: availability.availability_end_shift(driver_id=third.driver_id, actor=Actor("driver", third.driver_id)),
        ]
        results, errors = race(calls)

        assert all(isinstance(e, Conflict) for e in errors), errors
        first.refresh_from_db()
        delivery.refresh_from_db()
        if first.status == "ACCEPTED":
            assert delivery.status == "assigned"
            assert Assignment.objects.filter(delivery=delivery, status="active").count() == 1
        else:
            assert first.status == "EXPIRED"
            assert not Assignment.objects.filter(delivery=delivery).exists()
        assert_invariants()
        DriverOffer.objects.filter(driver__in=drivers, status="PENDING").update(status="CANCELLED")
        Delivery.objects.filter(pk=delivery.pk).update(current_offer=None, status="cancelled")
        Assignment.objects.filter(delivery=delivery).update(status="cancelled")
        type(drivers[0]).objects.filter(pk__in=[x.pk for x in drivers]).update(availability="offline")


def test_a_whole_batch_expiring_at_once_starts_exactly_one_next_round():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=3)
    drivers, delivery, made = dispatched_round(zone, 6)
    assert len(made) == 3
    due = made[0].expires_at + timedelta(seconds=1)

    results, errors = race(
        [lambda o=o: offers.offer_expire(offer_id=o.pk, now=due) for o in made] + [lambda: offers.offers_expire_overdue(now=due)]
    )

    assert not errors, errors
    assert sum(int(r) for r in results) == 3  # each offer expired once
    nxt = list(DriverOffer.objects.filter(delivery=delivery, status="PENDING").order_by("slot"))
    assert [o.driver_id for o in nxt] == [d.pk for d in drivers[3:]]  # the next three, never offered before
    assert [o.slot for o in nxt] == [1, 2, 3]
    assert DriverOffer.objects.filter(delivery=delivery).count() == 6
    assert_invariants()


def test_batches_of_several_deliveries_racing_for_the_same_drivers_never_double_book_one():
    zone = ZoneFactory(bbox=CITY_BBOX, dispatch_policy="batch", offer_batch_size=3)
    drivers = [online_driver(km=0.3 + 0.2 * i) for i in range(7)]
    deliveries = [DeliveryFactory(zone=zone) for _ in range(4)]

    results, errors = race([lambda d=d: delivery_dispatch(delivery_id=d.pk, actor=Actor.system()) for d in deliveries])
    assert not errors, errors
    assert_invariants()  # no driver holds two pending offers
    pending = list(DriverOffer.objects.filter(status="PENDING"))
    assert len(pending) == 7  # the seven drivers are shared out, none twice

    # every driver accepts whatever it was offered, all at once
    results, errors = race([accept_call(o) for o in pending])
    assert all(isinstance(e, Conflict) for e in errors), errors
    offered = {o.delivery_id for o in pending}
    assert len(results) == len(offered)  # one winner per delivery that had offers
    assert_invariants()  # and no driver with two active assignments
