"""Cursor pagination: `limit` + `cursor`, results under the endpoint's own key plus `next`."""
from base64 import b64decode
from urllib.parse import parse_qs

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import CursorPagination as _CursorPagination
from rest_framework.response import Response


class CursorPagination(_CursorPagination):
    page_size = 50
    max_page_size = 200
    page_size_query_param = "limit"
    ordering = ("-created_at", "-id")
    invalid_cursor_message = "Invalid cursor."

    def __init__(self, results_key: str = "results", ordering=None):
        self.results_key = results_key
        if ordering is not None:
            self.ordering = ordering

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        try:
            value = int(raw)
        except ValueError:
            raise ValidationError({"limit": ["Must be an integer between 1 and 200."]})
        if not 1 <= value <= self.max_page_size:
            raise ValidationError({"limit": ["Must be an integer between 1 and 200."]})
        return value

    def decode_cursor(self, request):
        try:
            cursor = super().decode_cursor(request)
            if cursor is not None:
                # DRF ignores unknown tokens, so base64 of anything restarts at page one.
                # validate: base64 only (DRF drops other characters, so "!!!" read as page one)
                raw = b64decode(request.query_params[self.cursor_query_param].encode("ascii"), validate=True).decode("ascii")
                if set(parse_qs(raw, keep_blank_values=True)) - {"o", "r", "p"}:
                    raise ValueError("unknown cursor token")
            return cursor
        except Exception as exc:  # DRF raises NotFound for a malformed cursor
            raise ValidationError({"cursor": [self.invalid_cursor_message]}) from exc

    def get_paginated_response(self, data, **extra):
        return Response({**extra, self.results_key: data, "next": self.get_next_link()})

    def get_paginated_response_schema(self, schema):
        return {
            "type": "object",
            "required": [self.results_key, "next"],
            "properties": {
                self.results_key: schema,
                "next": {"type": "string", "nullable": True, "format": "uri"},
            },
        }


def paginate(request, queryset, serializer_class, *, key: str, ordering=None, context=None, extra=None):
    """Paginate a queryset and render it with the endpoint's top-level key."""
    paginator = CursorPagination(results_key=key, ordering=ordering)
    page = paginator.paginate_queryset(queryset, request)
    data = serializer_class(page, many=True, context=context or {"request": request}).data
    return paginator.get_paginated_response(data, **(extra or {}))


def paginated_schema(name: str, key: str, item_serializer, **extra_fields):
    """OpenAPI shape of a page: `{<key>: [...], next, **extra}`."""
    from drf_spectacular.utils import inline_serializer
    from rest_framework import serializers

    return inline_serializer(
        name=name,
        fields={**extra_fields, key: item_serializer(many=True), "next": serializers.CharField(allow_null=True)},
    )
