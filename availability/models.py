import uuid

from django.db import models

from dispatch.models import ActorType, DriverAvailability


class DriverAvailabilityHistory(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    driver = models.ForeignKey("dispatch.Driver", on_delete=models.PROTECT, related_name="availability_history")
    from_state = models.CharField(max_length=20, choices=DriverAvailability.choices)
    to_state = models.CharField(max_length=20, choices=DriverAvailability.choices)
    reason = models.CharField(max_length=255, blank=True, default="")
    actor_id = models.UUIDField(null=True, blank=True)
    actor_type = models.CharField(max_length=20, choices=ActorType.choices, blank=True, default="")
    timestamp = models.DateTimeField()

    class Meta:
        db_table = "driver_availability_history"
        verbose_name_plural = "driver availability history"
        ordering = ["-timestamp", "-id"]
        indexes = [
            models.Index(fields=["driver", "timestamp"], name="idx_driver_timestamp"),
            models.Index(fields=["actor_type"], name="idx_actor_type"),
            models.Index(fields=["reason"], name="idx_reason"),
        ]

    def __str__(self) -> str:
        return f"{self.driver_id}: {self.from_state} → {self.to_state}"
