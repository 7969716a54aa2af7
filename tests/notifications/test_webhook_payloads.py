"""What the outbox writes: the delivery as the API shows it to its owner (same keys, same
values) plus the change; only the events merchants are told of; ETA updates throttled; nothing
from a rolled-back savepoint inside a workflow."""
from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIRequestFactory

from common.actors import Actor
from common.broadcast import broadcast_on_commit
from common.errors import iso
from dispatch.api.serializers import DeliverySerializer
from dispatch.models import Assignment, Delivery
from notifications.models import OutboxEvent
from notifications.outbox import outbox_render_pending, outbox_write
from notifications.payloads import deliveries_for_payload, delivery_data, held_for_payload
from tests.factories import DeliveryFactory, IntegrationUserFactory, driver_at_dropoff, online_driver
from tracking import events as tracking_events
from workflows import deliveries as flows
from workflows.unit import unit_of_work

pytestmark = pytest.mark.django_db


def _api_view(delivery_id):
    delivery = Delivery.objects.get(pk=delivery_id)
    request = APIRequestFactory().get("/")
    return dict(DeliverySerializer(delivery, context={"request": request}).data)


def test_the_payload_is_the_delivery_as_the_api_shows_it_plus_the_change():
    merchant = IntegrationUserFactory()
    delivery = DeliveryFactory(created_by=merchant, delivery_fee="12.50", dropoff_address="1 Main St")
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    (event,) = OutboxEvent.objects.filter(delivery=delivery)
    assert event.type == "delivery.assigned" and event.owner_id == merchant.pk
    payload = event.payload
    assert set(payload) == {"id", "type", "createdAt", "data"} and payload["id"] == event.webhook_id
    data = dict(payload["data"])
    change = data.pop("change")
    assert data == _api_view(delivery.pk)
    fallback = delivery_data(deliveries_for_payload([delivery.pk])[str(delivery.pk)])  # before start-up wiring
    assert {k: data[k] for k in fallback} == fallback
    assert data["driverId"] == str(driver.pk) and data["assignmentId"] and data["deliveryFee"] == 12.5
    assert change["fromStatus"] == "ready" and change["status"] == "assigned" and change["driverId"] == str(driver.pk)


def test_a_cancellation_is_a_status_change_to_cancelled():
    delivery = DeliveryFactory()
    flows.delivery_cancel(delivery_id=delivery.pk, reason="customer left", actor=Actor.system())
    (event,) = OutboxEvent.objects.filter(delivery=delivery)
    assert event.type == "delivery.status_changed"
    assert event.payload["data"]["status"] == "cancelled"
    cancelled_at = event.payload["data"]["cancelledAt"]
    assert event.payload["data"]["change"] == {  # (changedAt, as every other status change has)
        "fromStatus": "ready", "reason": "customer left", "cancelledAt": cancelled_at, "status": "cancelled",
        "changedAt": cancelled_at, "driverId": None,
    }


def test_events_merchants_are_not_told_of_write_nothing():
    delivery = DeliveryFactory()
    with unit_of_work():
        broadcast_on_commit(["ops"], {"type": "zone_health_updated", "zoneName": "x", "health": {}})
        broadcast_on_commit(["ops"], {"type": "offer_created", "deliveryId": str(delivery.pk)})
    assert not OutboxEvent.objects.exists()


def test_eta_updates_go_out_at_most_once_a_minute_per_delivery(settings):
    delivery, other = DeliveryFactory(), DeliveryFactory()
    now = timezone.now()

    def eta(d):
        return tracking_events.delivery_eta_updated(delivery_id=d.pk, pickup_at=now, delivery_at=now, confidence=0.8, calculated_at=now)

    with time_machine.travel(now, tick=False):
        outbox_write([eta(delivery), eta(delivery), eta(other)])
    with time_machine.travel(now + timedelta(seconds=30), tick=False):
        outbox_write([eta(delivery)])
    with time_machine.travel(now + timedelta(seconds=61), tick=False):
        outbox_write([eta(delivery)])
    counts = {d.pk: OutboxEvent.objects.filter(delivery=d, type="delivery.eta_updated").count() for d in (delivery, other)}
    assert counts == {delivery.pk: 2, other.pk: 1}


def test_an_event_emitted_in_a_rolled_back_savepoint_is_not_written():
    kept, dropped = DeliveryFactory(), DeliveryFactory()
    with unit_of_work():
        flows.delivery_cancel(delivery_id=kept.pk, reason="one", actor=Actor.system())
        try:
            with transaction.atomic():
                flows.delivery_cancel(delivery_id=dropped.pk, reason="two", actor=Actor.system())
                raise RuntimeError
        except RuntimeError:
            pass
    assert list(OutboxEvent.objects.values_list("delivery_id", flat=True)) == [kept.pk]


