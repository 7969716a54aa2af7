"""A number's replies in the last hour, for the cap on those told (CUSTOMER_REPLIES_TOLD_PER_HOUR).
A plain index: the table is new (0012)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('notifications', '0013_customer_message_recipient_idx'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='customerreply',
            index=models.Index(fields=['sender', '-received_at'], name='customer_reply_sender_idx'),
        ),
    ]
