"""`/health/live`, `/health/ready`, `/health/jobs`, the job gauges and `manage.py healthcheck`
(docs/operations.md).

The lateness rules run on recorded wall-clock times, so time-machine moves the clock between
what the worker and beat record (common/heartbeat.py) and what the endpoint reads."""
from __future__ import annotations

import socket
from io import StringIO

import pytest
import time_machine
from celery.signals import after_task_publish
from django.core.management import CommandError, call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from prometheus_client.parser import text_string_to_metric_families

import config.celery
from availability import live
from common import heartbeat
from common.redis import get_redis
from common.tasks import purge_idempotency_records
from config.celery import app as celery_app
from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS
from tests.wire import CLOSED_REDIS_URL, assert_error_body

T0 = "2026-03-01T12:00:00Z"
WORKER = "celery@test-host"
SWEEP = "expire offers sweep"  # every 5 s
SWEEP_TASK = PERIODIC_TASKS[SWEEP][0]
BREAKS = "expire breaks"  # every 10 s
JOBS_KEYS = frozenset({"status", "jobs", "workers", "queues"})  # the 503 body carries the 200's report


def all_jobs_succeed(*, but: str | None = None) -> None:
    for name, (task, _, _) in PERIODIC_TASKS.items():
        if name != but:
            heartbeat.job_ran(task, "SUCCESS")


def metric_samples(client, name: str) -> dict[tuple, float]:
    text = client.get("/metrics").content.decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


# --------------------------------------------------------------------------- live / ready
def test_live_answers_without_database_or_redis(anon, settings):
    settings.REDIS_URL = CLOSED_REDIS_URL  # and no `db` fixture: any query would fail the test

    r = anon.get("/health/live")

    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_ready_checks_postgresql_and_redis_like_health(anon, db):
    assert anon.get("/health/ready").json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
    assert anon.get("/health/").json() == anon.get("/health/ready").json()


def test_ready_is_a_503_naming_redis_when_redis_is_down(anon, settings, db):
    settings.REDIS_URL = CLOSED_REDIS_URL

    r = anon.get("/health/ready")

    body = assert_error_body(r, 503, path="/health/ready", extra_keys=frozenset({"status", "checks"}))
    assert body["checks"] == {"database": "ok", "redis": "unavailable"}


# --------------------------------------------------------------------------- /health/jobs
def test_jobs_is_ok_while_every_job_runs_on_time_and_a_worker_answers(anon, db):
    with time_machine.travel(T0, tick=False) as t:
        all_jobs_succeed()
        heartbeat.worker_alive(WORKER)
        heartbeat.job_sent(SWEEP_TASK)
        t.shift(3)

        r = anon.get("/health/jobs")

    assert r.status_code == 200, r.json()
    body = r.json()
    assert body["status"] == "ok"
    assert set(body["jobs"]) == set(PERIODIC_TASKS)
    assert body["jobs"][SWEEP] == {
        "task": SWEEP_TASK,
        "intervalSeconds": 5.0,
        "lastSuccessAgeSeconds": 3.0,
        "lastRunAgeSeconds": 3.0,
        "lastRunState": "SUCCESS",
        "lastSentAgeSeconds": 3.0,
        "lagSeconds": 0.0,
        "late": False,
    }
    assert body["workers"] == {WORKER: {"lastHeartbeatAgeSeconds": 3.0, "alive": True}}
    assert body["queues"] == {"celery": 0, "eta": 0, "simulation": 0, "timers": 0, "webhooks": 0}  # the default queue and the routed ones


