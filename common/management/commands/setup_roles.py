from django.core.management.base import BaseCommand

from common.groups import CONSOLE_MODELS, groups_sync


class Command(BaseCommand):
    help = "Create or update the ops console's Dispatcher and Viewer groups (idempotent)."

    def handle(self, *args, **options):
        groups = groups_sync()
        for name, group in groups.items():
            self.stdout.write(f"{name}: {group.permissions.count()} permissions over {sum(map(len, CONSOLE_MODELS.values()))} models")
