"""The Redis GEO index of dispatchable drivers and the "who is near" selector (issue "Redis GEO
index"; SPEC "Dispatch"): kept in line with committed state, rebuilt and reconciled from
PostgreSQL, optional when Redis is down, and answering exactly what PostGIS answers."""
import io
import logging
import math
import random
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from availability import geo, live
from availability.models import DriverAvailabilityHistory
from availability.tasks import reconcile_geo_index
from common.actors import Actor
from common.redis import get_redis
from availability.models import Driver
from workflows.deliveries import assignment_create, delivery_cancel
from workflows import drivers as driver_workflows
from workflows.drivers import driver_location_record
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, DriverFactory, point

pytestmark = pytest.mark.django_db

CLOSED_PORT_REDIS = "redis://127.0.0.1:6399/0"
REDIS_EARTH_RADIUS_M = 6372797.560856  # what GEOSEARCH uses


def r():
    return get_redis()


def in_geo(driver) -> bool:
    return r().geopos(geo.GEO_KEY, str(driver.pk))[0] is not None


def index_snapshot():
    return {
        "geo": set(r().zrange(geo.GEO_KEY, 0, -1)),
        "fix": r().zrange(geo.FIX_KEY, 0, -1, withscores=True),
        "status": r().hgetall(geo.STATUS_KEY),
    }


def expected_snapshot():
    drivers = list(Driver.objects.all())
    indexed = [d for d in drivers if d.availability == "available" and d.location is not None and d.location_recorded_at]
    return {
        "geo": {str(d.pk) for d in indexed},
        "fix": sorted(((str(d.pk), d.location_recorded_at.timestamp()) for d in indexed), key=lambda m: (m[1], m[0])),
        "status": {str(d.pk): d.availability for d in drivers},
    }


def haversine_m(lat1, lon1, lat2, lon2, radius=REDIS_EARTH_RADIUS_M):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * radius * math.asin(math.sqrt(a))


def destination(lat, lon, distance_m, bearing_deg, radius=REDIS_EARTH_RADIUS_M):
    d, b = distance_m / radius, math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), math.degrees(l2)


def near(distance_m, bearing=45.0):
    return point(*destination(*CITY, distance_m, bearing))


# ------------------------------------------------------------- writes follow committed state


def test_each_availability_transition_is_reflected_in_the_index_after_commit(django_capture_on_commit_callbacks):
    driver = DriverFactory()
    me = Actor("driver", driver.pk)
    key = str(driver.pk)

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="", actor=me)
    assert not in_geo(driver) and r().zscore(geo.FIX_KEY, key) is None
    assert r().hget(geo.STATUS_KEY, key) == "on_break"

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_resume(driver_id=driver.pk, actor=me)
    assert r().hget(geo.STATUS_KEY, key) == "available"
    lon, lat = r().geopos(geo.GEO_KEY, key)[0]
    assert (lat, lon) == (pytest.approx(CITY[0], abs=1e-5), pytest.approx(CITY[1], abs=1e-5))
    assert r().zscore(geo.FIX_KEY, key) == driver.location_recorded_at.timestamp()

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_change(driver_id=driver.pk, to_state="offline", reason="stale_location", actor=Actor.system())
    assert not in_geo(driver) and r().zscore(geo.FIX_KEY, key) is None
    assert r().hget(geo.STATUS_KEY, key) == "offline"

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_resume(driver_id=driver.pk, actor=me)
    assert in_geo(driver)

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_end_shift(driver_id=driver.pk, actor=me)
    assert not in_geo(driver) and r().hget(geo.STATUS_KEY, key) == "shift_ended"

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_resume(driver_id=driver.pk, actor=me)
        driver_workflows.availability_override(driver_id=driver.pk, to_state="paused", reason="docs", actor=Actor("admin", None))
    assert not in_geo(driver) and r().hget(geo.STATUS_KEY, key) == "paused"
    assert index_snapshot() == expected_snapshot()


