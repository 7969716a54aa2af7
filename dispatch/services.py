"""Every write to deliveries and assignments (STYLE rule 1), on rows the caller has locked.

The workflows (`workflows/deliveries.py`, `workflows/offers.py`) take the locks in the order
of `workflows/locks.py` and call these for the state change, its audit row and its event.
"""
from __future__ import annotations

import functools
import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.gis.geos import Point
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from audit.models import AuditEventType as E
from audit.models import DeliveryAuditLog
from audit.services import audit_record
from availability import live
from availability.models import Driver, DriverAvailability, capacity_for_vehicle
from availability.services import apply_availability_change
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, delivery_group, driver_group
from common.db import insert_unless_conflict, save_fields
from common.exceptions import Conflict, InvalidInput, NotFound
from dispatch import events
from dispatch.models import (
    CODE_POLICIES,
    HANDOFF_CODE_MAX_FAILURES,
    OPEN_DELIVERY_STATUSES,
    POLICY_PROOF_KIND,
    Assignment,
    AssignmentEndReason,
    AssignmentStatus,
    Delivery,
    DeliveryProof,
    FailureReason,
    ProofKind,
    ProofPolicy,
    Quote,
)
from dispatch.models import DeliveryStatus as S


@dataclass(frozen=True)
class DeliveryInput:
    seller_order_id: str
    store_name: str
    pickup_location: Point
    dropoff_location: Point
    seller_id: str = ""
    dropoff_address: str = ""
    customer_name: str = ""
    customer_phone: str = ""
    customer_email: str = ""
    customer_language: str = ""
    prep_time_minutes: int = 0
    delivery_fee: Decimal | None = None
    proof_required: str = ProofPolicy.NONE


def delivery_insert(
    *, data: DeliveryInput, created_by, zone, actor: Actor, now: datetime, auto_dispatch: bool = True
) -> Delivery:
    """A new `ready` delivery owned by `created_by` (sellerOrderId is unique per owner), its
    `created` audit row and `delivery_created` for ops. `auto_dispatch` False: ops offer it."""
    delivery = Delivery(
        created_by=created_by,
        seller_order_id=data.seller_order_id,
        seller_id=data.seller_id,
        store_name=data.store_name,
        pickup_location=data.pickup_location,
        dropoff_location=data.dropoff_location,
        dropoff_address=data.dropoff_address,
        customer_name=data.customer_name,
        customer_phone=data.customer_phone,
        customer_email=data.customer_email,
        customer_language=data.customer_language,
        prep_time_minutes=data.prep_time_minutes,
        delivery_fee=data.delivery_fee,
        auto_dispatch=auto_dispatch,
        proof_required=data.proof_required,
        created_at=now,
        ready_at=now,
        zone=zone,
    )
    # sellerOrderId is unique per owner (delivery_seller_order_uniq): the database decides,
    # also between two concurrent requests, without a savepoint.
    if not insert_unless_conflict(delivery):
        raise Conflict(f"A delivery for sellerOrderId {data.seller_order_id!r} already exists.")
    audit_record(
        delivery=delivery, event_type=E.CREATED, actor=actor, now=now,
        details={"sellerOrderId": delivery.seller_order_id, "storeName": delivery.store_name},
    )
    broadcast_on_commit([OPS_GROUP], events.delivery_created(delivery))
    return delivery


def delivery_emit_status(delivery: Delivery, *, from_status: str, driver_id, now: datetime, reason: str = "",
                         previous_driver_id=None) -> None:
    event = events.delivery_status_changed(delivery, from_status=from_status, driver_id=driver_id, changed_at=now,
                                           reason=reason, previous_driver_id=previous_driver_id)
    broadcast_on_commit([OPS_GROUP, delivery_group(delivery.pk)], event)


