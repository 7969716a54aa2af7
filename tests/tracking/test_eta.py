"""The ETA service: the math on known distances, the throttle on the location hot path, and
the events it emits (checked against their TypedDicts)."""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import redis
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from common.actors import Actor
from tracking import eta
from tracking import services as eta_service
from tracking.services import eta_compute, fix_confidence
from tracking.events import DeliveryEtaUpdatedEvent, DeliveryLocationUpdatedEvent
from dispatch.models import Delivery
from tracking.routing import GreatCircleBackend
from workflows.deliveries import assignment_create, delivery_advance
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, DriverFactory, km_north, point
from tests.typecheck import assert_event_shape

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 2, 1, 9, 45, tzinfo=dt_timezone.utc)
KM_PER_DEGREE_LAT = 111.19508  # on the sphere of radius 6371.0088 km


# ------------------------------------------------------------------------------ math


def test_a_great_circle_leg_is_distance_times_road_factor_over_the_vehicle_speed():
    backend = GreatCircleBackend()

    car = backend.leg(origin=(12.0, 77.0), destination=(13.0, 77.0), vehicle_type="car")
    bike = backend.leg(origin=(12.0, 77.0), destination=(13.0, 77.0), vehicle_type="bicycle")

    assert car.distance_km == pytest.approx(KM_PER_DEGREE_LAT * 1.3, rel=1e-5)
    assert car.seconds == pytest.approx(KM_PER_DEGREE_LAT * 1.3 / 25 * 3600, rel=1e-5)  # ≈ 5.78 h
    assert bike.seconds == pytest.approx(KM_PER_DEGREE_LAT * 1.3 / 15 * 3600, rel=1e-5)
    assert car.source == "great_circle"


def _delivery(status="assigned", prep=0, ready_at=T0, dropoff_km=3.0, picked_up_at=None):
    return Delivery(
        status=status, prep_time_minutes=prep, ready_at=ready_at, pickup_location=point(),
        dropoff_location=km_north(dropoff_km), picked_up_at=picked_up_at,
    )


def test_an_assigned_delivery_is_driven_to_the_store_then_to_the_door_plus_handover():
    delivery = _delivery(dropoff_km=3.0)
    driver = km_north(-2.0)  # 2 km south of the store

    result = eta_compute(
        delivery=delivery, vehicle_type="car", driver_lat=driver.y, driver_lon=driver.x, fix_recorded_at=T0,
        accuracy_m=10, now=T0, backend=GreatCircleBackend(),
    )

    to_store = 2.0 * 1.3 / 25 * 3600  # 374.4 s
    to_door = 3.0 * 1.3 / 25 * 3600  # 561.6 s
    assert result.pickup_at == T0 + timedelta(seconds=round(to_store))
    assert result.delivery_at == result.pickup_at + timedelta(seconds=round(to_door + eta.HANDOVER_SECONDS))
    assert result.confidence == 0.8 and result.calculated_at == T0


def test_a_driver_who_arrives_before_the_food_is_ready_waits_for_it():
    delivery = _delivery(prep=20, ready_at=T0 - timedelta(minutes=5))  # 15 minutes of prep left
    driver = km_north(-1.0)

    result = eta_compute(
        delivery=delivery, vehicle_type="car", driver_lat=driver.y, driver_lon=driver.x, fix_recorded_at=T0,
        accuracy_m=10, now=T0, backend=GreatCircleBackend(),
    )

    assert result.pickup_at == T0 + timedelta(minutes=15)


@pytest.mark.parametrize("status", ["picked_up", "in_transit"])
def test_once_picked_up_only_the_way_to_the_door_is_left(status):
    picked = T0 - timedelta(minutes=4)
    delivery = _delivery(status=status, dropoff_km=3.0, picked_up_at=picked)
    driver = km_north(1.0)  # 2 km from the door

    result = eta_compute(
        delivery=delivery, vehicle_type="motorbike", driver_lat=driver.y, driver_lon=driver.x, fix_recorded_at=T0,
        accuracy_m=10, now=T0, backend=GreatCircleBackend(),
    )

    assert result.pickup_at == picked
    assert result.delivery_at == T0 + timedelta(seconds=round(2.0 * 1.3 / 30 * 3600 + eta.HANDOVER_SECONDS))


@pytest.mark.parametrize("status", ["ready", "delivered", "failed", "cancelled"])
def test_there_is_no_eta_without_a_driver_on_the_job(status):
    assert eta_compute(
        delivery=_delivery(status=status), vehicle_type="car", driver_lat=CITY[0], driver_lon=CITY[1],
        fix_recorded_at=T0, accuracy_m=10, now=T0, backend=GreatCircleBackend(),
    ) is None


