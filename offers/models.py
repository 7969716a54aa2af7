import uuid

from django.db import models
from django.db.models import Q


class OfferStatus(models.TextChoices):
    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class RejectionReason(models.TextChoices):
    TOO_FAR = "too_far"
    NO_TIME = "no_time"
    BAD_AREA = "bad_area"
    OTHER = "other"


class NotificationMethod(models.TextChoices):
    PUSH = "push"
    WEBSOCKET = "websocket"
    BOTH = "both"


class DriverOffer(models.Model):
    """A timed offer of one delivery to one driver (seed: driver_offers).

    The database enforces: one PENDING offer per delivery (sequential dispatch), one PENDING
    offer per driver, one ACCEPTED offer per delivery.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.PROTECT, related_name="offers")
    driver = models.ForeignKey("availability.Driver", on_delete=models.PROTECT, related_name="offers")
    status = models.CharField(max_length=20, choices=OfferStatus.choices, default=OfferStatus.PENDING)
    offer_payload = models.JSONField()
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    rejected_at = models.DateTimeField(null=True, blank=True)
    rejection_reason = models.TextField(blank=True, default="")
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    cancellation_reason = models.CharField(max_length=255, blank=True, default="")
    notification_sent_at = models.DateTimeField(null=True, blank=True)
    notification_method = models.CharField(
        max_length=20, choices=NotificationMethod.choices, default=NotificationMethod.PUSH
    )
    driver_response_time_ms = models.PositiveIntegerField(null=True, blank=True)
    search_radius_km = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "driver_offers"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["delivery"], condition=Q(status="PENDING"), name="idx_delivery_pending"),
            models.UniqueConstraint(fields=["driver"], condition=Q(status="PENDING"), name="idx_driver_pending"),
            models.UniqueConstraint(fields=["delivery"], condition=Q(status="ACCEPTED"), name="offer_one_accepted_per_delivery"),
            models.CheckConstraint(condition=Q(expires_at__gt=models.F("created_at")), name="offer_expires_after_creation"),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="idx_expires_at"),
            models.Index(fields=["created_at"], name="idx_created_at"),
            models.Index(fields=["driver", "created_at"], name="idx_offer_driver_created"),
            models.Index(fields=["delivery", "driver"], name="idx_offer_delivery_driver"),
        ]

    def __str__(self) -> str:
        return f"offer {self.pk} ({self.status})"
