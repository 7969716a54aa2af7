"""How the outbox rows get written without statements of their own (issue 12): a workflow's
audit and outbox rows in one statement, rendered from the row the workflow holds; a quick step's
outbox row in the step's own statement, its payload rendered by the worker from the row the
step left (the state at the event, not at rendering). Real PostgreSQL, real commits."""
from __future__ import annotations

import logging

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIRequestFactory

from audit.models import DeliveryAuditLog
from audit.services import audit_record
from common.actors import Actor
from common.broadcast import broadcast_on_commit
from dispatch.api.serializers import DeliverySerializer
from dispatch.models import Delivery
from notifications import services
from notifications.models import OutboxEvent
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, IntegrationUserFactory, driver_at_dropoff, online_driver
from tests.notifications.webhook_helpers import endpoint_via_api
from workflows import deliveries as flows
from workflows.unit import unit_of_work

pytestmark = pytest.mark.django_db(transaction=True)


def _api_view(delivery_id):
    request = APIRequestFactory().get("/")
    return dict(DeliverySerializer(Delivery.objects.get(pk=delivery_id), context={"request": request}).data)


def _assigned(merchant):
    delivery = DeliveryFactory(created_by=merchant)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery, driver


def test_a_workflows_audit_and_outbox_rows_go_in_by_one_statement_in_order():
    delivery = DeliveryFactory()
    event = {"type": "delivery_status_changed", "deliveryId": str(delivery.pk), "sellerOrderId": "x",
             "fromStatus": "ready", "status": "picked_up", "driverId": None, "changedAt": "2026-12-02T10:00:00Z"}
    with CaptureQueriesContext(connection) as queries:
        with unit_of_work():
            for kind in ("pickup_started", "pickup_completed"):
                audit_record(delivery=delivery, event_type=kind, actor=Actor.system())
            broadcast_on_commit(["ops"], event)
            broadcast_on_commit(["ops"], {**event, "fromStatus": "picked_up", "status": "in_transit"})
            assert not OutboxEvent.objects.exists() and not DeliveryAuditLog.objects.filter(delivery=delivery).exists()
    writes = [q["sql"] for q in queries.captured_queries if "INSERT INTO" in q["sql"]]
    assert len(writes) == 1, writes
    assert 'INSERT INTO "delivery_audit_logs"' in writes[0] and 'INSERT INTO "notifications_outboxevent"' in writes[0]
    audit = list(DeliveryAuditLog.objects.filter(delivery=delivery).order_by("seq"))
    assert [a.event_type for a in audit] == ["pickup_started", "pickup_completed"]
    outbox = list(OutboxEvent.objects.order_by("seq"))
    assert [e.payload["data"]["change"]["status"] for e in outbox] == ["picked_up", "in_transit"]
    assert all(e.payload["data"]["id"] == str(delivery.pk) and e.delivery_row is None for e in outbox)


def test_a_failed_workflow_writes_neither_its_audit_nor_its_outbox_rows():
    delivery = DeliveryFactory()
    with pytest.raises(RuntimeError), unit_of_work():
        audit_record(delivery=delivery, event_type="pickup_started", actor=Actor.system())
        broadcast_on_commit(["ops"], {"type": "delivery_cancelled", "deliveryId": str(delivery.pk), "sellerOrderId": "x",
                                      "fromStatus": "ready", "reason": "r", "cancelledAt": "2026-12-02T10:00:00Z"})
        raise RuntimeError
    assert not DeliveryAuditLog.objects.filter(delivery=delivery).exists() and not OutboxEvent.objects.exists()


def test_the_flows_payloads_are_rendered_from_the_rows_the_workflows_hold_without_reading_them_again():
    """delivery-completed renders the delivery it holds: no SELECT of the delivery after the
    change, and the payload is what a fresh read shows."""
    merchant = IntegrationUserFactory()
    delivery, driver = _assigned(merchant)
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))
    driver_at_dropoff(driver, delivery)  # the drop-off geofence
    with CaptureQueriesContext(connection) as queries:
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-completed",
                               actor=Actor.for_user(driver.user))
    reads = [q["sql"] for q in queries.captured_queries
             if q["sql"].startswith('SELECT "dispatch_delivery"') or q["sql"].startswith("SELECT d.*")]
    assert reads == []
    event = OutboxEvent.objects.filter(delivery=delivery).order_by("-seq").first()
    assert event.delivery_row is None  # rendered at once
    data = dict(event.payload["data"])
    change = data.pop("change")
    assert change["status"] == "delivered" and data == _api_view(delivery.pk)


def test_a_quick_step_writes_its_outbox_row_in_its_own_statement_and_the_worker_renders_the_state_at_the_event(no_worker):
    merchant = IntegrationUserFactory()
    delivery, driver = _assigned(merchant)
    with CaptureQueriesContext(connection) as queries:
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started", actor=Actor.for_user(driver.user))
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]
    assert 'INSERT INTO notifications_outboxevent' in queries.captured_queries[0]["sql"]
    at_pickup = _api_view(delivery.pk)
    (event,) = OutboxEvent.objects.filter(delivery=delivery, type="delivery.status_changed")
    assert event.delivery_row is not None and set(event.payload["data"]) == {"change"}
    assert event.payload["data"]["change"]["step"] == "pickup_started"
    assert event.owner_id == merchant.pk and event.payload["id"] == event.webhook_id

    # the delivery moves on before the worker renders the event
    flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-completed", actor=Actor.for_user(driver.user))
    assert services.webhooks_fan_out() >= 2
    event.refresh_from_db()
    data = dict(event.payload["data"])
    data.pop("change")
    assert data == at_pickup and data["status"] == "assigned" and data["pickedUpAt"] is None
    assert event.delivery_row is None
    completed = OutboxEvent.objects.filter(delivery=delivery).order_by("-seq").first()
    assert completed.payload["data"]["status"] == "picked_up" and completed.payload["data"]["change"]["fromStatus"] == "assigned"


