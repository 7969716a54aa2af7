"""Every write to drivers, deliveries and assignments (STYLE rule 1).

Lock order, everywhere: offer → delivery → driver, each by primary key.
"""
from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.gis.geos import Point
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.authtoken.models import Token

from audit.models import AuditEventType as E
from audit.services import audit_record
from availability.services import apply_availability_change
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, delivery_group
from common.exceptions import Conflict, NotFound
from dispatch import events
from zones.selectors import zone_for_point
from dispatch.models import (
    Assignment,
    AssignmentStatus,
    Delivery,
    DeliveryStatus as S,
    Driver,
    DriverAvailability,
)


# ----------------------------------------------------------------------------- drivers


@transaction.atomic
def driver_create(
    *,
    name: str,
    phone: str,
    vehicle: str,
    vehicle_type: str = "car",
    username: str | None = None,
    home_location: Point | None = None,
) -> tuple[Driver, str]:
    """Create a driver with its own login and API token; returns (driver, token key).

    A new driver is `offline` until it resumes work.
    """
    User = get_user_model()
    if username is None:
        base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:100] or "driver"
        username = f"driver-{base}-{secrets.token_hex(3)}"
    elif User.objects.filter(username=username).exists():
        raise Conflict(f"Username {username!r} is taken.")
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=username)
    except IntegrityError:
        raise Conflict(f"Username {username!r} is taken.")
    user.set_unusable_password()
    user.save(update_fields=["password"])
    driver = Driver.objects.create(
        user=user, name=name, phone=phone, vehicle=vehicle, vehicle_type=vehicle_type, home_location=home_location
    )
    token = Token.objects.create(user=user)
    return driver, token.key


# -------------------------------------------------------------------------- deliveries


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
    prep_time_minutes: int = 0
    delivery_fee: Decimal | None = None


@transaction.atomic
def delivery_create(
    *, data: DeliveryInput, created_by, actor: Actor, auto_dispatch: bool = False, now: datetime | None = None
) -> Delivery:
    """Create a `ready` delivery owned by `created_by`; sellerOrderId is unique per owner.

    With `auto_dispatch` the first candidate is offered in the same transaction (or the
    delivery is recorded as unassigned)."""
    now = now or timezone.now()
    if Delivery.objects.filter(created_by=created_by, seller_order_id=data.seller_order_id).exists():
        raise Conflict(f"A delivery for sellerOrderId {data.seller_order_id!r} already exists.")
    try:
        with transaction.atomic():
            delivery = Delivery.objects.create(
                created_by=created_by,
                seller_order_id=data.seller_order_id,
                seller_id=data.seller_id,
                store_name=data.store_name,
                pickup_location=data.pickup_location,
                dropoff_location=data.dropoff_location,
                dropoff_address=data.dropoff_address,
                customer_name=data.customer_name,
                customer_phone=data.customer_phone,
                prep_time_minutes=data.prep_time_minutes,
                delivery_fee=data.delivery_fee,
                ready_at=now,
                zone=zone_for_point(data.pickup_location),
            )
    except IntegrityError:
        raise Conflict(f"A delivery for sellerOrderId {data.seller_order_id!r} already exists.")
    audit_record(
        delivery=delivery,
        event_type=E.CREATED,
        actor=actor,
        details={"sellerOrderId": delivery.seller_order_id, "storeName": delivery.store_name},
        now=now,
    )
    broadcast_on_commit([OPS_GROUP], events.delivery_created(delivery))
    if auto_dispatch:
        from dispatch.engine import dispatch_locked

        dispatch_locked(delivery, actor=Actor.system(), now=now)
    return delivery


def _lock_delivery(delivery_id) -> Delivery:
    delivery = Delivery.objects.select_for_update(of=("self",)).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("Delivery not found.")
    return delivery


def _release_driver(driver_id, *, reason: str, actor: Actor, now: datetime) -> None:
    """Free a busy driver after their assignment ended. Caller holds the delivery lock."""
    driver = Driver.objects.select_for_update(of=("self",)).get(pk=driver_id)
    if driver.availability == DriverAvailability.BUSY:
        apply_availability_change(
            driver, to_state=DriverAvailability.AVAILABLE, reason=reason, actor=actor, releasing=True, now=now
        )