def test_the_events_of_one_workflow_are_written_in_the_order_emitted():
    merchant = IntegrationUserFactory()
    delivery = DeliveryFactory(created_by=merchant)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    flows.delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.system())
    types = list(OutboxEvent.objects.filter(delivery=delivery).order_by("seq").values_list("type", flat=True))
    assert types[:2] == ["delivery.assigned", "delivery.unassigned"]
    # the driver it was taken from (its driverId is null: nobody has it now; an audit: merchants
    # could not tell whom)
    unassigned = OutboxEvent.objects.get(delivery=delivery, type="delivery.unassigned")
    change = unassigned.payload["data"]["change"]
    assert change["previousDriverId"] == str(driver.pk) and change["driverId"] is None


@pytest.mark.parametrize("steps", [
    ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed"),
    ("pickup-started", "delivery-failed"),
])
def test_every_payload_of_a_walk_matches_the_api_at_that_moment(steps):
    """Each step's payload is the delivery as the API showed it right after that step, also
    for the one-statement steps, whose payloads the worker renders before fan-out
    (`outbox_render_pending`): here only once the walk is over, so a payload rendered from the
    current row instead of the row the step left would show the later steps' changes."""
    merchant = IntegrationUserFactory()
    delivery = DeliveryFactory(created_by=merchant)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    expected = {}
    for step in steps:
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        before = OutboxEvent.objects.count()
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user),
                               reason="customer not home" if step == "delivery-failed" else "")
        new = list(OutboxEvent.objects.filter(delivery=delivery).order_by("seq")[before:])
        assert len(new) == 1, step
        expected[new[0].seq] = (step, _api_view(delivery.pk))
    events = outbox_render_pending(list(OutboxEvent.objects.filter(seq__in=list(expected)).order_by("seq")))
    assert [e.seq for e in events] == sorted(expected)
    for event in OutboxEvent.objects.filter(seq__in=list(expected)).order_by("seq"):
        step, view = expected[event.seq]
        assert event.delivery_row is None, step
        data = dict(event.payload["data"])
        data.pop("change")
        assert data == view, step


def test_the_payload_read_finds_each_deliverys_latest_assignment():
    never = DeliveryFactory()
    once = DeliveryFactory()
    flows.assignment_create(delivery_id=once.pk, driver_id=online_driver().pk, actor=Actor.system())
    twice = DeliveryFactory(auto_dispatch=False)  # reassigned: back to ops, not offered on
    first, second = online_driver(), online_driver()
    flows.assignment_create(delivery_id=twice.pk, driver_id=first.pk, actor=Actor.system())
    flows.delivery_reassign(delivery_id=twice.pk, reason="closer", actor=Actor.system())
    flows.assignment_create(delivery_id=twice.pk, driver_id=second.pk, actor=Actor.system())
    ids = [never.pk, str(once.pk), twice.pk]  # UUIDs or their text, as callers pass them

    got = deliveries_for_payload(ids)
    assert set(got) == {str(never.pk), str(once.pk), str(twice.pk)}
    for key, delivery in got.items():
        # the same delivery read by the ORM, held with its newest assignment (held_for_payload)
        expected = Delivery.objects.get(pk=key)
        newest = Assignment.objects.filter(delivery_id=key).order_by("-created_at", "-id").first()
        expected.latest_assignments = [newest] if newest else []
        expected = held_for_payload(expected)
        annotations = ("latest_assignment_id", "latest_driver_id", "latest_assignment_status", "latest_end_reason")
        assert [getattr(delivery, n) for n in annotations] == [getattr(expected, n) for n in annotations], key
        assert delivery_data(delivery) == delivery_data(expected), key
    assert got[str(never.pk)].latest_assignment_id is None
    assert (got[str(twice.pk)].latest_driver_id, got[str(twice.pk)].latest_assignment_status) == (second.pk, "active")
    ended = Assignment.objects.get(delivery=twice, driver=first)
    assert (ended.status, ended.end_reason) == ("cancelled", "reassigned")  # the older one is not picked
    assert deliveries_for_payload([]) == {}


def test_the_cancellation_of_a_taken_delivery_names_its_driver_in_the_change():
    """A cancellation's `change` had no `driverId` (the live event it comes from had none)."""
    delivery, driver = DeliveryFactory(), online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    flows.delivery_cancel(delivery_id=delivery.pk, reason="store closed", actor=Actor.system())

    cancelled = OutboxEvent.objects.filter(delivery=delivery).order_by("seq").last()

    assert cancelled.payload["data"]["change"]["status"] == "cancelled"
    assert cancelled.payload["data"]["change"]["driverId"] == str(driver.pk)


def _eta_rows(delivery) -> list[dict]:
    rows = OutboxEvent.objects.filter(delivery=delivery, type="delivery.eta_updated").order_by("seq")
    return [row.payload["data"]["change"] for row in rows]


