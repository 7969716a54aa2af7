from __future__ import annotations

import re

import phonenumbers
from django.conf import settings
from django.core.validators import EmailValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from audit.models import AuditEventType
from availability.models import Driver, DriverAvailability, VehicleType
from common.representation import OmitNone, PlainRepresentation
from common.validation import PlainValidation
from common.validators import ORDER_ID_MESSAGE, ORDER_ID_PATTERN, validate_order_id_chars
from common.fields import (
    MoneyField,
    NullablePointField,
    PointField,
    StrictBooleanField,
    StrictCharField,
    StrictChoiceField,
    StrictIntegerField,
    StrictRegexField,
    StrictUUIDField,
)
from dispatch.models import (
    Assignment,
    AssignmentEndReason,
    AssignmentStatus,
    Delivery,
    DeliveryProof,
    DeliveryStatus,
    FailureReason,
    ProofKind,
    ProofPolicy,
)
from dispatch.proofs import proof_signed_url

FINISHED_DELIVERY_STATUSES = (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED)

PHONE_RE = re.compile(r"^\+?[0-9 ()\-.]{4,32}$")
# validate_phone as one pattern (PHONE_RE and at least 4 digits; its length by the schema's
# maxLength), for the schema: without a lookahead, which schema fuzzers cannot generate from
# (schemathesis filtered out too many examples of POST /v2/drivers and gave up on it)
PHONE_PATTERN = r"^\+?[ ().\-]*(?:[0-9][ ().\-]*){4,32}$"
PHONE_HELP = "digits, spaces, + ( ) - . only, with at least 4 digits"


@extend_schema_field({"type": "string", "pattern": PHONE_PATTERN, "maxLength": 32, "description": PHONE_HELP})
class PhoneField(StrictCharField):
    """A phone number (`validate_phone`); the schema carries its rule."""


# A BCP 47 tag (language, then any subtags: es, pt-BR, zh-Hant-TW, en-GB-oxendict), any case.
LANGUAGE_RE = r"^[a-zA-Z]{2,3}(-[a-zA-Z0-9]{1,8})*$"


def phone_e164(value: str) -> str:
    """A possible phone number (international, or of PHONE_DEFAULT_REGION) in E.164; anything
    else the SPEC's phone rule accepted (`validate_phone`, e.g. "+1-555-0100") is kept as given.
    The SPEC takes any such string, so intake never refuses it; customer SMS go only to numbers
    that are valid (notifications/customers.py)."""
    try:
        number = phonenumbers.parse(value, settings.PHONE_DEFAULT_REGION)
    except phonenumbers.NumberParseException:
        return value
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return value
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def validate_phone(value: str) -> str:
    if not PHONE_RE.match(value) or sum(c.isdigit() for c in value) < 4:
        raise serializers.ValidationError("Enter a phone number: digits, spaces, + ( ) - . only, at least 4 digits.")
    return value


class DriverLocationSerializer(serializers.Serializer):
    lat = serializers.FloatField()
    lon = serializers.FloatField()
    accuracyMeters = serializers.FloatField(allow_null=True)
    speed = serializers.FloatField(allow_null=True)
    heading = serializers.FloatField(allow_null=True)
    recordedAt = serializers.DateTimeField(allow_null=True)


class DriverSerializer(serializers.ModelSerializer):
    vehicleType = serializers.CharField(source="vehicle_type")
    rating = serializers.FloatField()
    username = serializers.CharField(source="user.username")
    availabilityUntil = serializers.DateTimeField(source="availability_until", allow_null=True)
    availabilityReason = serializers.CharField(source="availability_reason")
    lastAvailabilityChange = serializers.DateTimeField(source="last_availability_change", allow_null=True)
    location = serializers.SerializerMethodField()
    homeLocation = PointField(source="home_location", allow_null=True)
    createdAt = serializers.DateTimeField(source="created_at")

    class Meta:
        model = Driver
        fields = [
            "id", "name", "phone", "vehicle", "vehicleType", "rating", "username", "availability",
            "availabilityUntil", "availabilityReason", "lastAvailabilityChange", "location",
            "homeLocation", "createdAt",
        ]

    def get_location(self, obj) -> DriverLocationSerializer(allow_null=True):  # type: ignore[valid-type]
        if obj.location is None:
            return None
        return {
            "lat": round(obj.location.y, 7),
            "lon": round(obj.location.x, 7),
            "accuracyMeters": obj.location_accuracy_m,
            "speed": obj.location_speed,
            "heading": obj.location_heading,
            "recordedAt": serializers.DateTimeField().to_representation(obj.location_recorded_at)
            if obj.location_recorded_at else None,
        }


