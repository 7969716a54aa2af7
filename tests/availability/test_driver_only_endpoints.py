"""What only the driver itself may do (SPEC "REST API": a location by "that driver", offers answered
and deliveries moved by "the assigned driver"): a login that is both staff and a driver acts as
its own driver only; another driver's id is a 404 and changes nothing."""
import pytest

from common.actors import Actor
from dispatch.models import Delivery
from offers.models import DriverOffer
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, OfferFactory, online_driver
from workflows.deliveries import assignment_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_driver():
    """A dispatcher who also drives: staff (ops) and a driver profile on one login."""
    driver = online_driver(km=0.2)
    driver.user.is_staff = True
    driver.user.save(update_fields=["is_staff"])
    return driver


@pytest.fixture
def other():
    return online_driver(km=0.4)


def test_a_staff_driver_posts_no_location_for_another_driver(staff_driver, other):
    before = type(other).objects.values_list("location", "location_recorded_at").get(pk=other.pk)
    r = client_for(staff_driver.user).post(f"/v2/drivers/{other.pk}/location", {"lat": 13.0, "lon": 77.7}, format="json")
    assert_error(r, 404)
    assert type(other).objects.values_list("location", "location_recorded_at").get(pk=other.pk) == before
    own = client_for(staff_driver.user).post(f"/v2/drivers/{staff_driver.pk}/location", {"lat": 13.0, "lon": 77.7}, format="json")
    assert own.status_code == 200 and own.json()["accepted"] is True


@pytest.mark.parametrize("answer", ["accept", "reject"])
def test_a_staff_driver_answers_no_offer_of_another_driver(staff_driver, other, answer):
    offer = OfferFactory(driver=other)
    body = {} if answer == "accept" else {"reason": "too_far"}
    r = client_for(staff_driver.user).post(f"/v2/drivers/{other.pk}/offers/{offer.pk}/{answer}", body, format="json")
    assert_error(r, 404)
    assert DriverOffer.objects.get(pk=offer.pk).status == "PENDING"


def test_a_staff_driver_moves_no_delivery_of_another_driver(staff_driver, other):
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=other.pk, actor=Actor.system())
    r = client_for(staff_driver.user).post(f"/v2/drivers/{other.pk}/deliveries/{delivery.pk}/pickup-started", {}, format="json")
    assert_error(r, 404)
    assert Delivery.objects.get(pk=delivery.pk).status == "assigned"
    r = client_for(staff_driver.user).post(
        f"/v2/drivers/{other.pk}/deliveries/{delivery.pk}/proof", {"kind": "photo"}, format="multipart"
    )
    assert_error(r, 404)
