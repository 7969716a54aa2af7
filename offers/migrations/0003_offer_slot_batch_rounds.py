"""Batch and broadcast dispatch (issue 16): an offer's `slot` (0 single, 1..200 a round's
rank); one pending offer per (delivery, slot) instead of per delivery; a single pending offer
never beside a round's (exclusion constraint: btree_gist gives GiST the = / <> of uuid and int).
Existing offers become slot 0, which is what they were: one pending per delivery."""

import django.contrib.postgres.constraints
from django.contrib.postgres.operations import BtreeGistExtension
import django.db.models.functions.comparison
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0003_driver_moves_here'),
        ('dispatch', '0012_delivery_failure_code_and_note'),
        ('offers', '0002_driver_in_availability'),
    ]

    operations = [
        BtreeGistExtension(),
        migrations.RemoveConstraint(
            model_name='driveroffer',
            name='idx_delivery_pending',
        ),
        migrations.AddField(
            model_name='driveroffer',
            name='slot',
            field=models.PositiveSmallIntegerField(default=0),
        ),
        migrations.AddConstraint(
            model_name='driveroffer',
            constraint=models.UniqueConstraint(condition=models.Q(('status', 'PENDING')), fields=('delivery', 'slot'), name='idx_delivery_slot_pending'),
        ),
        migrations.AddConstraint(
            model_name='driveroffer',
            constraint=django.contrib.postgres.constraints.ExclusionConstraint(condition=models.Q(('status', 'PENDING')), expressions=[('delivery', '='), (django.db.models.functions.comparison.Least('slot', models.Value(1)), '<>')], name='offer_single_pending_alone'),
        ),
        migrations.AddConstraint(
            model_name='driveroffer',
            constraint=models.CheckConstraint(condition=models.Q(('slot__gte', 0), ('slot__lte', 200)), name='offer_slot_range'),
        ),
    ]
