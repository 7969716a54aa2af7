"""The periodic schedule is declared once in config/periodic.py and installed into
django-celery-beat by `manage.py setup_periodic_tasks` (STYLE.md rule 8)."""
import json
from io import StringIO

import pytest
from django.core.management import call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.celery import app
from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS


def setup_periodic_tasks() -> str:
    out = StringIO()
    call_command("setup_periodic_tasks", stdout=out)
    return out.getvalue()


def _installed() -> dict[str, PeriodicTask]:
    return {
        t.name: t
        for t in PeriodicTask.objects.filter(name__startswith=MANAGED_PREFIX).select_related("interval")
    }


def test_setup_installs_one_interval_task_per_declared_entry(db):
    setup_periodic_tasks()

    installed = _installed()
    assert set(installed) == {MANAGED_PREFIX + name for name in PERIODIC_TASKS}
    for name, (task, seconds, opts) in PERIODIC_TASKS.items():
        periodic = installed[MANAGED_PREFIX + name]
        assert periodic.task == task
        assert periodic.enabled is True
        assert periodic.crontab_id is None
        assert (periodic.interval.every, periodic.interval.period) == (seconds, IntervalSchedule.SECONDS)
        assert periodic.expire_seconds == opts.get("expires")
        assert json.loads(periodic.kwargs) == opts.get("kwargs", {})


def test_running_setup_twice_creates_no_duplicates(db):
    setup_periodic_tasks()
    first = {name: (t.pk, t.interval_id) for name, t in _installed().items()}

    setup_periodic_tasks()

    assert {name: (t.pk, t.interval_id) for name, t in _installed().items()} == first
    assert PeriodicTask.objects.count() == len(PERIODIC_TASKS)
    declared_intervals = {seconds for _, seconds, _ in PERIODIC_TASKS.values()}
    assert IntervalSchedule.objects.count() == len(declared_intervals)


def test_running_setup_again_leaves_the_tasks_unchanged_so_beats_clock_goes_on(db):
    """Beat counts a job that has not run yet from its `date_changed`; `make run` re-saved every
    task, so an hourly purge restarted more often than hourly never ran (the jobs audit: never
    run after 56 minutes up)."""
    import time_machine
    from datetime import timedelta

    from django.utils import timezone

    setup_periodic_tasks()
    stamped = {name: t.date_changed for name, t in _installed().items()}

    with time_machine.travel(timezone.now() + timedelta(minutes=30)):
        setup_periodic_tasks()

    assert {name: t.date_changed for name, t in _installed().items()} == stamped


def test_setup_restores_a_declared_task_that_ops_changed(db):
    setup_periodic_tasks()
    name, (task, seconds, _) = next(iter(PERIODIC_TASKS.items()))
    every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(name=MANAGED_PREFIX + name).update(
        task="somebody.elses_task", interval=every_second, enabled=False
    )

    setup_periodic_tasks()

    periodic = PeriodicTask.objects.select_related("interval").get(name=MANAGED_PREFIX + name)
    assert (periodic.task, periodic.interval.every, periodic.enabled) == (task, seconds, True)


def test_setup_removes_stale_managed_tasks_and_keeps_unmanaged_ones(db):
    hourly, _ = IntervalSchedule.objects.get_or_create(every=3600, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name=MANAGED_PREFIX + "a task nobody declares any more", task="common.gone", interval=hourly
    )
    PeriodicTask.objects.create(name="ops: ad-hoc report", task="common.report", interval=hourly)

    output = setup_periodic_tasks()

    assert f"{len(PERIODIC_TASKS)} installed, 1 stale removed" in output

    names = set(PeriodicTask.objects.values_list("name", flat=True))
    assert MANAGED_PREFIX + "a task nobody declares any more" not in names
    assert "ops: ad-hoc report" in names
    assert names == {MANAGED_PREFIX + n for n in PERIODIC_TASKS} | {"ops: ad-hoc report"}


@pytest.mark.parametrize("name", sorted(PERIODIC_TASKS))
def test_every_declared_task_is_registered_in_the_celery_app(name):
    app.loader.import_default_modules()  # runs autodiscovery, as a worker does at start-up

    task, _, _ = PERIODIC_TASKS[name]

    assert task in app.tasks, f"beat would schedule {task!r}, which no worker knows"
