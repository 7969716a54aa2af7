"""Proof of delivery: the policy a delivery carries, and the customer's handoff code
(docs/dispatch.md, "Proof of delivery")."""
import pytest
from django.core.exceptions import ValidationError

from audit.models import DeliveryAuditLog
from common.actors import Actor
from common.exceptions import Conflict, InvalidInput
from dispatch.apps import check_default_proof_policy
from dispatch.models import Delivery
from tests.api import assert_error, client_for
from tests.concurrency import race
from tests.dispatch.test_deliveries_api import new_delivery
from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory, box, driver_at_dropoff, point
from workflows.deliveries import assignment_create, delivery_advance
from zones.services import zone_create, zone_update

pytestmark = pytest.mark.django_db


def in_transit(delivery, driver):
    """In transit with `driver`, who is at the drop-off (the geofence is tests/dispatch/test_geofence.py's)."""
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for name in ("pickup-started", "pickup-completed", "delivery-started"):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=name, actor=Actor.system())
    driver_at_dropoff(driver, delivery)
    return delivery


def complete(client, driver, delivery, **body):
    return client.post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/delivery-completed", body, format="json")


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10_000:04d}"


def keys_of(value) -> set:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


@pytest.fixture
def coded(integration_user, driver):
    """A delivery with proofRequired code, in transit with `driver`."""
    return in_transit(DeliveryFactory(created_by=integration_user, proof_required="code"), driver)


# ------------------------------------------------------------------------ the policy


def test_a_delivery_asks_for_no_proof_unless_told(integration):
    body = integration.post("/v2/deliveries", new_delivery(), format="json").json()

    assert body["proofRequired"] == "none"
    assert Delivery.objects.get(pk=body["id"]).proof_required == "none"


def test_an_integration_asks_for_the_customer_code(integration):
    r = integration.post("/v2/deliveries", new_delivery(proofRequired="code"), format="json")

    assert r.status_code == 201, r.content
    assert r.json()["proofRequired"] == "code"
    assert "handoffCode" not in r.json()


@pytest.mark.parametrize("value", ["selfie", "CODE", "Photo", "", 1, None, ["code"]])
def test_an_unknown_policy_is_refused_naming_the_field(integration, value):
    body = assert_error(integration.post("/v2/deliveries", new_delivery(proofRequired=value), format="json"), 400)

    assert "proofRequired" in body["details"]
    assert not Delivery.objects.exists()


def test_the_zone_policy_applies_when_none_is_given_and_an_explicit_one_wins(integration):
    ZoneFactory(proof_required="code", bbox=(77.0, 12.5, 78.0, 13.5))

    from_zone = integration.post("/v2/deliveries", new_delivery(sellerOrderId="A"), format="json").json()
    explicit = integration.post("/v2/deliveries", new_delivery(sellerOrderId="B", proofRequired="none"), format="json").json()

    assert from_zone["proofRequired"] == "code"
    assert explicit["proofRequired"] == "none"


def test_the_setting_applies_outside_zones_and_in_zones_without_a_policy(integration, settings):
    settings.DEFAULT_PROOF_POLICY = "code"
    ZoneFactory(proof_required="", bbox=(77.0, 12.5, 78.0, 13.5))

    body = integration.post("/v2/deliveries", new_delivery(), format="json").json()

    assert body["zoneId"] is not None
    assert body["proofRequired"] == "code"


# --------------------------------------------------------------- who sees the code


def test_the_customer_sees_the_handoff_code_while_the_delivery_is_open(anon, coded, driver, driver_client):
    url = f"/v2/orders/{coded.seller_order_id}/delivery-status?token={coded.tracking_token}"
    assert anon.get(url).json()["handoffCode"] == coded.handoff_code
    page = anon.get(f"/track/{coded.pk}?token={coded.tracking_token}")
    assert f'id="handoff-code">{coded.handoff_code}<' in page.content.decode()

    complete(driver_client, driver, coded, handoffCode=coded.handoff_code)

    assert "handoffCode" not in anon.get(url).json()  # delivered: nothing left to give


