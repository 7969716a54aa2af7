"""A change form writes the fields it changed, nothing else (common.admin.ChangedFieldsOnlyAdmin).

Django's admin saved the whole row as the request had read it: a driver-page save put back
the availability a `resume`/`end-shift` had just changed, and a crafted POST to a page of
read-only fields (a delivery) wrote the delivery back over a concurrent cancel."""
import pytest
from django.contrib.gis.geos import Point

from availability.models import DriverAvailability
from common.actors import Actor
from dispatch.models import Delivery, DeliveryStatus
from tests.concurrency import behind_lock
from tests.factories import DeliveryFactory, DriverFactory
from tests.zones.test_zones_admin import form_data
from workflows.deliveries import delivery_cancel
from workflows.drivers import availability_end_shift


def _page(admin_client, url):
    return url, form_data(admin_client.get(url))


@pytest.mark.django_db(transaction=True)
def test_a_driver_page_saved_while_the_driver_ends_the_shift_keeps_the_shift_ended(admin_client):
    driver = DriverFactory(availability=DriverAvailability.AVAILABLE, vehicle="Honda Civic, Blue",
                           home_location=Point(30.55, 11.45, srid=4326))
    url, data = _page(admin_client, f"/admin/availability/driver/{driver.pk}/change/")
    data["vehicle"] = "Vespa, Red"

    answer = behind_lock(
        lambda: availability_end_shift(driver_id=driver.pk, actor=Actor("driver", driver.pk)),
        lambda: admin_client.post(url, data),
    )

    assert answer.status_code == 302
    driver.refresh_from_db()
    assert (driver.vehicle, driver.availability) == ("Vespa, Red", DriverAvailability.SHIFT_ENDED)


@pytest.mark.django_db(transaction=True)
def test_a_post_to_a_delivery_page_writes_nothing_over_a_concurrent_cancel(admin_client):
    delivery = DeliveryFactory()
    url = f"/admin/dispatch/delivery/{delivery.pk}/change/"
    data = {**form_data(admin_client.get(url)), "_save": "Save"}
    before = Delivery.objects.get(pk=delivery.pk).updated_at

    answer = behind_lock(
        lambda: delivery_cancel(delivery_id=delivery.pk, reason="customer called", actor=Actor.system()),
        lambda: admin_client.post(url, data),
    )

    assert answer.status_code in (200, 302)
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.CANCELLED and delivery.updated_at >= before


@pytest.mark.django_db
def test_a_new_vehicle_type_saved_on_the_page_brings_its_capacity(admin_client):
    driver = DriverFactory(vehicle_type="walking", home_location=Point(30.55, 11.45, srid=4326))
    assert driver.capacity == 1
    url, data = _page(admin_client, f"/admin/availability/driver/{driver.pk}/change/")
    data["vehicle_type"] = "car"

    assert admin_client.post(url, data).status_code == 302
    driver.refresh_from_db()
    assert (driver.vehicle_type, driver.capacity) == ("car", 3)
