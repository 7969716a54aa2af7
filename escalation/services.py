"""Every write to unassigned orders and support tickets (STYLE rule 1).

Lock order, as everywhere: offer → delivery → driver. Unassigned-order records and their
tickets are written while holding the delivery's lock: delivery → record → ticket. Ticket
actions that do not touch the delivery (take, comment, resolve, update) lock the ticket alone;
the ones that do (redispatch, cancel delivery) go through the delivery's services first and
lock the ticket after, so the order is never reversed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework.exceptions import ValidationError

from audit.models import AuditEventType as E
from audit.services import audit_record
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit
from common.exceptions import Conflict, NotFound
from common.roles import is_support
from dispatch.models import Delivery, DeliveryStatus
from escalation import alerts, events
from escalation.backends import get_ticket_backend
from escalation.events import SUPPORT_EVENTS_GROUP
from escalation.models import (
    MAX_ESCALATION_LEVEL,
    CommentKind,
    EscalationStatus,
    FailureReason,
    SupportTicket,
    TicketComment,
    TicketPriority,
    TicketStatus,
    TicketType,
    UnassignedOrder,
)

logger = logging.getLogger(__name__)

LIVE_GROUPS = (OPS_GROUP, SUPPORT_EVENTS_GROUP)

# Audit rows for ticket actions (take, comment, redispatch, cancel, resolve, ...): one event
# type, the action in `details.action`. Not (yet) in audit.AuditEventType's choices.
TICKET_AUDIT_EVENT = "support_ticket_updated"


class EscalationLevelExceeded(ValidationError):
    """Seed: EscalationLevelExceededException (a 400)."""

    def __init__(self, level: int):
        if level > MAX_ESCALATION_LEVEL:
            message = f"Escalation level {level} exceeded maximum allowed level"
        else:
            message = f"Escalation level must be between 1 and {MAX_ESCALATION_LEVEL}."
        super().__init__({"level": [message]})


# ------------------------------------------------------------------ records (dispatch engine)


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


def _close_record_ticket(record: UnassignedOrder, *, status: str, resolution: str, actor: Actor, now: datetime) -> None:
    if record.support_ticket_id:
        get_ticket_backend().close_ticket(
            ticket_id=record.support_ticket_id, status=status, resolution=resolution, actor=actor, now=now
        )


def unassigned_resolve(
    *, delivery, now: datetime, status: str | None = None, actor: Actor | None = None
) -> UnassignedOrder | None:
    """Close the delivery's open record (assignment: RESOLVED, or REASSIGNED once escalated to
    the wide-radius retry) and resolve its support ticket. Caller holds the delivery's lock."""
    record = (
        UnassignedOrder.objects.select_for_update(of=("self",))
        .filter(delivery=delivery, resolved_at__isnull=True).first()
    )
    if record is None:
        return None
    if status is None:
        status = EscalationStatus.REASSIGNED if record.escalation_level >= 2 else EscalationStatus.RESOLVED
    record.resolved_at = now
    record.escalation_status = status
    record.save(update_fields=["resolved_at", "escalation_status"])
    if status == EscalationStatus.CANCELLED:
        _close_record_ticket(record, status=TicketStatus.CLOSED, resolution="Delivery cancelled.",
                             actor=actor or Actor.system(), now=now)
    else:
        _close_record_ticket(record, status=TicketStatus.RESOLVED, resolution="A driver was assigned.",
                             actor=actor or Actor.system(), now=now)
    return record


def unassigned_cancel(*, delivery, now: datetime, actor: Actor | None = None) -> UnassignedOrder | None:
    """The delivery was cancelled: close its open record as CANCELLED and close its ticket.
    Caller holds the delivery's lock."""
    return unassigned_resolve(delivery=delivery, now=now, status=EscalationStatus.CANCELLED, actor=actor)


# ------------------------------------------------------------------------------ escalation


def level_thresholds() -> dict[int, int]:
    """Seconds since the delivery became ready at which each level is due."""
    return {
        1: int(settings.ESCALATION_LEVEL1_SECONDS),
        2: int(settings.ESCALATION_LEVEL2_SECONDS),
        3: int(settings.ESCALATION_LEVEL3_SECONDS),
    }


