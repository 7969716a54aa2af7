import django.core.validators
from django.db import migrations, models

import zones.models


class Migration(migrations.Migration):
    dependencies = [
        ("zones", "0002_driver_in_availability"),
    ]

    operations = [
        migrations.AddField(
            model_name="deliveryzone",
            name="max_delivery_distance_km",
            field=models.FloatField(
                blank=True, null=True,
                help_text="Longest pickup-to-drop-off leg accepted for a pickup in this zone (empty: MAX_DELIVERY_DISTANCE_KM).",
                validators=[zones.models.validate_positive, django.core.validators.MaxValueValidator(1000)],
            ),
        ),
        migrations.AddField(
            model_name="deliveryzone",
            name="driver_pay_per_km",
            field=models.DecimalField(
                blank=True, decimal_places=2, max_digits=8, null=True,
                help_text="Driver pay per km for deliveries in this zone (empty: DRIVER_PAY_PER_KM).",
                validators=[django.core.validators.MinValueValidator(0)],
            ),
        ),
        migrations.AddField(
            model_name="deliveryzone",
            name="driver_pay_cap",
            field=models.DecimalField(
                blank=True, decimal_places=2, max_digits=10, null=True,
                help_text="Highest payout for one delivery in this zone (empty: DRIVER_PAY_CAP).",
                validators=[django.core.validators.MinValueValidator(0)],
            ),
        ),
    ]