class DriverCreatedSerializer(DriverSerializer):
    apiToken = serializers.SerializerMethodField()

    class Meta(DriverSerializer.Meta):
        fields = DriverSerializer.Meta.fields + ["apiToken"]

    def get_apiToken(self, obj) -> str:
        return self.context["api_token"]


class DriverCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=200)
    phone = PhoneField(max_length=32, validators=[validate_phone])
    vehicle = StrictCharField(max_length=200)
    vehicleType = serializers.ChoiceField(choices=VehicleType.choices, required=False, default=VehicleType.CAR)
    username = StrictRegexField(r"^[\w.@+-]{3,150}$", max_length=150, required=False)
    homeLocation = PointField(required=False)


class DriverListQuerySerializer(serializers.Serializer):
    availability = serializers.ChoiceField(choices=DriverAvailability.choices, required=False)
    zone = serializers.UUIDField(
        required=False, help_text="Only drivers whose last known location lies in this zone (an unknown zone is a 404)."
    )


class DeliveryCreateSerializer(PlainValidation, serializers.Serializer):
    sellerOrderId = StrictRegexField(
        ORDER_ID_PATTERN, max_length=255, help_text="Looked up by URL later (`/v2/orders/{sellerOrderId}/…`) and "
        "read by people: no control or format characters (bidirectional-text controls, zero-width and invisible "
        "characters), line separators or U+FFFD; a slash is fine (%2F in a URL).",
        error_messages={"invalid": ORDER_ID_MESSAGE}, validators=[validate_order_id_chars],
    )
    sellerId = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    storeName = StrictCharField(max_length=255)
    pickupLocation = PointField()
    dropoffLocation = PointField()
    dropoffAddress = StrictCharField(max_length=500, required=False, allow_blank=True, default="")
    customerName = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    customerPhone = PhoneField(
        max_length=32, required=False, allow_blank=True, default="",
        help_text="International (+…) or in PHONE_DEFAULT_REGION's format; a possible number is stored as E.164, "
        "anything else matching the pattern as given (customer SMS go to valid numbers only)",
    )
    customerEmail = StrictCharField(max_length=254, required=False, allow_blank=True, default="", validators=[EmailValidator()])
    customerLanguage = StrictRegexField(
        LANGUAGE_RE, max_length=16, required=False, allow_blank=True, default="",
        help_text="The customer's language for messages, a BCP 47 tag in any case, e.g. en, es, pt-BR, zh-Hant-TW "
        "(default English; a tag without templates falls back to its base language, then English)",
    )
    prepTimeMinutes = StrictIntegerField(min_value=0, max_value=240, required=False, default=0)
    deliveryFee = MoneyField(
        required=False, allow_null=True, default=None,
        help_text="An amount of money: a JSON number, or a decimal string (exact) such as \"49.50\"; at most two "
        "decimal places either way (a number with more is a 400, not rounded). Not with quoteId (400). Omitted: "
        "the pricing rule's fee for the leg.",
    )
    autoDispatch = StrictBooleanField(required=False, default=True)
    proofRequired = StrictChoiceField(
        choices=ProofPolicy.choices, required=False,
        help_text="Proof the driver must give to complete it: none; code (the customer's 4-digit handoff code, "
        "shown on the customer's status and tracking page and in the customer's messages); photo or signature "
        "(uploaded by the driver while in transit, POST /v2/drivers/{id}/deliveries/{deliveryId}/proof); "
        "code_or_photo (either). Omitted: the zone's policy, else DEFAULT_PROOF_POLICY (none).",
    )
    quoteId = StrictUUIDField(
        required=False,
        help_text="A serviceable quote of yours (POST /v2/quotes) for the same pickupLocation and dropoffLocation: "
        "the delivery gets the fee it locked. Not with deliveryFee (400); unknown or for other places: 400; "
        "expired or already used: 409.",
    )

    def validate_customerPhone(self, value):
        return phone_e164(validate_phone(value)) if value else value

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if attrs.get("quoteId") and attrs.get("deliveryFee") is not None:
            raise serializers.ValidationError({"deliveryFee": ["Leave it out with quoteId: the quote sets the fee."]})
        return attrs


