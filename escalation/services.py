"""Every write to unassigned-order records (STYLE rule 1).

Lock order, as everywhere: offer → delivery → driver. Unassigned-order records and their
tickets are written while holding the delivery's lock: delivery → record → ticket.

Support tickets are written by `escalation.tickets`, reached from here only through the ticket
backend (`escalation.backends`). The escalation itself (the check, manual escalation, its
tiers) and the ticket actions that change the delivery span apps: `workflows.escalations`.
"""
from __future__ import annotations

import logging
from datetime import datetime

from django.db import connection
from django.db.models import Case, F, Value, When

from common.actors import Actor
from common.broadcast import broadcast_on_commit
from common.exceptions import NotFound
from escalation import alerts, events
from escalation.backends import get_ticket_backend
from escalation.levels import EscalationLevelExceeded, waited_minutes
from escalation.models import (
    EscalationStatus,
    FailureReason,
    TicketStatus,
    UnassignedOrder,
)
from escalation.tickets import LIVE_GROUPS
from offers.models import DriverOffer

logger = logging.getLogger(__name__)

__all__ = [
    "EscalationLevelExceeded", "LIVE_GROUPS", "unassigned_cancel", "unassigned_lock", "unassigned_lock_open",
    "unassigned_mark_escalated", "unassigned_record_detected", "unassigned_record_failure", "unassigned_resolve",
]


# ------------------------------------------------------------------ records (dispatch engine)


def unassigned_record_failure(*, delivery, reason: str, now: datetime) -> None:
    """Record a dispatch attempt that found nobody: one UPDATE of the open record, or, when the
    delivery has none, one INSERT. Caller holds the delivery's lock, so the open record (one
    per delivery, enforced by a partial unique constraint) cannot race."""
    bumped = UnassignedOrder.objects.filter(delivery=delivery, resolved_at__isnull=True).update(
        attempt_count=F("attempt_count") + 1, last_attempt_at=now, failure_reason=reason,
        # a level-2 offer that came to nothing (rejected, expired, withdrawn) leaves no driver
        escalation_status=Case(When(escalation_status=EscalationStatus.REASSIGNED, then=Value(EscalationStatus.NOTIFIED)),
                               default=F("escalation_status")),
    )
    if not bumped:
        UnassignedOrder.objects.create(
            delivery=delivery, seller_order_id=delivery.seller_order_id, location=delivery.pickup_location,
            failure_reason=reason, first_attempt_at=now, last_attempt_at=now, attempt_count=1,
        )


def unassigned_record_detected(*, delivery, now: datetime) -> UnassignedOrder:
    """A ready delivery waiting past level 1 that dispatch never recorded as failed (seed:
    createUnassignedRecord). Caller holds the delivery's lock and saw no open record."""
    logger.warning("unassigned_order_detected delivery=%s waited=%s min", delivery.pk, waited_minutes(delivery, now))
    return UnassignedOrder.objects.create(
        delivery=delivery, seller_order_id=delivery.seller_order_id, location=delivery.pickup_location,
        failure_reason=FailureReason.UNASSIGNED, first_attempt_at=delivery.ready_at, last_attempt_at=now,
        attempt_count=DriverOffer.objects.filter(delivery=delivery).count(),
    )


def unassigned_lock_open(*, delivery) -> UnassignedOrder | None:
    """The delivery's open record, locked (None: there is none). Caller holds the delivery's lock."""
    return (
        UnassignedOrder.objects.select_for_update(of=("self",))
        .filter(delivery=delivery, resolved_at__isnull=True).first()
    )


def unassigned_lock(*, record_id) -> UnassignedOrder:
    """A record by id, locked. Caller holds its delivery's lock (delivery → record)."""
    record = UnassignedOrder.objects.select_for_update(of=("self",)).filter(pk=record_id).first()
    if record is None:
        raise NotFound("Unassigned order not found.")
    return record


def _close_record_ticket(record: UnassignedOrder, *, status: str, resolution: str, actor: Actor, now: datetime) -> None:
    if record.support_ticket_id:
        get_ticket_backend().close_ticket(
            ticket_id=record.support_ticket_id, status=status, resolution=resolution, actor=actor, now=now
        )


