"""The support agents' server-rendered views at `/support/` (Django test client)."""

import pytest
from django.test import Client
from django.utils.html import escape
from django.utils import timezone

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Delivery
from escalation.models import SupportTicket, TicketComment, UnassignedOrder
from offers.models import DriverOffer
from tests.factories import (
    CITY, DriverFactory, IntegrationUserFactory, OpsUserFactory, SupportUserFactory, ZoneFactory, online_driver,
)
from tests.support_fixtures import ticket_for
from workflows.deliveries import delivery_cancel

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(agent):
    c = Client()
    c.force_login(agent)
    return c


def login(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


def test_the_support_views_need_a_login(client):
    ticket = ticket_for()
    for url in ("/support/", f"/support/tickets/{ticket.pk}/"):
        r = client.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/support/login/?next=")
    r = client.post(f"/support/tickets/{ticket.pk}/take")
    assert r.status_code == 302 and "/support/login/" in r["Location"]
    assert SupportTicket.objects.get().assignee is None


def test_a_support_agent_without_staff_logs_in_and_sees_the_queue(client):
    agent = SupportUserFactory(username="night-shift")
    agent.set_password("pw-123456")
    agent.save()
    assert not agent.is_staff

    r = client.post("/support/login/?next=/support/", {"username": "night-shift", "password": "pw-123456"})

    assert r.status_code == 302 and r["Location"] == "/support/"
    assert client.get("/support/").status_code == 200
    assert client.get("/admin/").status_code == 302  # the ops console stays closed to them


def test_the_support_pages_are_not_kept_by_a_cache_or_the_back_button(web):
    """They show customers' names and phones; they were sent without Cache-Control."""
    ticket = ticket_for()
    for url in ("/support/", f"/support/tickets/{ticket.pk}/"):
        r = web.get(url)
        assert r.status_code == 200
        assert {"no-cache", "no-store", "must-revalidate", "private"} <= {v.strip() for v in r["Cache-Control"].split(",")}


def test_drivers_and_integrations_are_forbidden_and_staff_are_welcome():
    ticket = ticket_for()
    for user in (DriverFactory().user, IntegrationUserFactory()):
        c = login(user)
        assert c.get("/support/").status_code == 403
        assert c.get(f"/support/tickets/{ticket.pk}/").status_code == 403
        assert c.post(f"/support/tickets/{ticket.pk}/take").status_code == 403
    assert SupportTicket.objects.get().assignee is None


def test_only_an_agent_signs_in_and_anyone_else_signed_in_is_told_why_with_a_way_out():
    """A plain user signed in at /support/login/ and was then shown a bare "403 Forbidden"
    (console audit)."""
    from tests.factories import UserFactory

    plain = UserFactory(username="plain")
    c = Client()
    r = c.post("/support/login/", {"username": "plain", "password": "pw-123456"})
    assert r.status_code == 200 and "_auth_user_id" not in c.session
    assert b"not a support agent&#x27;s: sign in with a support account" in r.content
    bad = c.post("/support/login/", {"username": "plain", "password": "wrong"})
    assert b"Please enter a correct username and password" in bad.content

    c = login(plain)  # (signed in elsewhere, say the admin's login)
    page = c.get("/support/")
    assert page.status_code == 403 and b"which is not a support agent's account" in page.content
    assert b'action="/support/logout/"' in page.content and b"data-live-socket" not in page.content
    form = c.get("/support/login/")
    assert form.status_code == 200 and b"which is not a support agent's account" in form.content

    agent = SupportUserFactory(username="agent")
    c = Client()
    r = c.post("/support/login/", {"username": "agent", "password": "pw-123456"})
    assert r.status_code == 302 and r["Location"] == "/support/"
    assert c.get("/support/login/")["Location"] == "/support/"  # signed in: straight to the queue
    assert str(agent.pk) == c.session["_auth_user_id"]


def test_an_action_on_a_ticket_that_does_not_exist_says_so_on_the_queue(web):
    """It redirected to the ticket's page, a 404, and the message was lost."""
    r = web.post("/support/tickets/00000000-0000-0000-0000-000000000000/take", follow=True)

    assert r.status_code == 200 and r.redirect_chain[-1][0] == "/support/"
    assert b"Ticket not found." in r.content
    assert login(OpsUserFactory()).get("/support/").status_code == 200


def test_a_viewer_reads_the_support_views_but_changes_nothing():
    from django.contrib.auth.models import Group

    from common.roles import VIEWER_GROUP

    ticket = ticket_for()
    viewer = OpsUserFactory()
    viewer.groups.add(Group.objects.get_or_create(name=VIEWER_GROUP)[0])
    c = login(viewer)
    assert c.get("/support/").status_code == 200
    assert c.get(f"/support/tickets/{ticket.pk}/").status_code == 200
    assert c.post(f"/support/tickets/{ticket.pk}/take").status_code == 403
    assert SupportTicket.objects.get().assignee is None
    # ... and is shown no buttons it would only get a 403 from
    page = c.get(f"/support/tickets/{ticket.pk}/").content.decode()
    assert 'id="read-only"' in page
    assert not any(f'id="action-{a}"' in page for a in ("take", "redispatch", "cancel", "resolve")) and "Add comment" not in page
    agent_page = login(SupportUserFactory()).get(f"/support/tickets/{ticket.pk}/").content.decode()
    assert 'id="action-take"' in agent_page and 'id="read-only"' not in agent_page


def test_the_queue_lists_tickets_by_urgency_and_age_and_hooks_up_the_live_socket(web):
    high = ticket_for(minutes_waiting=6, seller_order_id="ORD-HIGH")
    urgent = ticket_for(minutes_waiting=40, seller_order_id="ORD-URGENT")
    older_high = ticket_for(minutes_waiting=9, seller_order_id="ORD-OLDER")

    r = web.get("/support/")

    assert r.status_code == 200
    html = r.content.decode()
    assert html.index("ORD-URGENT") < html.index("ORD-OLDER") < html.index("ORD-HIGH")
    assert f'href="/support/tickets/{urgent.pk}/"' in html and str(high.pk) in html and str(older_high.pk) in html
    assert 'data-live-socket="/ws/support/"' in html
    assert "escalation/support.js" in html
    assert 'id="queue-table" data-live-region' in html

    partial = web.get("/support/", HTTP_X_REQUESTED_WITH="support-live")
    assert partial.status_code == 200
    assert partial.content.decode().lstrip().startswith('<div id="queue-table" data-live-region>')
    assert b"<html" not in partial.content


def test_queue_filters_status_priority_zone_level_and_mine(web, agent):
    zone = ZoneFactory(name="Downtown", bbox=(CITY[1] - 0.05, CITY[0] - 0.05, CITY[1] + 0.05, CITY[0] + 0.05))
    in_zone = ticket_for(seller_order_id="ORD-ZONE")
    Delivery.objects.filter(pk=in_zone.delivery_id).update(zone=zone)
    urgent = ticket_for(minutes_waiting=31, seller_order_id="ORD-L3")
    mine = ticket_for(seller_order_id="ORD-MINE")
    SupportTicket.objects.filter(pk=mine.pk).update(assignee=agent, status="in_progress")
    done = ticket_for(seller_order_id="ORD-DONE")
    SupportTicket.objects.filter(pk=done.pk).update(status="resolved", resolved_at=timezone.now(), resolution="ok")

    def orders(query):
        r = web.get(f"/support/?{query}")
        assert r.status_code == 200
        return {o for o in ("ORD-ZONE", "ORD-L3", "ORD-MINE", "ORD-DONE") if o in r.content.decode()}

    assert orders("") == {"ORD-ZONE", "ORD-L3", "ORD-MINE"}
    assert orders("status=resolved") == {"ORD-DONE"}
    assert orders("status=all") == {"ORD-ZONE", "ORD-L3", "ORD-MINE", "ORD-DONE"}
    assert orders("priority=urgent") == {"ORD-L3"}
    assert orders(f"zone={zone.pk}") == {"ORD-ZONE"}
    assert orders("level=3") == {"ORD-L3"}
    assert orders("mine=on") == {"ORD-MINE"}
    assert orders("level=9&zone=nope") == {"ORD-ZONE", "ORD-L3", "ORD-MINE"}  # bad filters are ignored
    assert orders("status=bogus&mine=on") == {"ORD-MINE"}  # ... and the good ones still apply (all were dropped)
    assert urgent.priority == "urgent"


def test_the_ticket_page_shows_the_delivery_its_map_record_timeline_and_comments(web, agent):
    online_driver(km=7)  # in the wide radius: drawn on the map
    ticket = ticket_for(seller_order_id="ORD-PAGE", store_name="Night Owl Pizza")
    TicketComment.objects.create(ticket=ticket, author=agent, body="Rang the store", created_at=timezone.now())

    r = web.get(f"/support/tickets/{ticket.pk}/")

    assert r.status_code == 200
    html = r.content.decode()
    for text in ("ORD-PAGE", "Night Owl Pizza", ticket.title, "Rang the store", "escalation_triggered",
                 "assignment_started", "distance_exceeded", 'id="pickup-map"', "class=\"pt pickup\"",
                 "class=\"pt driver available\"", "Take ticket", "Redispatch (wide radius)", "Cancel delivery",
                 "Resolve", f'data-live-match="{ticket.pk} {ticket.delivery_id}"'):
        assert text in html, text
    assert web.get("/support/tickets/7f0c5b8e-2a7e-4f53-9a53-0d0f7e1f0c11/").status_code == 404


def test_the_ticket_page_isolates_what_the_seller_wrote_and_polls_while_live(web, settings):
    """A customer name ending in an RLO read the phone number after it backwards ("Marco
    765432174393+"; an audit). And the page re-reads its sections every
    SUPPORT_TICKET_REFRESH_SECONDS: the support socket carries no offer events."""
    ticket = ticket_for(seller_order_id="ORD-RLO", store_name="Pizza \u202e Roma", customer_name="Marco \u202e",
                        customer_phone="+393471234567", dropoff_address="Via \u202e 1")

    html = web.get(f"/support/tickets/{ticket.pk}/").content.decode()

    assert '<bdi>Marco \u202e</bdi> <bdi dir="ltr">+393471234567</bdi>' in html
    assert "<bdi>Pizza \u202e Roma</bdi>" in html and "<bdi>Via \u202e 1</bdi>" in html
    assert 'data-live-poll="10000"' in html
    settings.SUPPORT_TICKET_REFRESH_SECONDS = 0
    assert 'data-live-poll="0"' in web.get(f"/support/tickets/{ticket.pk}/").content.decode()
    settings.SUPPORT_TICKET_REFRESH_SECONDS = 10
    delivery_cancel(delivery_id=ticket.delivery_id, reason="shop shut", actor=Actor.system())  # (closes the ticket too)
    assert 'data-live-poll="0"' in web.get(f"/support/tickets/{ticket.pk}/").content.decode()  # nothing more to come


def test_the_wait_stops_counting_once_the_delivery_is_no_longer_waiting(web):
    """The queue's "Waiting" and the page's "Ready since" counted on after the delivery was
    cancelled or assigned (an audit: a closed ticket "7 minutes" and counting)."""
    import time_machine
    from datetime import timedelta

    ticket = ticket_for(minutes_waiting=6, seller_order_id="ORD-WAIT")
    delivery_cancel(delivery_id=ticket.delivery_id, reason="shop shut", actor=Actor.system())

    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        queue = web.get("/support/?status=all").content.decode()
        page = web.get(f"/support/tickets/{ticket.pk}/").content.decode()

    assert "6\xa0minutes (cancelled)" in queue
    assert "waited 6\xa0minutes, then cancelled" in page


def test_taking_a_ticket(web, agent):
    ticket = ticket_for()

    r = web.post(f"/support/tickets/{ticket.pk}/take", follow=True)

    assert r.status_code == 200 and b"You have taken this ticket." in r.content
    ticket.refresh_from_db()
    assert (ticket.assignee, ticket.status) == (agent, "in_progress") and ticket.taken_at
    row = DeliveryAuditLog.objects.get(delivery=ticket.delivery, event_type="support_ticket_updated")
    assert row.details["action"] == "taken" and (row.actor_type, row.actor_id) == ("support", agent.pk)
    assert TicketComment.objects.filter(ticket=ticket, kind="system", body="Taken by Sam Agent.").exists()
    assert f'data-ticket-id="{ticket.pk}"'.encode() in web.get("/support/?mine=on").content


def test_commenting(web, agent):
    ticket = ticket_for()
    r = web.post(f"/support/tickets/{ticket.pk}/comment", {"body": "Store closes at 23:00"}, follow=True)
    assert b"Comment added." in r.content and b"Store closes at 23:00" in r.content
    assert TicketComment.objects.get(ticket=ticket, kind="comment").author == agent

    r = web.post(f"/support/tickets/{ticket.pk}/comment", {"body": ""}, follow=True)
    assert b"This field is required." in r.content
    assert TicketComment.objects.filter(ticket=ticket, kind="comment").count() == 1


def test_a_closed_ticket_page_offers_no_comment_box_and_a_posted_comment_is_refused(web, agent):
    from escalation.tickets import ticket_update

    ticket = ticket_for()
    ticket_update(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), status="closed", resolution="Duplicate")

    page = web.get(f"/support/tickets/{ticket.pk}/").content.decode()
    assert "it takes no more comments" in page and "Add comment" not in page
    r = web.post(f"/support/tickets/{ticket.pk}/comment", {"body": "late note"}, follow=True)
    assert b"a closed ticket is final" in r.content
    assert not TicketComment.objects.filter(ticket=ticket, kind="comment").exists()