class DeliverySerializer(PlainRepresentation, serializers.ModelSerializer):
    """Rendered by `PlainRepresentation` (fields built once per class, not per delivery)."""

    sellerOrderId = serializers.CharField(source="seller_order_id")
    sellerId = serializers.CharField(source="seller_id")
    storeName = serializers.CharField(source="store_name")
    pickupLocation = PointField(source="pickup_location")
    dropoffLocation = NullablePointField(
        source="dropoff_location", allow_null=True,
        help_text="null for a driver whose assignment of this delivery has ended (customer data)",
    )
    dropoffAddress = serializers.CharField(source="dropoff_address")
    customerName = serializers.CharField(source="customer_name")
    customerPhone = serializers.CharField(source="customer_phone")
    customerEmail = serializers.CharField(source="customer_email")
    customerLanguage = serializers.CharField(source="customer_language")
    prepTimeMinutes = serializers.IntegerField(source="prep_time_minutes")
    deliveryFee = serializers.DecimalField(source="delivery_fee", max_digits=10, decimal_places=2, allow_null=True)
    zoneId = serializers.SerializerMethodField()
    driverId = serializers.SerializerMethodField(
        help_text="The driver of the active assignment; for a delivered, failed or cancelled delivery, of the "
        "assignment it ended with. null while it waits for a driver.",
    )
    assignmentId = serializers.SerializerMethodField(help_text="The assignment behind driverId (same rule).")
    trackingUrl = serializers.SerializerMethodField()
    offerAcceptanceCount = serializers.IntegerField(source="offer_acceptance_count")
    currentOfferId = serializers.UUIDField(source="current_offer_id", allow_null=True)
    acceptedOfferId = serializers.UUIDField(source="accepted_offer_id", allow_null=True)
    failureReason = serializers.CharField(source="failure_reason")
    cancellationReason = serializers.CharField(source="cancellation_reason")
    failureCode = serializers.ChoiceField(
        source="failure_code", choices=FailureReason.choices, allow_null=True,
        help_text="A failed delivery's reason as a code (free text given as reason: other); null otherwise.",
    )
    failureNote = serializers.CharField(source="failure_note", help_text="A failed delivery's note from the driver.")
    proofRequired = serializers.ChoiceField(source="proof_required", choices=ProofPolicy.choices)
    handoffCodeFailures = serializers.IntegerField(
        source="handoff_code_failures", help_text="Wrong handoff codes given since the last reset (the code itself is never here)."
    )
    handoffCodeLockedAt = serializers.DateTimeField(
        source="handoff_code_locked_at", allow_null=True,
        help_text="When the 5th wrong code flagged it for ops; codes are refused (409) until ops reset it.",
    )
    geofenceOverrideReason = serializers.SerializerMethodField(
        help_text="Set when the driver completed it away from the drop-off (farther than DROPOFF_GEOFENCE_METERS, or "
        "with no recent location) giving this overrideReason; null otherwise.",
    )
    geofenceOverrideDistanceMeters = serializers.IntegerField(
        source="geofence_override_distance_m", allow_null=True,
        help_text="With geofenceOverrideReason: metres from the drop-off of the driver's latest location at completion "
        "(null: no recent location, or no override).",
    )
    createdAt = serializers.DateTimeField(source="created_at")
    readyAt = serializers.DateTimeField(source="ready_at")
    assignedAt = serializers.DateTimeField(source="assigned_at", allow_null=True)
    pickupStartedAt = serializers.DateTimeField(source="pickup_started_at", allow_null=True)
    pickedUpAt = serializers.DateTimeField(source="picked_up_at", allow_null=True)
    inTransitAt = serializers.DateTimeField(source="in_transit_at", allow_null=True)
    deliveredAt = serializers.DateTimeField(source="delivered_at", allow_null=True)
    failedAt = serializers.DateTimeField(source="failed_at", allow_null=True)
    cancelledAt = serializers.DateTimeField(source="cancelled_at", allow_null=True)
    updatedAt = serializers.DateTimeField(source="updated_at")

    class Meta:
        model = Delivery
        fields = [
            "id", "sellerOrderId", "sellerId", "storeName", "status", "zoneId", "pickupLocation",
            "dropoffLocation", "dropoffAddress", "customerName", "customerPhone", "customerEmail",
            "customerLanguage", "prepTimeMinutes",
            "deliveryFee", "driverId", "assignmentId", "trackingUrl", "offerAcceptanceCount", "currentOfferId", "acceptedOfferId",
            "failureReason", "failureCode", "failureNote", "cancellationReason", "proofRequired", "handoffCodeFailures", "handoffCodeLockedAt",
            "geofenceOverrideReason", "geofenceOverrideDistanceMeters", "createdAt", "readyAt", "assignedAt",
            "pickupStartedAt", "pickedUpAt", "inTransitAt", "deliveredAt", "failedAt", "cancelledAt",
            "updatedAt",
        ]

    # What a driver sees of the customer only while its own assignment is active.
    CUSTOMER_FIELDS = {
        "customerName": "", "customerPhone": "", "customerEmail": "", "dropoffAddress": "", "dropoffLocation": None,
    }

    def to_representation(self, obj):
        data = super().to_representation(obj)
        data["failureCode"] = data["failureCode"] or None
        viewer = self.context.get("viewing_driver_id")
        if viewer is not None:
            shown = self._shown(obj)
            if shown is None or shown.driver_id != viewer:  # someone else's assignment (or none)
                data["driverId"] = data["assignmentId"] = None
            if shown is None or shown.driver_id != viewer or shown.status != AssignmentStatus.ACTIVE:
                data.update(self.CUSTOMER_FIELDS)  # a past job: the delivery stays in the history, its customer does not
        return data

    def _latest(self, obj):
        latest = getattr(obj, "latest_assignments", None)
        if latest is None:
            latest = list(obj.assignments.order_by("-created_at", "-id")[:1])
            obj.latest_assignments = latest
        return latest[0] if latest else None

    def _shown(self, obj):
        """The assignment behind `driverId`/`assignmentId`: the active one, or the one a
        finished delivery (delivered, failed, cancelled while assigned) ended with. Not one ops
        took away (reassigned): that delivery waits for a driver."""
        latest = self._latest(obj)
        if latest is None or latest.status == AssignmentStatus.ACTIVE:
            return latest
        if obj.status in FINISHED_DELIVERY_STATUSES and latest.end_reason != "reassigned":
            return latest
        return None

    def get_geofenceOverrideReason(self, obj) -> serializers.CharField(allow_null=True):  # type: ignore[valid-type]
        return obj.geofence_override_reason or None

    def get_zoneId(self, obj) -> serializers.UUIDField(allow_null=True):  # type: ignore[valid-type]
        zone_id = getattr(obj, "zone_id", None)
        return str(zone_id) if zone_id else None

    def get_driverId(self, obj) -> serializers.UUIDField(allow_null=True):  # type: ignore[valid-type]
        a = self._shown(obj)
        return str(a.driver_id) if a else None

    def get_assignmentId(self, obj) -> serializers.UUIDField(allow_null=True):  # type: ignore[valid-type]
        a = self._shown(obj)
        return str(a.pk) if a else None

    def get_trackingUrl(self, obj) -> serializers.URLField(allow_null=True):  # type: ignore[valid-type]
        # The tracking link carries the customer's token: for the seller and ops, not drivers.
        return None if self.context.get("hide_tracking") else obj.tracking_url


