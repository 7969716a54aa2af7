from celery import shared_task

from workflows import dispatching as engine


@shared_task(name="dispatch.retry_unassigned")
def retry_unassigned() -> int:
    return engine.unassigned_retry()
