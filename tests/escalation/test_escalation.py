"""Tiered escalation of unassigned deliveries (SPEC "Escalation and support")."""
from datetime import timedelta

import pytest
import time_machine
from django.core import mail
from django.db import transaction

from audit.models import DeliveryAuditLog
from common.actors import Actor
from config.periodic import PERIODIC_TASKS
from workflows.dispatching import delivery_dispatch, unassigned_retry
from workflows.deliveries import delivery_cancel
from escalation import events as ev
from escalation.models import SupportTicket, TicketComment, UnassignedOrder
from workflows.escalations import escalation_check
from escalation.tasks import escalation_check as escalation_check_task
from escalation.tickets import ticket_resolve, ticket_take
from workflows import offers
from offers.models import DriverOffer
from tests.factories import DeliveryFactory, SupportUserFactory, online_driver
from tests.fakes import FakeHelpdesk
from tests.typecheck import assert_event_shape

pytestmark = pytest.mark.django_db

T0 = "2026-02-01T10:00:00Z"


@pytest.fixture(autouse=True)
def alert_emails(settings):
    settings.OPS_ALERT_EMAILS = ["ops-oncall@example.com", "lead@example.com"]


def stuck_delivery(**kwargs):
    """A ready delivery that dispatch could not place (no drivers): an open level-0 record."""
    delivery = DeliveryFactory(**kwargs)
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    return delivery


def record_of(delivery) -> UnassignedOrder:
    return UnassignedOrder.objects.get(delivery=delivery)


def audit(delivery, *types):
    return list(DeliveryAuditLog.objects.filter(delivery=delivery, event_type__in=types).order_by("timestamp", "seq"))


