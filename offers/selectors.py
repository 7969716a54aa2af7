from datetime import datetime

from offers.models import DriverOffer, OfferStatus


def offers_for_driver(*, driver_id, status: str | None, now: datetime):
    """Pending and unexpired by default; `status` for history."""
    qs = DriverOffer.objects.filter(driver_id=driver_id)
    if status:
        return qs.filter(status=status)
    return qs.filter(status=OfferStatus.PENDING, expires_at__gt=now)


def offers_for_delivery(*, delivery_id, driver_id=None):
    qs = DriverOffer.objects.filter(delivery_id=delivery_id)
    if driver_id is not None:
        qs = qs.filter(driver_id=driver_id)
    return qs