def assignment_start_locked(
    delivery: Delivery, driver: Driver, *, actor: Actor, now: datetime, details: dict | None = None,
    also_save: tuple[str, ...] = (), offer=None, stacking: bool = False, on_assigned=None,
) -> Assignment:
    """Assign a ready delivery to an available driver, who becomes busy. The caller holds the
    delivery's and the driver's locks. `stacking` (the delivery's zone stacks orders, and the
    caller checked that this one qualifies: docs/dispatch.md, "Order stacking"): a busy driver
    with room under its capacity takes it as well and stays busy. The database has the last
    word (one active assignment per delivery: a partial unique index; at most `capacity` per
    driver: the trigger-kept count under a CHECK); the loser gets a Conflict. `also_save`:
    delivery fields the caller changed on the locked row, written in the same UPDATE. `offer`:
    the offer the driver accepted (none when ops assign directly). `on_assigned(assignment)`
    runs once the assignment row exists, before the driver turns busy (an accept announces
    itself there: the driver's app hears which offer it won before it hears "busy")."""
    if delivery.status != S.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be assigned.")
    stacked = stacking and driver.availability == DriverAvailability.BUSY
    if driver.availability != DriverAvailability.AVAILABLE and not stacked:
        raise Conflict(f"Driver {driver.pk} is not available for assignment (currently {driver.availability}).")
    if stacked:
        _capacity_refresh_locked(driver)
        if driver.active_assignments >= driver.capacity:
            raise Conflict(f"Driver {driver.pk} already carries {driver.active_assignments} deliveries, its capacity.")
    assignment = Assignment(delivery=delivery, driver=driver, offer=offer, status=AssignmentStatus.ACTIVE)
    if not insert_unless_conflict(assignment):
        raise Conflict("The delivery or the driver already has an active assignment.")
    driver.active_assignments += 1  # the trigger's count, as the row now has it
    if on_assigned is not None:
        on_assigned(assignment)
    if not stacked:
        apply_availability_change(driver, to_state=DriverAvailability.BUSY, reason="assigned", actor=actor, now=now)
    transaction.on_commit(lambda: live.active_delivery_set(driver.pk, delivery.pk), robust=True)  # its fixes reach the customer
    delivery.status = S.ASSIGNED
    delivery.assigned_at = now
    save_fields(delivery, ["status", "assigned_at", "updated_at", *also_save])
    if stacked:
        details = {**(details or {}), "stacked": True, "activeAssignments": driver.active_assignments}
    audit_record(
        delivery=delivery, event_type=E.DRIVER_ASSIGNED, actor=actor, now=now,
        details={"driverId": str(driver.pk), "assignmentId": str(assignment.pk), **(details or {})},
    )
    delivery_emit_status(delivery, from_status=S.READY, driver_id=driver.pk, now=now)
    return assignment


def _capacity_refresh_locked(driver: Driver) -> None:
    """The locked driver's capacity column, brought up to VEHICLE_CAPACITY if the setting
    changed since the row was written (never below what it carries now)."""
    capacity = capacity_for_vehicle(driver.vehicle_type)
    if driver.capacity != capacity:
        driver.capacity = max(capacity, driver.active_assignments)
        Driver.objects.filter(pk=driver.pk).update(capacity=driver.capacity)


def assignment_end_locked(
    assignment: Assignment, *, driver: Driver, status: str, reason: str, actor: Actor, now: datetime
) -> None:
    """End an active assignment. The caller holds the delivery's, the assignment's and the
    driver's locks. The busy driver is free again once its last active assignment ends (with
    order stacking it may carry others: it stays busy). A cancelled one (the delivery cancelled,
    or reassigned by ops) is told to its driver (and ops): `assignment_cancelled`."""
    assignment.status = status
    assignment.ended_at = now
    assignment.end_reason = reason
    save_fields(assignment, ["status", "ended_at", "end_reason"])
    if status == AssignmentStatus.CANCELLED:
        broadcast_on_commit([driver_group(assignment.driver_id), OPS_GROUP], events.assignment_cancelled(assignment))
    driver.active_assignments = max(0, driver.active_assignments - 1)  # the trigger's count, as the row now has it
    delivery_id = assignment.delivery_id
    transaction.on_commit(lambda: live.active_delivery_clear(assignment.driver_id, delivery_id), robust=True)
    if driver.availability == DriverAvailability.BUSY and driver.active_assignments == 0:
        apply_availability_change(
            driver, to_state=DriverAvailability.AVAILABLE, reason=reason, actor=actor, releasing=True, now=now
        )


