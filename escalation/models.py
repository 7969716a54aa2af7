"""Unassigned orders (seed: unassigned_orders) and the support tickets they escalate into."""
import uuid

from django.conf import settings
from django.contrib.gis.db import models
from django.db.models import Case, Q, Value, When

from audit.models import NextVal


class FailureReason(models.TextChoices):
    NO_AVAILABLE_DRIVERS = "no_available_drivers"
    ALL_DRIVERS_BUSY = "all_drivers_busy"
    DISTANCE_EXCEEDED = "distance_exceeded"
    REDIS_TIMEOUT = "redis_timeout"
    ZONE_EMPTY = "zone_empty"
    # The escalation check found a ready delivery waiting past level 1 that dispatch never
    # recorded as failed (never dispatched, or its offers keep running out). Seed: 'unassigned'.
    UNASSIGNED = "unassigned"


class EscalationStatus(models.TextChoices):
    PENDING = "PENDING"
    NOTIFIED = "NOTIFIED"
    REASSIGNED = "REASSIGNED"
    CANCELLED = "CANCELLED"
    RESOLVED = "RESOLVED"


MAX_ESCALATION_LEVEL = 3


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
    # The last escalation (when, why) and the last manual one (by whom, with which notes).
    escalated_at = models.DateTimeField(null=True, blank=True)
    escalation_reason = models.CharField(max_length=500, blank=True, default="")
    escalation_notes = models.TextField(blank=True, default="")
    escalated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
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

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None


# ------------------------------------------------------------------------ support tickets


class TicketType(models.TextChoices):
    UNASSIGNED_DELIVERY = "unassigned_delivery"
    OTHER = "other"


class TicketPriority(models.TextChoices):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


PRIORITY_RANK = {TicketPriority.LOW: 1, TicketPriority.NORMAL: 2, TicketPriority.HIGH: 3, TicketPriority.URGENT: 4}


class TicketStatus(models.TextChoices):
    OPEN = "open"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    CLOSED = "closed"


ACTIVE_TICKET_STATUSES = (TicketStatus.OPEN, TicketStatus.IN_PROGRESS)


class SupportTicket(models.Model):
    """A support ticket kept in this project (the default `SUPPORT_TICKET_BACKEND`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.PROTECT, related_name="support_tickets")
    unassigned_order = models.ForeignKey(
        UnassignedOrder, null=True, blank=True, on_delete=models.PROTECT, related_name="tickets"
    )
    type = models.CharField(max_length=40, choices=TicketType.choices, default=TicketType.UNASSIGNED_DELIVERY)
    priority = models.CharField(max_length=10, choices=TicketPriority.choices, default=TicketPriority.NORMAL)
    # Sort key for the queue (urgent first), kept by PostgreSQL from `priority`.
    priority_rank = models.GeneratedField(
        expression=Case(
            *[When(priority=p.value, then=Value(rank)) for p, rank in PRIORITY_RANK.items()],
            default=Value(0),
        ),
        output_field=models.SmallIntegerField(),
        db_persist=True,
    )
    status = models.CharField(max_length=20, choices=TicketStatus.choices, default=TicketStatus.OPEN)
    title = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="support_tickets"
    )
    resolution = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    taken_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "support_tickets"
        ordering = ["-priority_rank", "created_at"]
        constraints = [
            # One ticket per unassigned-order record: two escalation checks racing cannot both open one.
            models.UniqueConstraint(fields=["unassigned_order"], name="ticket_one_per_unassigned_order"),
            models.CheckConstraint(
                condition=~Q(status__in=["resolved", "closed"]) | Q(resolved_at__isnull=False) | Q(closed_at__isnull=False),
                name="ticket_done_has_a_time",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "-priority_rank", "created_at"], name="ticket_queue_idx"),
            models.Index(fields=["assignee", "status"], name="ticket_assignee_idx"),
            models.Index(fields=["delivery"], name="ticket_delivery_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.title} ({self.priority}, {self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_TICKET_STATUSES


class CommentKind(models.TextChoices):
    COMMENT = "comment"  # written by a person
    SYSTEM = "system"  # a change recorded by the system (taken, escalated, resolved, ...)


class TicketComment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    ticket = models.ForeignKey(SupportTicket, on_delete=models.CASCADE, related_name="comments")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=10, choices=CommentKind.choices, default=CommentKind.COMMENT)
    body = models.TextField()
    created_at = models.DateTimeField()
    # Insertion order: a system note and a comment written in one transaction share a timestamp.
    seq = models.BigIntegerField(db_default=NextVal(Value("support_ticket_comments_seq")), editable=False)

    class Meta:
        db_table = "support_ticket_comments"
        ordering = ["created_at", "seq"]
        indexes = [models.Index(fields=["ticket", "created_at"], name="ticket_comment_idx")]

    def __str__(self) -> str:
        return f"{self.kind} on {self.ticket_id} at {self.created_at:%Y-%m-%d %H:%M}"
