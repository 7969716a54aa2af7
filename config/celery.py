import logging
import os
import sys

from celery import Celery, bootsteps
from celery.signals import (
    after_task_publish,
    beat_init,
    before_task_publish,
    setup_logging,
    task_postrun,
    task_prerun,
)
from celery.utils.log import LoggingProxy

from common import heartbeat
from common.logfilters import request_id
from config.periodic import PERIODIC_TASKS

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

app = Celery("dispatch")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _publish_retry_errback(exc, interval):
    from common.broadcast import publish_retry_errback  # Django's apps are not loaded yet here

    publish_retry_errback(exc, interval)


@app.on_after_configure.connect
def _count_publish_timeouts(sender, **kwargs):
    """Each failed attempt of a publish tells the Redis breaker (once the configuration is read:
    not while Django's settings module is still being imported)."""
    sender.conf.task_publish_retry_policy = {**sender.conf.task_publish_retry_policy, "errback": _publish_retry_errback}


app.autodiscover_tasks()


@setup_logging.connect
def _django_logging(**kwargs):
    """A worker and beat log through Django's LOGGING, as the web does: one JSON object a line
    (LOG_FORMAT), tokens in URLs redacted (a task's line may hold a tracking link: the console
    SMS backend's), the request id. Celery's own set-up (its plain format, its handlers in place
    of Django's) runs only when nothing answers this signal. `-l`/`--loglevel` is applied to the
    root logger on top of LOG_LEVEL."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
    loglevel = kwargs.get("loglevel")
    if loglevel:
        logging.getLogger().setLevel(loglevel)
    # Celery redirects a worker's print()s and stray stderr to its logger only when it set
    # logging up itself: here too, so that they come out as JSON lines as well.
    if app.conf.worker_redirect_stdouts and not isinstance(sys.stdout, LoggingProxy):
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)

# --------------------------------------------------------------------------- job liveness
# /health/jobs and the job gauges read what these write (common/heartbeat.py, docs/operations.md).
PERIODIC_TASK_NAMES = frozenset(task for task, _, _ in PERIODIC_TASKS.values())


class HealthHeartbeat(bootsteps.StartStopStep):
    """Every worker that runs the jobs (one not on the simulation queue alone) heartbeats into Redis
    from its consumer's event loop (the timer celery's own event heartbeat uses), so a worker
    whose loop is stuck stops answering too. The simulation worker (`-Q simulation`) does not:
    counted, it kept `/health/jobs` and `celery_workers_alive` at 1 with the real worker down."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        self.tref = None
        self.counted = False
        super().__init__(c, **kwargs)

    def start(self, c):
        if {queue.name for queue in c.task_consumer.queues} <= {SIMULATION_QUEUE}:
            return  # (runs simulations only: none of the jobs)
        self.counted = True
        heartbeat.worker_alive(c.hostname)
        self.tref = c.timer.call_repeatedly(heartbeat.WORKER_BEAT_EVERY, heartbeat.worker_alive, (c.hostname,))

    def stop(self, c):
        if self.tref is not None:
            c.timer.cancel(self.tref)
            self.tref = None

    def shutdown(self, c):
        self.stop(c)
        if self.counted:  # (a simulation worker never heartbeat)
            heartbeat.worker_gone(c.hostname)


SIMULATION_QUEUE = "simulation"  # (settings' CELERY_TASK_ROUTES: simulation.run)

app.steps["consumer"].add(HealthHeartbeat)


@task_postrun.connect
def _record_periodic_run(sender=None, state=None, **kwargs):
    """Each run of a scheduled job, wherever it ran (the worker; eagerly in tests)."""
    name = getattr(sender, "name", None)
    if name in PERIODIC_TASK_NAMES:
        heartbeat.job_ran(name, state)


_in_beat = False


@beat_init.connect
def _beat_started(sender=None, **kwargs):
    global _in_beat
    _in_beat = True
    heartbeat.mark_since()


@after_task_publish.connect
def _record_periodic_send(sender=None, **kwargs):
    """Beat's sends of scheduled jobs (sends from elsewhere, e.g. the API, do not count)."""
    if _in_beat and sender in PERIODIC_TASK_NAMES:
        heartbeat.job_sent(sender)


# ----------------------------------------------------------------------------- request ids
# A task's log lines carry the id of the request (or task) that enqueued it.
_request_id_tokens: dict[str, object] = {}


@before_task_publish.connect
def _carry_request_id(headers=None, **kwargs):
    if headers is not None and "request_id" not in headers:
        headers["request_id"] = request_id.get()


@task_prerun.connect
def _adopt_request_id(task_id=None, task=None, **kwargs):
    given = getattr(task.request, "request_id", None) if task is not None else None
    if given and task_id and not task.request.is_eager:
        _request_id_tokens[task_id] = request_id.set(given)


@task_postrun.connect
def _drop_request_id(task_id=None, **kwargs):
    token = _request_id_tokens.pop(task_id, None)
    if token is not None:
        request_id.reset(token)