def active_deliveries_of(driver_id) -> list:
    """The ids of the deliveries a driver carries now (several with order stacking)."""
    return list(
        Assignment.objects.filter(driver_id=driver_id, status=AssignmentStatus.ACTIVE)
        .order_by("created_at", "id").values_list("delivery_id", flat=True)
    )


def delivery_mark_cancelled(delivery: Delivery, *, reason: str, driver_id, actor: Actor, now: datetime) -> None:
    """CANCELLED, audit `delivery_cancelled`, `delivery_cancelled` to ops and the customer.
    The caller holds the delivery's lock and has ended its assignment."""
    if not delivery.is_open:
        raise Conflict(f"Delivery is {delivery.status}; it can no longer be cancelled.")
    from_status = delivery.status
    delivery.status = S.CANCELLED
    delivery.cancelled_at = now
    delivery.cancellation_reason = reason
    delivery.save(update_fields=["status", "cancelled_at", "cancellation_reason", "updated_at"])
    audit_record(
        delivery=delivery, event_type=E.DELIVERY_CANCELLED, actor=actor, now=now,
        details={"reason": reason, "fromStatus": from_status, "driverId": str(driver_id) if driver_id else None},
    )
    event = events.delivery_cancelled(delivery, from_status=from_status, driver_id=driver_id, reason=reason, cancelled_at=now)
    broadcast_on_commit([OPS_GROUP, delivery_group(delivery.pk)], event)


def delivery_mark_ready_again(delivery: Delivery, *, reason: str, previous: Assignment | None, actor: Actor, now: datetime) -> None:
    """Ops took the delivery away from its driver: `ready` again, audit
    `assignment_reassigned`. The caller holds the delivery's lock and ended the assignment."""
    delivery.status = S.READY
    delivery.assigned_at = None
    delivery.pickup_started_at = None
    delivery.accepted_offer = None
    # The estimates were the previous driver's: the next driver's customer sees none until its
    # first refresh (about a second after the assignment), never the old ones.
    delivery.eta_pickup_at = delivery.eta_delivery_at = delivery.eta_confidence = delivery.eta_calculated_at = None
    delivery.save(update_fields=["status", "assigned_at", "pickup_started_at", "accepted_offer", "eta_pickup_at",
                                 "eta_delivery_at", "eta_confidence", "eta_calculated_at", "updated_at"])
    audit_record(
        delivery=delivery, event_type=E.ASSIGNMENT_REASSIGNED, actor=actor, now=now,
        details={"reason": reason, "previousDriverId": str(previous.driver_id) if previous else None,
                 "assignmentId": str(previous.pk) if previous else None},
    )
    delivery_emit_status(delivery, from_status=S.ASSIGNED, driver_id=None, now=now, reason=reason,
                         previous_driver_id=previous.driver_id if previous else None)


# Delivery steps by the assigned driver: step -> (allowed from, new status, audit event, time stamp).
STEPS = {
    "pickup-started": ((S.ASSIGNED,), S.ASSIGNED, E.PICKUP_STARTED, "pickup_started_at"),
    "pickup-completed": ((S.ASSIGNED,), S.PICKED_UP, E.PICKUP_COMPLETED, "picked_up_at"),
    "delivery-started": ((S.PICKED_UP,), S.IN_TRANSIT, E.DELIVERY_STARTED, "in_transit_at"),
    "delivery-completed": ((S.IN_TRANSIT,), S.DELIVERED, E.DELIVERY_COMPLETED, "delivered_at"),
    "delivery-failed": ((S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT), S.FAILED, E.DELIVERY_FAILED, "failed_at"),
}
STEP_NAMES = tuple(STEPS)
FINISHING_STEPS = {"delivery-completed": AssignmentStatus.COMPLETED, "delivery-failed": AssignmentStatus.FAILED}


