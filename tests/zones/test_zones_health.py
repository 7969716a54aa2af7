"""Zone health: drivers online in the polygon, wait to assignment, demand and a 0-100 score,
written on the zone, cached in Redis for 60 s and announced to ops (formula: docs/zones.md)."""
import json
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.gis.geos import Point

from common.redis import get_redis
from config.asgi import application
from tests.api import assert_error, token_for
from tests.concurrency import held_elsewhere, race
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, ZoneFactory
from tests.typecheck import assert_event_shape
from zones import events
from zones.models import DeliveryZone
from zones.selectors import demand_level_for, health_score_for, zone_health_cached_many
from zones.services import zone_health_refresh, zone_update
from zones.tasks import refresh_zone_health

NOW = datetime(2026, 2, 1, 10, 0, 0, tzinfo=dt_timezone.utc)
CLOSED_PORT_REDIS = "redis://127.0.0.1:6399/0"  # nothing listens there

# Zones default to tests.factories.ZONE_BBOX, far from the demo city other tests crowd with
# drivers and deliveries; the drivers below stand in and around it.


def at(lon, lat):
    return Point(lon, lat, srid=4326)


def ago(**kw):
    return NOW - timedelta(**kw)


def online_driver(lon=30.55, lat=10.95, availability="available", fix_age_s=30):
    return DriverFactory(location=at(lon, lat), availability=availability, location_recorded_at=NOW - timedelta(seconds=fix_age_s))


def busy_zone():
    """3 drivers online in the zone, 2 deliveries waiting, waits 120/420 (assigned) and
    300/60 (still waiting): avg 225 s, demand 4, health 81 (see docs/zones.md)."""
    zone = ZoneFactory(name="Downtown", min_drivers_online=4)
    online_driver(fix_age_s=60)
    online_driver(availability="busy", fix_age_s=300)
    online_driver(lon=30.60, lat=10.95, fix_age_s=0)  # on the east edge
    online_driver(availability="on_break")
    online_driver(fix_age_s=601)  # stale fix
    online_driver(availability="busy", fix_age_s=700)  # stale fix
    online_driver(lon=30.70)  # outside
    online_driver(availability="offline")
    DeliveryFactory(zone=zone, status="assigned", ready_at=ago(minutes=10), assigned_at=ago(minutes=8))
    DeliveryFactory(zone=zone, status="picked_up", ready_at=ago(minutes=20), assigned_at=ago(minutes=13))
    DeliveryFactory(zone=zone, status="delivered", ready_at=ago(minutes=70), assigned_at=ago(minutes=61))  # before window
    DeliveryFactory(zone=zone, status="ready", ready_at=ago(minutes=5))
    DeliveryFactory(zone=zone, status="ready", ready_at=ago(minutes=1))
    DeliveryFactory(zone=None, status="ready", ready_at=ago(minutes=30), pickup_location=at(30.55, 10.95))
    return zone


EXPECTED = {
    "currentDriversOnline": 3,
    "minDriversRequired": 4,
    "avgWaitTimeSeconds": 225,
    "targetWaitTimeSeconds": 300,
    "demandLevel": 4,
    "healthScore": 81,
    "updatedAt": "2026-02-01T10:00:00Z",
}


# --------------------------------------------------------------------- computation


@pytest.mark.django_db
def test_health_counts_fresh_online_drivers_in_the_polygon_waits_and_demand():
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()

        assert zone_health_refresh() == 1

    zone.refresh_from_db()
    assert (zone.current_drivers_online, zone.avg_wait_time_seconds, zone.demand_level, zone.health_score) == (3, 225, 4, 81)
    assert zone.last_updated == NOW
    assert zone.below_minimum


