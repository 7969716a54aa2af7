"""Customer messages by their provider's id, for the provider's status reports
(notifications.api.twilio). Built CONCURRENTLY, so that messages go on being written while it is
built; an interrupted build leaves an INVALID index to drop before migrating again
(docs/operations.md)."""
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0010_customer_opt_out"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="customermessage",
            index=models.Index(condition=~models.Q(provider_id=""), fields=["provider_id"], name="customer_message_provider_idx"),
        ),
    ]