@pytest.mark.parametrize(
    "age_s,accuracy_m,expected",
    [(0, 10, 0.8), (30, 25, 0.8), (330, 10, 0.4), (0, 275, 0.4), (330, 275, 0.2), (0, None, 0.62), (100000, 100000, 0.05)],
)
def test_confidence_falls_with_the_age_and_the_inaccuracy_of_the_fix(age_s, accuracy_m, expected):
    assert fix_confidence(base=0.8, fix_age_s=age_s, accuracy_m=accuracy_m) == expected


# ------------------------------------------------------------------------------ the hot path


@pytest.fixture
def job(django_capture_on_commit_callbacks):
    """An assigned delivery whose driver sits 2 km south of the store; ETA computed at T0."""
    with time_machine.travel(T0, tick=False):
        driver = DriverFactory(location=km_north(-2.0), location_recorded_at=T0 - timedelta(seconds=1), location_accuracy_m=8)
        delivery = DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10), dropoff_location=km_north(3.0))
        with django_capture_on_commit_callbacks(execute=True):
            assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery, driver


def post_fix(driver, at, km, *, accuracy=8.0, speed=10.0, heading=0.0, capture=None):
    with time_machine.travel(at, tick=False):
        with capture(execute=True):
            response = client_for(driver.user).post(
                f"/v2/drivers/{driver.pk}/location",
                {"lat": km_north(km).y, "lon": km_north(km).x, "accuracyMeters": accuracy, "speed": speed, "heading": heading},
                format="json",
            )
    assert response.status_code == 200 and response.json()["accepted"], response.content
    return response


def by_type(events, kind):
    return [e for e in events if e["type"] == kind]


def test_every_fix_of_an_assigned_driver_reaches_the_delivery_group_and_ops(job, listen, django_capture_on_commit_callbacks):
    delivery, driver = job
    customer, ops = listen(f"delivery.{delivery.pk}"), listen("ops")

    post_fix(driver, T0 + timedelta(seconds=2), -1.99, speed=10.0, heading=90.0, capture=django_capture_on_commit_callbacks)
    post_fix(driver, T0 + timedelta(seconds=4), -1.98, speed=12.5, heading=91.5, capture=django_capture_on_commit_callbacks)

    sent = by_type(customer.drain(), "delivery_location_updated")
    assert [e["updatedAt"] for e in sent] == ["2026-02-01T09:45:02Z", "2026-02-01T09:45:04Z"]
    for event in sent:
        assert_event_shape(event, DeliveryLocationUpdatedEvent)
    assert sent[1]["speed"] == 45.0 and sent[1]["heading"] == 91.5  # m/s in, km/h out
    assert sent[1]["location"] == {"lat": round(km_north(-1.98).y, 7), "lon": round(km_north(-1.98).x, 7), "accuracyMeters": 8.0}
    assert by_type(ops.drain(), "delivery_location_updated") == []  # ops follow the per-second digest instead


def test_a_fix_without_an_accuracy_shows_the_one_the_eta_counts_not_null(job, listen, django_capture_on_commit_callbacks):
    """The seed types `accuracyMeters` as a number (the event and the status body); it was null."""
    delivery, driver = job
    customer = listen(f"delivery.{delivery.pk}")

    post_fix(driver, T0 + timedelta(seconds=2), -1.99, accuracy=None, capture=django_capture_on_commit_callbacks)

    (sent,) = by_type(customer.drain(), "delivery_location_updated")
    assert_event_shape(sent, DeliveryLocationUpdatedEvent)
    assert sent["location"]["accuracyMeters"] == eta_service.events.UNKNOWN_ACCURACY_M == 100.0
    with time_machine.travel(T0 + timedelta(seconds=3), tick=False):
        shown = client_for(delivery.created_by).get(f"/v2/orders/{delivery.seller_order_id}/delivery-status").json()
    assert shown["location"]["accuracyMeters"] == 100.0


def test_the_eta_is_recomputed_at_most_every_interval_unless_the_driver_moved_far(job, listen, django_capture_on_commit_callbacks, settings):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    settings.ETA_MIN_MOVE_METERS = 250
    delivery, driver = job
    calculated = lambda: Delivery.objects.get(pk=delivery.pk).eta_calculated_at  # noqa: E731

    post_fix(driver, T0 + timedelta(seconds=1), -1.99, capture=django_capture_on_commit_callbacks)
    first = calculated()
    assert first == T0 + timedelta(seconds=1)  # the first fix claims the throttle

    post_fix(driver, T0 + timedelta(seconds=6), -1.90, capture=django_capture_on_commit_callbacks)  # 100 m, 5 s
    assert calculated() == first

    post_fix(driver, T0 + timedelta(seconds=9), -1.60, capture=django_capture_on_commit_callbacks)  # 300 m more
    assert calculated() == T0 + timedelta(seconds=9)

    post_fix(driver, T0 + timedelta(seconds=23), -1.58, capture=django_capture_on_commit_callbacks)  # 14 s later
    assert calculated() == T0 + timedelta(seconds=9)

    post_fix(driver, T0 + timedelta(seconds=24), -1.57, capture=django_capture_on_commit_callbacks)  # 15 s later
    assert calculated() == T0 + timedelta(seconds=24)


