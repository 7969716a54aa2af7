from datetime import datetime

from celery import shared_task

from availability.services import DRIVER_FREED_TASK
from workflows import dispatching as engine
from workflows import matching, quotes


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


@shared_task(name=engine.SECOND_LOOK_TASK, ignore_result=True)
def second_look(delivery_id: str, attempted_at: str, radius_km: float | None = None, exclude_driver_ids=()) -> bool:
    """A moment after a dispatch that found its candidates held by other transactions and could
    not wait for them (workflows.dispatching.SECOND_LOOK_TASK)."""
    return engine.delivery_second_look(delivery_id=delivery_id, attempted_at=datetime.fromisoformat(attempted_at),
                                       radius_km=radius_km, exclude_driver_ids=exclude_driver_ids or ())


@shared_task(name="dispatch.purge_expired_quotes")
def purge_expired_quotes() -> int:
    """Hourly: the quotes never used, a while after they expired (workflows.quotes.quotes_purge)."""
    return quotes.quotes_purge()


@shared_task(name=DRIVER_FREED_TASK, ignore_result=True)
def driver_freed(driver_id: str, freed_at: str, waited: bool = False) -> bool:
    """A moment after a driver became available: the deliveries waiting near it
    (workflows.dispatching.driver_freed_pull; `waited`: its second look, for a fix)."""
    return engine.driver_freed_pull(driver_id=driver_id, freed_at=datetime.fromisoformat(freed_at), waited=waited)