def _end_active_assignment(delivery: Delivery, *, status: str, reason: str, actor: Actor, now: datetime) -> Assignment | None:
    assignment = Assignment.objects.select_for_update(of=("self",)).filter(
        delivery=delivery, status=AssignmentStatus.ACTIVE
    ).first()
    if assignment is None:
        return None
    assignment.status = status
    assignment.ended_at = now
    assignment.end_reason = reason
    assignment.save(update_fields=["status", "ended_at", "end_reason"])
    _release_driver(assignment.driver_id, reason=reason, actor=actor, now=now)
    return assignment


def _emit_status(delivery: Delivery, *, from_status: str, driver_id, now: datetime, reason: str = "") -> None:
    event = events.delivery_status_changed(delivery, from_status=from_status, driver_id=driver_id, changed_at=now, reason=reason)
    broadcast_on_commit([OPS_GROUP, delivery_group(delivery.pk)], event)
    if delivery.status in (S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT):
        from dispatch.eta_service import eta_refresh_on_commit

        eta_refresh_on_commit(delivery.pk, now=now)  # the legs changed: a fresh ETA for the customer


@transaction.atomic
def delivery_cancel(*, delivery_id, reason: str, actor: Actor, now: datetime | None = None) -> Delivery:
    """Cancel an open delivery: its active assignment ends and the driver is freed."""
    from escalation.services import unassigned_cancel
    from offers.services import lock_offer_driver, lock_pending_offer_of_delivery, offer_cancel_locked

    now = now or timezone.now()
    offer = lock_pending_offer_of_delivery(delivery_id)
    delivery = _lock_delivery(delivery_id)
    if not delivery.is_open:
        raise Conflict(f"Delivery is {delivery.status}; it can no longer be cancelled.")
    if offer is not None:
        lock_offer_driver(offer)
        offer_cancel_locked(offer, delivery=delivery, reason="delivery_cancelled", actor=actor, now=now)
    unassigned_cancel(delivery=delivery, now=now)
    from_status = delivery.status
    assignment = _end_active_assignment(
        delivery, status=AssignmentStatus.CANCELLED, reason="delivery_cancelled", actor=actor, now=now
    )
    delivery.status = S.CANCELLED
    delivery.cancelled_at = now
    delivery.cancellation_reason = reason
    delivery.save(update_fields=["status", "cancelled_at", "cancellation_reason", "updated_at"])
    audit_record(
        delivery=delivery,
        event_type=E.DELIVERY_CANCELLED,
        actor=actor,
        details={"reason": reason, "fromStatus": from_status, "driverId": str(assignment.driver_id) if assignment else None},
        now=now,
    )
    event = events.delivery_cancelled(delivery, from_status=from_status, reason=reason, cancelled_at=now)
    broadcast_on_commit([OPS_GROUP, delivery_group(delivery.pk)], event)
    return delivery


@transaction.atomic
def assignment_create(*, delivery_id, driver_id, actor: Actor, now: datetime | None = None, details: dict | None = None) -> Assignment:
    """Assign a ready delivery to an available driver, who becomes busy.

    The partial unique constraints (one active assignment per delivery and per driver) are the
    last word when two of these race; the loser gets a Conflict.
    """
    now = now or timezone.now()
    delivery = _lock_delivery(delivery_id)
    driver = Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id).first()
    if driver is None:
        raise NotFound("Driver not found.")
    if delivery.status != S.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be assigned.")
    if driver.availability != DriverAvailability.AVAILABLE:
        raise Conflict(f"Driver {driver.pk} is not available for assignment (currently {driver.availability}).")
    try:
        with transaction.atomic():
            assignment = Assignment.objects.create(delivery=delivery, driver=driver, status=AssignmentStatus.ACTIVE)
    except IntegrityError:
        raise Conflict("The delivery or the driver already has an active assignment.")
    apply_availability_change(driver, to_state=DriverAvailability.BUSY, reason="assigned", actor=actor, now=now)
    delivery.status = S.ASSIGNED
    delivery.assigned_at = now
    delivery.save(update_fields=["status", "assigned_at", "updated_at"])
    audit_record(
        delivery=delivery,
        event_type=E.DRIVER_ASSIGNED,
        actor=actor,
        details={"driverId": str(driver.pk), "assignmentId": str(assignment.pk), **(details or {})},
        now=now,
    )
    _emit_status(delivery, from_status=S.READY, driver_id=driver.pk, now=now)
    return assignment


