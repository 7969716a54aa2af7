from django.apps import AppConfig
from django.conf import settings
from django.core import checks


def check_dispatch_policy_settings(app_configs=None, **kwargs):
    """The global dispatch policy settings (zones/policies.py) within what a zone may set: a
    mistyped DISPATCH_POLICY would otherwise run every zone without its own policy as nothing
    known, and an out-of-range size would offer more (or fewer) drivers than a zone ever could."""
    from dispatch.models import DispatchPolicy
    from zones import models as m

    errors = []
    if settings.DISPATCH_POLICY not in DispatchPolicy.values:
        errors.append(checks.Error(
            f"DISPATCH_POLICY is {settings.DISPATCH_POLICY!r}; it must be one of {', '.join(DispatchPolicy.values)}.",
            id="zones.E001",
        ))
    ranges = (
        ("DISPATCH_BATCH_SIZE", m.BATCH_SIZE_MIN, m.BATCH_SIZE_MAX),
        ("DISPATCH_BROADCAST_MAX", m.BROADCAST_MAX_MIN, m.BROADCAST_MAX_MAX),
        ("DISPATCH_MATCHING_WINDOW_SECONDS", 0, m.MATCHING_WINDOW_MAX),
        ("STACKING_MAX_DETOUR_MINUTES", m.DETOUR_MINUTES_MIN, m.DETOUR_MINUTES_MAX),
    )
    for name, low, high in ranges:
        value = getattr(settings, name)
        if not low <= value <= high:
            errors.append(checks.Error(f"{name} is {value}; it must be from {low} to {high}.", id="zones.E002"))
    bad = {k: v for k, v in settings.VEHICLE_CAPACITY.items() if not 1 <= v <= 10}
    if bad:
        errors.append(checks.Error(f"VEHICLE_CAPACITY {bad}: each capacity must be from 1 to 10.", id="zones.E003"))
    return errors


class ZonesConfig(AppConfig):
    name = "zones"
    verbose_name = "Delivery zones"

    def ready(self):
        checks.register(check_dispatch_policy_settings)
