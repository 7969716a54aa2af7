"""Delivery workflows: intake (with auto-dispatch), cancel, reassign, and the driver's steps
through pickup and drop-off. Each reads top to bottom: lock (once, in the order of
`workflows.locks`) → state changes → audit → events on commit."""
from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from analytics.economics import economics_record
from analytics.services import performance_delivery_finished, performance_rated
from availability.models import DriverAvailability
from availability.services import drivers_freed_on_commit
from common import metrics
from common.actors import Actor
from common.db import locked_now
from common.exceptions import Conflict, InvalidInput, NotFound
from dispatch import events as dispatch_events
from dispatch import selectors as delivery_selectors
from dispatch import services as deliveries
from dispatch.models import Assignment, AssignmentStatus, Delivery, DeliveryProof, proof_file_name
from dispatch.models import DeliveryStatus as S
from dispatch.proofs import proof_file_discard, proof_file_store, proof_image_clean
from dispatch.services import DeliveryInput
from escalation.services import unassigned_cancel, unassigned_resolve
from notifications.outbox import outbox_hold, outbox_pickup_started, outbox_row_sql, outbox_written, pickup_started_event
from offers.services import offer_cancel_locked, offer_mark_superseded, offers_withdraw_locked
from tracking import services as tracking
from tracking.models import DeliveryRating
from workflows import locks
from workflows.dispatching import DispatchResult, dispatch_next_locked
from workflows.geofence import geofence_check
from workflows.stacking import driver_may_stack
from workflows.unit import eta_refresh_enqueue, unit_of_work
from workflows.quotes import quote_use, serviceability_ensure
from zones import pricing

TRACKED = (S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT)


@unit_of_work()
def delivery_create(
    *, data: DeliveryInput, created_by, actor: Actor, auto_dispatch: bool = False, now: datetime | None = None,
    quote_id=None,
) -> Delivery:
    """A `ready` delivery in the zone of its pickup, if serviceable (else InvalidInput:
    `workflows.quotes`); with `quote_id`, at the fee the quote locked. With `auto_dispatch` the first candidate
    is offered in the same transaction (or the delivery is recorded as unassigned; in a
    batched_matching zone it waits for the zone's next matching round instead); without
    it, ops start its dispatch, and nothing offers it before they have (`dispatch_next_locked`).

    Returns the row as written (no assignment yet: `latest_assignments` is set), ready to
    render without reading it again."""
    now = now or timezone.now()
    service = serviceability_ensure(pickup=data.pickup_location, dropoff=data.dropoff_location)
    if not data.proof_required:  # not asked for: the zone's policy, else DEFAULT_PROOF_POLICY
        zone_policy = service.zone.proof_required if service.zone is not None else ""
        data = replace(data, proof_required=zone_policy or settings.DEFAULT_PROOF_POLICY)
    quote = quote_use(quote_id=quote_id, created_by=created_by, data=data, now=now) if quote_id else None
    if quote is not None:
        data = replace(data, delivery_fee=quote.delivery_fee)  # the fee the quote locked
    elif data.delivery_fee is None:  # not given: the pricing rule's, as a quote would have said
        data = replace(data, delivery_fee=pricing.delivery_fee(leg_km=service.distance_km))
    delivery = deliveries.delivery_insert(
        data=data, created_by=created_by, zone=service.zone, actor=actor, now=now, auto_dispatch=auto_dispatch,
    )
    if quote is not None:
        deliveries.quote_link(quote, delivery=delivery)
    if auto_dispatch:
        # A new row: nobody else can hold it, and it has no offer yet.
        dispatch_next_locked(delivery, actor=Actor.system(), now=now, no_pending_offer=True, wait_for_held=True)
    delivery.latest_assignments = []
    outbox_hold(delivery)  # the webhook payloads render this row: not read again
    return delivery


