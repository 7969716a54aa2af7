"""A change that waited for another's locks is stamped after it (common.db.locked_now): the
times and the audit trail follow the order the changes were made in. The time was read before
the locks: under contention an assignment ended before it started, a delivery was "cancelled,
then picked up", a ticket "resolved" before the "taken" it followed (the races audit).

Deterministic (tests.concurrency.behind_lock): the second change reads the clock and waits for a
lock; only then does the first change run and commit."""
import pytest

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Assignment, Delivery
from escalation import tickets
from escalation.models import SupportTicket
from offers.models import DriverOffer
from tests.concurrency import behind_lock
from tests.factories import DeliveryFactory, OpsUserFactory, online_driver
from workflows import deliveries as flows
from workflows import offers
from workflows.dispatching import delivery_dispatch

pytestmark = pytest.mark.django_db(transaction=True)


def _lock(model, pk):
    return lambda: model.objects.select_for_update().get(pk=pk)


def _audit(delivery):
    return list(DeliveryAuditLog.objects.filter(delivery_id=delivery.pk).order_by("timestamp").values_list("event_type", flat=True))


def test_a_cancel_that_waited_for_an_accept_is_stamped_after_it():
    driver = online_driver()
    delivery = DeliveryFactory()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    behind_lock(
        hold=_lock(DriverOffer, offer.pk),  # the cancel waits for the offer (its first lock)
        call=lambda: flows.delivery_cancel(delivery_id=delivery.pk, reason="ops", actor=Actor.system()),
        while_blocked=lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk)),
    )

    delivery = Delivery.objects.get(pk=delivery.pk)
    assignment = Assignment.objects.get(delivery=delivery)
    assert delivery.status == "cancelled" and assignment.status == "cancelled"
    assert assignment.ended_at > assignment.created_at
    assert delivery.cancelled_at > delivery.assigned_at
    events = _audit(delivery)
    assert events.index("delivery_cancelled") > events.index("driver_assigned")


def test_a_step_that_waited_for_the_step_before_it_is_stamped_after_it():
    """Two steps sent together (pickup-started and pickup-completed): the second, one
    statement, waited for the first's lock with a time read before it."""
    driver = online_driver()
    delivery = DeliveryFactory()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    actor = Actor.for_user(driver.user)

    behind_lock(
        hold=_lock(Delivery, delivery.pk),
        call=lambda: flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-completed", actor=actor),
        while_blocked=lambda: flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started", actor=actor),
    )

    delivery = Delivery.objects.get(pk=delivery.pk)
    assert delivery.status == "picked_up"
    assert delivery.picked_up_at > delivery.pickup_started_at
    events = _audit(delivery)
    assert events.index("pickup_completed") > events.index("pickup_started")


def test_a_seller_cancel_that_waited_for_a_pickup_is_stamped_after_it():
    driver = online_driver()
    delivery = DeliveryFactory()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    actor = Actor.for_user(driver.user)
    flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started", actor=actor)

    behind_lock(
        hold=_lock(Delivery, delivery.pk),
        call=lambda: flows.delivery_cancel(delivery_id=delivery.pk, reason="seller", actor=Actor.system()),
        while_blocked=lambda: flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-completed", actor=actor),
    )

    delivery = Delivery.objects.get(pk=delivery.pk)
    assert delivery.status == "cancelled" and delivery.cancelled_at > delivery.picked_up_at
    assert Assignment.objects.get(delivery=delivery).ended_at > delivery.picked_up_at
    events = _audit(delivery)
    assert events.index("delivery_cancelled") > events.index("pickup_completed")


def test_a_ticket_resolved_by_an_accept_that_waited_for_an_agents_take_is_stamped_after_it():
    delivery = DeliveryFactory()
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    from escalation.models import UnassignedOrder
    from workflows.escalations import unassigned_escalate

    ops = OpsUserFactory()
    record = UnassignedOrder.objects.get(delivery=delivery)
    unassigned_escalate(record_id=record.pk, level=3, reason="VIP", notes="", actor=Actor.for_user(ops), user=ops)
    ticket = SupportTicket.objects.get(delivery=delivery)
    agent = OpsUserFactory()
    driver = online_driver()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    def take():
        tickets.ticket_take(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent))

    behind_lock(
        hold=_lock(SupportTicket, ticket.pk),  # the accept resolves the ticket: it waits for its lock
        call=lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk)),
        while_blocked=take,
    )

    ticket = SupportTicket.objects.get(pk=ticket.pk)
    assert ticket.status == "resolved" and ticket.resolved_at > ticket.taken_at
    actions = [d["action"] for d in DeliveryAuditLog.objects.filter(delivery_id=delivery.pk, event_type="support_ticket_updated")
               .order_by("timestamp").values_list("details", flat=True)]
    assert actions.index("resolved") > actions.index("taken")


def test_a_one_statement_step_that_waited_on_a_row_changed_after_its_time_takes_the_locked_path():
    """The step's time is read before its statement: a row another writer changed while the
    statement waited for its lock (PostgreSQL checks the conditions again on the row it then
    finds) is left to the locked path, which stamps the step after that change."""
    from django.utils import timezone

    driver = online_driver()
    delivery = DeliveryFactory()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    touched = {}

    def touch():
        touched["at"] = timezone.now()
        Delivery.objects.filter(pk=delivery.pk).update(updated_at=touched["at"])

    behind_lock(
        hold=_lock(Delivery, delivery.pk),
        call=lambda: flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started",
                                            actor=Actor.for_user(driver.user)),
        while_blocked=touch,
    )

    assert Delivery.objects.get(pk=delivery.pk).pickup_started_at > touched["at"]


def test_a_support_agents_cancel_that_waited_for_an_accept_is_stamped_after_it():
    """The ticket's cancel read its time before the delivery's locks and handed it down."""
    from escalation.models import UnassignedOrder
    from workflows.escalations import ticket_cancel_delivery, unassigned_escalate

    delivery = DeliveryFactory()
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    ops = OpsUserFactory()
    unassigned_escalate(record_id=UnassignedOrder.objects.get(delivery=delivery).pk, level=3, reason="VIP", notes="",
                        actor=Actor.for_user(ops), user=ops)
    ticket = SupportTicket.objects.get(delivery=delivery)
    driver = online_driver()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    behind_lock(
        hold=_lock(DriverOffer, offer.pk),
        call=lambda: ticket_cancel_delivery(ticket_id=ticket.pk, user=ops, actor=Actor.for_user(ops), reason="customer asked"),
        while_blocked=lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk)),
    )

    delivery = Delivery.objects.get(pk=delivery.pk)
    assignment = Assignment.objects.get(delivery=delivery)
    assert delivery.status == "cancelled" and assignment.ended_at > assignment.created_at
    assert delivery.cancelled_at > delivery.assigned_at


@pytest.mark.parametrize("how", ["offer_create", "delivery_dispatch"])
def test_an_ops_offer_that_waited_for_the_delivery_is_stamped_after_its_last_change(how):
    from django.utils import timezone

    driver = online_driver()
    delivery = DeliveryFactory()
    touched = {}

    def touch():  # a change of the delivery committed while the offer waited for its lock
        touched["at"] = timezone.now()
        Delivery.objects.filter(pk=delivery.pk).update(updated_at=touched["at"])

    def offer():
        if how == "offer_create":
            return offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        return delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system(), strict=True)

    behind_lock(hold=_lock(Delivery, delivery.pk), call=offer, while_blocked=touch)

    made = DriverOffer.objects.get(delivery=delivery)
    assert made.created_at > touched["at"]
