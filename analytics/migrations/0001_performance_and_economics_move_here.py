"""Performance and economics move here from dispatch; their tables keep their names (state only)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('availability', '0003_driver_moves_here'),
        ('dispatch', '0006_models_move_to_availability_tracking_analytics'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='DeliveryCost',
                    fields=[
                        ('delivery', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, primary_key=True, related_name='cost', serialize=False, to='dispatch.delivery')),
                        ('postgres_cost', models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                        ('redis_cost', models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                        ('api_calls_cost', models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                        ('driver_payment', models.DecimalField(decimal_places=2, max_digits=10)),
                        ('platform_fee', models.DecimalField(decimal_places=2, default=0, max_digits=10)),
                        ('total_cost', models.DecimalField(decimal_places=2, max_digits=10)),
                        ('created_at', models.DateTimeField()),
                    ],
                    options={
                        'db_table': 'delivery_costs',
                    },
                ),
                migrations.CreateModel(
                    name='DeliveryRevenue',
                    fields=[
                        ('delivery', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, primary_key=True, related_name='revenue', serialize=False, to='dispatch.delivery')),
                        ('commission', models.DecimalField(decimal_places=2, max_digits=10)),
                        ('delivery_fee', models.DecimalField(decimal_places=2, max_digits=10)),
                        ('total_revenue', models.DecimalField(decimal_places=2, max_digits=10)),
                        ('created_at', models.DateTimeField()),
                    ],
                    options={
                        'db_table': 'delivery_revenue',
                    },
                ),
                migrations.CreateModel(
                    name='DriverPerformance',
                    fields=[
                        ('driver', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True, related_name='performance', serialize=False, to='availability.driver')),
                        ('deliveries_completed', models.PositiveIntegerField(default=0)),
                        ('deliveries_failed', models.PositiveIntegerField(default=0)),
                        ('offers_accepted', models.PositiveIntegerField(default=0)),
                        ('offers_rejected', models.PositiveIntegerField(default=0)),
                        ('offers_expired', models.PositiveIntegerField(default=0)),
                        ('responses', models.PositiveIntegerField(default=0)),
                        ('response_time_total_ms', models.BigIntegerField(default=0)),
                        ('timed_deliveries', models.PositiveIntegerField(default=0, help_text='completed with an estimated delivery time')),
                        ('on_time_deliveries', models.PositiveIntegerField(default=0)),
                        ('total_earnings', models.DecimalField(decimal_places=2, default=0, max_digits=12)),
                        ('updated_at', models.DateTimeField(blank=True, null=True)),
                    ],
                    options={
                        'verbose_name_plural': 'driver performance',
                        'db_table': 'dispatch_driverperformance',
                    },
                ),
            ],
        ),
    ]
