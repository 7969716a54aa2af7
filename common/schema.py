"""OpenAPI helpers: the shared error body, error responses per endpoint, Idempotency-Key."""
from drf_spectacular.openapi import AutoSchema as _AutoSchema
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    statusCode = serializers.IntegerField()
    timestamp = serializers.DateTimeField()
    path = serializers.CharField()
    message = serializers.CharField()
    error = serializers.CharField()
    details = serializers.DictField(required=False, child=serializers.JSONField())


_DESCRIPTIONS = {
    400: "Invalid input",
    401: "No or invalid credentials",
    403: "Authenticated but not allowed",
    404: "Unknown id, or not yours",
    409: "State conflict",
    429: "Throttled",
    503: "A backing service is down",
}


def errors(*codes: int) -> dict:
    """Error responses for `extend_schema(responses=...)`; 401/403/429 are always included."""
    wanted = sorted(set(codes) | {401, 403, 429})
    return {code: OpenApiResponse(ErrorSerializer, description=_DESCRIPTIONS.get(code, "Error")) for code in wanted}


IDEMPOTENCY_KEY = OpenApiParameter(
    name="Idempotency-Key",
    location=OpenApiParameter.HEADER,
    required=False,
    type=str,
    description="Replays the first response for 24 h; reusing it with another body is a 409.",
)


class AutoSchema(_AutoSchema):
    def get_override_parameters(self):
        params = list(super().get_override_parameters())
        if self.method == "POST":
            params.append(IDEMPOTENCY_KEY)
        return params


def success_body(name: str, **fields):
    return inline_serializer(name=name, fields=fields)
