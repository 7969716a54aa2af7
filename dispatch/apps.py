from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks

PROOF_UPLOAD_PATH = r"^/v2/drivers/[^/]+/deliveries/[^/]+/proof$"
PROOF_UPLOAD_OVERHEAD_BYTES = 64 * 1024


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


def check_proof_settings(app_configs=None, **kwargs):
    """PROOF_FAILURE_PHOTO_POLICIES must name policies; PROOF_STORAGE is local or s3. (s3 without
    boto3 installed stops the start-up before checks run: django-storages' ImproperlyConfigured
    "Could not load Boto3's S3 bindings", raised as the proof model loads its storage.)"""
    errors = []
    field = apps.get_model("dispatch", "Delivery")._meta.get_field("proof_required")
    policies = [value for value, _ in field.choices]
    unknown = [p for p in settings.PROOF_FAILURE_PHOTO_POLICIES if p not in policies]
    if unknown:
        errors.append(checks.Error(
            f"PROOF_FAILURE_PHOTO_POLICIES names {', '.join(unknown)}; each must be one of {', '.join(policies)}.",
            id="dispatch.E002",
        ))
    if settings.PROOF_STORAGE not in ("local", "s3"):
        errors.append(checks.Error(f"PROOF_STORAGE is {settings.PROOF_STORAGE!r}; it must be local or s3.", id="dispatch.E003"))
    return errors


class DispatchConfig(AppConfig):
    name = "dispatch"

    def ready(self):
        # Imported once apps are loaded: the middleware module reads DRF, which reads models.
        from common.middleware import allow_larger_body

        checks.register(check_default_proof_policy)
        checks.register(check_proof_settings)
        # The proof upload takes a file of up to PROOF_MAX_BYTES, plus its multipart framing and note.
        allow_larger_body(PROOF_UPLOAD_PATH, lambda: settings.PROOF_MAX_BYTES + PROOF_UPLOAD_OVERHEAD_BYTES)
