"""Customer messages by recipient, newest first: a customer's reply finds the delivery our last
text to that number was about (notifications.customers.customer_reply_record). Built
CONCURRENTLY, so that messages go on being written while it is built; an interrupted build
leaves an INVALID index to drop before migrating again (docs/operations.md)."""
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0012_customer_reply"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="customermessage",
            index=models.Index(fields=["channel", "recipient", "-created_at"], name="customer_message_recipient_idx"),
        ),
    ]
