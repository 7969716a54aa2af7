"""Escalation of unassigned deliveries, and the support-ticket actions that change a delivery.

They span apps: the escalation's records and tickets, the dispatch engine (level 2 searches
again with the wide radius), the delivery's cancellation, the audit trail.

Lock order, as everywhere (`workflows.locks`): delivery → unassigned-order record → ticket.
The escalation locks the delivery, then its open record, and reaches the ticket through the
ticket backend. The ticket actions (redispatch, cancel delivery) run the delivery's workflow
first and lock the ticket after, so the order is never reversed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.models import AuditEventType as E
from audit.services import audit_record
from common.actors import Actor
from common.bidi import bidi_isolated
from common.broadcast import broadcast_batch
from common.exceptions import Conflict, InvalidInput
from dispatch.models import Delivery, DeliveryStatus
from escalation import selectors, services, tickets
from escalation.backends import TicketBackend, get_ticket_backend
from escalation.levels import (
    EscalationLevelExceeded,
    escalation_level_due,
    level_thresholds,
    threshold_reason,
    waited_minutes,
)
from escalation.models import (
    MAX_ESCALATION_LEVEL,
    EscalationStatus,
    TicketPriority,
    TicketType,
    UnassignedOrder,
)
from offers.services import offers_widen_pending_locked
from workflows.deliveries import delivery_cancel
from workflows.dispatching import DispatchResult, delivery_dispatch, dispatch_locked, dispatch_next_locked
from workflows.locks import lock_delivery, lock_delivery_waiting

logger = logging.getLogger(__name__)


@dataclass
class Escalation:
    record: UnassignedOrder
    from_level: int
    level: int
    ticket_created: bool = False
    dispatch_outcome: str | None = None


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


# ------------------------------------------------------------------------------- the tiers


@dataclass
class _Step:
    """One escalation of one record, as every tier sees it. Manual escalations have a `user`
    (and the `reason` and `notes` ops gave); the check's have the thresholds' reasons."""

    record: UnassignedOrder
    delivery: Delivery
    level: int
    from_level: int
    actor: Actor
    now: datetime
    backend: TicketBackend
    waited: int
    reason: str = ""
    notes: str = ""
    user: object = None

    @property
    def manual(self) -> bool:
        return self.user is not None

    @property
    def who(self) -> str:
        return f" by {self.user.get_username()}" if self.manual else ""

    @property
    def extra(self) -> dict:
        return {"manual": True, "notes": self.notes} if self.manual else {}

    def why(self, tier: int) -> str:
        return self.reason if self.manual else threshold_reason(tier)


TITLE_ORDER_ID_MAX = 64


def _ticket_title(step: _Step) -> str:
    """The ticket's title names the level the record is at now (retitled as it goes up). It
    fits the ticket's 255 characters: a long seller order id (up to 255 itself) is shortened
    in it (the ticket links the delivery), then a manual reason is cut."""
    order = step.delivery.seller_order_id
    if len(order) > TITLE_ORDER_ID_MAX:
        order = order[: TITLE_ORDER_ID_MAX - 1] + "…"
    if step.manual:
        return f"Order {order} escalated to level {step.level}: {step.reason}"[:255]
    title = f"Order {order} unassigned for {level_thresholds()[step.level] // 60}+ minutes"
    return title if step.level == 1 else f"{title} (level {step.level})"


def _tier1_ticket(step: _Step, result: Escalation) -> None:
    """Level 1: open a support ticket (whenever the record has none, so a record that jumped
    tiers still gets one) and audit `escalation_triggered` when the record first escalates."""
    record, delivery = step.record, step.delivery
    if not record.support_ticket_id:
        priority = TicketPriority.URGENT if step.level >= 3 else TicketPriority.HIGH
        title = _ticket_title(step)
        zone = delivery.zone.name if getattr(delivery, "zone_id", None) else "no zone"
        description = (
            # (the store's and zone's names isolated: one with an RLO read the rest backwards)
            f"Delivery {delivery.pk} from {bidi_isolated(delivery.store_name)} in {bidi_isolated(zone)} has been waiting for a driver "
            f"for {step.waited} minutes (ready since {delivery.ready_at:%Y-%m-%d %H:%M} UTC, "
            f"{record.attempt_count} dispatch attempts, last failure: {record.failure_reason})."
        )
        if step.manual and step.notes:
            description += f"\n\nEscalated{step.who}: {step.notes}"
        record.support_ticket_id = step.backend.open_ticket(
            delivery=delivery, unassigned_order=record, type=TicketType.UNASSIGNED_DELIVERY, priority=priority,
            title=title, description=description, now=step.now,
        )
        result.ticket_created = True
    if step.from_level < 1:
        audit_record(
            delivery=delivery, event_type=E.ESCALATION_TRIGGERED, actor=step.actor, now=step.now,
            details={"level": 1, "reason": step.why(1), "ticketId": record.support_ticket_id,
                     "failureReason": record.failure_reason, "waitedMinutes": step.waited, **step.extra},
        )


def _tier2_wide_redispatch(step: _Step, result: Escalation) -> None:
    """Level 2: dispatch again within the wide radius, audit it (`escalation_triggered`) and
    note the outcome on the ticket. The check does not dispatch an autoDispatch false delivery
    (ops offer it: `dispatch_next_locked`); ops escalating by hand do."""
    record, delivery = step.record, step.delivery
    radius = float(settings.DISPATCH_WIDE_RADIUS_KM)
    dispatch = dispatch_locked if step.manual else dispatch_next_locked
    dispatched = dispatch(delivery, actor=step.actor, now=step.now, radius_km=radius)
    result.dispatch_outcome = dispatched.outcome
    if dispatched.outcome == "already_offered":
        # the pending offer was found within the narrower radius: the search after it ends
        # (rejected, expired, withdrawn) is the wide one (workflows.offers reads it off the offer)
        offers_widen_pending_locked(delivery, radius_km=radius)
    record.refresh_from_db(fields=["attempt_count", "last_attempt_at", "failure_reason"])
    details = {"level": 2, "reason": step.why(2), "searchRadiusKm": radius, "outcome": dispatched.outcome,
               "ticketId": record.support_ticket_id, **step.extra}
    if dispatched.offer is not None:
        details.update(offerId=str(dispatched.offer.pk), driverId=str(dispatched.offer.driver_id))
    if dispatched.failure_reason:
        details["failureReason"] = dispatched.failure_reason
    audit_record(delivery=delivery, event_type=E.ESCALATION_TRIGGERED, actor=step.actor, now=step.now, details=details)
    if record.support_ticket_id:
        step.backend.add_note(
            ticket_id=record.support_ticket_id, now=step.now,
            body=f"Level 2{step.who}: dispatched again within {radius:g} km — {dispatched.text()}.",
        )


def _tier3_critical(step: _Step, result: Escalation) -> None:
    """Level 3: critical. The ticket goes urgent (reopened if finished; a ticket opened by
    this escalation already is) and `escalation_critical` is audited."""
    record = step.record
    if record.support_ticket_id and not result.ticket_created:
        step.backend.raise_priority(
            ticket_id=record.support_ticket_id, priority=TicketPriority.URGENT, now=step.now,
            note=f"Level 3{step.who}: critical, unassigned for {step.waited} minutes.",
        )
    audit_record(
        delivery=step.delivery, event_type=E.ESCALATION_CRITICAL, actor=step.actor, now=step.now,
        details={"level": 3, "reason": step.why(3), "ticketId": record.support_ticket_id,
                 "failureReason": record.failure_reason, "waitedMinutes": step.waited, **step.extra},
    )


def _retitle_ticket(step: _Step) -> None:
    """A ticket this escalation did not open gets the new level in its title, and the move
    (with who and why, for a manual one) in its history."""
    note = f"Escalated to level {step.level}{step.who} (from level {step.from_level})"
    if step.manual:
        note += f": {step.reason}" + (f"\n{step.notes}" if step.notes else "")
    step.backend.retitle_ticket(
        ticket_id=step.record.support_ticket_id, title=_ticket_title(step), note=note, now=step.now
    )


def _escalate_locked(
    record: UnassignedOrder, delivery: Delivery, *, level: int, actor: Actor, now: datetime,
    reason: str = "", notes: str = "", user=None,
) -> Escalation:
    """Take an open record up to `level`, doing every tier it passes on the way. Manual
    escalations pass `reason`, `notes` and `user`. The caller holds the delivery's and the
    record's locks and has checked level > current."""
    with broadcast_batch():  # one send after commit; the tiers' identical ticket events go once
        return _escalate_tiers(record, delivery, level=level, actor=actor, now=now, reason=reason, notes=notes,
                               user=user)


