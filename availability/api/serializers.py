from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from availability.models import SETTABLE_AVAILABILITY_CHOICES, DriverAvailability
from common.fields import FiniteFloatField, StrictCharField, StrictDateTimeField, StrictIntegerField

# How far in the future a device clock may be before a fix is refused.
MAX_CLOCK_SKEW = timedelta(seconds=30)


class TakeBreakSerializer(serializers.Serializer):
    durationMinutes = StrictIntegerField(min_value=1, max_value=240)
    reason = StrictCharField(max_length=255, required=False, allow_blank=True, default="")


class TakeBreakResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    status = serializers.ChoiceField(choices=["on_break"])
    breakUntil = serializers.DateTimeField()
    driverId = serializers.UUIDField()


class StatusResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    status = serializers.ChoiceField(choices=DriverAvailability.choices)
    driverId = serializers.UUIDField()


class OverrideSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=SETTABLE_AVAILABILITY_CHOICES)
    reason = StrictCharField(max_length=255)
    durationMinutes = StrictIntegerField(
        min_value=1, max_value=24 * 60, required=False,
        help_text="Required when `state` is on_break (else 400, `details.durationMinutes`); ignored otherwise.",
    )

    def validate(self, attrs):
        if attrs["state"] == DriverAvailability.ON_BREAK and not attrs.get("durationMinutes"):
            raise serializers.ValidationError({"durationMinutes": ["Required when the state is on_break."]})
        return attrs


class OverrideResponseSerializer(StatusResponseSerializer):
    until = serializers.DateTimeField(allow_null=True)


class HistoryEntrySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    fromState = serializers.CharField(source="from_state")
    toState = serializers.CharField(source="to_state")
    reason = serializers.CharField()
    actorId = serializers.UUIDField(source="actor_id", allow_null=True)
    actorType = serializers.CharField(source="actor_type")
    timestamp = serializers.DateTimeField()


class JsonNumberField(FiniteFloatField):
    """A finite JSON number, nothing that merely converts to one: "12.9" and true are refused."""

    default_error_messages = {"not_a_number": "Must be a number, not a string or a boolean."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("not_a_number")
        return super().to_internal_value(data)


@extend_schema_field({"type": "number", "format": "double", "minimum": 0, "maximum": 360, "exclusiveMaximum": True, "nullable": True})
class HeadingField(JsonNumberField):
    """0 ≤ heading < 360 (`validate_heading`); the schema says so."""


class LocationSerializer(serializers.Serializer):
    lat = JsonNumberField(min_value=-90, max_value=90)
    lon = JsonNumberField(min_value=-180, max_value=180)
    accuracyMeters = JsonNumberField(min_value=0, max_value=100_000, required=False, allow_null=True)
    speed = JsonNumberField(
        min_value=0, max_value=150, required=False, allow_null=True,
        help_text="metres per second, as phones report it (the customer's socket shows km/h)",
    )
    heading = HeadingField(min_value=0, required=False, allow_null=True, help_text="degrees, 0 to less than 360")
    recordedAt = StrictDateTimeField(
        required=False, help_text="When the phone took the fix; not in the future (a little clock skew is allowed). Default: now.",
    )

    def validate_heading(self, value):
        if value is not None and value >= 360:
            raise serializers.ValidationError("Must be at least 0 and less than 360.")
        return value

    def validate_recordedAt(self, value):
        if value > timezone.now() + MAX_CLOCK_SKEW:
            raise serializers.ValidationError("Must not be in the future.")
        return value


class LocationResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    accepted = serializers.BooleanField()
    driverId = serializers.UUIDField()
    recordedAt = serializers.DateTimeField()
    reason = serializers.CharField(required=False)
