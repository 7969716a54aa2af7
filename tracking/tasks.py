import logging
import uuid
from datetime import datetime

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.utils import timezone

from common.broadcast import done_due, kick_started, put_back_due, take_due
from tracking import services

logger = logging.getLogger(__name__)

# a run's lease on what it took outlasts its hard time limit by this much (a live run's items
# are never handed to another)
DUE_LEASE_MARGIN_SECONDS = 15


@shared_task(name=services.ETA_REFRESH_TASK, ignore_result=True)
def refresh_eta(delivery_id: str, now: str | None = None) -> None:
    """After a status change committed: refresh the delivery's ETA and tell the customer,
    whether or not the times moved, since the legs it covers have changed. Off the request
    thread; a failure is logged (the driver's next fix refreshes it again). Enqueued per
    delivery only when Redis is down (`refresh_due_etas` otherwise)."""
    try:
        services.delivery_eta_refresh(
            delivery_id=delivery_id, now=datetime.fromisoformat(now) if now else None, force_event=True
        )
    except SoftTimeLimitExceeded:
        raise  # the task's time is up: not one delivery's failure
    except Exception:
        logger.warning("ETA refresh of delivery %s failed", delivery_id, exc_info=True)


@shared_task(name=services.ETA_REFRESH_DUE_TASK, ignore_result=True, bind=True)
def refresh_due_etas(self) -> int:
    """`refresh_eta` of every delivery whose status changed since the last run (marked in
    Redis by `workflows.unit.eta_refresh_enqueue`): kicked by the first commit that marks one
    while no kick is queued, and every 15 s as the sweep. Takes the kick first, so a commit
    from now on kicks the next run. Each is refreshed as of now (never before its change: a
    driver fix's ETA computed since the change must not make the forced refresh a no-op).
    What it takes is leased to it until past the task's hard time limit: a run whose worker
    dies leaves them to the first run after the lease; a run out of time (the soft limit)
    puts back what it did not do at once. Returns how many deliveries it took."""
    run = self.request.id or uuid.uuid4().hex
    kick_started(services.ETA_REFRESH_DUE_TASK)
    due = take_due(services.ETA_DUE_KEY, run, settings.CELERY_TASK_TIME_LIMIT + DUE_LEASE_MARGIN_SECONDS)
    left = dict(due)
    try:
        for delivery_id, changed_at in due.items():
            try:
                now = max(datetime.fromisoformat(changed_at), timezone.now())
            except (TypeError, ValueError):  # not a mark this code wrote: dropped, not retried forever
                logger.warning("ETA refresh of delivery %s dropped: unreadable change time %r", delivery_id, changed_at)
            else:
                refresh_eta(delivery_id, now.isoformat())
            del left[delivery_id]
    except SoftTimeLimitExceeded:
        logger.warning("ETA refresh run out of time: %d of %d deliveries put back", len(left), len(due))
        put_back_due(services.ETA_DUE_KEY, run, left)
    done_due(services.ETA_DUE_KEY, run, [item for item in due if item not in left])
    return len(due)
