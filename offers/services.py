"""Every write to offers (STYLE rule 1). Lock order: offer → delivery → driver.

Each state change of an offer happens under the offer's row lock and re-checks the status, so
accept, reject, expire and cancel of one offer have exactly one winner; the losers get 409
(or, for the expiry jobs, a quiet no-op).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from audit.models import AuditEventType as E
from audit.services import audit_record
from common import metrics
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, driver_group, enqueue_on_commit, send_now
from common.errors import iso
from common.exceptions import Conflict, NotFound
from common.fields import point_json
from dispatch import eta
from dispatch.models import Delivery, DeliveryStatus, Driver, DriverAvailability
from dispatch.performance import performance_offer_answered
from offers import events
from offers.models import DriverOffer, NotificationMethod, OfferStatus

logger = logging.getLogger(__name__)

MIN_EXPIRES_SECONDS = 10
MAX_EXPIRES_SECONDS = 120


# ------------------------------------------------------------------------ payload


def driver_earning(*, total_km: float) -> Decimal:
    """Base pay + per-km pay over the trip (driver → pickup → dropoff), to the cent."""
    amount = Decimal(settings.DRIVER_BASE_PAY) + Decimal(settings.DRIVER_PAY_PER_KM) * Decimal(str(total_km))
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


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
        "estimatedEarning": float(driver_earning(total_km=to_pickup_km + leg_km)),
    }


def default_expires_seconds(delivery: Delivery) -> int:
    zone = delivery.zone if getattr(delivery, "zone_id", None) else None
    override = getattr(zone, "offer_expires_seconds", None) if zone else None
    return int(override or settings.OFFER_DEFAULT_EXPIRES_SECONDS)


# ------------------------------------------------------------------------- create


def offer_create_locked(
    *, delivery: Delivery, driver: Driver, actor: Actor, now: datetime, expires_in_seconds: int | None = None,
    search_radius_km: float | None = None,
) -> DriverOffer:
    """Offer `delivery` to `driver`. The caller holds both row locks (delivery, then driver)
    and has checked that the delivery is ready and the driver available. Raises Conflict when
    the database refuses a second pending offer for either of them."""
    started = time.perf_counter()
    expires_in = expires_in_seconds or default_expires_seconds(delivery)
    try:
        with transaction.atomic():
            offer = DriverOffer.objects.create(
                delivery=delivery, driver=driver, status=OfferStatus.PENDING,
                offer_payload=offer_payload(delivery=delivery, driver=driver, now=now),
                created_at=now, expires_at=now + timedelta(seconds=expires_in), search_radius_km=search_radius_km,
            )
    except IntegrityError:
        raise Conflict("The delivery or the driver already has a pending offer.")
    Delivery.objects.filter(pk=delivery.pk).update(current_offer=offer, updated_at=now)
    delivery.current_offer = offer
    audit_record(
        delivery=delivery, event_type=E.DRIVER_OFFER_SENT, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(driver.pk), "expiresAt": iso(offer.expires_at),
                 "payload": offer.offer_payload},
    )
    event = events.offer_created(offer)
    transaction.on_commit(lambda: offer_notify(offer_id=offer.pk, driver_id=driver.pk, event=event), robust=True)
    from offers.tasks import expire_offer

    enqueue_on_commit(expire_offer, str(offer.pk), eta=offer.expires_at)
    metrics.OFFER_CREATION_LATENCY.observe(time.perf_counter() - started)
    return offer


def offer_notify(*, offer_id, driver_id, event: dict) -> None:
    """After commit: the driver's socket, ops, and the push backend; then record it."""
    from offers.push import get_push_backend

    send_now([driver_group(driver_id), OPS_GROUP], event)
    pushed = False
    try:
        pushed = get_push_backend().send_offer(driver_id=str(driver_id), event=event)
    except Exception:
        logger.warning("push of offer %s failed", offer_id, exc_info=True)
    DriverOffer.objects.filter(pk=offer_id).update(
        notification_sent_at=timezone.now(),
        notification_method=NotificationMethod.BOTH if pushed else NotificationMethod.WEBSOCKET,
    )


@transaction.atomic
def offer_create(
    *, delivery_id, driver_id, actor: Actor, expires_in_seconds: int | None = None, now: datetime | None = None
) -> DriverOffer:
    """Ops offer a ready delivery to a chosen available driver."""
    now = now or timezone.now()
    delivery = Delivery.objects.select_for_update(of=("self",)).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("Delivery not found.")
    driver = Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id).first()
    if driver is None:
        raise NotFound("Driver not found.")
    if delivery.status != DeliveryStatus.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be offered.")
    if driver.availability != DriverAvailability.AVAILABLE:
        raise Conflict(f"Driver {driver.pk} is not available for assignment (currently {driver.availability}).")
    if DriverOffer.objects.filter(delivery=delivery, status=OfferStatus.PENDING).exists():
        raise Conflict("The delivery already has a pending offer.")
    if DriverOffer.objects.filter(driver=driver, status=OfferStatus.PENDING).exists():
        raise Conflict("The driver already has a pending offer.")
    return offer_create_locked(delivery=delivery, driver=driver, actor=actor, now=now, expires_in_seconds=expires_in_seconds)