def test_an_eta_update_the_throttle_held_back_goes_out_when_the_interval_ends(django_capture_on_commit_callbacks):
    """It was dropped: a pickup inside the minute after the accept (the common case) left the
    seller with the pre-pickup ETA until a later fix moved it again (a seller audit). Now the
    delivery's ETA as it is then goes out once the interval has ended; one already told, or a
    delivery no longer tracked, gets nothing."""
    from notifications.outbox import eta_updates_held_back_write

    moving, unchanged, finished = (DeliveryFactory() for _ in range(3))
    for d in (moving, unchanged, finished):
        flows.assignment_create(delivery_id=d.pk, driver_id=online_driver().pk, actor=Actor.system())
    t0 = timezone.now()

    def eta(d, minutes):
        at = t0 + timedelta(minutes=minutes)
        Delivery.objects.filter(pk=d.pk).update(eta_pickup_at=at, eta_delivery_at=at + timedelta(minutes=10),
                                                eta_confidence=0.8, eta_calculated_at=timezone.now())
        return tracking_events.delivery_eta_updated(delivery_id=d.pk, pickup_at=at, delivery_at=at + timedelta(minutes=10),
                                                    confidence=0.8, calculated_at=timezone.now())

    def write(events):  # (the marks are made once the write's transaction commits)
        with django_capture_on_commit_callbacks(execute=True):
            outbox_write(events)

    with time_machine.travel(t0, tick=False):
        write([eta(moving, 5), eta(unchanged, 5), eta(finished, 5)])  # told
    with time_machine.travel(t0 + timedelta(seconds=10), tick=False):
        write([eta(moving, 1), eta(finished, 1)])  # picked up: held back
        write([eta(unchanged, 5)])  # (a forced one, no move: held back too)
    Delivery.objects.filter(pk=finished.pk).update(status="delivered")
    with time_machine.travel(t0 + timedelta(seconds=30), tick=False):
        write([eta(moving, 0.5)])  # moved again within the interval: the latest goes
        assert eta_updates_held_back_write() == 0  # (not yet)

    with time_machine.travel(t0 + timedelta(seconds=61), tick=False), django_capture_on_commit_callbacks(execute=True):
        assert eta_updates_held_back_write() == 1
    assert [c["estimatedPickupTime"] for c in _eta_rows(moving)] == [
        iso(t0 + timedelta(minutes=5)), iso(t0 + timedelta(seconds=30))]
    assert len(_eta_rows(unchanged)) == 1 and len(_eta_rows(finished)) == 1
    with time_machine.travel(t0 + timedelta(seconds=200), tick=False):
        assert eta_updates_held_back_write() == 0  # (taken once)


@pytest.mark.django_db(transaction=True)
def test_a_held_back_eta_update_of_a_delivery_another_transaction_holds_waits_for_the_next_run():
    """A step committing the delivery's final status holds its row: the sweep does not write an
    ETA beside it (it could go out after `delivered`); it looks again at its next run. A
    write that fails puts them all back."""
    import threading

    from common.redis import get_redis
    from notifications.outbox import ETA_HELD_BACK_KEY, eta_updates_held_back_write

    delivery = DeliveryFactory()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    at = timezone.now() + timedelta(minutes=7)
    Delivery.objects.filter(pk=delivery.pk).update(eta_pickup_at=at, eta_delivery_at=at, eta_confidence=0.8,
                                                   eta_calculated_at=timezone.now())
    redis = get_redis()
    redis.zadd(ETA_HELD_BACK_KEY, {str(delivery.pk): timezone.now().timestamp() - 1})

    holding, release = threading.Event(), threading.Event()

    def hold():
        from django.db import connection
        with transaction.atomic():
            Delivery.objects.select_for_update().get(pk=delivery.pk)
            holding.set()
            release.wait(10)
        connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    try:
        assert eta_updates_held_back_write() == 0
        assert redis.zscore(ETA_HELD_BACK_KEY, str(delivery.pk)) is not None  # (marked again)
    finally:
        release.set()
        holder.join()
    later = timezone.now() + timedelta(seconds=61)  # (past the assignment's own ETA update's interval)
    with time_machine.travel(later, tick=False):
        assert eta_updates_held_back_write() == 1

    Delivery.objects.filter(pk=delivery.pk).update(eta_delivery_at=at + timedelta(minutes=3))  # (moved again)
    redis.zadd(ETA_HELD_BACK_KEY, {str(delivery.pk): timezone.now().timestamp() - 1})
    from unittest import mock
    with mock.patch("notifications.outbox.outbox_write", side_effect=RuntimeError("database went away")):
        with pytest.raises(RuntimeError):
            eta_updates_held_back_write(now=later + timedelta(seconds=61))
    assert redis.zscore(ETA_HELD_BACK_KEY, str(delivery.pk)) is not None
