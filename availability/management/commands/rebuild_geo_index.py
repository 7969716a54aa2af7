from django.core.management.base import BaseCommand

from availability.geo import rebuild_index


class Command(BaseCommand):
    help = "Rebuild the Redis GEO index ({fleet}:drivers:geo, {fleet}:drivers:fix, {fleet}:drivers:status) from PostgreSQL."

    def handle(self, *args, **options):
        count = rebuild_index()
        self.stdout.write(f"GEO index rebuilt: {count} available drivers with a fix")
