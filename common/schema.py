"""OpenAPI helpers: the shared error body, error responses per endpoint, Idempotency-Key."""
from django.core.validators import RegexValidator
from drf_spectacular.openapi import AutoSchema as _AutoSchema
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers

from common.fields import SingleLineTextField
from common.validators import URL_TEXT_PATTERN, trimmed_text_pattern


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
    413: "Body too large",
    415: "Unsupported media type or Content-Encoding",
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
    # common.idempotency rejects a key that is blank after stripping or longer than 255 (400).
    type={"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"\S"},
    description="1 to 255 characters, not blank. Replays the first response for 24 h; "
    "reusing it with another body is a 409, a blank or over-long key is a 400.",
)

# Any request under /v2/ may answer these: a control character or invalid UTF-8 in its path,
# query string or Authorization header (common.middleware); PostgreSQL or Redis down (503).
_ANY_REQUEST_ERRORS = (400, 503)
# Any POST under /v2/ may answer these because of the Idempotency-Key header (common.idempotency).
_IDEMPOTENCY_ERRORS = (400, 409)
# Any request with a body: over its size limit (EarlyBodyLimit, RequestGuardMiddleware), or not
# JSON (multipart for uploads), or compressed.
_BODY_ERRORS = (413, 415)

# The `limit` and `cursor` query parameters of every paginated list (common.pagination).
CURSOR_PATTERN = r"^[A-Za-z0-9+/]+={0,2}$"  # what common.pagination hands out: base64
PAGE_PARAMETERS = [
    OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                     description="Page size, 1 to 200 (default 50). An empty value is a 400."),
    OpenApiParameter(
        "cursor", {"type": "string", "pattern": CURSOR_PATTERN},
        description="The opaque cursor from a previous page's `next` of the same endpoint and filters. Anything "
        "else is a 400 (`details.cursor`), even when it matches the pattern.",
    ),
]

# Query parameters whose empty value (`?status=`) is a 400, not "left out" (all others: DRF
# reads an empty value of an optional field as absent).
_EMPTY_IS_AN_ERROR = {"limit", "token"}
_EMPTY_NOTE = "An empty value is the same as leaving the parameter out."


# What common.middleware refuses in any path or query string (400), `URL_TEXT_PATTERN`
# (common.validators), is given to free-text path and query parameters.


def _body_required_when_its_schema_requires_something(operation, components) -> None:
    """A PATCH body is optional to drf-spectacular (its fields are); one whose schema still
    requires something (`anyOf` of required fields: the ticket PATCH's "at least one of") is a
    400 when absent, so the schema says the body is required (schemathesis sent none)."""
    body = operation.get("requestBody") if isinstance(operation, dict) else None
    if not body or body.get("required"):
        return
    for media in body.get("content", {}).values():
        schema = media.get("schema", {})
        ref = schema.get("$ref", "")
        schema = components.get(ref.rsplit("/", 1)[-1], {}) if ref else schema
        if schema.get("required") or schema.get("anyOf"):
            body["required"] = True
            return


def query_parameters_as_served(result, generator, request, public):
    """Postprocessing hook: optional query parameters say what the server does with an empty
    value (`?sort=`): it is read as absent (DRF's rule for optional fields), so the schema
    allows it (`allowEmptyValue`) instead of claiming `minLength: 1`. And free-text path and
    query parameters say which characters the server refuses in any URL (`URL_TEXT_PATTERN`)."""
    components = result.get("components", {}).get("schemas", {})
    for item in result.get("paths", {}).values():
        for operation in item.values():
            _body_required_when_its_schema_requires_something(operation, components)
            for param in operation.get("parameters", []) if isinstance(operation, dict) else ():
                schema = param.get("schema", {})
                if param.get("in") in ("path", "query") and schema.get("type") == "string" and (
                        not {"format", "enum", "pattern"} & schema.keys() or schema.get("pattern") in _FREE_TEXT_PATTERNS):
                    schema["pattern"] = URL_TEXT_PATTERN
                if param.get("in") != "query" or param.get("required") or param["name"] in _EMPTY_IS_AN_ERROR:
                    continue
                param["allowEmptyValue"] = True
                param.get("schema", {}).pop("minLength", None)
                description = param.get("description", "")
                if _EMPTY_NOTE not in description:
                    param["description"] = f"{description}\n\n{_EMPTY_NOTE}".strip()
    return result


_NUL = r"\u0000"
_CONTROL = r"\u0000-\u001f\u007f-\u009f"
# The patterns given to free-text request fields (AutoSchema): a query parameter's is replaced by
# the URL rule (query_parameters_as_served), which refuses more.
_FREE_TEXT_PATTERNS: set[str] = set()


class AutoSchema(_AutoSchema):
    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        """A free-text request field says what the server refuses in it: NUL (DRF's rule for
        every CharField), control characters in a single-line one, and text that is only
        whitespace where blank is not allowed (DRF trims it to ""). A schema-valid request was
        refused (`reason: "\t"`)."""
        result = super()._map_serializer_field(field, direction, bypass_extensions)
        if (direction == "request" and isinstance(field, serializers.CharField) and isinstance(result, dict)
                and result.get("type") == "string" and not {"pattern", "format", "enum"} & result.keys()
                and not any(isinstance(v, RegexValidator) for v in field.validators)):  # (its own pattern)
            excluded = _CONTROL if isinstance(field, SingleLineTextField) else _NUL
            if field.trim_whitespace:
                pattern = trimmed_text_pattern(excluded, non_blank=not field.allow_blank)
            else:
                pattern = f"^[^{excluded}]+$"
            _FREE_TEXT_PATTERNS.add(pattern)
            result["pattern"] = pattern
        return result

    def get_override_parameters(self):
        params = list(super().get_override_parameters())
        if self.method == "POST":
            params.append(IDEMPOTENCY_KEY)
        return params

    def _get_response_bodies(self, direction="response"):
        # Not get_response_serializers: @extend_schema(responses=...) overrides that without super().
        responses = super()._get_response_bodies(direction)
        codes = _ANY_REQUEST_ERRORS
        if self.method == "POST":
            codes += _IDEMPOTENCY_ERRORS
        if self.method in ("POST", "PUT", "PATCH"):
            codes += _BODY_ERRORS
        for code in codes:
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(errors(code)[code], str(code), direction=direction)
        return responses


def success_body(name: str, **fields):
    return inline_serializer(name=name, fields=fields)
