"""The stream consumer refreshes the ETAs of a batch of fixes together (`workflows.drivers.
etas_on_fixes`): the same throttle decisions, stored ETAs, live events and webhook outbox rows
as refreshing them one by one (`tracking.services.delivery_eta_on_fix`), in a fixed number of
statements."""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import redis
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from availability import live
from availability.models import Driver
from availability.services import positions_persist
from common.actors import Actor
from common.broadcast import OPS_GROUP, delivery_group
from common.redis import get_redis
from dispatch.models import Delivery
from notifications.outbox import ETA_HELD_BACK_KEY, ETA_TYPE
from notifications.models import OutboxEvent
from tests.factories import DeliveryFactory, DriverFactory, km_north
from tests.typecheck import assert_event_shape
from tracking import services as eta_service
from tracking.events import DeliveryEtaUpdatedEvent
from workflows.deliveries import assignment_create
from workflows.drivers import etas_on_fixes, fixes_process

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 2, 1, 9, 45, tzinfo=dt_timezone.utc)
T1 = T0 + timedelta(seconds=80)
# 80 s of driving at the great-circle backend's 25 km/h, road factor 1.3: the ETA holds.
ON_SCHEDULE_KM = 25 / 3.6 * 80 / 1.3 / 1000


def world(capture, settings):
    """Five deliveries, their ETAs computed at T0, and the fixes (at T1) of their drivers:
    stuck (the ETA slips: an event and a webhook row), on schedule (stored, no event), throttled
    (fixed 5 s ago, same place: not recomputed), and a driver carrying two (stacking)."""
    settings.STACKING_ENABLED = True
    with time_machine.travel(T0, tick=False):
        drivers = [DriverFactory(location=km_north(-2.0), location_recorded_at=T0 - timedelta(seconds=1),
                                 location_accuracy_m=8) for _ in range(4)]
        deliveries = [DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10),
                                      dropoff_location=km_north(3.0 + i * 0.5)) for i in range(5)]
    for i, (delivery, driver) in enumerate(zip(deliveries, [*drivers, drivers[3]])):
        # a millisecond apart: the stacked two are carried in the order assigned, in both worlds
        with time_machine.travel(T0 + timedelta(milliseconds=i), tick=False), capture(execute=True):
            assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    stuck, on_schedule, throttled, stacked = drivers
    positions = {stuck: -2.0, on_schedule: -2.0 + ON_SCHEDULE_KM, throttled: -2.0, stacked: -1.5}
    eta_service.eta_recompute_due(delivery_id=deliveries[2].pk, lat=km_north(-2.0).y, lon=km_north(-2.0).x,
                                  now=T1 - timedelta(seconds=5))
    fixes = [live.Fix(driver_id=str(d.pk), lat=km_north(km).y, lon=km_north(km).x,
                      recorded_at=(T1 - timedelta(seconds=1)).timestamp(), accuracy_m=8.0) for d, km in positions.items()]
    # (the set-up's own ETA updates the webhook throttle held back, the stacked pair's, are due
    # by T1 and would go out with the refreshes' rows: notifications.outbox.eta_hold_back)
    get_redis().delete(ETA_HELD_BACK_KEY)
    return deliveries, fixes


def outcome(deliveries, events):
    """What the refreshes left, with each delivery known by its place in the world."""
    index = {str(d.pk): i for i, d in enumerate(deliveries)}
    stored = [
        (d.eta_pickup_at, d.eta_delivery_at, d.eta_confidence, d.eta_calculated_at)
        for d in sorted(Delivery.objects.filter(pk__in=[d.pk for d in deliveries]), key=lambda d: index[str(d.pk)])
    ]
    sent = [(group, index[e["deliveryId"]], {k: v for k, v in e.items() if k != "deliveryId"})
            for group, e in events if e["type"] == "delivery_eta_updated" and e["deliveryId"] in index]
    rows = [
        (index[str(row.delivery_id)], row.payload["data"]["change"],
         {k: v for k, v in row.payload["data"].items() if "eta" in k.lower() or "estimated" in k.lower()})
        for row in OutboxEvent.objects.filter(delivery_id__in=[d.pk for d in deliveries], type=ETA_TYPE,
                                              created_at=T1).order_by("seq")
    ]
    return stored, sent, rows


