import django.db.models.deletion
from django.db import migrations, models

# Assignments made before the column: the driver's accepted offer of the delivery (at most one
# accepted offer per delivery, and a driver is offered a delivery once); direct assignments by
# ops have none.
BACKFILL = """
UPDATE dispatch_assignment a SET offer_id = o.id
FROM driver_offers o
WHERE a.offer_id IS NULL AND o.delivery_id = a.delivery_id AND o.driver_id = a.driver_id AND o.status = 'ACCEPTED'
"""


class Migration(migrations.Migration):
    dependencies = [
        ("dispatch", "0007_delivery_auto_dispatch"),
        ("offers", "0002_driver_in_availability"),
    ]

    operations = [
        migrations.AddField(
            model_name="assignment",
            name="offer",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="+", to="offers.driveroffer"
            ),
        ),
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
    ]
