import pytest

from availability.models import Driver
from common.models import ApiToken
from common.tokens import token_digest
from tests.api import assert_error, client_for
from tests.factories import DriverFactory

pytestmark = pytest.mark.django_db

NEW_DRIVER = {"name": "John Doe", "phone": "+1 555 123 4567", "vehicle": "Honda Civic, Blue"}


def test_ops_creates_a_driver_who_starts_offline_with_a_token_shown_once(ops):
    r = ops.post("/v2/drivers", {**NEW_DRIVER, "homeLocation": {"lat": 12.9, "lon": 77.6}}, format="json")

    assert r.status_code == 201, r.content
    body = r.json()
    assert body["availability"] == "offline"
    assert body["homeLocation"] == {"lat": 12.9, "lon": 77.6}
    driver = Driver.objects.get(pk=body["id"])
    stored = ApiToken.objects.get(user=driver.user)  # only its hash is kept
    assert stored.digest == token_digest(body["apiToken"]) and body["apiToken"] not in (stored.digest, stored.prefix)
    # the token is not shown again
    again = ops.get(f"/v2/drivers/{body['id']}").json()
    assert "apiToken" not in again
    assert again["name"] == "John Doe"


def test_the_new_token_authenticates_the_driver_as_itself(ops):
    body = ops.post("/v2/drivers", NEW_DRIVER, format="json").json()
    me = client_for(Driver.objects.get(pk=body["id"]).user)

    r = me.get(f"/v2/drivers/{body['id']}")

    assert r.status_code == 200
    assert r.json()["id"] == body["id"]


def test_a_taken_username_is_a_conflict(ops):
    assert ops.post("/v2/drivers", {**NEW_DRIVER, "username": "johnny"}, format="json").status_code == 201
    assert_error(ops.post("/v2/drivers", {**NEW_DRIVER, "username": "johnny"}, format="json"), 409)
    assert Driver.objects.count() == 1


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"name": ""}, "name"),
        ({"phone": "call me"}, "phone"),
        ({"phone": "12"}, "phone"),
        ({"vehicleType": "rocket"}, "vehicleType"),
        ({"homeLocation": {"lat": 91, "lon": 0}}, "homeLocation"),
        ({"homeLocation": "12.9,77.6"}, "homeLocation"),
        ({"username": "a b"}, "username"),
    ],
)
def test_invalid_driver_input_is_a_400_naming_the_field(ops, patch, field):
    body = assert_error(ops.post("/v2/drivers", {**NEW_DRIVER, **patch}, format="json"), 400)
    assert field in body["details"]
    assert Driver.objects.count() == 0


def test_only_ops_create_or_list_drivers(integration, driver_client):
    assert_error(integration.post("/v2/drivers", NEW_DRIVER, format="json"), 403)
    assert_error(driver_client.post("/v2/drivers", NEW_DRIVER, format="json"), 403)
    assert_error(integration.get("/v2/drivers"), 403)
    assert_error(driver_client.get("/v2/drivers"), 403)


def test_a_driver_reading_another_driver_gets_404(driver_client):
    other = DriverFactory()
    assert_error(driver_client.get(f"/v2/drivers/{other.pk}"), 404)


def test_an_integration_cannot_read_drivers(integration, driver):
    assert_error(integration.get(f"/v2/drivers/{driver.pk}"), 403)


def test_listing_drivers_filters_by_availability(ops):
    DriverFactory.create_batch(2, availability="available")
    DriverFactory(availability="on_break")

    r = ops.get("/v2/drivers?availability=on_break")

    assert r.status_code == 200
    assert [d["availability"] for d in r.json()["drivers"]] == ["on_break"]
    assert r.json()["next"] is None
    assert_error(ops.get("/v2/drivers?availability=sleeping"), 400)


def test_driver_representation_uses_camel_case_and_lat_lon(ops, driver):
    body = ops.get(f"/v2/drivers/{driver.pk}").json()
    assert set(body) >= {"id", "name", "phone", "vehicle", "vehicleType", "rating", "availability", "location", "createdAt"}
    assert set(body["location"]) == {"lat", "lon", "accuracyMeters", "speed", "heading", "recordedAt"}
    assert body["location"]["recordedAt"].endswith("Z")