@pytest.mark.django_db
def test_the_wait_window_and_fix_freshness_move_with_the_clock():
    with time_machine.travel(NOW, tick=False) as clock:
        zone = ZoneFactory(name="Downtown", min_drivers_online=1)
        online_driver(fix_age_s=0)
        DeliveryFactory(zone=zone, status="delivered", ready_at=ago(minutes=32), assigned_at=ago(minutes=30))
        zone_health_refresh()
        zone.refresh_from_db()
        assert (zone.current_drivers_online, zone.avg_wait_time_seconds, zone.health_score) == (1, 120, 100)

        clock.shift(timedelta(minutes=11))  # the driver's fix is now older than 600 s
        zone_health_refresh()
        zone.refresh_from_db()
        assert (zone.current_drivers_online, zone.avg_wait_time_seconds) == (0, 120)
        assert zone.health_score == 50  # no coverage; wait and demand still fine

        clock.shift(timedelta(minutes=20))  # the assignment has left the 60-minute window
        zone_health_refresh()
        zone.refresh_from_db()
        assert zone.avg_wait_time_seconds == 0
        assert zone.last_updated == NOW + timedelta(minutes=31)


@pytest.mark.django_db
def test_a_delivery_left_waiting_drags_the_average_wait_up_as_time_passes():
    with time_machine.travel(NOW, tick=False) as clock:
        zone = ZoneFactory(name="Downtown", min_drivers_online=0)
        DeliveryFactory(zone=zone, status="ready", ready_at=NOW)
        clock.shift(timedelta(minutes=15))

        zone_health_refresh()

    zone.refresh_from_db()
    assert (zone.avg_wait_time_seconds, zone.demand_level) == (900, 10)
    assert zone.health_score == 50  # coverage 1 (no minimum), wait 3x target → 0, demand 10 → 0


@pytest.mark.parametrize(
    "ready,online,level",
    [(0, 0, 1), (0, 5, 1), (1, 10, 2), (1, 2, 3), (2, 3, 4), (3, 3, 6), (5, 3, 9), (6, 3, 10), (40, 3, 10), (1, 0, 10)],
)
def test_demand_level_grows_with_ready_deliveries_per_online_driver(ready, online, level):
    assert demand_level_for(ready=ready, online=online) == level


@pytest.mark.parametrize(
    "online,min_drivers,avg_wait,demand,score",
    [
        (5, 5, 0, 1, 100),
        (8, 5, 240, 7, 87),  # the seed's example zone (the seed shows 85)
        (0, 5, 600, 10, 0),
        (0, 0, 0, 1, 100),
        (2, 4, 300, 1, 75),
        (4, 4, 450, 1, 85),
    ],
)
def test_health_score_weighs_coverage_wait_and_demand(online, min_drivers, avg_wait, demand, score):
    assert health_score_for(online=online, min_drivers=min_drivers, avg_wait=avg_wait, target_wait=300, demand=demand) == score


# ------------------------------------------------------------- cache and events


@pytest.mark.django_db
def test_the_job_caches_health_for_60_seconds_and_tells_ops_after_commit(listen, django_capture_on_commit_callbacks):
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()
    ops = listen("ops")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        zone_health_refresh(now=NOW)
    assert [e for e in ops.drain(timeout=0.2) if e["type"] == "zone_health_updated"] == []  # nothing before commit
    assert get_redis().get(f"zone:health:{zone.pk}") is None
    for callback in callbacks:
        callback()

    cached = json.loads(get_redis().get(f"zone:health:{zone.pk}"))
    assert cached == {"zoneId": str(zone.pk), **EXPECTED}
    assert 55 <= get_redis().ttl(f"zone:health:{zone.pk}") <= 60
    (event,) = [e for e in ops.drain() if e["type"] == "zone_health_updated"]
    assert_event_shape(event, events.ZoneHealthUpdatedEvent)
    assert event == {
        "type": "zone_health_updated",
        "zoneId": str(zone.pk),
        "zoneName": "Downtown",
        "metrics": {k: v for k, v in EXPECTED.items() if k != "updatedAt"},
        "updatedAt": "2026-02-01T10:00:00Z",
    }


