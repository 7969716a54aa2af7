"""The index the webhook claim walks (services._CLAIM_SQL): built CONCURRENTLY, so that writes
to the message table (every delivery change fans out into it) go on while it is built."""
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0004_outbox_delivery_row"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="webhookmessage",
            index=models.Index(condition=models.Q(("status", "pending")), fields=["endpoint", "event"],
                               include=("next_attempt_at", "leased_until"), name="webhook_message_turn_idx"),
        ),
    ]
