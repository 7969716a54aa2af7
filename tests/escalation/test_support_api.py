"""`/v2/support/tickets` for support agents (group `support`) and staff."""

import pytest
from django.utils import timezone

from audit.models import DeliveryAuditLog
from escalation.models import SupportTicket, TicketComment
from tests.api import assert_error, client_for
from tests.factories import DriverFactory, OpsUserFactory, SupportUserFactory
from tests.support_fixtures import ticket_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def support(agent):
    return client_for(agent)


def test_agents_list_the_queue_most_urgent_first_then_oldest(support):
    newer_high = ticket_for(minutes_waiting=6)
    older_high = ticket_for(minutes_waiting=8)
    urgent = ticket_for(minutes_waiting=35)
    done = ticket_for(minutes_waiting=7)
    SupportTicket.objects.filter(pk=done.pk).update(status="resolved", resolved_at=timezone.now(), resolution="ok")

    r = support.get("/v2/support/tickets")

    assert r.status_code == 200, r.content
    body = r.json()
    assert [t["id"] for t in body["tickets"]] == [str(urgent.pk), str(older_high.pk), str(newer_high.pk)]
    assert body["next"] is None
    first = body["tickets"][0]
    assert first["priority"] == "urgent" and first["escalationLevel"] == 3 and first["status"] == "open"
    assert first["sellerOrderId"] == urgent.delivery.seller_order_id and first["assigneeId"] is None
    assert first["createdAt"].endswith("Z")


def test_queue_filters(support, agent):
    mine = ticket_for()
    other = ticket_for(minutes_waiting=20)
    SupportTicket.objects.filter(pk=mine.pk).update(assignee=agent, status="in_progress")

    def ids(query):
        r = support.get(f"/v2/support/tickets?{query}")
        assert r.status_code == 200, r.content
        return [t["id"] for t in r.json()["tickets"]]

    assert ids("mine=true") == [str(mine.pk)]
    assert ids("unassigned=true") == [str(other.pk)]
    assert ids("status=in_progress") == [str(mine.pk)]
    assert ids("escalationLevel=2") == [str(other.pk)]
    assert ids("priority=high") == [str(other.pk), str(mine.pk)]  # waiting longest first
    assert ids("status=closed") == []
    assert_error(support.get("/v2/support/tickets?status=bogus"), 400)
    assert_error(support.get("/v2/support/tickets?zoneId=not-a-uuid"), 400)


def test_a_ticket_shows_its_delivery_record_and_comments(support, agent):
    ticket = ticket_for()
    TicketComment.objects.create(ticket=ticket, author=agent, body="Calling the store", created_at=timezone.now())

    body = support.get(f"/v2/support/tickets/{ticket.pk}").json()

    assert body["id"] == str(ticket.pk)
    assert body["delivery"]["id"] == str(ticket.delivery_id) and body["delivery"]["status"] == "ready"
    assert body["unassignedOrder"]["escalationLevel"] == 1
    assert body["unassignedOrder"]["supportTicketId"] == str(ticket.pk)
    assert [c["body"] for c in body["comments"]] == ["Calling the store"]
    assert body["comments"][0]["authorName"] == "Sam Agent" and body["comments"][0]["kind"] == "comment"
    assert_error(support.get("/v2/support/tickets/7f0c5b8e-2a7e-4f53-9a53-0d0f7e1f0c11"), 404)


def test_agents_comment_on_tickets(support, agent):
    ticket = ticket_for()

    r = support.post(f"/v2/support/tickets/{ticket.pk}/comments", {"body": "Store says 10 more minutes"}, format="json")

    assert r.status_code == 201, r.content
    assert r.json()["body"] == "Store says 10 more minutes" and r.json()["authorId"] == str(agent.pk)
    row = DeliveryAuditLog.objects.get(delivery=ticket.delivery, event_type="support_ticket_updated")
    assert row.details["action"] == "commented" and (row.actor_type, row.actor_id) == ("support", agent.pk)
    assert_error(support.post(f"/v2/support/tickets/{ticket.pk}/comments", {"body": "  "}, format="json"), 400)
    assert_error(support.post(f"/v2/support/tickets/{ticket.pk}/comments", {}, format="json"), 400)