def escalation_level_due(*, ready_at: datetime, now: datetime) -> int:
    waited = (now - ready_at).total_seconds()
    return max((level for level, seconds in level_thresholds().items() if waited >= seconds), default=0)


def _threshold_reason(level: int) -> str:
    """The seed's reason codes: 5_min_unassigned, 15_min_unassigned, 30_min_unassigned."""
    seconds = level_thresholds()[level]
    return f"{seconds // 60}_min_unassigned" if seconds % 60 == 0 else f"{seconds}_s_unassigned"


def _waited_minutes(delivery, now: datetime) -> int:
    return max(0, int((now - delivery.ready_at).total_seconds() // 60))


@dataclass
class Escalation:
    record: UnassignedOrder
    from_level: int
    level: int
    ticket_created: bool = False
    dispatch_outcome: str | None = None


def _escalate_locked(
    record: UnassignedOrder, delivery, *, level: int, actor: Actor, now: datetime,
    reason: str = "", notes: str = "", user=None,
) -> Escalation:
    """Take an open record up to `level`, doing every tier it passes on the way (a record that
    jumped tiers still gets its ticket). Manual escalations pass `reason`, `notes` and `user`.
    The caller holds the delivery's and the record's locks and has checked level > current."""
    from dispatch.engine import dispatch_locked

    manual = user is not None
    backend = get_ticket_backend()
    from_level = record.escalation_level
    result = Escalation(record=record, from_level=from_level, level=level)
    waited = _waited_minutes(delivery, now)
    extra = {"manual": True, "notes": notes} if manual else {}
    who = f" by {user.get_username()}" if manual else ""

    def why(tier: int) -> str:
        return reason if manual else _threshold_reason(tier)

    if level >= 1 and not record.support_ticket_id:
        priority = TicketPriority.URGENT if level >= 3 else TicketPriority.HIGH
        if manual:
            title = f"Order {delivery.seller_order_id} escalated to level {level}: {reason}"[:255]
        else:
            title = f"Order {delivery.seller_order_id} unassigned for {level_thresholds()[level] // 60}+ minutes"
        zone = delivery.zone.name if getattr(delivery, "zone_id", None) else "no zone"
        description = (
            f"Delivery {delivery.pk} from {delivery.store_name} in {zone} has been waiting for a driver "
            f"for {waited} minutes (ready since {delivery.ready_at:%Y-%m-%d %H:%M} UTC, "
            f"{record.attempt_count} dispatch attempts, last failure: {record.failure_reason})."
        )
        if manual and notes:
            description += f"\n\nEscalated{who}: {notes}"
        record.support_ticket_id = backend.open_ticket(
            delivery=delivery, unassigned_order=record, type=TicketType.UNASSIGNED_DELIVERY, priority=priority,
            title=title, description=description, now=now,
        )
        result.ticket_created = True
    if level >= 1 and from_level < 1:
        audit_record(
            delivery=delivery, event_type=E.ESCALATION_TRIGGERED, actor=actor, now=now,
            details={"level": 1, "reason": why(1), "ticketId": record.support_ticket_id,
                     "failureReason": record.failure_reason, "waitedMinutes": waited, **extra},
        )

    reassigned = False
    if level >= 2 and from_level < 2:
        radius = float(settings.DISPATCH_WIDE_RADIUS_KM)
        dispatched = dispatch_locked(delivery, actor=actor, now=now, radius_km=radius)
        result.dispatch_outcome = dispatched.outcome
        reassigned = dispatched.outcome == "offered"
        record.refresh_from_db(fields=["attempt_count", "last_attempt_at", "failure_reason"])
        details = {"level": 2, "reason": why(2), "searchRadiusKm": radius, "outcome": dispatched.outcome,
                   "ticketId": record.support_ticket_id, **extra}
        if dispatched.offer is not None:
            details.update(offerId=str(dispatched.offer.pk), driverId=str(dispatched.offer.driver_id))
        if dispatched.failure_reason:
            details["failureReason"] = dispatched.failure_reason
        audit_record(delivery=delivery, event_type=E.ESCALATION_TRIGGERED, actor=actor, now=now, details=details)
        if record.support_ticket_id:
            found = {
                "offered": f"offered to {dispatched.offer.driver.name}" if dispatched.offer else "",
                "already_offered": "an offer to a driver is already pending",
                "unassigned": f"nobody found ({dispatched.failure_reason})",
            }.get(dispatched.outcome, dispatched.outcome)
            backend.add_note(
                ticket_id=record.support_ticket_id, now=now,
                body=f"Level 2{who}: dispatched again within {radius:g} km — {found}.",
            )

    if level >= 3 and from_level < 3:
        if record.support_ticket_id and not result.ticket_created:
            backend.raise_priority(
                ticket_id=record.support_ticket_id, priority=TicketPriority.URGENT, now=now,
                note=f"Level 3{who}: critical, unassigned for {waited} minutes.",
            )
        audit_record(
            delivery=delivery, event_type=E.ESCALATION_CRITICAL, actor=actor, now=now,
            details={"level": 3, "reason": why(3), "ticketId": record.support_ticket_id,
                     "failureReason": record.failure_reason, "waitedMinutes": waited, **extra},
        )

    if manual and record.support_ticket_id and not result.ticket_created:
        backend.add_note(
            ticket_id=record.support_ticket_id, now=now,
            body=f"Escalated to level {level}{who}: {reason}" + (f"\n{notes}" if notes else ""),
        )

    severity = alerts.CRITICAL if level >= 3 and from_level < 3 else (alerts.WARNING if from_level < 1 else None)
    record.escalation_level = level
    record.escalation_status = EscalationStatus.REASSIGNED if reassigned else EscalationStatus.NOTIFIED
    record.escalated_at = now
    record.escalation_reason = why(level)
    fields = ["escalation_level", "escalation_status", "support_ticket_id", "escalated_at", "escalation_reason"]
    if manual:  # who escalated by hand, and why, stays on the record until the next manual escalation
        record.escalation_notes = notes
        record.escalated_by = user
        fields += ["escalation_notes", "escalated_by"]
    if severity is not None:
        record.notification_sent_at = now
        fields.append("notification_sent_at")
    record.save(update_fields=fields)

    event_reason = reason if manual else record.failure_reason
    broadcast_on_commit(LIVE_GROUPS, events.unassigned_order_escalated(record, level=level, reason=event_reason, escalated_at=now))
    if severity is not None:
        alerts.ops_alert_on_commit(
            record=record, delivery=delivery, level=level, severity=severity, reason=why(level),
            waited_minutes=waited, now=now, notes=notes if manual else "",
        )
    return result


def _record_detected_locked(delivery, *, now: datetime) -> UnassignedOrder:
    """A ready delivery waiting past level 1 that dispatch never recorded as failed (seed:
    createUnassignedRecord). Caller holds the delivery's lock and saw no open record."""
    from offers.models import DriverOffer

    logger.warning("unassigned_order_detected delivery=%s waited=%s min", delivery.pk, _waited_minutes(delivery, now))
    return UnassignedOrder.objects.create(
        delivery=delivery, seller_order_id=delivery.seller_order_id, location=delivery.pickup_location,
        failure_reason=FailureReason.UNASSIGNED, first_attempt_at=delivery.ready_at, last_attempt_at=now,
        attempt_count=DriverOffer.objects.filter(delivery=delivery).count(),
    )


@dataclass
class CheckResult:
    detected: int = 0
    escalated: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0})
    closed: int = 0
    skipped: int = 0
    failed: int = 0

    def as_dict(self) -> dict:
        return {"detected": self.detected, "escalated": {str(k): v for k, v in self.escalated.items()},
                "closed": self.closed, "skipped": self.skipped, "failed": self.failed}


