import json

from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS


class Command(BaseCommand):
    help = "Install the periodic tasks declared in config/periodic.py into django-celery-beat."

    @transaction.atomic
    def handle(self, *args, **options):
        wanted = set()
        for name, (task, seconds, opts) in PERIODIC_TASKS.items():
            full_name = MANAGED_PREFIX + name
            wanted.add(full_name)
            schedule, _ = IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)
            wanted_fields = {
                "task": task,
                "interval": schedule,
                "crontab": None,
                "enabled": True,
                "expires": None,
                "expire_seconds": opts.get("expires"),
                "kwargs": json.dumps(opts.get("kwargs", {})),
            }
            # Saved only when something differs: a save stamps `date_changed`, from which beat
            # counts a job that has not run yet; re-saved at every `make run`, an hourly purge
            # restarted more often than hourly never ran.
            row = PeriodicTask.objects.filter(name=full_name).first()
            if row is None:
                PeriodicTask.objects.create(name=full_name, **wanted_fields)
            elif any(getattr(row, field) != value for field, value in wanted_fields.items()):
                for field, value in wanted_fields.items():
                    setattr(row, field, value)
                row.save()
        stale = PeriodicTask.objects.filter(name__startswith=MANAGED_PREFIX).exclude(name__in=wanted)
        removed = stale.count()
        stale.delete()
        self.stdout.write(f"periodic tasks: {len(wanted)} installed, {removed} stale removed")
