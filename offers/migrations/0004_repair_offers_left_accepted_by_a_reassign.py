"""A reassign that waited on an accept of the same delivery (before the fix in
`workflows.deliveries.delivery_reassign`) ended the new assignment but left its offer ACCEPTED:
the delivery then refused every later accept (`offer_one_accepted_per_delivery`, a 500). Such
offers become what a reassign makes them: CANCELLED, reason `reassigned`, at the time their
assignment ended."""

from django.db import migrations

REPAIR = """
UPDATE driver_offers o
   SET status = 'CANCELLED', cancellation_reason = 'reassigned', cancelled_at = a.ended_at
  FROM dispatch_assignment a
 WHERE a.offer_id = o.id
   AND o.status = 'ACCEPTED'
   AND a.status = 'cancelled'
   AND a.end_reason = 'reassigned'
"""


class Migration(migrations.Migration):

    dependencies = [
        ('dispatch', '0017_seller_order_id_url_safe'),
        ('offers', '0003_offer_slot_batch_rounds'),
    ]

    operations = [migrations.RunSQL(REPAIR, reverse_sql=migrations.RunSQL.noop)]
