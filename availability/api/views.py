from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from availability import selectors
from availability.api import serializers as s
from availability.api.fastlane import FIX_HANDED_OVER
from availability.selectors import driver_get_for_user, driver_get_own
from common.actors import Actor
from common.pagination import paginate, paginated_schema
from common.permissions import IsDriver, IsOps, IsOpsOrDriver
from common.schema import PAGE_PARAMETERS, errors
from workflows import drivers as driver_workflows

TAGS = ["availability"]


def _status(driver):
    return {"success": True, "status": driver.availability, "driverId": str(driver.pk)}


class TakeBreakView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_take_break", request=s.TakeBreakSerializer,
                   responses={200: s.TakeBreakResponseSerializer, **errors(400, 404, 409)}, tags=TAGS)
    def post(self, request, driver_id):
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        data = s.TakeBreakSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        driver = driver_workflows.availability_take_break(
            driver_id=driver.pk, duration_minutes=data.validated_data["durationMinutes"],
            reason=data.validated_data["reason"], actor=Actor.for_user(request.user),
        )
        return Response({**_status(driver), "breakUntil": s.serializers.DateTimeField().to_representation(driver.availability_until)})


class EndShiftView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_end_shift", request=None,
                   responses={200: s.StatusResponseSerializer, **errors(404, 409)}, tags=TAGS)
    def post(self, request, driver_id):
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        driver = driver_workflows.availability_end_shift(driver_id=driver.pk, actor=Actor.for_user(request.user))
        return Response(_status(driver))


class ResumeView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_resume", request=None,
                   responses={200: s.StatusResponseSerializer, **errors(404, 409)}, tags=TAGS)
    def post(self, request, driver_id):
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        driver = driver_workflows.availability_resume(driver_id=driver.pk, actor=Actor.for_user(request.user))
        return Response(_status(driver))


class OverrideView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="drivers_availability_override", request=s.OverrideSerializer,
                   responses={200: s.OverrideResponseSerializer, **errors(400, 404, 409)}, tags=TAGS)
    def post(self, request, driver_id):
        data = s.OverrideSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        driver = driver_workflows.availability_override(
            driver_id=driver_id, to_state=v["state"], reason=v["reason"],
            duration_minutes=v.get("durationMinutes"), actor=Actor.for_user(request.user),
        )
        until = driver.availability_until
        return Response({**_status(driver), "until": s.serializers.DateTimeField().to_representation(until) if until else None})


class HistoryView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_availability_history",
                   parameters=[*PAGE_PARAMETERS],
                   responses={200: paginated_schema("AvailabilityHistoryPage", "history", s.HistoryEntrySerializer),
                              **errors(400, 404)}, tags=TAGS)
    def get(self, request, driver_id):
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        qs = selectors.availability_history_for_driver(driver_id=driver.pk)
        return paginate(request, qs, s.HistoryEntrySerializer, key="history", ordering=("-timestamp", "-id"))


class LocationView(APIView):
    """The hottest write: validate, one conditional UPDATE, Redis after commit."""

    permission_classes = [IsDriver]

    @extend_schema(operation_id="drivers_location", request=s.LocationSerializer,
                   responses={200: s.LocationResponseSerializer, **errors(400, 404)}, tags=["drivers"])
    def post(self, request, driver_id):
        driver = driver_get_own(user=request.user, driver_id=driver_id)
        data = s.LocationSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        now = timezone.now()
        recorded_at = v.get("recordedAt") or now
        result = driver_workflows.driver_location_record(
            driver_id=driver.pk, lat=v["lat"], lon=v["lon"], recorded_at=recorded_at,
            accuracy_m=v.get("accuracyMeters"), speed=v.get("speed"), heading=v.get("heading"), now=now,
            handed_over=bool(getattr(request, "scope", {}).get(FIX_HANDED_OVER)),
        )
        body = {
            "success": True,
            "accepted": result.accepted,
            "driverId": str(driver.pk),
            "recordedAt": s.serializers.DateTimeField().to_representation(recorded_at),
        }
        if not result.accepted:
            body["reason"] = "older_than_last_fix"
        return Response(body)
