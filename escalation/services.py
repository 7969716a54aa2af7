from __future__ import annotations

from datetime import datetime

from django.db.models import F

from escalation.models import EscalationStatus, UnassignedOrder


def unassigned_record_failure(*, delivery, reason: str, now: datetime) -> UnassignedOrder:
    """Record a dispatch attempt that found nobody. Caller holds the delivery's lock, so the
    open record (one per delivery, enforced by a partial unique constraint) cannot race."""
    record = UnassignedOrder.objects.filter(delivery=delivery, resolved_at__isnull=True).first()
    if record is None:
        return UnassignedOrder.objects.create(
            delivery=delivery, seller_order_id=delivery.seller_order_id, location=delivery.pickup_location,
            failure_reason=reason, first_attempt_at=now, last_attempt_at=now, attempt_count=1,
        )
    UnassignedOrder.objects.filter(pk=record.pk).update(
        attempt_count=F("attempt_count") + 1, last_attempt_at=now, failure_reason=reason
    )
    record.refresh_from_db()
    return record


def unassigned_resolve(*, delivery, now: datetime, status: str | None = None) -> UnassignedOrder | None:
    """Close the delivery's open record (assignment: RESOLVED, or REASSIGNED once escalated to
    the wide-radius retry). Caller holds the delivery's lock."""
    record = UnassignedOrder.objects.filter(delivery=delivery, resolved_at__isnull=True).first()
    if record is None:
        return None
    if status is None:
        status = EscalationStatus.REASSIGNED if record.escalation_level >= 2 else EscalationStatus.RESOLVED
    record.resolved_at = now
    record.escalation_status = status
    record.save(update_fields=["resolved_at", "escalation_status"])
    return record


def unassigned_cancel(*, delivery, now: datetime) -> UnassignedOrder | None:
    """The delivery was cancelled: close its open record as CANCELLED. Caller holds the lock."""
    return unassigned_resolve(delivery=delivery, now=now, status=EscalationStatus.CANCELLED)
