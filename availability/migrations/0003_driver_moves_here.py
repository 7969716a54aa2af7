"""Driver moves from dispatch to availability; its table keeps its name, so only the state changes."""

import django.contrib.gis.db.models.fields
import django.db.models.deletion
import uuid
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0002_initial'),
        ('dispatch', '0005_delivery_eta_and_rating'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Driver',
                    fields=[
                        ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                        ('name', models.CharField(max_length=200)),
                        ('phone', models.CharField(max_length=32)),
                        ('vehicle', models.CharField(help_text="As shown to customers, e.g. 'Honda Civic, Blue'.", max_length=200)),
                        ('vehicle_type', models.CharField(choices=[('car', 'Car'), ('motorbike', 'Motorbike'), ('scooter', 'Scooter'), ('bicycle', 'Bicycle'), ('van', 'Van'), ('walking', 'Walking')], default='car', max_length=20)),
                        ('rating', models.DecimalField(decimal_places=2, default=5, max_digits=3)),
                        ('availability', models.CharField(choices=[('available', 'Available'), ('busy', 'Busy'), ('on_break', 'On Break'), ('shift_ended', 'Shift Ended'), ('offline', 'Offline'), ('paused', 'Paused')], db_index=True, default='offline', max_length=20)),
                        ('availability_until', models.DateTimeField(blank=True, null=True)),
                        ('availability_reason', models.CharField(blank=True, default='', max_length=255)),
                        ('last_availability_change', models.DateTimeField(blank=True, null=True)),
                        ('availability_change_actor', models.UUIDField(blank=True, null=True)),
                        ('availability_change_actor_type', models.CharField(blank=True, choices=[('driver', 'Driver'), ('admin', 'Admin'), ('integration', 'Integration'), ('support', 'Support'), ('system', 'System')], default='', max_length=20)),
                        ('location', django.contrib.gis.db.models.fields.PointField(blank=True, geography=True, null=True, srid=4326)),
                        ('location_accuracy_m', models.FloatField(blank=True, null=True)),
                        ('location_speed', models.FloatField(blank=True, help_text='m/s', null=True)),
                        ('location_heading', models.FloatField(blank=True, help_text='degrees, 0-360', null=True)),
                        ('location_recorded_at', models.DateTimeField(blank=True, null=True)),
                        ('home_location', django.contrib.gis.db.models.fields.PointField(blank=True, geography=True, null=True, srid=4326)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('updated_at', models.DateTimeField(auto_now=True)),
                        ('user', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, related_name='driver', to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        'db_table': 'dispatch_driver',
                        'ordering': ['name'],
                    },
                ),
                migrations.AlterField(
                    model_name='driveravailabilityhistory',
                    name='driver',
                    field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='availability_history', to='availability.driver'),
                ),
                migrations.AddIndex(
                    model_name='driver',
                    index=models.Index(fields=['created_at'], name='driver_created_idx'),
                ),
                migrations.AddIndex(
                    model_name='driver',
                    index=models.Index(condition=models.Q(('availability', 'available')), fields=['location_recorded_at'], name='driver_available_fix_idx'),
                ),
            ],
        ),
    ]
