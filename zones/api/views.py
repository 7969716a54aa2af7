"""Thin views: validate, call one service or selector, render (STYLE rule 2)."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from availability.selectors import driver_get_for_user
from common.pagination import KeysetPagination
from common.permissions import IsOps, IsOpsOrDriver
from common.schema import PAGE_PARAMETERS, errors
from zones import selectors, services
from zones.api import serializers as s

TAGS = ["zones"]


def _feature(zone):
    return s.ZoneFeatureSerializer(zone).data


class ZoneListCreateView(APIView):

    permission_classes = [IsOps]

    @extend_schema(
        operation_id="zones_list",
        parameters=[*PAGE_PARAMETERS],
        responses={200: s.ZoneFeaturePageSerializer, **errors(400)},
        tags=TAGS,
    )
    def get(self, request):
        """Every zone as a GeoJSON FeatureCollection (paginated, by name), with its live health."""
        paginator = KeysetPagination(results_key="features", ordering=("name", "id"))
        page = paginator.paginate_queryset(selectors.zones_list(), request)
        features = s.ZoneFeatureSerializer(page, many=True).data
        return Response({"type": "FeatureCollection", "features": features, "next": paginator.get_next_link()})

    @extend_schema(
        operation_id="zones_create",
        request=s.ZoneWriteSerializer,
        responses={201: s.ZoneFeatureSerializer, **errors(400, 409)},
        tags=TAGS,
    )
    def post(self, request):
        """Draw a zone (a GeoJSON Polygon in WGS84); a broken polygon is a 400 naming the problem."""
        data = s.ZoneWriteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        zone = services.zone_create(**data.service_kwargs())
        return Response(_feature(zone), status=status.HTTP_201_CREATED)


class ZoneDetailView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="zones_retrieve", responses={200: s.ZoneFeatureSerializer, **errors(404)}, tags=TAGS)
    def get(self, request, zone_id):
        return Response(_feature(selectors.zone_get(zone_id=zone_id)))

    @extend_schema(
        operation_id="zones_partial_update",
        request=s.ZoneWriteSerializer(partial=True),
        responses={200: s.ZoneFeatureSerializer, **errors(400, 404, 409)},
        tags=TAGS,
    )
    def patch(self, request, zone_id):
        data = s.ZoneWriteSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        zone = services.zone_update(zone_id=zone_id, **data.service_kwargs())
        return Response(_feature(zone))


class ZoneHealthView(APIView):
    """`GET /v2/zones/{id}/health`: from the Redis cache (`X-Cache: hit`), else computed now
    and cached for 60 s (`miss`), or computed without the cache when Redis is down
    (`unavailable`)."""

    permission_classes = [IsOps]

    @extend_schema(
        operation_id="zones_health",
        responses={
            200: OpenApiResponse(s.ZoneHealthSerializer, description="The seed's ZoneHealth."),
            **errors(404),
        },
        tags=TAGS,
    )
    def get(self, request, zone_id):
        result = selectors.zone_health_get(zone_id=zone_id)
        return Response(result.health, headers={"X-Cache": result.cache})


class DriverZonePreferencesView(APIView):
    """A driver's zone preferences: read them, or replace the whole set with PUT."""

    permission_classes = [IsOpsOrDriver]

    @extend_schema(
        operation_id="drivers_zone_preferences",
        responses={200: s.DriverZonePreferencesSerializer, **errors(404)},
        tags=TAGS,
    )
    def get(self, request, driver_id):
        """The driver's zone preferences, with distances from its home to each zone centre (km)."""
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        prefs = selectors.zone_preferences_of_driver(driver_id=driver.pk)
        return Response(s.DriverZonePreferencesSerializer({"driverId": driver.pk, "preferences": prefs}).data)

    @extend_schema(
        operation_id="drivers_zone_preferences_replace",
        request=s.ZonePreferenceItemSerializer(many=True),
        responses={200: s.DriverZonePreferencesSerializer, **errors(400, 404)},
        tags=TAGS,
    )
    def put(self, request, driver_id):
        """Replace the driver's preferences with this list; zones left out are AVAILABLE again."""
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        data = s.ZonePreferencesInputSerializer(data={"preferences": request.data})
        data.is_valid(raise_exception=True)
        prefs = services.zone_preferences_set(
            driver_id=driver.pk,
            preferences=[(p["zoneId"], p["preference"]) for p in data.validated_data["preferences"]],
        )
        return Response(s.DriverZonePreferencesSerializer({"driverId": driver.pk, "preferences": prefs}).data)