class ProofSerializer(serializers.ModelSerializer):
    """A photo or signature of a delivery. `url` is signed and works for PROOF_URL_TTL_SECONDS;
    it is given to ops and the delivery's owner only (null for drivers)."""

    deliveryId = serializers.UUIDField(source="delivery_id")
    driverId = serializers.UUIDField(source="driver_id")
    kind = serializers.ChoiceField(choices=ProofKind.choices)
    note = serializers.CharField()
    contentType = serializers.ChoiceField(source="content_type", choices=["image/jpeg", "image/png", "image/webp"])
    sizeBytes = serializers.IntegerField(source="size_bytes", help_text="of the stored (re-encoded) file")
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    deliveryStatus = serializers.ChoiceField(
        source="delivery_status", choices=DeliveryStatus.choices, help_text="The delivery's status when it was added."
    )
    createdAt = serializers.DateTimeField(source="created_at")
    url = serializers.SerializerMethodField(
        help_text="Signed URL of the file (expires after PROOF_URL_TTL_SECONDS); null for drivers."
    )

    class Meta:
        model = DeliveryProof
        fields = [
            "id", "deliveryId", "driverId", "kind", "note", "contentType", "sizeBytes", "width", "height",
            "deliveryStatus", "createdAt", "url",
        ]

    def get_url(self, obj) -> serializers.URLField(allow_null=True):  # type: ignore[valid-type]
        if not self.context.get("proof_urls"):
            return None
        return proof_signed_url(obj, request=self.context.get("request"))