def test_patch_assigns_changes_priority_and_resolves_with_a_note(support, agent):
    ticket = ticket_for()
    colleague = SupportUserFactory()

    r = support.patch(f"/v2/support/tickets/{ticket.pk}", {"assigneeId": str(colleague.pk), "priority": "urgent"}, format="json")
    assert r.status_code == 200, r.content
    assert (r.json()["assigneeId"], r.json()["priority"], r.json()["status"]) == (str(colleague.pk), "urgent", "in_progress")

    body = assert_error(support.patch(f"/v2/support/tickets/{ticket.pk}", {"status": "resolved"}, format="json"), 400)
    assert "resolution" in body["details"]

    r = support.patch(f"/v2/support/tickets/{ticket.pk}", {"status": "resolved", "resolution": "Driver found by phone"}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["status"] == "resolved" and r.json()["resolvedAt"]
    assert r.json()["resolution"] == "Driver found by phone"

    r = support.patch(f"/v2/support/tickets/{ticket.pk}", {"status": "open"}, format="json")  # reopen
    assert r.json()["status"] == "open" and r.json()["resolvedAt"] is None

    support.patch(f"/v2/support/tickets/{ticket.pk}", {"status": "closed", "resolution": "dupe"}, format="json")
    body = assert_error(support.patch(f"/v2/support/tickets/{ticket.pk}", {"status": "open"}, format="json"), 409)
    assert "closed" in body["message"]
    actions = [r.details["action"] for r in DeliveryAuditLog.objects.filter(
        delivery=ticket.delivery, event_type="support_ticket_updated").order_by("timestamp", "seq")]
    assert actions == ["updated", "resolved", "reopened", "closed"]


def test_in_progress_is_always_someones_and_taken_at_is_the_holders(support, agent):
    """A ticket put in progress with nobody on it was "in progress · nobody" (listed among the
    unassigned), and a reassigned one kept its first holder's takenAt (an audit)."""
    import time_machine
    from datetime import timedelta

    ticket = ticket_for()
    url = f"/v2/support/tickets/{ticket.pk}"

    r = support.patch(url, {"status": "in_progress"}, format="json").json()
    assert (r["status"], r["assigneeId"]) == ("in_progress", str(agent.pk)) and r["takenAt"]
    colleague = SupportUserFactory()
    with time_machine.travel(timezone.now() + timedelta(minutes=3)):
        later = support.patch(url, {"assigneeId": str(colleague.pk)}, format="json").json()
    assert later["assigneeId"] == str(colleague.pk) and later["takenAt"] > r["takenAt"]

    released = support.patch(url, {"assigneeId": None}, format="json").json()
    assert (released["status"], released["assigneeId"], released["takenAt"]) == ("open", None, None)
    assert support.get("/v2/support/tickets?unassigned=true&status=in_progress").json()["tickets"] == []

    # in progress with nobody said outright is refused, and changes nothing
    assert "assigneeId" in assert_error(support.patch(url, {"status": "in_progress", "assigneeId": None}, format="json"), 400)["details"]
    support.patch(url, {"assigneeId": str(colleague.pk)}, format="json")
    assert "assigneeId" in assert_error(support.patch(url, {"status": "in_progress", "assigneeId": None}, format="json"), 400)["details"]
    ticket.refresh_from_db()
    assert (ticket.status, ticket.assignee_id) == ("in_progress", colleague.pk)


@pytest.mark.parametrize("payload", [
    {}, {"status": "done"}, {"priority": "asap"}, {"assigneeId": "nope"},
])
def test_patch_rejects_bad_input(support, payload):
    ticket = ticket_for()
    assert_error(support.patch(f"/v2/support/tickets/{ticket.pk}", payload, format="json"), 400)


def test_tickets_can_only_be_assigned_to_support_agents_or_staff(support):
    ticket = ticket_for()
    driver = DriverFactory()
    assert_error(support.patch(f"/v2/support/tickets/{ticket.pk}", {"assigneeId": str(driver.user.pk)}, format="json"), 400)
    staff = OpsUserFactory()
    r = support.patch(f"/v2/support/tickets/{ticket.pk}", {"assigneeId": str(staff.pk)}, format="json")
    assert r.status_code == 200 and r.json()["assigneeId"] == str(staff.pk)
    r = support.patch(f"/v2/support/tickets/{ticket.pk}", {"assigneeId": None}, format="json")
    assert r.status_code == 200 and r.json()["assigneeId"] is None


def test_staff_may_use_the_support_api_but_drivers_and_integrations_may_not(integration, anon, ops):
    ticket = ticket_for()
    assert ops.get("/v2/support/tickets").status_code == 200
    assert ops.get(f"/v2/support/tickets/{ticket.pk}").status_code == 200
    driver_client = client_for(DriverFactory().user)
    for client in (driver_client, integration):
        assert_error(client.get("/v2/support/tickets"), 403)
        assert_error(client.get(f"/v2/support/tickets/{ticket.pk}"), 403)
        assert_error(client.patch(f"/v2/support/tickets/{ticket.pk}", {"priority": "low"}, format="json"), 403)
        assert_error(client.post(f"/v2/support/tickets/{ticket.pk}/comments", {"body": "x"}, format="json"), 403)
    assert_error(anon.get("/v2/support/tickets"), 401)


def _patch(client, ticket, **body):
    return client.patch(f"/v2/support/tickets/{ticket.pk}", body, format="json")


def test_a_closed_ticket_is_final_for_every_field(support, agent):
    """Only a reopen was refused: its note could be blanked, its priority and assignee changed
    (and a take after a cancel's close left it assigned), each with an audit row and an event."""
    ticket = ticket_for()
    assert _patch(support, ticket, status="closed", resolution="duplicate order").status_code == 200
    before = SupportTicket.objects.values().get(pk=ticket.pk)

    for body in ({"resolution": ""}, {"resolution": "another"}, {"priority": "low"},
                 {"assigneeId": str(SupportUserFactory().pk)}, {"status": "open"}):
        message = assert_error(_patch(support, ticket, **body), 409)["message"]
        assert "closed" in message, body

    assert SupportTicket.objects.values().get(pk=ticket.pk) == before
    assert _patch(support, ticket, priority=before["priority"]).status_code == 200  # no change: nothing to refuse


def test_a_closed_ticket_takes_no_comment(support, agent):
    """A comment was the one change a closed ticket still took (201)."""
    ticket = ticket_for()
    assert _patch(support, ticket, status="closed", resolution="duplicate order").status_code == 200
    comments = TicketComment.objects.filter(ticket=ticket).count()

    message = assert_error(support.post(f"/v2/support/tickets/{ticket.pk}/comments", {"body": "late note"}, format="json"),
                           409)["message"]

    assert "closed" in message and TicketComment.objects.filter(ticket=ticket).count() == comments


@pytest.mark.parametrize("finish", [None, "resolved"])
def test_a_ticket_set_back_to_open_is_held_by_nobody(support, agent, finish):
    """It kept its assignee: the queue showed an open ticket someone held, and "unassigned"
    left it out."""
    ticket = ticket_for()
    assert _patch(support, ticket, assigneeId=str(agent.pk)).json()["status"] == "in_progress"
    if finish:
        assert _patch(support, ticket, status=finish, resolution="done").status_code == 200

    body = _patch(support, ticket, status="open").json()

    assert body["status"] == "open" and body["assigneeId"] is None and body["takenAt"] is None
    assert [t["id"] for t in support.get("/v2/support/tickets?unassigned=true").json()["tickets"]] == [str(ticket.pk)]
    reopen = [r.details["changes"] for r in DeliveryAuditLog.objects.filter(delivery=ticket.delivery, event_type="support_ticket_updated")
              if r.details.get("changes", {}).get("status", [None, None])[1] == "open"]
    assert len(reopen) == 1 and reopen[0]["assigneeId"] is None
    # with an assignee named in the same change, that one holds it
    colleague = SupportUserFactory()
    assert _patch(support, ticket, assigneeId=str(agent.pk)).json()["assigneeId"] == str(agent.pk)
    both = _patch(support, ticket, status="open", assigneeId=str(colleague.pk)).json()
    assert (both["status"], both["assigneeId"]) == ("open", str(colleague.pk))


def test_a_resolved_ticket_keeps_its_note_and_a_second_resolve_is_a_409(support, agent):
    ticket = ticket_for()
    assert _patch(support, ticket, status="resolved", resolution="fixed by agent 1").status_code == 200

    assert "resolution" in assert_error(_patch(support, ticket, resolution="   "), 400)["details"]
    assert "already resolved" in assert_error(
        _patch(client_for(SupportUserFactory()), ticket, status="resolved", resolution="fixed by agent 2"), 409)["message"]
    assert _patch(support, ticket, resolution="fixed by agent 1, driver called").status_code == 200  # an edit of the note

    reopened = _patch(support, ticket, status="open").json()
    assert reopened["resolution"] == "" and reopened["status"] == "open"  # the next resolve writes its own
    assert "resolution" in assert_error(_patch(support, ticket, status="resolved"), 400)["details"]