@pytest.mark.parametrize("stored", ["none", "older"])
def test_a_driver_resuming_right_after_a_fix_not_yet_in_postgresql_is_indexed_where_that_fix_is(
    django_capture_on_commit_callbacks, stored,
):
    """The app's order: a fix (the fast lane: Redis at once, PostgreSQL by the stream consumer a
    moment later), then resume. The resume read no position in PostgreSQL and took the driver
    out of the index; the fix's later write saw "available" and did not repair it: invisible to
    dispatch until the reconcile (20-75 s in an audit), or indexed at the older place."""
    older = {"location": None, "location_recorded_at": None} if stored == "none" else {
        "location": near(3000), "location_recorded_at": timezone.now() - timedelta(minutes=5)}
    driver = DriverFactory(availability="offline", **older)
    now = timezone.now()
    lat, lon = destination(*CITY, 200, 90)
    live.fix_record_persisted(live.Fix(driver_id=str(driver.pk), lat=lat, lon=lon, recorded_at=now.timestamp()))
    assert not in_geo(driver)  # (offline: a fix does not index it)

    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk))

    found = geo.drivers_available_near(lat=lat, lon=lon, radius_km=0.1, limit=5)
    assert [d.driver_id for d in found] == [str(driver.pk)]
    assert r().zscore(geo.FIX_KEY, str(driver.pk)) == pytest.approx(now.timestamp())
    assert geo.drivers_available_near(lat=lat, lon=lon, radius_km=0.1, limit=5)  # (the search kept it: fresh)


def test_a_driver_who_becomes_busy_leaves_the_index_and_returns_when_the_delivery_ends(django_capture_on_commit_callbacks):
    driver = DriverFactory()
    delivery = DeliveryFactory()
    call_command("rebuild_geo_index", stdout=io.StringIO())
    assert in_geo(driver)

    with django_capture_on_commit_callbacks(execute=True):
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor("admin", None))
    assert not in_geo(driver)
    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "busy"

    with django_capture_on_commit_callbacks(execute=True):
        delivery_cancel(delivery_id=delivery.pk, reason="customer changed mind", actor=Actor("admin", None))
    assert in_geo(driver)
    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "available"


def test_a_transition_that_rolls_back_leaves_the_index_alone(django_capture_on_commit_callbacks):
    driver = DriverFactory()
    call_command("rebuild_geo_index", stdout=io.StringIO())
    before = index_snapshot()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=5, reason="", actor=Actor.system())
                1 / 0

    assert callbacks == []
    assert index_snapshot() == before
    assert in_geo(driver)


def test_an_index_write_for_an_older_fix_arriving_late_does_not_move_the_driver_back(django_capture_on_commit_callbacks):
    """Two fixes commit in order, but their after-commit Redis writes run in the other order
    (two workers): the index keeps the newer fix."""
    driver = DriverFactory(location_recorded_at=timezone.now() - timedelta(minutes=1))
    t = timezone.now() - timedelta(seconds=20)

    with django_capture_on_commit_callbacks() as callbacks:
        driver_location_record(driver_id=driver.pk, lat=12.90, lon=77.60, recorded_at=t)
        driver_location_record(driver_id=driver.pk, lat=12.95, lon=77.60, recorded_at=t + timedelta(seconds=10))
    assert len(callbacks) == 2
    for callback in reversed(callbacks):
        callback()

    lon, lat = r().geopos(geo.GEO_KEY, str(driver.pk))[0]
    assert lat == pytest.approx(12.95, abs=1e-5)
    assert r().zscore(geo.FIX_KEY, str(driver.pk)) == (t + timedelta(seconds=10)).timestamp()


def test_an_index_write_for_a_fix_arriving_after_a_break_began_does_not_bring_the_driver_back(
    django_capture_on_commit_callbacks,
):
    """A fix commits while the driver is available; before its Redis write runs, the driver
    takes a break (committed and indexed). The late fix write must not re-add the driver."""
    driver = DriverFactory(location_recorded_at=timezone.now() - timedelta(minutes=1))
    call_command("rebuild_geo_index", stdout=io.StringIO())

    with django_capture_on_commit_callbacks() as fix_callbacks:
        assert driver_location_record(driver_id=driver.pk, lat=12.95, lon=77.60, recorded_at=timezone.now()).accepted
    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=10, reason="", actor=Actor.system())
    assert not in_geo(driver)
    for callback in fix_callbacks:
        callback()

    assert not in_geo(driver)
    assert r().zscore(geo.FIX_KEY, str(driver.pk)) is None
    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "on_break"