def test_redispatching_searches_the_wide_radius(web, agent, settings):
    ticket = ticket_for()
    far = online_driver(km=8)

    r = web.post(f"/support/tickets/{ticket.pk}/redispatch", follow=True)

    assert b"Dispatched again with the wide radius." in r.content
    offer = DriverOffer.objects.get(delivery=ticket.delivery, status="PENDING")
    assert offer.driver_id == far.pk and offer.search_radius_km == settings.DISPATCH_WIDE_RADIUS_KM
    started = DeliveryAuditLog.objects.filter(delivery=ticket.delivery, event_type="assignment_started").last()
    assert started.details == {"searchRadiusKm": 10.0} and started.actor_type == "support"
    row = DeliveryAuditLog.objects.get(delivery=ticket.delivery, event_type="support_ticket_updated")
    assert row.details["action"] == "redispatched" and row.details["driverId"] == str(far.pk)

    assert f"pending with <bdi>{escape(far.name)}</bdi>".encode() in r.content
    assert b"Redispatch (wide radius)" not in r.content  # no second search while an offer is out
    again = web.post(f"/support/tickets/{ticket.pk}/redispatch", follow=True)
    assert b"already has a pending offer" in again.content


def test_a_closed_ticket_redispatches_nothing(web, agent):
    """A closed ticket refused comments, yet its redispatch ran a 10 km search and noted the
    outcome on it (audit): closed is final."""
    from escalation.tickets import ticket_update

    ticket = ticket_for()
    online_driver(km=8)
    ticket_update(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), status="closed", resolution="Duplicate")
    notes = TicketComment.objects.filter(ticket=ticket).count()
    assert b'id="action-redispatch"' not in web.get(f"/support/tickets/{ticket.pk}/").content

    r = web.post(f"/support/tickets/{ticket.pk}/redispatch", follow=True)

    assert b"a closed ticket is final" in r.content
    assert not DriverOffer.objects.filter(delivery=ticket.delivery).exists()
    assert not DeliveryAuditLog.objects.filter(delivery=ticket.delivery, event_type="assignment_started",
                                               actor_type="support").exists()
    assert TicketComment.objects.filter(ticket=ticket).count() == notes


