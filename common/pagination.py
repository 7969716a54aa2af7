"""Cursor pagination: `limit` + `cursor`, results under the endpoint's own key plus `next`.

`CursorPagination` is DRF's (a position on the first ordering field, an offset past its ties):
right for lists ordered by a near-unique time. `KeysetPagination` carries the whole sort key
in its cursor: for lists whose first field ties often (a rate, a priority), where DRF's offset
repeats rows when rows are added between pages and stops at 1,000 tied rows."""
import json
from base64 import b64decode, urlsafe_b64decode, urlsafe_b64encode
from datetime import date, datetime
from decimal import Decimal
from functools import reduce
from operator import or_
from urllib.parse import parse_qs
from uuid import UUID

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.db.models import F, Q
from rest_framework.exceptions import ValidationError
from rest_framework.utils.urls import replace_query_param
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
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 3:  # (int() takes "٣", "３", "1_0", " 3")
            raise ValidationError({"limit": ["Must be an integer between 1 and 200."]})
        value = int(raw)
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
                if "\x00" in (cursor.position or ""):
                    raise ValueError("NUL in the position")  # (PostgreSQL text refuses it: a 500)
            return cursor
        except Exception as exc:  # DRF raises NotFound for a malformed cursor
            raise ValidationError({"cursor": [self.invalid_cursor_message]}) from exc

    def paginate_queryset(self, queryset, request, view=None):
        if self.cursor_query_param not in request.query_params:  # (a bug then is a logged 500)
            return super().paginate_queryset(queryset, request, view)
        try:
            return super().paginate_queryset(queryset, request, view)
        except (ValueError, TypeError, ArithmeticError, DataError, DjangoValidationError) as exc:
            # A hand-made or another endpoint's position that is no value of this list's field.
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


class KeysetPagination(CursorPagination):
    """The cursor holds every ordering field's value of the page's last row (base64 of a JSON
    list); the next page is the rows after it in that order: `(a, b, id) > (x, y, z)` spelled
    out per field, each ascending or descending, NULLs last. Forward only (`next`). Ends with a
    unique field (`id`). A value that is not of its field's type is a 400."""

    def paginate_queryset(self, queryset, request, view=None):
        self.request = request
        self.page_size = self.get_page_size(request)
        self.base_url = request.build_absolute_uri()
        terms = [(name.lstrip("-"), name.startswith("-")) for name in self.ordering]
        fields = [queryset.query.chain().resolve_ref(name, allow_joins=True).output_field for name, _ in terms]
        after = self._decode(request, fields)
        queryset = queryset.order_by(*[
            F(name).desc(nulls_last=True) if desc else F(name).asc(nulls_last=True) for name, desc in terms
        ])
        if after is not None:
            queryset = queryset.filter(_after(terms, after))
        if after is None:
            rows = list(queryset[: self.page_size + 1])
        else:
            try:
                rows = list(queryset[: self.page_size + 1])
            except (ValueError, TypeError, ArithmeticError, DataError, DjangoValidationError) as exc:
                # (a position its field cannot hold, e.g. a year past 9999)
                raise ValidationError({"cursor": [self.invalid_cursor_message]}) from exc
        self.page = rows[: self.page_size]
        self.has_next = len(rows) > self.page_size
        self._last = [_value(self.page[-1], name) for name, _ in terms] if self.has_next else None
        return self.page

    def _decode(self, request, fields):
        raw = request.query_params.get(self.cursor_query_param)
        if not raw:  # (`cursor=` is as if left out)
            return None
        try:
            if len(raw) > 4096:
                raise ValueError("longer than any position")
            values = json.loads(urlsafe_b64decode(raw.encode("ascii")), parse_constant=_no_constant)
            if not isinstance(values, list) or len(values) != len(fields):
                raise ValueError("not this list's position")
            if not all(v is None or isinstance(v, (str, int, float)) for v in values):
                raise ValueError("not a value of a field")
            return [None if v is None else _in_range(field.to_python(_text(v))) for field, v in zip(fields, values)]
        except (ValueError, TypeError, ArithmeticError, RecursionError, DjangoValidationError) as exc:
            raise ValidationError({"cursor": [self.invalid_cursor_message]}) from exc

    def get_next_link(self):
        if not self.has_next:
            return None
        token = urlsafe_b64encode(json.dumps(self._last, default=_json_value, separators=(",", ":")).encode()).decode()
        return replace_query_param(self.base_url, self.cursor_query_param, token)


def _after(terms, values) -> Q:
    """Rows after `values` in the order `terms` [(field, descending)], NULLs last."""
    alternatives, same = [], Q()
    for (name, desc), value in zip(terms, values):
        if value is None:
            same &= Q(**{f"{name}__isnull": True})  # (nothing sorts after NULL but NULL)
            continue
        beyond = Q(**{f"{name}__{'lt' if desc else 'gt'}": value}) | Q(**{f"{name}__isnull": True})
        alternatives.append(same & beyond)
        same &= Q(**{name: value})
    return reduce(or_, alternatives) if alternatives else Q(pk__in=[])


def _value(row, name: str):
    for part in name.split("__"):
        row = getattr(row, part) if row is not None else None
    return row


def _json_value(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a cursor")


def _text(value):
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("NUL in the position")
    return value


def _in_range(value):
    """PostgreSQL's numeric refuses exponents past ±16383 (a DataError, raised mid-query)."""
    if isinstance(value, Decimal) and (not value.is_finite() or abs(value.adjusted()) > 1000):
        raise ValueError("a decimal out of range")
    return value


def _no_constant(name):
    raise ValueError(f"{name} in a cursor")


def paginate(request, queryset, serializer_class, *, key: str, ordering=None, context=None, extra=None, keyset=False):
    """Paginate a queryset and render it with the endpoint's top-level key (`keyset`: the
    whole sort key in the cursor, for orderings whose first field ties often)."""
    paginator = (KeysetPagination if keyset else CursorPagination)(results_key=key, ordering=ordering)
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