def drain(listener, group):
    return [(group, e) for e in listener.drain()]


def test_a_batch_gives_the_same_etas_events_and_webhook_rows_as_one_by_one(
    listen, django_capture_on_commit_callbacks, settings
):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    results = []
    for batched in (False, True):
        deliveries, fixes = world(django_capture_on_commit_callbacks, settings)
        customers = listen(*[delivery_group(d.pk) for d in deliveries])
        ops = listen(OPS_GROUP)
        customers.drain(), ops.drain()
        with time_machine.travel(T1, tick=False), django_capture_on_commit_callbacks(execute=True):
            if batched:
                fixes_process(fixes, now=T1)
            else:  # as the stream consumer did before: each delivery of each fix on its own
                for p in positions_persist(fixes, now=T1):
                    for delivery_id in p.active_delivery_ids:
                        eta_service.delivery_eta_on_fix(delivery_id=delivery_id, lat=p.fix.lat, lon=p.fix.lon, now=T1)
        events = drain(customers, "delivery") + drain(ops, "ops")
        for _, event in events:
            if event["type"] == "delivery_eta_updated":
                assert_event_shape(event, DeliveryEtaUpdatedEvent)
        results.append(outcome(deliveries, events))

    one_by_one, batch = results
    assert batch == one_by_one
    stored, sent, rows = batch
    # The story both tell: the stuck driver's ETA slipped (customer, ops, merchant told); on
    # schedule: stored, nobody told; throttled: untouched since T0; the stacked two: recomputed.
    assert [s[3] for s in stored] == [T1, T1, T0 + timedelta(milliseconds=2), T1, T1]
    assert sorted({i for _, i, _ in sent}) == sorted({i for i, _, _ in rows})
    assert 0 in {i for _, i, _ in sent} and not {1, 2} & {i for _, i, _ in sent}
    assert sorted(g for g, i, _ in sent if i == 0) == ["delivery", "ops"]


def test_a_batch_reads_writes_and_emits_in_a_fixed_number_of_statements(django_capture_on_commit_callbacks, settings):
    settings.ETA_MIN_INTERVAL_SECONDS = 15

    def statements(size):
        with time_machine.travel(T0, tick=False):
            drivers = [DriverFactory(location=km_north(-2.0), location_recorded_at=T0) for _ in range(size)]
            deliveries = [DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10)) for _ in range(size)]
            with django_capture_on_commit_callbacks(execute=True):
                for delivery, driver in zip(deliveries, drivers):
                    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        Driver.objects.filter(pk__in=[d.pk for d in drivers]).update(location=km_north(-2.0), location_recorded_at=T1)
        fixes = [(str(d.pk), km_north(-2.0).y, km_north(-2.0).x) for d in deliveries]
        with time_machine.travel(T1, tick=False), CaptureQueriesContext(connection) as ctx:
            with django_capture_on_commit_callbacks(execute=False):
                etas_on_fixes(fixes, now=T1)
        assert set(Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).values_list("eta_calculated_at", flat=True)) == {T1}
        return [q["sql"] for q in ctx.captured_queries]

    one, five = statements(1), statements(5)
    # read, UPDATE, the webhook throttle, the deliveries' payload read, INSERT (and savepoints)
    assert len(five) == len(one), "\n".join(q[:120] for q in five)
    assert sum("UPDATE" in q and "dispatch_delivery" in q for q in five) == 1
    assert sum("INSERT" in q and "notifications_outboxevent" in q for q in five) == 1


