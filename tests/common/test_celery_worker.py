"""Periodic work really runs: a real `celery worker` (and `celery beat`) process, started
against the test database and the test Redis, executes `common.purge_idempotency_records`.

Each test routes its tasks to a queue of its own, so that no other worker on the machine can
take them. The processes are stopped before pytest-django flushes the tables (the fixture
depends on `transactional_db`, so it is torn down first).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from io import StringIO
from pathlib import Path

import factory
import pytest
from celery.result import EagerResult, allow_join_result
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from rest_framework.test import APIClient

from common import heartbeat
from common.models import IdempotencyRecord
from common.redis import get_redis
from common.tasks import purge_idempotency_records
from config.celery import app
from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS
from tests.processes import subprocess_database_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PURGE_TASK = "common.purge_idempotency_records"
READY_TIMEOUT = 30
STOP_TIMEOUT = 10


class IdempotencyRecordFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = IdempotencyRecord

    caller = factory.Sequence(lambda n: f"user:{n}")
    key = factory.LazyFunction(lambda: uuid.uuid4().hex)
    method = "POST"
    path = "/v2/deliveries/"
    request_hash = "0" * 64
    status_code = 201
    response_body = b"{}"
    content_type = "application/json"
    created_at = factory.LazyFunction(timezone.now)


def _expired_at():
    """Older than the TTL by a day (two days old with the default 24 h TTL)."""
    return timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS) - timedelta(days=1)


class CeleryProcess:
    """One `celery -A config <command>` subprocess, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", *args],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not log {text!r} within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._log.close()


@contextmanager
def worker_on(queue: str, log_path: Path):
    """A real worker taking `queue` (with the test settings, the test database and Redis),
    ready when entered, stopped on exit. For tasks routed to a named queue (`celery`, `eta`):
    each test's Redis database is its own and flushed before it, so nothing else is queued."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "CELERY_TASK_ALWAYS_EAGER": "false",
           "DATABASE_URL": subprocess_database_url(), "PYTHONUNBUFFERED": "1"}
    worker = CeleryProcess(
        "worker",
        ["worker", "--pool=solo", "--concurrency=1", "-l", "info", "-Q", queue,
         "-n", f"test-{uuid.uuid4().hex}@%h", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env, log_path,
    )
    try:
        worker.wait_for_log(" ready.")
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def celery_processes(transactional_db, tmp_path):
    """Start real worker/beat processes on a queue of this test's own; stop them all after.

    Depending on `transactional_db` makes this fixture's teardown run before the table flush,
    so no worker or beat still holds a connection to the test database then.
    """
    queue = f"test-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "DATABASE_URL": subprocess_database_url(),
        "PYTHONUNBUFFERED": "1",
    }
    started: list[CeleryProcess] = []

    class Processes:
        def __init__(self):
            self.queue = queue

        def worker(self) -> CeleryProcess:
            worker = CeleryProcess(
                "worker",
                [
                    "worker", "--pool=solo", "--concurrency=1", "-l", "info", "-Q", queue,
                    "-n", f"{queue}@%h", "--without-heartbeat", "--without-gossip", "--without-mingle",
                ],
                env,
                tmp_path / "worker.log",
            )
            started.append(worker)
            worker.wait_for_log(" ready.")
            return worker

        def beat(self) -> CeleryProcess:
            beat = CeleryProcess(
                "beat",
                [
                    "beat", "-l", "info", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                    "-s", str(tmp_path / "celerybeat-schedule"), "--max-interval", "1",
                ],
                env,
                tmp_path / "beat.log",
            )
            started.append(beat)
            beat.wait_for_log("beat: Starting...")
            return beat

        @contextmanager
        def logs_on_failure(self):
            """Print every process's log if the block fails (pytest shows it with the failure)."""
            try:
                yield
            except BaseException:
                for process in started:
                    print(f"----- {process.name} log ({process.log_path}) -----\n{process.log()}")
                raise

    yield Processes()

    for process in reversed(started):
        process.stop()


