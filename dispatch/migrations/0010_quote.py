import uuid

import django.contrib.gis.db.models.fields
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("dispatch", "0009_delivery_customer_email_language"),
        ("zones", "0003_zone_serviceability_and_pay"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="Quote",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("pickup_location", django.contrib.gis.db.models.fields.PointField(geography=True, srid=4326)),
                ("dropoff_location", django.contrib.gis.db.models.fields.PointField(geography=True, srid=4326)),
                ("prep_time_minutes", models.PositiveIntegerField(default=0)),
                ("distance_km", models.FloatField()),
                ("delivery_fee", models.DecimalField(decimal_places=2, max_digits=10)),
                ("created_at", models.DateTimeField()),
                ("expires_at", models.DateTimeField()),
                ("used_at", models.DateTimeField(blank=True, null=True)),
                ("created_by", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="quotes", to=settings.AUTH_USER_MODEL)),
                ("delivery", models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="quote", to="dispatch.delivery")),
                ("zone", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="+", to="zones.deliveryzone")),
            ],
            options={
                "ordering": ["-created_at"],
                "indexes": [models.Index(fields=["expires_at"], name="quote_expires_idx")],
            },
        ),
    ]