# --------------------------------------------------------------------- rebuild and reconcile


def make_fleet():
    now = timezone.now()
    fleet = {
        "available": DriverFactory(location=near(800)),
        "available_far": DriverFactory(location=near(40_000)),
        "available_stale": DriverFactory(location=near(300), location_recorded_at=now - timedelta(hours=2)),
        "available_no_fix": DriverFactory(location=None, location_recorded_at=None),
        "on_break": DriverFactory(availability="on_break"),
        "busy": DriverFactory(availability="busy"),
        "offline": DriverFactory(availability="offline"),
        "paused": DriverFactory(availability="paused"),
        "shift_ended": DriverFactory(availability="shift_ended", location=None, location_recorded_at=None),
    }
    return fleet


def test_rebuild_geo_index_restores_a_flushed_index_from_postgresql():
    fleet = make_fleet()
    r().flushdb()

    out = io.StringIO()
    call_command("rebuild_geo_index", stdout=out)

    assert index_snapshot() == expected_snapshot()
    assert index_snapshot()["geo"] == {str(fleet[k].pk) for k in ("available", "available_far", "available_stale")}
    assert len(index_snapshot()["status"]) == 9
    assert "3 available drivers" in out.getvalue()


def test_rebuild_geo_index_drops_members_postgresql_does_not_know():
    fleet = make_fleet()
    ghost = str(uuid.uuid4())
    r().geoadd(geo.GEO_KEY, (77.6, 12.97, ghost))
    r().geoadd(geo.GEO_KEY, (77.6, 12.97, str(fleet["on_break"].pk)))
    r().zadd(geo.FIX_KEY, {ghost: 1.0, "junk": 2.0})
    r().hset(geo.STATUS_KEY, mapping={ghost: "available", str(fleet["offline"].pk): "available"})

    call_command("rebuild_geo_index", stdout=io.StringIO())

    assert index_snapshot() == expected_snapshot()
    assert ghost not in index_snapshot()["status"]


def test_a_rebuild_bumps_every_driver_s_version(monkeypatch):
    """So that a reconcile that read Redis before the swap does not write its reading over it."""
    fleet = make_fleet()
    before = {m: int(v) for m, v in r().hgetall(geo.VERSION_KEY).items()}
    geo.rebuild_index()
    after = {m: int(v) for m, v in r().hgetall(geo.VERSION_KEY).items()}
    assert {str(d.pk) for d in fleet.values()} <= set(after)
    assert all(after[m] == before.get(m, 0) + 1 for m in after)


def test_the_rebuild_command_repairs_what_changed_while_it_read_postgresql(monkeypatch):
    """The swap writes the state read from PostgreSQL: a driver who went on break in between
    was indexed as available until the reconcile job's next run."""
    fleet = make_fleet()
    driver = fleet["available"]
    real = geo._desired_state
    reads = []

    def read_then_break(now):
        state = real(now)
        if not reads:  # the rebuild's read; the break commits before its swap
            Driver.objects.filter(pk=driver.pk).update(availability="on_break")
        reads.append(now)
        return state

    monkeypatch.setattr(geo, "_desired_state", read_then_break)
    out = io.StringIO()
    call_command("rebuild_geo_index", stdout=out)

    assert len(reads) == 2  # the rebuild's and the reconcile's
    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "on_break"
    assert not in_geo(driver)
    assert "reconciled" in out.getvalue()


def test_rebuild_on_an_empty_database_empties_the_index():
    r().geoadd(geo.GEO_KEY, (77.6, 12.97, "junk"))
    r().hset(geo.STATUS_KEY, "junk", "available")

    assert geo.rebuild_index() == 0

    assert index_snapshot() == {"geo": set(), "fix": [], "status": {}}


