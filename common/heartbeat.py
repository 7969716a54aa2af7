"""Job liveness: Celery workers heartbeat into Redis, periodic jobs record their runs there.

Writers (wired in config/celery.py):
- every worker, every `WORKER_BEAT_EVERY` s from its event loop: `worker_alive(hostname)`, a
  score in the sorted set `health:workers`; a worker shutting down cleanly removes itself;
- every run of a periodic job, in the worker: `job_ran(task, state)` (`<task>:ran`,
  `<task>:state` and, on success, `<task>:ok` in the hash `health:jobs`);
- beat, when it sends a periodic job: `job_sent(task)` (`<task>:sent`), which tells "beat
  stopped sending" from "the workers stopped running";
- `health:since`, set once (NX) by whoever comes first: the reference for a job that has
  not run yet since Redis started.

Readers: `/health/jobs` (common/views.py) and the Prometheus collector below, both through
`snapshot()` and the pure `assess()`. A job is late when its last successful run is older
than `LATE_FACTOR` times its interval; the workers are missing when none has answered for
`WORKER_TIMEOUT` seconds. Times are wall-clock (`time.time()`) of the writing host.

Nothing here ever raises into a worker or beat: a Redis failure is logged and skipped.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from django.conf import settings
from prometheus_client.core import GaugeMetricFamily

from common.redis import RedisUnavailable, get_redis

logger = logging.getLogger(__name__)

WORKERS_KEY = "health:workers"
JOBS_KEY = "health:jobs"
SINCE_KEY = "health:since"

WORKER_BEAT_EVERY = 5.0  # seconds between two heartbeats of a worker
WORKER_TIMEOUT = 30.0  # no heartbeat for this long: the worker is not answering
WORKER_FORGET_AFTER = 24 * 3600.0  # a worker silent this long is dropped from the report
LATE_FACTOR = 2  # a job is late when its last success is older than this many intervals

# What a write may raise without taking the writer down (Redis down, slow, or refusing).
REDIS_ERRORS = (*RedisUnavailable, redis.exceptions.RedisError)


@dataclass(frozen=True)
class Job:
    """One periodic job as beat runs it: its schedule name, Celery task and interval."""

    name: str
    task: str
    interval: float


def _now(now: float | None) -> float:
    return time.time() if now is None else now


# --------------------------------------------------------------------------- writers
def _write(what: str, fn: Callable[[redis.Redis], object]) -> None:
    try:
        fn(get_redis())
    except REDIS_ERRORS as exc:
        logger.warning("heartbeat: could not record %s: %s", what, exc)


def mark_since(now: float | None = None) -> None:
    """Set the reference time of jobs that have not run yet, unless it is set already."""
    _write("start time", lambda r: r.set(SINCE_KEY, repr(_now(now)), nx=True))


def worker_alive(hostname: str, now: float | None = None) -> None:
    now = _now(now)

    def write(r: redis.Redis) -> None:
        pipe = r.pipeline(transaction=False)
        pipe.zadd(WORKERS_KEY, {hostname: now})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - WORKER_FORGET_AFTER)
        pipe.set(SINCE_KEY, repr(now), nx=True)
        pipe.execute()

    _write(f"worker heartbeat of {hostname}", write)


def worker_gone(hostname: str) -> None:
    """A worker stopping cleanly says so, rather than waiting for its heartbeat to age."""
    _write(f"worker shutdown of {hostname}", lambda r: r.zrem(WORKERS_KEY, hostname))


def job_ran(task: str, state: str | None, now: float | None = None) -> None:
    now = _now(now)
    fields = {f"{task}:ran": repr(now), f"{task}:state": state or "UNKNOWN"}
    if state == "SUCCESS":
        fields[f"{task}:ok"] = repr(now)
    _write(f"run of {task}", lambda r: r.hset(JOBS_KEY, mapping=fields))


def job_sent(task: str, now: float | None = None) -> None:
    _write(f"send of {task}", lambda r: r.hset(JOBS_KEY, f"{task}:sent", repr(_now(now))))


# --------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class Snapshot:
    """What Redis holds, read in one round trip (plus one for the queue lengths)."""

    since: float
    records: dict[str, str]
    workers: dict[str, float]
    queues: dict[str, int | None]


def _broker_redis() -> redis.Redis | None:
    """The Celery broker's Redis (its lists are the queues); None for a non-Redis broker."""
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return get_redis(url)


