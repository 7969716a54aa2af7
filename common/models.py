import uuid

from django.contrib.auth.models import AbstractUser
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class User(AbstractUser):
    """A login: ops staff, support agent, integration or driver. UUID ids so actors are uniform."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"


class IdempotencyRecord(models.Model):
    """The first response to a POST carrying an Idempotency-Key, replayed for 24 h."""

    caller = models.CharField(max_length=128)
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=10)
    path = models.CharField(max_length=500)
    request_hash = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.BinaryField(null=True, blank=True)
    content_type = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["caller", "key"], name="idempotency_caller_key_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.key}]"


class ApiToken(models.Model):
    """An API token: only its SHA-256 is stored (the key is shown once, when created).
    `prefix` (the key's first characters) tells tokens apart in the console without the key.
    A user may hold several (one per login, one from onboarding); deleting one revokes it."""

    user = models.ForeignKey("common.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=64, blank=True, default="")
    prefix = models.CharField(max_length=8, db_index=True, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")

    class Meta:
        verbose_name = "API token"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'token'})"


class DeferredTask(models.Model):
    """A Celery task whose after-commit publish failed (the broker down, or the Redis breaker
    open after a hang), kept to be published again by the sweep (`common.deferred`) until
    `expires_at`. Only tasks enqueued with `durable_seconds` (offer pushes, ops alerts, driver
    notices, a simulation run) are kept; the others have sweeps of their own or do not matter
    late. At least once: a publish that timed out may have reached the broker all the same."""

    id = models.BigAutoField(primary_key=True)
    task = models.CharField(max_length=200)
    args = models.JSONField(encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    attempts = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.task} (deferred {self.created_at:%H:%M:%S})"