def _check_delivery(delivery_id, *, now: datetime, result: CheckResult) -> None:
    """One delivery, in its own transaction: lock it (skipping it when another worker holds
    it), re-read its open record under that lock, and act on what is true now."""
    with transaction.atomic():
        delivery = (
            Delivery.objects.select_for_update(of=("self",), skip_locked=True)
            .select_related("zone").filter(pk=delivery_id).first()
        )
        if delivery is None:
            result.skipped += 1
            return
        record = (
            UnassignedOrder.objects.select_for_update(of=("self",))
            .filter(delivery=delivery, resolved_at__isnull=True).first()
        )
        if delivery.status != DeliveryStatus.READY:
            if record is not None:  # assigned or cancelled by a path that left it open
                status = EscalationStatus.CANCELLED if delivery.status == DeliveryStatus.CANCELLED else None
                unassigned_resolve(delivery=delivery, now=now, status=status)
                result.closed += 1
            return
        level = escalation_level_due(ready_at=delivery.ready_at, now=now)
        if level == 0:
            return
        if record is None:
            record = _record_detected_locked(delivery, now=now)
            result.detected += 1
        if level > record.escalation_level:
            _escalate_locked(record, delivery, level=level, actor=Actor.system(), now=now)
            result.escalated[level] += 1


