"""Live events of deliveries, for `/ws/ops/` and the delivery's own group."""

from typing import Literal, NotRequired, TypedDict

from common.errors import iso
from common.fields import point_json


class LatLon(TypedDict):
    lat: float
    lon: float


class DeliveryCreatedEvent(TypedDict):
    type: Literal["delivery_created"]
    deliveryId: str
    sellerOrderId: str
    storeName: str
    status: str
    zoneId: str | None
    pickupLocation: LatLon
    dropoffLocation: LatLon
    createdAt: str


class DeliveryStatusChangedEvent(TypedDict):
    type: Literal["delivery_status_changed"]
    deliveryId: str
    sellerOrderId: str
    fromStatus: str
    status: str
    driverId: str | None
    previousDriverId: NotRequired[str]  # ready again: the driver ops took it from
    reason: NotRequired[str]
    changedAt: str


class DeliveryCancelledEvent(TypedDict):
    type: Literal["delivery_cancelled"]
    deliveryId: str
    sellerOrderId: str
    fromStatus: str
    driverId: str | None  # the driver who had it (None: nobody had taken it)
    reason: str
    cancelledAt: str


def delivery_created(delivery) -> DeliveryCreatedEvent:
    return {
        "type": "delivery_created",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "storeName": delivery.store_name,
        "status": delivery.status,
        "zoneId": str(delivery.zone_id) if getattr(delivery, "zone_id", None) else None,
        "pickupLocation": point_json(delivery.pickup_location),
        "dropoffLocation": point_json(delivery.dropoff_location),
        "createdAt": iso(delivery.created_at),
    }


def delivery_status_changed(delivery, *, from_status: str, driver_id, changed_at, reason: str = "",
                            previous_driver_id=None) -> DeliveryStatusChangedEvent:
    event: DeliveryStatusChangedEvent = {
        "type": "delivery_status_changed",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "fromStatus": from_status,
        "status": delivery.status,
        "driverId": str(driver_id) if driver_id else None,
        "changedAt": iso(changed_at),
    }
    if previous_driver_id:
        event["previousDriverId"] = str(previous_driver_id)
    if reason:
        event["reason"] = reason
    return event


def delivery_cancelled(delivery, *, from_status: str, driver_id, reason: str, cancelled_at) -> DeliveryCancelledEvent:
    return {
        "type": "delivery_cancelled",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "fromStatus": from_status,
        "driverId": str(driver_id) if driver_id else None,
        "reason": reason,
        "cancelledAt": iso(cancelled_at),
    }


class AssignmentCancelledEvent(TypedDict):
    """To the driver (`/ws/drivers/<id>/` and a push) and ops: a delivery they carry was taken
    away from them, cancelled (`reason` "delivery_cancelled") or given back to dispatch by ops
    ("reassigned"). With order stacking the driver may stay busy with others, so this is the one
    event that tells them to drop this one."""

    type: Literal["assignment_cancelled"]
    assignmentId: str
    deliveryId: str
    driverId: str
    reason: Literal["delivery_cancelled", "reassigned"]
    cancelledAt: str


def assignment_cancelled(assignment) -> AssignmentCancelledEvent:
    return {
        "type": "assignment_cancelled",
        "assignmentId": str(assignment.pk),
        "deliveryId": str(assignment.delivery_id),
        "driverId": str(assignment.driver_id),
        "reason": assignment.end_reason,
        "cancelledAt": iso(assignment.ended_at),
    }


class DeliveryProofAddedEvent(TypedDict):
    """The assigned driver uploaded a photo or signature (to ops, and merchants as
    `delivery.proof_added`; never to the customer's socket, and never with a file URL)."""

    type: Literal["delivery_proof_added"]
    deliveryId: str
    sellerOrderId: str
    proofId: str
    kind: str
    driverId: str
    deliveryStatus: str
    note: NotRequired[str]
    addedAt: str


def delivery_proof_added(delivery, proof) -> DeliveryProofAddedEvent:
    event: DeliveryProofAddedEvent = {
        "type": "delivery_proof_added",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "proofId": str(proof.pk),
        "kind": proof.kind,
        "driverId": str(proof.driver_id),
        "deliveryStatus": proof.delivery_status,
        "addedAt": iso(proof.created_at),
    }
    if proof.note:
        event["note"] = proof.note
    return event


EVENT_TYPES = (
    "delivery_created", "delivery_status_changed", "delivery_cancelled", "delivery_proof_added", "assignment_cancelled",
)
