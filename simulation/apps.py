from django.apps import AppConfig


class SimulationConfig(AppConfig):
    name = "simulation"
    verbose_name = "Dispatch simulator"
    default_auto_field = "django.db.models.BigAutoField"