def test_a_job_is_late_only_past_twice_its_interval_and_the_503_names_it(anon, db):
    with time_machine.travel(T0, tick=False) as t:
        all_jobs_succeed()
        t.shift(10)  # exactly 2 × 5 s
        heartbeat.worker_alive(WORKER)
        assert anon.get("/health/jobs").status_code == 200

        t.shift(0.5)
        for name, (task, every, _) in PERIODIC_TASKS.items():
            if every == 5 and name != SWEEP:  # the other 5 s jobs ran: this one alone is late
                heartbeat.job_ran(task, "SUCCESS")
        r = anon.get("/health/jobs")
        body = assert_error_body(r, 503, path="/health/jobs", extra_keys=JOBS_KEYS)

    assert body["status"] == "unavailable"
    assert body["details"] == {"lateJobs": [SWEEP], "workersAlive": 1}
    assert body["message"] == (
        f"Periodic job late: {SWEEP} ({SWEEP_TASK}, every 5 s; last successful run 10.5 s ago, not sent by beat)."
    )
    assert body["jobs"][SWEEP]["late"] is True
    assert body["jobs"][SWEEP]["lagSeconds"] == 5.5
    assert body["jobs"][BREAKS]["late"] is False  # 10 s job: late after 20 s


def test_a_failing_job_is_late_even_though_it_runs(anon, db):
    with time_machine.travel(T0, tick=False) as t:
        all_jobs_succeed()
        t.shift(20)
        all_jobs_succeed(but=SWEEP)
        heartbeat.job_ran(SWEEP_TASK, "FAILURE")  # the last success was 20 s ago
        heartbeat.job_sent(SWEEP_TASK)
        heartbeat.worker_alive(WORKER)

        r = anon.get("/health/jobs")

    assert r.status_code == 503
    assert r.json()["details"]["lateJobs"] == [SWEEP]
    assert "last successful run 20 s ago, last run FAILURE 0 s ago)" in r.json()["message"]


def test_a_job_that_never_ran_is_late_counting_from_when_job_health_started(anon, db):
    with time_machine.travel(T0, tick=False) as t:
        heartbeat.worker_alive(WORKER)  # sets the reference time (as beat's start does)
        assert anon.get("/health/jobs").status_code == 200  # nothing due yet
        t.shift(11)
        heartbeat.worker_alive(WORKER)
        all_jobs_succeed(but=SWEEP)

        r = anon.get("/health/jobs")

    assert r.status_code == 503
    assert r.json()["details"]["lateJobs"] == [SWEEP]
    assert "no successful run in 11 s" in r.json()["message"]


def test_no_worker_answering_for_30_seconds_is_a_503(anon, db):
    with time_machine.travel(T0, tick=False) as t:
        heartbeat.worker_alive(WORKER)
        t.shift(30)
        all_jobs_succeed()
        assert anon.get("/health/jobs").status_code == 200

        t.shift(0.5)
        all_jobs_succeed()
        r = anon.get("/health/jobs")
        body = assert_error_body(r, 503, path="/health/jobs", extra_keys=JOBS_KEYS)

    assert body["message"] == "No Celery worker has answered for 30 s."
    assert body["details"] == {"lateJobs": [], "workersAlive": 0}
    assert body["workers"] == {WORKER: {"lastHeartbeatAgeSeconds": 30.5, "alive": False}}


def test_a_worker_that_stopped_cleanly_is_gone_at_once(anon, db):
    heartbeat.worker_alive(WORKER)
    all_jobs_succeed()
    heartbeat.worker_gone(WORKER)

    r = anon.get("/health/jobs")

    assert r.status_code == 503
    assert r.json()["workers"] == {}


def test_the_schedule_as_ops_tuned_it_in_the_admin_counts(anon, db):
    call_command("setup_periodic_tasks", stdout=StringIO())
    PeriodicTask.objects.filter(name=MANAGED_PREFIX + BREAKS).update(enabled=False)
    slower, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.filter(name=MANAGED_PREFIX + SWEEP).update(interval=slower)
    with time_machine.travel(T0, tick=False) as t:
        all_jobs_succeed()
        t.shift(60)
        heartbeat.worker_alive(WORKER)
        for name, (task, _, _) in PERIODIC_TASKS.items():
            if name not in (SWEEP, BREAKS):  # the jobs ops left alone ran
                heartbeat.job_ran(task, "SUCCESS")

        r = anon.get("/health/jobs")

    assert r.status_code == 200, r.json()["message"]
    assert BREAKS not in r.json()["jobs"]  # disabled: not expected to run
    assert r.json()["jobs"][SWEEP]["intervalSeconds"] == 60.0