def queue_lengths(queues: Iterable[str]) -> dict[str, int | None]:
    """LLEN of each Celery queue in the broker (None when the broker is not Redis)."""
    queues = sorted(set(queues))
    client = _broker_redis()
    if client is None:
        return dict.fromkeys(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return dict(zip(queues, pipe.execute(), strict=True))


def snapshot(queues: Iterable[str] = (), now: float | None = None) -> Snapshot:
    """Raises what the Redis client raises when Redis is down (the caller reports it)."""
    now = _now(now)
    pipe = get_redis().pipeline(transaction=False)
    pipe.set(SINCE_KEY, repr(now), nx=True)
    pipe.get(SINCE_KEY)
    pipe.hgetall(JOBS_KEY)
    pipe.zrangebyscore(WORKERS_KEY, now - WORKER_FORGET_AFTER, "+inf", withscores=True)
    _, since, records, workers = pipe.execute()
    return Snapshot(
        since=float(since) if since else now,
        records=records,
        workers={host: float(score) for host, score in workers},
        queues=queue_lengths(queues),
    )


def worker_heartbeat_age(hostname: str, now: float | None = None) -> float | None:
    """Seconds since this worker's last heartbeat (None: never, or it stopped cleanly)."""
    seen = get_redis().zscore(WORKERS_KEY, hostname)
    return None if seen is None else _now(now) - seen


def beat_send_age(now: float | None = None) -> float | None:
    """Seconds since beat last sent any periodic job (None: not since Redis started)."""
    sent = [float(v) for k, v in get_redis().hgetall(JOBS_KEY).items() if k.endswith(":sent")]
    return _now(now) - max(sent) if sent else None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _seconds(value: float) -> float:
    return round(max(value, 0.0), 1)


@dataclass(frozen=True)
class Assessment:
    ok: bool
    problems: list[str]  # one sentence each, naming the late job or the missing workers
    late_jobs: list[str]
    workers_alive: int
    jobs: dict[str, dict]
    workers: dict[str, dict]

    @property
    def message(self) -> str:
        return " ".join(self.problems)


def assess(jobs: Iterable[Job], snap: Snapshot, now: float | None = None) -> Assessment:
    """Which jobs are late and whether any worker answers (no I/O: unit-testable)."""
    now = _now(now)
    problems: list[str] = []
    late: list[str] = []
    job_report: dict[str, dict] = {}
    for job in sorted(jobs, key=lambda j: j.name):
        ok = _float(snap.records.get(f"{job.task}:ok"))
        ran = _float(snap.records.get(f"{job.task}:ran"))
        sent = _float(snap.records.get(f"{job.task}:sent"))
        age = now - (ok if ok is not None else snap.since)
        is_late = age > LATE_FACTOR * job.interval
        job_report[job.name] = {
            "task": job.task,
            "intervalSeconds": job.interval,
            "lastSuccessAgeSeconds": _seconds(now - ok) if ok is not None else None,
            "lastRunAgeSeconds": _seconds(now - ran) if ran is not None else None,
            "lastRunState": snap.records.get(f"{job.task}:state"),
            "lastSentAgeSeconds": _seconds(now - sent) if sent is not None else None,
            "lagSeconds": _seconds(age - job.interval),
            "late": is_late,
        }
        if is_late:
            late.append(job.name)
            if ok is None:
                what = f"no successful run in {_seconds(age):g} s"
            else:
                what = f"last successful run {_seconds(age):g} s ago"
            if ran is not None and ran != ok:
                what += f", last run {snap.records.get(f'{job.task}:state')} {_seconds(now - ran):g} s ago"
            if sent is None or now - sent > LATE_FACTOR * job.interval:
                what += ", not sent by beat"
            problems.append(f"Periodic job late: {job.name} ({job.task}, every {job.interval:g} s; {what}).")

    worker_report = {}
    alive = 0
    for host, seen in sorted(snap.workers.items()):
        answering = now - seen <= WORKER_TIMEOUT
        alive += answering
        worker_report[host] = {"lastHeartbeatAgeSeconds": _seconds(now - seen), "alive": answering}
    if not alive:
        problems.append(f"No Celery worker has answered for {WORKER_TIMEOUT:g} s.")

    return Assessment(
        ok=not problems,
        problems=problems,
        late_jobs=late,
        workers_alive=alive,
        jobs=job_report,
        workers=worker_report,
    )


# --------------------------------------------------------------------------- Prometheus
class JobHealthCollector:
    """Gauges computed from Redis at scrape time: job lag, lateness, workers, queue depth.

    `jobs` and `queues` are callables, so the schedule (config, or as ops tuned it in the
    admin) and the queue names are read at every scrape, by the layer that knows them."""

    def __init__(self, jobs: Callable[[], Iterable[Job]], queues: Callable[[], Iterable[str]]):
        self._jobs = jobs
        self._queues = queues

    def collect(self):
        jobs = list(self._jobs())
        try:
            now = time.time()
            snap = snapshot(self._queues(), now=now)
        except REDIS_ERRORS as exc:
            logger.warning("metrics: job health unavailable: %s", exc)
            return
        result = assess(jobs, snap, now=now)

        lag = GaugeMetricFamily(
            "periodic_job_lag_seconds",
            "Seconds a periodic job is behind schedule: time since its last successful run minus its interval",
            labels=["job", "task"],
        )
        interval = GaugeMetricFamily("periodic_job_interval_seconds", "Interval of a periodic job", labels=["job", "task"])
        late = GaugeMetricFamily(
            "periodic_job_late", f"1 when a periodic job has not succeeded for {LATE_FACTOR} intervals", labels=["job", "task"]
        )
        for name, job in result.jobs.items():
            labels = [name, job["task"]]
            lag.add_metric(labels, job["lagSeconds"])
            interval.add_metric(labels, job["intervalSeconds"])
            late.add_metric(labels, 1 if job["late"] else 0)
        yield lag
        yield interval
        yield late

        yield GaugeMetricFamily(
            "celery_workers_alive",
            f"Celery workers whose heartbeat is at most {WORKER_TIMEOUT:g} s old",
            value=result.workers_alive,
        )
        depth = GaugeMetricFamily("celery_queue_length", "Messages waiting in a Celery queue (LLEN in the broker)", labels=["queue"])
        for queue, length in snap.queues.items():
            if length is not None:
                depth.add_metric([queue], length)
        yield depth
