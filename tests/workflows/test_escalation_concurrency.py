"""The escalation check under real concurrent transactions (STYLE rules 3 and 10)."""
from datetime import timedelta

import pytest
import time_machine
from django.core import mail

from audit.models import DeliveryAuditLog
from common.actors import Actor
from common.exceptions import Conflict
from workflows.dispatching import delivery_dispatch, unassigned_retry
from escalation.models import SupportTicket, UnassignedOrder
from workflows.escalations import escalation_check
from workflows import offers
from offers.models import DriverOffer
from tests.factories import DeliveryFactory, online_driver
from tests.concurrency import race

pytestmark = pytest.mark.django_db(transaction=True)


def stuck_delivery():
    delivery = DeliveryFactory()
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    return delivery


def test_two_checks_at_once_open_one_ticket_per_delivery(settings):
    settings.OPS_ALERT_EMAILS = ["ops@example.com"]
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        deliveries = [stuck_delivery() for _ in range(5)]
        t.shift(timedelta(minutes=6))
        results, errors = race([escalation_check] * 4)

    assert errors == []
    assert sum(r.escalated[1] for r in results) == 5
    for delivery in deliveries:
        record = UnassignedOrder.objects.get(delivery=delivery)
        assert record.escalation_level == 1
        assert SupportTicket.objects.filter(delivery=delivery).count() == 1
        assert record.support_ticket_id == str(SupportTicket.objects.get(delivery=delivery).pk)
        assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="escalation_triggered").count() == 1
    assert len(mail.outbox) == 5


def test_a_check_racing_an_accept_leaves_a_resolved_record_and_no_open_ticket():
    for attempt in range(4):
        with time_machine.travel(f"2026-02-0{attempt + 1}T10:00:00Z", tick=False) as t:
            delivery = stuck_delivery()
            t.shift(timedelta(minutes=6))
            driver = online_driver(km=1)
            assert unassigned_retry() == 1
            offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
            actor = Actor("driver", driver.pk)
            results, errors = race([
                lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=actor),
                escalation_check,
            ])

        assert all(isinstance(e, Conflict) for e in errors), errors
        record = UnassignedOrder.objects.get(delivery=delivery)
        assert record.resolved_at is not None and record.escalation_status == "RESOLVED"
        tickets = SupportTicket.objects.filter(delivery=delivery)
        assert tickets.count() <= 1
        assert not tickets.filter(status__in=["open", "in_progress"]).exists()


def test_a_retry_run_skips_a_delivery_another_run_attempted_after_it_read_its_list(monkeypatch):
    """Two runs at once: the second reads its list, the first attempts the delivery and commits,
    then the second takes the delivery's lock. It must see the attempt and leave it."""
    from workflows import dispatching

    real_lock = dispatching.locks.lock_delivery
    other_run = {}

    def lock_after_another_run(*args, **kwargs):
        monkeypatch.setattr(dispatching.locks, "lock_delivery", real_lock)  # this once
        other_run["results"], other_run["errors"] = race([unassigned_retry])  # its own thread and transaction
        return real_lock(*args, **kwargs)

    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(seconds=30))
        monkeypatch.setattr(dispatching.locks, "lock_delivery", lock_after_another_run)
        assert unassigned_retry() == 0

    assert other_run == {"results": [0], "errors": []}
    record = UnassignedOrder.objects.get(delivery=delivery)
    assert record.attempt_count == 2  # the first dispatch and the other run's attempt, not this run's