def test_with_redis_down_a_batch_is_throttled_by_the_stored_time(django_capture_on_commit_callbacks, settings, monkeypatch):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    with time_machine.travel(T0, tick=False):
        drivers = [DriverFactory(location=km_north(-2.0), location_recorded_at=T0) for _ in range(2)]
        deliveries = [DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10)) for _ in range(2)]
        with django_capture_on_commit_callbacks(execute=True):
            for delivery, driver in zip(deliveries, drivers):
                assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    Delivery.objects.filter(pk=deliveries[1].pk).update(eta_calculated_at=T0 - timedelta(seconds=30))

    class DeadRedis:
        def pipeline(self, transaction=False):
            raise redis.exceptions.ConnectionError("down")

    monkeypatch.setattr(eta_service, "get_redis", lambda: DeadRedis())
    now = T0 + timedelta(seconds=10)  # the first was computed 10 s ago, the second 40 s ago
    with time_machine.travel(now, tick=False), django_capture_on_commit_callbacks(execute=True):
        etas_on_fixes([(str(d.pk), km_north(-2.0).y, km_north(-2.0).x) for d in deliveries], now=now)

    calculated = dict(Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).values_list("pk", "eta_calculated_at"))
    assert calculated == {deliveries[0].pk: T0, deliveries[1].pk: now}


def test_the_batch_throttle_claims_like_the_single_one_and_survives_a_redis_that_forgot_its_script(settings):
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    settings.ETA_MIN_MOVE_METERS = 250
    a, b, c = "batch-a", "batch-b", "batch-c"
    here, far = km_north(0.0), km_north(0.3)
    assert eta_service.eta_recompute_due(delivery_id=a, lat=here.y, lon=here.x, now=T0) is True
    assert eta_service.eta_recompute_due(delivery_id=b, lat=here.y, lon=here.x, now=T0) is True
    eta_service.get_redis().script_flush()

    due = eta_service.etas_recompute_due(
        [(a, here.y, here.x), (b, far.y, far.x), (c, here.y, here.x)], now=T0 + timedelta(seconds=5)
    )

    assert due == [False, True, True]  # throttled; moved 300 m; never claimed
    assert eta_service.eta_recompute_due(delivery_id=b, lat=far.y, lon=far.x, now=T0 + timedelta(seconds=6)) is False


def test_a_batch_announces_an_eta_that_slipped_by_the_threshold_over_several_recomputes(
    listen, django_capture_on_commit_callbacks, settings
):
    """As one by one (tests/tracking/test_eta.py): a stuck driver's ETA, 15 s later at every
    recompute, is stored and announced once it is 30 s later than the one last announced."""
    settings.ETA_MIN_INTERVAL_SECONDS = 15
    with time_machine.travel(T0, tick=False):
        driver = DriverFactory(location=km_north(-2.0), location_recorded_at=T0, location_accuracy_m=8)
        delivery = DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10))
        with django_capture_on_commit_callbacks(execute=True):
            assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    told = Delivery.objects.get(pk=delivery.pk).eta_pickup_at
    customer = listen(delivery_group(delivery.pk))
    customer.drain()

    announced = []
    for s in (15, 30, 45, 60):
        now = T0 + timedelta(seconds=s)
        Driver.objects.filter(pk=driver.pk).update(location_recorded_at=now)
        with time_machine.travel(now, tick=False), django_capture_on_commit_callbacks(execute=True):
            etas_on_fixes([(str(delivery.pk), km_north(-2.0).y, km_north(-2.0).x)], now=now)
        stored = Delivery.objects.get(pk=delivery.pk)
        assert stored.eta_calculated_at == now
        announced += [(s, e["estimatedPickupTime"]) for e in customer.drain() if e["type"] == "delivery_eta_updated"]
        assert stored.eta_pickup_at == told + timedelta(seconds=announced[-1][0] if announced else 0)

    assert announced == [(30, (told + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")),
                         (60, (told + timedelta(seconds=60)).isoformat().replace("+00:00", "Z"))]
