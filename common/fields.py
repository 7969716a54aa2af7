"""Serializer fields shared by every app: finite floats, {lat, lon} points, and the strict
fields of request bodies.

DRF converts what it can: "12" passes for an integer, 12 for a string, "true" for a boolean.
A JSON body has types, and the schema states them, so the fields of request bodies take the
JSON type they document and refuse anything that merely converts to it (a 400 naming the
field). Query strings have no types: their serializers keep DRF's converting fields."""
import math
import re

from django.contrib.gis.geos import Point
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from common.validation import PlainValidation
from common.validators import validate_positive


class _JsonTyped:
    """Refuses a JSON value whose type is not `json_types` before the field converts it.
    A boolean is never a number (`True` is an `int` in Python)."""

    json_types: tuple[type, ...] = ()
    default_error_messages = {"wrong_type": "Must be a {expected}, not {actual}."}
    expected = "value"

    def to_internal_value(self, data):
        if not isinstance(data, self.json_types) or (isinstance(data, bool) and bool not in self.json_types):
            self.fail("wrong_type", expected=self.expected, actual=_json_type_name(data))
        return super().to_internal_value(data)


def _json_type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number with a decimal point"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


class _LengthAsSent:
    """`max_length` of the string as sent, as the schema's `maxLength` says: DRF measured it
    after trimming the whitespace around it, and 255 letters with spaces around them passed a
    field of at most 255 (and 50 spaces, a blank, one of at most 5)."""

    def run_validation(self, data=serializers.empty):
        if self.max_length is not None and isinstance(data, str) and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().run_validation(data)


class StrictCharField(_LengthAsSent, _JsonTyped, serializers.CharField):
    json_types = (str,)
    expected = "string"


class StrictRegexField(_LengthAsSent, _JsonTyped, serializers.RegexField):
    json_types = (str,)
    expected = "string"


class StrictChoiceField(_JsonTyped, serializers.ChoiceField):
    """One of the choices, given as a JSON string (12 is not "12")."""

    json_types = (str,)
    expected = "string"


class BoundedListField(serializers.ListField):
    """A list whose length is checked before its items: DRF checked `max_length` after every
    item, and 50,000 bad items made a 4 MB error body."""

    def to_internal_value(self, data):
        if self.max_length is not None and isinstance(data, list) and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class SingleLineTextField(StrictCharField):
    """Text shown on one line (a description, a name): no control characters."""

    default_error_messages = {"control": "Control characters are not allowed."}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
            self.fail("control")
        return value


@extend_schema_field({"type": "string", "format": "uri"})
class StrictUrlStringField(StrictCharField):
    """A URL as a JSON string; the service that stores it checks its form (DRF's URLField
    would refuse host names without a dot, which an intranet or test host may have)."""


class StrictUUIDField(_JsonTyped, serializers.UUIDField):
    json_types = (str,)
    expected = "UUID string"


class StrictIntegerField(_JsonTyped, serializers.IntegerField):
    """A JSON integer: "12", 12.0, 12.5 and true are refused."""

    json_types = (int,)
    expected = "whole number"


class QueryIntegerField(serializers.IntegerField):
    """An integer in a query string: ASCII digits only. DRF's takes what `int()` takes:
    Arabic-Indic or full-width digits, `1_0`, `+3`, ` 3`."""

    def to_internal_value(self, data):
        if isinstance(data, str) and not (data.isascii() and data.isdigit()):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(_JsonTyped, serializers.BooleanField):
    json_types = (bool,)
    expected = "boolean (true or false)"


# A date-time as the schema's `format: date-time` (RFC 3339) writes it: a date and a time. A date
# alone, which Python's parser takes as midnight, is refused (a fix "recorded" on 2026-12-08 was
# stored as taken at 00:00 UTC).
DATE_TIME_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


class StrictDateTimeField(serializers.DateTimeField):
    """A date-time input with its time of day (DATE_TIME_SHAPE); otherwise DRF's field."""

    def to_internal_value(self, value):
        if isinstance(value, str) and not DATE_TIME_SHAPE.match(value):
            self.fail("invalid", format="YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]")
        return super().to_internal_value(value)