class ProofUploadSerializer(serializers.Serializer):
    kind = StrictChoiceField(choices=ProofKind.choices)
    file = serializers.FileField(
        help_text="A JPEG, PNG or WebP image (judged by content), at most PROOF_MAX_BYTES (5 MB: larger is a 413) "
        "and PROOF_MAX_PIXELS pixels. Stored re-encoded, without EXIF/GPS or any other metadata.",
    )
    note = StrictCharField(max_length=1000, required=False, allow_blank=True, default="")

    def validate(self, attrs):
        # One proof per request: a second `file` part would otherwise be dropped without a word
        # (and `kind`/`note` given twice keep only one value the same way).
        data = self.initial_data
        if hasattr(data, "getlist"):
            repeated = [name for name in ("file", "kind", "note") if len(data.getlist(name)) > 1]
            if repeated:
                raise serializers.ValidationError({name: ["Give exactly one."] for name in repeated})
        return attrs


class DeliveryListQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=DeliveryStatus.choices, required=False)
    sellerOrderId = serializers.CharField(max_length=255, required=False)


class ReasonSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=500)


class DeliveryStepSerializer(PlainValidation, serializers.Serializer):
    reason = StrictCharField(
        max_length=500, required=False, allow_blank=True, default="",
        help_text="delivery-failed (required, non-empty): one of " + ", ".join(FailureReason.values) + "; any other "
        "text is accepted as `other` with the text as its note (failureCode, failureNote). Ignored by the other steps.",
    )
    note = StrictCharField(
        max_length=1000, required=False, allow_blank=True, default="",
        help_text="delivery-failed: what happened, in the driver's words. Ignored by the other steps.",
    )
    handoffCode = StrictRegexField(
        r"^[0-9]{4}$", max_length=4, required=False, default="",
        help_text="delivery-completed of a delivery whose proofRequired is code: the customer's 4-digit code "
        "(missing or wrong: 400, details.handoffCode; after 5 wrong codes 409 until ops reset it); code_or_photo: "
        "the code unless a photo was uploaded in transit (neither: 409). Ignored otherwise.",
    )
    overrideReason = StrictRegexField(
        r"\S", max_length=500, required=False,
        help_text="delivery-completed: why the driver completes it away from the drop-off. Without it, completing "
        "farther than DROPOFF_GEOFENCE_METERS (when set; default 0: off) from the drop-off by the driver's latest location, or "
        "with no location in the last DRIVER_STALE_AFTER_SECONDS, is a 409 naming the distance "
        "(details.distanceMeters, null when unknown; details.limitMeters). With it the delivery is completed and "
        "flagged (geofenceOverrideReason, geofenceOverrideDistanceMeters) and audited (geofence_override). Not "
        "recorded within the geofence; ignored by the other steps. Not blank (leading and trailing spaces are dropped).",
    )


