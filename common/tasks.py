from celery import shared_task

from common.deferred import deferred_tasks_republish
from common.idempotency import purge_expired_idempotency_records


@shared_task(name="common.purge_idempotency_records")
def purge_idempotency_records() -> int:
    """Delete Idempotency-Key records past their TTL (bounded batch; the next run continues)."""
    return purge_expired_idempotency_records()


@shared_task(name="common.republish_deferred_tasks")
def republish_deferred_tasks() -> int:
    """Every 10 s: publish again the durable tasks whose publish failed after commit."""
    return deferred_tasks_republish()