def check(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        return escalation_check()


def test_nothing_happens_before_five_minutes(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(seconds=299))
        result = check(django_capture_on_commit_callbacks)

    assert result.escalated == {1: 0, 2: 0, 3: 0}
    record = record_of(delivery)
    assert (record.escalation_level, record.escalation_status, record.support_ticket_id) == (0, "PENDING", "")
    assert not SupportTicket.objects.exists()
    assert mail.outbox == []


def test_level_1_opens_a_high_priority_ticket_alerts_ops_and_marks_the_record_notified(
    listen, django_capture_on_commit_callbacks
):
    live = listen("ops", "support")
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery(seller_order_id="ORD-789")
        t.shift(timedelta(minutes=5))
        result = check(django_capture_on_commit_callbacks)

    assert result.escalated[1] == 1
    record = record_of(delivery)
    ticket = SupportTicket.objects.get()
    assert record.escalation_level == 1
    assert record.escalation_status == "NOTIFIED"
    assert record.support_ticket_id == str(ticket.pk)
    assert record.notification_sent_at.isoformat() == "2026-02-01T10:05:00+00:00"
    assert record.resolved_at is None
    assert (ticket.priority, ticket.status, ticket.type) == ("high", "open", "unassigned_delivery")
    assert ticket.title == "Order ORD-789 unassigned for 5+ minutes"
    assert ticket.delivery_id == delivery.pk and ticket.unassigned_order_id == record.pk

    (row,) = audit(delivery, "escalation_triggered")
    assert row.actor_type == "system"
    assert row.details["level"] == 1 and row.details["reason"] == "5_min_unassigned"
    assert row.details["ticketId"] == str(ticket.pk)

    received = live.drain()
    created = [e for e in received if e["type"] == "support_ticket_created"]
    escalated = [e for e in received if e["type"] == "unassigned_order_escalated"]
    assert len(created) == 2 and len(escalated) == 2  # one per group: ops and support
    assert_event_shape(created[0], ev.SupportTicketCreatedEvent)
    assert_event_shape(escalated[0], ev.UnassignedOrderEscalatedEvent)
    assert escalated[0] == {
        "type": "unassigned_order_escalated", "deliveryId": str(delivery.pk), "sellerOrderId": "ORD-789",
        "level": 1, "reason": "no_available_drivers", "escalatedAt": "2026-02-01T10:05:00Z",
        "supportTicketId": str(ticket.pk),
    }
    assert created[0]["priority"] == "high" and created[0]["ticketId"] == str(ticket.pk)
    assert created[0]["createdAt"] == "2026-02-01T10:05:00Z"

    (email,) = mail.outbox
    assert email.to == ["ops-oncall@example.com", "lead@example.com"]
    assert "ORD-789" in email.subject and "level 1" in email.subject and "CRITICAL" not in email.subject
    assert f"/support/tickets/{ticket.pk}/" in email.body


def test_level_2_dispatches_again_with_the_wide_radius_and_a_driver_getting_the_offer_is_reassigned(
    django_capture_on_commit_callbacks,
):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        t.shift(timedelta(minutes=10))
        far = online_driver(km=8)  # outside the 5 km radius, inside the 10 km one
        assert unassigned_retry() == 0  # the normal retry does not reach them
        result = check(django_capture_on_commit_callbacks)

        assert result.escalated[2] == 1
        offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert offer.driver_id == far.pk and offer.search_radius_km == 10
        record = record_of(delivery)
        assert (record.escalation_level, record.escalation_status) == (2, "REASSIGNED")
        assert record.resolved_at is None  # an offer, not yet an assignment
        (row,) = [r for r in audit(delivery, "escalation_triggered") if r.details["level"] == 2]
        assert row.details["outcome"] == "offered" and row.details["searchRadiusKm"] == 10
        assert row.details["driverId"] == str(far.pk) and row.details["reason"] == "15_min_unassigned"
        started = audit(delivery, "assignment_started")[-1]
        assert started.details == {"searchRadiusKm": 10.0}

        t.shift(timedelta(seconds=10))
        with django_capture_on_commit_callbacks(execute=True):
            offers.offer_accept(offer_id=offer.pk, driver_id=far.pk, actor=Actor("driver", far.pk))

    record.refresh_from_db()
    assert record.escalation_status == "REASSIGNED" and record.resolved_at is not None
    ticket = SupportTicket.objects.get()
    assert ticket.status == "resolved" and ticket.resolution == "A driver was assigned."
    assert len(mail.outbox) == 1  # level 2 is a retry, not an alert


def test_level_2_finding_nobody_leaves_the_record_for_level_3(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        attempts = record_of(delivery).attempt_count
        t.shift(timedelta(minutes=10))
        check(django_capture_on_commit_callbacks)

    record = record_of(delivery)
    assert (record.escalation_level, record.escalation_status) == (2, "NOTIFIED")
    assert record.attempt_count == attempts + 1
    assert record.resolved_at is None
    (row,) = [r for r in audit(delivery, "escalation_triggered") if r.details["level"] == 2]
    assert row.details["outcome"] == "unassigned" and row.details["failureReason"] == "no_available_drivers"
    notes = list(TicketComment.objects.filter(ticket__delivery=delivery).values_list("body", flat=True))
    assert any("Level 2" in n and "nobody found" in n for n in notes)


def test_level_3_is_critical_urgent_ticket_critical_alert_and_audit(listen, django_capture_on_commit_callbacks):
    live = listen("ops")
    received = []
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery(seller_order_id="ORD-CRIT")
        for minutes in (5, 10, 15):
            t.shift(timedelta(minutes=minutes))
            check(django_capture_on_commit_callbacks)
            received += live.drain()  # drained at once: the channel layer expires old messages

    record = record_of(delivery)
    assert (record.escalation_level, record.escalation_status) == (3, "NOTIFIED")
    assert record.notification_sent_at.isoformat() == "2026-02-01T10:30:00+00:00"
    ticket = SupportTicket.objects.get()
    assert ticket.priority == "urgent" and ticket.status == "open"
    (critical,) = audit(delivery, "escalation_critical")
    assert critical.details["level"] == 3 and critical.details["reason"] == "30_min_unassigned"
    levels = [e["level"] for e in received if e["type"] == "unassigned_order_escalated"]
    assert levels == [1, 2, 3]
    assert [("CRITICAL" in m.subject) for m in mail.outbox] == [False, True]
    assert "level 3" in mail.outbox[1].subject


def test_a_delivery_that_jumped_tiers_goes_straight_to_level_3_and_still_gets_its_ticket(
    listen, django_capture_on_commit_callbacks
):
    live = listen("ops")
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=42))  # the job was down
        result = check(django_capture_on_commit_callbacks)

    assert result.escalated == {1: 0, 2: 0, 3: 1}
    record = record_of(delivery)
    ticket = SupportTicket.objects.get()
    assert record.escalation_level == 3 and record.support_ticket_id == str(ticket.pk)
    assert ticket.priority == "urgent" and ticket.title.endswith("30+ minutes (level 3)")
    triggered = audit(delivery, "escalation_triggered")
    assert [r.details["level"] for r in triggered] == [1, 2]
    assert len(audit(delivery, "escalation_critical")) == 1
    received = live.drain()
    # (the channel layer does not keep the order of events sent in the same instant)
    assert sorted(e["type"] for e in received) == ["support_ticket_created", "unassigned_order_escalated"]
    assert [e["level"] for e in received if e["type"] == "unassigned_order_escalated"] == [3]
    (email,) = mail.outbox  # one alert, the critical one
    assert "CRITICAL" in email.subject