@unit_of_work()
def assignment_create(*, delivery_id, driver_id, actor: Actor, now: datetime | None = None, details: dict | None = None):
    """Ops assign a ready delivery straight to an available driver (no offer): the driver
    becomes busy, the delivery assigned, its unassigned record resolved. In a zone with order
    stacking on, a busy driver who qualifies (`workflows.stacking`) takes it as well."""
    offer = locks.lock_pending_offer_of_delivery(delivery_id)
    if offer is not None:
        raise Conflict("The delivery has a pending offer; withdraw it or wait for the answer.")
    delivery = locks.lock_delivery(delivery_id, select_related=("zone",))
    driver = locks.lock_driver(driver_id)
    now = locked_now(now, delivery.updated_at)  # (after the locks: a change it waited for is before it)

    stacking = driver.availability == DriverAvailability.BUSY and driver_may_stack(delivery, driver, now=now)
    assignment = deliveries.assignment_start_locked(
        delivery, driver, actor=actor, now=now, details=details, stacking=stacking
    )
    unassigned_resolve(delivery=delivery, now=now)
    for other_id in deliveries.active_deliveries_of(driver.pk) if stacking else (delivery.pk,):
        eta_refresh_enqueue(other_id, now=now)  # stacked: the others' route has a new stop
    if delivery.offer_acceptance_count == 0 and not Assignment.objects.filter(delivery_id=delivery.pk).exclude(pk=assignment.pk).exists():
        assignment_latency_observe(delivery, now=now)
    return assignment


def assignment_latency_observe(delivery: Delivery, *, now: datetime) -> None:
    """`assignment_latency_seconds` (ready → assigned) of a delivery's first assignment, once its
    transaction commits (an accept rolled back is not counted). First: its first accepted offer
    (no statement on the accept's path), or an ops assignment of a delivery never assigned nor
    accepted. A delivery assigned by ops, taken back and then accepted from an offer counts twice:
    telling it apart would cost the accept a read."""
    seconds = max(0.0, (now - delivery.ready_at).total_seconds())
    transaction.on_commit(lambda: metrics.observe(metrics.ASSIGNMENT_LATENCY, seconds))


class _OfferMadeMeanwhile(Exception):
    """The delivery got an offer, or its offer was accepted, between the offer look-up and the
    delivery's lock."""


def _retried(attempt, gave_up: str, **kwargs):
    """`attempt(**kwargs)`, again (up to three times in all) while it rolls back on
    `_OfferMadeMeanwhile`; then a Conflict saying `gave_up`."""
    for _ in range(3):
        try:
            return attempt(**kwargs)
        except _OfferMadeMeanwhile:
            continue
    raise Conflict(gave_up)


def delivery_cancel(*, delivery_id, reason: str, actor: Actor, now: datetime | None = None,
                    ticket_closed_by_caller=None) -> Delivery:
    """Cancel an open delivery: its pending offer (all of a round's) is withdrawn, its active
    assignment ends and the driver is freed, its unassigned record and ticket are closed
    (but for `ticket_closed_by_caller`: a support agent's cancel from that ticket closes it
    itself, saying why, once).

    The pending offers are looked up and locked before the delivery (the lock order). A dispatch
    that commits an offer in between (a reject's next offer, the retry job, a matching round,
    whose delivery lock we were waiting for) would go unseen: the attempt then rolls back and
    starts again, locking that offer first."""
    return _retried(_delivery_cancel_attempt, "The delivery keeps getting new offers; try again.",
                    delivery_id=delivery_id, reason=reason, actor=actor, now=now,
                    ticket_closed_by_caller=ticket_closed_by_caller)


@unit_of_work()
def _delivery_cancel_attempt(*, delivery_id, reason: str, actor: Actor, now: datetime | None,
                             ticket_closed_by_caller) -> Delivery:
    pending = locks.lock_pending_offers_of_delivery(delivery_id)  # a round's several, in pk order
    delivery = locks.lock_delivery(delivery_id)
    if not delivery.is_open:
        raise Conflict(f"Delivery is {delivery.status}; it can no longer be cancelled.")
    if not pending and delivery.current_offer_id is not None:  # set exactly while one is pending
        raise _OfferMadeMeanwhile()
    assignment = locks.lock_active_assignment(delivery.pk)
    offer = pending[0] if len(pending) == 1 else None  # a single offer: as always, with its driver's lock
    driver_id = offer.driver_id if offer is not None else (assignment.driver_id if assignment else None)
    driver = locks.lock_driver(driver_id) if driver_id else None
    now = locked_now(now, delivery.updated_at, assignment.created_at if assignment else None)

    if offer is not None:
        offer_cancel_locked(offer, delivery=delivery, reason="delivery_cancelled", actor=actor, now=now)
    elif pending:  # a batch/broadcast round: withdrawn at once (offers_withdraw_locked says why no driver locks)
        offers_withdraw_locked(pending, delivery=delivery, reason="delivery_cancelled", actor=actor, now=now)
    drivers_freed_on_commit([o.driver_id for o in pending], at=now)  # free of their offers: a look, as after a reject
    unassigned_cancel(delivery=delivery, now=now, ticket_closed_by_caller=ticket_closed_by_caller)
    if assignment is not None:
        deliveries.assignment_end_locked(
            assignment, driver=driver, status=AssignmentStatus.CANCELLED, reason="delivery_cancelled", actor=actor, now=now
        )
    deliveries.delivery_mark_cancelled(
        delivery, reason=reason, driver_id=assignment.driver_id if assignment else None, actor=actor, now=now
    )
    return delivery