def _escalate_tiers(
    record: UnassignedOrder, delivery: Delivery, *, level: int, actor: Actor, now: datetime,
    reason: str, notes: str, user,
) -> Escalation:
    step = _Step(record=record, delivery=delivery, level=level, from_level=record.escalation_level, actor=actor,
                 now=now, backend=get_ticket_backend(), waited=waited_minutes(delivery, now),
                 reason=reason, notes=notes, user=user)
    result = Escalation(record=record, from_level=step.from_level, level=level)
    if level >= 1:
        _tier1_ticket(step, result)
    if level >= 2 and step.from_level < 2:
        _tier2_wide_redispatch(step, result)
    if level >= 3 and step.from_level < 3:
        _tier3_critical(step, result)
    if record.support_ticket_id and not result.ticket_created:
        _retitle_ticket(step)
    services.unassigned_mark_escalated(
        record, delivery=delivery, level=level, reassigned=result.dispatch_outcome == "offered",
        reason=step.why(level), event_reason=reason if step.manual else record.failure_reason,
        now=now, notes=notes, user=user,
    )
    return result


# ------------------------------------------------------------------------ check and manual


def _check_delivery(delivery_id, *, now: datetime, result: CheckResult, wait_ms: int = 0) -> bool:
    """One delivery, in its own transaction: lock it (passing it over when another worker holds
    it; with `wait_ms`, after waiting that long at most), re-read its open record under that lock,
    and act on what is true now. False when it was passed over."""
    with transaction.atomic():
        if wait_ms:
            delivery = lock_delivery_waiting(delivery_id, wait_ms=wait_ms, select_related=("zone",))
        else:
            delivery = lock_delivery(delivery_id, skip_locked=True, select_related=("zone",))
        if delivery is None:
            return False
        record = services.unassigned_lock_open(delivery=delivery)
        if delivery.status != DeliveryStatus.READY:
            if record is not None:  # assigned or cancelled by a path that left it open
                status = EscalationStatus.CANCELLED if delivery.status == DeliveryStatus.CANCELLED else None
                services.unassigned_resolve(delivery=delivery, now=now, status=status)
                result.closed += 1
            return
        level = escalation_level_due(ready_at=delivery.ready_at, now=now)
        if level == 0:
            return
        if record is None:
            record = services.unassigned_record_detected(delivery=delivery, now=now)
            result.detected += 1
        if level > record.escalation_level:
            _escalate_locked(record, delivery, level=level, actor=Actor.system(), now=now)
            result.escalated[level] += 1
    return True


