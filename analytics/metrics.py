"""Gauges computed from PostgreSQL at scrape time: correct under any number of processes."""
from datetime import timedelta

from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from availability.models import Driver, DriverAvailability
from escalation.models import UnassignedOrder
from offers.models import ANSWER_ACCEPTED, ANSWERED, DriverOffer

ACCEPTANCE_WINDOW = timedelta(hours=24)


class DispatchCollector:
    def collect(self):
        by_status = dict(Driver.objects.order_by().values_list("availability").annotate(n=Count("id")))
        drivers = GaugeMetricFamily("driver_availability_total", "Total drivers by availability status", labels=["status"])
        for status in DriverAvailability.values:
            drivers.add_metric([status], by_status.get(status, 0))
        yield drivers

        open_count = UnassignedOrder.objects.filter(resolved_at__isnull=True).count()
        yield GaugeMetricFamily("unassigned_order_count", "Number of unassigned orders", value=open_count)

        since = timezone.now() - ACCEPTANCE_WINDOW
        answered = DriverOffer.objects.filter(created_at__gte=since).aggregate(
            accepted=Count("id", filter=ANSWER_ACCEPTED),
            answered=Count("id", filter=ANSWERED),
        )
        rate = answered["accepted"] / answered["answered"] if answered["answered"] else 0.0
        yield GaugeMetricFamily("offer_acceptance_rate", "Rate of offer acceptance (offers of the last 24 h)", value=rate)
