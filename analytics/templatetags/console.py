"""The admin index's KPI tiles (templates/admin/index.html): `{% ops_kpis as kpis %}`."""
from django import template
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from analytics.console import dashboard_kpis

register = template.Library()


@register.simple_tag
def ops_kpis():
    now = timezone.now()
    k = dashboard_kpis(now=now)
    unassigned = reverse("admin:escalation_unassignedorder_changelist")
    drivers = reverse("admin:availability_driver_changelist")
    tickets = reverse("admin:escalation_supportticket_changelist")
    offers = reverse("admin:offers_driveroffer_changelist")
    return {
        "now": now,
        "tz": settings.OPS_TIME_ZONE,
        "k": k,
        "unassigned_levels": [
            (level, n, f"{unassigned}?open=yes&escalation_level__exact={level}") for level, n in k.unassigned_by_level.items()
        ],
        "unassigned_url": f"{unassigned}?open=yes",
        "late_url": reverse("admin:dispatch_delivery_changelist") + "?late=yes",
        "driver_states": [
            (state, state.replace("_", " ").capitalize(), k.drivers.get(state, 0), f"{drivers}?availability__exact={state}")
            for state in ("available", "busy", "on_break", "paused")
        ],
        "zones_url": reverse("admin:zones_deliveryzone_changelist"),
        "zones_below_url": reverse("admin:zones_deliveryzone_changelist") + "?staffing=below",
        "offers_url": f"{offers}?status__exact=PENDING",
        # (relative: the list counts back from when it is opened, and the link is the same each
        # second, so a live refresh leaves the tile alone)
        "answered_url": f"{offers}?created_within=1h",
        "assigned_url": reverse("admin:dispatch_delivery_changelist") + "?assigned_within=1h",
        "tickets": [
            (priority, n, f"{tickets}?active=yes&priority__exact={priority}") for priority, n in k.tickets_by_priority.items()
        ],
        "tickets_url": f"{tickets}?active=yes",
        "map_url": reverse("admin-map"),
        "analytics_url": reverse("admin-analytics"),
    }