def test_reconcile_repairs_drift_and_reports_what_it_did():
    fleet = make_fleet()
    geo.rebuild_index()
    ghost = str(uuid.uuid4())
    # an extra member (a driver on break), a missing member, a wrong status, an unknown driver
    r().geoadd(geo.GEO_KEY, (77.6, 12.97, str(fleet["on_break"].pk)))
    r().zadd(geo.FIX_KEY, {str(fleet["on_break"].pk): timezone.now().timestamp()})
    r().zrem(geo.GEO_KEY, str(fleet["available"].pk))
    r().zrem(geo.FIX_KEY, str(fleet["available"].pk))
    r().hset(geo.STATUS_KEY, str(fleet["busy"].pk), "available")
    r().hset(geo.STATUS_KEY, ghost, "available")
    assert index_snapshot() != expected_snapshot()

    result = geo.reconcile_index()

    assert result == {"removed": 1, "indexed": 3, "statusFixed": 2}
    assert index_snapshot() == expected_snapshot()
    # a second run finds nothing to remove or fix
    assert geo.reconcile_index() == {"removed": 0, "indexed": 3, "statusFixed": 0}


def test_transitions_rebuild_and_reconcile_stamp_each_status_with_when_it_began(django_capture_on_commit_callbacks):
    """`{fleet}:drivers:status_at` (read into the ops position digest) holds PostgreSQL's
    `last_availability_change` of the status beside it, however the status was written."""
    driver = DriverFactory()
    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="tea",
                                                 actor=Actor("driver", driver.pk))
    began = Driver.objects.get(pk=driver.pk).last_availability_change
    member = str(driver.pk)
    assert float(r().hget(geo.STATUS_AT_KEY, member)) == pytest.approx(began.timestamp(), abs=1e-6)

    r().delete(geo.STATUS_KEY, geo.STATUS_AT_KEY)
    geo.rebuild_index()
    assert r().hget(geo.STATUS_KEY, member) == "on_break"
    assert float(r().hget(geo.STATUS_AT_KEY, member)) == pytest.approx(began.timestamp(), abs=1e-6)

    r().hset(geo.STATUS_KEY, member, "available")  # drift: the status and its stamp from elsewhere
    r().hset(geo.STATUS_AT_KEY, member, "1")
    assert geo.reconcile_index()["statusFixed"] == 1
    assert r().hget(geo.STATUS_KEY, member) == "on_break"
    assert float(r().hget(geo.STATUS_AT_KEY, member)) == pytest.approx(began.timestamp(), abs=1e-6)

    r().hdel(geo.STATUS_AT_KEY, member)  # a right status written before stamps existed: stamped
    assert geo.reconcile_index()["statusFixed"] == 0
    assert float(r().hget(geo.STATUS_AT_KEY, member)) == pytest.approx(began.timestamp(), abs=1e-6)

    ghost = str(uuid.uuid4())  # a driver PostgreSQL does not have: both go
    r().hset(geo.STATUS_KEY, ghost, "available")
    r().hset(geo.STATUS_AT_KEY, ghost, "5")
    geo.reconcile_index()
    assert r().hget(geo.STATUS_KEY, ghost) is None and r().hget(geo.STATUS_AT_KEY, ghost) is None


def test_reconcile_moves_a_member_indexed_at_the_wrong_place():
    fleet = make_fleet()
    geo.rebuild_index()
    r().geoadd(geo.GEO_KEY, (0.0, 0.0, str(fleet["available"].pk)))

    geo.reconcile_index()

    lon, lat = r().geopos(geo.GEO_KEY, str(fleet["available"].pk))[0]
    assert (lat, lon) == (pytest.approx(fleet["available"].location.y, abs=1e-5),
                          pytest.approx(fleet["available"].location.x, abs=1e-5))


