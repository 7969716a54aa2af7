"""What a customer sees of a delivery, and the customer's rating of it (docs/tracking.md).

The customer holds no account: the delivery's 192-bit `tracking_token`, from the tracking
link, is the credential. It is compared in constant time, and every mismatch (unknown order,
wrong or missing token) reads the same: 404, with no hint whether the order exists.

Customer status maps `ready` to `pending`. While an open delivery's proof policy asks for
the customer's handoff code, the body carries it (`handoffCode`): the customer tells it to the
driver at the door. No driver-facing payload ever does. The driver appears only while the delivery is
assigned or under way, as "First L." with the phone masked to its last four digits. Once the
delivery is delivered, failed or cancelled only that final state is shown.
"""

import hmac
import math
import uuid
from datetime import datetime
from typing import Literal, NotRequired, TypedDict

from django.conf import settings
from django.utils import timezone

from availability import live
from availability.models import Driver
from common.errors import iso
from common.exceptions import Forbidden, NotFound
from common.roles import is_integration, is_ops
from dispatch.models import CODE_POLICIES, Assignment, AssignmentStatus, Delivery, DeliveryProof
from dispatch.proofs import proof_signed_url
from dispatch.models import DeliveryStatus as S
from tracking import eta
from tracking.events import accuracy_shown
from tracking.models import DeliveryRating

CUSTOMER_STATUS = {S.READY: "pending"}
ACTIVE_STATUSES = (S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT)
FINAL_STATUSES = (S.DELIVERED, S.FAILED, S.CANCELLED)
MAX_TOKEN_LENGTH = 64
_NO_MATCH = "x" * 32  # compared against when there is no candidate, so a miss costs the same
_NOT_FOUND = "Order not found."


def customer_status(status: str) -> str:
    return CUSTOMER_STATUS.get(status, status)


def driver_display_name(name: str) -> str:
    """'John Smith' → 'John S.'; a single name stays as it is."""
    parts = name.split()
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return f"{parts[0]} {parts[-1][0].upper()}."


def mask_phone(phone: str) -> str:
    digits = [c for c in phone if c.isdigit()]
    last4 = "".join(digits[-4:]) if len(digits) >= 4 else "****"
    return f"***-***-{last4}"


def tokens_match(given: str | None, expected: str) -> bool:
    if not given or len(given) > MAX_TOKEN_LENGTH:
        hmac.compare_digest(_NO_MATCH.encode(), expected.encode())
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


# ------------------------------------------------------------------------------ selectors


def delivery_for_tracking_link(*, delivery_id, token: str | None) -> Delivery | None:
    """The delivery behind `/track/<id>?token=` and `/ws/track/<id>/?token=`, or None."""
    try:
        delivery = Delivery.objects.filter(pk=uuid.UUID(str(delivery_id))).first()
    except ValueError:  # not a UUID
        delivery = None
    if delivery is None:
        tokens_match(token, _NO_MATCH)
        return None
    return delivery if tokens_match(token, delivery.tracking_token) else None


def delivery_for_customer(*, seller_order_id: str, token: str | None) -> Delivery:
    """The delivery with this sellerOrderId whose tracking token is `token`; else NotFound.

    sellerOrderId is unique per creating account, so several accounts' deliveries may share
    it: each candidate's token is compared (all of them, no early exit)."""
    candidates = list(Delivery.objects.filter(seller_order_id=seller_order_id).values_list("pk", "tracking_token")[:20])
    found = None
    for pk, expected in candidates or [(None, _NO_MATCH)]:
        if tokens_match(token, expected) and pk is not None:
            found = pk
    if found is None:
        raise NotFound(_NOT_FOUND)
    return Delivery.objects.get(pk=found)


def delivery_for_caller(*, user, seller_order_id: str) -> Delivery:
    """An integration reads its own delivery with this sellerOrderId; ops the most recently
    created one with it (sellerOrderIds are unique per account, not globally). Another
    integration's order: 404. Anyone else logged in (a driver, a support agent): 403."""
    qs = Delivery.objects.filter(seller_order_id=seller_order_id)
    if is_ops(user):
        qs = qs.order_by("-created_at", "-pk")
    elif is_integration(user):
        qs = qs.filter(created_by=user)
    else:
        raise Forbidden("Only the customer's tracking link, the integration that created the order, or ops may read it.")
    delivery = qs.first()
    if delivery is None:
        raise NotFound(_NOT_FOUND)
    return delivery


# ---------------------------------------------------------------------------- the body


class TrackingDriver(TypedDict):
    name: str
    rating: float
    vehicle: str
    phone: str


class TrackingLocation(TypedDict):
    lat: float
    lon: float
    accuracyMeters: float
    lastUpdated: str


class TrackingProof(TypedDict):
    """That a photo or signature was given, and when; `url` (signed, expiring) only with
    PROOF_URLS_FOR_CUSTOMERS."""

    kind: str
    addedAt: str
    url: NotRequired[str]


class TrackingStatus(TypedDict):
    """The body of `GET /v2/orders/{sellerOrderId}/delivery-status` (seed shape)."""

    status: str
    driver: NotRequired[TrackingDriver]
    location: NotRequired[TrackingLocation]
    estimatedPickupTime: NotRequired[str]
    estimatedDeliveryTime: NotRequired[str]
    estimatedPrepTimeMinutes: NotRequired[int]
    handoffCode: NotRequired[str]
    proofs: NotRequired[list[TrackingProof]]
    trackingUrl: str
    deliveryId: str


