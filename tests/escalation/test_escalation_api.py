"""`/v2/admin/unassigned-orders`, `.../escalate` and `/v2/admin/escalation/check` (seed: Escalation API)."""
from datetime import timedelta

import pytest
import time_machine
import yaml
from django.core import mail

from audit.models import DeliveryAuditLog
from common.actors import Actor
from workflows.dispatching import delivery_dispatch
from workflows.escalations import escalation_check
from escalation.models import SupportTicket, TicketComment, UnassignedOrder
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, DriverFactory, SupportUserFactory, km_north, online_driver

pytestmark = pytest.mark.django_db

T0 = "2026-02-01T09:55:00Z"
ORDER_KEYS = {
    "id", "deliveryId", "sellerOrderId", "location", "failureReason", "firstAttemptAt", "lastAttemptAt",
    "attemptCount", "escalationLevel", "escalationStatus", "notificationSentAt", "resolvedAt",
}


def stuck_delivery(**kwargs):
    delivery = DeliveryFactory(**kwargs)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    return delivery


def record_of(delivery):
    return UnassignedOrder.objects.get(delivery=delivery)


def test_the_seeds_escalation_flow_end_to_end(integration, ops, settings, django_capture_on_commit_callbacks):
    """Seed E2E "should escalate unassigned orders": a delivery that fails assignment, five
    minutes pass, the check runs, the record is at level 1 with a support ticket."""
    settings.OPS_ALERT_EMAILS = ["ops@example.com"]
    with time_machine.travel(T0, tick=False) as t:
        r = integration.post("/v2/deliveries", {
            "sellerOrderId": "ORD-789", "storeName": "Downtown Market",
            "pickupLocation": {"lat": 12.9, "lon": 77.6}, "dropoffLocation": {"lat": 12.95, "lon": 77.62},
        }, format="json")
        assert r.status_code == 201, r.content
        delivery_id = r.json()["id"]
        t.shift(timedelta(minutes=5))
        with django_capture_on_commit_callbacks(execute=True):
            check = ops.post("/v2/admin/escalation/check")

        assert check.status_code == 200, check.content
        assert check.json()["escalated"] == {"1": 1, "2": 0, "3": 0}
        assert check.json()["checkedAt"] == "2026-02-01T10:00:00Z"
        record = UnassignedOrder.objects.get(delivery_id=delivery_id)
        assert record.escalation_level == 1
        assert record.support_ticket_id
        assert SupportTicket.objects.filter(pk=record.support_ticket_id, delivery_id=delivery_id).exists()

        listed = ops.get("/v2/admin/unassigned-orders").json()
    (order,) = listed["orders"]
    assert set(order) == ORDER_KEYS | {"supportTicketId"}
    assert order == {
        "id": str(record.pk), "deliveryId": delivery_id, "sellerOrderId": "ORD-789",
        "location": {"lat": 12.9, "lon": 77.6}, "failureReason": "no_available_drivers",
        "firstAttemptAt": "2026-02-01T09:55:00Z", "lastAttemptAt": "2026-02-01T09:55:00Z", "attemptCount": 1,
        "escalationLevel": 1, "escalationStatus": "NOTIFIED", "supportTicketId": record.support_ticket_id,
        "notificationSentAt": "2026-02-01T10:00:00Z", "resolvedAt": None,
    }
    assert listed["summary"] == {"total": 1, "byEscalationLevel": {"1": 1}, "byFailureReason": {"no_available_drivers": 1}}
    assert listed["next"] is None
    assert len(mail.outbox) == 1


def test_the_list_shows_open_records_by_default_with_filters_and_a_summary(ops):
    a = stuck_delivery()
    b = stuck_delivery()
    online_driver(km=8)
    c = stuck_delivery()  # someone 8 km away: distance_exceeded
    UnassignedOrder.objects.filter(delivery=b).update(escalation_level=2, escalation_status="NOTIFIED")
    done = stuck_delivery()
    UnassignedOrder.objects.filter(delivery=done).update(resolved_at="2026-01-01T00:00:00Z", escalation_status="CANCELLED")

    body = ops.get("/v2/admin/unassigned-orders").json()
    assert {o["deliveryId"] for o in body["orders"]} == {str(a.pk), str(b.pk), str(c.pk)}
    assert all("supportTicketId" not in o for o in body["orders"])  # optional: absent until there is one
    assert body["summary"] == {
        "total": 3, "byEscalationLevel": {"0": 2, "2": 1},
        "byFailureReason": {"distance_exceeded": 1, "no_available_drivers": 2},
    }

    def ids(query):
        r = ops.get(f"/v2/admin/unassigned-orders?{query}")
        assert r.status_code == 200, r.content
        return {o["deliveryId"] for o in r.json()["orders"]}

    assert ids("escalationLevel=2") == {str(b.pk)}
    assert ids("failureReason=distance_exceeded") == {str(c.pk)}
    assert ids("escalationStatus=NOTIFIED") == {str(b.pk)}
    assert ids("escalationStatus=CANCELLED") == set()  # closed records are not open
    assert ids("state=resolved") == {str(done.pk)}
    assert ids("state=all&escalationStatus=CANCELLED") == {str(done.pk)}
    assert len(ids("state=all")) == 4


