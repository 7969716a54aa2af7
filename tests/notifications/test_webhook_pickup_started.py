"""Pickup started changes no status and emits no live event, yet merchants get a
`delivery.status_changed` for it (issue 14): written by the step's workflow in the step's
transaction, received by a real HTTP receiver on 127.0.0.1 that verifies the Standard Webhooks
signature, exactly once, before pickup-completed's."""
from __future__ import annotations

import pytest
from django.db import transaction

from common.actors import Actor
from common.errors import iso
from common.exceptions import Conflict
from dispatch.models import Delivery
from notifications.models import MessageStatus, OutboxEvent
from tests.api import client_for
from tests.factories import DeliveryFactory, IntegrationUserFactory, online_driver
from tests.notifications.webhook_helpers import endpoint_via_api, messages_of
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)


def _assigned(merchant):
    delivery = DeliveryFactory(created_by=merchant)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery, driver


def _step(driver, delivery, step):
    """The driver's app calling the API (pickup-started takes the one-statement path)."""
    r = client_for(driver.user).post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/{step}", {}, format="json")
    assert r.status_code == 200, (step, r.content)
    return r.json()


def test_pickup_started_sends_one_status_changed_webhook_before_pickup_completed(receiver):
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    delivery, driver = _assigned(merchant)
    assert [r.verified(secret)["type"] for r in receiver.requests] == ["delivery.assigned"]

    started = _step(driver, delivery, "pickup-started")
    delivery.refresh_from_db()
    assert delivery.status == "assigned" and delivery.pickup_started_at is not None

    payloads = [r.verified(secret) for r in receiver.requests]
    assert [p["type"] for p in payloads] == ["delivery.assigned", "delivery.status_changed"]
    pickup = payloads[1]
    assert pickup["data"]["change"] == {
        "step": "pickup_started", "fromStatus": "assigned", "status": "assigned", "driverId": str(driver.pk),
        "changedAt": iso(delivery.pickup_started_at), "pickupStartedAt": iso(delivery.pickup_started_at),
    }
    # the delivery as the API shows it after the step, plus the change
    assert {k: v for k, v in pickup["data"].items() if k != "change"} == {**started, "trackingUrl": pickup["data"]["trackingUrl"]}
    assert pickup["data"]["pickupStartedAt"] == iso(delivery.pickup_started_at)
    assert pickup["id"] == receiver.requests[1].headers["webhook-id"]

    # a repeated pickup-started is out of order: refused, and no second webhook
    r = client_for(driver.user).post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/pickup-started", {}, format="json")
    assert r.status_code == 409, r.content
    with pytest.raises(Conflict):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started",
                               actor=Actor.for_user(driver.user))

    _step(driver, delivery, "pickup-completed")
    payloads = [r.verified(secret) for r in receiver.requests]
    changes = [p["data"]["change"] for p in payloads if p["type"] == "delivery.status_changed"]
    assert [c.get("step") for c in changes] == ["pickup_started", None]  # exactly one, and first
    assert [(c["fromStatus"], c["status"]) for c in changes] == [("assigned", "assigned"), ("assigned", "picked_up")]
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 3
    messages = messages_of(delivery)  # per delivery in outbox order
    assert [m.event.payload["data"]["change"].get("step") for m in messages] == [None, "pickup_started", None]
    assert all(m.status == MessageStatus.DELIVERED for m in messages)


def test_pickup_started_by_the_full_path_is_told_too(receiver):
    """With a reason the step skips the one-statement path: the locked workflow writes the row."""
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    delivery, driver = _assigned(merchant)
    flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started",
                           actor=Actor.for_user(driver.user), reason="at the counter")
    (event,) = OutboxEvent.objects.filter(delivery=delivery, type="delivery.status_changed")
    assert event.payload["data"]["change"]["step"] == "pickup_started"
    assert event.payload["data"]["change"]["reason"] == "at the counter"  # as a status change carries it
    assert event.payload["data"]["status"] == "assigned"
    assert [r.verified(secret)["data"]["change"].get("step") for r in receiver.requests] == [None, "pickup_started"]


def test_a_pickup_started_rolled_back_sends_nothing(receiver):
    merchant = IntegrationUserFactory()
    endpoint_via_api(merchant, receiver.url)
    delivery, driver = _assigned(merchant)

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started",
                                   actor=Actor.for_user(driver.user))
            assert OutboxEvent.objects.filter(delivery=delivery, type="delivery.status_changed").count() == 1
            raise RuntimeError("the caller's transaction rolls back")
    assert not OutboxEvent.objects.filter(delivery=delivery, type="delivery.status_changed").exists()
    assert Delivery.objects.get(pk=delivery.pk).pickup_started_at is None
    assert len(receiver.requests) == 1  # the assignment's only
