from __future__ import annotations

from django.db.models import QuerySet

from availability.models import Driver, DriverAvailabilityHistory
from common.exceptions import NotFound
from common.roles import driver_of, is_ops


def availability_history_for_driver(*, driver_id):
    return DriverAvailabilityHistory.objects.filter(driver_id=driver_id)


def driver_get_for_user(*, user, driver_id) -> Driver:
    """Ops read any driver; a driver only itself (another driver's id is a 404)."""
    if is_ops(user):
        driver = Driver.objects.select_related("user").filter(pk=driver_id).first()
    else:
        own = driver_of(user)
        driver = own if own is not None and str(own.pk) == str(driver_id) else None
    if driver is None:
        raise NotFound("Driver not found.")
    return driver


def driver_get_own(*, user, driver_id) -> Driver:
    """What only the driver itself may do (post a location, answer an offer, move a delivery):
    the login's own driver, whatever other role it has (another driver's id is a 404, the
    fast lane's answer too)."""
    own = driver_of(user)
    if own is None or str(own.pk) != str(driver_id):
        raise NotFound("Driver not found.")
    return own


def drivers_list(*, availability: str | None = None) -> QuerySet[Driver]:
    qs = Driver.objects.select_related("user")
    if availability:
        qs = qs.filter(availability=availability)
    return qs


def driver_login_deactivated(driver_id) -> bool:
    """Whether the driver's login is deactivated (the admin's Users page): such a driver can
    answer nothing, so ops cannot put it back to work. False for an
    unknown driver (its caller's 404)."""
    return Driver.objects.filter(pk=driver_id, user__is_active=False).exists()
