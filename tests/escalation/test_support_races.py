"""Two agents on one ticket at the same instant (real transactions, `tests.concurrency`)."""
import pytest
from django.db import transaction
from django.test import Client

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Delivery
from escalation import tickets
from escalation.models import SupportTicket, TicketComment
from tests.concurrency import behind_lock
from tests.factories import SupportUserFactory
from tests.support_fixtures import ticket_for
from workflows.deliveries import delivery_cancel

pytestmark = pytest.mark.django_db(transaction=True)


def login(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


def test_a_resolve_waits_for_the_delivery_before_it_locks_the_ticket():
    """A cancel locks the delivery, then the ticket. The resolve took the ticket, then waited
    for the delivery (its audit row's key): the two deadlocked, one of them a 503. Now, while
    the resolve waits for the delivery, the ticket is free for the cancel to take."""
    from django.db import DatabaseError

    ticket, agent = ticket_for(), SupportUserFactory()
    seen = {}

    def ticket_free():
        try:
            with transaction.atomic():
                SupportTicket.objects.select_for_update(nowait=True).filter(pk=ticket.pk).first()
            seen["ticket free"] = True
        except DatabaseError:
            seen["ticket free"] = False

    answer = behind_lock(
        lambda: Delivery.objects.select_for_update().filter(pk=ticket.delivery_id).first(),
        lambda: tickets.ticket_resolve(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), resolution="Called"),
        while_blocked=ticket_free,
    )

    assert seen == {"ticket free": True} and answer.status == "resolved"


def test_resolving_while_the_delivery_is_cancelled_waits_and_then_says_the_ticket_is_closed():
    ticket, agent = ticket_for(), SupportUserFactory()

    def cancel():
        delivery_cancel(delivery_id=ticket.delivery_id, reason="Store closed", actor=Actor.system())

    page = behind_lock(cancel, lambda: login(agent).post(
        f"/support/tickets/{ticket.pk}/resolve", {"resolution": "Called the store"}, follow=True))

    assert page.status_code == 200 and b"Ticket is already closed." in page.content
    assert Delivery.objects.get(pk=ticket.delivery_id).status == "cancelled"
    assert SupportTicket.objects.get(pk=ticket.pk).status == "closed"


def test_a_take_that_waited_for_another_agents_take_names_whom_it_took_over_from():
    """After waiting for the lock, the take read the assignee the other agent had just replaced
    (a join PostgreSQL does not re-read): "Taken by B." without "(over from A)"."""
    ticket = ticket_for()
    first = SupportUserFactory(first_name="Ana", last_name="First")
    second = SupportUserFactory(first_name="Ben", last_name="Second")

    behind_lock(
        lambda: tickets.ticket_take(ticket_id=ticket.pk, user=first, actor=Actor.for_user(first)),
        lambda: tickets.ticket_take(ticket_id=ticket.pk, user=second, actor=Actor.for_user(second)),
    )

    assert SupportTicket.objects.get(pk=ticket.pk).assignee_id == second.pk
    assert TicketComment.objects.filter(ticket=ticket, body="Taken by Ben Second (over from Ana First).").exists()
    last = DeliveryAuditLog.objects.filter(delivery_id=ticket.delivery_id, details__action="taken").order_by("-seq").first()
    assert last.details["previousAssigneeId"] == str(first.pk)


def test_a_take_from_a_page_that_showed_nobody_does_not_take_over_from_an_agent_who_took_it_since():
    ticket = ticket_for()
    first = SupportUserFactory(first_name="Ana", last_name="First")
    second = SupportUserFactory(first_name="Ben", last_name="Second")
    web = login(second)
    page = web.get(f"/support/tickets/{ticket.pk}/").content.decode()
    assert 'name="assignee" value=""' in page and "Take ticket" in page
    tickets.ticket_take(ticket_id=ticket.pk, user=first, actor=Actor.for_user(first))

    r = web.post(f"/support/tickets/{ticket.pk}/take", {"assignee": ""}, follow=True)

    assert b"Ana First took this ticket meanwhile; reload the page to take it over." in r.content
    assert SupportTicket.objects.get(pk=ticket.pk).assignee_id == first.pk
    # the reloaded page offers the take-over, which then goes through
    assert f'name="assignee" value="{first.pk}"' in r.content.decode() and "Take over from Ana First" in r.content.decode()
    r = web.post(f"/support/tickets/{ticket.pk}/take", {"assignee": str(first.pk)}, follow=True)
    assert b"You have taken this ticket." in r.content
    assert SupportTicket.objects.get(pk=ticket.pk).assignee_id == second.pk


def test_a_take_from_a_page_that_showed_an_agent_who_has_since_let_go_takes_it():
    """`ticket.assignee` was None and naming it raised (a 500)."""
    ticket = ticket_for()
    first, second = SupportUserFactory(), SupportUserFactory()
    tickets.ticket_take(ticket_id=ticket.pk, user=first, actor=Actor.for_user(first))
    SupportTicket.objects.filter(pk=ticket.pk).update(assignee=None, status="open")

    r = login(second).post(f"/support/tickets/{ticket.pk}/take", {"assignee": str(first.pk)}, follow=True)

    assert r.status_code == 200 and b"You have taken this ticket." in r.content
    assert SupportTicket.objects.get(pk=ticket.pk).assignee_id == second.pk
