"""The index of the webhook claim's walk: each active endpoint's pending messages in the order of
their events, with what the claim checks of each (due, leased) in the index itself
(services._CLAIM_SQL). Built CONCURRENTLY, so that the sweep's writes go on while it is built."""
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0007_push_devices_within_the_cap"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="webhookmessage",
            index=models.Index(condition=models.Q(("status", "pending")), fields=["endpoint", "next_attempt_at", "event"],
                               include=["leased_until"], name="webhook_message_turn_idx"),
        ),
    ]
