from __future__ import annotations

import logging

from django.contrib.auth import authenticate
from django.db import connection
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import APIException
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from common import metrics
from common.errors import error_body
from common.redis import get_redis
from common.schema import errors

logger = logging.getLogger(__name__)


def health(request):
    checks = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        logger.warning("health: database check failed: %s", exc)
        checks["database"] = "unavailable"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        logger.warning("health: redis check failed: %s", exc)
        checks["redis"] = "unavailable"
    if all(v == "ok" for v in checks.values()):
        return JsonResponse({"status": "ok", "checks": checks})
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    body = error_body(503, request.get_full_path(), f"Unavailable: {down}.", {"checks": checks})
    body["status"] = "unavailable"
    body["checks"] = checks  # where the 200 body has them, so a monitor reads one shape
    return JsonResponse(body, status=503)


def prometheus_metrics(request):
    output, content_type = metrics.render()
    return HttpResponse(output, content_type=content_type)


class InvalidCredentials(APIException):
    status_code = 401
    default_detail = "Invalid username or password."
    default_code = "invalid_credentials"
    auth_header = "Token"


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=256, trim_whitespace=False)


class TokenResponseSerializer(serializers.Serializer):
    token = serializers.CharField()


class AuthTokenView(APIView):
    """`POST /v2/auth/token {username, password}` → `{token}`."""

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(request=TokenRequestSerializer, responses={200: TokenResponseSerializer, **errors(400, 401)}, tags=["auth"])
    def post(self, request):
        s = TokenRequestSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        user = authenticate(request._request, **s.validated_data)
        if user is None or not user.is_active:
            raise InvalidCredentials()
        token, _ = Token.objects.get_or_create(user=user)
        return Response({"token": token.key})
