from celery import shared_task

from dispatch import engine


@shared_task(name="dispatch.retry_unassigned")
def retry_unassigned() -> int:
    return engine.unassigned_retry()
