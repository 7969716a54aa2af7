"""Delivery zones (PostGIS polygons drawn in admin) and drivers' zone preferences.

Tables as in the seed (`delivery_zones`, `driver_zone_preferences`), plus the live health
fields the zone-health job writes (`demand_level`, `health_score`) and the per-zone dispatch
overrides the dispatch engine reads (`offer_expires_seconds`, `search_radius_km`).
"""
import uuid

from django.contrib.gis.db import models
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone

from common.validators import validate_positive
from dispatch.models import DispatchPolicy, ProofPolicy

PRIORITY_MIN, PRIORITY_MAX = 1, 5
OFFER_EXPIRES_MIN, OFFER_EXPIRES_MAX = 10, 120
MIN_DRIVERS_ONLINE_MAX = 100_000
TARGET_WAIT_MAX_SECONDS = 86_400  # a day
SEARCH_RADIUS_MAX_KM = 100
BATCH_SIZE_MIN, BATCH_SIZE_MAX = 2, 20
BROADCAST_MAX_MIN, BROADCAST_MAX_MAX = 1, 200
MATCHING_WINDOW_MAX = 60
DETOUR_MINUTES_MIN, DETOUR_MINUTES_MAX = 1, 60


class DeliveryZone(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, unique=True)
    # geometry(POLYGON, 4326) with a GiST index; ST_IsValid / not empty are also CHECKed.
    geometry = models.PolygonField(srid=4326, spatial_index=True)

    priority_level = models.PositiveSmallIntegerField(
        default=3,
        validators=[MinValueValidator(PRIORITY_MIN), MaxValueValidator(PRIORITY_MAX)],
        help_text="1 (highest) to 5 (lowest). Where zones overlap, the highest priority wins.",
    )
    # (the API's bounds; the admin's form took up to 2,147,483,647: 68 years' wait)
    min_drivers_online = models.PositiveIntegerField(default=5, validators=[MaxValueValidator(MIN_DRIVERS_ONLINE_MAX)])
    target_wait_time_seconds = models.PositiveIntegerField(
        default=300, validators=[MinValueValidator(1), MaxValueValidator(TARGET_WAIT_MAX_SECONDS)],
    )

    # Dispatch overrides (null: use the global setting).
    offer_expires_seconds = models.PositiveSmallIntegerField(
        null=True, blank=True,
        validators=[MinValueValidator(OFFER_EXPIRES_MIN), MaxValueValidator(OFFER_EXPIRES_MAX)],
        help_text="Offer expiry for deliveries in this zone, 10-120 s (empty: OFFER_DEFAULT_EXPIRES_SECONDS).",
    )
    search_radius_km = models.FloatField(
        null=True, blank=True,
        validators=[validate_positive, MaxValueValidator(SEARCH_RADIUS_MAX_KM)],
        help_text="Driver search radius for deliveries in this zone (empty: DISPATCH_RADIUS_KM).",
    )

    # Serviceability and pricing overrides (null: the global setting; zones/pricing.py).
    max_delivery_distance_km = models.FloatField(
        null=True, blank=True, validators=[validate_positive, MaxValueValidator(1000)],
        help_text="Longest pickup-to-drop-off leg accepted for a pickup in this zone (empty: MAX_DELIVERY_DISTANCE_KM).",
    )
    driver_pay_per_km = models.DecimalField(
        max_digits=8, decimal_places=2, null=True, blank=True, validators=[MinValueValidator(0)],
        help_text="Driver pay per km for deliveries in this zone (empty: DRIVER_PAY_PER_KM).",
    )
    driver_pay_cap = models.DecimalField(
        max_digits=10, decimal_places=2, null=True, blank=True, validators=[MinValueValidator(0)],
        help_text="Highest payout for one delivery in this zone (empty: DRIVER_PAY_CAP).",
    )
    # Proof of delivery for deliveries created in this zone without proofRequired (docs/dispatch.md).
    proof_required = models.CharField(
        max_length=20, choices=ProofPolicy.choices, blank=True, default="",
        help_text="Proof of delivery asked of deliveries in this zone (empty: DEFAULT_PROOF_POLICY).",
    )

    # Dispatch policy (docs/dispatch.md, "Dispatch policies"); empty/null: the global settings
    # (zones/policies.py resolves them).
    dispatch_policy = models.CharField(
        max_length=20, choices=DispatchPolicy.choices, blank=True, default="",
        help_text="How deliveries in this zone are offered (empty: DISPATCH_POLICY).",
    )
    offer_batch_size = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(BATCH_SIZE_MIN), MaxValueValidator(BATCH_SIZE_MAX)],
        help_text="batch policy: drivers offered at once, 2-20 (empty: DISPATCH_BATCH_SIZE).",
    )
    broadcast_max_drivers = models.PositiveSmallIntegerField(
        null=True, blank=True,
        validators=[MinValueValidator(BROADCAST_MAX_MIN), MaxValueValidator(BROADCAST_MAX_MAX)],
        help_text="broadcast policy: most drivers offered at once, 1-200 (empty: DISPATCH_BROADCAST_MAX).",
    )
    matching_window_seconds = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(MATCHING_WINDOW_MAX)],
        help_text="batched_matching policy: seconds ready deliveries are collected, 0-60; 0 disables "
        "(empty: DISPATCH_MATCHING_WINDOW_SECONDS).",
    )
    stacking_enabled = models.BooleanField(
        null=True, blank=True,
        help_text="Order stacking: a driver on a delivery may take a second from the same pickup "
        "(empty: STACKING_ENABLED).",
    )
    stacking_max_detour_minutes = models.PositiveSmallIntegerField(
        null=True, blank=True,
        validators=[MinValueValidator(DETOUR_MINUTES_MIN), MaxValueValidator(DETOUR_MINUTES_MAX)],
        help_text="Order stacking: most minutes a stacked drop-off may add to the first, 1-60 "
        "(empty: STACKING_MAX_DETOUR_MINUTES).",
    )

    # Live health, written by the zone-health job (derived state).
    current_drivers_online = models.PositiveIntegerField(default=0)
    avg_wait_time_seconds = models.PositiveIntegerField(default=300)
    demand_level = models.PositiveSmallIntegerField(default=1)
    health_score = models.PositiveSmallIntegerField(null=True, blank=True, help_text="0-100; empty until first computed.")
    last_updated = models.DateTimeField(default=timezone.now)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "delivery_zones"
        ordering = ["priority_level", "name"]
        indexes = [
            models.Index(fields=["priority_level"], name="zone_priority_level_idx"),
            models.Index(fields=["min_drivers_online"], name="zone_min_drivers_online_idx"),
        ]
        constraints = [
            # "Downtown" beside "downtown" on the map and in every zone picker: one name, one zone
            models.UniqueConstraint(Lower("name"), name="zone_name_ci_unique",
                                    violation_error_message="A zone with this name already exists."),
            models.CheckConstraint(
                condition=Q(priority_level__gte=PRIORITY_MIN, priority_level__lte=PRIORITY_MAX),
                name="zone_priority_level_range",
            ),
            models.CheckConstraint(condition=Q(target_wait_time_seconds__gt=0), name="zone_target_wait_positive"),
            models.CheckConstraint(
                condition=Q(offer_expires_seconds__isnull=True)
                | Q(offer_expires_seconds__gte=OFFER_EXPIRES_MIN, offer_expires_seconds__lte=OFFER_EXPIRES_MAX),
                name="zone_offer_expires_range",
            ),
            models.CheckConstraint(
                condition=Q(search_radius_km__isnull=True)
                | Q(search_radius_km__gt=0, search_radius_km__lte=SEARCH_RADIUS_MAX_KM),
                name="zone_search_radius_range",
            ),
            models.CheckConstraint(
                condition=Q(demand_level__gte=1, demand_level__lte=10), name="zone_demand_level_range"
            ),
            models.CheckConstraint(
                condition=Q(offer_batch_size__isnull=True)
                | Q(offer_batch_size__gte=BATCH_SIZE_MIN, offer_batch_size__lte=BATCH_SIZE_MAX),
                name="zone_offer_batch_size_range",
            ),
            models.CheckConstraint(
                condition=Q(broadcast_max_drivers__isnull=True)
                | Q(broadcast_max_drivers__gte=BROADCAST_MAX_MIN, broadcast_max_drivers__lte=BROADCAST_MAX_MAX),
                name="zone_broadcast_max_range",
            ),
            models.CheckConstraint(
                condition=Q(matching_window_seconds__isnull=True) | Q(matching_window_seconds__lte=MATCHING_WINDOW_MAX),
                name="zone_matching_window_range",
            ),
            models.CheckConstraint(
                condition=Q(stacking_max_detour_minutes__isnull=True)
                | Q(stacking_max_detour_minutes__gte=DETOUR_MINUTES_MIN, stacking_max_detour_minutes__lte=DETOUR_MINUTES_MAX),
                name="zone_stacking_detour_range",
            ),
            models.CheckConstraint(
                condition=Q(health_score__isnull=True) | Q(health_score__lte=100), name="zone_health_score_range"
            ),
            # The last word on geometry: PostGIS refuses an invalid or empty polygon.
            models.CheckConstraint(
                condition=Q(geometry__isvalid=True),
                name="zone_geometry_valid",
                violation_error_message="The zone boundary is not a valid polygon (for example it crosses itself).",
            ),
            models.CheckConstraint(
                condition=Q(geometry__isempty=False),
                name="zone_geometry_not_empty",
                violation_error_message="The zone boundary is empty.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def below_minimum(self) -> bool:
        return self.current_drivers_online < self.min_drivers_online


class ZonePreference(models.TextChoices):
    PREFERRED = "PREFERRED"
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"


class DriverZonePreference(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    driver = models.ForeignKey("availability.Driver", on_delete=models.CASCADE, related_name="zone_preferences")
    zone = models.ForeignKey(DeliveryZone, on_delete=models.CASCADE, related_name="driver_preferences")
    preference = models.CharField(max_length=20, choices=ZonePreference.choices, default=ZonePreference.AVAILABLE)
    # km from the driver's home to the zone's centroid, computed in PostGIS; null without a home.
    distance_to_zone_center = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "driver_zone_preferences"
        ordering = ["zone__priority_level", "zone__name"]
        constraints = [
            models.UniqueConstraint(fields=["driver", "zone"], name="driver_zone_preference_uniq"),
        ]
        indexes = [
            models.Index(fields=["preference"], name="zone_pref_preference_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.driver_id} · {self.zone_id}: {self.preference}"
