"""Serializer fields shared by every app: finite floats and {lat, lon} points."""
import math

from django.contrib.gis.geos import Point
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class FiniteFloatField(serializers.FloatField):
    default_error_messages = {"not_finite": "Must be a finite number."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or (isinstance(data, str) and data.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity", "+inf")):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("not_finite")
        return value


class LocationInputSerializer(serializers.Serializer):
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


def point_json(point):
    return None if point is None else {"lat": round(point.y, 7), "lon": round(point.x, 7)}
