"""DeliveryRating moves here from dispatch; its table keeps its name (state only)."""

import django.db.models.deletion
import uuid
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
                    name='DeliveryRating',
                    fields=[
                        ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                        ('stars', models.PositiveSmallIntegerField()),
                        ('comment', models.TextField(blank=True, default='', max_length=1000)),
                        ('created_at', models.DateTimeField()),
                        ('delivery', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='ratings', to='dispatch.delivery')),
                        ('driver', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='ratings', to='availability.driver')),
                    ],
                    options={
                        'db_table': 'dispatch_deliveryrating',
                        'ordering': ['-created_at'],
                        'indexes': [models.Index(fields=['driver', 'created_at'], name='delivery_rating_driver_idx')],
                        'constraints': [models.UniqueConstraint(fields=('delivery',), name='delivery_rating_one_per_delivery'), models.CheckConstraint(condition=models.Q(('stars__gte', 1), ('stars__lte', 5)), name='delivery_rating_stars_1_5')],
                    },
                ),
            ],
        ),
    ]