@transaction.atomic
def delivery_reassign(*, delivery_id, reason: str, actor: Actor, now: datetime | None = None):
    """Ops take an assigned delivery away from its driver: the assignment is cancelled, the
    driver freed, the delivery is ready again and goes to the next candidate (the previous
    driver is excluded, having been offered it once). Returns (previous driver id, dispatch result)."""
    from dispatch.engine import dispatch_locked

    now = now or timezone.now()
    delivery = _lock_delivery(delivery_id)
    if delivery.status != S.ASSIGNED:
        raise Conflict(f"Delivery is {delivery.status}; only an assigned delivery (not yet picked up) can be reassigned.")
    assignment = _end_active_assignment(
        delivery, status=AssignmentStatus.CANCELLED, reason="reassigned", actor=actor, now=now
    )
    previous = assignment.driver_id if assignment else None
    delivery.status = S.READY
    delivery.assigned_at = None
    delivery.pickup_started_at = None
    delivery.save(update_fields=["status", "assigned_at", "pickup_started_at", "updated_at"])
    Delivery.objects.filter(pk=delivery.pk).update(accepted_offer=None)
    audit_record(
        delivery=delivery, event_type=E.ASSIGNMENT_REASSIGNED, actor=actor, now=now,
        details={"reason": reason, "previousDriverId": str(previous) if previous else None,
                 "assignmentId": str(assignment.pk) if assignment else None},
    )
    _emit_status(delivery, from_status=S.ASSIGNED, driver_id=None, now=now, reason=reason)
    result = dispatch_locked(delivery, actor=Actor.system(), now=now, exclude_driver_ids=[previous] if previous else ())
    return previous, result


# Delivery steps by the assigned driver: step -> (allowed from, new status, audit event).
STEPS = {
    "pickup-started": ((S.ASSIGNED,), S.ASSIGNED, E.PICKUP_STARTED),
    "pickup-completed": ((S.ASSIGNED,), S.PICKED_UP, E.PICKUP_COMPLETED),
    "delivery-started": ((S.PICKED_UP,), S.IN_TRANSIT, E.DELIVERY_STARTED),
    "delivery-completed": ((S.IN_TRANSIT,), S.DELIVERED, E.DELIVERY_COMPLETED),
    "delivery-failed": ((S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT), S.FAILED, E.DELIVERY_FAILED),
}
STEP_NAMES = tuple(STEPS)