def assignment_ensure_active(assignment: Assignment, delivery: Delivery) -> None:
    """The driver's latest assignment of the delivery must still be active."""
    if assignment.status != AssignmentStatus.ACTIVE:
        raise Conflict(f"Delivery is {delivery.status} and no longer assigned to this driver.")


# A step that only moves the delivery on, in one statement (no transaction of its own): lock
# the delivery in the state the step starts from, then the driver's active assignment (the lock
# order of workflows/locks.py; both rows locked, so both are re-read at their latest version
# after any wait), update the delivery and append the audit row, and whatever else the caller
# writes from the updated row `u` ({also}: e.g. the webhook outbox row). No row back: the step
# does not apply as asked, nothing was written, and the caller takes the full path, which says
# why. The step's time was read before the statement: a row changed after it (by the
# transaction whose lock the statement waited for: PostgreSQL checks the conditions again on
# the row it then finds) is left to the full path too, which stamps its change after its locks.
_QUICK_STEP_SQL = """
WITH d AS MATERIALIZED (
    SELECT id FROM {delivery} WHERE id = %(delivery_id)s AND status = %(from_status)s AND updated_at <= %(now)s {guard}
    FOR UPDATE
), a AS MATERIALIZED (
    SELECT a.id FROM {assignment} a JOIN d ON a.delivery_id = d.id
    WHERE a.driver_id = %(driver_id)s AND a.status = %(active)s FOR UPDATE OF a
), u AS (
    UPDATE {delivery} SET status = %(to_status)s, {stamp} = %(now)s, updated_at = %(updated_at)s
    FROM a WHERE {delivery}.id = %(delivery_id)s
    RETURNING {returning}, a.id AS step_assignment_id
), log AS (
    INSERT INTO {audit} (id, delivery_id, timestamp, event_type, actor_id, actor_type, details, version)
    SELECT %(audit_id)s, u.id, %(now)s, %(event_type)s, %(actor_id)s, %(actor_type)s,
           jsonb_build_object('driverId', %(driver_text)s::text, 'assignmentId', u.step_assignment_id::text), 1
    FROM u
){also}
SELECT * FROM u
"""


@functools.cache
def delivery_columns_sql(alias: str) -> str:
    """The delivery's columns by name, qualified by `alias`, for a hand-written statement's
    result: never `alias.*`, whose columns PostgreSQL fixes when it prepares the statement, so a
    column added by a migration would fail every prepared run ("cached plan must not change
    result type") until the process restarts."""
    return ", ".join(f'{alias}."{f.column}"' for f in Delivery._meta.concrete_fields)


_QUICK_GUARDS = {
    "pickup-started": "AND pickup_started_at IS NULL",
    "pickup-completed": "AND pickup_started_at IS NOT NULL",
}


def quick_step_statuses(step: str) -> tuple[str, str] | None:
    """(from, to) status of a step `delivery_step_quick` takes; None for the others."""
    if step not in STEPS or step in FINISHING_STEPS:
        return None
    (from_status,), to_status, _, _ = STEPS[step]
    return from_status, to_status