@pytest.fixture
def sending_to_workers():
    """The test settings run tasks eagerly; here the test process must only send them."""
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = False
    yield
    app.conf.task_always_eager = previous


def test_a_real_worker_purges_expired_idempotency_records_and_keeps_fresh_ones(
    celery_processes, sending_to_workers
):
    old = IdempotencyRecordFactory(created_at=_expired_at())
    fresh = IdempotencyRecordFactory()
    worker = celery_processes.worker()

    with celery_processes.logs_on_failure():
        result = purge_idempotency_records.apply_async(queue=celery_processes.queue, ignore_result=False)
        assert not isinstance(result, EagerResult)
        # Eager tasks (the rest of the suite) guard joins with a process-wide flag that they save
        # and restore: two threads running eager tasks at once (the race tests) can leave it
        # stuck at "joins would block", and `get` would then refuse. This thread is no task.
        with allow_join_result():
            deleted = result.get(timeout=60)

        assert deleted == 1
        assert not IdempotencyRecord.objects.filter(pk=old.pk).exists()
        assert IdempotencyRecord.objects.filter(pk=fresh.pk).exists()
        # Celery stores the result, then logs "succeeded": the line may come just after `get`
        # returned (read at once, it was missing 1 run in ~10 under load).
        worker.wait_for_log(f"Task {PURGE_TASK}[{result.id}] succeeded")


