from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from common.fields import PointField, QueryIntegerField, StrictCharField, StrictIntegerField, StrictUUIDField
from escalation.models import (
    MAX_ESCALATION_LEVEL,
    CommentKind,
    EscalationStatus,
    FailureReason,
    TicketPriority,
    TicketStatus,
    TicketType,
)
from escalation.selectors import ACTIVE, ALL, OPEN, RESOLVED

# ------------------------------------------------------------------------- unassigned orders


class UnassignedOrderSerializer(serializers.Serializer):
    """Seed: GetUnassignedOrdersResponse.orders[] (plus notificationSentAt, resolvedAt)."""

    id = serializers.UUIDField()
    deliveryId = serializers.UUIDField(source="delivery_id")
    sellerOrderId = serializers.CharField(source="seller_order_id")
    location = PointField(allow_null=True)
    failureReason = serializers.ChoiceField(source="failure_reason", choices=FailureReason.choices)
    firstAttemptAt = serializers.DateTimeField(source="first_attempt_at")
    lastAttemptAt = serializers.DateTimeField(source="last_attempt_at")
    attemptCount = serializers.IntegerField(source="attempt_count")
    escalationLevel = serializers.IntegerField(source="escalation_level")
    escalationStatus = serializers.ChoiceField(source="escalation_status", choices=EscalationStatus.choices)
    supportTicketId = serializers.CharField(source="support_ticket_id", required=False)
    notificationSentAt = serializers.DateTimeField(source="notification_sent_at", allow_null=True)
    resolvedAt = serializers.DateTimeField(source="resolved_at", allow_null=True)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if not data.get("supportTicketId"):
            data.pop("supportTicketId", None)  # optional in the seed: absent until a ticket exists
        return data


class UnassignedOrderQuerySerializer(serializers.Serializer):
    state = serializers.ChoiceField(
        choices=[OPEN, RESOLVED, ALL], default=OPEN, required=False,
        help_text="open (default): not yet resolved; resolved: assigned or cancelled; all.",
    )
    escalationLevel = QueryIntegerField(min_value=0, max_value=MAX_ESCALATION_LEVEL, required=False)
    failureReason = serializers.ChoiceField(choices=FailureReason.choices, required=False)
    escalationStatus = serializers.ChoiceField(choices=EscalationStatus.choices, required=False)


class UnassignedSummarySerializer(serializers.Serializer):
    total = serializers.IntegerField()
    byEscalationLevel = serializers.DictField(child=serializers.IntegerField())
    byFailureReason = serializers.DictField(child=serializers.IntegerField())


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": MAX_ESCALATION_LEVEL})
class EscalationLevelField(StrictIntegerField):
    """The range is checked by the escalate view/service (its own message for 0 and for 4);
    this only documents it, so a schema-valid level is never a 400 for being out of range."""


class EscalateSerializer(serializers.Serializer):
    level = EscalationLevelField(help_text="1–3, above the current level.")
    reason = StrictCharField(max_length=500)
    notes = StrictCharField(max_length=5000, required=False, allow_blank=True, default="")


class EscalateResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    escalatedAt = serializers.DateTimeField()
    newEscalationLevel = serializers.IntegerField()
    supportTicketId = serializers.CharField(required=False)


class EscalationCheckResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    checkedAt = serializers.DateTimeField()
    detected = serializers.IntegerField(help_text="Ready deliveries found waiting with no unassigned record yet.")
    escalated = serializers.DictField(child=serializers.IntegerField(), help_text="Escalations by the level reached.")
    closed = serializers.IntegerField(help_text="Open records closed because their delivery moved on.")
    skipped = serializers.IntegerField(help_text="Deliveries another worker was holding (checked next time).")
    failed = serializers.IntegerField()


# --------------------------------------------------------------------------- support tickets


class TicketSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    type = serializers.ChoiceField(choices=TicketType.choices)
    priority = serializers.ChoiceField(choices=TicketPriority.choices)
    status = serializers.ChoiceField(choices=TicketStatus.choices)
    title = serializers.CharField()
    description = serializers.CharField()
    deliveryId = serializers.UUIDField(source="delivery_id")
    sellerOrderId = serializers.CharField(source="delivery.seller_order_id")
    storeName = serializers.CharField(source="delivery.store_name")
    zoneId = serializers.UUIDField(source="delivery.zone_id", allow_null=True)
    unassignedOrderId = serializers.UUIDField(source="unassigned_order_id", allow_null=True)
    escalationLevel = serializers.IntegerField(source="unassigned_order.escalation_level", allow_null=True, default=None)
    assigneeId = serializers.UUIDField(source="assignee_id", allow_null=True)
    assigneeName = serializers.SerializerMethodField()
    resolution = serializers.CharField()
    createdAt = serializers.DateTimeField(source="created_at")
    updatedAt = serializers.DateTimeField(source="updated_at")
    takenAt = serializers.DateTimeField(source="taken_at", allow_null=True)
    resolvedAt = serializers.DateTimeField(source="resolved_at", allow_null=True)
    closedAt = serializers.DateTimeField(source="closed_at", allow_null=True)

    def get_assigneeName(self, obj) -> str | None:
        if obj.assignee_id is None:
            return None
        return obj.assignee.get_full_name() or obj.assignee.get_username()


class CommentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    ticketId = serializers.UUIDField(source="ticket_id")
    kind = serializers.ChoiceField(choices=CommentKind.choices)
    body = serializers.CharField()
    authorId = serializers.UUIDField(source="author_id", allow_null=True)
    authorName = serializers.SerializerMethodField()
    createdAt = serializers.DateTimeField(source="created_at")

    def get_authorName(self, obj) -> str | None:
        if obj.author_id is None:
            return None
        return obj.author.get_full_name() or obj.author.get_username()


class TicketDeliverySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    sellerOrderId = serializers.CharField(source="seller_order_id")
    status = serializers.CharField()
    storeName = serializers.CharField(source="store_name")
    pickupLocation = PointField(source="pickup_location")
    dropoffLocation = PointField(source="dropoff_location")
    dropoffAddress = serializers.CharField(source="dropoff_address")
    zoneId = serializers.UUIDField(source="zone_id", allow_null=True)
    readyAt = serializers.DateTimeField(source="ready_at")


class TicketDetailSerializer(TicketSerializer):
    delivery = TicketDeliverySerializer()
    unassignedOrder = UnassignedOrderSerializer(source="unassigned_order", allow_null=True)
    comments = serializers.SerializerMethodField()

    def get_comments(self, obj) -> CommentSerializer(many=True):  # type: ignore[valid-type]
        return CommentSerializer(self.context["comments"], many=True).data


class TicketQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=[ACTIVE, ALL, *TicketStatus.values], default=ACTIVE, required=False,
        help_text="active (default): open or in progress; all; or one status.",
    )
    priority = serializers.ChoiceField(choices=TicketPriority.choices, required=False)
    zoneId = serializers.UUIDField(required=False)
    escalationLevel = QueryIntegerField(min_value=0, max_value=MAX_ESCALATION_LEVEL, required=False)
    mine = serializers.BooleanField(required=False, default=False, help_text="Only tickets assigned to me.")
    unassigned = serializers.BooleanField(required=False, default=False, help_text="Only tickets nobody has taken.")


class TicketPatchSerializer(serializers.Serializer):
    """At least one of status, priority, assigneeId, resolution (an empty object is a 400).
    Moving to resolved or closed needs a resolution note, sent here or already on the ticket;
    a closed ticket is final (409)."""

    status = serializers.ChoiceField(choices=TicketStatus.choices, required=False)
    priority = serializers.ChoiceField(choices=TicketPriority.choices, required=False)
    assigneeId = StrictUUIDField(required=False, allow_null=True, help_text="An active support agent or staff user "
                                 "(else 400, `details.assigneeId`); null takes the ticket off its assignee.")
    resolution = StrictCharField(max_length=5000, required=False, allow_blank=True)

    def validate(self, attrs):
        if not attrs:
            raise serializers.ValidationError("Send at least one of status, priority, assigneeId, resolution.")
        return attrs


class TicketPatchSchema(OpenApiSerializerExtension):
    """The schema says what `validate` does: at least one of the fields (anyOf)."""

    target_class = TicketPatchSerializer

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["anyOf"] = [{"required": [name]} for name in TicketPatchSerializer._declared_fields]
        return schema


class CommentCreateSerializer(serializers.Serializer):
    body = StrictCharField(max_length=5000)
