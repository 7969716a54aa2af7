from celery import shared_task

from availability import geo, live, services
from workflows import drivers as driver_workflows


@shared_task(name="availability.expire_breaks")
def expire_breaks() -> int:
    return services.breaks_expire()


@shared_task(name="availability.mark_stale_drivers_offline")
def mark_stale_drivers_offline() -> int:
    """Drivers with a stale fix, and those of deactivated logins still available or on a break."""
    return driver_workflows.stale_drivers_mark_offline() + driver_workflows.deactivated_drivers_mark_offline()


@shared_task(name="availability.reconcile_geo_index")
def reconcile_geo_index() -> dict:
    result = geo.reconcile_index()
    result["activeDeliveries"] = live.active_reconcile()
    result["positionsReseeded"] = live.positions_reseed()
    return result