def delivery_reassign(*, delivery_id, reason: str, actor: Actor, now: datetime | None = None) -> tuple[object, DispatchResult]:
    """Ops take an assigned delivery away from its driver: the assignment is cancelled, the
    driver freed, the delivery is ready again and goes to the next candidate (the previous
    driver is excluded, having been offered it once). Returns (previous driver id, dispatch result).

    The accepted offer is looked up and locked before the delivery (the lock order). An accept
    that commits in between (its offer was still pending at the look-up, and we waited for the
    delivery's lock) would leave its offer ACCEPTED beside the ended assignment, and every later
    accept of the delivery would break on the one-accepted-offer rule: the attempt then rolls
    back and starts again, locking that offer first."""
    return _retried(_delivery_reassign_attempt, "The delivery keeps changing drivers; try again.",
                    delivery_id=delivery_id, reason=reason, actor=actor, now=now)


@unit_of_work()
def _delivery_reassign_attempt(*, delivery_id, reason: str, actor: Actor, now: datetime | None) -> tuple[object, DispatchResult]:
    accepted = locks.lock_accepted_offer_of_delivery(delivery_id)  # offer → delivery, the lock order
    delivery = locks.lock_delivery(delivery_id, select_related=("zone",))
    if delivery.status != S.ASSIGNED:
        raise Conflict(f"Delivery is {delivery.status}; only an assigned delivery (not yet picked up) can be reassigned.")
    assignment = locks.lock_active_assignment(delivery.pk)
    if accepted is None and assignment is not None and assignment.offer_id is not None:
        raise _OfferMadeMeanwhile()  # accepted while we waited for the delivery
    driver = locks.lock_driver(assignment.driver_id) if assignment else None
    now = locked_now(now, delivery.updated_at, assignment.created_at if assignment else None)

    if assignment is not None:
        deliveries.assignment_end_locked(
            assignment, driver=driver, status=AssignmentStatus.CANCELLED, reason="reassigned", actor=actor, now=now
        )
    if accepted is not None:  # the next driver's accept takes its place (one accepted offer per delivery)
        offer_mark_superseded(accepted, now=now)
    deliveries.delivery_mark_ready_again(delivery, reason=reason, previous=assignment, actor=actor, now=now)
    previous = assignment.driver_id if assignment else None
    result = dispatch_next_locked(delivery, actor=Actor.system(), now=now, exclude_driver_ids=[previous] if previous else ())
    return previous, result


@unit_of_work()
def delivery_handoff_code_reset(*, delivery_id, reason: str, actor: Actor, now: datetime | None = None) -> Delivery:
    """Ops clear the wrong handoff codes of a delivery (after the 5th its codes are refused):
    the driver may try the customer's code again. Nothing to clear is a Conflict, and so is a
    delivery that is over (delivered, failed, cancelled): no code is asked for any more, and
    its count of wrong codes is the record of what happened."""
    now = now or timezone.now()
    delivery = locks.lock_delivery(delivery_id)
    if not delivery.is_open:
        raise Conflict(f"Delivery is {delivery.status}; its handoff codes can no longer be reset.")
    if delivery.handoff_code_failures == 0 and delivery.handoff_code_locked_at is None:
        raise Conflict("No wrong handoff codes to reset.")
    deliveries.delivery_handoff_code_reset(delivery, reason=reason, actor=actor, now=now)
    return delivery


