from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks


def check_default_proof_policy(app_configs=None, **kwargs):
    """DEFAULT_PROOF_POLICY must be a policy deliveries can carry (else every intake would
    store one that nothing enforces)."""
    field = apps.get_model("dispatch", "Delivery")._meta.get_field("proof_required")
    policies = [value for value, _ in field.choices]
    if settings.DEFAULT_PROOF_POLICY not in policies:
        return [checks.Error(
            f"DEFAULT_PROOF_POLICY is {settings.DEFAULT_PROOF_POLICY!r}; it must be one of {', '.join(policies)}.",
            id="dispatch.E001",
        )]
    return []


class DispatchConfig(AppConfig):
    name = "dispatch"

    def ready(self):
        checks.register(check_default_proof_policy)