def test_running_the_check_again_changes_nothing(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=6))
        first = check(django_capture_on_commit_callbacks)
        second = check(django_capture_on_commit_callbacks)
        t.shift(timedelta(seconds=30))
        third = check(django_capture_on_commit_callbacks)

    assert first.escalated[1] == 1
    assert second.escalated == third.escalated == {1: 0, 2: 0, 3: 0}
    assert SupportTicket.objects.count() == 1
    assert len(audit(delivery, "escalation_triggered")) == 1
    assert len(mail.outbox) == 1


def test_the_check_finds_a_ready_delivery_that_dispatch_never_recorded(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = DeliveryFactory()  # never dispatched (autoDispatch false)
        t.shift(timedelta(minutes=5, seconds=1))
        result = check(django_capture_on_commit_callbacks)

    assert result.detected == 1 and result.escalated[1] == 1
    record = record_of(delivery)
    assert record.failure_reason == "unassigned"
    assert record.first_attempt_at == delivery.ready_at
    assert record.escalation_level == 1 and record.support_ticket_id


def test_the_check_closes_records_whose_delivery_moved_on_by_another_path(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        # a status change that did not go through the services (e.g. a data fix)
        type(delivery).objects.filter(pk=delivery.pk).update(status="cancelled")
        t.shift(timedelta(seconds=30))
        result = check(django_capture_on_commit_callbacks)

    assert result.closed == 1
    record = record_of(delivery)
    assert record.escalation_status == "CANCELLED" and record.resolved_at is not None
    assert SupportTicket.objects.get().status == "closed"


def test_assignment_resolves_the_record_and_its_ticket(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        driver = online_driver(km=1)
        assert unassigned_retry() == 1
        offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        t.shift(timedelta(seconds=5))
        with django_capture_on_commit_callbacks(execute=True):
            offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
        t.shift(timedelta(minutes=30))
        assert check(django_capture_on_commit_callbacks).escalated == {1: 0, 2: 0, 3: 0}

    record = record_of(delivery)
    assert record.escalation_status == "RESOLVED" and record.resolved_at is not None
    ticket = SupportTicket.objects.get()
    assert ticket.status == "resolved" and ticket.resolved_at is not None
    assert TicketComment.objects.filter(ticket=ticket, kind="system", body__contains="driver was assigned").exists()
    rows = audit(delivery, "support_ticket_updated")
    assert [r.details["action"] for r in rows] == ["resolved"]


def test_cancelling_the_delivery_sets_cancelled_and_closes_its_ticket(ops, django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        t.shift(timedelta(minutes=1))
        r = ops.post(f"/v2/deliveries/{delivery.pk}/cancel", {"reason": "store closed"}, format="json")

    assert r.status_code == 200, r.content
    record = record_of(delivery)
    assert record.escalation_status == "CANCELLED" and record.resolved_at is not None
    ticket = SupportTicket.objects.get()
    assert ticket.status == "closed" and ticket.closed_at is not None
    assert ticket.resolution == "Delivery cancelled."


def test_a_resolved_ticket_is_reopened_when_its_still_unassigned_delivery_goes_critical(
    django_capture_on_commit_callbacks,
):
    agent = SupportUserFactory()
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        ticket = SupportTicket.objects.get()
        ticket_take(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent))
        ticket_resolve(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), resolution="Called the store.")
        t.shift(timedelta(minutes=25))
        check(django_capture_on_commit_callbacks)

    ticket.refresh_from_db()
    assert (ticket.status, ticket.priority, ticket.resolved_at) == ("open", "urgent", None)
    # open again: back in the queue, held by nobody (it stayed with the agent who resolved it)
    assert ticket.assignee_id is None
    assert any(c.body.endswith(f"Reopened: the delivery still has no driver. Unassigned from {agent.get_full_name() or agent.username}.")
               for c in ticket.comments.all())
    assert record_of(delivery).escalation_level == 3
    # the reopen is audited like every ticket action, and the next resolve writes its own note
    assert ticket.resolution == ""
    actions = [(r.details["action"], r.details.get("previousStatus")) for r in audit(delivery, "support_ticket_updated")]
    assert actions == [("taken", None), ("resolved", None), ("reopened", "resolved")]


def test_the_alert_email_goes_out_only_after_commit_and_not_on_rollback(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        kept = stuck_delivery()
        rolled_back = stuck_delivery()
        t.shift(timedelta(minutes=5))
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            try:
                with transaction.atomic():
                    escalation_check()
                    assert mail.outbox == []  # inside the transaction: nothing sent yet
                    raise RuntimeError("roll it all back")
            except RuntimeError:
                pass
        assert callbacks == [] and mail.outbox == []
        assert record_of(rolled_back).escalation_level == 0

        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            escalation_check()
        assert mail.outbox == []
        for callback in callbacks:
            callback()

    assert len(mail.outbox) == 2
    assert {kept.seller_order_id, rolled_back.seller_order_id} == {
        m.subject.split("order ")[1].split(" ")[0] for m in mail.outbox
    }


def test_no_recipients_means_no_email_but_the_event_still_goes_out(settings, listen, django_capture_on_commit_callbacks):
    settings.OPS_ALERT_EMAILS = []
    live = listen("ops")
    with time_machine.travel(T0, tick=False) as t:
        stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
    assert mail.outbox == []
    assert sorted(e["type"] for e in live.drain()) == ["support_ticket_created", "unassigned_order_escalated"]


def test_the_periodic_task_runs_the_same_check(django_capture_on_commit_callbacks):
    assert PERIODIC_TASKS["escalation check"][:2] == ("escalation.check", 30)
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        with django_capture_on_commit_callbacks(execute=True):
            summary = escalation_check_task.delay().get()
    assert summary["escalated"] == {"1": 1, "2": 0, "3": 0}
    assert record_of(delivery).escalation_level == 1


def test_the_check_works_in_bounded_batches_longest_waiting_first(django_capture_on_commit_callbacks):
    with time_machine.travel(T0, tick=False) as t:
        oldest = stuck_delivery()
        t.shift(timedelta(minutes=1))
        newer = [stuck_delivery() for _ in range(3)]
        t.shift(timedelta(minutes=5))
        with django_capture_on_commit_callbacks(execute=True):
            first = escalation_check(batch_size=2)
        assert first.escalated[1] == 2
        assert record_of(oldest).escalation_level == 1
        with django_capture_on_commit_callbacks(execute=True):
            second = escalation_check(batch_size=2)
    assert second.escalated[1] == 2
    assert all(record_of(d).escalation_level == 1 for d in newer)


def test_an_external_helpdesk_can_be_plugged_in(settings, django_capture_on_commit_callbacks):
    settings.SUPPORT_TICKET_BACKEND = "tests.fakes.FakeHelpdesk"
    FakeHelpdesk.calls = []
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        t.shift(timedelta(minutes=25))
        check(django_capture_on_commit_callbacks)
        delivery_cancel(delivery_id=delivery.pk, reason="gave up", actor=Actor.system())

    assert record_of(delivery).support_ticket_id == "HD-1"
    assert not SupportTicket.objects.exists()
    assert FakeHelpdesk.calls[0] == ("open", "high", f"Order {delivery.seller_order_id} unassigned for 5+ minutes")
    assert ("raise", "HD-1", "urgent") in FakeHelpdesk.calls
    assert FakeHelpdesk.calls[-1] == ("close", "HD-1", "closed")


def test_thresholds_come_from_settings(settings, django_capture_on_commit_callbacks):
    settings.ESCALATION_LEVEL1_SECONDS = 60
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(seconds=61))
        check(django_capture_on_commit_callbacks)
    assert record_of(delivery).escalation_level == 1
    (row,) = audit(delivery, "escalation_triggered")
    assert row.details["reason"] == "1_min_unassigned"
    assert SupportTicket.objects.get().title.endswith("1+ minutes")


@pytest.mark.parametrize("how", ["rejected", "expired"])
def test_after_a_level_2_offer_comes_to_nothing_the_next_search_is_as_wide(how, django_capture_on_commit_callbacks):
    """The next candidate was searched within 5 km (a driver 8 km away never got the offer, the
    record said `distance_exceeded`) until the retry job searched 10 km again; and a record whose
    wide offer came to nothing kept saying REASSIGNED, with no driver."""
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        t.shift(timedelta(minutes=10))
        nearer, farther = online_driver(km=7), online_driver(km=8)
        check(django_capture_on_commit_callbacks)
        first = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert first.driver_id == nearer.pk and first.search_radius_km == 10

        with django_capture_on_commit_callbacks(execute=True):
            if how == "rejected":
                offers.offer_reject(offer_id=first.pk, driver_id=nearer.pk, reason="too far",
                                    actor=Actor("driver", nearer.pk))
            else:
                t.shift(timedelta(minutes=1))
                assert offers.offer_expire(offer_id=first.pk)

        second = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert second.driver_id == farther.pk and second.search_radius_km == 10
        assert audit(delivery, "assignment_started")[-1].details == {"searchRadiusKm": 10.0}
        assert record_of(delivery).escalation_status == "REASSIGNED"

        with django_capture_on_commit_callbacks(execute=True):  # nobody left: no driver, NOTIFIED again
            offers.offer_reject(offer_id=second.pk, driver_id=farther.pk, reason="too far",
                                actor=Actor("driver", farther.pk))
        record = record_of(delivery)
        assert (record.escalation_level, record.escalation_status) == (2, "NOTIFIED")
        assert record.failure_reason == "no_available_drivers"


def test_a_5_km_offer_pending_when_level_2_fires_is_followed_by_a_wide_search(django_capture_on_commit_callbacks):
    """Level 2 found the delivery already offered (within 5 km); when that offer was rejected,
    the next candidate was searched within 5 km again until the retry job."""
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery()
        t.shift(timedelta(minutes=5))
        check(django_capture_on_commit_callbacks)
        t.shift(timedelta(minutes=9, seconds=50))
        near = online_driver(km=3)
        with django_capture_on_commit_callbacks(execute=True):
            assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "offered"
        pending = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert pending.driver_id == near.pk and pending.search_radius_km == 5
        far = online_driver(km=8)
        t.shift(timedelta(seconds=10))
        check(django_capture_on_commit_callbacks)
        assert record_of(delivery).escalation_level == 2
        assert audit(delivery, "escalation_triggered")[-1].details["outcome"] == "already_offered"

        with django_capture_on_commit_callbacks(execute=True):
            offers.offer_reject(offer_id=pending.pk, driver_id=near.pk, reason="busy", actor=Actor("driver", near.pk))

        second = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert second.driver_id == far.pk and second.search_radius_km == 10
