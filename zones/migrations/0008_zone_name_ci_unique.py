"""Zone names are unique whatever their case ("Downtown" beside "downtown" was allowed). Names
that differ only in case are told apart first by a suffix (" (2)", " (3)", ...) on all but the
oldest, so the constraint can be built on any database."""
import django.db.models.functions.text
from django.db import migrations, models


def rename_case_duplicates(apps, schema_editor):
    """Case-twins as the index will see them: PostgreSQL's lower() (the database's collation),
    not Python's str.lower(), which differ ("ΟΔΟΣ" / "οδοσ", "İzmir" / "izmir")."""
    from django.db import connection
    from django.db.models.functions import Lower

    DeliveryZone = apps.get_model("zones", "DeliveryZone")

    def lower(text: str) -> str:
        with connection.cursor() as cursor:
            cursor.execute("SELECT lower(%s)", [text])
            return cursor.fetchone()[0]

    zones = list(DeliveryZone.objects.annotate(key=Lower("name")).order_by("created_at", "id"))
    taken = {zone.key for zone in zones}
    seen = set()
    for zone in zones:
        if zone.key not in seen:
            seen.add(zone.key)
            continue
        base, n = zone.name[:240], 2
        while lower(f"{base} ({n})") in taken:
            n += 1
        zone.name = f"{base} ({n})"
        taken.add(lower(zone.name))
        DeliveryZone.objects.filter(pk=zone.pk).update(name=zone.name)


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
