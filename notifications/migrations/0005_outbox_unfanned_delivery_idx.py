"""The index of the webhook claim's question "is an earlier event of this message's delivery still
waiting for fan-out?" (services.SENDABLE_SQL): through outbox_unfanned_idx (seq) it walked the
whole fan-out backlog for every message looked at. Built CONCURRENTLY, so that writes to the
outbox (every delivery change) go on while it is built."""
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0004_outbox_delivery_row"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="outboxevent",
            index=models.Index(condition=models.Q(("fanned_out_at__isnull", True)), fields=["delivery", "seq"],
                               name="outbox_unfanned_delivery_idx"),
        ),
    ]
