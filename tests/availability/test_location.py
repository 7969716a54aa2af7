"""Location ingestion: `POST /v2/drivers/{id}/location` (SPEC "REST API", issue "Location").

The hottest write in the system: validate, one conditional UPDATE, the GEO index after commit,
no history or audit row, and a fix never moves a driver back in time.
"""
import random
import threading
from datetime import timedelta

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from audit.models import DeliveryAuditLog
from availability import geo
from availability.models import DriverAvailabilityHistory
from common.redis import get_redis
from availability.models import Driver
from workflows.drivers import driver_location_record
from tests.api import assert_error, client_for
from tests.factories import DriverFactory, point

NOW = "2026-02-01T10:00:00Z"


def url(driver):
    return f"/v2/drivers/{driver.pk}/location"


def fix(**overrides):
    body = {"lat": 12.9800, "lon": 77.6000, "accuracyMeters": 8.5, "speed": 4.2, "heading": 271.5,
            "recordedAt": "2026-02-01T09:59:58Z"}
    body.update(overrides)
    return body


def geopos(driver_id):
    pos = get_redis().geopos(geo.GEO_KEY, str(driver_id))[0]
    return None if pos is None else (pos[1], pos[0])  # (lat, lon)


def stored(driver):
    d = Driver.objects.get(pk=driver.pk)
    return (d.location.y, d.location.x, d.location_accuracy_m, d.location_speed, d.location_heading,
            d.location_recorded_at, d.updated_at)


@pytest.fixture
def at_now():
    with time_machine.travel(NOW, tick=False):
        yield timezone.now()


@pytest.fixture
def old_driver(db, at_now):
    """An available driver whose last fix is a minute old, at the city centre."""
    return DriverFactory(location_recorded_at=at_now - timedelta(minutes=1))


# ------------------------------------------------------------------------- accepted fixes


def test_a_driver_posting_a_fix_moves_its_point_and_enters_the_geo_index(
    old_driver, at_now, django_capture_on_commit_callbacks
):
    client = client_for(old_driver.user)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        r = client.post(url(old_driver), fix(), format="json")

    assert r.status_code == 200, r.content
    assert r.json() == {"success": True, "accepted": True, "driverId": str(old_driver.pk),
                        "recordedAt": "2026-02-01T09:59:58Z"}
    d = Driver.objects.get(pk=old_driver.pk)
    assert (d.location.y, d.location.x) == (12.98, 77.6)
    assert (d.location_accuracy_m, d.location_speed, d.location_heading) == (8.5, 4.2, 271.5)
    assert d.location_recorded_at.isoformat() == "2026-02-01T09:59:58+00:00"
    assert d.updated_at == at_now
    # the index is written after commit, not before
    assert len(callbacks) == 1
    assert geopos(old_driver.pk) == (pytest.approx(12.98, abs=1e-5), pytest.approx(77.6, abs=1e-5))
    assert get_redis().zscore(geo.FIX_KEY, str(old_driver.pk)) == d.location_recorded_at.timestamp()


def test_a_fix_without_recorded_at_is_stamped_with_the_server_time(old_driver, at_now):
    r = client_for(old_driver.user).post(url(old_driver), {"lat": 13.0, "lon": 77.5}, format="json")

    assert r.status_code == 200, r.content
    assert r.json()["accepted"] is True
    assert r.json()["recordedAt"] == NOW
    d = Driver.objects.get(pk=old_driver.pk)
    assert d.location_recorded_at == at_now
    # optional fields not sent are cleared, not left over from the previous fix
    assert (d.location_accuracy_m, d.location_speed, d.location_heading) == (None, None, None)


@pytest.mark.parametrize("field,value", [("heading", 0), ("heading", 359.9), ("speed", 0), ("accuracyMeters", 0),
                                         ("lat", 90), ("lat", -90), ("lon", 180), ("lon", -180), ("lat", 13)])
def test_boundary_values_are_accepted(old_driver, at_now, field, value):
    r = client_for(old_driver.user).post(url(old_driver), fix(**{field: value}), format="json")

    assert r.status_code == 200, r.content
    assert r.json()["accepted"] is True
    d = Driver.objects.get(pk=old_driver.pk)
    got = {"heading": d.location_heading, "speed": d.location_speed, "accuracyMeters": d.location_accuracy_m,
           "lat": d.location.y, "lon": d.location.x}[field]
    assert got == value


def test_a_device_clock_a_few_seconds_ahead_is_tolerated(old_driver, at_now):
    r = client_for(old_driver.user).post(url(old_driver), fix(recordedAt="2026-02-01T10:00:05Z"), format="json")

    assert r.status_code == 200, r.content
    assert r.json()["accepted"] is True
    assert Driver.objects.get(pk=old_driver.pk).location_recorded_at.isoformat() == "2026-02-01T10:00:05+00:00"


