"""What the customer sees and says: ratings (tables created by `dispatch`)."""
import uuid

from django.db import models
from django.db.models import Q


class DeliveryRating(models.Model):
    """The customer's rating of a delivered delivery: one per delivery (docs/tracking.md)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.PROTECT, related_name="ratings")
    driver = models.ForeignKey("availability.Driver", on_delete=models.PROTECT, related_name="ratings")
    stars = models.PositiveSmallIntegerField()
    comment = models.TextField(max_length=1000, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        db_table = "dispatch_deliveryrating"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["delivery"], name="delivery_rating_one_per_delivery"),
            models.CheckConstraint(condition=Q(stars__gte=1, stars__lte=5), name="delivery_rating_stars_1_5"),
        ]
        indexes = [models.Index(fields=["driver", "created_at"], name="delivery_rating_driver_idx")]

    def __str__(self) -> str:
        return f"{self.stars}★ for {self.delivery_id}"