def delivery_proof_add(
    *, delivery_id, driver_id, kind: str, upload, note: str, actor: Actor, now: datetime | None = None,
) -> DeliveryProof:
    """A photo or signature by the delivery's assigned driver (docs/dispatch.md, "Proof of
    delivery"). First, without a lock, the driver's assignment of it must allow the upload
    (`proof_upload_ensure_allowed`, else Conflict; never had it: NotFound): nobody else gets an
    image decoded. Then the image is checked by its content and re-encoded without metadata
    (`dispatch.proofs`), stored, and only then the delivery locked: no lock is held while an
    image is decoded or a file written to its storage. Under the lock the same check again (the
    delivery may have moved on meanwhile), then the row, its audit row and its event. A stored
    file whose row does not commit is deleted."""
    _proof_upload_precheck(delivery_id=delivery_id, driver_id=driver_id, kind=kind, now=now or timezone.now())
    image = proof_image_clean(upload, caller=str(driver_id))
    proof_id = uuid.uuid4()
    name = proof_file_store(proof_file_name(delivery_id=delivery_id, proof_id=proof_id, extension=image.extension), image)
    try:
        return _delivery_proof_add_locked(
            delivery_id=delivery_id, driver_id=driver_id, kind=kind, name=name, image=image, note=note, actor=actor,
            now=now, proof_id=proof_id,
        )
    except BaseException:
        proof_file_discard(name)  # the row did not commit: no file without its row
        raise


def _proof_upload_precheck(*, delivery_id, driver_id, kind: str, now: datetime) -> None:
    """The locked path's answer (NotFound, Conflict), given cheaply before any decoding."""
    assignment = delivery_selectors.assignment_of_driver(delivery_id=delivery_id, driver_id=driver_id)
    if assignment is None:
        raise NotFound("Delivery not found.")
    deliveries.proof_upload_ensure_allowed(assignment, assignment.delivery, now=now, kind=kind)


@unit_of_work()
def _delivery_proof_add_locked(*, delivery_id, driver_id, kind, name, image, note, actor, now, proof_id) -> DeliveryProof:
    assignment = locks.lock_assignment_of_driver(delivery_id, driver_id)
    if assignment is None:
        raise NotFound("Delivery not found.")
    delivery = assignment.delivery
    # Stamped under the lock, after the decode: read before it (up to its 30 s wait for a decode
    # slot and the decode itself), a photo begun while picked up and finished after
    # delivery-started was stored "in transit" at a time before it, and counted as the proof of
    # delivery (an audit).
    now = locked_now(now, delivery.updated_at)
    deliveries.proof_upload_ensure_allowed(assignment, delivery, now=now, kind=kind)
    return deliveries.delivery_proof_insert(
        delivery, driver_id=driver_id, kind=kind, file_name=name, content_type=image.content_type,
        size_bytes=len(image.content), width=image.width, height=image.height, note=note, actor=actor, now=now,
        proof_id=proof_id,
    )


def delivery_advance(
    *, delivery_id, driver_id, step: str, actor: Actor, reason: str = "", note: str = "", handoff_code: str = "",
    override_reason: str = "", now: datetime | None = None,
) -> Delivery:
    """Move a delivery one step on, by its assigned driver. Out-of-order steps are a Conflict.
    The last step (completed or failed) ends the assignment, frees the driver and records
    the delivery's economics and the driver's performance. Completing a delivery whose proof
    policy asks for the customer's handoff code takes `handoff_code`: a wrong one is counted
    (committed) and then refused with InvalidInput; after 5 every code is a Conflict until ops
    reset it (`delivery_handoff_code_reset`). Completing farther than DROPOFF_GEOFENCE_METERS
    from the drop-off (or with no recent fix) is a Conflict unless `override_reason` is given
    (`workflows.geofence`). delivery-failed takes `reason` (one of FailureReason, or free text:
    `other`) and `note`.

    Returns the row as written, with `latest_assignments` set, ready to render without
    reading it again. A step that only moves the delivery on (not the last) is first tried as
    one statement (`delivery_step_quick`); when that cannot apply it, the full path below
    decides (and raises the NotFound or Conflict)."""
    if step not in deliveries.STEPS:
        raise NotFound("Unknown step.")
    if step not in deliveries.FINISHING_STEPS and not reason:
        # (applies only to a row last changed before this time: one changed later, while the
        # statement waited for its lock, takes the full path, stamped after its locks)
        quick = _delivery_step_quick(delivery_id=delivery_id, driver_id=driver_id, step=step, actor=actor,
                                     now=now or timezone.now())
        if quick is not None:
            return quick
    delivery = _delivery_advance_locked(
        delivery_id=delivery_id, driver_id=driver_id, step=step, actor=actor, reason=reason, note=note,
        handoff_code=handoff_code, override_reason=override_reason, now=now,
    )
    if delivery is None:  # the wrong code is counted and committed; now the answer
        raise InvalidInput({"handoffCode": ["Wrong handoff code."]})
    return delivery