def test_the_owning_integration_sees_the_code_on_the_status_endpoint(integration, coded):
    assert integration.get(f"/v2/orders/{coded.seller_order_id}/delivery-status").json()["handoffCode"] == coded.handoff_code


def test_no_code_is_shown_for_a_delivery_that_asks_for_none(anon):
    delivery = DeliveryFactory()

    body = anon.get(f"/v2/orders/{delivery.seller_order_id}/delivery-status?token={delivery.tracking_token}").json()

    assert "handoffCode" not in body


def test_the_driver_never_gets_the_code(coded, driver, driver_client, ops):
    responses = [
        driver_client.get(f"/v2/deliveries/{coded.pk}").json(),
        driver_client.get("/v2/deliveries").json(),
        ops.get(f"/v2/deliveries/{coded.pk}").json(),
        complete(driver_client, driver, coded, handoffCode=coded.handoff_code).json(),
    ]

    for body in responses:
        assert "handoffCode" not in keys_of(body)
        assert "handoff_code" not in keys_of(body)


# ------------------------------------------------------------------ completing with it


def test_the_right_code_completes_the_delivery(coded, driver, driver_client):
    r = complete(driver_client, driver, coded, handoffCode=coded.handoff_code)

    assert r.status_code == 200, r.content
    assert r.json()["status"] == "delivered"
    assert r.json()["handoffCodeFailures"] == 0


def test_completing_without_the_code_is_a_400_naming_it_and_changes_nothing(coded, driver, driver_client):
    body = assert_error(complete(driver_client, driver, coded), 400)

    assert "handoffCode" in body["details"]
    coded.refresh_from_db()
    assert coded.status == "in_transit" and coded.handoff_code_failures == 0


@pytest.mark.parametrize("code", ["123", "12345", "abcd", 1234, True, None, ""])
def test_a_malformed_code_is_a_400_and_is_not_counted(coded, driver, driver_client, code):
    body = assert_error(complete(driver_client, driver, coded, handoffCode=code), 400)

    assert "handoffCode" in body["details"]
    coded.refresh_from_db()
    assert coded.handoff_code_failures == 0


def test_a_wrong_code_is_a_400_counted_and_audited(coded, driver, driver_client):
    body = assert_error(complete(driver_client, driver, coded, handoffCode=wrong(coded.handoff_code)), 400)

    assert "handoffCode" in body["details"]
    coded.refresh_from_db()
    assert coded.status == "in_transit"
    assert coded.handoff_code_failures == 1 and coded.handoff_code_locked_at is None
    row = DeliveryAuditLog.objects.get(delivery=coded, event_type="handoff_code_failed")
    assert row.details == {"driverId": str(driver.pk), "failures": 1, "locked": False}
    assert row.actor_type == "driver"


def test_a_code_is_not_asked_before_the_delivery_is_in_transit(integration_user, driver, driver_client):
    delivery = DeliveryFactory(created_by=integration_user, proof_required="code")
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    assert_error(complete(driver_client, driver, delivery, handoffCode=wrong(delivery.handoff_code)), 409)

    delivery.refresh_from_db()
    assert delivery.handoff_code_failures == 0


def test_a_delivery_without_a_code_policy_ignores_the_code(integration_user, driver, driver_client):
    delivery = in_transit(DeliveryFactory(created_by=integration_user), driver)

    r = complete(driver_client, driver, delivery, handoffCode=wrong(delivery.handoff_code))

    assert r.status_code == 200 and r.json()["status"] == "delivered"


