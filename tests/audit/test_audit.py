import pytest
from django.db import ProgrammingError, transaction

from audit.models import DeliveryAuditLog
from audit.services import audit_record
from common.actors import Actor
from workflows.deliveries import assignment_create, delivery_cancel
from tests.api import assert_error

pytestmark = pytest.mark.django_db


def test_audit_trail_lists_events_in_order_with_a_summary(ops, delivery, driver):
    audit_record(delivery=delivery, event_type="created", actor=Actor.system(), details={"sellerOrderId": "X"})
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_cancel(delivery_id=delivery.pk, reason="test", actor=Actor("admin", None))

    body = ops.get(f"/v2/admin/deliveries/{delivery.pk}/audit").json()

    assert body["deliveryId"] == str(delivery.pk)
    assert [e["eventType"] for e in body["events"]] == ["created", "driver_assigned", "delivery_cancelled"]
    first = body["events"][0]
    assert set(first) == {"id", "timestamp", "eventType", "actorType", "details", "version"}  # the seed's `actorId?`: absent, not null
    assert first["version"] == 1 and first["details"] == {"sellerOrderId": "X"}
    assert body["summary"] == {
        "totalEvents": 3,
        "byEventType": {"created": 1, "driver_assigned": 1, "delivery_cancelled": 1},
        "byActorType": {"system": 2, "admin": 1},
    }


def test_an_event_by_a_person_names_them(ops, ops_user, delivery):
    audit_record(delivery=delivery, event_type="escalation_triggered", actor=Actor.for_user(ops_user), details={})

    (event,) = ops.get(f"/v2/admin/deliveries/{delivery.pk}/audit").json()["events"]

    assert event["actorId"] == str(ops_user.pk) and event["actorType"] == "admin"


def test_audit_trail_filters_by_event_type(ops, delivery, driver):
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_cancel(delivery_id=delivery.pk, reason="test", actor=Actor.system())

    body = ops.get(f"/v2/admin/deliveries/{delivery.pk}/audit?eventType=delivery_cancelled").json()

    assert [e["eventType"] for e in body["events"]] == ["delivery_cancelled"]
    assert body["summary"]["totalEvents"] == 1
    assert_error(ops.get(f"/v2/admin/deliveries/{delivery.pk}/audit?eventType=nonsense"), 400)


def test_audit_trail_is_for_ops_only(integration, driver_client, delivery, ops):
    assert_error(integration.get(f"/v2/admin/deliveries/{delivery.pk}/audit"), 403)
    assert_error(driver_client.get(f"/v2/admin/deliveries/{delivery.pk}/audit"), 403)
    assert_error(ops.get("/v2/admin/deliveries/00000000-0000-0000-0000-000000000000/audit"), 404)


def test_the_database_refuses_to_update_or_delete_audit_rows(delivery):
    row = audit_record(delivery=delivery, event_type="created", actor=Actor.system())

    with pytest.raises(ProgrammingError), transaction.atomic():
        DeliveryAuditLog.objects.filter(pk=row.pk).update(event_type="delivery_completed")
    with pytest.raises(ProgrammingError), transaction.atomic():
        DeliveryAuditLog.objects.filter(pk=row.pk).delete()

    assert DeliveryAuditLog.objects.get(pk=row.pk).event_type == "created"


def test_the_admin_shows_the_audit_log_read_only(admin_client, delivery):
    row = audit_record(delivery=delivery, event_type="created", actor=Actor.system())

    assert admin_client.get("/admin/audit/deliveryauditlog/").status_code == 200
    page = admin_client.get(f"/admin/audit/deliveryauditlog/{row.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.post(f"/admin/audit/deliveryauditlog/{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert DeliveryAuditLog.objects.filter(pk=row.pk).exists()
