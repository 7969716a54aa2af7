from django.db import migrations, models

# FailureReason as it stands at this migration (without `other`)
_CODES = "'customer_unavailable', 'address_not_found', 'refused', 'damaged', 'unsafe'"


class Migration(migrations.Migration):

    dependencies = [
        ("dispatch", "0011_delivery_proof_and_handoff_code"),
    ]

    operations = [
        migrations.AddField(
            model_name="delivery",
            name="failure_code",
            field=models.CharField(
                blank=True,
                choices=[
                    ("customer_unavailable", "Customer Unavailable"), ("address_not_found", "Address Not Found"),
                    ("refused", "Refused"), ("damaged", "Damaged"), ("unsafe", "Unsafe"), ("other", "Other"),
                ],
                default="",
                max_length=30,
            ),
        ),
        migrations.AddField(
            model_name="delivery",
            name="failure_note",
            field=models.CharField(blank=True, default="", max_length=1000),
        ),
        # Deliveries that failed before: their free-text reason read as the API now reads one.
        migrations.RunSQL(
            "UPDATE dispatch_delivery SET"
            f" failure_code = CASE WHEN failure_reason IN ({_CODES}) THEN failure_reason ELSE 'other' END,"
            f" failure_note = CASE WHEN failure_reason IN ({_CODES}) THEN '' ELSE failure_reason END"
            " WHERE status = 'failed'",
            migrations.RunSQL.noop,
        ),
    ]