def delivery_step_quick(
    *, delivery_id, driver_id, step: str, actor: Actor, now: datetime, also: list[tuple[str, dict]] = (),
) -> tuple[Delivery, str] | None:
    """Apply a step that is not the last one (pickup-started, pickup-completed,
    delivery-started) by the driver's active assignment in one statement: the same row,
    audit row and result as `delivery_step_apply` under the workflow's locks. Returns the
    delivery as written (with `latest_assignments`) and the status it came from; None when the
    step does not apply as asked (unknown delivery, not this driver's, out of order), for the
    caller to take the full path.

    `also`: (sql, params) of data-modifying statements over `u` (the delivery's row as the
    step leaves it, one row or none) added to the statement as CTEs, so they commit with the
    step or not at all (the webhook outbox row: `notifications.outbox.outbox_row_sql(event,
    source="u")`); their parameters are named, and must not clash with the step's."""
    if quick_step_statuses(step) is None:
        return None
    (from_status,), to_status, event_type, stamp = STEPS[step]
    extra_params: dict = {}
    for _, p in also:
        extra_params |= p
    sql = _QUICK_STEP_SQL.format(
        delivery=Delivery._meta.db_table, returning=delivery_columns_sql(Delivery._meta.db_table),
        assignment=Assignment._meta.db_table, audit=DeliveryAuditLog._meta.db_table,
        stamp=Delivery._meta.get_field(stamp).column, guard=_QUICK_GUARDS.get(step, ""),
        also="".join(f", also{i} AS ({cte})" for i, (cte, _) in enumerate(also)),
    )
    params = {
        **extra_params,
        "delivery_id": delivery_id, "driver_id": driver_id, "driver_text": str(driver_id), "from_status": from_status,
        "to_status": to_status, "active": AssignmentStatus.ACTIVE, "now": now, "updated_at": timezone.now(),
        "audit_id": uuid.uuid4(), "event_type": event_type, "actor_id": actor.id, "actor_type": actor.type,
    }
    rows = list(Delivery.objects.raw(sql, params))
    if not rows:
        return None
    (delivery,) = rows
    delivery.latest_assignments = [
        Assignment(pk=delivery.step_assignment_id, delivery_id=delivery.pk, driver_id=driver_id, status=AssignmentStatus.ACTIVE)
    ]
    return delivery, from_status


def failure_code_and_note(reason: str, note: str = "") -> tuple[str, str]:
    """delivery-failed's `reason` as one of FailureReason, and its note. The SPEC takes any
    reason text: text that is not one of the codes is `other`, and becomes the note when no
    note was given (nothing the driver wrote is lost)."""
    if reason in FailureReason.values:
        return reason, note
    return FailureReason.OTHER, note or reason


def delivery_step_apply(
    delivery: Delivery, *, assignment: Assignment, step: str, reason: str, actor: Actor, now: datetime, note: str = ""
) -> str:
    """Move the delivery one step on. Out-of-order steps are a Conflict. The caller holds the
    delivery's lock. Writes the audit row; returns the status it came from (the workflow
    emits the change once the step's other effects are written). delivery-failed records its
    reason as given, its code and note (`failure_code_and_note`)."""
    if step not in STEPS:
        raise NotFound("Unknown step.")
    allowed_from, to_status, event_type, stamp = STEPS[step]
    out_of_order = delivery.status not in allowed_from
    if step == "pickup-started" and delivery.pickup_started_at is not None:
        out_of_order = True
    if step == "pickup-completed" and delivery.pickup_started_at is None:
        out_of_order = True
    if out_of_order:
        raise Conflict(f"Step {step} is out of order: delivery is {delivery.status}.")

    from_status = delivery.status
    delivery.status = to_status
    setattr(delivery, stamp, now)
    fields = ["status", "updated_at", stamp]
    if step == "delivery-failed":
        delivery.failure_reason = reason
        delivery.failure_code, delivery.failure_note = failure_code_and_note(reason, note)
        fields += ["failure_reason", "failure_code", "failure_note"]
    save_fields(delivery, fields)
    details = {"driverId": str(assignment.driver_id), "assignmentId": str(assignment.pk)}
    if reason:
        details["reason"] = reason
    if step == "delivery-failed":
        details["failureCode"] = delivery.failure_code
        if delivery.failure_note:
            details["note"] = delivery.failure_note
    audit_record(delivery=delivery, event_type=event_type, actor=actor, details=details, now=now)
    return from_status


# ----------------------------------------------------------------------- handoff code