# A delivery the first pass found held is tried again after the others, waiting for its lock this
# long at most, and all of them together at most SECOND_PASS_SECONDS. The retry job runs on the
# same 30 s beat and holds each delivery while it dispatches it: the check found one held at
# every run, and its tier came 30-70 s late (an audit), "looked at next time" meeting the same
# collision again.
SECOND_PASS_WAIT_MS = 1000
SECOND_PASS_SECONDS = 5.0


def escalation_check(*, now: datetime | None = None, batch_size: int = 100) -> CheckResult:
    """The escalation check (job every 30 s, and `POST /v2/admin/escalation/check`).

    Idempotent: a delivery is escalated only to a level above the one it has, under its row
    lock, so running it twice, or twice at once, opens one ticket. Works in bounded batches,
    one short transaction per delivery; a failure on one delivery does not stop the rest.
    """
    now = now or timezone.now()
    result = CheckResult()
    held = []
    for delivery_id in selectors.deliveries_due_for_escalation(now=now, limit=batch_size):
        try:
            if not _check_delivery(delivery_id, now=now, result=result):
                held.append(delivery_id)
        except Exception:
            result.failed += 1
            logger.exception("escalation check of delivery %s failed", delivery_id)
    deadline = time.monotonic() + SECOND_PASS_SECONDS
    for delivery_id in held:
        wait_ms = int(min(SECOND_PASS_WAIT_MS, (deadline - time.monotonic()) * 1000))
        try:
            if wait_ms <= 0 or not _check_delivery(delivery_id, now=now, result=result, wait_ms=wait_ms):
                result.skipped += 1  # (looked at next time)
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
    delivery = lock_delivery(selectors.unassigned_delivery_id(record_id=record_id), select_related=("zone",))
    record = services.unassigned_lock(record_id=record_id)
    if record.resolved_at is not None:
        raise Conflict(f"The unassigned order is already closed ({record.escalation_status}).")
    if delivery.status != DeliveryStatus.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be escalated.")
    if level <= record.escalation_level:
        raise Conflict(f"The order is already at escalation level {record.escalation_level}; escalate above it.")
    return _escalate_locked(record, delivery, level=level, actor=actor, now=now, reason=reason, notes=notes, user=user)


# ------------------------------------------------------------- ticket actions on the delivery


@transaction.atomic
def ticket_redispatch(*, ticket_id, user, actor: Actor, now: datetime | None = None) -> DispatchResult:
    """Dispatch the ticket's delivery again with the wide radius (ops' level-2 search, on
    demand). A delivery that is not ready or already has a pending offer is a Conflict."""
    now = now or timezone.now()
    # (a closed ticket: the search ran and its note went onto the closed ticket; a closed
    # ticket's delivery is dispatched from the console instead)
    delivery_id = selectors.ticket_delivery_id(ticket_id=ticket_id, open_only=True)
    radius = float(settings.DISPATCH_WIDE_RADIUS_KM)
    result = delivery_dispatch(delivery_id=delivery_id, actor=actor, radius_km=radius, strict=True, now=now)
    tickets.ticket_redispatched(
        ticket_id=ticket_id, user=user, actor=actor, radius_km=radius, outcome=result.outcome, offer=result.offer,
        failure_reason=result.failure_reason, now=now,
    )
    return result


@transaction.atomic
def ticket_cancel_delivery(*, ticket_id, user, actor: Actor, reason: str, now: datetime | None = None) -> Delivery:
    """Cancel the ticket's delivery (its offer is withdrawn, its record and ticket closed)."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput({"reason": ["A reason is required to cancel a delivery."]})
    delivery_id = selectors.ticket_delivery_id(ticket_id=ticket_id)
    # each stamped after its own locks (none read before them: common.db.locked_now)
    delivery = delivery_cancel(delivery_id=delivery_id, reason=reason, actor=actor, now=now,
                               ticket_closed_by_caller=ticket_id)
    tickets.ticket_delivery_cancelled(ticket_id=ticket_id, user=user, actor=actor, reason=reason,
                                      now=now or delivery.cancelled_at)
    return delivery
