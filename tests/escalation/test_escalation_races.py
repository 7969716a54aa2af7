"""Escalation beside answers and expiries, with real threads (transaction=True)."""
from datetime import timedelta

import pytest
import time_machine
from django.db import connection

from common.actors import Actor
from escalation.models import UnassignedOrder
from offers.models import DriverOffer
from tests.concurrency import held_elsewhere
from tests.factories import DeliveryFactory, online_driver
from workflows.dispatching import delivery_dispatch
from workflows.escalations import escalation_check

pytestmark = pytest.mark.django_db(transaction=True)


def test_level_2_never_waits_for_a_pending_offer_another_transaction_holds():
    """Level 2 found a 5 km offer pending and widened it while holding the delivery's lock; an
    answer or an expiry holds the offer and waits for the delivery (workflows.locks: offer, then
    delivery): the two deadlocked. The offer another transaction holds is now skipped."""
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery = DeliveryFactory()
        assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
        t.shift(timedelta(minutes=5))
        escalation_check()
        t.shift(timedelta(minutes=9, seconds=50))
        online_driver(km=3)
        assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "offered"
        offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        t.shift(timedelta(seconds=10))

        # an answer's first lock: the offer (then it would wait for the delivery)
        with held_elsewhere(lambda: DriverOffer.objects.select_for_update().get(pk=offer.pk)):
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")  # (waiting would fail the test, not hang it)
            try:
                escalation_check()
            finally:
                with connection.cursor() as cursor:
                    cursor.execute("RESET lock_timeout")

    assert UnassignedOrder.objects.get(delivery=delivery).escalation_level == 2
    offer.refresh_from_db()
    assert offer.search_radius_km == 5  # skipped: the offer was ending under the other transaction


def test_a_delivery_another_job_holds_is_escalated_once_it_is_free_not_at_the_next_check():
    """The retry job runs on the same 30 s beat and holds each delivery while it dispatches it:
    the check passed the held one over ("looked at next time"), met the same collision at the
    next run, and its tier came 30-70 s late (an audit). It is tried again after the others,
    waiting for the lock a moment."""
    from dispatch.models import Delivery
    from tests.concurrency import behind_lock

    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery = DeliveryFactory()
        assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
        t.shift(timedelta(minutes=5, seconds=1))

        result = behind_lock(hold=lambda: Delivery.objects.select_for_update().get(pk=delivery.pk), call=escalation_check)

    assert (result.escalated[1], result.skipped) == (1, 0)
    assert UnassignedOrder.objects.get(delivery=delivery).escalation_level == 1
