"""Shared steps of the webhook tests: an endpoint made through the API (its secret as shown
once), a delivery walked through its life by the real workflows."""
from __future__ import annotations

from common.actors import Actor
from notifications import services
from notifications.models import WebhookMessage
from tests.api import client_for
from tests.factories import DeliveryFactory, driver_at_dropoff, online_driver
from workflows import deliveries as flows


STATUS_EVENTS = ("delivery.created", "delivery.assigned", "delivery.status_changed")


def endpoint_via_api(user, url, events=STATUS_EVENTS) -> tuple[str, str]:
    """(endpoint id, secret). By default the status events (not the ETA updates, which follow
    each assignment and step)."""
    response = client_for(user).post("/v2/webhooks", {"url": url, "events": list(events)}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["secret"].startswith("whsec_")
    return body["id"], body["secret"]


def delivery_walk(owner, *, steps=("pickup-started", "pickup-completed", "delivery-started", "delivery-completed")):
    """A delivery of `owner`, assigned by ops to a driver who takes it through `steps`."""
    delivery = DeliveryFactory(created_by=owner)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in steps:
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))
    return delivery, driver


def sweep() -> int:
    return services.webhooks_deliver_due(max_seconds=20)


def messages_of(delivery):
    return list(WebhookMessage.objects.filter(delivery_id=delivery.pk).select_related("event").order_by("event__seq"))