def test_after_five_wrong_codes_the_delivery_is_flagged_and_codes_are_refused_until_ops_reset_it(
    coded, driver, driver_client, ops, ops_user, integration
):
    for _ in range(4):
        assert_error(complete(driver_client, driver, coded, handoffCode=wrong(coded.handoff_code)), 400)
    fifth = complete(driver_client, driver, coded, handoffCode=wrong(coded.handoff_code))
    assert_error(fifth, 400)

    coded.refresh_from_db()
    assert coded.handoff_code_failures == 5 and coded.handoff_code_locked_at is not None
    assert ops.get(f"/v2/deliveries/{coded.pk}").json()["handoffCodeLockedAt"] is not None
    body = assert_error(complete(driver_client, driver, coded, handoffCode=coded.handoff_code), 409)
    assert "ops" in body["message"]
    coded.refresh_from_db()
    assert coded.status == "in_transit" and coded.handoff_code_failures == 5

    # only ops reset it
    url = f"/v2/deliveries/{coded.pk}/handoff-code/reset"
    assert_error(driver_client.post(url, {"reason": "x"}, format="json"), 403)
    assert_error(integration.post(url, {"reason": "x"}, format="json"), 403)
    assert_error(ops.post(url, {}, format="json"), 400)
    reset = ops.post(url, {"reason": "customer confirmed by phone"}, format="json")
    assert reset.status_code == 200, reset.content
    assert reset.json()["handoffCodeFailures"] == 0 and reset.json()["handoffCodeLockedAt"] is None
    row = DeliveryAuditLog.objects.get(delivery=coded, event_type="handoff_code_reset")
    assert row.details == {"previousFailures": 5, "reason": "customer confirmed by phone"}
    assert row.actor_id == ops_user.pk

    assert complete(driver_client, driver, coded, handoffCode=coded.handoff_code).json()["status"] == "delivered"
    assert DeliveryAuditLog.objects.filter(delivery=coded, event_type="handoff_code_failed").count() == 5
    # over: its wrong codes are the record, no longer reset (the audit: a 200 wiped them)
    Delivery.objects.filter(pk=coded.pk).update(handoff_code_failures=1)
    assert "delivered" in assert_error(ops.post(url, {"reason": "x"}, format="json"), 409)["message"]
    assert Delivery.objects.get(pk=coded.pk).handoff_code_failures == 1
    locked = DeliveryAuditLog.objects.filter(delivery=coded, event_type="handoff_code_failed", details__locked=True)
    assert locked.count() == 1


def test_resetting_a_delivery_with_nothing_to_reset_is_a_conflict(ops, coded):
    assert_error(ops.post(f"/v2/deliveries/{coded.pk}/handoff-code/reset", {"reason": "x"}, format="json"), 409)
    assert_error(ops.post(f"/v2/deliveries/{DeliveryFactory.build().pk}/handoff-code/reset", {"reason": "x"}, format="json"), 404)


@pytest.mark.django_db(transaction=True)
def test_wrong_codes_racing_are_counted_exactly_and_the_sixth_on_is_refused():
    driver = DriverFactory()
    delivery = in_transit(DeliveryFactory(proof_required="code", pickup_location=point()), driver)
    bad = wrong(delivery.handoff_code)

    results, errors = race([
        lambda: delivery_advance(
            delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-completed", handoff_code=bad,
            actor=Actor.system(),
        )
        for _ in range(8)
    ])

    assert results == []
    assert sum(isinstance(e, InvalidInput) for e in errors) == 5
    assert sum(isinstance(e, Conflict) for e in errors) == 3
    delivery.refresh_from_db()
    assert delivery.handoff_code_failures == 5 and delivery.handoff_code_locked_at is not None
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="handoff_code_failed").count() == 5
    assert delivery.status == "in_transit"


def test_a_second_driver_cannot_spend_the_attempts(coded, integration_user):
    other = DriverFactory()

    assert_error(complete(client_for(other.user), other, coded, handoffCode=wrong(coded.handoff_code)), 404)

    coded.refresh_from_db()
    assert coded.handoff_code_failures == 0


def test_ops_set_a_zone_policy_through_the_zone_services(integration):
    zone = zone_create(name="Centre", geometry=box(77.0, 12.5, 78.0, 13.5))
    assert zone.proof_required == ""
    with pytest.raises(ValidationError):
        zone_update(zone_id=zone.pk, proof_required="selfie")  # not a policy
    zone_update(zone_id=zone.pk, proof_required="code")

    assert integration.post("/v2/deliveries", new_delivery(), format="json").json()["proofRequired"] == "code"


def test_a_default_policy_nothing_enforces_fails_the_system_check(settings):
    assert check_default_proof_policy() == []
    settings.DEFAULT_PROOF_POLICY = "selfie"
    assert [e.id for e in check_default_proof_policy()] == ["dispatch.E001"]