@pytest.mark.django_db
def test_running_the_job_twice_at_the_same_time_writes_the_same_values(django_capture_on_commit_callbacks):
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()
    with django_capture_on_commit_callbacks(execute=True):
        zone_health_refresh(now=NOW)
    first = DeliveryZone.objects.values(*HEALTH).get(pk=zone.pk)
    first_cache = get_redis().get(f"zone:health:{zone.pk}")

    with django_capture_on_commit_callbacks(execute=True):
        assert zone_health_refresh(now=NOW) == 1

    assert DeliveryZone.objects.values(*HEALTH).get(pk=zone.pk) == first
    assert get_redis().get(f"zone:health:{zone.pk}") == first_cache


HEALTH = ("current_drivers_online", "avg_wait_time_seconds", "demand_level", "health_score", "last_updated")


@pytest.mark.django_db
def test_many_zones_are_cached_together_and_read_back_with_one_mget(django_capture_on_commit_callbacks):
    zones = [ZoneFactory(name=f"Z{i}", bbox=(30.5 + i, 10.9, 30.6 + i, 11.0), min_drivers_online=4) for i in range(3)]
    with django_capture_on_commit_callbacks(execute=True):
        assert zone_health_refresh(now=NOW, batch_size=2) == 3
    get_redis().set("zone:health:not-a-zone", "{broken")

    cached = zone_health_cached_many([z.pk for z in zones] + ["not-a-zone", "missing"])

    assert set(cached) == {str(z.pk) for z in zones}
    assert all(c["minDriversRequired"] == 4 and c["updatedAt"] == "2026-02-01T10:00:00Z" for c in cached.values())


@pytest.mark.django_db
def test_the_health_endpoint_serves_the_cached_value(ops, django_capture_on_commit_callbacks):
    zone = ZoneFactory(name="Downtown", min_drivers_online=4)
    with django_capture_on_commit_callbacks(execute=True):
        zone_health_refresh(now=NOW)
    cached = json.loads(get_redis().get(f"zone:health:{zone.pk}"))
    cached["healthScore"] = 7  # only the cache says 7
    get_redis().set(f"zone:health:{zone.pk}", json.dumps(cached), ex=60)

    r = ops.get(f"/v2/zones/{zone.pk}/health")

    assert r.status_code == 200, r.content
    assert r["X-Cache"] == "hit"
    assert r.json() == cached


@pytest.mark.django_db
def test_on_a_cache_miss_the_health_endpoint_computes_and_caches_it(ops):
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()
        assert get_redis().get(f"zone:health:{zone.pk}") is None

        r = ops.get(f"/v2/zones/{zone.pk}/health")

    assert r.status_code == 200, r.content
    assert r["X-Cache"] == "miss"
    assert r.json() == {"zoneId": str(zone.pk), **EXPECTED}
    assert json.loads(get_redis().get(f"zone:health:{zone.pk}")) == r.json()
    assert 0 < get_redis().ttl(f"zone:health:{zone.pk}") <= 60
    zone.refresh_from_db()
    assert zone.health_score is None  # a read does not write the zone row


@pytest.mark.django_db
def test_with_redis_down_the_health_endpoint_still_answers_by_computing(ops, settings):
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()
        settings.REDIS_URL = CLOSED_PORT_REDIS

        r = ops.get(f"/v2/zones/{zone.pk}/health")

    assert r.status_code == 200, r.content
    assert r["X-Cache"] == "unavailable"
    assert r.json() == {"zoneId": str(zone.pk), **EXPECTED}


@pytest.mark.django_db
def test_with_redis_down_the_job_still_updates_every_zone(settings, caplog, django_capture_on_commit_callbacks):
    with time_machine.travel(NOW, tick=False):
        zone = busy_zone()
    settings.REDIS_URL = CLOSED_PORT_REDIS

    with django_capture_on_commit_callbacks(execute=True):
        assert zone_health_refresh(now=NOW) == 1

    zone.refresh_from_db()
    assert zone.health_score == 81
    assert "Redis unavailable" in caplog.text


