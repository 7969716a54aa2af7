"""Every write to offers (STYLE rule 1), on rows the caller has locked.

The workflows (`workflows/offers.py`) lock the offer, its delivery and its driver in the order
of `workflows/locks.py`, re-check the status here (`offer_ensure_pending`) and then make one
of these changes, so accept, reject, expire and cancel of one offer have exactly one winner;
the losers get 409 (or, for the expiry jobs, a quiet no-op).
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from audit.models import AuditEventType as E
from audit.services import audit_record
from availability.models import Driver
from common import metrics
from common.actors import Actor
from common.broadcast import (
    OPS_GROUP,
    broadcast_on_commit,
    driver_group,
    enqueue_task_on_commit,
)
from common.db import insert_many_unless_conflict, insert_unless_conflict, save_fields
from common.errors import iso
from common.exceptions import Conflict
from common.fields import point_json
from dispatch.models import Delivery
from offers import events
from offers.models import SINGLE_SLOT, DriverOffer, NotificationMethod, OfferStatus
from offers.push import get_push_backend
from tracking import eta
from zones import pricing

PUSH_TASK = "offers.push_offer"
MIN_EXPIRES_SECONDS = 10
MAX_EXPIRES_SECONDS = 120


# ------------------------------------------------------------------------ payload


def driver_earning(*, total_km: float, zone=None) -> Decimal:
    """Base pay + per-km pay over the trip (driver → pickup → dropoff), to the cent, never
    above the zone's (or the global) cap: `zones.pricing.driver_pay`."""
    return pricing.driver_pay(total_km=total_km, zone=zone)


def _zone_of(delivery: Delivery):
    return delivery.zone if getattr(delivery, "zone_id", None) else None


def offer_payload(*, delivery: Delivery, driver: Driver, now: datetime) -> dict:
    """What the driver sees (seed: calculateOfferPayload)."""
    to_pickup_km = eta.point_distance_km(driver.location, delivery.pickup_location) if driver.location else 0.0
    leg_km = eta.delivery_leg_km(delivery)
    pickup_s = eta.pickup_eta_seconds(
        delivery=delivery, distance_to_pickup_km=to_pickup_km, vehicle_type=driver.vehicle_type, now=now
    )
    deliver_s = pickup_s + eta.travel_seconds(leg_km, driver.vehicle_type) + eta.HANDOVER_SECONDS
    return {
        "pickupLocation": point_json(delivery.pickup_location),
        "pickupStoreName": delivery.store_name,
        "estimatedPickupTimeMin": max(1, math.ceil(pickup_s / 60)),
        "estimatedDeliveryTime": iso(now + timedelta(seconds=round(deliver_s))),
        "estimatedDistanceKm": round(to_pickup_km, 2),
        "estimatedEarning": float(driver_earning(total_km=to_pickup_km + leg_km, zone=_zone_of(delivery))),
    }


def default_expires_seconds(delivery: Delivery) -> int:
    zone = delivery.zone if getattr(delivery, "zone_id", None) else None
    override = getattr(zone, "offer_expires_seconds", None) if zone else None
    return int(override or settings.OFFER_DEFAULT_EXPIRES_SECONDS)


# ------------------------------------------------------------------------- create


def offer_insert_locked(
    *, delivery: Delivery, driver: Driver, actor: Actor, now: datetime, expires_in_seconds: int | None = None,
    search_radius_km: float | None = None,
) -> DriverOffer:
    """Offer `delivery` to `driver`. The caller holds both row locks and has checked that the
    delivery is ready and the driver available. Raises Conflict when the database refuses a
    second pending offer for either of them. After commit: the driver's socket and ops get
    `offer_created`, the push goes out from a task, and the expiry is scheduled."""
    started = time.perf_counter()
    expires_in = expires_in_seconds or default_expires_seconds(delivery)
    offer = DriverOffer(
        delivery=delivery, driver=driver, status=OfferStatus.PENDING,
        offer_payload=offer_payload(delivery=delivery, driver=driver, now=now),
        created_at=now, expires_at=now + timedelta(seconds=expires_in), search_radius_km=search_radius_km,
    )
    # The partial unique indexes (one pending offer per delivery, per driver) have the last
    # word: ON CONFLICT DO NOTHING instead of a savepoint around a failing INSERT; the
    # delivery's current offer is set by the same statement.
    current = (Delivery.objects.filter(pk=delivery.pk), {"current_offer": offer, "updated_at": now})
    if not insert_unless_conflict(offer, then_update=current):
        raise Conflict("The delivery or the driver already has a pending offer.")
    delivery.current_offer = offer
    delivery.updated_at = now
    audit_record(
        delivery=delivery, event_type=E.DRIVER_OFFER_SENT, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(driver.pk), "expiresAt": iso(offer.expires_at),
                 "payload": offer.offer_payload},
    )
    event = events.offer_created(offer)
    broadcast_on_commit([driver_group(driver.pk), OPS_GROUP], event)
    enqueue_task_on_commit(PUSH_TASK, str(offer.pk), str(driver.pk), event, durable_seconds=expires_in)
    enqueue_task_on_commit("offers.expire_offer", str(offer.pk), eta=offer.expires_at)
    metrics.observe(metrics.OFFER_CREATION_LATENCY, time.perf_counter() - started)
    return offer