def delivery_handoff_code_check(delivery: Delivery, *, code: str, driver_id, actor: Actor, now: datetime) -> bool:
    """Is `code` the customer's handoff code of a delivery whose policy asks for one? True when
    the policy asks for none. The caller holds the delivery's lock, so two wrong codes racing
    are counted one after the other. A wrong code is counted and audited (`handoff_code_failed`)
    and False returned, for the caller to commit the count before it answers 400; the 5th flags
    the delivery for ops (`handoff_code_locked_at`). A flagged delivery refuses every code
    (Conflict) until ops reset it; no code at all is InvalidInput."""
    if delivery.proof_required not in CODE_POLICIES:
        return True
    if delivery.handoff_code_locked_at is not None:
        raise Conflict(
            f"Handoff codes are refused after {HANDOFF_CODE_MAX_FAILURES} wrong ones; ops have been asked to reset it."
        )
    if not code:
        raise InvalidInput({"handoffCode": ["This delivery needs the customer's handoff code to complete."]})
    if hmac.compare_digest(code.encode(), delivery.handoff_code.encode()):
        return True
    failures = delivery.handoff_code_failures + 1  # the row is locked: this is the count
    locked_at = now if failures >= HANDOFF_CODE_MAX_FAILURES else None
    Delivery.objects.filter(pk=delivery.pk).update(
        handoff_code_failures=F("handoff_code_failures") + 1, handoff_code_locked_at=locked_at, updated_at=now,
    )
    delivery.handoff_code_failures, delivery.handoff_code_locked_at = failures, locked_at
    audit_record(
        delivery=delivery, event_type=E.HANDOFF_CODE_FAILED, actor=actor, now=now,
        details={"driverId": str(driver_id), "failures": failures, "locked": locked_at is not None},
    )
    return False


def delivery_handoff_code_reset(delivery: Delivery, *, reason: str, actor: Actor, now: datetime) -> None:
    """Ops clear the wrong-code count of a flagged delivery: codes are taken again. The caller
    holds the delivery's lock."""
    previous = delivery.handoff_code_failures
    delivery.handoff_code_failures, delivery.handoff_code_locked_at = 0, None
    delivery.save(update_fields=["handoff_code_failures", "handoff_code_locked_at", "updated_at"])
    audit_record(
        delivery=delivery, event_type=E.HANDOFF_CODE_RESET, actor=actor, now=now,
        details={"previousFailures": previous, "reason": reason},
    )


# --------------------------------------------------------------------------- geofence


def delivery_geofence_override(
    delivery: Delivery, *, reason: str, distance_m: int | None, limit_m: int, fix_recorded_at: datetime | None,
    driver_id, actor: Actor, now: datetime,
) -> None:
    """The driver completes the delivery away from its drop-off (`distance_m` metres, None:
    no recent fix) on their word: flagged on the delivery and audited (`geofence_override`).
    The caller holds the delivery's lock and completes it in the same transaction."""
    delivery.geofence_override_reason, delivery.geofence_override_distance_m = reason, distance_m
    delivery.save(update_fields=["geofence_override_reason", "geofence_override_distance_m", "updated_at"])
    audit_record(
        delivery=delivery, event_type=E.GEOFENCE_OVERRIDE, actor=actor, now=now,
        details={
            "driverId": str(driver_id), "reason": reason, "distanceMeters": distance_m, "limitMeters": limit_m,
            "fixRecordedAt": fix_recorded_at.isoformat().replace("+00:00", "Z") if fix_recorded_at else None,
        },
    )


# ------------------------------------------------------------------- photo and signature


def proof_upload_ensure_allowed(assignment: Assignment, delivery: Delivery, *, now: datetime, kind: str | None = None) -> None:
    """May the driver of `assignment` add a proof (of `kind`) to `delivery` now? While its
    assignment is active (assigned, picked up, in transit), and for
    PROOF_FAILURE_EVIDENCE_SECONDS after it failed the delivery (evidence of the failure). A
    driver ops took the delivery from is another driver now: NotFound, as for one who never had
    it (a 409 told them its state). Anything else is a Conflict, and so is a delivery with
    PROOF_MAX_PER_DELIVERY proofs already, unless this one is the proof its policy asks of this
    assignment and it has none yet (`_proof_still_needed`: twenty photos at the store, or a
    previous driver's, left a photo-policy delivery that could be neither proven nor completed).
    Asked once without a lock before the image is decoded, and again under the delivery's lock."""
    _proof_upload_ensure_open(assignment, delivery, now=now)
    limit = settings.PROOF_MAX_PER_DELIVERY
    if (limit and DeliveryProof.objects.filter(delivery_id=delivery.pk).count() >= limit
            and not _proof_still_needed(delivery, assignment, kind)):
        raise Conflict(f"The delivery has {limit} proofs already, the most it may have (PROOF_MAX_PER_DELIVERY).")


