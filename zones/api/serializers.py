from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework_gis.serializers import GeoFeatureModelSerializer

from common.fields import PositiveFloatField, StrictBooleanField, StrictCharField, StrictIntegerField, StrictUUIDField
from zones.geometry import polygon_from_geojson
from dispatch.models import DispatchPolicy
from zones.models import (
    BATCH_SIZE_MAX,
    BATCH_SIZE_MIN,
    BROADCAST_MAX_MAX,
    BROADCAST_MAX_MIN,
    DETOUR_MINUTES_MAX,
    DETOUR_MINUTES_MIN,
    MATCHING_WINDOW_MAX,
    MIN_DRIVERS_ONLINE_MAX,
    OFFER_EXPIRES_MAX,
    OFFER_EXPIRES_MIN,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SEARCH_RADIUS_MAX_KM,
    TARGET_WAIT_MAX_SECONDS,
    DeliveryZone,
    DriverZonePreference,
    ZonePreference,
)

POLYGON_SCHEMA = {
    "type": "object",
    "description": "GeoJSON Polygon in WGS84 (SRID 4326): [lon, lat] positions (lon -180..180, lat -90..90; an "
    "altitude, if any, is dropped), each ring closed.",
    "required": ["type", "coordinates"],
    "properties": {
        "type": {"type": "string", "enum": ["Polygon"]},
        "coordinates": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "array",
                "minItems": 4,
                "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "number"}},
            },
        },
    },
}


@extend_schema_field(POLYGON_SCHEMA)
class PolygonGeoJSONField(serializers.Field):
    """A GeoJSON Polygon on the wire; a valid GEOS Polygon (SRID 4326) inside."""

    def to_internal_value(self, data):
        try:
            return polygon_from_geojson(data)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages)

    def to_representation(self, value):
        # The stored coordinates exactly (Python's shortest repr of each double), not GDAL's
        # GeoJSON, which rounds to 15 significant digits: a valid polygon whose corners differ
        # past that came back as a collapsed ring, which the API then refused as input.
        return {"type": "Polygon", "coordinates": [[[x, y] for x, y, *_ in ring] for ring in value.coords]}


@extend_schema_field({"type": "string", "enum": ["FeatureCollection"]})
class FeatureCollectionTypeField(serializers.ReadOnlyField):
    pass


class ZoneFeatureSerializer(GeoFeatureModelSerializer):
    """A zone as a GeoJSON Feature: `id`, `geometry` (Polygon), camelCase `properties`."""

    geometry = PolygonGeoJSONField(read_only=True)  # (rest_framework_gis' own field goes through GDAL's rounding)
    priorityLevel = serializers.IntegerField(source="priority_level")
    minDriversOnline = serializers.IntegerField(source="min_drivers_online")
    currentDriversOnline = serializers.IntegerField(source="current_drivers_online")
    belowMinimum = serializers.BooleanField(source="below_minimum")
    avgWaitTimeSeconds = serializers.IntegerField(source="avg_wait_time_seconds")
    targetWaitTimeSeconds = serializers.IntegerField(source="target_wait_time_seconds")
    demandLevel = serializers.IntegerField(source="demand_level")
    healthScore = serializers.IntegerField(source="health_score", allow_null=True)
    offerExpiresSeconds = serializers.IntegerField(source="offer_expires_seconds", allow_null=True)
    searchRadiusKm = serializers.FloatField(source="search_radius_km", allow_null=True)
    dispatchPolicy = serializers.CharField(
        source="dispatch_policy", help_text="sequential | batch | broadcast | batched_matching; empty: the global default"
    )
    offerBatchSize = serializers.IntegerField(source="offer_batch_size", allow_null=True)
    broadcastMaxDrivers = serializers.IntegerField(source="broadcast_max_drivers", allow_null=True)
    matchingWindowSeconds = serializers.IntegerField(source="matching_window_seconds", allow_null=True)
    stackingEnabled = serializers.BooleanField(source="stacking_enabled", allow_null=True)
    stackingMaxDetourMinutes = serializers.IntegerField(source="stacking_max_detour_minutes", allow_null=True)
    lastUpdated = serializers.DateTimeField(source="last_updated")

    class Meta:
        model = DeliveryZone
        geo_field = "geometry"
        id_field = "id"
        # Pages are assembled by the view as {"type": "FeatureCollection", "features", "next"}.
        list_serializer_class = serializers.ListSerializer
        fields = [
            "id", "geometry", "name", "priorityLevel", "minDriversOnline", "currentDriversOnline", "belowMinimum",
            "avgWaitTimeSeconds", "targetWaitTimeSeconds", "demandLevel", "healthScore", "offerExpiresSeconds",
            "searchRadiusKm", "dispatchPolicy", "offerBatchSize", "broadcastMaxDrivers", "matchingWindowSeconds",
            "stackingEnabled", "stackingMaxDetourMinutes", "lastUpdated",
        ]