def _delivery_step_quick(*, delivery_id, driver_id, step: str, actor: Actor, now: datetime) -> Delivery | None:
    """The step as one statement, without a transaction of its own: the delivery's row, its
    audit row and the webhook outbox row of the event the step emits (its payload rendered
    later, from the row the statement keeps with it: `notifications.outbox`) commit together.
    None when the step does not apply as asked (nothing written)."""
    from_status, to_status = deliveries.quick_step_statuses(step)
    if step == "pickup-started":
        event = pickup_started_event(
            delivery_id=delivery_id, seller_order_id="", status=from_status, driver_id=driver_id, started_at=now,
        )
    else:
        event = dispatch_events.delivery_status_changed(
            Delivery(pk=delivery_id, status=to_status), from_status=from_status, driver_id=driver_id, changed_at=now,
        )
    outbox = outbox_row_sql(event, source="u")
    quick = deliveries.delivery_step_quick(
        delivery_id=delivery_id, driver_id=driver_id, step=step, actor=actor, now=now, also=[outbox] if outbox else [],
    )
    if quick is None:
        return None
    delivery, from_status = quick
    with outbox_written(event):  # its row is in: the live event alone goes out
        _after_step(delivery, step=step, from_status=from_status, driver_id=driver_id, reason="", now=now)
    return delivery


@unit_of_work()
def _delivery_advance_locked(
    *, delivery_id, driver_id, step: str, actor: Actor, reason: str, note: str, handoff_code: str, override_reason: str,
    now: datetime | None,
) -> Delivery | None:
    """The step under the locks; None for a wrong handoff code (its count is written and
    commits with this transaction)."""
    finishing = step in deliveries.FINISHING_STEPS
    # delivery → assignment (→ driver, for the last step): one statement, in the lock order
    assignment = locks.lock_assignment_of_driver(delivery_id, driver_id, with_driver=finishing)
    if assignment is None:
        raise NotFound("Delivery not found.")
    delivery = assignment.delivery
    deliveries.assignment_ensure_active(assignment, delivery)
    now = locked_now(now, delivery.updated_at, assignment.created_at)
    if finishing and delivery.status in deliveries.STEPS[step][0]:  # (out of order: the step says so below)
        if not deliveries.delivery_proof_check(
            delivery, assignment=assignment, step=step, code=handoff_code, driver_id=driver_id, actor=actor, now=now
        ):
            return None
        if step == "delivery-completed":
            geofence_check(delivery, driver=assignment.driver, override_reason=override_reason, actor=actor, now=now)

    from_status = deliveries.delivery_step_apply(
        delivery, assignment=assignment, step=step, reason=reason, note=note, actor=actor, now=now
    )
    if finishing:
        deliveries.assignment_end_locked(
            assignment, driver=assignment.driver, status=deliveries.FINISHING_STEPS[step], reason=step.replace("-", "_"),
            actor=actor, now=now,
        )
        if assignment.driver.active_assignments:  # order stacking: the route of the others changed
            for other_id in deliveries.active_deliveries_of(assignment.driver_id):
                eta_refresh_enqueue(other_id, now=now)
        cost, _ = economics_record(delivery=delivery, now=now)
        performance_delivery_finished(driver_id=driver_id, delivery=delivery, earning=cost.driver_payment, now=now)
    delivery.latest_assignments = [assignment]  # ended by the last step: a finished delivery keeps it
    outbox_hold(delivery)  # the webhook payloads render this row: not read again
    _after_step(delivery, step=step, from_status=from_status, driver_id=driver_id, reason=reason, now=now)
    return delivery


def _after_step(delivery: Delivery, *, step: str, from_status: str, driver_id, reason: str, now: datetime) -> None:
    if step == "pickup-started":  # no status change, no live event: merchants are told through the outbox
        outbox_pickup_started(delivery, driver_id=driver_id, started_at=now, reason=reason)
    if delivery.status != from_status:
        deliveries.delivery_emit_status(delivery, from_status=from_status, driver_id=driver_id, now=now, reason=reason)
        if delivery.status in TRACKED:
            eta_refresh_enqueue(delivery.pk, now=now)  # the legs changed: a fresh ETA for the customer


@unit_of_work()
def delivery_rate(*, delivery_id, stars: int, comment: str = "", now: datetime | None = None) -> DeliveryRating:
    """The customer rates a delivered delivery, once (`tracking.services.delivery_rate`); ops
    see the driver's new rating at once (`driver_performance_updated` after commit)."""
    now = now or timezone.now()
    rating = tracking.delivery_rate(delivery_id=delivery_id, stars=stars, comment=comment, now=now)
    performance_rated(driver_id=rating.driver_id, now=now)
    return rating
