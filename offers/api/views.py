from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from availability.selectors import driver_get_for_user, driver_get_own
from common.actors import Actor
from common.pagination import paginate, paginated_schema
from common.permissions import IsDriver, IsOps, IsOpsIntegrationOrDriver, IsOpsOrDriver
from common.roles import driver_of, is_ops
from common.schema import PAGE_PARAMETERS, errors
from dispatch.api.serializers import ReasonSerializer
from dispatch.selectors import delivery_check_visible
from offers import selectors
from offers.api import serializers as s
from workflows import offers as offer_workflows
from workflows.deliveries import delivery_reassign
from workflows.dispatching import delivery_dispatch

TAGS = ["offers"]
PAGE = PAGE_PARAMETERS


class DeliveryOffersView(APIView):
    """`POST /v2/deliveries/{id}/offers` (ops) and `GET` (ops, owning integration, its driver)."""

    permission_classes = [IsOpsIntegrationOrDriver]

    def get_permissions(self):
        return [IsOps()] if self.request.method == "POST" else super().get_permissions()

    @extend_schema(operation_id="deliveries_offers_list", parameters=PAGE,
                   responses={200: paginated_schema("DeliveryOfferPage", "offers", s.OfferSerializer), **errors(400, 404)}, tags=TAGS)
    def get(self, request, delivery_id):
        delivery_check_visible(user=request.user, delivery_id=delivery_id)
        driver = None if is_ops(request.user) else driver_of(request.user)
        qs = selectors.offers_for_delivery(delivery_id=delivery_id, driver_id=driver.pk if driver else None)
        return paginate(request, qs, s.OfferSerializer, key="offers")

    @extend_schema(operation_id="deliveries_offers_create", request=s.OfferCreateSerializer,
                   responses={201: s.OfferCreatedSerializer, **errors(400, 404, 409)}, tags=TAGS)
    def post(self, request, delivery_id):
        data = s.OfferCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        offer = offer_workflows.offer_create(
            delivery_id=delivery_id, driver_id=data.validated_data["driverId"], actor=Actor.for_user(request.user),
            expires_in_seconds=data.validated_data.get("expiresInSeconds"),
        )
        body = {"success": True, "offerId": offer.pk, "expiresAt": offer.expires_at, "payload": offer.offer_payload}
        return Response(s.OfferCreatedSerializer(body).data, status=status.HTTP_201_CREATED)


class DriverOffersView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_offers_list", parameters=[s.OfferListQuerySerializer, *PAGE],
                   responses={200: paginated_schema("DriverOfferPage", "offers", s.OfferSerializer), **errors(400, 404)}, tags=TAGS)
    def get(self, request, driver_id):
        driver = driver_get_for_user(user=request.user, driver_id=driver_id)
        q = s.OfferListQuerySerializer(data=request.query_params)
        q.is_valid(raise_exception=True)
        qs = selectors.offers_for_driver(driver_id=driver.pk, status=q.validated_data.get("status"), now=timezone.now())
        return paginate(request, qs, s.OfferSerializer, key="offers")


class AcceptOfferView(APIView):
    permission_classes = [IsDriver]

    @extend_schema(operation_id="drivers_offers_accept", request=s.AcceptSerializer,
                   responses={200: s.AcceptResponseSerializer, **errors(400, 404, 409)}, tags=TAGS)
    def post(self, request, driver_id, offer_id):
        driver = driver_get_own(user=request.user, driver_id=driver_id)
        s.AcceptSerializer(data=request.data).is_valid(raise_exception=True)
        result = offer_workflows.offer_accept(offer_id=offer_id, driver_id=driver.pk, actor=Actor.for_user(request.user))
        return Response({
            "success": True, "assignmentId": result.assignment_id, "deliveryId": str(result.offer.delivery_id),
            "driverId": str(driver.pk), "responseTimeMs": result.offer.driver_response_time_ms,
        })


class RejectOfferView(APIView):
    permission_classes = [IsDriver]

    @extend_schema(operation_id="drivers_offers_reject", request=s.RejectSerializer,
                   responses={200: s.RejectResponseSerializer, **errors(400, 404, 409)}, tags=TAGS)
    def post(self, request, driver_id, offer_id):
        driver = driver_get_own(user=request.user, driver_id=driver_id)
        data = s.RejectSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        reason = data.validated_data["reason"]
        result = offer_workflows.offer_reject(offer_id=offer_id, driver_id=driver.pk, reason=reason, actor=Actor.for_user(request.user))
        body = {"success": True, "reason": reason}
        if result.next_offer is not None:
            body["nextOfferId"] = str(result.next_offer.pk)
        return Response(body)


def _dispatch_body(delivery_id, result):
    return {
        "success": True, "deliveryId": str(delivery_id), "outcome": result.outcome,
        "offerId": str(result.offer.pk) if result.offer else None,
        "driverId": str(result.offer.driver_id) if result.offer else None,
        "failureReason": result.failure_reason, "searchRadiusKm": result.search_radius_km,
        "candidates": len(result.candidates),
    }


class DispatchView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="deliveries_dispatch", request=None,
                   responses={200: s.DispatchResponseSerializer, **errors(404, 409)}, tags=["dispatch"])
    def post(self, request, delivery_id):
        result = delivery_dispatch(delivery_id=delivery_id, actor=Actor.for_user(request.user), strict=True)
        return Response(_dispatch_body(delivery_id, result))


class ReassignView(APIView):
    permission_classes = [IsOps]

    @extend_schema(operation_id="deliveries_reassign", request=ReasonSerializer,
                   responses={200: s.ReassignResponseSerializer, **errors(400, 404, 409)}, tags=["dispatch"])
    def post(self, request, delivery_id):
        data = ReasonSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        previous, result = delivery_reassign(
            delivery_id=delivery_id, reason=data.validated_data["reason"], actor=Actor.for_user(request.user)
        )
        return Response({**_dispatch_body(delivery_id, result), "previousDriverId": str(previous) if previous else None})