def _proof_still_needed(delivery: Delivery, assignment: Assignment, kind: str | None) -> bool:
    """Would a proof of `kind` now be the one a finishing step asks of this assignment
    (`delivery_proof_check`), which it does not have yet? One per kind and assignment at most,
    so the cap is passed by little."""
    if kind is None or assignment.status != AssignmentStatus.ACTIVE:
        return False
    policy = delivery.proof_required
    if (delivery.status == S.IN_TRANSIT and POLICY_PROOF_KIND.get(policy) == kind
            and not _has_proof(delivery, kind, (S.IN_TRANSIT,), assignment=assignment)):
        return True
    return (kind == ProofKind.PHOTO and policy in settings.PROOF_FAILURE_PHOTO_POLICIES
            and not _has_proof(delivery, kind, OPEN_DELIVERY_STATUSES, assignment=assignment))


def _proof_upload_ensure_open(assignment: Assignment, delivery: Delivery, *, now: datetime) -> None:
    if assignment.status == AssignmentStatus.ACTIVE and delivery.status in OPEN_DELIVERY_STATUSES:
        return
    if assignment.ended_because == AssignmentEndReason.REASSIGNED:
        raise NotFound("Delivery not found.")
    window = settings.PROOF_FAILURE_EVIDENCE_SECONDS
    if (
        assignment.status == AssignmentStatus.FAILED and delivery.status == S.FAILED and delivery.failed_at is not None
        and window > 0 and now - delivery.failed_at <= timedelta(seconds=window)
    ):
        return
    if delivery.status == S.FAILED and window > 0:
        raise Conflict(f"Delivery failed more than {window} s ago; evidence can no longer be added.")
    raise Conflict(f"Delivery is {delivery.status}; proof can no longer be added.")


def delivery_proof_insert(
    delivery: Delivery, *, driver_id, kind: str, file_name: str, content_type: str, size_bytes: int, width: int,
    height: int, note: str, actor: Actor, now: datetime, proof_id: uuid.UUID,
) -> DeliveryProof:
    """The row of a proof whose cleaned file is stored as `file_name`, its `proof_added`
    audit row and `delivery_proof_added` for ops (and the merchant's webhook, through the
    outbox). The caller holds the delivery's lock and has checked that the upload is allowed."""
    proof = DeliveryProof(
        id=proof_id, delivery=delivery, driver_id=driver_id, kind=kind, file=file_name, content_type=content_type,
        size_bytes=size_bytes, width=width, height=height, note=note, delivery_status=delivery.status, created_at=now,
    )
    proof.save(force_insert=True)
    details = {"driverId": str(driver_id), "proofId": str(proof.pk), "kind": kind, "deliveryStatus": delivery.status}
    if note:
        details["note"] = note
    audit_record(delivery=delivery, event_type=E.PROOF_ADDED, actor=actor, now=now, details=details)
    broadcast_on_commit([OPS_GROUP], events.delivery_proof_added(delivery, proof))
    return proof


def _has_proof(delivery: Delivery, kind: str, statuses, *, assignment: Assignment) -> bool:
    """A proof of `kind` uploaded in one of `statuses` by the driver of `assignment` during it
    (a previous driver's proof, or this driver's from an earlier assignment, does not count)."""
    return DeliveryProof.objects.filter(
        delivery=delivery, kind=kind, delivery_status__in=statuses, driver_id=assignment.driver_id,
        created_at__gte=assignment.created_at,
    ).exists()


