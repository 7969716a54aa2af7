from django.core.management.base import BaseCommand

from availability.geo import rebuild_index, reconcile_index


class Command(BaseCommand):
    help = (
        "Rebuild the Redis GEO index ({fleet}:drivers:geo, {fleet}:drivers:fix, {fleet}:drivers:status) from "
        "PostgreSQL, then reconcile it (what changed while the rebuild read PostgreSQL)."
    )

    def handle(self, *args, **options):
        count = rebuild_index()
        self.stdout.write(f"GEO index rebuilt: {count} available drivers with a fix")
        repaired = reconcile_index()
        self.stdout.write(f"then reconciled: {repaired}")
