"""Driver, the performance/economics tables and ratings leave dispatch (state only; the tables stay). Content types follow their models so permissions and admin history carry over."""

import django.db.models.deletion
from django.db import migrations, models


MOVED = {
    "driver": "availability",
    "driverperformance": "analytics",
    "deliverycost": "analytics",
    "deliveryrevenue": "analytics",
    "deliveryrating": "tracking",
}


def move_content_types(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    for model, app_label in MOVED.items():
        if not ContentType.objects.filter(app_label=app_label, model=model).exists():
            ContentType.objects.filter(app_label="dispatch", model=model).update(app_label=app_label)


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0003_driver_moves_here'),
        ('dispatch', '0005_delivery_eta_and_rating'),
        ('offers', '0002_driver_in_availability'),
        ('contenttypes', '0002_remove_content_type_name'),
        ('zones', '0002_driver_in_availability'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveField(
                    model_name='deliveryrating',
                    name='delivery',
                ),
                migrations.RemoveField(
                    model_name='deliveryrating',
                    name='driver',
                ),
                migrations.RemoveField(
                    model_name='deliveryrevenue',
                    name='delivery',
                ),
                migrations.RemoveField(
                    model_name='driver',
                    name='user',
                ),
                migrations.RemoveField(
                    model_name='driverperformance',
                    name='driver',
                ),
                migrations.AlterField(
                    model_name='assignment',
                    name='driver',
                    field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='assignments', to='availability.driver'),
                ),
                migrations.DeleteModel(
                    name='DeliveryCost',
                ),
                migrations.DeleteModel(
                    name='DeliveryRating',
                ),
                migrations.DeleteModel(
                    name='DeliveryRevenue',
                ),
                migrations.DeleteModel(
                    name='DriverPerformance',
                ),
                migrations.DeleteModel(
                    name='Driver',
                ),
            ],
        ),
        migrations.RunPython(move_content_types, migrations.RunPython.noop),
    ]