@pytest.mark.django_db
def test_editing_a_zone_drops_its_cached_health(ops, django_capture_on_commit_callbacks):
    zone = ZoneFactory(name="Downtown", min_drivers_online=4)
    with django_capture_on_commit_callbacks(execute=True):
        zone_health_refresh(now=NOW)
        zone_update(zone_id=zone.pk, min_drivers_online=0)

    assert get_redis().get(f"zone:health:{zone.pk}") is None
    r = ops.get(f"/v2/zones/{zone.pk}/health")
    assert r["X-Cache"] == "miss" and r.json()["minDriversRequired"] == 0


@pytest.mark.django_db
def test_health_of_an_unknown_zone_is_a_404(ops):
    assert_error(ops.get("/v2/zones/00000000-0000-0000-0000-000000000000/health"), 404)


@pytest.mark.django_db
def test_the_periodic_task_refreshes_every_zone():
    a, b = ZoneFactory(name="A", min_drivers_online=4), ZoneFactory(name="B", bbox=(30.7, 10.9, 30.8, 11.0), min_drivers_online=4)

    assert refresh_zone_health.delay().get() >= 2  # every zone there is (other tests may leave some)

    assert set(DeliveryZone.objects.filter(pk__in=[a.pk, b.pk]).values_list("health_score", flat=True)) == {50}


# ------------------------------------------------------------------- concurrency


@pytest.mark.django_db(transaction=True)
def test_a_zone_another_run_is_refreshing_is_skipped_not_waited_for():
    busy = ZoneFactory(name="Busy", min_drivers_online=4)
    free = ZoneFactory(name="Free", bbox=(30.7, 10.9, 30.8, 11.0), min_drivers_online=4)
    with held_elsewhere(lambda: DeliveryZone.objects.select_for_update(no_key=True).get(pk=busy.pk)):  # another run
        refreshed = zone_health_refresh(now=NOW, zone_ids=[busy.pk, free.pk])

    assert refreshed == 1
    assert DeliveryZone.objects.get(pk=free.pk).health_score is not None
    assert DeliveryZone.objects.get(pk=busy.pk).health_score is None


@pytest.mark.django_db(transaction=True)
def test_two_jobs_at_once_refresh_each_zone_and_both_finish():
    ids = [ZoneFactory(name=f"Z{i}", bbox=(30.5 + i, 10.9, 30.6 + i, 11.0), min_drivers_online=4).pk for i in range(6)]
    results, errors = race([lambda: zone_health_refresh(now=NOW, zone_ids=ids, batch_size=2)] * 2)

    assert errors == []
    assert 6 <= sum(results) <= 12
    assert not DeliveryZone.objects.filter(pk__in=ids, health_score__isnull=True).exists()


@pytest.mark.django_db(transaction=True)
def test_the_ops_socket_relays_zone_health_updates():
    ops_user = OpsUserFactory()
    zone = ZoneFactory(name="Downtown", min_drivers_online=4)

    async def scenario():
        from channels.db import database_sync_to_async

        comm = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(ops_user)}")
        assert (await comm.connect())[0]
        await database_sync_to_async(zone_health_refresh)(now=NOW, zone_ids=[zone.pk])
        event = await comm.receive_json_from(timeout=5)
        while event.get("zoneId") != str(zone.pk):  # the ops group is shared with other tests
            event = await comm.receive_json_from(timeout=5)
        assert_event_shape(event, events.ZoneHealthUpdatedEvent)
        assert (event["zoneId"], event["metrics"]["minDriversRequired"]) == (str(zone.pk), 4)
        await comm.disconnect()

    async_to_sync(scenario)()
