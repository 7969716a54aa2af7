"""Order stacking (docs/dispatch.md): "one active assignment per driver" becomes "at most the
driver's capacity", still kept by the database. The partial unique index goes; a trigger on
dispatch_assignment counts each driver's active assignments into
dispatch_driver.active_assignments (its UPDATE takes the driver's row lock, so concurrent
inserts for one driver are counted one after the other) and the CHECK
driver_active_assignments_within_capacity (availability 0004) refuses a count above capacity:
an INSERT or UPDATE that would carry a driver past it fails with an IntegrityError."""
from django.conf import settings
from django.db import migrations, models

COUNT_FUNCTION = """
CREATE OR REPLACE FUNCTION dispatch_assignment_count_active() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE' AND OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.driver_id = NEW.driver_id THEN
    RETURN NULL;
  END IF;
  IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'active' THEN
    UPDATE dispatch_driver SET active_assignments = active_assignments - 1 WHERE id = OLD.driver_id;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'active' THEN
    UPDATE dispatch_driver SET active_assignments = active_assignments + 1 WHERE id = NEW.driver_id;
  END IF;
  RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS dispatch_assignment_count_active ON dispatch_assignment;
CREATE TRIGGER dispatch_assignment_count_active
AFTER INSERT OR DELETE OR UPDATE OF status, driver_id ON dispatch_assignment
FOR EACH ROW EXECUTE FUNCTION dispatch_assignment_count_active();
"""

DROP_FUNCTION = """
DROP TRIGGER IF EXISTS dispatch_assignment_count_active ON dispatch_assignment;
DROP FUNCTION IF EXISTS dispatch_assignment_count_active();
"""


def fill_counts(apps, schema_editor):
    """Each driver's capacity from its vehicle type, and its active assignments counted."""
    capacities = settings.VEHICLE_CAPACITY
    with schema_editor.connection.cursor() as cur:
        for vehicle_type, capacity in capacities.items():
            if vehicle_type != "default":
                cur.execute("UPDATE dispatch_driver SET capacity = %s WHERE lower(vehicle_type) = %s",
                            [max(1, int(capacity)), vehicle_type])
        cur.execute(
            "UPDATE dispatch_driver d SET active_assignments = n.n FROM "
            "(SELECT driver_id, count(*) AS n FROM dispatch_assignment WHERE status = 'active' GROUP BY driver_id) n "
            "WHERE d.id = n.driver_id"
        )


class Migration(migrations.Migration):

    dependencies = [
        ('availability', '0004_driver_capacity_and_active_count'),
        ('dispatch', '0015_delivery_proof'),
        ('offers', '0002_driver_in_availability'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='assignment',
            name='assignment_one_active_per_driver',
        ),
        migrations.RunPython(fill_counts, migrations.RunPython.noop),
        migrations.RunSQL(COUNT_FUNCTION, DROP_FUNCTION),
        migrations.AddIndex(
            model_name='assignment',
            index=models.Index(condition=models.Q(('status', 'active')), fields=['driver'], name='assignment_active_driver_idx'),
        ),
    ]
