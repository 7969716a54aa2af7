"""Break expiry and stale-driver jobs, moved through time with time-machine."""
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from availability import services, tasks

from workflows import drivers as driver_workflows
from availability.events import AvailabilityChangedEvent, BreakExpiredEvent
from availability.models import DriverAvailabilityHistory
from common.actors import Actor
from availability.models import Driver
from tests.concurrency import race
from tests.factories import DriverFactory
from tests.typecheck import assert_event_shape

START = "2026-02-01T10:00:00Z"


@pytest.mark.django_db
def test_a_break_ends_by_itself_when_its_time_is_up(driver, listen, django_capture_on_commit_callbacks):
    events = listen(f"driver.{driver.pk}")
    with time_machine.travel(START, tick=False) as t:
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=30, reason="lunch", actor=Actor("driver", driver.pk))
        events.drain()
        t.shift(timedelta(minutes=29, seconds=59))
        assert tasks.expire_breaks() == 0
        t.shift(timedelta(seconds=1))
        with django_capture_on_commit_callbacks(execute=True):
            assert tasks.expire_breaks() == 1

    driver.refresh_from_db()
    assert driver.availability == "available"
    last = driver.availability_history.order_by("-timestamp").first()
    assert (last.reason, last.actor_type, last.from_state) == ("break_expired", "system", "on_break")
    by_type = {e["type"]: e for e in events.drain()}
    assert set(by_type) == {"availability_changed", "break_expired"}
    assert_event_shape(by_type["break_expired"], BreakExpiredEvent)
    assert_event_shape(by_type["availability_changed"], AvailabilityChangedEvent)
    assert by_type["break_expired"] == {
        "type": "break_expired", "driverId": str(driver.pk), "breakDurationMinutes": 30,
        "expiredAt": "2026-02-01T10:30:00Z",
    }
    assert by_type["availability_changed"]["reason"] == "break_expired"


@pytest.mark.django_db
def test_a_late_job_reports_when_the_break_ended_not_when_it_ran(driver, listen, django_capture_on_commit_callbacks):
    events = listen(f"driver.{driver.pk}")
    with time_machine.travel(START, tick=False) as t:
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=30, reason="", actor=Actor.system())
        events.drain()
        t.shift(timedelta(minutes=37))  # the job was down for seven minutes
        with django_capture_on_commit_callbacks(execute=True):
            assert services.breaks_expire() == 1

    (expired,) = [e for e in events.drain() if e["type"] == "break_expired"]
    assert expired["expiredAt"] == "2026-02-01T10:30:00Z"
    assert expired["breakDurationMinutes"] == 30
    # the history row still says when the driver actually came back
    assert driver.availability_history.order_by("-timestamp").first().timestamp.isoformat() == "2026-02-01T10:37:00+00:00"


@pytest.mark.django_db
def test_a_job_that_was_down_catches_up_on_every_overdue_break():
    drivers = DriverFactory.create_batch(3)
    with time_machine.travel(START, tick=False) as t:
        for d in drivers:
            driver_workflows.availability_take_break(driver_id=d.pk, duration_minutes=5, reason="", actor=Actor.system())
        t.shift(timedelta(hours=3))
        assert services.breaks_expire() == 3
        assert services.breaks_expire() == 0  # idempotent
    assert set(Driver.objects.values_list("availability", flat=True)) == {"available"}


@pytest.mark.django_db
def test_a_driver_who_resumed_early_is_left_alone_by_the_break_job(driver):
    with time_machine.travel(START, tick=False) as t:
        driver_workflows.availability_take_break(driver_id=driver.pk, duration_minutes=5, reason="", actor=Actor.system())
        driver_workflows.availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        t.shift(timedelta(minutes=10))
        assert services.breaks_expire() == 0
    assert driver.availability_history.count() == 2


