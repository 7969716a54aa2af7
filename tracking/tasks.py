import logging
from datetime import datetime

from celery import shared_task

from tracking import services

logger = logging.getLogger(__name__)


@shared_task(name="tracking.refresh_eta", ignore_result=True)
def refresh_eta(delivery_id: str, now: str | None = None) -> None:
    """After a status change committed: refresh the delivery's ETA and tell the customer,
    whether or not the times moved, since the legs it covers have changed. Off the request
    thread; a failure is logged (the driver's next fix refreshes it again)."""
    try:
        services.delivery_eta_refresh(
            delivery_id=delivery_id, now=datetime.fromisoformat(now) if now else None, force_event=True
        )
    except Exception:
        logger.warning("ETA refresh of delivery %s failed", delivery_id, exc_info=True)
