from celery import shared_task

from common.idempotency import purge_expired_idempotency_records


@shared_task(name="common.purge_idempotency_records")
def purge_idempotency_records() -> int:
    """Delete Idempotency-Key records past their TTL (bounded batch; the next run continues)."""
    return purge_expired_idempotency_records()
