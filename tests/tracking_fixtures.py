"""Deliveries brought to a given status through the real services, and the driver who carries
them; shared by the customer tracking tests (status, rating, page)."""
from django.utils import timezone

from common.actors import Actor
from dispatch.models import Delivery
from workflows.deliveries import assignment_create, delivery_advance, delivery_cancel
from tests.factories import DeliveryFactory, DriverFactory, driver_at_dropoff, km_north

STEPS_TO = {
    "assigned": [],
    "picked_up": ["pickup-started", "pickup-completed"],
    "in_transit": ["pickup-started", "pickup-completed", "delivery-started"],
    "delivered": ["pickup-started", "pickup-completed", "delivery-started", "delivery-completed"],
    "failed": ["delivery-failed"],
}


def john(**kwargs):
    """A driver 2 km north of the city centre with a fresh, 12 m fix."""
    defaults = dict(
        name="John Quincy Smith", phone="+1 (555) 867-5309", vehicle="Honda Civic, Blue", rating=4.8,
        location=km_north(2), location_accuracy_m=12.0, location_recorded_at=timezone.now(),
    )
    return DriverFactory(**{**defaults, **kwargs})


def delivery_in(status: str, *, driver=None, **kwargs) -> Delivery:
    """A delivery brought to `status` through the real services."""
    delivery = DeliveryFactory(**kwargs)
    if status == "ready":
        return delivery
    if status == "cancelled":
        delivery_cancel(delivery_id=delivery.pk, reason="customer changed their mind", actor=Actor.system())
        return Delivery.objects.get(pk=delivery.pk)
    driver = driver or john()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in STEPS_TO[status]:
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        delivery_advance(
            delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk),
            reason="nobody home" if step == "delivery-failed" else "",
        )
    return Delivery.objects.get(pk=delivery.pk)
