import secrets
import uuid

from django.conf import settings
from django.contrib.gis.db import models
from django.db.models import Q


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

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        indexes = [
            models.Index(fields=["created_at"], name="driver_created_idx"),
            models.Index(
                fields=["location_recorded_at"],
                name="driver_available_fix_idx",
                condition=Q(availability="available"),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class DeliveryStatus(models.TextChoices):
    READY = "ready"
    ASSIGNED = "assigned"
    PICKED_UP = "picked_up"
    IN_TRANSIT = "in_transit"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_DELIVERY_STATUSES = (
    DeliveryStatus.READY,
    DeliveryStatus.ASSIGNED,
    DeliveryStatus.PICKED_UP,
    DeliveryStatus.IN_TRANSIT,
)


def new_tracking_token() -> str:
    return secrets.token_urlsafe(24)  # 192 bits


class Delivery(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    seller_order_id = models.CharField(max_length=255)
    seller_id = models.CharField(max_length=255, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="created_deliveries"
    )
    store_name = models.CharField(max_length=255)
    pickup_location = models.PointField(geography=True, srid=4326)
    dropoff_location = models.PointField(geography=True, srid=4326)
    dropoff_address = models.CharField(max_length=500, blank=True, default="")
    customer_name = models.CharField(max_length=200, blank=True, default="")
    customer_phone = models.CharField(max_length=32, blank=True, default="")
    prep_time_minutes = models.PositiveIntegerField(default=0)
    delivery_fee = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)

    status = models.CharField(
        max_length=20, choices=DeliveryStatus.choices, default=DeliveryStatus.READY, db_index=True
    )
    tracking_token = models.CharField(max_length=64, default=new_tracking_token, editable=False)
    zone = models.ForeignKey("zones.DeliveryZone", null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    current_offer = models.ForeignKey(
        "offers.DriverOffer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    accepted_offer = models.ForeignKey(
        "offers.DriverOffer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    offer_acceptance_count = models.PositiveIntegerField(default=0)

    failure_reason = models.CharField(max_length=500, blank=True, default="")
    cancellation_reason = models.CharField(max_length=500, blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField()
    assigned_at = models.DateTimeField(null=True, blank=True)
    pickup_started_at = models.DateTimeField(null=True, blank=True)
    picked_up_at = models.DateTimeField(null=True, blank=True)
    in_transit_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Latest ETA (dispatch/eta_service.py; docs/tracking.md), derived from the driver's fixes.
    eta_pickup_at = models.DateTimeField(null=True, blank=True)
    eta_delivery_at = models.DateTimeField(null=True, blank=True)
    eta_confidence = models.FloatField(null=True, blank=True)
    eta_calculated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["created_by", "seller_order_id"], name="delivery_seller_order_uniq"),
            models.CheckConstraint(condition=Q(prep_time_minutes__lte=24 * 60), name="delivery_prep_time_sane"),
        ]
        indexes = [
            models.Index(fields=["seller_order_id"], name="delivery_seller_order_idx"),
            models.Index(fields=["created_at"], name="delivery_created_idx"),
            models.Index(fields=["ready_at"], name="delivery_open_ready_idx", condition=Q(status="ready")),
        ]

    def __str__(self) -> str:
        return f"{self.seller_order_id} ({self.status})"

    @property
    def tracking_url(self) -> str:
        base = settings.TRACKING_BASE_URL.rstrip("/")
        return f"{base}/{self.id}?token={self.tracking_token}"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_DELIVERY_STATUSES


class AssignmentStatus(models.TextChoices):
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Assignment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey(Delivery, on_delete=models.PROTECT, related_name="assignments")
    driver = models.ForeignKey(Driver, on_delete=models.PROTECT, related_name="assignments")
    status = models.CharField(max_length=20, choices=AssignmentStatus.choices, default=AssignmentStatus.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["delivery"], condition=Q(status="active"), name="assignment_one_active_per_delivery"
            ),
            models.UniqueConstraint(
                fields=["driver"], condition=Q(status="active"), name="assignment_one_active_per_driver"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.driver} → {self.delivery} ({self.status})"


class DriverPerformance(models.Model):
    """Running counters per driver, bumped with F() as events happen (never a history scan on
    read). Rates are derived from the counters; `manage.py recompute_driver_performance`
    rebuilds them from history and must agree."""

    driver = models.OneToOneField(Driver, on_delete=models.CASCADE, primary_key=True, related_name="performance")
    deliveries_completed = models.PositiveIntegerField(default=0)
    deliveries_failed = models.PositiveIntegerField(default=0)
    offers_accepted = models.PositiveIntegerField(default=0)
    offers_rejected = models.PositiveIntegerField(default=0)
    offers_expired = models.PositiveIntegerField(default=0)
    responses = models.PositiveIntegerField(default=0)
    response_time_total_ms = models.BigIntegerField(default=0)
    timed_deliveries = models.PositiveIntegerField(default=0, help_text="completed with an estimated delivery time")
    on_time_deliveries = models.PositiveIntegerField(default=0)
    total_earnings = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "driver performance"

    def __str__(self) -> str:
        return f"performance of {self.driver_id}"

    @property
    def acceptance_rate(self) -> float:
        answered = self.offers_accepted + self.offers_rejected + self.offers_expired
        return round(self.offers_accepted / answered, 4) if answered else 0.0

    @property
    def on_time_rate(self) -> float:
        return round(self.on_time_deliveries / self.timed_deliveries, 4) if self.timed_deliveries else 0.0

    @property
    def avg_response_time_ms(self) -> int:
        return round(self.response_time_total_ms / self.responses) if self.responses else 0


class DeliveryCost(models.Model):
    """Seed: delivery_costs. Written once when a delivery completes or fails."""

    delivery = models.OneToOneField(Delivery, on_delete=models.PROTECT, primary_key=True, related_name="cost")
    postgres_cost = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    redis_cost = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    api_calls_cost = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    driver_payment = models.DecimalField(max_digits=10, decimal_places=2)
    platform_fee = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    total_cost = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "delivery_costs"


class DeliveryRevenue(models.Model):
    """Seed: delivery_revenue. Written once when a delivery completes or fails."""

    delivery = models.OneToOneField(Delivery, on_delete=models.PROTECT, primary_key=True, related_name="revenue")
    commission = models.DecimalField(max_digits=10, decimal_places=2)
    delivery_fee = models.DecimalField(max_digits=10, decimal_places=2)
    total_revenue = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "delivery_revenue"


class DeliveryRating(models.Model):
    """The customer's rating of a delivered delivery: one per delivery (docs/tracking.md)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey(Delivery, on_delete=models.PROTECT, related_name="ratings")
    driver = models.ForeignKey(Driver, on_delete=models.PROTECT, related_name="ratings")
    stars = models.PositiveSmallIntegerField()
    comment = models.TextField(max_length=1000, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["delivery"], name="delivery_rating_one_per_delivery"),
            models.CheckConstraint(condition=Q(stars__gte=1, stars__lte=5), name="delivery_rating_stars_1_5"),
        ]
        indexes = [models.Index(fields=["driver", "created_at"], name="delivery_rating_driver_idx")]

    def __str__(self) -> str:
        return f"{self.stars}★ for {self.delivery_id}"
