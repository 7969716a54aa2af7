"""A driver sees a delivery's customer (name, phone, address, drop-off point) only while its
own assignment is active; afterwards the delivery stays in its history without them."""
import pytest

from common.actors import Actor
from tests.api import client_for
from tests.factories import DeliveryFactory, driver_at_dropoff, online_driver
from workflows.deliveries import assignment_create, delivery_advance, delivery_reassign
from workflows.offers import offer_accept

pytestmark = pytest.mark.django_db

CUSTOMER = ("customerName", "customerPhone", "dropoffAddress", "dropoffLocation")


def seen_by(driver, delivery):
    client = client_for(driver.user)
    one = client.get(f"/v2/deliveries/{delivery.pk}")
    listed = [d for d in client.get("/v2/deliveries").json()["deliveries"] if d["id"] == str(delivery.pk)]
    assert one.status_code == 200 and listed == [one.json()]
    return one.json()


def test_a_driver_reassigned_away_keeps_the_job_in_its_history_but_not_the_customer():
    first, second = online_driver(km=0.3), online_driver(km=0.6)
    delivery = DeliveryFactory(dropoff_address="12 MG Road", customer_name="Jane Customer")
    assignment_create(delivery_id=delivery.pk, driver_id=first.pk, actor=Actor.system())

    mine = seen_by(first, delivery)
    assert (mine["customerName"], mine["customerPhone"], mine["dropoffAddress"]) == ("Jane Customer", "+15550001234", "12 MG Road")
    assert mine["dropoffLocation"] is not None and mine["driverId"] == str(first.pk)

    _, redispatched = delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor("admin", None))
    assert redispatched.offer.driver_id == second.pk  # the first driver is not offered it again
    offer_accept(offer_id=redispatched.offer.pk, driver_id=second.pk, actor=Actor("driver", second.pk))

    past = seen_by(first, delivery)
    assert {k: past[k] for k in CUSTOMER} == {"customerName": "", "customerPhone": "", "dropoffAddress": "", "dropoffLocation": None}
    assert past["driverId"] is None and past["assignmentId"] is None and past["trackingUrl"] is None
    assert past["status"] == "assigned" and past["storeName"] == delivery.store_name  # the job itself stays
    assert seen_by(second, delivery)["customerName"] == "Jane Customer"


def test_after_the_drop_off_the_customer_leaves_the_drivers_view():
    driver = online_driver()
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed"):
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk))
    done = seen_by(driver, delivery)
    assert done["status"] == "delivered" and done["customerPhone"] == "" and done["dropoffLocation"] is None


def test_ops_and_the_seller_always_see_the_customer(ops, integration_user):
    driver = online_driver()
    delivery = DeliveryFactory(created_by=integration_user)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_reassign(delivery_id=delivery.pk, reason="x", actor=Actor("admin", None))
    assert ops.get(f"/v2/deliveries/{delivery.pk}").json()["customerName"] == "Jane Customer"
    assert client_for(integration_user).get(f"/v2/deliveries/{delivery.pk}").json()["customerPhone"] == "+15550001234"
