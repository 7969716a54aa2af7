"""When ops were last warned that a switched-off endpoint's waiting events are about to be
dropped by the purge (services._switched_off_warn). A nullable column: no rewrite, no default."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('notifications', '0008_webhook_message_turn_idx'),
    ]

    operations = [
        migrations.AddField(
            model_name='webhookendpoint',
            name='drop_warned_at',
            field=models.DateTimeField(blank=True, help_text="When ops were last told that this switched-off endpoint's waiting events are about to be dropped (messages queued or replayed later are warned about again).", null=True),
        ),
    ]