def test_an_eta_event_goes_out_only_when_the_eta_changed_meaningfully(job, listen, django_capture_on_commit_callbacks, settings):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    delivery, driver = job
    customer = listen(f"delivery.{delivery.pk}")

    # On schedule: 20 s later the driver is 20 s of driving closer, so the ETA holds.
    metres_in_20s = 25 / 3.6 * 20 / 1.3 / 1000
    post_fix(driver, T0 + timedelta(seconds=20), -2.0 + metres_in_20s, capture=django_capture_on_commit_callbacks)
    assert by_type(customer.drain(), "delivery_eta_updated") == []
    assert Delivery.objects.get(pk=delivery.pk).eta_calculated_at == T0 + timedelta(seconds=20)

    # Stuck: 60 s later and no closer, the ETA slips by ~60 s.
    post_fix(driver, T0 + timedelta(seconds=80), -2.0 + metres_in_20s, capture=django_capture_on_commit_callbacks)
    (event,) = by_type(customer.drain(), "delivery_eta_updated")
    assert_event_shape(event, DeliveryEtaUpdatedEvent)
    stored = Delivery.objects.get(pk=delivery.pk)
    assert event == {
        "type": "delivery_eta_updated",
        "deliveryId": str(delivery.pk),
        "estimatedPickupTime": stored.eta_pickup_at.isoformat().replace("+00:00", "Z"),
        "estimatedDeliveryTime": stored.eta_delivery_at.isoformat().replace("+00:00", "Z"),
        "confidence": 0.8,
        "updatedAt": "2026-02-01T09:46:20Z",
    }


def test_an_eta_that_slips_a_little_at_every_recompute_is_announced_once_it_slipped_the_threshold(
    job, listen, django_capture_on_commit_callbacks, settings
):
    """A driver stuck in traffic, posting every 5 s: each recompute (every 15 s) finds the ETA
    15 s later than the one before, never 30 s. The customer is told once it is 30 s later than
    what they were last told, and the stored times stay what they were told until then."""
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    settings.ETA_MIN_MOVE_METERS = 250
    delivery, driver = job
    customer = listen(f"delivery.{delivery.pk}")
    told_at_assignment = Delivery.objects.get(pk=delivery.pk).eta_pickup_at

    seen = []
    for s in range(5, 70, 5):
        post_fix(driver, T0 + timedelta(seconds=s), -2.0, capture=django_capture_on_commit_callbacks)
        seen += [(s, e["estimatedPickupTime"]) for e in by_type(customer.drain(), "delivery_eta_updated")]
        stored = Delivery.objects.get(pk=delivery.pk)
        if s == 20:  # recomputed, 15 s after the last: not announced, only the calculation time stored
            assert (stored.eta_pickup_at, stored.eta_calculated_at) == (told_at_assignment, T0 + timedelta(seconds=20))

    # Recomputed at 5 (the first fix), 20, 35, 50 and 65 s: told at 35 s (35 s later than at
    # T0) and at 65 s (30 s later than at 35 s).
    assert seen == [
        (35, (told_at_assignment + timedelta(seconds=35)).isoformat().replace("+00:00", "Z")),
        (65, (told_at_assignment + timedelta(seconds=65)).isoformat().replace("+00:00", "Z")),
    ]
    assert Delivery.objects.get(pk=delivery.pk).eta_pickup_at == told_at_assignment + timedelta(seconds=65)


def test_status_changes_refresh_the_eta_for_the_customer(job, listen, django_capture_on_commit_callbacks):
    delivery, driver = job
    customer = listen(f"delivery.{delivery.pk}")
    actor = Actor("driver", driver.pk)

    with time_machine.travel(T0 + timedelta(minutes=6), tick=False):
        with django_capture_on_commit_callbacks(execute=True):
            delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-started", actor=actor)
            delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="pickup-completed", actor=actor)

    events = customer.drain()
    status = by_type(events, "delivery_status_changed")
    (eta_event,) = by_type(events, "delivery_eta_updated")
    assert [e["status"] for e in status] == ["picked_up"]
    assert_event_shape(eta_event, DeliveryEtaUpdatedEvent)
    assert eta_event["estimatedPickupTime"] == "2026-02-01T09:51:00Z"  # when it happened
    # The driver's fix is still 2 km south of the store: 5 km to the door.
    assert eta_event["estimatedDeliveryTime"] == (
        T0 + timedelta(minutes=6, seconds=round(5.0 * 1.3 / 25 * 3600 + eta.HANDOVER_SECONDS))
    ).isoformat().replace("+00:00", "Z")