def escalation_check(*, now: datetime | None = None, batch_size: int = 100) -> CheckResult:
    """The escalation check (job every 30 s, and `POST /v2/admin/escalation/check`).

    Idempotent: a delivery is escalated only to a level above the one it has, under its row
    lock, so running it twice, or twice at once, opens one ticket. Works in bounded batches,
    one short transaction per delivery; a failure on one delivery does not stop the rest.
    """
    from escalation.selectors import deliveries_due_for_escalation

    now = now or timezone.now()
    result = CheckResult()
    for delivery_id in deliveries_due_for_escalation(now=now, limit=batch_size):
        try:
            _check_delivery(delivery_id, now=now, result=result)
        except Exception:
            result.failed += 1
            logger.exception("escalation check of delivery %s failed", delivery_id)
    return result


@transaction.atomic
def unassigned_escalate(
    *, record_id, level: int, reason: str, actor: Actor, user, notes: str = "", now: datetime | None = None
) -> Escalation:
    """Ops escalate an open record by hand to `level` (1–3, above its current level)."""
    if not 1 <= level <= MAX_ESCALATION_LEVEL:
        raise EscalationLevelExceeded(level)
    now = now or timezone.now()
    delivery_id = UnassignedOrder.objects.filter(pk=record_id).values_list("delivery_id", flat=True).first()
    if delivery_id is None:
        raise NotFound("Unassigned order not found.")
    delivery = Delivery.objects.select_for_update(of=("self",)).select_related("zone").get(pk=delivery_id)
    record = UnassignedOrder.objects.select_for_update(of=("self",)).get(pk=record_id)
    if record.resolved_at is not None:
        raise Conflict(f"The unassigned order is already closed ({record.escalation_status}).")
    if delivery.status != DeliveryStatus.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be escalated.")
    if level <= record.escalation_level:
        raise Conflict(f"The order is already at escalation level {record.escalation_level}; escalate above it.")
    return _escalate_locked(record, delivery, level=level, actor=actor, now=now, reason=reason, notes=notes, user=user)


# --------------------------------------------------------------------------- support tickets


def _lock_ticket(ticket_id) -> SupportTicket:
    ticket = (
        SupportTicket.objects.select_for_update(of=("self",))
        .select_related("delivery", "assignee").filter(pk=ticket_id).first()
    )
    if ticket is None:
        raise NotFound("Ticket not found.")
    return ticket


def _name(user) -> str:
    return user.get_full_name() or user.get_username()


def _note(ticket: SupportTicket, body: str, *, now: datetime, author=None, kind: str = CommentKind.SYSTEM) -> TicketComment:
    return TicketComment.objects.create(ticket=ticket, author=author, kind=kind, body=body, created_at=now)


def _touched(ticket: SupportTicket, *, change: str, now: datetime, fields: list[str]) -> None:
    ticket.updated_at = now
    ticket.save(update_fields=[*fields, "updated_at"])
    broadcast_on_commit(
        LIVE_GROUPS, events.support_ticket_updated(ticket, seller_order_id=ticket.delivery.seller_order_id, change=change)
    )