def test_redispatching_when_nobody_is_near_says_so(web):
    ticket = ticket_for()
    r = web.post(f"/support/tickets/{ticket.pk}/redispatch", follow=True)
    assert b"No driver found (no_available_drivers)." in r.content


def test_cancelling_the_delivery_from_the_ticket(web, agent):
    ticket = ticket_for()

    r = web.post(f"/support/tickets/{ticket.pk}/cancel-delivery", {"reason": "Store closed"}, follow=True)

    assert b"The delivery is cancelled and the ticket closed." in r.content
    ticket.refresh_from_db()
    assert ticket.status == "closed" and ticket.resolution == "Delivery cancelled by Sam Agent: Store closed"
    delivery = Delivery.objects.get(pk=ticket.delivery_id)
    assert delivery.status == "cancelled" and delivery.cancellation_reason == "Store closed"
    assert UnassignedOrder.objects.get(delivery=delivery).escalation_status == "CANCELLED"
    cancelled = DeliveryAuditLog.objects.get(delivery=delivery, event_type="delivery_cancelled")
    assert (cancelled.actor_type, cancelled.actor_id) == ("support", agent.pk)
    # once, by the agent: the cancel also closed the ticket "automatically" (actor system), with
    # its own note, audit row and event
    ticket_rows = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="support_ticket_updated")
    assert [(r.details["action"], r.actor_type) for r in ticket_rows] == [("delivery_cancelled", "support")]
    assert [c.body for c in TicketComment.objects.filter(ticket=ticket, kind="system")
            if "cancelled" in c.body.lower()] == ["Delivery cancelled by Sam Agent: Store closed"]

    again = web.post(f"/support/tickets/{ticket.pk}/cancel-delivery", {"reason": "x"}, follow=True)
    assert b"can no longer be cancelled" in again.content


