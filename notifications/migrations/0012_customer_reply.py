"""Customers' replies to our texts (notifications.customers.sms_reply_received)."""

import django.db.models.deletion
import uuid
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('dispatch', '0017_seller_order_id_url_safe'),
        ('notifications', '0011_customer_message_provider_idx'),
    ]

    operations = [
        migrations.CreateModel(
            name='CustomerReply',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('channel', models.CharField(choices=[('sms', 'Sms'), ('email', 'Email')], default='sms', max_length=8)),
                ('sender', models.CharField(help_text='E.164 number', max_length=254)),
                ('body', models.CharField(max_length=1600)),
                ('provider_id', models.CharField(blank=True, default='', max_length=200)),
                ('received_at', models.DateTimeField()),
            ],
            options={
                'verbose_name_plural': 'customer replies',
                'ordering': ['-received_at'],
            },
        ),
        migrations.AddField(
            model_name='customerreply',
            name='delivery',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='customer_replies', to='dispatch.delivery'),
        ),
        migrations.AddConstraint(
            model_name='customerreply',
            constraint=models.UniqueConstraint(condition=models.Q(('provider_id', ''), _negated=True), fields=('provider_id',), name='customer_reply_once'),
        ),
    ]
