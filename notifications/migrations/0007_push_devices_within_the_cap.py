"""A driver keeps its 10 most recently registered push devices (`notifications.services.
PUSH_DEVICES_PER_DRIVER`, enforced at each registration since): the devices drivers had beyond
it before go, so that an offer is not pushed to every token an app ever registered."""

from django.db import migrations

TRIM = """
DELETE FROM notifications_pushdevice
 WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY driver_id ORDER BY last_seen_at DESC, id DESC) AS newest
          FROM notifications_pushdevice
    ) ranked
     WHERE newest > 10
 )
"""


class Migration(migrations.Migration):

    dependencies = [
        ('notifications', '0006_customer_message_cancelled'),
    ]

    operations = [migrations.RunSQL(TRIM, reverse_sql=migrations.RunSQL.noop)]