@transaction.atomic
def delivery_advance(
    *, delivery_id, driver_id, step: str, actor: Actor, reason: str = "", now: datetime | None = None
) -> Delivery:
    """Move a delivery one step on, by its assigned driver. Out-of-order steps are a Conflict."""
    if step not in STEPS:
        raise NotFound("Unknown step.")
    now = now or timezone.now()
    delivery = _lock_delivery(delivery_id)
    assignment = Assignment.objects.filter(delivery=delivery, driver_id=driver_id).order_by("-created_at").first()
    if assignment is None:
        raise NotFound("Delivery not found.")  # not this driver's: do not reveal it exists
    if assignment.status != AssignmentStatus.ACTIVE:
        raise Conflict(f"Delivery is {delivery.status} and no longer assigned to this driver.")

    allowed_from, to_status, event_type = STEPS[step]
    out_of_order = delivery.status not in allowed_from
    if step == "pickup-started" and delivery.pickup_started_at is not None:
        out_of_order = True
    if step == "pickup-completed" and delivery.pickup_started_at is None:
        out_of_order = True
    if out_of_order:
        raise Conflict(f"Step {step} is out of order: delivery is {delivery.status}.")

    from_status = delivery.status
    fields = ["status", "updated_at"]
    delivery.status = to_status
    stamp = {
        "pickup-started": "pickup_started_at",
        "pickup-completed": "picked_up_at",
        "delivery-started": "in_transit_at",
        "delivery-completed": "delivered_at",
        "delivery-failed": "failed_at",
    }[step]
    setattr(delivery, stamp, now)
    fields.append(stamp)
    if step == "delivery-failed":
        delivery.failure_reason = reason
        fields.append("failure_reason")
    delivery.save(update_fields=fields)

    if step in ("delivery-completed", "delivery-failed"):
        from dispatch.economics import economics_record
        from dispatch.performance import performance_delivery_finished

        _end_active_assignment(
            delivery,
            status=AssignmentStatus.COMPLETED if step == "delivery-completed" else AssignmentStatus.FAILED,
            reason=step.replace("-", "_"),
            actor=actor,
            now=now,
        )
        cost, _ = economics_record(delivery=delivery, now=now)
        performance_delivery_finished(driver_id=driver_id, delivery=delivery, earning=cost.driver_payment, now=now)
    details = {"driverId": str(driver_id), "assignmentId": str(assignment.pk)}
    if reason:
        details["reason"] = reason
    audit_record(delivery=delivery, event_type=event_type, actor=actor, details=details, now=now)
    if to_status != from_status:
        _emit_status(delivery, from_status=from_status, driver_id=driver_id, now=now, reason=reason)
    return delivery


# ---------------------------------------------------------------------------- location

_LOCATION_UPDATE_SQL = """
UPDATE dispatch_driver
SET location = ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)::geography,
    location_accuracy_m = %(accuracy)s,
    location_speed = %(speed)s,
    location_heading = %(heading)s,
    location_recorded_at = %(recorded_at)s,
    updated_at = %(now)s
WHERE id = %(id)s AND (location_recorded_at IS NULL OR location_recorded_at < %(recorded_at)s)
RETURNING availability,
    -- the delivery this driver is on, for its customer's tracking: one probe of the partial
    -- unique index assignment_one_active_per_driver, no second round trip (docs/tracking.md)
    (SELECT a.delivery_id FROM dispatch_assignment a WHERE a.driver_id = dispatch_driver.id AND a.status = 'active')
"""


@dataclass(frozen=True)
class LocationResult:
    accepted: bool
    availability: str | None
    active_delivery_id: uuid.UUID | None = None


def driver_location_update(
    *,
    driver_id,
    lat: float,
    lon: float,
    recorded_at: datetime,
    accuracy_m: float | None = None,
    speed: float | None = None,
    heading: float | None = None,
    now: datetime | None = None,
) -> LocationResult:
    """Store a driver's fix: one conditional UPDATE, so two fixes racing can never move the
    driver back in time; a fix not newer than the stored one is ignored. No audit row per fix.
    The GEO index is updated after commit."""
    from django.db import connection

    from availability import geo

    now = now or timezone.now()
    with connection.cursor() as cur:
        cur.execute(
            _LOCATION_UPDATE_SQL,
            {"lat": lat, "lon": lon, "accuracy": accuracy_m, "speed": speed, "heading": heading,
             "recorded_at": recorded_at, "now": now, "id": driver_id},
        )
        row = cur.fetchone()
    if row is None:
        return LocationResult(accepted=False, availability=None)
    availability, active_delivery_id = row
    if active_delivery_id is not None:
        from dispatch.eta_service import delivery_track_fix

        transaction.on_commit(
            lambda: delivery_track_fix(
                delivery_id=active_delivery_id, lat=lat, lon=lon, accuracy_m=accuracy_m, speed=speed,
                heading=heading, recorded_at=recorded_at, now=now,
            ),
            robust=True,
        )
    if availability == DriverAvailability.AVAILABLE:
        transaction.on_commit(
            lambda: geo.index_driver(
                driver_id=driver_id, availability=availability, lat=lat, lon=lon, recorded_at=recorded_at, from_fix=True
            ),
            robust=True,
        )
    return LocationResult(accepted=True, availability=availability, active_delivery_id=active_delivery_id)