def delivery_proof_check(
    delivery: Delivery, *, assignment: Assignment, step: str, code: str, driver_id, actor: Actor, now: datetime,
) -> bool:
    """Has the driver given the proof the delivery's policy asks for at this finishing step?
    The caller holds the delivery's lock and calls this only when the step applies to the
    delivery's status.

    delivery-completed: `code` → the handoff code (`delivery_handoff_code_check`); `photo`,
    `signature` → one uploaded while in transit; `code_or_photo` → such a photo, else the code.
    delivery-failed: a photo (uploaded before failing) when the policy is in
    PROOF_FAILURE_PHOTO_POLICIES. Only proofs of the current assignment (`assignment`: its
    driver, since it began) count. A missing proof is a Conflict naming it. False: a wrong
    handoff code was counted (see `delivery_handoff_code_check`)."""
    policy = delivery.proof_required
    if step == "delivery-failed":
        if policy in settings.PROOF_FAILURE_PHOTO_POLICIES and not _has_proof(
            delivery, ProofKind.PHOTO, OPEN_DELIVERY_STATUSES, assignment=assignment
        ):
            raise Conflict(
                f"A photo is required to fail a delivery with proof policy {policy}: upload one (kind photo) first."
            )
        return True
    if policy == ProofPolicy.NONE:
        return True
    if policy == ProofPolicy.CODE:
        return delivery_handoff_code_check(delivery, code=code, driver_id=driver_id, actor=actor, now=now)
    kind = POLICY_PROOF_KIND[policy]
    if _has_proof(delivery, kind, (S.IN_TRANSIT,), assignment=assignment):
        return True
    if policy == ProofPolicy.CODE_OR_PHOTO:
        if delivery.handoff_code_locked_at is not None:
            raise Conflict(
                f"Handoff codes are refused after {HANDOFF_CODE_MAX_FAILURES} wrong ones until ops reset it; "
                "a photo (kind photo) completes the delivery instead."
            )
        if not code:
            raise Conflict("This delivery needs the customer's handoff code or a photo (kind photo) to complete.")
        return delivery_handoff_code_check(delivery, code=code, driver_id=driver_id, actor=actor, now=now)
    raise Conflict(f"This delivery needs a {kind} to complete: upload one (kind {kind}) first.")


# ------------------------------------------------------------------------------- quotes


def quote_insert(
    *, created_by, pickup_location: Point, dropoff_location: Point, prep_time_minutes: int, zone, distance_km: float,
    delivery_fee: Decimal, now: datetime, ttl_seconds: int,
) -> Quote:
    """A serviceable quote, its fee locked until `now + ttl_seconds`."""
    return Quote.objects.create(
        created_by=created_by, pickup_location=pickup_location, dropoff_location=dropoff_location,
        prep_time_minutes=prep_time_minutes, zone=zone, distance_km=distance_km, delivery_fee=delivery_fee,
        created_at=now, expires_at=now + timedelta(seconds=ttl_seconds),
    )


def quote_link(quote: Quote, *, delivery: Delivery) -> None:
    """The delivery made from a claimed quote."""
    Quote.objects.filter(pk=quote.pk).update(delivery=delivery)
    quote.delivery = delivery


def _same_place(a: Point, b: Point) -> bool:
    return round(a.x, 6) == round(b.x, 6) and round(a.y, 6) == round(b.y, 6)


def quote_claim(*, quote_id, created_by, pickup_location: Point, dropoff_location: Point, now: datetime) -> Quote:
    """Use a quote for a new delivery: the caller's own, for the same pickup and drop-off,
    unexpired and unused. The claim is one conditional UPDATE, so two deliveries racing for
    one quote cannot both have it (the loser gets a Conflict). The caller links the delivery."""
    quote = Quote.objects.filter(pk=quote_id, created_by=created_by).first()
    if quote is None:
        raise InvalidInput({"quoteId": ["No such quote of yours."]})
    if not (_same_place(quote.pickup_location, pickup_location) and _same_place(quote.dropoff_location, dropoff_location)):
        raise InvalidInput({"quoteId": ["The quote is for another pickup or drop-off."]})
    claimed = Quote.objects.filter(pk=quote.pk, used_at__isnull=True, expires_at__gt=now).update(used_at=now)
    if claimed != 1:
        raise Conflict("The quote has expired or was already used; ask for a new one.")
    quote.used_at = now
    return quote