def test_reconcile_keeps_a_newer_fix_that_only_redis_has():
    """The fast lane's fixes reach PostgreSQL later (the stream consumer; more while it is
    down): the reconcile must not move a driver back to PostgreSQL's older fix, nor hand the
    index a stale fix time that the search would purge."""
    driver = DriverFactory(location_recorded_at=timezone.now() - timedelta(seconds=700))
    geo.rebuild_index()
    now = timezone.now()
    live.fix_record_persisted(live.Fix(driver_id=str(driver.pk), lat=12.99, lon=77.61, recorded_at=now.timestamp()))

    geo.reconcile_index()

    lon, lat = r().geopos(geo.GEO_KEY, str(driver.pk))[0]
    assert (round(lat, 4), round(lon, 4)) == (12.99, 77.61)
    assert r().zscore(geo.FIX_KEY, str(driver.pk)) == pytest.approx(now.timestamp())
    found = geo.drivers_available_near(lat=12.99, lon=77.61, radius_km=1, limit=5)
    assert str(driver.pk) in [d.driver_id for d in found]


def test_reconcile_racing_a_break_leaves_the_break_in_the_index(django_capture_on_commit_callbacks, monkeypatch):
    """The snapshot is read, then the driver goes on break (its own write to Redis), then the
    reconcile writes: the break, newer than the snapshot, stays."""
    driver = DriverFactory()
    geo.rebuild_index()
    snapshot = geo._desired_state

    def snapshot_then_break(now):
        state = snapshot(now)  # the driver available here
        with django_capture_on_commit_callbacks(execute=True):
            driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="tea",
                                                     actor=Actor("driver", driver.pk))
        return state

    monkeypatch.setattr(geo, "_desired_state", snapshot_then_break)
    geo.reconcile_index()

    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "on_break"
    assert not in_geo(driver)


def test_reconcile_racing_a_break_and_a_resume_leaves_the_driver_available(django_capture_on_commit_callbacks, monkeypatch):
    """Redis is read (available), the driver goes on break, PostgreSQL is read (on break), the
    driver resumes: the status the reconcile read is back, but the snapshot is older than it."""
    driver = DriverFactory()
    geo.rebuild_index()
    snapshot = geo._desired_state
    actor = Actor("driver", driver.pk)

    def break_snapshot_resume(now):
        with django_capture_on_commit_callbacks(execute=True):
            driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="tea", actor=actor)
        state = snapshot(now)  # the driver on break here
        with django_capture_on_commit_callbacks(execute=True):
            driver_workflows.availability_resume(driver_id=driver.pk, actor=actor)
        return state

    monkeypatch.setattr(geo, "_desired_state", break_snapshot_resume)
    geo.reconcile_index()

    assert Driver.objects.get(pk=driver.pk).availability == "available"
    assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "available"
    assert in_geo(driver)


def test_reconcile_sends_only_the_members_that_differ(monkeypatch):
    fleet = make_fleet()
    geo.rebuild_index()
    sent = []
    register = get_redis().register_script

    def counting(source):
        script = register(source)

        def call(keys, args):
            sent.append(len(args))
            return script(keys=keys, args=args)

        return call

    monkeypatch.setattr(type(get_redis()), "register_script", lambda self, source: counting(source))
    assert geo.reconcile_index() == {"removed": 0, "indexed": 3, "statusFixed": 0}
    assert sent == []  # nothing differs: nothing written
    r().geoadd(geo.GEO_KEY, (0.0, 0.0, str(fleet["available"].pk)))  # one member at the wrong place
    geo.reconcile_index()
    assert sent == [8]  # that member alone (eight arguments a member)


def test_the_reconcile_task_runs_and_repairs_the_index():
    fleet = make_fleet()
    r().hset(geo.STATUS_KEY, "junk", "busy")

    result = reconcile_geo_index.delay().get(timeout=10)

    assert result["indexed"] == 3
    assert index_snapshot() == expected_snapshot()
    assert str(fleet["available"].pk) in index_snapshot()["geo"]


def test_a_driver_beyond_redis_geo_latitudes_is_stored_without_breaking_the_index(django_capture_on_commit_callbacks):
    """Redis GEO refuses |lat| > 85.05°; one such driver must not fail writes, the rebuild or
    the reconcile for everyone else."""
    polar = DriverFactory(location_recorded_at=timezone.now() - timedelta(minutes=1))
    other = DriverFactory()

    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(polar.user).post(f"/v2/drivers/{polar.pk}/location", {"lat": 89.5, "lon": 10.0}, format="json")
    assert response.status_code == 200, response.content
    polar.refresh_from_db()
    assert polar.location.y == 89.5
    assert not in_geo(polar)

    assert geo.rebuild_index() == 1
    assert in_geo(other) and not in_geo(polar)
    assert r().hget(geo.STATUS_KEY, str(polar.pk)) == "available"
    r().zrem(geo.GEO_KEY, str(other.pk))
    assert geo.reconcile_index()["indexed"] == 1
    assert in_geo(other)