class DeliverySnapshotMessage(TrackingStatus):
    """First message on `/ws/track/<id>/`: the status body with a type."""

    type: Literal["delivery_snapshot"]


class DeliveryStatusUpdatedMessage(TrackingStatus):
    """Sent to the customer's socket on every status change: the status body, fresh."""

    type: Literal["delivery_status_updated"]


def _active_driver(delivery: Delivery) -> Driver | None:
    assignment = (
        Assignment.objects.select_related("driver")
        .filter(delivery=delivery, status=AssignmentStatus.ACTIVE)
        .first()
    )
    return assignment.driver if assignment else None


def tracking_status(delivery: Delivery, *, now: datetime | None = None) -> TrackingStatus:
    now = now or timezone.now()
    body: dict = {"status": customer_status(delivery.status)}
    if delivery.status in ACTIVE_STATUSES and (driver := _active_driver(delivery)) is not None:
        body["driver"] = {
            "name": driver_display_name(driver.name),
            "rating": float(driver.rating),
            "vehicle": driver.vehicle,
            "phone": mask_phone(driver.phone),
        }
        fresh = live.positions_of([driver.pk]).get(str(driver.pk))  # Redis is ahead of PostgreSQL
        if fresh is not None and (driver.location_recorded_at is None or fresh.recorded_at >= driver.location_recorded_at):
            body["location"] = {
                "lat": round(fresh.lat, 7),
                "lon": round(fresh.lon, 7),
                "accuracyMeters": accuracy_shown(fresh.accuracy_m),
                "lastUpdated": iso(fresh.recorded_at),
            }
        elif driver.location is not None and driver.location_recorded_at is not None:
            body["location"] = {
                "lat": round(driver.location.y, 7),
                "lon": round(driver.location.x, 7),
                "accuracyMeters": accuracy_shown(driver.location_accuracy_m),
                "lastUpdated": iso(driver.location_recorded_at),
            }
        if delivery.eta_calculated_at is not None and delivery.eta_pickup_at and delivery.eta_delivery_at:
            # Once picked up, the pickup time is the one it happened at (as the next ETA refresh
            # has it): the status message of the pickup, read before that refresh, showed the
            # estimate of before, up to minutes ahead.
            picked_up = delivery.picked_up_at if delivery.status in (S.PICKED_UP, S.IN_TRANSIT) else None
            body["estimatedPickupTime"] = iso(picked_up or delivery.eta_pickup_at)
            body["estimatedDeliveryTime"] = iso(delivery.eta_delivery_at)
    if delivery.status in (S.READY, S.ASSIGNED):
        body["estimatedPrepTimeMinutes"] = math.ceil(eta.remaining_prep_seconds(delivery, now) / 60)
    if delivery.proof_required in CODE_POLICIES and delivery.status not in FINAL_STATUSES:
        body["handoffCode"] = delivery.handoff_code  # for the customer to give the driver; never to a driver
    proofs = _customer_proofs(delivery)  # whatever the status: a reassigned (ready again) delivery keeps its earlier ones
    if proofs:
        body["proofs"] = proofs
    body["trackingUrl"] = delivery.tracking_url
    body["deliveryId"] = str(delivery.pk)
    return body  # type: ignore[return-value]


def _customer_proofs(delivery: Delivery) -> list[TrackingProof]:
    """Which proofs exist and when; the file's URL never, unless PROOF_URLS_FOR_CUSTOMERS."""
    rows = DeliveryProof.objects.filter(delivery=delivery).order_by("created_at", "id").values_list("id", "kind", "created_at")
    proofs: list[TrackingProof] = []
    for proof_id, kind, created_at in rows:
        proof: TrackingProof = {"kind": kind, "addedAt": iso(created_at)}
        if settings.PROOF_URLS_FOR_CUSTOMERS:
            proof["url"] = proof_signed_url(proof_id)
        proofs.append(proof)
    return proofs


def delivery_rating(delivery: Delivery):
    """The customer's rating of the delivery, or None (rated once at most)."""
    return DeliveryRating.objects.filter(delivery=delivery).first()


def tracking_message(delivery: Delivery, *, kind: str, now: datetime | None = None) -> dict:
    """`{"type": kind, ...tracking_status}` for the customer's socket."""
    return {"type": kind, **tracking_status(delivery, now=now)}


def tracking_snapshot_for_link(*, delivery_id, token: str | None) -> dict | None:
    """The socket's first message, or None for a bad link (the socket closes with 4401)."""
    delivery = delivery_for_tracking_link(delivery_id=delivery_id, token=token)
    return None if delivery is None else tracking_message(delivery, kind="delivery_snapshot")


def tracking_update_for(delivery_id, *, kind: str = "delivery_status_updated", status: str | None = None) -> dict | None:
    """The socket's message, or None (the delivery is gone). With `status` (a change's own
    status, which a later change may have overtaken by the time its socket reads the row): the
    body as of that status, the rest as read. Of a delivery over by then, such a body shows no
    driver (none is active any more) and no handoff code."""
    delivery = Delivery.objects.filter(pk=delivery_id).first()
    if delivery is None:
        return None
    over = delivery.status in FINAL_STATUSES
    if status is not None and status != delivery.status:
        delivery.status = status  # (in memory only: this body's view)
    body = tracking_message(delivery, kind=kind)
    if over:
        body.pop("handoffCode", None)
    return body