_RESOLVE_FIELDS = ("id", "delivery_id", "escalation_level", "escalation_status", "support_ticket_id", "resolved_at")
_RESOLVE_SQL = (
    f"UPDATE {UnassignedOrder._meta.db_table} SET resolved_at = %(now)s, escalation_status = COALESCE(%(status)s, "
    f"CASE WHEN escalation_level >= 2 THEN '{EscalationStatus.REASSIGNED}' ELSE '{EscalationStatus.RESOLVED}' END) "
    f"WHERE delivery_id = %(delivery_id)s AND resolved_at IS NULL RETURNING {', '.join(_RESOLVE_FIELDS)}"
)


def _resolve_open_record(*, delivery_id, status: str | None, now: datetime) -> UnassignedOrder | None:
    """Close the open record, if any, in one UPDATE (no read first: most deliveries never had
    one). The row comes back with the fields above (the rest load on access)."""
    with connection.cursor() as cursor:
        cursor.execute(_RESOLVE_SQL, {"now": now, "status": status, "delivery_id": delivery_id})
        row = cursor.fetchone()
    return None if row is None else UnassignedOrder.from_db(connection.alias, _RESOLVE_FIELDS, row)


def unassigned_resolve(
    *, delivery, now: datetime, status: str | None = None, actor: Actor | None = None, ticket_closed_by_caller=None,
) -> UnassignedOrder | None:
    """Close the delivery's open record (assignment: RESOLVED, or REASSIGNED once escalated to
    the wide-radius retry) and resolve its support ticket (unless it is `ticket_closed_by_caller`,
    which the caller finishes). Caller holds the delivery's lock."""
    record = _resolve_open_record(delivery_id=delivery.pk, status=status, now=now)
    if record is None or (ticket_closed_by_caller is not None
                          and str(record.support_ticket_id) == str(ticket_closed_by_caller)):
        return record
    status = record.escalation_status
    if status == EscalationStatus.CANCELLED:
        _close_record_ticket(record, status=TicketStatus.CLOSED, resolution="Delivery cancelled.",
                             actor=actor or Actor.system(), now=now)
    else:
        _close_record_ticket(record, status=TicketStatus.RESOLVED, resolution="A driver was assigned.",
                             actor=actor or Actor.system(), now=now)
    return record


def unassigned_cancel(*, delivery, now: datetime, actor: Actor | None = None,
                      ticket_closed_by_caller=None) -> UnassignedOrder | None:
    """The delivery was cancelled: close its open record as CANCELLED and close its ticket.
    Caller holds the delivery's lock."""
    return unassigned_resolve(delivery=delivery, now=now, status=EscalationStatus.CANCELLED, actor=actor,
                              ticket_closed_by_caller=ticket_closed_by_caller)


# ------------------------------------------------------------------------------ escalation


def unassigned_mark_escalated(
    record: UnassignedOrder, *, delivery, level: int, reassigned: bool, reason: str, event_reason: str,
    now: datetime, notes: str = "", user=None,
) -> UnassignedOrder:
    """The last step of an escalation (its tiers are done by `workflows.escalations`): store
    the new level on the record (and the ticket id a tier may have set on it), tell the live
    groups, and alert ops when the record first escalates or first goes critical. A manual
    escalation (`user` given) keeps who escalated and why on the record. Caller holds the
    delivery's and the record's locks; `record.escalation_level` is still the level it had."""
    manual = user is not None
    from_level = record.escalation_level
    severity = alerts.CRITICAL if level >= 3 and from_level < 3 else (alerts.WARNING if from_level < 1 else None)
    record.escalation_level = level
    record.escalation_status = EscalationStatus.REASSIGNED if reassigned else EscalationStatus.NOTIFIED
    record.escalated_at = now
    record.escalation_reason = reason
    fields = ["escalation_level", "escalation_status", "support_ticket_id", "escalated_at", "escalation_reason"]
    if manual:  # who escalated by hand, and why, stays on the record until the next manual escalation
        record.escalation_notes = notes
        record.escalated_by = user
        fields += ["escalation_notes", "escalated_by"]
    if severity is not None:
        record.notification_sent_at = now
        fields.append("notification_sent_at")
    record.save(update_fields=fields)

    broadcast_on_commit(LIVE_GROUPS, events.unassigned_order_escalated(record, level=level, reason=event_reason, escalated_at=now))
    if severity is not None:
        alerts.ops_alert_on_commit(
            record=record, delivery=delivery, level=level, severity=severity, reason=reason,
            waited_minutes=waited_minutes(delivery, now), now=now, notes=notes if manual else "",
        )
    return record
