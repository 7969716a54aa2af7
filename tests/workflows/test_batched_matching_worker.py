"""The matching rounds run for real, on real `celery worker` and `celery beat` processes
(tests/common/test_celery_worker.py): the task scheduled when a delivery starts waiting runs
the zone's round at the end of its window, and the sweep that `manage.py setup_periodic_tasks`
installs runs a due round whose task was lost."""
import time
from datetime import timedelta
from io import StringIO

import pytest
from celery.result import EagerResult
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from common import heartbeat
from common.redis import get_redis
from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS
from dispatch.tasks import run_matching_rounds
from offers.models import DriverOffer
from tests.common.test_celery_worker import (  # noqa: F401 (fixtures)
    celery_processes,
    sending_to_workers,
    worker_on,
)
from tests.factories import DeliveryFactory
from tests.workflows.test_batched_matching import at, dispatch_automatically, driver_at, matching_zone

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TASK = "dispatch.run_matching_rounds"  # the sweep
ROUND = "dispatch.run_matching_round"  # one zone's round, scheduled


def waiting_delivery(seconds_ago: int):
    zone = matching_zone(matching_window_seconds=5)
    driver = driver_at(0.4)
    delivery = DeliveryFactory(zone=zone, pickup_location=at(0.0))
    since = timezone.now() - timedelta(seconds=seconds_ago)
    assert dispatch_automatically(delivery, now=since).outcome == "waiting"
    return delivery, driver, since


def test_the_sweep_is_declared_every_15_seconds():
    name = next(n for n, (task, _, _) in PERIODIC_TASKS.items() if task == TASK)
    assert PERIODIC_TASKS[name][1] == 15


@pytest.fixture
def timers_worker(transactional_db, tmp_path, sending_to_workers):  # noqa: F811
    """A real worker on the `timers` queue, where the scheduled round goes."""
    with worker_on("timers", tmp_path / "worker.log") as worker:
        yield worker


def test_the_round_scheduled_when_a_delivery_starts_waiting_runs_at_the_end_of_its_window(timers_worker):
    delivery, driver, since = waiting_delivery(seconds_ago=0)  # schedules the round for since + 5 s

    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and not DriverOffer.objects.filter(delivery=delivery).exists():
        time.sleep(0.25)
    try:
        offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
    except DriverOffer.DoesNotExist:
        raise AssertionError(timers_worker.log()) from None
    assert offer.driver_id == driver.pk
    assert offer.created_at >= since + timedelta(seconds=5)  # not before the window ends
    assert f"Task {ROUND}[" in timers_worker.log()


def test_the_sweep_on_a_real_worker_runs_a_due_round_whose_task_was_lost(celery_processes, sending_to_workers):  # noqa: F811
    # its scheduled round went to the `timers` queue, which no worker here consumes: lost
    delivery, driver, _ = waiting_delivery(seconds_ago=10)
    worker = celery_processes.worker()

    with celery_processes.logs_on_failure():
        result = run_matching_rounds.apply_async(queue=celery_processes.queue, ignore_result=False)
        assert not isinstance(result, EagerResult)
        # (another test's eager run may have left celery believing this thread is a task)
        assert result.get(timeout=60, disable_sync_subtasks=False) == 1
        assert DriverOffer.objects.get(delivery=delivery, status="PENDING").driver_id == driver.pk
        worker.wait_for_log(f"Task {TASK}[{result.id}] succeeded")  # (logged just after the result is stored)


def test_beat_sends_the_installed_sweep_and_the_worker_offers_the_waiting_delivery(celery_processes):  # noqa: F811
    call_command("setup_periodic_tasks", stdout=StringIO())
    name = next(n for n, (task, _, _) in PERIODIC_TASKS.items() if task == TASK)
    periodic = PeriodicTask.objects.get(name=MANAGED_PREFIX + name)
    # Every second instead of every 15 s, onto this test's queue (the flush after the test undoes it).
    periodic.interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    periodic.queue = celery_processes.queue
    periodic.save()
    PeriodicTask.objects.exclude(pk=periodic.pk).update(enabled=False)
    delivery, driver, since = waiting_delivery(seconds_ago=0)  # due 5 s from now

    celery_processes.worker()
    celery_processes.beat()

    with celery_processes.logs_on_failure():
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not DriverOffer.objects.filter(delivery=delivery).exists():
            time.sleep(0.25)
        offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
        assert offer.driver_id == driver.pk
        assert offer.created_at >= since + timedelta(seconds=5)  # not before the window
        deadline = time.monotonic() + 10
        while f"{TASK}:ok" not in (records := get_redis().hgetall(heartbeat.JOBS_KEY)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert records.get(f"{TASK}:state") == "SUCCESS", records
