from celery import shared_task

from offers import services


@shared_task(name="offers.expire_offer", ignore_result=True)
def expire_offer(offer_id: str) -> bool:
    """Scheduled at the offer's expiresAt; a no-op if it was answered or is not due yet (the
    sweep catches anything this misses)."""
    return services.offer_expire(offer_id=offer_id)


@shared_task(name="offers.expire_overdue_offers")
def expire_overdue_offers() -> int:
    return services.offers_expire_overdue()