class ZoneFeaturePageSerializer(serializers.Serializer):
    type = FeatureCollectionTypeField()
    features = ZoneFeatureSerializer(many=True)
    next = serializers.CharField(allow_null=True)


class ZoneWriteSerializer(serializers.Serializer):
    name = StrictCharField(max_length=255)
    geometry = PolygonGeoJSONField()
    priorityLevel = StrictIntegerField(min_value=PRIORITY_MIN, max_value=PRIORITY_MAX, required=False, default=3)
    minDriversOnline = StrictIntegerField(min_value=0, max_value=MIN_DRIVERS_ONLINE_MAX, required=False, default=5)
    targetWaitTimeSeconds = StrictIntegerField(min_value=1, max_value=TARGET_WAIT_MAX_SECONDS, required=False, default=300)
    offerExpiresSeconds = StrictIntegerField(
        min_value=OFFER_EXPIRES_MIN, max_value=OFFER_EXPIRES_MAX, required=False, allow_null=True, default=None
    )
    searchRadiusKm = PositiveFloatField(max_value=SEARCH_RADIUS_MAX_KM, required=False, allow_null=True, default=None)
    dispatchPolicy = serializers.ChoiceField(
        choices=[("", "global default"), *DispatchPolicy.choices], required=False, default="",
        help_text="How deliveries in this zone are offered; empty: the DISPATCH_POLICY setting.",
    )
    offerBatchSize = StrictIntegerField(
        min_value=BATCH_SIZE_MIN, max_value=BATCH_SIZE_MAX, required=False, allow_null=True, default=None
    )
    broadcastMaxDrivers = StrictIntegerField(
        min_value=BROADCAST_MAX_MIN, max_value=BROADCAST_MAX_MAX, required=False, allow_null=True, default=None
    )
    matchingWindowSeconds = StrictIntegerField(
        min_value=0, max_value=MATCHING_WINDOW_MAX, required=False, allow_null=True, default=None,
        help_text="batched_matching: seconds ready deliveries are collected; 0 offers at once.",
    )
    stackingEnabled = StrictBooleanField(required=False, allow_null=True, default=None)
    stackingMaxDetourMinutes = StrictIntegerField(
        min_value=DETOUR_MINUTES_MIN, max_value=DETOUR_MINUTES_MAX, required=False, allow_null=True, default=None
    )

    FIELD_NAMES = {
        "name": "name", "geometry": "geometry", "priorityLevel": "priority_level",
        "minDriversOnline": "min_drivers_online", "targetWaitTimeSeconds": "target_wait_time_seconds",
        "offerExpiresSeconds": "offer_expires_seconds", "searchRadiusKm": "search_radius_km",
        "dispatchPolicy": "dispatch_policy", "offerBatchSize": "offer_batch_size",
        "broadcastMaxDrivers": "broadcast_max_drivers", "matchingWindowSeconds": "matching_window_seconds",
        "stackingEnabled": "stacking_enabled", "stackingMaxDetourMinutes": "stacking_max_detour_minutes",
    }

    def service_kwargs(self) -> dict:
        return {self.FIELD_NAMES[k]: v for k, v in self.validated_data.items()}


class ZoneHealthSerializer(serializers.Serializer):
    zoneId = serializers.UUIDField()
    currentDriversOnline = serializers.IntegerField()
    minDriversRequired = serializers.IntegerField()
    avgWaitTimeSeconds = serializers.IntegerField()
    targetWaitTimeSeconds = serializers.IntegerField()
    demandLevel = serializers.IntegerField(min_value=1, max_value=10)
    healthScore = serializers.IntegerField(min_value=0, max_value=100)
    updatedAt = serializers.DateTimeField()


class ZonePreferenceItemSerializer(serializers.Serializer):
    zoneId = StrictUUIDField()
    preference = serializers.ChoiceField(choices=ZonePreference.choices)


class ZonePreferencesInputSerializer(serializers.Serializer):
    """The PUT body is a bare list; it is validated as `preferences` so errors name the item."""

    preferences = serializers.ListField(child=ZonePreferenceItemSerializer(), max_length=500, allow_empty=True)


class ZonePreferenceSerializer(serializers.ModelSerializer):
    driverId = serializers.UUIDField(source="driver_id")
    zoneId = serializers.UUIDField(source="zone_id")
    zoneName = serializers.CharField(source="zone.name")
    distanceToZoneCenter = serializers.FloatField(
        source="distance_to_zone_center", allow_null=True, help_text="km from the driver's home to the zone centre"
    )

    class Meta:
        model = DriverZonePreference
        fields = ["id", "driverId", "zoneId", "zoneName", "preference", "distanceToZoneCenter"]


class DriverZonePreferencesSerializer(serializers.Serializer):
    driverId = serializers.UUIDField()
    preferences = ZonePreferenceSerializer(many=True)
