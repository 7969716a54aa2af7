import uuid

from django.contrib.gis.db import models
from django.db.models import Q


class FailureReason(models.TextChoices):
    NO_AVAILABLE_DRIVERS = "no_available_drivers"
    ALL_DRIVERS_BUSY = "all_drivers_busy"
    DISTANCE_EXCEEDED = "distance_exceeded"
    REDIS_TIMEOUT = "redis_timeout"
    ZONE_EMPTY = "zone_empty"


class EscalationStatus(models.TextChoices):
    PENDING = "PENDING"
    NOTIFIED = "NOTIFIED"
    REASSIGNED = "REASSIGNED"
    CANCELLED = "CANCELLED"
    RESOLVED = "RESOLVED"


class UnassignedOrder(models.Model):
    """A delivery dispatch could not place (seed: unassigned_orders). Open while
    `resolved_at` is null; at most one open record per delivery."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.PROTECT, related_name="unassigned_records")
    seller_order_id = models.CharField(max_length=255, blank=True, default="")
    location = models.PointField(geography=True, srid=4326, null=True, blank=True)
    failure_reason = models.CharField(max_length=50, choices=FailureReason.choices)
    first_attempt_at = models.DateTimeField()
    last_attempt_at = models.DateTimeField()
    attempt_count = models.PositiveIntegerField(default=1)
    escalation_level = models.PositiveSmallIntegerField(default=0)
    escalation_status = models.CharField(max_length=50, choices=EscalationStatus.choices, default=EscalationStatus.PENDING)
    support_ticket_id = models.CharField(max_length=255, blank=True, default="")
    notification_sent_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "unassigned_orders"
        ordering = ["first_attempt_at"]
        constraints = [
            models.UniqueConstraint(fields=["delivery"], condition=Q(resolved_at__isnull=True), name="unassigned_one_open_per_delivery"),
            models.CheckConstraint(condition=Q(escalation_level__lte=3), name="unassigned_level_0_to_3"),
        ]
        indexes = [
            models.Index(fields=["escalation_level"], name="idx_escalation_level"),
            models.Index(fields=["delivery"], name="idx_delivery_id"),
            models.Index(fields=["failure_reason"], name="idx_failure_reason"),
            models.Index(fields=["escalation_status"], name="idx_escalation_status"),
            models.Index(fields=["last_attempt_at"], name="idx_unassigned_open", condition=Q(resolved_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"unassigned {self.seller_order_id} ({self.failure_reason}, level {self.escalation_level})"