@pytest.mark.django_db
def test_available_drivers_with_a_stale_fix_go_offline(settings):
    settings.DRIVER_STALE_AFTER_SECONDS = 600
    with time_machine.travel(START, tick=False):
        now = timezone.now()
        stale = DriverFactory(location_recorded_at=now - timedelta(seconds=601), last_availability_change=now - timedelta(hours=1))
        fresh = DriverFactory(location_recorded_at=now - timedelta(seconds=599), last_availability_change=now - timedelta(hours=1))
        never = DriverFactory(location=None, location_recorded_at=None, last_availability_change=now - timedelta(hours=1))
        just_resumed = DriverFactory(location=None, location_recorded_at=None, last_availability_change=now - timedelta(seconds=10))
        # no fix at all: stale once available for the stale age without one (it went offline
        # after the 30 s grace, its pending offer withdrawn)
        no_fix_a_minute = DriverFactory(location=None, location_recorded_at=None, last_availability_change=now - timedelta(seconds=60))
        no_fix_too_long = DriverFactory(location=None, location_recorded_at=None, last_availability_change=now - timedelta(seconds=601))
        # resumed 45 s ago with a fix an hour old: stale, past the 30 s grace (SPEC: the fix's age decides)
        resumed_stale = DriverFactory(location_recorded_at=now - timedelta(hours=1), last_availability_change=now - timedelta(seconds=45))
        on_break = DriverFactory(availability="on_break", location_recorded_at=now - timedelta(hours=2))

        assert tasks.mark_stale_drivers_offline() == 4

    states = dict(Driver.objects.values_list("pk", "availability"))
    assert states[stale.pk] == "offline" and states[never.pk] == "offline" and states[resumed_stale.pk] == "offline"
    assert states[fresh.pk] == "available" and states[just_resumed.pk] == "available"
    assert states[no_fix_a_minute.pk] == "available" and states[no_fix_too_long.pk] == "offline"
    assert states[on_break.pk] == "on_break"
    row = DriverAvailabilityHistory.objects.get(driver=stale)
    assert (row.reason, row.actor_type, row.to_state) == ("stale_location", "system", "offline")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("job", [services.breaks_expire, driver_workflows.stale_drivers_mark_offline])
def test_two_jobs_running_at_once_change_each_driver_once(job):
    past = timezone.now() - timedelta(hours=2)
    drivers = DriverFactory.create_batch(
        20, availability="on_break" if job is services.breaks_expire else "available",
        availability_until=past, last_availability_change=past - timedelta(minutes=10), location_recorded_at=past,
    )
    counts, errors = race([job, job])

    assert errors == []
    assert sum(counts) == 20
    for d in drivers:
        assert DriverAvailabilityHistory.objects.filter(driver=d).count() == 1


def _live_fix(driver, at):
    from availability import live

    live.fix_record_persisted(live.Fix(driver_id=str(driver.pk), lat=12.9, lon=77.6, recorded_at=at.timestamp()))


@pytest.mark.django_db
def test_drivers_fresh_only_in_redis_do_not_crowd_the_stale_ones_out_of_a_run(settings):
    """The stream consumer behind: PostgreSQL says stale, Redis says fresh, for the lower
    primary keys; the stale driver past them still goes offline."""
    settings.DRIVER_STALE_AFTER_SECONDS = 600
    with time_machine.travel(START, tick=False):
        now = timezone.now()
        old = dict(location_recorded_at=now - timedelta(seconds=700), last_availability_change=now - timedelta(hours=1))
        drivers = sorted(DriverFactory.create_batch(5, **old), key=lambda d: d.pk)
        for driver in drivers[:4]:
            _live_fix(driver, now - timedelta(seconds=10))  # fresh in Redis only
        assert driver_workflows.stale_drivers_mark_offline(batch_size=2) == 1

    states = dict(Driver.objects.values_list("pk", "availability"))
    assert [states[d.pk] for d in drivers] == ["available"] * 4 + ["offline"]


@pytest.mark.django_db
def test_with_redis_unable_to_say_who_is_fresh_nobody_is_marked_offline(settings, monkeypatch, caplog):
    from availability import live

    settings.DRIVER_STALE_AFTER_SECONDS = 600
    with time_machine.travel(START, tick=False):
        now = timezone.now()
        driver = DriverFactory(location_recorded_at=now - timedelta(seconds=700), last_availability_change=now - timedelta(hours=1))
        _live_fix(driver, now - timedelta(seconds=10))

        def down():
            raise ConnectionError("redis down")

        monkeypatch.setattr(live, "get_redis", down)
        assert driver_workflows.stale_drivers_mark_offline() == 0
    assert Driver.objects.get(pk=driver.pk).availability == "available"
    assert "Redis unavailable" in caplog.text


@pytest.mark.django_db
def test_a_driver_is_left_for_the_next_run_when_redis_fails_at_its_recheck(settings, monkeypatch):
    """The page's read answered (no live fix: stale), then Redis failed before the driver's own
    re-check: the run cannot know whether a fix came in between, so the driver stays."""
    import redis

    from availability import live

    settings.DRIVER_STALE_AFTER_SECONDS = 600
    real = live.positions_known

    def page_then_down(ids):
        monkeypatch.setattr(live, "positions_known", down)
        return real(ids)

    def down(ids):
        raise redis.ConnectionError("redis down")

    with time_machine.travel(START, tick=False):
        now = timezone.now()
        driver = DriverFactory(location_recorded_at=now - timedelta(seconds=700), last_availability_change=now - timedelta(hours=1))
        monkeypatch.setattr(live, "positions_known", page_then_down)
        assert driver_workflows.stale_drivers_mark_offline() == 0
        monkeypatch.setattr(live, "positions_known", real)
        assert driver_workflows.stale_drivers_mark_offline() == 1  # the next run, Redis back
    assert Driver.objects.get(pk=driver.pk).availability == "offline"
