from datetime import datetime

from celery import shared_task
from celery.utils.time import get_exponential_backoff_interval

from offers import services
from workflows import offers as offer_workflows


@shared_task(name="offers.expire_offer", ignore_result=True)
def expire_offer(offer_id: str) -> bool:
    """Scheduled at the offer's expiresAt; a no-op if it was answered or is not due yet (the
    sweep catches anything this misses)."""
    return offer_workflows.offer_expire(offer_id=offer_id)


@shared_task(name="offers.expire_overdue_offers")
def expire_overdue_offers() -> int:
    return offer_workflows.offers_expire_overdue()


@shared_task(
    name="offers.push_offer", bind=True, ignore_result=True, autoretry_for=(Exception,), retry_backoff=2,
    retry_backoff_max=30, retry_jitter=True, max_retries=4,
)
def push_offer(self, offer_id: str, driver_id: str, event: dict, claimed_at: str | None = None) -> bool:
    """The offer to the driver's phone, off the request thread; a gateway failure is retried
    with backoff (an offer lives 10–120 s, so the retries stop within that), holding the claim
    the first run made; redelivered after its worker died, it takes over the claim left
    (services.offer_push)."""
    try:
        return services.offer_push(
            offer_id=offer_id, driver_id=driver_id, event=event,
            claimed_at=None if claimed_at is None else datetime.fromisoformat(claimed_at),
            redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
        )
    except services.PushFailed as failed:
        countdown = get_exponential_backoff_interval(2, self.request.retries, 30, full_jitter=True)
        raise self.retry(exc=failed, countdown=countdown, kwargs={"claimed_at": failed.claimed_at.isoformat()})
