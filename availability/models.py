"""Driver state: the driver, its availability state machine, its location and history."""
import uuid

from django.conf import settings
from django.contrib.gis.db import models
from django.core.exceptions import ValidationError
from django.db.models import F, Q

from common.db import save_fields


class DriverAvailability(models.TextChoices):
    AVAILABLE = "available"
    BUSY = "busy"
    ON_BREAK = "on_break"
    SHIFT_ENDED = "shift_ended"
    OFFLINE = "offline"
    PAUSED = "paused"


# What ops may set by hand: everything but busy (a driver becomes busy only by accepting work).
SETTABLE_AVAILABILITY_CHOICES = [c for c in DriverAvailability.choices if c[0] != DriverAvailability.BUSY]


class VehicleType(models.TextChoices):
    CAR = "car"
    MOTORBIKE = "motorbike"
    SCOOTER = "scooter"
    BICYCLE = "bicycle"
    VAN = "van"
    WALKING = "walking"


def capacity_for_vehicle(vehicle_type: str | None) -> int:
    """How many deliveries a driver of this vehicle type may carry at once (VEHICLE_CAPACITY;
    docs/dispatch.md, "Order stacking"). Only zones with stacking on ever give a driver more
    than one."""
    capacities = settings.VEHICLE_CAPACITY
    return max(1, int(capacities.get((vehicle_type or "").lower(), capacities.get("default", 1))))


class ActorType(models.TextChoices):
    DRIVER = "driver"
    ADMIN = "admin"
    INTEGRATION = "integration"
    SUPPORT = "support"
    SYSTEM = "system"


class Driver(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="driver")
    name = models.CharField(max_length=200)
    phone = models.CharField(max_length=32)
    vehicle = models.CharField(max_length=200, help_text="As shown to customers, e.g. 'Honda Civic, Blue'.")
    vehicle_type = models.CharField(max_length=20, choices=VehicleType.choices, default=VehicleType.CAR)
    rating = models.DecimalField(max_digits=3, decimal_places=2, default=5)

    availability = models.CharField(
        max_length=20, choices=DriverAvailability.choices, default=DriverAvailability.OFFLINE, db_index=True
    )
    availability_until = models.DateTimeField(null=True, blank=True)
    availability_reason = models.CharField(max_length=255, blank=True, default="")
    last_availability_change = models.DateTimeField(null=True, blank=True)
    availability_change_actor = models.UUIDField(null=True, blank=True)
    availability_change_actor_type = models.CharField(max_length=20, choices=ActorType.choices, blank=True, default="")

    location = models.PointField(geography=True, srid=4326, null=True, blank=True)
    location_accuracy_m = models.FloatField(null=True, blank=True)
    location_speed = models.FloatField(null=True, blank=True, help_text="m/s")
    location_heading = models.FloatField(null=True, blank=True, help_text="degrees, 0-360")
    location_recorded_at = models.DateTimeField(null=True, blank=True)
    home_location = models.PointField(geography=True, srid=4326, null=True, blank=True)

    # "At most `capacity` active assignments per driver", kept by the database: a trigger on
    # dispatch_assignment counts the driver's active assignments into `active_assignments`
    # (under the driver's row lock), and the CHECK driver_active_assignments_within_capacity
    # refuses a count above `capacity`, which follows the vehicle type (docs/dispatch.md,
    # "Order stacking"). Neither is written by a plain save().
    capacity = models.PositiveSmallIntegerField(default=1, editable=False)
    active_assignments = models.PositiveSmallIntegerField(default=0, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "dispatch_driver"  # created by the dispatch app; the table kept its name
        ordering = ["name"]
        indexes = [
            models.Index(fields=["created_at"], name="driver_created_idx"),
            models.Index(
                fields=["location_recorded_at"],
                name="driver_available_fix_idx",
                condition=Q(availability="available"),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(active_assignments__gte=0, active_assignments__lte=F("capacity")),
                name="driver_active_assignments_within_capacity",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        """A vehicle that carries fewer deliveries than the driver has now is refused (ops
        change it once the driver has delivered them)."""
        if self.pk is None:
            return
        active = Driver.objects.filter(pk=self.pk).values_list("active_assignments", flat=True).first() or 0
        if capacity_for_vehicle(self.vehicle_type) < active:
            raise ValidationError(
                {"vehicle_type": f"The driver carries {active} deliveries; this vehicle takes fewer."}
            )

    def save(self, *args, **kwargs):
        # The capacity follows the vehicle type; the count is the trigger's alone: a full save
        # of a row read earlier must not write back a stale count.
        self.capacity = capacity_for_vehicle(self.vehicle_type)
        if not self._state.adding and kwargs.get("update_fields") is None and not kwargs.get("force_insert"):
            kwargs["update_fields"] = [
                f.name for f in self._meta.concrete_fields if not f.primary_key and f.name != "active_assignments"
            ]
        elif kwargs.get("update_fields") is not None and "vehicle_type" in kwargs["update_fields"]:
            kwargs["update_fields"] = {*kwargs["update_fields"], "capacity"}
        super().save(*args, **kwargs)

    def save_fields(self, *fields: str) -> None:
        """`save(update_fields=fields)` of a driver that exists, its UPDATE built once
        (`common.db.save_fields`), the capacity set as `save()` sets it."""
        self.capacity = capacity_for_vehicle(self.vehicle_type)
        save_fields(self, fields)


class DriverAvailabilityHistory(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    driver = models.ForeignKey(Driver, on_delete=models.PROTECT, related_name="availability_history")
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