def test_a_search_around_a_point_beyond_redis_geo_latitudes_finds_drivers_there(ops, django_capture_on_commit_callbacks):
    """GEOSEARCH refuses a centre beyond ±85.05°: a delivery or a quote with such a pickup was a
    500 (found by schemathesis); the PostGIS path searches there, where drivers are stored."""
    polar = DriverFactory(location=point(-87.30, -71.10))
    pickup, dropoff = {"lat": -87.301, "lon": -71.10}, {"lat": -87.31, "lon": -71.12}

    quote = ops.post("/v2/quotes", {"pickupLocation": pickup, "dropoffLocation": dropoff}, format="json")
    assert quote.status_code == 200, quote.content
    assert [d.driver_id for d in geo.drivers_available_near(lat=-87.301, lon=-71.10, radius_km=5)] == [str(polar.pk)]

    with django_capture_on_commit_callbacks(execute=True):
        created = ops.post("/v2/deliveries", {"sellerOrderId": "polar-1", "storeName": "Polar store",
                                               "pickupLocation": pickup, "dropoffLocation": dropoff}, format="json")
    assert created.status_code == 201, created.content
    offers = ops.get(f"/v2/deliveries/{created.json()['id']}/offers").json()
    assert [o["driverId"] for o in offers["offers"]] == [str(polar.pk)]


# ---------------------------------------------------------------------------- Redis down


@pytest.fixture
def redis_down(settings):
    """Point the Redis client at a closed port (pytest-django restores the setting)."""
    settings.REDIS_URL = CLOSED_PORT_REDIS


def test_with_redis_down_a_location_fix_still_commits(redis_down, caplog, django_capture_on_commit_callbacks):
    driver = DriverFactory(location_recorded_at=timezone.now() - timedelta(minutes=1))
    recorded = timezone.now().replace(microsecond=0)

    with caplog.at_level(logging.WARNING), django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client_for(driver.user).post(
            f"/v2/drivers/{driver.pk}/location",
            {"lat": 12.95, "lon": 77.61, "recordedAt": recorded.isoformat()}, format="json",
        )

    assert response.status_code == 200, response.content
    assert response.json()["accepted"] is True
    assert len(callbacks) == 1  # the index write ran, and failed quietly
    driver.refresh_from_db()
    assert (driver.location.y, driver.location.x, driver.location_recorded_at) == (12.95, 77.61, recorded)
    assert any("GEO index not updated" in rec.getMessage() for rec in caplog.records)


def test_with_redis_down_taking_a_break_and_resuming_still_commit(redis_down, caplog, django_capture_on_commit_callbacks):
    driver = DriverFactory()
    client = client_for(driver.user)

    with caplog.at_level(logging.WARNING), django_capture_on_commit_callbacks(execute=True):
        took = client.post(f"/v2/drivers/{driver.pk}/availability/take-break", {"durationMinutes": 10}, format="json")
    assert took.status_code == 200, took.content
    driver.refresh_from_db()
    assert driver.availability == "on_break"

    with django_capture_on_commit_callbacks(execute=True):
        resumed = client.post(f"/v2/drivers/{driver.pk}/availability/resume")
    assert resumed.status_code == 200, resumed.content
    assert resumed.json()["status"] == "available"
    driver.refresh_from_db()
    assert driver.availability == "available"
    assert list(DriverAvailabilityHistory.objects.filter(driver=driver).order_by("timestamp").values_list("to_state", flat=True)) == [
        "on_break", "available"]
    assert any("GEO index not updated" in rec.getMessage() for rec in caplog.records)