def test_a_quick_step_that_does_not_apply_writes_no_outbox_row():
    merchant = IntegrationUserFactory()
    delivery, driver = _assigned(merchant)
    before = OutboxEvent.objects.count()
    with pytest.raises(Exception) as refused:  # out of order: the full path says why
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-started", actor=Actor.for_user(driver.user))
    assert type(refused.value).__name__ == "Conflict"
    assert OutboxEvent.objects.count() == before


def test_the_quick_steps_send_their_webhooks_in_order_with_the_payload_of_their_moment(receiver, no_worker):
    """No worker until the walk is over: then every payload is rendered and sent, in order."""
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    delivery, driver = _assigned(merchant)
    views = []
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))
        views.append(_api_view(delivery.pk))
    services.webhooks_deliver_due(max_seconds=20)
    payloads = [r.verified(secret) for r in receiver.requests]
    assert [p["type"] for p in payloads] == ["delivery.assigned"] + ["delivery.status_changed"] * 3
    for payload, view in zip(payloads[1:], views, strict=True):
        data = dict(payload["data"])
        data.pop("change")
        assert data == {**view, "trackingUrl": data["trackingUrl"]}
    assert [p["data"]["change"]["status"] for p in payloads[1:]] == ["assigned", "picked_up", "in_transit"]


def test_an_event_whose_row_cannot_be_rendered_waits_and_does_not_stop_the_others(caplog, no_worker):
    merchant = IntegrationUserFactory()
    broken, driver = _assigned(merchant)
    flows.delivery_advance(delivery_id=broken.pk, driver_id=driver.pk, step="pickup-started", actor=Actor.for_user(driver.user))
    other, other_driver = _assigned(merchant)
    flows.delivery_advance(delivery_id=other.pk, driver_id=other_driver.pk, step="pickup-started",
                           actor=Actor.for_user(other_driver.user))
    OutboxEvent.objects.filter(delivery=broken, delivery_row__isnull=False).update(delivery_row={"delivery": {"id": "not a uuid"}})

    with caplog.at_level(logging.ERROR, logger="notifications.outbox"):
        while services.webhooks_fan_out():
            pass
    stuck = OutboxEvent.objects.get(delivery=broken, type="delivery.status_changed")
    assert stuck.fanned_out_at is None and "could not be rendered" in caplog.text
    assert not OutboxEvent.objects.filter(delivery=other, fanned_out_at__isnull=True).exists()
    done = OutboxEvent.objects.get(delivery=other, type="delivery.status_changed")
    assert done.payload["data"]["status"] == "assigned" and done.delivery_row is None


def _body(n, **extra):
    lat, lon = CITY
    return {"sellerOrderId": f"HELD-{n}", "storeName": "Held Store", "pickupLocation": {"lat": lat, "lon": lon},
            "dropoffLocation": {"lat": lat + 0.02, "lon": lon + 0.01}, "prepTimeMinutes": 0, "autoDispatch": True, **extra}


def _get(owner, delivery_id):
    """The delivery as its owner reads it: GET /v2/deliveries/{id}, JSON."""
    r = client_for(owner).get(f"/v2/deliveries/{delivery_id}")
    assert r.status_code == 200, r.content
    return r.json()


def _last_payload(delivery_id):
    event = OutboxEvent.objects.filter(delivery_id=delivery_id).order_by("-seq").first()
    assert event.delivery_row is None  # rendered when written
    data = dict(event.payload["data"])
    return event.type, data.pop("change"), data


def test_create_and_accept_render_the_row_they_hold_equal_to_a_fresh_read(no_worker):
    """Through the API, as the flow runs: the created (offered) delivery's payload and the
    accepted one's are what the API shows right after, read afresh."""
    merchant = IntegrationUserFactory()
    driver = online_driver(km=0.5)
    r = client_for(merchant).post("/v2/deliveries", _body(1, deliveryFee="9.90", dropoffAddress="2 High St"), format="json")
    assert r.status_code == 201, r.content
    delivery_id = r.json()["id"]
    kind, change, data = _last_payload(delivery_id)
    assert kind == "delivery.created" and data == _get(merchant, delivery_id) and data["currentOfferId"]
    assert data["deliveryFee"] == 9.9 and data["driverId"] is None

    r = client_for(driver.user).post(f"/v2/drivers/{driver.pk}/offers/{data['currentOfferId']}/accept", {}, format="json")
    assert r.status_code == 200, r.content
    kind, change, data = _last_payload(delivery_id)
    assert kind == "delivery.assigned" and change["status"] == "assigned"
    assert data == _get(merchant, delivery_id)
    assert data["assignmentId"] == r.json()["assignmentId"] and data["driverId"] == str(driver.pk)
    assert data["acceptedOfferId"] and data["currentOfferId"] is None and data["offerAcceptanceCount"] == 1


def test_a_delivery_created_with_no_driver_near_renders_the_row_it_holds_too(no_worker):
    merchant = IntegrationUserFactory()
    r = client_for(merchant).post("/v2/deliveries", _body(2), format="json")
    assert r.status_code == 201, r.content
    delivery_id = r.json()["id"]
    for event in OutboxEvent.objects.filter(delivery_id=delivery_id).order_by("seq"):
        data = dict(event.payload["data"])
        data.pop("change")
        assert data == _get(merchant, delivery_id), event.type
