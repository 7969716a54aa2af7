"""Task publishes that failed after commit, kept in PostgreSQL and published again.

A task enqueued after commit with `durable_seconds` (`common.broadcast.enqueue_task_on_commit`)
whose publish fails — the broker down, or the Redis breaker open after a hang — is written to
`DeferredTask` instead of being lost; the sweep (`common.republish_deferred_tasks`, every 10 s)
publishes the rows again, oldest first, and drops those past their time. The tasks kept so are
the ones nothing else re-sends: an offer's push, ops alerts (e-mail, chat), a driver's notices,
a simulation run.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from common.broadcast import broker_is_open, publish, task_registered
from common.models import DeferredTask

logger = logging.getLogger(__name__)


def defer(name: str, args, *, seconds: float) -> None:
    """Keep the task `name(*args)` to be published again for `seconds` (after its publish failed)."""
    now = timezone.now()
    DeferredTask.objects.create(task=name, args=list(args), created_at=now, expires_at=now + timedelta(seconds=seconds))
    logger.warning("publish of %s deferred: the sweep sends it again", name)


def deferred_tasks_republish(*, now: datetime | None = None, batch_size: int = 100) -> int:
    """Publish the kept tasks again (oldest first; rows another sweep holds are skipped) and
    drop those past their time. A row whose publish fails stays (its attempts counted); the run
    stops when the breaker says the broker hangs. Returns how many rows were done (published,
    or dropped for a task no longer registered). At least once: a publish that timed out may
    have reached the broker, and a row published in a run whose commit then fails goes again
    (the offer push claims its offer, so it is sent once; an alert can come twice)."""
    now = now or timezone.now()
    dropped, _ = DeferredTask.objects.filter(expires_at__lte=now).delete()
    if dropped:
        logger.warning("%s deferred task publishes dropped: past their time", dropped)
    if broker_is_open():
        return 0
    with transaction.atomic():
        rows = list(DeferredTask.objects.select_for_update(skip_locked=True).order_by("created_at", "id")[:batch_size])
        done = []
        for row in rows:
            if not task_registered(row.task):  # renamed or removed by a deploy since
                logger.error("deferred publish of %s dropped: no such task", row.task)
                done.append(row.pk)
                continue
            if publish(row.task, row.args):
                done.append(row.pk)
                continue
            DeferredTask.objects.filter(pk=row.pk).update(attempts=row.attempts + 1)
            if broker_is_open():  # hung again: the rest waits for the next run
                break
        DeferredTask.objects.filter(pk__in=done).delete()
    return len(done)
