from __future__ import annotations

import hmac

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import authenticate
from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from django_celery_beat.models import PeriodicTask
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import APIException
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from common import heartbeat, metrics
from common.errors import error_body, error_response
from common.fields import StrictCharField
from common.redis import get_redis, unguarded
from common.schema import errors
from common.exceptions import InvalidInput
from common.tokens import api_token_issue, api_tokens_prune, api_tokens_revoke
from config.celery import app as celery_app
from config.periodic import MANAGED_PREFIX, PERIODIC_TASKS

logger = logging.getLogger(__name__)


def _read_only(view):
    """GET and HEAD only: anything else is a 405 with `Allow: GET, HEAD` (in the API's error
    body, common.middleware.ApiErrorMiddleware), not the CSRF check's 403."""
    return csrf_exempt(require_safe(view))


@_read_only
def live(request):
    """`/health/live`: the process answers (no dependency is checked: restart me if not)."""
    return JsonResponse({"status": "ok"})


def _dependency_checks() -> dict[str, str]:
    checks = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        logger.warning("health: database check failed: %s", exc)
        checks["database"] = "unavailable"
    try:
        unguarded(get_redis()).ping()  # Redis itself, not the breaker's view of it
        checks["redis"] = "ok"
    except Exception as exc:
        logger.warning("health: redis check failed: %s", exc)
        checks["redis"] = "unavailable"
    return checks


@_read_only
def health(request):
    """`/health/` and `/health/ready`: PostgreSQL and Redis answer (send me traffic)."""
    checks = _dependency_checks()
    if all(v == "ok" for v in checks.values()):
        return JsonResponse({"status": "ok", "checks": checks})
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    body = error_body(503, request.get_full_path(), f"Unavailable: {down}.", {"checks": checks})
    body["status"] = "unavailable"
    body["checks"] = checks  # where the 200 body has them, so a monitor reads one shape
    return JsonResponse(body, status=503)


ready = health


def periodic_jobs() -> list[heartbeat.Job]:
    """The schedule as beat runs it: config/periodic.py, with what ops changed in the admin
    (a disabled job is not expected to run; an interval edited there is the one that counts)."""
    jobs = {name: heartbeat.Job(name, task, float(every)) for name, (task, every, _) in PERIODIC_TASKS.items()}
    try:
        rows = PeriodicTask.objects.filter(name__startswith=MANAGED_PREFIX).select_related("interval")
        for row in rows:
            name = row.name.removeprefix(MANAGED_PREFIX)
            if name not in jobs:
                continue
            if not row.enabled:
                del jobs[name]
            elif row.interval is not None:
                every = row.interval.schedule.run_every.total_seconds()
                jobs[name] = heartbeat.Job(name, row.task, every)
    except DatabaseError as exc:
        logger.warning("health: periodic schedule not readable, using config/periodic.py: %s", exc)
    return list(jobs.values())


def celery_queues() -> list[str]:
    names = {celery_app.conf.task_default_queue}
    names.update(q.name for q in celery_app.conf.task_queues or ())
    names.update(route["queue"] for route in (celery_app.conf.task_routes or {}).values() if "queue" in route)
    return sorted(names)


@_read_only
def jobs(request):
    """`/health/jobs`: every periodic job ran within twice its interval, and a worker answers.

    200 with each job's and worker's ages; 503 in the error body naming the late job(s) or
    the missing workers (the same report under the same keys)."""
    path = request.get_full_path()
    try:
        now = time.time()
        snap = heartbeat.snapshot(celery_queues(), now=now)
    except heartbeat.REDIS_ERRORS as exc:
        logger.warning("health: job liveness unknown, redis unavailable: %s", exc)
        body = error_body(503, path, "Unavailable: redis (job liveness is recorded there).")
        body["status"] = "unavailable"
        return JsonResponse(body, status=503)
    result = heartbeat.assess(periodic_jobs(), snap, now=now)
    report = {"jobs": result.jobs, "workers": result.workers, "queues": snap.queues}
    if result.ok:
        return JsonResponse({"status": "ok", **report})
    body = error_body(503, path, result.message, {"lateJobs": result.late_jobs, "workersAlive": result.workers_alive})
    body["status"] = "unavailable"
    body.update(report)
    return JsonResponse(body, status=503)


metrics.register_scrape_collector(heartbeat.JobHealthCollector(periodic_jobs, celery_queues))


LOOPBACK = {"127.0.0.1", "::1"}


@_read_only
def prometheus_metrics(request):
    """Prometheus scrape. With METRICS_TOKEN set it needs `Authorization: Bearer <token>`;
    without one it answers only the machine itself (a scraper on the box or a sidecar)."""
    expected = settings.METRICS_TOKEN
    if expected:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            response = error_response(request, 401, "A bearer token is required for /metrics.")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif request.META.get("REMOTE_ADDR") not in LOOPBACK:
        return error_response(request, 403, "/metrics answers only this machine unless METRICS_TOKEN is set.")
    output, content_type = metrics.render()
    return HttpResponse(output, content_type=content_type)


class InvalidCredentials(APIException):
    status_code = 401
    default_detail = "Invalid username or password."
    default_code = "invalid_credentials"
    auth_header = "Token"


class TokenRequestSerializer(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(max_length=256, trim_whitespace=False)


class TokenResponseSerializer(serializers.Serializer):
    token = serializers.CharField()
    expiresAt = serializers.DateTimeField(allow_null=True)


class AuthTokenView(APIView):
    """`POST /v2/auth/token {username, password}` → `{token, expiresAt}`: a new token per
    login (shown once; only its hash is kept), expiring after API_LOGIN_TOKEN_TTL_SECONDS.
    `DELETE /v2/auth/token` with `Authorization: Token <key>` revokes that token (log out)."""

    def get_authenticators(self):
        return super().get_authenticators() if getattr(self.request, "method", None) == "DELETE" else []

    def get_permissions(self):
        return [IsAuthenticated()] if getattr(self.request, "method", None) == "DELETE" else [AllowAny()]

    @extend_schema(request=TokenRequestSerializer, responses={200: TokenResponseSerializer, **errors(400, 401)}, tags=["auth"])
    def post(self, request):
        s = TokenRequestSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        user = authenticate(request._request, **s.validated_data)
        if user is None or not user.is_active:
            raise InvalidCredentials()
        ttl = settings.API_LOGIN_TOKEN_TTL_SECONDS
        api_tokens_prune(user)
        key, token = api_token_issue(user, name="login", ttl=timedelta(seconds=ttl) if ttl else None)
        return Response({"token": key, "expiresAt": token.expires_at})

    @extend_schema(request=None, responses={204: None, **errors(400, 401)}, tags=["auth"])
    def delete(self, request):
        if request.auth is None:
            raise InvalidInput("This login has no API token to revoke (send Authorization: Token <key>).")
        api_tokens_revoke(request.user, token_id=request.auth.pk)
        return Response(status=204)
