import uuid

from django.db import models
from django.db.models import Func, Value


class NextVal(Func):
    function = "nextval"
    output_field = models.BigIntegerField()


class AuditEventType(models.TextChoices):
    CREATED = "created"
    ASSIGNMENT_STARTED = "assignment_started"
    DRIVER_CANDIDATES_FOUND = "driver_candidates_found"
    DRIVER_OFFER_SENT = "driver_offer_sent"
    DRIVER_ACCEPTED = "driver_accepted"
    DRIVER_REJECTED = "driver_rejected"
    OFFER_EXPIRED = "offer_expired"
    OFFER_CANCELLED = "offer_cancelled"
    DRIVER_ASSIGNED = "driver_assigned"
    ASSIGNMENT_REASSIGNED = "assignment_reassigned"
    PICKUP_STARTED = "pickup_started"
    PICKUP_COMPLETED = "pickup_completed"
    DELIVERY_STARTED = "delivery_started"
    DELIVERY_COMPLETED = "delivery_completed"
    DELIVERY_FAILED = "delivery_failed"
    DELIVERY_CANCELLED = "delivery_cancelled"
    ESCALATION_TRIGGERED = "escalation_triggered"
    ESCALATION_CRITICAL = "escalation_critical"
    SUPPORT_TICKET_UPDATED = "support_ticket_updated"
    HANDOFF_CODE_FAILED = "handoff_code_failed"
    HANDOFF_CODE_RESET = "handoff_code_reset"
    GEOFENCE_OVERRIDE = "geofence_override"
    PROOF_ADDED = "proof_added"


class DeliveryAuditLog(models.Model):
    """Append-only: a database trigger rejects UPDATE and DELETE (migration 0002)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.PROTECT, related_name="audit_logs")
    timestamp = models.DateTimeField()
    event_type = models.CharField(max_length=50, choices=AuditEventType.choices)
    actor_id = models.UUIDField(null=True, blank=True)
    actor_type = models.CharField(max_length=20, blank=True, default="")
    details = models.JSONField(default=dict)
    version = models.PositiveIntegerField(default=1)
    # Insertion order, from a database sequence: several rows written in one transaction share
    # a timestamp, and the timeline must still read in the order things happened.
    seq = models.BigIntegerField(db_default=NextVal(Value("delivery_audit_logs_seq")), editable=False)

    class Meta:
        db_table = "delivery_audit_logs"
        ordering = ["timestamp", "seq"]
        indexes = [
            models.Index(fields=["delivery", "timestamp"], name="idx_delivery_timestamp"),
            models.Index(fields=["event_type"], name="idx_event_type"),
            models.Index(fields=["actor_type"], name="idx_audit_actor_type"),
            models.Index(fields=["timestamp"], name="idx_timestamp"),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.event_type}"
