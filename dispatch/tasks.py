from celery import shared_task

from workflows import dispatching as engine
from workflows import matching


@shared_task(name="dispatch.retry_unassigned")
def retry_unassigned() -> int:
    return engine.unassigned_retry()


@shared_task(name="dispatch.run_matching_rounds")
def run_matching_rounds() -> int:
    """Every second: the batched_matching rounds that are due (workflows.matching)."""
    return matching.matching_rounds_run()