def offers_insert_round_locked(
    *, delivery: Delivery, drivers: list[Driver], first_slot: int, actor: Actor, now: datetime,
    search_radius_km: float | None = None,
) -> list[DriverOffer]:
    """Offer `delivery` to several drivers at once (a batch or broadcast round), the driver
    at `drivers[i]` in slot `first_slot + i` (their rank). The caller holds the delivery's and
    the drivers' locks and has checked that the delivery is ready (with no single offer
    pending) and the drivers available. ONE multi-row INSERT … ON CONFLICT DO NOTHING: a
    driver the database refuses (a pending offer elsewhere) is left out. Returns the offers
    that went in; each is audited (`driver_offer_sent`) and announced exactly as
    `offer_insert_locked` does. The delivery's current offer becomes the best-ranked pending
    one (the lowest slot) if it had none."""
    started = time.perf_counter()
    expires_in = default_expires_seconds(delivery)
    expires_at = now + timedelta(seconds=expires_in)
    candidates = [
        DriverOffer(
            delivery=delivery, driver=driver, status=OfferStatus.PENDING, slot=first_slot + i,
            offer_payload=offer_payload(delivery=delivery, driver=driver, now=now),
            created_at=now, expires_at=expires_at, search_radius_km=search_radius_km,
        )
        for i, driver in enumerate(drivers)
    ]
    made = [o for o, ok in zip(candidates, insert_many_unless_conflict(candidates), strict=True) if ok]
    if not made:
        return []
    if delivery.current_offer_id is None:
        delivery.current_offer = made[0]
        delivery.updated_at = now
        Delivery.objects.filter(pk=delivery.pk).update(current_offer=made[0], updated_at=now)
    elapsed = time.perf_counter() - started
    for offer in made:
        audit_record(
            delivery=delivery, event_type=E.DRIVER_OFFER_SENT, actor=actor, now=now,
            details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "expiresAt": iso(offer.expires_at),
                     "payload": offer.offer_payload, "slot": offer.slot},
        )
        event = events.offer_created(offer)
        broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], event)
        enqueue_task_on_commit(PUSH_TASK, str(offer.pk), str(offer.driver_id), event, durable_seconds=expires_in)
        enqueue_task_on_commit("offers.expire_offer", str(offer.pk), eta=offer.expires_at)
        metrics.observe(metrics.OFFER_CREATION_LATENCY, elapsed)
    return made


class PushFailed(Exception):
    """The push gateway failed after this run claimed the offer at `claimed_at` (the task's
    retry holds the claim)."""

    def __init__(self, claimed_at: datetime):
        super().__init__(f"push gateway failed (claimed at {iso(claimed_at)})")
        self.claimed_at = claimed_at


_WIDEN_SQL = """
UPDATE {offers} SET search_radius_km = %(radius)s
WHERE id IN (
    SELECT id FROM {offers}
    WHERE delivery_id = %(delivery)s AND status = 'PENDING' AND (search_radius_km IS NULL OR search_radius_km < %(radius)s)
    FOR UPDATE SKIP LOCKED
)
"""


def offers_widen_pending_locked(delivery: Delivery, *, radius_km: float) -> int:
    """The delivery's pending offers were found within a narrower radius than `radius_km` (level 2
    escalated it meanwhile): the next search after one ends (rejected, expired, withdrawn: it reads
    `search_radius_km` off the offer) is as wide. The caller holds the delivery's lock, so an
    offer another transaction holds is skipped, never waited for: an answer or an expiry locks the
    offer, then the delivery (workflows.locks), and waiting here would deadlock with it (that
    offer is ending anyway; the search after it stays at its own radius)."""
    with connection.cursor() as cursor:
        cursor.execute(_WIDEN_SQL.format(offers=DriverOffer._meta.db_table),
                       {"radius": radius_km, "delivery": delivery.pk})
        return cursor.rowcount


