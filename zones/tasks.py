from celery import shared_task

from zones import services


@shared_task(name="zones.refresh_zone_health")
def refresh_zone_health() -> int:
    """Every 60 s (config/periodic.py): recompute, store, cache and announce every zone's health."""
    return services.zone_health_refresh()