# ------------------------------------------------------------------------- answer


def _lock_offer_of_driver(offer_id, driver_id) -> DriverOffer:
    offer = DriverOffer.objects.select_for_update(of=("self",)).filter(pk=offer_id, driver_id=driver_id).first()
    if offer is None:
        raise NotFound("Offer not found.")
    return offer


def lock_offer_driver(offer: DriverOffer) -> Driver:
    """Lock the offer's driver. Every change to a pending offer is made holding this lock (after
    the offer's and the delivery's): dispatch only inserts offers for drivers it has locked
    itself, so its unique-index checks can never wait on a transaction that is changing that
    driver's pending offer — the deadlock this rule removes."""
    return Driver.objects.select_for_update(of=("self",)).get(pk=offer.driver_id)


def _ensure_pending(offer: DriverOffer, now: datetime) -> None:
    if offer.status != OfferStatus.PENDING:
        raise Conflict(f"Offer {offer.pk} has already been processed (status {offer.status}).")
    if now >= offer.expires_at:
        raise Conflict(f"Offer {offer.pk} has expired.")


def _close_current_offer(delivery_id, offer: DriverOffer, now: datetime, **extra) -> None:
    Delivery.objects.filter(pk=delivery_id, current_offer=offer).update(current_offer=None, updated_at=now, **extra)


@dataclass(frozen=True)
class AcceptResult:
    offer: DriverOffer
    assignment_id: str


def offer_accept(*, offer_id, driver_id, actor: Actor, now: datetime | None = None) -> AcceptResult:
    """The driver takes the delivery: assignment, driver busy, delivery assigned.

    An offer past `expiresAt` cannot be accepted even if the expiry job has not run yet: it is
    expired on the spot (next candidate offered) and the driver gets a 409.
    """
    now = now or timezone.now()
    try:
        return _offer_accept(offer_id=offer_id, driver_id=driver_id, actor=actor, now=now)
    except _Expired:
        offer_expire(offer_id=offer_id, now=now)
        raise Conflict(f"Offer {offer_id} has expired.")


class _Expired(Exception):
    pass


@transaction.atomic
def _offer_accept(*, offer_id, driver_id, actor: Actor, now: datetime) -> AcceptResult:
    from dispatch.services import assignment_create
    from escalation.services import unassigned_resolve

    offer = _lock_offer_of_driver(offer_id, driver_id)
    if offer.status == OfferStatus.PENDING and now >= offer.expires_at:
        raise _Expired()
    _ensure_pending(offer, now)
    delivery = Delivery.objects.select_for_update(of=("self",)).get(pk=offer.delivery_id)
    lock_offer_driver(offer)
    response_ms = max(0, int((now - offer.created_at).total_seconds() * 1000))
    offer.status = OfferStatus.ACCEPTED
    offer.accepted_at = now
    offer.driver_response_time_ms = response_ms
    offer.save(update_fields=["status", "accepted_at", "driver_response_time_ms"])
    # The timeline reads: driver_accepted, then driver_assigned (written by assignment_create,
    # with the assignment's id).
    audit_record(
        delivery=delivery, event_type=E.DRIVER_ACCEPTED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(driver_id), "responseTimeMs": response_ms},
    )
    assignment = assignment_create(
        delivery_id=delivery.pk, driver_id=driver_id, actor=actor, now=now, details={"offerId": str(offer.pk)}
    )
    Delivery.objects.filter(pk=delivery.pk).update(
        current_offer=None, accepted_offer=offer, offer_acceptance_count=F("offer_acceptance_count") + 1
    )
    unassigned_resolve(delivery=delivery, now=now)
    performance_offer_answered(driver_id=driver_id, outcome=OfferStatus.ACCEPTED, response_time_ms=response_ms, now=now)
    metrics.ASSIGNMENT_LATENCY.observe(max(0.0, (now - delivery.ready_at).total_seconds()))
    broadcast_on_commit([driver_group(driver_id), OPS_GROUP], events.offer_accepted(offer, assignment_id=assignment.pk))
    return AcceptResult(offer=offer, assignment_id=str(assignment.pk))


@dataclass(frozen=True)
class RejectResult:
    offer: DriverOffer
    next_offer: DriverOffer | None