class AuditEventSerializer(OmitNone, serializers.Serializer):
    omit_when_none = ("actorId",)

    id = serializers.UUIDField()
    timestamp = serializers.DateTimeField()
    eventType = serializers.CharField(source="event_type")
    actorId = serializers.UUIDField(source="actor_id", required=False, help_text="Absent for the system's own events.")
    actorType = serializers.CharField(source="actor_type")
    details = serializers.JSONField()
    version = serializers.IntegerField()


class AuditQuerySerializer(serializers.Serializer):
    eventType = serializers.ChoiceField(choices=AuditEventType.choices, required=False)


class AssignmentSerializer(serializers.ModelSerializer):
    deliveryId = serializers.UUIDField(source="delivery_id")
    driverId = serializers.UUIDField(source="driver_id")
    offerId = serializers.UUIDField(source="offer_id", allow_null=True, help_text="null when ops assigned the driver directly")
    status = serializers.ChoiceField(choices=AssignmentStatus.choices)
    startedAt = serializers.DateTimeField(source="created_at")
    endedAt = serializers.DateTimeField(source="ended_at", allow_null=True)
    endReason = serializers.ChoiceField(
        source="ended_because", choices=AssignmentEndReason.choices, allow_null=True,
        help_text="Why it ended: completed, failed, reassigned (ops took the delivery away) or cancelled "
        "(the delivery was). null while active.",
    )

    class Meta:
        model = Assignment
        fields = ["id", "deliveryId", "driverId", "offerId", "status", "startedAt", "endedAt", "endReason"]


class QuoteCreateSerializer(serializers.Serializer):
    pickupLocation = PointField()
    dropoffLocation = PointField()
    prepTimeMinutes = StrictIntegerField(min_value=0, max_value=240, required=False, default=0)


class QuoteReasonSerializer(serializers.Serializer):
    code = serializers.ChoiceField(choices=["outside_zones", "distance_exceeded"])
    field = serializers.CharField(help_text="the request field it is about")
    message = serializers.CharField()


class QuoteSerializer(serializers.Serializer):
    quoteId = serializers.UUIDField(
        allow_null=True, help_text="Pass to POST /v2/deliveries as quoteId to get deliveryFee; null when not serviceable.",
    )
    expiresAt = serializers.DateTimeField(allow_null=True, help_text="Until when quoteId holds the fee.")
    serviceable = serializers.BooleanField()
    reasons = QuoteReasonSerializer(many=True, help_text="Why not serviceable (empty when serviceable).")
    zoneId = serializers.UUIDField(allow_null=True)
    distanceKm = serializers.FloatField(help_text="great-circle pickup to drop-off")
    estimatedPickupAt = serializers.DateTimeField(allow_null=True, help_text="null when no driver is available nearby")
    estimatedDeliveryAt = serializers.DateTimeField(allow_null=True)
    deliveryFee = serializers.DecimalField(max_digits=10, decimal_places=2, coerce_to_string=False)
    availableDriversNearby = serializers.IntegerField()

    @staticmethod
    def from_result(result) -> dict:
        service = result.serviceability
        return {
            "quoteId": result.quote.pk if result.quote else None,
            "expiresAt": result.quote.expires_at if result.quote else None,
            "serviceable": service.serviceable,
            "reasons": [{"code": r.code, "field": r.field, "message": r.message} for r in service.reasons],
            "zoneId": service.zone.pk if service.zone else None,
            "distanceKm": round(service.distance_km, 3),
            "estimatedPickupAt": result.estimated_pickup_at,
            "estimatedDeliveryAt": result.estimated_delivery_at,
            "deliveryFee": result.delivery_fee,
            "availableDriversNearby": result.drivers_nearby,
        }
