"""Live events of offers (seed: Driver Offer Events)."""
from typing import Literal, TypedDict

from common.errors import iso


class LatLon(TypedDict):
    lat: float
    lon: float


class OfferPayload(TypedDict):
    pickupLocation: LatLon
    pickupStoreName: str
    estimatedPickupTimeMin: int
    estimatedDeliveryTime: str
    estimatedDistanceKm: float
    estimatedEarning: float


class OfferCreatedEvent(TypedDict):
    type: Literal["offer_created"]
    offerId: str
    deliveryId: str
    payload: OfferPayload
    expiresAt: str
    createdAt: str


class OfferAcceptedEvent(TypedDict):
    type: Literal["offer_accepted"]
    offerId: str
    driverId: str
    deliveryId: str
    responseTimeMs: int
    assignmentId: str
    acceptedAt: str


class OfferRejectedEvent(TypedDict):
    type: Literal["offer_rejected"]
    offerId: str
    driverId: str
    deliveryId: str
    reason: str
    rejectedAt: str


class OfferExpiredEvent(TypedDict):
    type: Literal["offer_expired"]
    offerId: str
    driverId: str
    deliveryId: str
    expiresAt: str


class OfferCancelledEvent(TypedDict):
    """Not in the seed: the offer was withdrawn (driver went unavailable, delivery cancelled,
    another driver of its batch/broadcast round accepted: reason `taken_by_another_driver`)."""

    type: Literal["offer_cancelled"]
    offerId: str
    driverId: str
    deliveryId: str
    reason: str
    cancelledAt: str


EVENT_TYPES = ("offer_created", "offer_accepted", "offer_rejected", "offer_expired", "offer_cancelled")


def offer_created(offer) -> OfferCreatedEvent:
    return {
        "type": "offer_created",
        "offerId": str(offer.pk),
        "deliveryId": str(offer.delivery_id),
        "payload": offer.offer_payload,
        "expiresAt": iso(offer.expires_at),
        "createdAt": iso(offer.created_at),
    }


def offer_accepted(offer, *, assignment_id) -> OfferAcceptedEvent:
    return {
        "type": "offer_accepted",
        "offerId": str(offer.pk),
        "driverId": str(offer.driver_id),
        "deliveryId": str(offer.delivery_id),
        "responseTimeMs": offer.driver_response_time_ms,
        "assignmentId": str(assignment_id),
        "acceptedAt": iso(offer.accepted_at),
    }


def offer_rejected(offer) -> OfferRejectedEvent:
    return {
        "type": "offer_rejected",
        "offerId": str(offer.pk),
        "driverId": str(offer.driver_id),
        "deliveryId": str(offer.delivery_id),
        "reason": offer.rejection_reason,
        "rejectedAt": iso(offer.rejected_at),
    }


def offer_expired(offer) -> OfferExpiredEvent:
    return {
        "type": "offer_expired",
        "offerId": str(offer.pk),
        "driverId": str(offer.driver_id),
        "deliveryId": str(offer.delivery_id),
        "expiresAt": iso(offer.expires_at),
    }


def offer_cancelled(offer) -> OfferCancelledEvent:
    return {
        "type": "offer_cancelled",
        "offerId": str(offer.pk),
        "driverId": str(offer.driver_id),
        "deliveryId": str(offer.delivery_id),
        "reason": offer.cancellation_reason,
        "cancelledAt": iso(offer.cancelled_at),
    }
