"""The assignment record (`GET /v2/deliveries/{id}/assignments`), and a finished delivery keeping
the driver and assignment it ended with (issue 15)."""
import pytest
import time_machine

from common.actors import Actor
from offers.models import DriverOffer
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, IntegrationUserFactory, driver_at_dropoff, online_driver
from workflows.deliveries import assignment_create, delivery_advance, delivery_cancel, delivery_reassign
from workflows.dispatching import delivery_dispatch
from workflows.offers import offer_accept

pytestmark = pytest.mark.django_db

ROW_KEYS = {"id", "deliveryId", "driverId", "offerId", "status", "startedAt", "endedAt", "endReason"}


def finish(delivery, driver, last="delivery-completed", reason=""):
    steps = ["pickup-started", "pickup-completed", "delivery-started"] if last == "delivery-completed" else []
    for step in [*steps, last]:
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, reason=reason, actor=Actor("driver", driver.pk))


def reassigned_then_delivered(owner):
    """First driver by offer, taken away by ops, second driver assigned directly and delivers."""
    first, second = online_driver(km=0.3), online_driver(km=5.5)
    delivery = DeliveryFactory(created_by=owner)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
        assert offer.driver_id == first.pk
        offer_accept(offer_id=offer.pk, driver_id=first.pk, actor=Actor("driver", first.pk))
        t.shift(60)
        delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor("admin", None))
        t.shift(60)
        assignment_create(delivery_id=delivery.pk, driver_id=second.pk, actor=Actor.system())
        t.shift(600)
        finish(delivery, second)
    return delivery, first, second, offer


def test_ops_and_the_owner_read_every_assignment_oldest_first(ops, integration_user):
    delivery, first, second, offer = reassigned_then_delivered(integration_user)

    for client in (ops, client_for(integration_user)):
        r = client.get(f"/v2/deliveries/{delivery.pk}/assignments")
        assert r.status_code == 200, r.content
        body = r.json()
        assert set(body) == {"assignments", "next"} and body["next"] is None
        rows = body["assignments"]
        assert all(set(row) == ROW_KEYS for row in rows)
        assert [(row["driverId"], row["offerId"], row["status"], row["endReason"]) for row in rows] == [
            (str(first.pk), str(offer.pk), "cancelled", "reassigned"),
            (str(second.pk), None, "completed", "completed"),  # ops assigned directly: no offer
        ]
        assert [(row["startedAt"], row["endedAt"]) for row in rows] == [
            ("2026-02-01T10:00:00Z", "2026-02-01T10:01:00Z"),
            ("2026-02-01T10:02:00Z", "2026-02-01T10:12:00Z"),
        ]


def test_a_driver_sees_only_its_own_assignments(integration_user):
    delivery, first, second, _ = reassigned_then_delivered(integration_user)

    for driver in (first, second):
        rows = client_for(driver.user).get(f"/v2/deliveries/{delivery.pk}/assignments").json()["assignments"]
        assert [row["driverId"] for row in rows] == [str(driver.pk)]

    stranger = online_driver(km=9)
    assert_error(client_for(stranger.user).get(f"/v2/deliveries/{delivery.pk}/assignments"), 404)


def test_another_integration_and_unknown_deliveries_are_404(ops, integration_user):
    delivery = DeliveryFactory(created_by=integration_user)
    assert_error(client_for(IntegrationUserFactory()).get(f"/v2/deliveries/{delivery.pk}/assignments"), 404)
    assert_error(ops.get("/v2/deliveries/00000000-0000-0000-0000-000000000000/assignments"), 404)
    assert client_for(integration_user).get(f"/v2/deliveries/{delivery.pk}/assignments").json() == {
        "assignments": [], "next": None,
    }