def test_with_redis_down_drivers_near_are_found_with_postgis(redis_down, caplog):
    now = timezone.now()
    second = DriverFactory(location=near(2_000, 90))
    first = DriverFactory(location=near(500, 200))
    third = DriverFactory(location=near(4_500, 10))
    DriverFactory(location=near(6_000))  # outside 5 km
    DriverFactory(location=near(100), location_recorded_at=now - timedelta(seconds=django_settings.DRIVER_STALE_AFTER_SECONDS + 1))
    DriverFactory(location=near(100), availability="on_break")
    DriverFactory(location=near(100), availability="busy")
    DriverFactory(location=None, location_recorded_at=None)

    with caplog.at_level(logging.WARNING):
        found = geo.drivers_available_near(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=now)

    assert [d.driver_id for d in found] == [str(first.pk), str(second.pk), str(third.pk)]
    for d, expected_m in zip(found, (500, 2_000, 4_500)):
        assert d.distance_km * 1000 == pytest.approx(expected_m, abs=1)
    assert any("using PostGIS" in rec.getMessage() for rec in caplog.records)
    assert [d.driver_id for d in geo.drivers_available_near(lat=CITY[0], lon=CITY[1], radius_km=5, limit=2, now=now)] == [
        str(first.pk), str(second.pk)]


# ------------------------------------------------------------------ the two implementations


def build_random_fleet(seed, *, candidates=460, radius_m=8_000, query_radius_m=5_000):
    """Drivers at random points within `radius_m` of the city centre: mostly available with a
    fresh fix, some stale, some not available. Points whose distance to the centre is within
    3 m of another's, or within 20 m of the query radius, are dropped (no meaningless ties)."""
    rng = random.Random(seed)
    now = timezone.now()
    stale_after = django_settings.DRIVER_STALE_AFTER_SECONDS
    specs = []
    for _ in range(candidates):
        lat, lon = destination(*CITY, radius_m * math.sqrt(rng.random()), rng.uniform(0, 360))
        kind = rng.choices(["fresh", "stale", "unavailable"], weights=[70, 15, 15])[0]
        specs.append({"lat": lat, "lon": lon, "kind": kind, "d": haversine_m(*CITY, lat, lon)})
    specs.sort(key=lambda s: s["d"])
    keep = []
    for i, s in enumerate(specs):
        close_prev = i > 0 and s["d"] - specs[i - 1]["d"] < 3
        close_next = i + 1 < len(specs) and specs[i + 1]["d"] - s["d"] < 3
        if close_prev or close_next or abs(s["d"] - query_radius_m) < 20:
            continue
        keep.append(s)

    User = get_user_model()
    users = User.objects.bulk_create([User(username=f"fleet-{seed}-{i}") for i in range(len(keep))])
    drivers = []
    for user, s in zip(users, keep):
        fields = {"user": user, "location": point(s["lat"], s["lon"])}
        if s["kind"] == "fresh":
            fields["location_recorded_at"] = now - timedelta(seconds=rng.uniform(0, stale_after - 60))
        elif s["kind"] == "stale":
            fields["location_recorded_at"] = now - timedelta(seconds=rng.uniform(stale_after + 1, 3 * stale_after))
        else:
            fields["location_recorded_at"] = now - timedelta(seconds=rng.uniform(0, 60))
            fields["availability"] = rng.choice(["on_break", "busy", "offline", "paused", "shift_ended"])
        driver = DriverFactory.build(**fields)
        s["id"] = str(driver.pk)
        drivers.append(driver)
    Driver.objects.bulk_create(drivers)
    return keep, now