def offer_push(
    *, offer_id, driver_id, event: dict, claimed_at: datetime | None = None, redelivered: bool = False
) -> bool:
    """Send the offer to the driver's phone through the push backend and record how the
    driver was told. Runs in a Celery task (retried with backoff when the gateway fails);
    the socket already had it at commit.

    Once per offer: the run claims the offer first (sets `notification_sent_at`, only while it
    is pending, unexpired and unclaimed; `notification_method` "push" while the push is out),
    so a second copy of the task (a publish that timed out but reached the broker, then was
    kept and published again: common.deferred), or a push of an offer answered, expired or
    withdrawn while its task waited, sends nothing. A retry after a gateway failure passes the
    claim it holds (`claimed_at`); a task redelivered because its worker died (`redelivered`:
    acks late, rejected on worker loss) takes over a claim left "push" (the push was out when
    the worker died)."""
    now = timezone.now()
    live = DriverOffer.objects.filter(pk=offer_id, status=OfferStatus.PENDING, expires_at__gt=now)
    if claimed_at is None:
        claimed_at = now
        unclaimed = Q(notification_sent_at__isnull=True)
        if redelivered:
            unclaimed |= Q(notification_method=NotificationMethod.PUSH)
        claimed = live.filter(unclaimed).update(notification_sent_at=now, notification_method=NotificationMethod.PUSH)
    else:
        claimed = live.filter(notification_sent_at=claimed_at).exists()
    if not claimed:
        return False
    try:
        pushed = bool(get_push_backend().send_offer(driver_id=str(driver_id), event=event))
    except Exception as exc:
        DriverOffer.objects.filter(pk=offer_id).update(notification_method=NotificationMethod.WEBSOCKET)
        raise PushFailed(claimed_at) from exc
    DriverOffer.objects.filter(pk=offer_id).update(
        notification_method=NotificationMethod.BOTH if pushed else NotificationMethod.WEBSOCKET
    )
    return pushed


# ------------------------------------------------------------------------- answer


def offer_ensure_pending(offer: DriverOffer, now: datetime) -> None:
    if offer.status != OfferStatus.PENDING:
        raise Conflict(f"Offer {offer.pk} has already been processed (status {offer.status}).")
    if now >= offer.expires_at:
        raise Conflict(f"Offer {offer.pk} has expired.")


def offer_is_overdue(offer: DriverOffer, now: datetime) -> bool:
    """Pending but past expiresAt: it can no longer be accepted, whether or not the expiry
    job has run yet."""
    return offer.status == OfferStatus.PENDING and now >= offer.expires_at


def _response_ms(offer: DriverOffer, now: datetime) -> int:
    return max(0, int((now - offer.created_at).total_seconds() * 1000))


def _close_current_offer(delivery: Delivery, offer: DriverOffer, now: datetime) -> None:
    """The delivery no longer waits on `offer` (the locked row is kept in step). In a batch or
    broadcast round the current offer passes to the best-ranked offer of the round still
    pending, so `current_offer` is set exactly while some offer of the delivery is pending.
    Every change to a pending offer holds its delivery's lock, which the caller holds: the
    siblings read here cannot change under it."""
    if delivery.current_offer_id == offer.pk:  # the caller holds the lock: the row is current
        successor = None
        if offer.slot != SINGLE_SLOT:
            successor = (
                DriverOffer.objects.filter(delivery_id=delivery.pk, status=OfferStatus.PENDING)
                .exclude(pk=offer.pk).order_by("slot").only("pk", "driver_id").first()
            )
        delivery.current_offer = successor
        delivery.updated_at = now
        Delivery.objects.filter(pk=delivery.pk).update(current_offer=successor, updated_at=now)


# The delivery fields `offer_mark_accepted` changes on the locked row; the caller writes them
# with the assignment (`assignment_start_locked(..., also_save=ACCEPTED_OFFER_FIELDS)`).
ACCEPTED_OFFER_FIELDS = ("current_offer", "accepted_offer", "offer_acceptance_count")


def offer_mark_accepted(offer: DriverOffer, *, delivery: Delivery, actor: Actor, now: datetime) -> int:
    """ACCEPTED, the delivery's accepted offer, audit `driver_accepted`. The caller holds the
    offer's, the delivery's and the driver's locks, and saves ACCEPTED_OFFER_FIELDS of the
    delivery (with the assignment, in one UPDATE). Returns the response time in ms."""
    response_ms = _response_ms(offer, now)
    offer.status = OfferStatus.ACCEPTED
    offer.accepted_at = now
    offer.driver_response_time_ms = response_ms
    save_fields(offer, ["status", "accepted_at", "driver_response_time_ms"])
    delivery.current_offer = None
    delivery.accepted_offer = offer
    delivery.offer_acceptance_count += 1  # the row is locked: the same as F() + 1
    audit_record(
        delivery=delivery, event_type=E.DRIVER_ACCEPTED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "responseTimeMs": response_ms},
    )
    return response_ms