def test_jobs_is_a_503_naming_redis_when_redis_is_down(anon, settings, db):
    settings.REDIS_URL = CLOSED_REDIS_URL

    r = anon.get("/health/jobs")

    body = assert_error_body(r, 503, path="/health/jobs", extra_keys=frozenset({"status"}))
    assert body["message"].startswith("Unavailable: redis")


# --------------------------------------------------------------------------- writers
def test_a_periodic_task_run_is_recorded_by_the_task_signal(db):
    result = purge_idempotency_records.delay()  # eager under the test settings

    assert result.successful()
    records = get_redis().hgetall(heartbeat.JOBS_KEY)
    assert records["common.purge_idempotency_records:state"] == "SUCCESS"
    assert records["common.purge_idempotency_records:ok"] == records["common.purge_idempotency_records:ran"]


def test_only_beat_records_sends(monkeypatch):
    after_task_publish.send(sender=SWEEP_TASK, body=None, exchange="", routing_key="celery")
    assert get_redis().hget(heartbeat.JOBS_KEY, f"{SWEEP_TASK}:sent") is None

    monkeypatch.setattr(config.celery, "_in_beat", True)
    after_task_publish.send(sender=SWEEP_TASK, body=None, exchange="", routing_key="celery")
    after_task_publish.send(sender="some.other_task", body=None, exchange="", routing_key="celery")

    assert set(get_redis().hgetall(heartbeat.JOBS_KEY)) == {f"{SWEEP_TASK}:sent"}


def test_writers_never_raise_when_redis_is_down(settings):
    settings.REDIS_URL = CLOSED_REDIS_URL

    heartbeat.worker_alive(WORKER)
    heartbeat.worker_gone(WORKER)
    heartbeat.job_ran(SWEEP_TASK, "SUCCESS")
    heartbeat.job_sent(SWEEP_TASK)
    heartbeat.mark_since()


# --------------------------------------------------------------------------- metrics
def test_metrics_show_job_lag_lateness_workers_and_queue_depth(anon, db):
    get_redis().rpush("celery", "m1", "m2", "m3")  # the test broker is the test Redis
    with time_machine.travel(T0, tick=False) as t:
        all_jobs_succeed()
        t.shift(12)
        heartbeat.worker_alive(WORKER)

        lag = metric_samples(anon, "periodic_job_lag_seconds")
        late = metric_samples(anon, "periodic_job_late")
        alive = metric_samples(anon, "celery_workers_alive")
        depth = metric_samples(anon, "celery_queue_length")

    sweep = (("job", SWEEP), ("task", SWEEP_TASK))
    breaks = (("job", BREAKS), ("task", PERIODIC_TASKS[BREAKS][0]))
    assert lag[sweep] == 7.0 and late[sweep] == 1
    assert lag[breaks] == 2.0 and late[breaks] == 0
    assert len(lag) == len(PERIODIC_TASKS)
    assert alive == {(): 1.0}
    assert depth == {(("queue", "celery"),): 3.0, (("queue", "eta"),): 0.0, (("queue", "simulation"),): 0.0,
                     (("queue", "timers"),): 0.0, (("queue", "webhooks"),): 0.0}


@pytest.mark.parametrize("ok_age, interval, late", [(9.9, 5, False), (10.0, 5, False), (10.1, 5, True), (7201, 3600, True)])
def test_lateness_is_more_than_twice_the_interval(ok_age, interval, late):
    job = heartbeat.Job("job", "some.task", interval)
    snap = heartbeat.Snapshot(
        since=0.0, records={"some.task:ok": "1000.0"}, workers={WORKER: 1000.0 + ok_age}, queues={}
    )

    result = heartbeat.assess([job], snap, now=1000.0 + ok_age)

    assert result.jobs["job"]["late"] is late
    assert result.ok is not late