@pytest.mark.parametrize("seed", [20260201, 7])
@pytest.mark.parametrize("limit", [50, 500])
def test_redis_and_postgis_find_the_same_drivers_in_the_same_order(seed, limit):
    fleet, now = build_random_fleet(seed)
    assert 280 <= len(fleet) <= 460
    assert geo.rebuild_index() == sum(1 for s in fleet if s["kind"] != "unavailable")
    eligible = [s for s in fleet if s["kind"] == "fresh" and s["d"] < 5_000]
    expected = [s["id"] for s in eligible][:limit]
    assert len(eligible) > 50  # so that limit 50 truncates and limit 500 does not

    by_redis = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=limit, now=now)
    by_postgis = geo.drivers_near_postgis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=limit, now=now)

    assert [d.driver_id for d in by_redis] == expected
    assert [d.driver_id for d in by_postgis] == expected
    true_distance = {s["id"]: s["d"] for s in fleet}
    for a, b in zip(by_redis, by_postgis):
        assert abs(a.distance_km - b.distance_km) * 1000 < 1, (a, b)
        assert abs(b.distance_km * 1000 - true_distance[b.driver_id]) < 1, b
        assert (a.lat, a.lon) == (pytest.approx(b.lat, abs=1e-5), pytest.approx(b.lon, abs=1e-5))
    # the selector (Redis up) gives the same answer
    assert geo.drivers_available_near(lat=CITY[0], lon=CITY[1], radius_km=5, limit=limit, now=now) == by_redis


def test_both_implementations_exclude_stale_and_unavailable_drivers():
    fleet, now = build_random_fleet(99, candidates=200)
    geo.rebuild_index()

    excluded = {s["id"] for s in fleet if s["kind"] != "fresh"}
    assert excluded
    for impl in (geo.drivers_near_redis, geo.drivers_near_postgis):
        found = {d.driver_id for d in impl(lat=CITY[0], lon=CITY[1], radius_km=20, limit=1000, now=now)}
        assert found == {s["id"] for s in fleet if s["kind"] == "fresh"}, impl.__name__
        assert not found & excluded


def test_many_stale_drivers_nearest_the_point_do_not_hide_the_fresh_ones_from_redis():
    """The Redis path drops stale members after GEOSEARCH; with more stale drivers than its
    over-fetch margin nearest the point it must still return `limit` fresh ones, like PostGIS."""
    now = timezone.now()
    stale_at = now - timedelta(seconds=django_settings.DRIVER_STALE_AFTER_SECONDS + 30)
    for i in range(40):
        DriverFactory(location=near(100 + 10 * i, bearing=i * 9), location_recorded_at=stale_at)
    fresh = [DriverFactory(location=near(1_000 + 100 * i, bearing=i * 30)) for i in range(8)]
    geo.rebuild_index()

    by_postgis = geo.drivers_near_postgis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=5, now=now)
    by_redis = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=5, now=now)

    assert [d.driver_id for d in by_postgis] == [str(d.pk) for d in fresh[:5]]
    assert [d.driver_id for d in by_redis] == [str(d.pk) for d in fresh[:5]]


def test_a_driver_a_search_removed_as_stale_comes_back_with_its_next_fix(django_capture_on_commit_callbacks):
    """The search removes stale members from the index (they stay available: the stale job
    decides that); the next fix, by the database path or the fast lane's script, indexes the
    driver again."""
    now = timezone.now()
    stale_at = now - timedelta(seconds=django_settings.DRIVER_STALE_AFTER_SECONDS + 30)
    by_db, by_fast_lane = (DriverFactory(location=near(300 + 100 * i), location_recorded_at=stale_at) for i in range(2))
    geo.rebuild_index()
    assert in_geo(by_db) and in_geo(by_fast_lane)

    assert geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=now) == []

    for driver in (by_db, by_fast_lane):
        assert not in_geo(driver) and r().zscore(geo.FIX_KEY, str(driver.pk)) is None
        assert r().hget(geo.STATUS_KEY, str(driver.pk)) == "available"
    lat, lon = destination(*CITY, 250, 0)
    with django_capture_on_commit_callbacks(execute=True):
        driver_location_record(driver_id=by_db.pk, lat=lat, lon=lon, recorded_at=timezone.now())
    lat, lon = destination(*CITY, 350, 0)
    live.fix_record_persisted(live.Fix(driver_id=str(by_fast_lane.pk), lat=lat, lon=lon,
                                       recorded_at=timezone.now().timestamp()))

    found = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=timezone.now())
    assert [d.driver_id for d in found] == [str(by_db.pk), str(by_fast_lane.pk)]


def test_an_empty_index_finds_nobody():
    assert geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=timezone.now()) == []
    assert geo.drivers_near_postgis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=timezone.now()) == []
