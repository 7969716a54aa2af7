"""Driver performance counters and per-delivery economics (tables created by `dispatch`)."""
from django.db import models


class DriverPerformance(models.Model):
    """Running counters per driver, bumped with F() as events happen (never a history scan on
    read). Rates are derived from the counters; `manage.py recompute_driver_performance`
    rebuilds them from history and must agree."""

    driver = models.OneToOneField("availability.Driver", on_delete=models.CASCADE, primary_key=True, related_name="performance")
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
        db_table = "dispatch_driverperformance"
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
        """Rounded half up, in integers, as the analytics API's query does (`round()` rounds a
        half to even: 4356.5 → 4356 where PostgreSQL said 4357)."""
        return (2 * self.response_time_total_ms + self.responses) // (2 * self.responses) if self.responses else 0


class DeliveryCost(models.Model):
    """Seed: delivery_costs. Written once when a delivery completes or fails."""

    delivery = models.OneToOneField("dispatch.Delivery", on_delete=models.PROTECT, primary_key=True, related_name="cost")
    postgres_cost = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    redis_cost = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    api_calls_cost = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    driver_payment = models.DecimalField(max_digits=14, decimal_places=2)
    platform_fee = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    total_cost = models.DecimalField(max_digits=14, decimal_places=2)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "delivery_costs"


class DeliveryRevenue(models.Model):
    """Seed: delivery_revenue. Written once when a delivery completes or fails."""

    delivery = models.OneToOneField("dispatch.Delivery", on_delete=models.PROTECT, primary_key=True, related_name="revenue")
    commission = models.DecimalField(max_digits=14, decimal_places=2)
    delivery_fee = models.DecimalField(max_digits=14, decimal_places=2)
    total_revenue = models.DecimalField(max_digits=14, decimal_places=2)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "delivery_revenue"