def test_the_list_is_paginated_with_next(ops):
    for _ in range(3):
        stuck_delivery()
    first = ops.get("/v2/admin/unassigned-orders?limit=2").json()
    assert len(first["orders"]) == 2 and first["next"]
    assert first["summary"]["total"] == 3
    second = ops.get(first["next"]).json()
    assert len(second["orders"]) == 1 and second["next"] is None
    assert {o["id"] for o in first["orders"]}.isdisjoint({o["id"] for o in second["orders"]})


@pytest.mark.parametrize(
    "query", ["escalationLevel=7", "escalationLevel=-1", "escalationLevel=x", "failureReason=bogus",
              "escalationStatus=bogus", "state=closed", "limit=0"],
)
def test_invalid_filters_are_400(ops, query):
    body = assert_error(ops.get(f"/v2/admin/unassigned-orders?{query}"), 400)
    assert body["details"]


def test_manual_escalation_records_who_did_it_and_the_notes(ops, ops_user, settings, django_capture_on_commit_callbacks):
    settings.OPS_ALERT_EMAILS = ["ops@example.com"]
    with time_machine.travel("2026-02-01T10:05:00Z", tick=False):
        delivery = stuck_delivery()
        record = record_of(delivery)
        with django_capture_on_commit_callbacks(execute=True):
            r = ops.post(
                f"/v2/admin/unassigned-orders/{record.pk}/escalate",
                {"level": 1, "reason": "vip_customer", "notes": "Customer called twice"}, format="json",
            )

    assert r.status_code == 200, r.content
    record.refresh_from_db()
    ticket = SupportTicket.objects.get()
    assert r.json() == {"success": True, "escalatedAt": "2026-02-01T10:05:00Z", "newEscalationLevel": 1,
                        "supportTicketId": str(ticket.pk)}
    assert (record.escalation_level, record.escalation_status) == (1, "NOTIFIED")
    assert record.escalated_by == ops_user
    assert (record.escalation_reason, record.escalation_notes) == ("vip_customer", "Customer called twice")
    assert "Customer called twice" in ticket.description and "vip_customer" in ticket.title
    (row,) = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="escalation_triggered")
    assert (row.actor_type, row.actor_id) == ("admin", ops_user.pk)
    assert row.details["manual"] is True and row.details["notes"] == "Customer called twice"
    assert row.details["reason"] == "vip_customer"
    assert "Customer called twice" in mail.outbox[0].body


def test_manual_escalation_above_an_existing_ticket_notes_it_on_the_ticket(ops, ops_user):
    delivery = stuck_delivery()
    record = record_of(delivery)
    ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate", {"level": 1, "reason": "slow"}, format="json")

    r = ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate",
                 {"level": 3, "reason": "store is calling", "notes": "Offer a refund"}, format="json")

    assert r.status_code == 200, r.content
    assert r.json()["newEscalationLevel"] == 3
    ticket = SupportTicket.objects.get()
    assert ticket.priority == "urgent"
    note = TicketComment.objects.filter(ticket=ticket, body__startswith="Escalated to level 3").get()
    assert ops_user.username in note.body and "Offer a refund" in note.body
    critical = DeliveryAuditLog.objects.get(delivery=delivery, event_type="escalation_critical")
    assert critical.details["notes"] == "Offer a refund" and critical.actor_id == ops_user.pk
    # level 2 happened on the way: the wide-radius search
    level2 = [r for r in DeliveryAuditLog.objects.filter(delivery=delivery, event_type="escalation_triggered")
              if r.details["level"] == 2]
    assert len(level2) == 1 and level2[0].details["searchRadiusKm"] == 10


def test_a_manual_escalation_past_a_ticket_retitles_it_with_the_new_level(ops, ops_user):
    delivery = stuck_delivery(seller_order_id="ORD-L13")
    record = record_of(delivery)
    ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate", {"level": 1, "reason": "slow"}, format="json")
    assert SupportTicket.objects.get().title == "Order ORD-L13 escalated to level 1: slow"

    r = ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate", {"level": 3, "reason": "store is calling"},
                 format="json")

    assert r.status_code == 200, r.content
    ticket = SupportTicket.objects.get()
    assert ticket.title == "Order ORD-L13 escalated to level 3: store is calling"
    history = list(TicketComment.objects.filter(ticket=ticket).order_by("created_at", "seq").values_list("body", flat=True))
    assert f"Escalated to level 3 by {ops_user.username} (from level 1): store is calling" in history
    assert not any("level 1" in body and "to level 3" not in body for body in history[1:])