def test_the_end_reasons_of_failed_and_cancelled_assignments(ops):
    driver = online_driver()
    failed = DeliveryFactory()
    assignment_create(delivery_id=failed.pk, driver_id=driver.pk, actor=Actor.system())
    finish(failed, driver, last="delivery-failed", reason="customer_unavailable")
    cancelled = DeliveryFactory()
    assignment_create(delivery_id=cancelled.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_cancel(delivery_id=cancelled.pk, reason="store closed", actor=Actor("admin", None))

    (f,) = ops.get(f"/v2/deliveries/{failed.pk}/assignments").json()["assignments"]
    (c,) = ops.get(f"/v2/deliveries/{cancelled.pk}/assignments").json()["assignments"]
    assert (f["status"], f["endReason"]) == ("failed", "failed")
    assert (c["status"], c["endReason"]) == ("cancelled", "cancelled")
    active = DeliveryFactory()
    assignment_create(delivery_id=active.pk, driver_id=online_driver(km=2).pk, actor=Actor.system())
    (a,) = ops.get(f"/v2/deliveries/{active.pk}/assignments").json()["assignments"]
    assert (a["status"], a["endReason"], a["endedAt"]) == ("active", None, None)


def test_the_assignment_list_is_paginated(ops):
    delivery = DeliveryFactory()
    drivers = [online_driver(km=0.2 * (n + 1)) for n in range(3)]
    for driver in drivers:
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        if driver is not drivers[-1]:
            delivery_reassign(delivery_id=delivery.pk, reason="swap", actor=Actor("admin", None))
            DriverOffer.objects.filter(delivery=delivery, status="PENDING").update(status="CANCELLED")

    page = ops.get(f"/v2/deliveries/{delivery.pk}/assignments?limit=2").json()
    rest = ops.get(page["next"]).json()
    assert [r["driverId"] for r in page["assignments"] + rest["assignments"]] == [str(d.pk) for d in drivers]
    assert_error(ops.get(f"/v2/deliveries/{delivery.pk}/assignments?cursor=garbage"), 400)


def test_a_finished_delivery_keeps_its_driver_and_assignment(ops, integration_user):
    integration = client_for(integration_user)
    driver = online_driver()
    delivery = DeliveryFactory(created_by=integration_user)
    assignment = assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk))
    driver_at_dropoff(driver, delivery)

    done = client_for(driver.user).post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/delivery-completed", {}, format="json")

    assert done.status_code == 200, done.content
    expected = (str(driver.pk), str(assignment.pk))
    assert (done.json()["driverId"], done.json()["assignmentId"]) == expected  # the step's own response
    for client in (ops, integration):
        one = client.get(f"/v2/deliveries/{delivery.pk}").json()
        assert one["status"] == "delivered" and (one["driverId"], one["assignmentId"]) == expected
        (listed,) = [d for d in client.get("/v2/deliveries").json()["deliveries"] if d["id"] == str(delivery.pk)]
        assert (listed["driverId"], listed["assignmentId"]) == expected
    mine = client_for(driver.user).get(f"/v2/deliveries/{delivery.pk}").json()
    assert (mine["driverId"], mine["assignmentId"]) == expected and mine["customerPhone"] == ""  # its past job


def test_failed_and_cancelled_deliveries_keep_theirs_a_reassigned_one_does_not(ops):
    driver = online_driver()
    failed = DeliveryFactory()
    a_failed = assignment_create(delivery_id=failed.pk, driver_id=driver.pk, actor=Actor.system())
    finish(failed, driver, last="delivery-failed", reason="refused")
    cancelled = DeliveryFactory()
    a_cancelled = assignment_create(delivery_id=cancelled.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_cancel(delivery_id=cancelled.pk, reason="store closed", actor=Actor("admin", None))
    waiting = DeliveryFactory(auto_dispatch=False)
    assignment_create(delivery_id=waiting.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_reassign(delivery_id=waiting.pk, reason="swap", actor=Actor("admin", None))

    def ids(delivery):
        body = ops.get(f"/v2/deliveries/{delivery.pk}").json()
        return body["driverId"], body["assignmentId"]

    assert ids(failed) == (str(driver.pk), str(a_failed.pk))
    assert ids(cancelled) == (str(driver.pk), str(a_cancelled.pk))
    assert ids(waiting) == (None, None)  # ready again: nobody has it


def test_the_delivery_list_reads_the_assignments_in_one_query(ops, django_assert_max_num_queries):
    for _ in range(5):
        driver = online_driver()
        delivery = DeliveryFactory()
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        finish(delivery, driver)
    ops.get("/v2/deliveries")  # warm-up
    with django_assert_max_num_queries(3):  # the token, the page, the latest assignments: not one per delivery
        body = ops.get("/v2/deliveries").json()
    assert all(d["driverId"] for d in body["deliveries"])


def test_after_a_reassign_the_next_driver_can_accept_its_offer(ops):
    """The first driver's accepted offer used to stay ACCEPTED, and the database allows one per
    delivery: the second driver's accept failed with an IntegrityError (a 500)."""
    first, second = online_driver(km=0.3), online_driver(km=0.6)
    delivery = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    offer_accept(offer_id=offer.pk, driver_id=first.pk, actor=Actor("driver", first.pk))
    _, redispatched = delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor("admin", None))
    assert redispatched.outcome == "offered", redispatched
    assert redispatched.offer.driver_id == second.pk

    r = client_for(second.user).post(f"/v2/drivers/{second.pk}/offers/{redispatched.offer.pk}/accept", {}, format="json")

    assert r.status_code == 200, r.content
    offer.refresh_from_db()
    assert (offer.status, offer.cancellation_reason) == ("CANCELLED", "reassigned") and offer.accepted_at is not None
    rows = ops.get(f"/v2/deliveries/{delivery.pk}/assignments").json()["assignments"]
    assert [(row["driverId"], row["offerId"], row["endReason"]) for row in rows] == [
        (str(first.pk), str(offer.pk), "reassigned"), (str(second.pk), str(redispatched.offer.pk), None),
    ]
