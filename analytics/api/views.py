from datetime import timedelta

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from analytics import console
from analytics import selectors as analytics
from analytics.services import short_name
from common.exceptions import NotFound
from common.pagination import paginate, paginated_schema
from common.permissions import IsOps
from common.schema import PAGE_PARAMETERS, errors
from zones.models import DeliveryZone

MAX_RANGE = timedelta(days=366)


class RateField(serializers.FloatField):
    """A rate to 4 places, as the performance rows and the socket event give it."""

    def to_representation(self, value):
        return round(super().to_representation(value), 4)


class MetricsSerializer(serializers.Serializer):
    deliveriesCompleted = serializers.IntegerField(source="m_deliveries_completed")
    acceptanceRate = RateField(source="m_acceptance_rate")
    onTimeRate = RateField(source="m_on_time_rate")
    customerRating = serializers.FloatField(source="rating")
    avgResponseTimeMs = serializers.IntegerField(source="m_avg_response_time_ms")
    totalEarnings = serializers.FloatField(source="m_total_earnings")


class DriverAnalyticsSerializer(serializers.Serializer):
    driverId = serializers.UUIDField(source="pk")
    driverName = serializers.SerializerMethodField()
    availability = serializers.CharField()
    metrics = MetricsSerializer(source="*")
    offersAnswered = serializers.IntegerField(source="m_answered")
    updatedAt = serializers.DateTimeField(source="m_updated_at", allow_null=True)

    def get_driverName(self, obj) -> str:
        return short_name(obj.name)


class DriverAnalyticsQuery(serializers.Serializer):
    sort = serializers.ChoiceField(choices=list(analytics.SORTS), required=False, default="deliveriesCompleted")
    order = serializers.ChoiceField(choices=["asc", "desc"], required=False, default="desc")


class SummaryQuery(serializers.Serializer):
    # `from` is a Python keyword: the field is renamed below.
    to = serializers.DateTimeField(required=False)
    zone = serializers.UUIDField(required=False)

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = serializers.DateTimeField(required=False)
        return fields

    def validate_zone(self, value):
        if not DeliveryZone.objects.filter(pk=value).exists():
            raise serializers.ValidationError("No zone has this id.")
        return value

    def validate(self, attrs):
        end = attrs.get("to") or timezone.now()
        try:
            start = attrs.get("from") or end - timedelta(days=1)
        except OverflowError:  # (`to` on the first day of year 1)
            raise serializers.ValidationError({"to": ["Must be after 0001-01-02."]}) from None
        if start >= end:
            raise serializers.ValidationError({"from": ["Must be before `to`."]})
        if end - start > MAX_RANGE:
            raise serializers.ValidationError({"from": ["The range may be at most 366 days."]})
        attrs["start"], attrs["end"] = start, end
        return attrs


class DriverAnalyticsListView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="analytics_drivers", parameters=[DriverAnalyticsQuery, *PAGE_PARAMETERS],
                   responses={200: paginated_schema("DriverAnalyticsPage", "drivers", DriverAnalyticsSerializer), **errors(400)}, tags=["analytics"])
    def get(self, request):
        q = DriverAnalyticsQuery(data=request.query_params)
        q.is_valid(raise_exception=True)
        field = analytics.SORTS[q.validated_data["sort"]]
        sign = "-" if q.validated_data["order"] == "desc" else ""
        return paginate(request, analytics.drivers_with_performance(), DriverAnalyticsSerializer, key="drivers",
                        ordering=(f"{sign}{field}", f"{sign}id"), keyset=True)


class DriverAnalyticsDetailView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="analytics_driver", responses={200: DriverAnalyticsSerializer, **errors(404)}, tags=["analytics"])
    def get(self, request, driver_id):
        driver = analytics.drivers_with_performance().filter(pk=driver_id).first()
        if driver is None:
            raise NotFound("Driver not found.")
        return Response(DriverAnalyticsSerializer(driver).data)


class AssignmentLatencySerializer(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)
    count = serializers.IntegerField()

    class Meta:
        ref_name = "AssignmentLatency"


_latency = AssignmentLatencySerializer()
SummaryResponse = inline_serializer("AnalyticsSummary", {
    "from": serializers.DateTimeField(), "to": serializers.DateTimeField(), "zoneId": serializers.UUIDField(allow_null=True),
    "deliveries": inline_serializer("DeliveryCounts", {"total": serializers.IntegerField(), "byStatus": serializers.DictField(child=serializers.IntegerField())}),
    "assignmentLatencySeconds": _latency,
    "offers": inline_serializer("OfferCounts", {k: serializers.IntegerField() for k in ("total", "accepted", "rejected", "expired", "cancelled")}),
    "acceptanceRate": serializers.FloatField(allow_null=True),
    "revenue": serializers.FloatField(), "cost": serializers.FloatField(), "margin": serializers.FloatField(),
    "byZone": inline_serializer("ZoneEconomics", {
        "zoneId": serializers.UUIDField(allow_null=True), "zoneName": serializers.CharField(allow_null=True),
        "deliveries": serializers.IntegerField(), "revenue": serializers.FloatField(), "cost": serializers.FloatField(),
        # null for the row of deliveries outside every zone (analytics.selectors.summary)
        "margin": serializers.FloatField(), "assignmentLatencySeconds": AssignmentLatencySerializer(allow_null=True),
    }, many=True),
})


class AnalyticsSummaryView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="analytics_summary",
                   parameters=[OpenApiParameter("from", OpenApiTypes.DATETIME, description="ISO 8601; default: 24 h before `to`. "
                                                "Must be before `to`, and the range at most 366 days (else 400, `details.from`)."),
                               OpenApiParameter("to", OpenApiTypes.DATETIME, description="ISO 8601; default: now"),
                               OpenApiParameter("zone", OpenApiTypes.UUID,
                                                description="zone id; one that does not exist is a 400 (`details.zone`)")],
                   responses={200: SummaryResponse, **errors(400)}, tags=["analytics"])
    def get(self, request):
        q = SummaryQuery(data=request.query_params)
        q.is_valid(raise_exception=True)
        v = q.validated_data
        zone = v.get("zone")
        body = analytics.summary(start=v["start"], end=v["end"], zone_id=zone)
        field = serializers.DateTimeField()
        return Response({"from": field.to_representation(v["start"]), "to": field.to_representation(v["end"]),
                         "zoneId": str(zone) if zone else None, **body})


class LiveMapView(APIView):
    """`GET /v2/admin/live-map` (ops): what the live ops map starts from (drivers with their
    position and availability, open deliveries, zones with health); the page then follows
    `/ws/ops/`."""

    permission_classes = [IsOps]

    @extend_schema(
        operation_id="admin_live_map",
        responses={200: OpenApiTypes.OBJECT, **errors(401, 403)},
        tags=["analytics"],
    )
    def get(self, request):
        response = Response(console.live_map_state(now=timezone.now()))
        response["Cache-Control"] = "private, no-store"  # the fleet's names and positions
        return response
