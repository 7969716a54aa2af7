from django.conf import settings
from django.db import models


class SimulationStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SimulationRun(models.Model):
    """A simulation ops started from the admin: its parameters, its progress while a Celery
    worker runs it, then its JSON result and HTML report (docs/dispatch.md, "The simulator")."""

    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    # {"drivers", "ordersPerHour", "minutes", "seed", "policies": [...], "stacking", "city"}
    parameters = models.JSONField()
    status = models.CharField(max_length=10, choices=SimulationStatus.choices, default=SimulationStatus.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)  # percent
    stage = models.CharField(max_length=60, blank=True, default="")  # the policy being run
    started_at = models.DateTimeField(null=True, blank=True)
    # Written when the run starts and with its progress (services.HEARTBEAT_SECONDS): a running
    # run without one for services.RUN_LOST_AFTER_SECONDS lost its worker.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    runtime_seconds = models.FloatField(null=True, blank=True)  # wall clock
    result = models.JSONField(null=True, blank=True)
    report_html = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")

    class Meta:
        db_table = "simulation_runs"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=models.Q(progress__lte=100), name="simulation_progress_at_most_100"),
        ]

    def __str__(self):
        return f"Simulation {self.pk} ({', '.join(self.parameters.get('policies', []))})"
