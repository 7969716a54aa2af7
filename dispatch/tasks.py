from celery import shared_task

from workflows import dispatching as engine
from workflows import matching


@shared_task(name="dispatch.retry_unassigned")
def retry_unassigned() -> int:
    return engine.unassigned_retry()


@shared_task(name="dispatch.run_matching_round", ignore_result=True)
def run_matching_round(zone_id: str | None) -> int:
    """Scheduled for the end of a zone's window: its batched_matching round (workflows.matching)."""
    return matching.matching_round_when_due(zone_id=zone_id)


@shared_task(name="dispatch.run_matching_rounds")
def run_matching_rounds() -> int:
    """Every 15 s, the safety net: every batched_matching round that is due and was not run."""
    return matching.matching_rounds_run()