def _audit_ticket(ticket: SupportTicket, *, action: str, actor: Actor, now: datetime, **details) -> None:
    audit_record(
        delivery=ticket.delivery, event_type=TICKET_AUDIT_EVENT, actor=actor, now=now,
        details={"ticketId": str(ticket.pk), "action": action, **details},
    )


def ticket_create_locked(
    *, delivery, unassigned_order, type: str, priority: str, title: str, description: str, now: datetime
) -> SupportTicket:
    """Open a ticket for a delivery. The caller holds the delivery's lock; the database allows
    one ticket per unassigned-order record."""
    try:
        with transaction.atomic():
            ticket = SupportTicket.objects.create(
                delivery=delivery, unassigned_order=unassigned_order, type=type, priority=priority,
                title=title, description=description, created_at=now, updated_at=now,
            )
    except IntegrityError:
        raise Conflict("This unassigned order already has a ticket.")
    broadcast_on_commit(LIVE_GROUPS, events.support_ticket_created(ticket, seller_order_id=delivery.seller_order_id))
    return ticket


@transaction.atomic
def ticket_note_add(*, ticket_id, body: str, now: datetime) -> TicketComment:
    ticket = _lock_ticket(ticket_id)
    note = _note(ticket, body, now=now)
    ticket.updated_at = now
    ticket.save(update_fields=["updated_at"])  # no event of its own: the escalation that wrote it has one
    return note


@transaction.atomic
def ticket_raise_priority(*, ticket_id, priority: str, note: str, now: datetime) -> SupportTicket:
    """Escalation raised the stakes: new priority, and a finished ticket is opened again."""
    ticket = _lock_ticket(ticket_id)
    fields = ["priority"]
    change = "escalated"
    ticket.priority = priority
    if not ticket.is_active:
        ticket.status = TicketStatus.OPEN
        ticket.resolved_at = ticket.closed_at = None
        fields += ["status", "resolved_at", "closed_at"]
        change = "reopened"
        note += " Reopened: the delivery still has no driver."
    _note(ticket, note, now=now)
    _touched(ticket, change=change, now=now, fields=fields)
    return ticket


@transaction.atomic
def ticket_finish(*, ticket_id, status: str, resolution: str, actor: Actor, now: datetime) -> SupportTicket:
    """Resolve or close a ticket because of what happened to its delivery (assigned,
    cancelled). Already finished that way: left alone."""
    ticket = _lock_ticket(ticket_id)
    if ticket.status == status or ticket.status == TicketStatus.CLOSED:
        return ticket
    ticket.status = status
    fields = ["status"]
    if status == TicketStatus.CLOSED:
        ticket.closed_at = now
        fields.append("closed_at")
    else:
        ticket.resolved_at = now
        fields.append("resolved_at")
    if not ticket.resolution:
        ticket.resolution = resolution
        fields.append("resolution")
    _note(ticket, f"{status.capitalize()} automatically: {resolution}", now=now)
    _audit_ticket(ticket, action=status, actor=actor, now=now, resolution=resolution)
    _touched(ticket, change=status, now=now, fields=fields)
    return ticket


@transaction.atomic
def ticket_take(*, ticket_id, user, actor: Actor, now: datetime | None = None) -> SupportTicket:
    """An agent takes the ticket: assigned to them, in progress."""
    now = now or timezone.now()
    ticket = _lock_ticket(ticket_id)
    if not ticket.is_active:
        raise Conflict(f"Ticket is {ticket.status}; it can no longer be taken.")
    if ticket.assignee_id == user.pk and ticket.status == TicketStatus.IN_PROGRESS:
        return ticket
    previous = ticket.assignee
    ticket.assignee = user
    ticket.status = TicketStatus.IN_PROGRESS
    ticket.taken_at = now
    text = f"Taken by {_name(user)}" + (f" (over from {_name(previous)})" if previous and previous.pk != user.pk else "") + "."
    _note(ticket, text, now=now)
    _audit_ticket(ticket, action="taken", actor=actor, now=now,
                  assigneeId=str(user.pk), previousAssigneeId=str(previous.pk) if previous else None)
    _touched(ticket, change="taken", now=now, fields=["assignee", "status", "taken_at"])
    return ticket


