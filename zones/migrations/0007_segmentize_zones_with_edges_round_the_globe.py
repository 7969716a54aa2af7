"""Zones stored before `zones.geometry` refused them may have an edge spanning 180° of
longitude or more. On the globe (`::geography`, which every zone query uses) such an edge runs
the other way round, and at exactly 180° PostGIS raises: one such zone made every order's
intake a 500. Their edges are cut into pieces of at most 10° (`ST_Segmentize`), so the globe
follows the boundary as it was drawn on the flat map, and the queries run again."""

from django.db import migrations

SEGMENTIZE = """
UPDATE delivery_zones z
   SET geometry = ST_Segmentize(z.geometry, 10)
 WHERE EXISTS (
       SELECT 1 FROM ST_DumpSegments(z.geometry) s
        WHERE abs(ST_X(ST_EndPoint(s.geom)) - ST_X(ST_StartPoint(s.geom))) >= 180)
"""


class Migration(migrations.Migration):

    dependencies = [('zones', '0006_zone_proof_policies_photo_signature')]

    operations = [migrations.RunSQL(SEGMENTIZE, reverse_sql=migrations.RunSQL.noop)]
