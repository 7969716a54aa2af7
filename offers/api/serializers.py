from rest_framework import serializers

from common.fields import StrictDateTimeField, StrictIntegerField, StrictUUIDField
from common.representation import OmitNone
from common.validation import PlainValidation
from offers.models import OfferStatus, RejectionReason
from offers.services import MAX_EXPIRES_SECONDS, MIN_EXPIRES_SECONDS


class LatLonSerializer(serializers.Serializer):
    lat = serializers.FloatField()
    lon = serializers.FloatField()


class OfferPayloadSerializer(serializers.Serializer):
    pickupLocation = LatLonSerializer()
    pickupStoreName = serializers.CharField()
    estimatedPickupTimeMin = serializers.IntegerField()
    estimatedDeliveryTime = serializers.DateTimeField()
    estimatedDistanceKm = serializers.FloatField()
    estimatedEarning = serializers.FloatField()


class OfferCreateSerializer(serializers.Serializer):
    driverId = StrictUUIDField()
    expiresInSeconds = StrictIntegerField(min_value=MIN_EXPIRES_SECONDS, max_value=MAX_EXPIRES_SECONDS, required=False)


class OfferCreatedSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    offerId = serializers.UUIDField()
    expiresAt = serializers.DateTimeField()
    payload = OfferPayloadSerializer()


class _ReasonField(serializers.CharField):
    """The rejection reason: null until the offer is rejected (the seed's nullable column; it
    read "" for every other offer)."""

    def __init__(self, **kwargs):
        super().__init__(allow_null=True, **kwargs)

    def to_representation(self, value):
        return value or None


class OfferSerializer(OmitNone, serializers.Serializer):
    omit_when_none = ("responseTimeMs",)

    id = serializers.UUIDField()
    deliveryId = serializers.UUIDField(source="delivery_id")
    driverId = serializers.UUIDField(source="driver_id")
    status = serializers.ChoiceField(choices=OfferStatus.choices)
    payload = OfferPayloadSerializer(source="offer_payload")
    createdAt = serializers.DateTimeField(source="created_at")
    expiresAt = serializers.DateTimeField(source="expires_at")
    acceptedAt = serializers.DateTimeField(source="accepted_at", allow_null=True)
    rejectedAt = serializers.DateTimeField(source="rejected_at", allow_null=True)
    rejectionReason = _ReasonField(source="rejection_reason")
    responseTimeMs = serializers.IntegerField(source="driver_response_time_ms", required=False,
                                              help_text="Once the driver answered (accepted or rejected); absent before.")
    notificationSentAt = serializers.DateTimeField(source="notification_sent_at", allow_null=True)
    notificationMethod = serializers.CharField(source="notification_method")


class OfferListQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=OfferStatus.choices, required=False)


class AcceptSerializer(PlainValidation, serializers.Serializer):
    acceptedAt = StrictDateTimeField(required=False, help_text="The device's time; response time uses the server clock.")


class AcceptResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    assignmentId = serializers.UUIDField()
    deliveryId = serializers.UUIDField()
    driverId = serializers.UUIDField()
    responseTimeMs = serializers.IntegerField()


class RejectSerializer(serializers.Serializer):
    reason = serializers.ChoiceField(choices=RejectionReason.choices, required=False, default=RejectionReason.OTHER)


class RejectResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    nextOfferId = serializers.UUIDField(required=False)
    reason = serializers.CharField()


class DispatchResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    deliveryId = serializers.UUIDField()
    outcome = serializers.ChoiceField(choices=["offered", "unassigned"])
    offerId = serializers.UUIDField(allow_null=True)
    driverId = serializers.UUIDField(allow_null=True)
    failureReason = serializers.CharField(allow_null=True)
    searchRadiusKm = serializers.FloatField(allow_null=True)
    candidates = serializers.IntegerField()


class ReassignResponseSerializer(DispatchResponseSerializer):
    previousDriverId = serializers.UUIDField(allow_null=True)