@transaction.atomic
def ticket_comment(*, ticket_id, user, actor: Actor, body: str, now: datetime | None = None) -> TicketComment:
    body = (body or "").strip()
    if not body:
        raise ValidationError({"body": ["A comment cannot be empty."]})
    now = now or timezone.now()
    ticket = _lock_ticket(ticket_id)
    comment = _note(ticket, body, now=now, author=user, kind=CommentKind.COMMENT)
    _audit_ticket(ticket, action="commented", actor=actor, now=now, commentId=str(comment.pk))
    _touched(ticket, change="commented", now=now, fields=[])
    return comment


@transaction.atomic
def ticket_resolve(*, ticket_id, user, actor: Actor, resolution: str, now: datetime | None = None) -> SupportTicket:
    """The agent resolves the ticket with a resolution note."""
    ticket = _lock_ticket(ticket_id)
    if not ticket.is_active:
        raise Conflict(f"Ticket is already {ticket.status}.")
    return ticket_update(ticket_id=ticket_id, user=user, actor=actor, status=TicketStatus.RESOLVED,
                         resolution=resolution, now=now)


_UNSET = object()

# Status changes a person may make (the system may also reopen a finished ticket on escalation).
TRANSITIONS = {
    TicketStatus.OPEN: {TicketStatus.IN_PROGRESS, TicketStatus.RESOLVED, TicketStatus.CLOSED},
    TicketStatus.IN_PROGRESS: {TicketStatus.OPEN, TicketStatus.RESOLVED, TicketStatus.CLOSED},
    TicketStatus.RESOLVED: {TicketStatus.OPEN, TicketStatus.IN_PROGRESS, TicketStatus.CLOSED},
    TicketStatus.CLOSED: set(),
}


@transaction.atomic
def ticket_update(
    *, ticket_id, user, actor: Actor, status=_UNSET, priority=_UNSET, assignee_id=_UNSET, resolution=_UNSET,
    now: datetime | None = None,
) -> SupportTicket:
    """Change a ticket's status, priority, assignee or resolution (PATCH, and the resolve
    action). Finishing a ticket (resolved/closed) needs a resolution note; a closed ticket
    is final (409)."""
    now = now or timezone.now()
    ticket = _lock_ticket(ticket_id)
    fields: list[str] = []
    changes: dict = {}
    notes: list[str] = []

    if resolution is not _UNSET:
        resolution = (resolution or "").strip()
        if resolution != ticket.resolution:
            ticket.resolution = resolution
            fields.append("resolution")
            changes["resolution"] = resolution
    if priority is not _UNSET and priority != ticket.priority:
        if priority not in TicketPriority.values:
            raise ValidationError({"priority": [f"Must be one of {', '.join(TicketPriority.values)}."]})
        notes.append(f"Priority {ticket.priority} → {priority}.")
        changes["priority"] = [ticket.priority, priority]
        ticket.priority = priority
        fields.append("priority")
    if assignee_id is not _UNSET and str(assignee_id or "") != str(ticket.assignee_id or ""):
        assignee = get_user_model().objects.filter(pk=assignee_id).first() if assignee_id else None
        if assignee_id and (assignee is None or not (assignee.is_active and is_support(assignee))):
            raise ValidationError({"assigneeId": ["Must be an active support agent or staff user."]})
        notes.append(f"Assigned to {_name(assignee)}." if assignee else "Unassigned.")
        changes["assigneeId"] = str(assignee.pk) if assignee else None
        ticket.assignee = assignee
        fields.append("assignee")
        if assignee is not None and ticket.status == TicketStatus.OPEN and status is _UNSET:
            status = TicketStatus.IN_PROGRESS
    change = "updated"
    if status is not _UNSET and status != ticket.status:
        if status not in TicketStatus.values:
            raise ValidationError({"status": [f"Must be one of {', '.join(TicketStatus.values)}."]})
        if status not in TRANSITIONS[ticket.status]:
            raise Conflict(f"Ticket is {ticket.status}; it cannot become {status}.")
        if status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) and not ticket.resolution:
            raise ValidationError({"resolution": ["A resolution note is required to resolve or close a ticket."]})
        changes["status"] = [ticket.status, status]
        notes.append(f"{status.replace('_', ' ').capitalize()} by {_name(user)}"
                     + (f": {ticket.resolution}" if status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) else "."))
        if status == TicketStatus.RESOLVED:
            ticket.resolved_at = now
            fields.append("resolved_at")
            change = "resolved"
        elif status == TicketStatus.CLOSED:
            ticket.closed_at = now
            fields.append("closed_at")
            change = "closed"
        else:
            if ticket.status in (TicketStatus.RESOLVED,):
                ticket.resolved_at = None
                fields.append("resolved_at")
                change = "reopened"
            if status == TicketStatus.IN_PROGRESS and ticket.taken_at is None:
                ticket.taken_at = now
                fields.append("taken_at")
        ticket.status = status
        fields.append("status")
    elif status is not _UNSET and status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) and "resolution" not in changes:
        raise Conflict(f"Ticket is already {ticket.status}.")
    if not fields:
        return ticket
    if notes:
        _note(ticket, " ".join(notes), now=now)
    _audit_ticket(ticket, action=change, actor=actor, now=now, changes=changes)
    _touched(ticket, change=change, now=now, fields=fields)
    return ticket