def test_a_fix_of_a_driver_without_an_assignment_adds_no_query_and_no_event(listen, django_capture_on_commit_callbacks):
    idle = DriverFactory()
    busy = DriverFactory(location_recorded_at=T0 - timedelta(seconds=1))
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=busy.pk, actor=Actor.system())
    customers = listen(f"delivery.{delivery.pk}")

    def queries_of_one_fix(driver, at):
        client = client_for(driver.user)
        with time_machine.travel(at, tick=False), CaptureQueriesContext(connection) as ctx:
            with django_capture_on_commit_callbacks(execute=True):
                client.post(f"/v2/drivers/{driver.pk}/location", {"lat": 12.97, "lon": 77.59}, format="json")
        return [q["sql"] for q in ctx.captured_queries]

    idle_sql = queries_of_one_fix(idle, T0 + timedelta(seconds=1))
    busy_sql = queries_of_one_fix(busy, T0 + timedelta(seconds=1))

    assert not any("dispatch_delivery" in sql for sql in idle_sql), idle_sql
    assert sum("UPDATE" in sql and "dispatch_driver" in sql for sql in idle_sql) == 1
    assert [e["deliveryId"] for e in by_type(customers.drain(), "delivery_location_updated")] == [str(delivery.pk)]
    # The assigned driver's first fix recomputes the ETA: one read (assignment, delivery, driver) and one write;
    # its delivery_eta_updated is a webhook outbox row, written in the same transaction: the once-a-minute
    # check, the delivery's snapshot, the insert (then a worker sends it; in tests Celery runs it eagerly
    # in the commit callbacks, so those statements are left out here).
    request_sql = busy_sql[:_first_task_statement(busy_sql)]
    outbox = [sql for sql in request_sql if "notifications_outboxevent" in sql]
    assert len(outbox) == 2 and outbox[-1].startswith("INSERT"), outbox
    # And the customer's arriving check: one read (the delivery, if under way with no arriving message yet).
    assert len(request_sql) == len(idle_sql) + 2 + 3 + 1, "\n".join(q[:150] for q in request_sql)
    assert sum("notifications_customermessage" in sql for sql in request_sql) == 1
    # at the ETA's cadence: a fix a second later, a few metres on, is not due, and checks nothing
    again = queries_of_one_fix(busy, T0 + timedelta(seconds=2))
    assert not any("notifications_customermessage" in sql or "dispatch_delivery" in sql for sql in again), again


def _first_task_statement(sqls: list[str]) -> int:
    """Where the eager webhook task's statements begin (its fan-out locks unfanned events)."""
    for i, sql in enumerate(sqls):
        if "notifications_outboxevent" in sql and "FOR UPDATE SKIP LOCKED" in sql:
            return i - 1 if i and sqls[i - 1].startswith("SAVEPOINT") else i  # its atomic block
    return len(sqls)


def test_with_redis_down_fixes_still_succeed_and_the_stored_time_throttles(job, monkeypatch, django_capture_on_commit_callbacks, settings):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    delivery, driver = job

    class DeadRedis:
        def register_script(self, script):
            def run(**kwargs):
                raise redis.exceptions.ConnectionError("down")
            return run

    monkeypatch.setattr(eta_service, "get_redis", lambda: DeadRedis())
    eta_service._throttle_scripts.clear()
    calculated = lambda: Delivery.objects.get(pk=delivery.pk).eta_calculated_at  # noqa: E731

    post_fix(driver, T0 + timedelta(seconds=5), -1.99, capture=django_capture_on_commit_callbacks)
    assert calculated() == T0  # computed at assignment, 5 s ago: throttled
    post_fix(driver, T0 + timedelta(seconds=16), -1.60, capture=django_capture_on_commit_callbacks)
    assert calculated() == T0 + timedelta(seconds=16)
    eta_service._throttle_scripts.clear()


def test_an_older_computation_never_overwrites_a_newer_eta(job):
    delivery, _ = job
    eta_service.delivery_eta_refresh(delivery_id=delivery.pk, now=T0 + timedelta(seconds=30))

    assert eta_service.delivery_eta_refresh(delivery_id=delivery.pk, now=T0 + timedelta(seconds=20)) is None
    assert Delivery.objects.get(pk=delivery.pk).eta_calculated_at == T0 + timedelta(seconds=30)