def test_resolving_needs_a_note(web, agent):
    ticket = ticket_for()

    r = web.post(f"/support/tickets/{ticket.pk}/resolve", {"resolution": ""}, follow=True)
    assert b"This field is required." in r.content
    ticket.refresh_from_db()
    assert ticket.status == "open"

    r = web.post(f"/support/tickets/{ticket.pk}/resolve", {"resolution": "Driver found by phone"}, follow=True)
    assert b"Ticket resolved." in r.content
    ticket.refresh_from_db()
    assert ticket.status == "resolved" and ticket.resolution == "Driver found by phone"
    row = DeliveryAuditLog.objects.filter(delivery=ticket.delivery, event_type="support_ticket_updated").last()
    assert row.details["action"] == "resolved" and row.actor_id == agent.pk

    r = web.post(f"/support/tickets/{ticket.pk}/take", follow=True)
    assert b"it can no longer be taken" in r.content


def test_actions_only_accept_post(web):
    ticket = ticket_for()
    for action in ("take", "comment", "redispatch", "cancel-delivery", "resolve"):
        assert web.get(f"/support/tickets/{ticket.pk}/{action}").status_code == 405


def test_admin_lists_unassigned_orders_and_tickets_and_escalates_through_the_service(admin_client, admin_user):
    ticket = ticket_for()
    record = ticket.unassigned_order
    for url in ("/admin/escalation/unassignedorder/", "/admin/escalation/unassignedorder/?escalation_level=1&open=yes",
                "/admin/escalation/unassignedorder/?failure_reason=no_available_drivers&escalation_status=NOTIFIED",
                f"/admin/escalation/unassignedorder/{record.pk}/change/", "/admin/escalation/supportticket/",
                f"/admin/escalation/supportticket/{ticket.pk}/change/"):
        assert admin_client.get(url).status_code == 200, url

    form = admin_client.post("/admin/escalation/unassignedorder/",
                             {"action": "escalate", "_selected_action": [str(record.pk)]})
    assert form.status_code == 200 and b"Escalate unassigned orders" in form.content
    r = admin_client.post("/admin/escalation/unassignedorder/", {
        "action": "escalate", "_selected_action": [str(record.pk)], "apply": "1",
        "level": "3", "reason": "vip", "notes": "call the store",
    }, follow=True)

    assert r.status_code == 200 and b"Escalated 1 unassigned order." in r.content
    record.refresh_from_db()
    assert record.escalation_level == 3 and record.escalated_by == admin_user
    assert record.escalation_notes == "call the store"
    ticket.refresh_from_db()
    assert ticket.priority == "urgent"
    page = admin_client.get(f"/admin/escalation/supportticket/{ticket.pk}/change/")
    assert b"Escalated to level 3" in page.content  # comments inline

    again = admin_client.post("/admin/escalation/unassignedorder/", {
        "action": "escalate", "_selected_action": [str(record.pk)], "apply": "1", "level": "2", "reason": "x",
    }, follow=True)
    assert b"already at escalation level 3" in again.content