@transaction.atomic
def ticket_redispatch(*, ticket_id, user, actor: Actor, now: datetime | None = None):
    """Dispatch the ticket's delivery again with the wide radius (ops' level-2 search, on
    demand). A delivery that is not ready or already has a pending offer is a Conflict."""
    from dispatch.engine import delivery_dispatch

    now = now or timezone.now()
    delivery_id = SupportTicket.objects.filter(pk=ticket_id).values_list("delivery_id", flat=True).first()
    if delivery_id is None:
        raise NotFound("Ticket not found.")
    radius = float(settings.DISPATCH_WIDE_RADIUS_KM)
    result = delivery_dispatch(delivery_id=delivery_id, actor=actor, radius_km=radius, strict=True, now=now)
    ticket = _lock_ticket(ticket_id)
    if result.offer is not None:
        outcome = f"offered to {result.offer.driver.name}"
    else:
        outcome = f"nobody found ({result.failure_reason})"
    _note(ticket, f"Redispatched within {radius:g} km by {_name(user)}: {outcome}.", now=now)
    _audit_ticket(
        ticket, action="redispatched", actor=actor, now=now, searchRadiusKm=radius, outcome=result.outcome,
        offerId=str(result.offer.pk) if result.offer else None,
        driverId=str(result.offer.driver_id) if result.offer else None,
    )
    _touched(ticket, change="redispatched", now=now, fields=[])
    return result


@transaction.atomic
def ticket_cancel_delivery(*, ticket_id, user, actor: Actor, reason: str, now: datetime | None = None) -> Delivery:
    """Cancel the ticket's delivery (its offer is withdrawn, its record and ticket closed)."""
    from dispatch.services import delivery_cancel

    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": ["A reason is required to cancel a delivery."]})
    now = now or timezone.now()
    delivery_id = SupportTicket.objects.filter(pk=ticket_id).values_list("delivery_id", flat=True).first()
    if delivery_id is None:
        raise NotFound("Ticket not found.")
    delivery = delivery_cancel(delivery_id=delivery_id, reason=reason, actor=actor, now=now)
    ticket = _lock_ticket(ticket_id)
    fields = []
    if ticket.status != TicketStatus.CLOSED:
        ticket.status = TicketStatus.CLOSED
        ticket.closed_at = now
        fields += ["status", "closed_at"]
    ticket.resolution = f"Delivery cancelled by {_name(user)}: {reason}"
    fields.append("resolution")
    _note(ticket, ticket.resolution, now=now)
    _audit_ticket(ticket, action="delivery_cancelled", actor=actor, now=now, reason=reason)
    _touched(ticket, change="closed", now=now, fields=fields)
    return delivery
