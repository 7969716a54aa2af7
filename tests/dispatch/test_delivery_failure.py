"""delivery-failed `{reason, note?}`: a reason from the fixed list, or free text as the SPEC
allows (read as `other`, the text kept as the note)."""
import pytest

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Delivery, FailureReason
from tests.api import assert_error
from tests.factories import DeliveryFactory
from workflows.deliveries import assignment_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def assigned(integration_user, driver):
    delivery = DeliveryFactory(created_by=integration_user)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery


def fail(client, driver, delivery, **body):
    return client.post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/delivery-failed", body, format="json")


@pytest.mark.parametrize("code", FailureReason.values)
def test_a_coded_reason_is_recorded_as_that_code_with_the_note(driver, driver_client, assigned, code):
    body = fail(driver_client, driver, assigned, reason=code, note="rang twice, waited 10 min").json()

    assert body["status"] == "failed"
    assert (body["failureReason"], body["failureCode"], body["failureNote"]) == (code, code, "rang twice, waited 10 min")
    details = DeliveryAuditLog.objects.get(delivery=assigned, event_type="delivery_failed").details
    assert details["reason"] == code and details["failureCode"] == code and details["note"] == "rang twice, waited 10 min"


def test_free_text_as_the_spec_allows_is_other_and_the_text_becomes_the_note(driver, driver_client, assigned):
    body = fail(driver_client, driver, assigned, reason="customer not home").json()

    assert (body["failureReason"], body["failureCode"], body["failureNote"]) == ("customer not home", "other", "customer not home")
    d = Delivery.objects.get(pk=assigned.pk)
    assert (d.failure_code, d.failure_note) == ("other", "customer not home")


def test_free_text_with_a_note_keeps_the_note(driver, driver_client, assigned):
    body = fail(driver_client, driver, assigned, reason="dog", note="a big one").json()

    assert (body["failureCode"], body["failureNote"]) == ("other", "a big one")


def test_a_delivery_that_did_not_fail_has_no_failure_code(driver, driver_client, assigned):
    body = driver_client.get(f"/v2/deliveries/{assigned.pk}").json()

    assert body["failureCode"] is None and body["failureNote"] == ""


@pytest.mark.parametrize(
    "body,field",
    [({}, "reason"), ({"reason": ""}, "reason"), ({"reason": "refused", "note": 5}, "note"),
     ({"reason": "refused", "note": "x" * 1001}, "note"), ({"reason": ["refused"]}, "reason")],
)
def test_a_failure_without_a_reason_or_with_a_bad_note_is_a_400_naming_the_field(driver, driver_client, assigned, body, field):
    error = assert_error(fail(driver_client, driver, assigned, **body), 400)

    assert field in error["details"]
    assert Delivery.objects.get(pk=assigned.pk).status == "assigned"
