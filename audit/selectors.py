from __future__ import annotations

from django.db.models import Count

from audit.models import DeliveryAuditLog


def audit_events_for_delivery(*, delivery_id, event_type: str | None = None):
    qs = DeliveryAuditLog.objects.filter(delivery_id=delivery_id)
    if event_type:
        qs = qs.filter(event_type=event_type)
    return qs


def audit_summary(queryset) -> dict:
    by_type = dict(queryset.order_by().values_list("event_type").annotate(n=Count("id")))
    by_actor = dict(queryset.order_by().values_list("actor_type").annotate(n=Count("id")))
    return {
        "totalEvents": sum(by_type.values()),
        "byEventType": by_type,
        "byActorType": {(k or "unknown"): v for k, v in by_actor.items()},
    }
