"""The driver FK now names availability.Driver (same table: state only)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0003_driver_moves_here'),
        ('offers', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='driveroffer',
                    name='driver',
                    field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='offers', to='availability.driver'),
                ),
            ],
        ),
    ]
