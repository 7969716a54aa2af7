"""Zone names are unique whatever their case ("Downtown" beside "downtown" was allowed). Names
that differ only in case are told apart first by a suffix (" (2)", " (3)", ...) on all but the
oldest, so the constraint can be built on any database."""
import django.db.models.functions.text
from django.db import migrations, models


def rename_case_duplicates(apps, schema_editor):
    DeliveryZone = apps.get_model("zones", "DeliveryZone")
    taken = {name.lower() for name in DeliveryZone.objects.values_list("name", flat=True)}
    seen = set()
    for zone in DeliveryZone.objects.order_by("created_at", "id"):
        key = zone.name.lower()
        if key not in seen:
            seen.add(key)
            continue
        base, n = zone.name[:240], 2
        while f"{base} ({n})".lower() in taken:
            n += 1
        zone.name = f"{base} ({n})"
        taken.add(zone.name.lower())
        seen.add(zone.name.lower())
        zone.save(update_fields=["name"])


class Migration(migrations.Migration):

    dependencies = [
        ('zones', '0007_segmentize_zones_with_edges_round_the_globe'),
    ]

    operations = [
        migrations.RunPython(rename_case_duplicates, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name='deliveryzone',
            constraint=models.UniqueConstraint(django.db.models.functions.text.Lower('name'), name='zone_name_ci_unique', violation_error_message='A zone with this name already exists.'),
        ),
    ]