def test_the_unassigned_orders_admin_lists_open_records_by_default(admin_client):
    open_record = ticket_for().unassigned_order
    cancelled = ticket_for().unassigned_order
    delivery_cancel(delivery_id=cancelled.delivery_id, reason="customer left", actor=Actor.system())
    resolved = ticket_for().unassigned_order
    UnassignedOrder.objects.filter(pk=resolved.pk).update(resolved_at=timezone.now(), escalation_status="RESOLVED")

    def listed(query=""):
        page = admin_client.get(f"/admin/escalation/unassignedorder/{query}")
        assert page.status_code == 200
        return set(page.context["cl"].result_list.values_list("pk", flat=True))

    assert listed() == {open_record.pk}
    assert listed("?open=yes") == {open_record.pk}
    assert listed("?open=no") == {cancelled.pk, resolved.pk}
    assert listed("?open=all") == {open_record.pk, cancelled.pk, resolved.pk}


def test_cancelling_from_a_closed_ticket_keeps_its_resolution(web, agent):
    """A closed ticket is final: the cancel replaced its resolution (and sent a `closed` event)."""
    from escalation.tickets import ticket_update

    ticket = ticket_for()
    ticket_update(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), status="closed",
                  resolution="Duplicate of another order")

    web.post(f"/support/tickets/{ticket.pk}/cancel-delivery", {"reason": "Store closed"}, follow=True)

    ticket.refresh_from_db()
    assert (ticket.status, ticket.resolution) == ("closed", "Duplicate of another order")
    assert Delivery.objects.get(pk=ticket.delivery_id).status == "cancelled"
    assert TicketComment.objects.filter(ticket=ticket, body="Delivery cancelled by Sam Agent: Store closed").exists()


