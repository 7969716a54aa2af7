from django.core.management.base import BaseCommand

from analytics.services import recompute_driver_performance


class Command(BaseCommand):
    help = "Rebuild driver performance counters from history (offers, deliveries, costs)."

    def add_arguments(self, parser):
        parser.add_argument("--driver", action="append", help="only this driver id (repeatable)")

    def handle(self, *args, driver=None, **options):
        count = recompute_driver_performance(driver_ids=driver)
        self.stdout.write(f"recomputed performance of {count} drivers")