# --------------------------------------------------------------------------- manage.py healthcheck
def healthcheck(*args) -> str:
    out = StringIO()
    call_command("healthcheck", *args, stdout=out)
    return out.getvalue().strip()


def test_healthcheck_worker_reads_this_hosts_heartbeat():
    with pytest.raises(CommandError, match=f"no heartbeat from celery@{socket.gethostname()}"):
        healthcheck("worker")

    with time_machine.travel(T0, tick=False) as t:
        heartbeat.worker_alive(f"celery@{socket.gethostname()}")
        t.shift(30)
        assert healthcheck("worker") == "worker: ok"
        t.shift(1)
        with pytest.raises(CommandError, match="last heartbeat 31 s ago"):
            healthcheck("worker")


def test_healthcheck_beat_reads_its_last_send():
    with pytest.raises(CommandError, match="no periodic job sent for 60 s"):
        healthcheck("beat")

    heartbeat.job_sent(SWEEP_TASK)

    assert healthcheck("beat") == "beat: ok"


def test_healthcheck_fixes_reads_this_hosts_stream_consumer():
    with pytest.raises(CommandError, match="no consumer group yet"):
        healthcheck("fixes")
    r = get_redis()
    r.xgroup_create(live.STREAM_KEY, live.STREAM_GROUP, id="0", mkstream=True)
    with pytest.raises(CommandError, match="no consumer"):
        healthcheck("fixes")

    consumer = f"{socket.gethostname()}-4242"
    r.xreadgroup(live.STREAM_GROUP, consumer, {live.STREAM_KEY: "0"})  # how consume_fixes starts

    assert healthcheck("fixes") == "fixes: ok"
    assert healthcheck("fixes", "--within", "0") == "fixes: ok"  # idle, but nothing is waiting
    r.xadd(live.STREAM_KEY, {"d": "x"})
    with pytest.raises(CommandError, match=f"consumers {socket.gethostname()}-\\* idle for 0 s with 1 entries waiting"):
        healthcheck("fixes", "--within", "0")


def test_healthcheck_fails_when_redis_is_down(settings):
    settings.REDIS_URL = CLOSED_REDIS_URL

    with pytest.raises(CommandError, match="redis unavailable"):
        healthcheck("worker")


def test_eta_refreshes_and_work_due_at_a_moment_have_queues_of_their_own():
    router = celery_app.amqp.router
    assert router.route({}, "tracking.refresh_eta")["queue"].name == "eta"
    assert router.route({}, "tracking.refresh_due_etas")["queue"].name == "eta"
    for task in ("offers.expire_overdue_offers", "offers.expire_offer", "escalation.check", "dispatch.run_matching_round",
                 "common.republish_deferred_tasks"):
        assert router.route({}, task)["queue"].name == "timers", task
    assert router.route({}, "notifications.deliver_webhooks")["queue"].name == "webhooks"  # (a worker of its own)
    for task in ("offers.push_offer", "common.purge_idempotency_records"):
        assert router.route({}, task)["queue"].name == "celery", task


@pytest.mark.parametrize(("queues", "counted"), [(["timers", "celery", "eta"], True), (["simulation"], False)])
def test_only_a_worker_that_runs_the_jobs_heartbeats(queues, counted):
    """The simulation worker (`-Q simulation`) heartbeat too: with the real worker down,
    `/health/jobs` and `celery_workers_alive` still counted one worker alive."""
    from types import SimpleNamespace

    from kombu import Queue

    started = []
    consumer = SimpleNamespace(
        hostname="simulation@host", task_consumer=SimpleNamespace(queues=[Queue(name) for name in queues]),
        timer=SimpleNamespace(call_repeatedly=lambda *args: started.append(args) or "tref", cancel=lambda tref: None),
    )
    step = config.celery.HealthHeartbeat(consumer)

    step.start(consumer)

    assert (get_redis().zscore(heartbeat.WORKERS_KEY, "simulation@host") is not None) is counted
    assert bool(started) is counted
    step.shutdown(consumer)
    assert get_redis().zscore(heartbeat.WORKERS_KEY, "simulation@host") is None