def test_cancelling_from_a_resolved_ticket_keeps_the_agents_note_before_the_cancel(web, agent):
    """The cancel replaced the resolution: the agent's note was left only in the audit trail."""
    from escalation.tickets import ticket_resolve

    ticket = ticket_for()
    ticket_resolve(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), resolution="Customer agreed to wait")

    web.post(f"/support/tickets/{ticket.pk}/cancel-delivery", {"reason": "Store closed"}, follow=True)

    ticket.refresh_from_db()
    assert (ticket.status, ticket.resolution) == ("closed", "Customer agreed to wait\nDelivery cancelled by Sam Agent: Store closed")


def test_head_is_answered_like_get_on_the_support_pages(web):
    ticket = ticket_for()
    for url in ("/support/", f"/support/tickets/{ticket.pk}/"):
        head, get = web.head(url), web.get(url)
        assert head.status_code == get.status_code == 200
        assert head.content == b""


def test_a_ticket_closed_while_its_redispatch_runs_keeps_nothing_of_it(agent, monkeypatch):
    """The closed check read the ticket before the dispatch: a close committed in between let
    the search and its note through. Checked again under the ticket's lock, the dispatch rolls back."""
    from common.exceptions import Conflict
    from escalation import selectors
    from escalation.tickets import ticket_update
    from workflows import escalations

    ticket = ticket_for()
    online_driver(km=8)
    read = selectors.ticket_delivery_id

    def then_closed(**kwargs):
        delivery_id = read(**kwargs)
        ticket_update(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent), status="closed", resolution="Duplicate")
        return delivery_id

    monkeypatch.setattr(selectors, "ticket_delivery_id", then_closed)
    with pytest.raises(Conflict, match="closed ticket is final"):
        escalations.ticket_redispatch(ticket_id=ticket.pk, user=agent, actor=Actor.for_user(agent))
    assert not DriverOffer.objects.filter(delivery=ticket.delivery).exists()