def test_a_fix_from_a_driver_who_is_not_available_is_stored_but_not_indexed(
    db, at_now, django_capture_on_commit_callbacks
):
    driver = DriverFactory(availability="on_break", location_recorded_at=at_now - timedelta(minutes=1))

    with django_capture_on_commit_callbacks(execute=True):
        r = client_for(driver.user).post(url(driver), fix(), format="json")

    assert r.status_code == 200, r.content
    assert r.json()["accepted"] is True
    d = Driver.objects.get(pk=driver.pk)
    assert (d.location.y, d.location.x) == (12.98, 77.6)
    assert geopos(driver.pk) is None
    assert get_redis().zscore(geo.FIX_KEY, str(driver.pk)) is None


def test_a_fix_writes_no_history_and_no_audit_row(old_driver, at_now, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        for seconds in (50, 40, 30):
            r = client_for(old_driver.user).post(
                url(old_driver), fix(recordedAt=f"2026-02-01T09:59:{seconds}Z"), format="json"
            )
            assert r.status_code == 200

    assert DriverAvailabilityHistory.objects.count() == 0
    assert DeliveryAuditLog.objects.count() == 0


# -------------------------------------------------------------------------- ignored fixes


@pytest.mark.parametrize("recorded_at", ["2026-02-01T09:59:00Z", "2026-02-01T09:58:00Z", "2020-01-01T00:00:00Z"])
def test_a_fix_not_newer_than_the_stored_one_is_ignored(old_driver, at_now, recorded_at, django_capture_on_commit_callbacks):
    # the stored fix was recorded at 09:59:00 (one minute before now)
    before = stored(old_driver)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        r = client_for(old_driver.user).post(url(old_driver), fix(recordedAt=recorded_at, lat=13.5), format="json")

    assert r.status_code == 200, r.content
    assert r.json() == {"success": True, "accepted": False, "reason": "older_than_last_fix",
                        "driverId": str(old_driver.pk), "recordedAt": recorded_at}
    assert stored(old_driver) == before
    assert callbacks == []
    assert geopos(old_driver.pk) is None


def test_after_a_newer_fix_the_older_one_that_arrives_late_is_ignored(old_driver, at_now):
    client = client_for(old_driver.user)
    assert client.post(url(old_driver), fix(recordedAt="2026-02-01T09:59:50Z", lat=12.99), format="json").json()["accepted"]

    r = client.post(url(old_driver), fix(recordedAt="2026-02-01T09:59:40Z", lat=12.50), format="json")

    assert r.json()["accepted"] is False
    d = Driver.objects.get(pk=old_driver.pk)
    assert d.location.y == 12.99
    assert d.location_recorded_at.isoformat() == "2026-02-01T09:59:50+00:00"


# ------------------------------------------------------------------------------ bad input

NAN_LITERAL = '{"lat": NaN, "lon": 77.6}'
INFINITY_LITERAL = '{"lat": 12.9, "lon": Infinity}'


@pytest.mark.parametrize(
    "body,field",
    [
        (fix(lat=90.0001), "lat"),
        (fix(lat=-90.0001), "lat"),
        (fix(lon=-180.5), "lon"),
        (fix(lon=180.0001), "lon"),
        (fix(lat="NaN"), "lat"),
        (fix(lat="nan"), "lat"),
        (fix(lon="Infinity"), "lon"),
        (fix(lon="-inf"), "lon"),
        (fix(lat="12.9"), "lat"),
        (fix(lon="77.6"), "lon"),
        (fix(lat=True), "lat"),
        (fix(lon=False), "lon"),
        (fix(lat=None), "lat"),
        ({"lat": 12.9}, "lon"),
        ({"lon": 77.6}, "lat"),
        (fix(lat=[12.9]), "lat"),
        (fix(lat={"v": 12.9}), "lat"),
        (fix(accuracyMeters=-1), "accuracyMeters"),
        (fix(accuracyMeters="NaN"), "accuracyMeters"),
        (fix(speed=-0.1), "speed"),
        (fix(speed="fast"), "speed"),
        (fix(heading=360), "heading"),
        (fix(heading=360.0), "heading"),
        (fix(heading=-1), "heading"),
        (fix(heading="Infinity"), "heading"),
        (fix(recordedAt="2026-02-01T10:05:00Z"), "recordedAt"),
        (fix(recordedAt="2027-01-01T00:00:00Z"), "recordedAt"),
        (fix(recordedAt="yesterday-ish"), "recordedAt"),
        (fix(recordedAt="2026-02-01"), "recordedAt"),  # (a date alone was taken as midnight)
        (fix(recordedAt="2026-02-30T10:00:00Z"), "recordedAt"),
        (fix(recordedAt=1769939998), "recordedAt"),
    ],
)
def test_invalid_fixes_are_a_400_naming_the_field_and_change_nothing(
    old_driver, at_now, body, field, django_capture_on_commit_callbacks
):
    before = stored(old_driver)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        r = client_for(old_driver.user).post(url(old_driver), body, format="json")

    error = assert_error(r, 400)
    assert field in error["details"], error
    assert stored(old_driver) == before
    assert callbacks == []
    assert geopos(old_driver.pk) is None


@pytest.mark.parametrize("raw", [NAN_LITERAL, INFINITY_LITERAL, '{"lat": -Infinity, "lon": 1}', "not json", ""])
def test_non_finite_json_literals_and_broken_json_are_a_400(old_driver, at_now, raw):
    before = stored(old_driver)

    r = client_for(old_driver.user).post(url(old_driver), raw, content_type="application/json")

    assert_error(r, 400)
    assert stored(old_driver) == before


def test_a_json_array_is_a_400(old_driver, at_now):
    assert_error(client_for(old_driver.user).post(url(old_driver), [fix()], format="json"), 400)


# ----------------------------------------------------------------------------- who may


def test_a_driver_cannot_post_another_drivers_location(old_driver, at_now):
    other = DriverFactory(location_recorded_at=at_now - timedelta(minutes=1))
    before = stored(other)

    assert_error(client_for(old_driver.user).post(url(other), fix(), format="json"), 404)

    assert stored(other) == before


def test_an_unknown_driver_id_is_a_404(driver_client):
    assert_error(driver_client.post("/v2/drivers/00000000-0000-4000-8000-000000000000/location", fix(), format="json"), 404)


def test_ops_and_integrations_cannot_post_a_drivers_location(old_driver, at_now, ops, integration):
    before = stored(old_driver)

    assert_error(ops.post(url(old_driver), fix(), format="json"), 403)
    assert_error(integration.post(url(old_driver), fix(), format="json"), 403)

    assert stored(old_driver) == before


def test_posting_a_location_needs_credentials(old_driver, at_now, anon):
    assert_error(anon.post(url(old_driver), fix(), format="json"), 401)

    anon.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert_error(anon.post(url(old_driver), fix(), format="json"), 401)


# ------------------------------------------------------------------------------ races


@pytest.mark.django_db(transaction=True)
def test_fixes_racing_from_many_threads_leave_the_newest_one_stored_and_indexed():
    """Fixes of one driver arrive in random order over several connections; whatever the
    interleaving, the stored and indexed fix is the newest one."""
    base = timezone.now() - timedelta(minutes=5)
    driver = DriverFactory(location=point(12.0, 77.0), location_recorded_at=base - timedelta(seconds=1))
    # fix i is recorded at base + i seconds, at latitude 12.9 + i/10000
    fixes = [fix(lat=12.9 + i / 10_000, lon=77.6, recordedAt=(base + timedelta(seconds=i)).isoformat()) for i in range(240)]
    random.Random(42).shuffle(fixes)
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    results, errors = [], []

    def post_share(share):
        client = client_for(driver.user)
        try:
            barrier.wait()
            for body in share:
                r = client.post(url(driver), body, format="json")
                results.append((r.status_code, r.json().get("accepted")))
        except Exception as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=post_share, args=(fixes[k::threads_n],)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(results) == 240 and {status for status, _ in results} == {200}
    assert any(accepted for _, accepted in results)
    d = Driver.objects.get(pk=driver.pk)
    newest = base + timedelta(seconds=239)
    assert d.location_recorded_at == newest
    assert d.location.y == pytest.approx(12.9 + 239 / 10_000, abs=1e-9)
    assert get_redis().zscore(geo.FIX_KEY, str(driver.pk)) == newest.timestamp()
    assert geopos(driver.pk)[0] == pytest.approx(12.9 + 239 / 10_000, abs=1e-5)


@pytest.mark.django_db(transaction=True)
def test_the_service_applies_racing_fixes_so_that_the_newest_wins():
    base = timezone.now() - timedelta(minutes=5)
    driver = DriverFactory(location_recorded_at=base - timedelta(seconds=1))
    stamps = [base + timedelta(milliseconds=37 * i) for i in range(400)]
    random.Random(7).shuffle(stamps)
    barrier = threading.Barrier(6)
    accepted = []

    def lat_of(ts):
        return 10 + (ts - base).total_seconds() / 1000

    def run(share):
        try:
            barrier.wait()
            for ts in share:
                result = driver_location_record(driver_id=driver.pk, lat=lat_of(ts), lon=77.0, recorded_at=ts)
                accepted.append(result.accepted)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(stamps[k::6],)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(accepted) == 400
    newest = max(stamps)
    d = Driver.objects.get(pk=driver.pk)
    assert d.location_recorded_at == newest
    assert d.location.y == pytest.approx(lat_of(newest), abs=1e-12)
    assert get_redis().zscore(geo.FIX_KEY, str(driver.pk)) == newest.timestamp()