def test_beat_schedules_the_installed_purge_task_onto_a_real_worker(celery_processes):
    call_command("setup_periodic_tasks", stdout=StringIO())
    name = next(n for n, (task, _, _) in PERIODIC_TASKS.items() if task == PURGE_TASK)
    periodic = PeriodicTask.objects.get(name=MANAGED_PREFIX + name)
    assert (periodic.last_run_at, periodic.total_run_count) == (None, 0)
    # Every second instead of hourly, onto this test's queue (the flush after the test undoes it).
    periodic.interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    periodic.queue = celery_processes.queue
    periodic.save()
    # Beat writes run counts back after its first send and then only every few minutes: with
    # the other jobs due too, one of them could take that write-back (seen under load).
    PeriodicTask.objects.exclude(pk=periodic.pk).update(enabled=False)
    old = IdempotencyRecordFactory(created_at=_expired_at())
    fresh = IdempotencyRecordFactory()

    worker = celery_processes.worker()
    celery_processes.beat()

    with celery_processes.logs_on_failure():
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            periodic.refresh_from_db()
            if periodic.total_run_count > 0 and not IdempotencyRecord.objects.filter(pk=old.pk).exists():
                break
            time.sleep(0.25)

        assert not IdempotencyRecord.objects.filter(pk=old.pk).exists(), "the beat-scheduled purge never ran"
        assert IdempotencyRecord.objects.filter(pk=fresh.pk).exists()
        assert periodic.total_run_count > 0
        assert periodic.last_run_at is not None
        deadline = time.monotonic() + 30  # (the "succeeded" line follows the task's commit)
        while not re.search(rf"Task {re.escape(PURGE_TASK)}\[[^\]]+\] succeeded", worker.log()):
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.1)
        # job liveness (/health/jobs): beat recorded the send, the worker the successful run
        # (just after the task's own commit, so it may land a moment after what the loop saw)
        wanted = {f"{PURGE_TASK}:sent", f"{PURGE_TASK}:ok"}
        deadline = time.monotonic() + 10
        while not wanted <= set(records := get_redis().hgetall(heartbeat.JOBS_KEY)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wanted <= set(records), records
        assert records[f"{PURGE_TASK}:state"] == "SUCCESS"


def test_a_real_worker_heartbeats_while_it_runs_and_says_goodbye_when_it_stops(celery_processes):
    worker = celery_processes.worker()

    def our_workers() -> dict[str, float]:
        members = get_redis().zrange(heartbeat.WORKERS_KEY, 0, -1, withscores=True)
        return {host: seen for host, seen in members if host.startswith(f"{celery_processes.queue}@")}

    with celery_processes.logs_on_failure():
        deadline = time.monotonic() + 10
        while not our_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        [(hostname, seen)] = our_workers().items()
        assert abs(time.time() - seen) < heartbeat.WORKER_TIMEOUT

        workers = APIClient().get("/health/jobs").json()["workers"]
        assert workers[hostname]["alive"] is True

        worker.stop()
        assert our_workers() == {}


def test_a_backlog_on_the_celery_queue_does_not_hold_back_the_expiry_sweep(transactional_db, tmp_path, sending_to_workers):
    """The safety nets' own queue (config/periodic.py TIMER_TASKS): sent after a backlog of other
    tasks, the offer-expiry sweep is among the first two a worker on every queue takes (kombu
    rotates the queues it pops); on the shared queue it came after the whole backlog."""
    backlog = [purge_idempotency_records.apply_async() for _ in range(40)]
    sweep = app.send_task("offers.expire_overdue_offers", expires=60)
    with worker_on("timers,celery", tmp_path / "worker.log") as worker:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and f"[{backlog[-1].id}] succeeded" not in worker.log():
            time.sleep(0.1)
        received = re.findall(r"Task [\w.]+\[([\w-]+)\] received", worker.log())
    assert len(received) == 41, worker.log()
    assert received.index(sweep.id) <= 1, worker.log()


def _pending_offer_within(delivery, *, seconds: float):
    """The delivery's pending offer once a worker has made it (None after `seconds`)."""
    from offers.models import DriverOffer

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pending = DriverOffer.objects.filter(delivery=delivery, status="PENDING").first()
        if pending is not None:
            return pending
        time.sleep(0.1)
    return None


def test_a_real_worker_on_the_timers_queue_takes_a_rejects_second_look(transactional_db, tmp_path, sending_to_workers):
    """A reject that found the next driver held by another transaction for a moment: its second
    look is published after commit to the timers queue, and a real worker there offers the
    delivery to that driver (workflows.dispatching.SECOND_LOOK_TASK; before, the retry job 30 s
    later). The task's arguments cross the broker as JSON (its attempt time as ISO text)."""
    from common.actors import Actor
    from tests.factories import DeliveryFactory, online_driver
    from tests.concurrency import hold_driver_row
    from workflows import offers
    from workflows.dispatching import delivery_dispatch

    first, held = online_driver(km=1), online_driver(km=2)
    delivery = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    with worker_on("timers", tmp_path / "worker.log") as worker:
        thread, release = hold_driver_row(held)
        try:
            offers.offer_reject(offer_id=offer.pk, driver_id=first.pk, reason="too_far", actor=Actor("driver", first.pk))
        finally:
            release.set()
            thread.join(20)
        pending = _pending_offer_within(delivery, seconds=30)
        assert pending is not None and pending.driver_id == held.pk, worker.log()
        assert "dispatch.second_look" in worker.log()


def test_a_real_worker_offers_a_freed_driver_the_delivery_waiting_near_it(
        transactional_db, tmp_path, sending_to_workers):
    """A driver back from a break next to a delivery that found nobody: the look published after
    the resume's commit crosses the broker (its change time as ISO text, matched to the
    microsecond) and a real worker on the `celery` queue offers the delivery to the driver
    (workflows.dispatching.driver_freed_pull; before, the retry job up to 30 s later)."""
    from common.actors import Actor
    from tests.factories import DeliveryFactory, online_driver
    from workflows import drivers
    from workflows.dispatching import delivery_dispatch

    driver = online_driver(km=1)
    drivers.availability_take_break(driver_id=driver.pk, duration_minutes=15, reason="", actor=Actor("driver", driver.pk))
    delivery = DeliveryFactory()
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    with worker_on("celery", tmp_path / "worker.log") as worker:
        drivers.availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        pending = _pending_offer_within(delivery, seconds=30)
        assert pending is not None and pending.driver_id == driver.pk, worker.log()
        assert "dispatch.driver_freed" in worker.log()
