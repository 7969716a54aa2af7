from __future__ import annotations

from rest_framework import serializers

from common.fields import (
    BoundedListField, SingleLineTextField, StrictBooleanField, StrictChoiceField, StrictRegexField, StrictUrlStringField,
)
from notifications.models import ALL_EVENTS, WEBHOOK_EVENT_TYPES, WebhookAttempt, WebhookEndpoint

EVENT_CHOICES = [*WEBHOOK_EVENT_TYPES, ALL_EVENTS]
EVENTS_HELP = f"Event types to receive: any of {', '.join(WEBHOOK_EVENT_TYPES)}, or [\"{ALL_EVENTS}\"] for all."
# (notifications.services.endpoint_events_clean says the same; here it is in the schema: minItems)
EVENTS_ERRORS = {"min_length": f'Subscribe to at least one event type, or ["{ALL_EVENTS}"] for all.'}


class WebhookEndpointCreateSerializer(serializers.Serializer):
    url = StrictUrlStringField(max_length=2000, help_text="http(s) URL; private, loopback and link-local targets are refused.")
    events = BoundedListField(child=StrictChoiceField(choices=EVENT_CHOICES), min_length=1, max_length=len(EVENT_CHOICES),
                              error_messages=EVENTS_ERRORS, help_text=EVENTS_HELP)
    description = SingleLineTextField(max_length=500, required=False, allow_blank=True, default="")
    active = StrictBooleanField(required=False, default=True,
                                help_text="false: made switched off (its events wait until it is switched on).")


class WebhookEndpointUpdateSerializer(serializers.Serializer):
    url = StrictUrlStringField(max_length=2000, required=False,
                               help_text="http(s) URL; private, loopback and link-local targets are refused.")
    events = BoundedListField(child=StrictChoiceField(choices=EVENT_CHOICES), min_length=1, max_length=len(EVENT_CHOICES),
                              error_messages=EVENTS_ERRORS, required=False, help_text=EVENTS_HELP)
    description = SingleLineTextField(max_length=500, required=False, allow_blank=True)
    active = StrictBooleanField(required=False, help_text="false switches the endpoint off; true switches it back on.")


class WebhookEndpointSerializer(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.CharField())
    allDeliveries = serializers.BooleanField(source="all_deliveries")
    failingSince = serializers.DateTimeField(source="failing_since", allow_null=True)
    disabledAt = serializers.DateTimeField(source="disabled_at", allow_null=True)
    disabledReason = serializers.CharField(source="disabled_reason")
    createdAt = serializers.DateTimeField(source="created_at")
    updatedAt = serializers.DateTimeField(source="updated_at")
    previousSecretExpiresAt = serializers.DateTimeField(
        source="previous_secret_expires_at", allow_null=True,
        help_text="After a rotation, until when events are signed with the previous secret too (null: never rotated).")

    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "description", "events", "active", "allDeliveries", "failingSince", "disabledAt",
                  "disabledReason", "previousSecretExpiresAt", "createdAt", "updatedAt"]


class WebhookEndpointWithSecretSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(help_text="whsec_…: shown only here; verify signatures with it (Standard Webhooks).")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = WebhookEndpointSerializer.Meta.fields + ["secret"]


class WebhookTestSerializer(serializers.Serializer):
    eventId = serializers.CharField(help_text="The webhook-id of the test event.")
    type = serializers.CharField()


class WebhookAttemptSerializer(serializers.ModelSerializer):
    eventId = serializers.SerializerMethodField()
    type = serializers.CharField(source="message.event.type")
    deliveryId = serializers.UUIDField(source="message.delivery_id", allow_null=True)
    attemptedAt = serializers.DateTimeField(source="attempted_at")
    statusCode = serializers.IntegerField(source="status_code", allow_null=True)
    durationMs = serializers.IntegerField(source="duration_ms")
    nextRetryAt = serializers.DateTimeField(source="next_retry_at", allow_null=True)
    messageStatus = serializers.CharField(source="message.status")

    class Meta:
        model = WebhookAttempt
        fields = ["id", "eventId", "type", "deliveryId", "attemptedAt", "statusCode", "durationMs", "error",
                  "nextRetryAt", "messageStatus"]

    def get_eventId(self, obj) -> str:
        return obj.message.event.webhook_id


class DeviceRegisterSerializer(serializers.Serializer):
    platform = StrictChoiceField(choices=[("android", "android"), ("ios", "ios"), ("web", "web")])
    # Printable ASCII, as FCM's tokens are; at most 2,048 bytes (the unique index on the token
    # holds ~2,700: a longer one was a 503).
    token = StrictRegexField(r"^[\x21-\x7e]+\Z", max_length=2048,
                             error_messages={"invalid": "A push token is printable ASCII without spaces."},
                             help_text="The FCM registration token of the app on this device.")


class DeviceSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    platform = serializers.CharField()
    tokenEnd = serializers.SerializerMethodField(
        help_text="The token's last characters, to tell devices apart: 8 of a real token, never more than a quarter of it.")
    createdAt = serializers.DateTimeField(source="created_at")
    lastSeenAt = serializers.DateTimeField(source="last_seen_at")

    def get_tokenEnd(self, obj) -> str:
        shown = min(8, len(obj.token) // 4)  # (a short token shown whole is no secret)
        return obj.token[-shown:] if shown else ""
