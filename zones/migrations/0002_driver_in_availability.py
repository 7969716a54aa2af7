"""The driver FK now names availability.Driver (same table: state only)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0003_driver_moves_here'),
        ('zones', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='driverzonepreference',
                    name='driver',
                    field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='zone_preferences', to='availability.driver'),
                ),
            ],
        ),
    ]