class FiniteFloatField(_JsonTyped, serializers.FloatField):
    """A finite JSON number: "12.5", true, NaN and ±Infinity are refused."""

    json_types = (int, float)
    expected = "number"
    default_error_messages = {"not_finite": "Must be a finite number."}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("not_finite")
        return value


@extend_schema_field({"type": "number", "format": "double", "minimum": 0, "exclusiveMinimum": True})
class PositiveFloatField(FiniteFloatField):
    """A finite JSON number greater than 0 (a radius, a distance): the models' own rule."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if validate_positive not in self.validators:  # (a caller may have given it)
            self.validators.append(validate_positive)


MONEY_MAX_DIGITS, MONEY_DECIMAL_PLACES = 10, 2
_DECIMAL_STRING = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@extend_schema_field(
    {
        "oneOf": [
            {"type": "number", "minimum": 0, "maximum": 99999999.99},
            {"type": "string", "pattern": r"^\d{1,8}(\.\d{1,2})?$", "example": "49.50"},
        ],
        "description": "An amount of money: a JSON number, or a decimal string (exact) such as \"49.50\"; at most "
        "two decimal places either way (a number with more is a 400, not rounded).",
    }
)
class MoneyField(serializers.DecimalField):
    """Money, at most two decimal places: a JSON number or a decimal string ("49.50", exact,
    the usual form for money); a boolean, an object or an array is refused."""

    default_error_messages = {"wrong_type": "Must be a number or a decimal string, not {actual}."}

    def __init__(self, **kwargs):
        kwargs.setdefault("max_digits", MONEY_MAX_DIGITS)
        kwargs.setdefault("decimal_places", MONEY_DECIMAL_PLACES)
        kwargs.setdefault("min_value", 0)
        super().__init__(**kwargs)

    def validate_empty_values(self, data):
        """An empty or blank string is invalid money, not "omitted" (DRF's DecimalField takes it
        for null when null is allowed: `deliveryFee: ""` was a delivery at the pricing rule's fee,
        and slipped past "not with quoteId")."""
        if isinstance(data, str) and not data.strip():
            self.fail("invalid")
        return super().validate_empty_values(data)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float, str)):
            self.fail("wrong_type", actual=_json_type_name(data))
        if isinstance(data, str) and not _DECIMAL_STRING.fullmatch(data):
            self.fail("invalid")  # plain notation only: no exponent, no NaN, no spaces
        value = super().to_internal_value(data)
        return value + 0 if value.is_zero() else value  # (-0 and -0.00 are 0: never shown as -0.0)


class LocationInputSerializer(PlainValidation, serializers.Serializer):
    lat = FiniteFloatField(min_value=-90, max_value=90)
    lon = FiniteFloatField(min_value=-180, max_value=180)


@extend_schema_field(
    {
        "type": "object",
        "required": ["lat", "lon"],
        "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
        },
    }
)
class PointField(serializers.Field):
    """A {lat, lon} object on the wire, a WGS84 Point inside."""

    default_error_messages = {"invalid": "Must be an object with numeric lat and lon."}

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            self.fail("invalid")
        inner = LocationInputSerializer(data=data)
        if not inner.is_valid():
            raise serializers.ValidationError(inner.errors)
        return Point(inner.validated_data["lon"], inner.validated_data["lat"], srid=4326)

    def to_representation(self, value):
        if value is None:
            return None
        return {"lat": round(value.y, 7), "lon": round(value.x, 7)}


@extend_schema_field(
    {
        "type": "object",
        "nullable": True,
        "required": ["lat", "lon"],
        "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
        },
    }
)
class NullablePointField(PointField):
    """A {lat, lon} object, or null where the reader may not see it (output)."""


def point_json(point):
    return None if point is None else {"lat": round(point.y, 7), "lon": round(point.x, 7)}
