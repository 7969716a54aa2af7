import uuid

from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import RangeOperators
from django.db import models
from django.db.models import Q, Value
from django.db.models.functions import Least

from zones.models import BROADCAST_MAX_MAX

# `DriverOffer.slot`: 0 is a single offer (sequential dispatch, an ops offer); 1..SLOT_MAX are
# the offers of one batch or broadcast round (as many as the largest broadcast a zone allows).
SINGLE_SLOT = 0
SLOT_MAX = BROADCAST_MAX_MAX


class OfferStatus(models.TextChoices):
    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


# Offers as the driver answered them, for counting (analytics): an accepted offer that a
# reassign later cancelled was still accepted, so "accepted" is `accepted_at` set, whatever the
# status now; "withdrawn" is an offer cancelled before any answer.
ANSWER_ACCEPTED = Q(accepted_at__isnull=False)
ANSWER_WITHDRAWN = Q(status=OfferStatus.CANCELLED, accepted_at__isnull=True)
ANSWERED = ANSWER_ACCEPTED | Q(status__in=(OfferStatus.REJECTED, OfferStatus.EXPIRED))


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

    The database enforces: one PENDING offer per driver, one ACCEPTED offer per delivery, and
    per delivery either one single PENDING offer (slot 0: sequential dispatch, an ops offer)
    or the PENDING offers of one batch/broadcast round, one per slot 1..SLOT_MAX, never both
    (docs/dispatch.md, "Dispatch policies").
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
    # the radius the offer was found in, which the search after it ends uses (level 2 widens a
    # pending one: offers.services.offers_widen_pending_locked)
    search_radius_km = models.FloatField(null=True, blank=True)
    # 0: a single offer; 1..N: its rank in a batch/broadcast round (1 = best-ranked driver)
    slot = models.PositiveSmallIntegerField(default=SINGLE_SLOT)

    class Meta:
        db_table = "driver_offers"
        ordering = ["-created_at"]
        constraints = [
            # One pending offer per (delivery, slot): a sequential offer (slot 0) is unique per
            # delivery, as before; a round's offers take distinct slots.
            models.UniqueConstraint(fields=["delivery", "slot"], condition=Q(status="PENDING"), name="idx_delivery_slot_pending"),
            # ... and a single offer (slot 0) is never pending beside a round's (slot >= 1):
            # pending offers of one delivery all agree on LEAST(slot, 1).
            ExclusionConstraint(
                name="offer_single_pending_alone", index_type="gist",
                expressions=[("delivery", RangeOperators.EQUAL), (Least("slot", Value(1)), RangeOperators.NOT_EQUAL)],
                condition=Q(status="PENDING"),
            ),
            models.CheckConstraint(condition=Q(slot__gte=SINGLE_SLOT, slot__lte=SLOT_MAX), name="offer_slot_range"),
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