@transaction.atomic
def offer_reject(*, offer_id, driver_id, reason: str, actor: Actor, now: datetime | None = None) -> RejectResult:
    """The driver declines; the delivery goes to its next candidate in the same transaction."""
    from dispatch.engine import dispatch_locked

    now = now or timezone.now()
    offer = _lock_offer_of_driver(offer_id, driver_id)
    _ensure_pending(offer, now)
    delivery = Delivery.objects.select_for_update(of=("self",)).get(pk=offer.delivery_id)
    lock_offer_driver(offer)
    offer.status = OfferStatus.REJECTED
    offer.rejected_at = now
    offer.rejection_reason = reason
    offer.driver_response_time_ms = max(0, int((now - offer.created_at).total_seconds() * 1000))
    offer.save(update_fields=["status", "rejected_at", "rejection_reason", "driver_response_time_ms"])
    _close_current_offer(delivery.pk, offer, now)
    audit_record(
        delivery=delivery, event_type=E.DRIVER_REJECTED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(driver_id), "reason": reason},
    )
    performance_offer_answered(
        driver_id=driver_id, outcome=OfferStatus.REJECTED, response_time_ms=offer.driver_response_time_ms, now=now
    )
    broadcast_on_commit([driver_group(driver_id), OPS_GROUP], events.offer_rejected(offer))
    result = dispatch_locked(delivery, actor=Actor.system(), now=now)
    return RejectResult(offer=offer, next_offer=result.offer if result.outcome == "offered" else None)


def offer_expire(*, offer_id, now: datetime | None = None, force: bool = False) -> bool:
    """Expire a pending offer whose time is up and move its delivery to the next candidate.

    Idempotent and safe to race with accept/reject and with itself: a locked offer is skipped
    (whoever holds it decides), a processed or not-yet-due one is left alone. Returns True
    when this call expired it. `force` expires it now, due or not (ops' "expire now").
    """
    from dispatch.engine import dispatch_locked

    now = now or timezone.now()
    with transaction.atomic():
        due = {} if force else {"expires_at__lte": now}
        offer = DriverOffer.objects.select_for_update(of=("self",), skip_locked=True).filter(
            pk=offer_id, status=OfferStatus.PENDING, **due
        ).first()
        if offer is None:
            return False
        delivery = Delivery.objects.select_for_update(of=("self",)).get(pk=offer.delivery_id)
        lock_offer_driver(offer)
        offer.status = OfferStatus.EXPIRED
        offer.expired_at = now
        offer.save(update_fields=["status", "expired_at"])
        _close_current_offer(delivery.pk, offer, now)
        audit_record(
            delivery=delivery, event_type=E.OFFER_EXPIRED, actor=Actor.system(), now=now,
            details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "expiresAt": iso(offer.expires_at)},
        )
        performance_offer_answered(driver_id=offer.driver_id, outcome=OfferStatus.EXPIRED, response_time_ms=None, now=now)
        broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_expired(offer))
        dispatch_locked(delivery, actor=Actor.system(), now=now)
    return True


def offers_expire_overdue(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """The sweep: expire every pending offer past its time (bounded batch, oldest first)."""
    now = now or timezone.now()
    ids = list(
        DriverOffer.objects.filter(status=OfferStatus.PENDING, expires_at__lte=now)
        .order_by("expires_at").values_list("pk", flat=True)[:batch_size]
    )
    expired = 0
    for offer_id in ids:
        try:
            expired += offer_expire(offer_id=offer_id, now=now)
        except Exception:  # one bad offer must not stop the sweep
            logger.exception("expiring offer %s failed", offer_id)
    return expired


def offer_cancel_locked(offer: DriverOffer, *, delivery: Delivery, reason: str, actor: Actor, now: datetime) -> None:
    """Withdraw a pending offer. The caller holds the offer's, the delivery's and the driver's
    locks (see lock_offer_driver)."""
    offer.status = OfferStatus.CANCELLED
    offer.cancelled_at = now
    offer.cancellation_reason = reason
    offer.save(update_fields=["status", "cancelled_at", "cancellation_reason"])
    _close_current_offer(delivery.pk, offer, now)
    audit_record(
        delivery=delivery, event_type=E.OFFER_CANCELLED, actor=actor, now=now,
        details={"offerId": str(offer.pk), "driverId": str(offer.driver_id), "reason": reason},
    )
    broadcast_on_commit([driver_group(offer.driver_id), OPS_GROUP], events.offer_cancelled(offer))


def lock_pending_offer_of_driver(driver_id):
    """Lock a driver's pending offer and its delivery (in that order) before the driver's row,
    for changes that must withdraw it. Returns (offer, delivery) or (None, None)."""
    offer = DriverOffer.objects.select_for_update(of=("self",)).filter(driver_id=driver_id, status=OfferStatus.PENDING).first()
    if offer is None:
        return None, None
    delivery = Delivery.objects.select_for_update(of=("self",)).get(pk=offer.delivery_id)
    return offer, delivery


def lock_pending_offer_of_delivery(delivery_id):
    return DriverOffer.objects.select_for_update(of=("self",)).filter(delivery_id=delivery_id, status=OfferStatus.PENDING).first()