def offer_announce_accepted(offer: DriverOffer, *, assignment_id) -> None:
    broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_accepted(offer, assignment_id=assignment_id))


def offer_mark_rejected(offer: DriverOffer, *, delivery: Delivery, reason: str, actor: Actor, now: datetime) -> None:
    """REJECTED, with the driver's reason. The caller holds the three locks."""
    offer.status = OfferStatus.REJECTED
    offer.rejected_at = now
    offer.rejection_reason = reason
    offer.driver_response_time_ms = _response_ms(offer, now)
    save_fields(offer, ["status", "rejected_at", "rejection_reason", "driver_response_time_ms"])
    _close_current_offer(delivery, offer, now)
    audit_record(
        delivery=delivery, event_type=E.DRIVER_REJECTED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "reason": reason},
    )
    broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_rejected(offer))


def offer_mark_expired(offer: DriverOffer, *, delivery: Delivery, now: datetime, actor: Actor | None = None) -> None:
    """EXPIRED (by the clock, or by `actor`: ops' "expire now"). The caller holds the three locks."""
    offer.status = OfferStatus.EXPIRED
    offer.expired_at = now
    offer.save(update_fields=["status", "expired_at"])
    _close_current_offer(delivery, offer, now)
    audit_record(
        delivery=delivery, event_type=E.OFFER_EXPIRED, actor=actor or Actor.system(), now=now,
        details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "expiresAt": iso(offer.expires_at)},
    )
    broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_expired(offer))


def offer_mark_superseded(offer: DriverOffer, *, now: datetime) -> None:
    """Ops took the delivery away from the driver who accepted `offer` (reassign): it is no
    longer the delivery's accepted offer, and the database allows one per delivery
    (`offer_one_accepted_per_delivery`), so the next driver's accept can take its place. It
    becomes CANCELLED with reason `reassigned`; `acceptedAt` stays, and the assignment it
    started keeps pointing at it. The caller holds the offer's lock (taken before the
    delivery's) and audits the reassign."""
    offer.status = OfferStatus.CANCELLED
    offer.cancelled_at = now
    offer.cancellation_reason = "reassigned"
    offer.save(update_fields=["status", "cancelled_at", "cancellation_reason"])


def offer_cancel_locked(offer: DriverOffer, *, delivery: Delivery, reason: str, actor: Actor, now: datetime) -> None:
    """Withdraw a pending offer (CANCELLED, `offer_cancelled`). The caller holds the offer's,
    the delivery's and the driver's locks."""
    offer.status = OfferStatus.CANCELLED
    offer.cancelled_at = now
    offer.cancellation_reason = reason
    offer.save(update_fields=["status", "cancelled_at", "cancellation_reason"])
    _close_current_offer(delivery, offer, now)
    audit_record(
        delivery=delivery, event_type=E.OFFER_CANCELLED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "reason": reason},
    )
    broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_cancelled(offer))


def offers_withdraw_locked(offers: list[DriverOffer], *, delivery: Delivery, reason: str, actor: Actor, now: datetime) -> None:
    """Withdraw all the pending offers of one delivery at once (the rest of a round when one
    of its drivers accepted, or all of them when the delivery is cancelled): ONE UPDATE to
    CANCELLED, then per offer the audit `offer_cancelled` and the `offer_cancelled` event to
    its driver and ops. The caller holds the offers' locks (taken before the delivery's) and
    the delivery's; not their drivers': nothing after this waits on a driver, so a dispatch
    holding one of them and waiting on these rows (its insert meets the driver's pending
    offer) only waits for this transaction to end, never the other way round."""
    if not offers:
        return
    DriverOffer.objects.filter(pk__in=[o.pk for o in offers], status=OfferStatus.PENDING).update(
        status=OfferStatus.CANCELLED, cancelled_at=now, cancellation_reason=reason
    )
    if delivery.current_offer_id in {o.pk for o in offers}:
        delivery.current_offer = None
        delivery.updated_at = now
        Delivery.objects.filter(pk=delivery.pk).update(current_offer=None, updated_at=now)
    for offer in offers:
        offer.status = OfferStatus.CANCELLED
        offer.cancelled_at = now
        offer.cancellation_reason = reason
        audit_record(
            delivery=delivery, event_type=E.OFFER_CANCELLED, actor=actor, now=now,
            details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "reason": reason},
        )
        broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_cancelled(offer))