def test_the_check_retitles_a_ticket_as_the_record_goes_up(settings):
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery(seller_order_id="ORD-L2")
        t.shift(timedelta(minutes=5, seconds=1))
        escalation_check()
        assert SupportTicket.objects.get().title == "Order ORD-L2 unassigned for 5+ minutes"
        t.shift(timedelta(minutes=10))
        escalation_check()

    assert record_of(delivery).escalation_level == 2
    ticket = SupportTicket.objects.get()
    assert ticket.title == "Order ORD-L2 unassigned for 15+ minutes (level 2)"
    assert TicketComment.objects.filter(ticket=ticket, body="Escalated to level 2 (from level 1)").exists()


def test_a_long_seller_order_id_still_gets_its_ticket(settings):
    """A seller order id may be 255 characters: the title (255 too) shortens it. Before, the
    ticket's INSERT failed on every check, and the order never reached support."""
    long_id = "L" * 255
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery(seller_order_id=long_id)
        t.shift(timedelta(minutes=5, seconds=1))
        escalation_check()
        t.shift(timedelta(minutes=10))
        escalation_check()

    assert record_of(delivery).escalation_level == 2
    ticket = SupportTicket.objects.get()
    assert ticket.title == f"Order {'L' * 63}… unassigned for 15+ minutes (level 2)"
    assert long_id in ticket.description or str(delivery.pk) in ticket.description


@pytest.mark.parametrize("level,message", [
    (4, "Escalation level 4 exceeded maximum allowed level"),
    (0, "Escalation level must be between 1 and 3."),
    (-2, "Escalation level must be between 1 and 3."),
])
def test_a_level_outside_1_to_3_is_400(ops, level, message):
    record = record_of(stuck_delivery())
    body = assert_error(ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate",
                                 {"level": level, "reason": "x"}, format="json"), 400)
    assert body["details"] == {"level": [message]}
    record.refresh_from_db()
    assert record.escalation_level == 0


def test_the_schema_documents_the_escalation_level_as_1_to_3(anon, db):
    # Found by schemathesis: `level: 0` was schema-valid but is a 400.
    schema = yaml.safe_load(anon.get("/v2/schema/").content)
    level = schema["components"]["schemas"]["EscalateRequest"]["properties"]["level"]

    assert (level["type"], level["minimum"], level["maximum"]) == ("integer", 1, 3)


@pytest.mark.parametrize("payload", [{"reason": "x"}, {"level": 1}, {"level": "high", "reason": "x"}, {}])
def test_a_malformed_escalation_is_400(ops, payload):
    record = record_of(stuck_delivery())
    assert_error(ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate", payload, format="json"), 400)


def test_escalating_to_a_level_not_above_the_current_one_is_409(ops):
    record = record_of(stuck_delivery())
    UnassignedOrder.objects.filter(pk=record.pk).update(escalation_level=2)
    for level in (1, 2):
        body = assert_error(ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate",
                                     {"level": level, "reason": "x"}, format="json"), 409)
        assert "level 2" in body["message"]


def test_escalating_a_closed_record_is_409(ops):
    delivery = stuck_delivery()
    record = record_of(delivery)
    ops.post(f"/v2/deliveries/{delivery.pk}/cancel", {"reason": "x"}, format="json")
    assert_error(ops.post(f"/v2/admin/unassigned-orders/{record.pk}/escalate", {"level": 1, "reason": "x"}, format="json"), 409)


def test_escalating_an_unknown_record_is_404(ops):
    assert_error(ops.post("/v2/admin/unassigned-orders/7f0c5b8e-2a7e-4f53-9a53-0d0f7e1f0c11/escalate",
                          {"level": 1, "reason": "x"}, format="json"), 404)


def test_the_escalate_endpoint_honours_idempotency_keys(ops):
    record = record_of(stuck_delivery())
    url = f"/v2/admin/unassigned-orders/{record.pk}/escalate"
    first = ops.post(url, {"level": 1, "reason": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="esc-1")
    again = ops.post(url, {"level": 1, "reason": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="esc-1")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert SupportTicket.objects.count() == 1


@pytest.mark.parametrize("path,method", [
    ("/v2/admin/unassigned-orders", "get"),
    ("/v2/admin/unassigned-orders/7f0c5b8e-2a7e-4f53-9a53-0d0f7e1f0c11/escalate", "post"),
    ("/v2/admin/escalation/check", "post"),
])
def test_drivers_integrations_and_support_agents_may_not_use_the_admin_api(path, method, integration, anon):
    driver = DriverFactory()
    agent = SupportUserFactory()
    for client in (client_for(driver.user), integration, client_for(agent)):
        assert_error(getattr(client, method)(path, {"level": 1, "reason": "x"}, format="json"), 403)
    assert_error(getattr(anon, method)(path, {"level": 1, "reason": "x"}, format="json"), 401)


def test_the_check_endpoint_reports_what_it_did(ops):
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        stuck_delivery()
        DeliveryFactory(pickup_location=km_north(3))  # never dispatched
        t.shift(timedelta(minutes=31))
        body = ops.post("/v2/admin/escalation/check").json()
    assert body == {"success": True, "checkedAt": "2026-02-01T10:31:00Z", "detected": 1,
                    "escalated": {"1": 0, "2": 0, "3": 2}, "closed": 0, "skipped": 0, "failed": 0}
