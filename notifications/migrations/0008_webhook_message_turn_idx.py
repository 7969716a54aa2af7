"""The index of the webhook claim's walk: each active endpoint's pending messages by due time,
then event (services._CLAIM_SQL reads the due ones in the order they fell due). Built
CONCURRENTLY, so that the sweep's writes go on while it is built; an interrupted build leaves an
INVALID index to drop before migrating again (docs/operations.md)."""
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
