import pytest

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch.models import Assignment
from workflows.deliveries import assignment_create
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, DriverFactory, driver_at_dropoff

pytestmark = pytest.mark.django_db


@pytest.fixture
def assigned(delivery, driver):
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery


def step(client, driver, delivery, name, **body):
    return client.post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/{name}", body, format="json")


def test_the_assigned_driver_moves_a_delivery_through_every_step(driver, driver_client, assigned):
    assert step(driver_client, driver, assigned, "pickup-started").json()["status"] == "assigned"
    assert step(driver_client, driver, assigned, "pickup-completed").json()["status"] == "picked_up"
    assert step(driver_client, driver, assigned, "delivery-started").json()["status"] == "in_transit"
    driver_at_dropoff(driver, assigned)
    body = step(driver_client, driver, assigned, "delivery-completed").json()

    assert body["status"] == "delivered"
    assert body["deliveredAt"] and body["pickupStartedAt"] and body["pickedUpAt"] and body["inTransitAt"]
    driver.refresh_from_db()
    assert driver.availability == "available"
    assert Assignment.objects.get(delivery=assigned).status == "completed"
    events = list(DeliveryAuditLog.objects.filter(delivery=assigned).values_list("event_type", flat=True))
    assert events == [
        "driver_assigned", "pickup_started", "pickup_completed", "delivery_started", "delivery_completed",
    ]
    assert DeliveryAuditLog.objects.get(delivery=assigned, event_type="pickup_started").actor_type == "driver"


@pytest.mark.parametrize(
    "done,attempt",
    [
        ([], "pickup-completed"),
        ([], "delivery-started"),
        ([], "delivery-completed"),
        (["pickup-started"], "pickup-started"),
        (["pickup-started"], "delivery-started"),
        (["pickup-started", "pickup-completed"], "pickup-completed"),
        (["pickup-started", "pickup-completed"], "delivery-completed"),
    ],
)
def test_out_of_order_steps_are_conflicts_and_change_nothing(driver, driver_client, assigned, done, attempt):
    for name in done:
        assert step(driver_client, driver, assigned, name).status_code == 200
    before = assigned.__class__.objects.get(pk=assigned.pk).status
    audit_count = DeliveryAuditLog.objects.count()

    assert_error(step(driver_client, driver, assigned, attempt), 409)

    assert assigned.__class__.objects.get(pk=assigned.pk).status == before
    assert DeliveryAuditLog.objects.count() == audit_count


def test_a_failed_delivery_needs_a_reason_and_frees_the_driver(driver, driver_client, assigned):
    assert_error(step(driver_client, driver, assigned, "delivery-failed"), 400)

    body = step(driver_client, driver, assigned, "delivery-failed", reason="customer not home").json()

    assert body["status"] == "failed"
    assert body["failureReason"] == "customer not home"
    driver.refresh_from_db()
    assert driver.availability == "available"
    assert Assignment.objects.get(delivery=assigned).status == "failed"
    assert DeliveryAuditLog.objects.get(delivery=assigned, event_type="delivery_failed").details["reason"] == "customer not home"
    # finished: any further step is a conflict for the former driver
    assert_error(step(driver_client, driver, assigned, "pickup-started"), 409)


def test_another_driver_cannot_touch_the_delivery(assigned):
    other = DriverFactory()
    assert_error(step(client_for(other.user), other, assigned, "pickup-started"), 404)


def test_a_driver_cannot_act_under_another_drivers_id(driver, assigned):
    other = DriverFactory()
    assert_error(step(client_for(other.user), driver, assigned, "pickup-started"), 404)


def test_an_unknown_step_is_404_and_ops_or_integrations_are_403(driver, driver_client, assigned, ops, integration):
    assert_error(step(driver_client, driver, assigned, "teleport"), 404)
    assert_error(step(ops, driver, assigned, "pickup-started"), 403)
    assert_error(step(integration, driver, assigned, "pickup-started"), 403)


def test_a_step_on_an_unassigned_delivery_is_404(driver, driver_client):
    delivery = DeliveryFactory()
    assert_error(step(driver_client, driver, delivery, "pickup-started"), 404)
