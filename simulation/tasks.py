from celery import shared_task
from django.conf import settings

from simulation import services


@shared_task(
    name="simulation.run", ignore_result=True, acks_late=False,
    time_limit=settings.SIMULATION_TASK_TIME_LIMIT, soft_time_limit=settings.SIMULATION_TASK_TIME_LIMIT - 60,
)
def run_simulation(run_id: int) -> str:
    """A simulation ops started from the admin. It takes over its worker process's database
    connection for the run (simulation/sandbox.py): route it to a worker of its own (the
    `simulation` queue). Not acked late: a run cut short is not started again by itself."""
    return services.run_execute(run_id)
