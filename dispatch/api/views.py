"""Thin views: validate, call one service or selector, render (STYLE rule 2)."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.selectors import audit_events_for_delivery, audit_summary
from availability import selectors as driver_selectors
from availability.services import driver_create
from common.actors import Actor
from common.exceptions import NotFound
from common.pagination import paginate, paginated_schema
from common.permissions import (
    IsDriver,
    IsOps,
    IsOpsIntegrationOrDriver,
    IsOpsOrDriver,
    IsOpsOrIntegration,
)
from common.roles import driver_of, is_ops
from common.schema import PAGE_PARAMETERS, errors
from dispatch import selectors, services
from dispatch.api import serializers as s
from dispatch.models import Delivery
from workflows import deliveries, quotes
from zones.selectors import drivers_inside_zone


def _query(serializer_class, request):
    q = serializer_class(data=request.query_params)
    q.is_valid(raise_exception=True)
    return q.validated_data


def _delivery_context(request):
    driver = None if is_ops(request.user) else driver_of(request.user)
    return {"request": request, "hide_tracking": driver is not None, "viewing_driver_id": driver.pk if driver else None}


class DriverListCreateView(APIView):
    permission_classes = [IsOps]

    @extend_schema(
        operation_id="drivers_list",
        parameters=[s.DriverListQuerySerializer, *PAGE_PARAMETERS],
        responses={200: paginated_schema("DriverPage", "drivers", s.DriverSerializer), **errors(400, 404)},
        tags=["drivers"],
    )
    def get(self, request):
        q = _query(s.DriverListQuerySerializer, request)
        qs = driver_selectors.drivers_list(availability=q.get("availability"))
        if q.get("zone"):
            qs = drivers_inside_zone(qs, zone_id=q.get("zone"))
        return paginate(request, qs, s.DriverSerializer, key="drivers")

    @extend_schema(
        operation_id="drivers_create",
        request=s.DriverCreateSerializer,
        responses={201: s.DriverCreatedSerializer, **errors(400, 409)},
        tags=["drivers"],
    )
    def post(self, request):
        data = s.DriverCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        driver, token = driver_create(
            name=v["name"], phone=v["phone"], vehicle=v["vehicle"], vehicle_type=v["vehicleType"],
            username=v.get("username"), home_location=v.get("homeLocation"),
        )
        body = s.DriverCreatedSerializer(driver, context={"api_token": token}).data
        return Response(body, status=status.HTTP_201_CREATED)


class DriverDetailView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_retrieve", responses={200: s.DriverSerializer, **errors(404)}, tags=["drivers"])
    def get(self, request, driver_id):
        driver = driver_selectors.driver_get_for_user(user=request.user, driver_id=driver_id)
        return Response(s.DriverSerializer(driver).data)


class DeliveryListCreateView(APIView):
    permission_classes = [IsOpsIntegrationOrDriver]

    def get_permissions(self):
        if self.request.method == "POST":
            return [IsOpsOrIntegration()]
        return super().get_permissions()

    @extend_schema(
        operation_id="deliveries_list",
        parameters=[s.DeliveryListQuerySerializer, *PAGE_PARAMETERS],
        responses={200: paginated_schema("DeliveryPage", "deliveries", s.DeliverySerializer), **errors(400)},
        tags=["deliveries"],
    )
    def get(self, request):
        q = _query(s.DeliveryListQuerySerializer, request)
        qs = selectors.deliveries_list(user=request.user, status=q.get("status"), seller_order_id=q.get("sellerOrderId"))
        return paginate(request, qs, s.DeliverySerializer, key="deliveries", context=_delivery_context(request))

    @extend_schema(
        operation_id="deliveries_create",
        request=s.DeliveryCreateSerializer,
        description="A ready delivery. Refused with a 400 (the field in `details`) when not serviceable: a pickup "
        "outside every zone while zones exist (`SERVICEABILITY_REQUIRE_ZONE`), or a pickup-to-drop-off leg over "
        "the zone's or the global `MAX_DELIVERY_DISTANCE_KM`. POST /v2/quotes answers the same rules beforehand.",
        responses={201: s.DeliverySerializer, **errors(400, 409)},
        tags=["deliveries"],
    )
    def post(self, request):
        data = s.DeliveryCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        delivery = deliveries.delivery_create(
            data=services.DeliveryInput(
                seller_order_id=v["sellerOrderId"], seller_id=v["sellerId"], store_name=v["storeName"],
                pickup_location=v["pickupLocation"], dropoff_location=v["dropoffLocation"],
                dropoff_address=v["dropoffAddress"], customer_name=v["customerName"],
                customer_phone=v["customerPhone"], customer_email=v["customerEmail"],
                customer_language=v["customerLanguage"], prep_time_minutes=v["prepTimeMinutes"],
                delivery_fee=v["deliveryFee"], proof_required=v.get("proofRequired", ""),
            ),
            created_by=request.user,
            actor=Actor.for_user(request.user),
            auto_dispatch=v["autoDispatch"],
            quote_id=v.get("quoteId"),
        )
        # the row as the workflow wrote it (its creator may read it): no second read
        return Response(s.DeliverySerializer(delivery, context=_delivery_context(request)).data, status=status.HTTP_201_CREATED)


class QuoteView(APIView):
    """`POST /v2/quotes`: would this delivery be taken, at what fee, and when would it arrive."""

    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="quotes_create",
        request=s.QuoteCreateSerializer,
        responses={200: s.QuoteSerializer, **errors(400)},
        tags=["deliveries"],
        description="The rules, ETA estimates and pricing of POST /v2/deliveries, without creating one. A "
        "serviceable answer carries a quoteId that locks deliveryFee for QUOTE_TTL_SECONDS (300) for one "
        "delivery of yours with the same pickup and drop-off; an unserviceable one says why in `reasons`.",
    )
    def post(self, request):
        data = s.QuoteCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        result = quotes.quote_create(
            created_by=request.user, pickup=v["pickupLocation"], dropoff=v["dropoffLocation"],
            prep_time_minutes=v["prepTimeMinutes"],
        )
        return Response(s.QuoteSerializer(s.QuoteSerializer.from_result(result)).data)


class DeliveryDetailView(APIView):
    permission_classes = [IsOpsIntegrationOrDriver]

    @extend_schema(operation_id="deliveries_retrieve", responses={200: s.DeliverySerializer, **errors(404)}, tags=["deliveries"])
    def get(self, request, delivery_id):
        delivery = selectors.delivery_get_for_user(user=request.user, delivery_id=delivery_id)
        return Response(s.DeliverySerializer(delivery, context=_delivery_context(request)).data)


class DeliveryProofsView(APIView):
    """`GET /v2/deliveries/{id}/proofs`: the delivery's photos and signatures, oldest first."""

    permission_classes = [IsOpsIntegrationOrDriver]

    @extend_schema(
        operation_id="deliveries_proofs",
        parameters=PAGE_PARAMETERS,
        responses={200: paginated_schema("DeliveryProofPage", "proofs", s.ProofSerializer), **errors(400, 404)},
        tags=["deliveries"],
        description="Photos and signatures of the delivery, oldest first, for whoever may read the delivery: "
        "all of them for ops and the owning integration, a driver's own only. "
        "`url` is signed and works for PROOF_URL_TTL_SECONDS (300): given to ops and the owning integration, "
        "null for drivers.",
    )
    def get(self, request, delivery_id):
        qs = selectors.proofs_for_user(user=request.user, delivery_id=delivery_id)
        context = {"request": request, "proof_urls": _delivery_context(request)["viewing_driver_id"] is None}
        return paginate(request, qs, s.ProofSerializer, key="proofs", ordering=("created_at", "id"), context=context)


class DeliveryAssignmentsView(APIView):
    """`GET /v2/deliveries/{id}/assignments`: the delivery's assignment record, oldest first."""

    permission_classes = [IsOpsIntegrationOrDriver]

    @extend_schema(
        operation_id="deliveries_assignments",
        parameters=PAGE_PARAMETERS,
        responses={200: paginated_schema("DeliveryAssignmentPage", "assignments", s.AssignmentSerializer), **errors(400, 404)},
        tags=["deliveries"],
        description="Every assignment of the delivery, oldest first: ops and the owning integration see all; "
        "a driver sees only its own (404 for a delivery it never had).",
    )
    def get(self, request, delivery_id):
        qs = selectors.assignments_for_user(user=request.user, delivery_id=delivery_id)
        return paginate(request, qs, s.AssignmentSerializer, key="assignments", ordering=("created_at", "id"))


class DeliveryCancelView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="deliveries_cancel",
        request=s.ReasonSerializer,
        responses={200: s.DeliverySerializer, **errors(400, 404, 409)},
        tags=["deliveries"],
    )
    def post(self, request, delivery_id):
        data = s.ReasonSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        selectors.delivery_get_for_user(user=request.user, delivery_id=delivery_id)  # ownership → 404
        deliveries.delivery_cancel(delivery_id=delivery_id, reason=data.validated_data["reason"], actor=Actor.for_user(request.user))
        delivery = selectors.delivery_get_for_user(user=request.user, delivery_id=delivery_id)
        return Response(s.DeliverySerializer(delivery, context=_delivery_context(request)).data)


class DeliveryStepView(APIView):
    """`POST /v2/drivers/{id}/deliveries/{deliveryId}/{step}` by the assigned driver."""

    permission_classes = [IsDriver]

    @extend_schema(
        operation_id="drivers_delivery_step",
        request=s.DeliveryStepSerializer,
        description="Move the delivery one step on. `reason` is required (non-empty) for delivery-failed "
        "(else 400, `details.reason`) and ignored by the other steps, as is `note`. A reason that is not one of "
        "the codes (customer_unavailable, address_not_found, refused, damaged, unsafe, other) is taken as `other`, "
        "its text kept as the note when none is given. A step out of order is a 409. "
        "delivery-completed of a delivery with proofRequired code takes `handoffCode`: missing or wrong is a 400 "
        "(`details.handoffCode`; each wrong code is counted), and after 5 wrong codes the delivery is flagged for "
        "ops and every code is a 409 until ops reset it (POST /v2/deliveries/{id}/handoff-code/reset). "
        "delivery-completed farther than DROPOFF_GEOFENCE_METERS (when set; default 0: off) from the drop-off, judged by the "
        "driver's latest location (none in the last DRIVER_STALE_AFTER_SECONDS: unknown), is a 409 naming the "
        "distance (`details.distanceMeters`, null when unknown, `details.limitMeters`, `details.lastFixAt`) unless "
        "the body gives `overrideReason`: then it completes, flagged for ops and audited (`geofence_override`). With "
        "proofRequired photo or signature, delivery-completed without one uploaded in transit is a 409 naming it; "
        "code_or_photo takes such a photo or else the code (neither: 409). delivery-failed of a delivery whose "
        "policy is in PROOF_FAILURE_PHOTO_POLICIES without a photo uploaded first is a 409.",
        parameters=[OpenApiParameter("step", str, OpenApiParameter.PATH, enum=list(services.STEP_NAMES))],
        responses={200: s.DeliverySerializer, **errors(400, 404, 409)},
        tags=["deliveries"],
    )
    def post(self, request, driver_id, delivery_id, step):
        driver = driver_selectors.driver_get_own(user=request.user, driver_id=driver_id)
        if step not in services.STEP_NAMES:
            raise NotFound("Unknown step.")
        data = s.DeliveryStepSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        reason = data.validated_data["reason"]
        if step == "delivery-failed" and not reason:
            raise serializers.ValidationError({"reason": ["A reason is required when a delivery fails."]})
        # the row as the step wrote it (the assigned driver may read it): no second read
        delivery = deliveries.delivery_advance(
            delivery_id=delivery_id, driver_id=driver.pk, step=step, reason=reason, note=data.validated_data["note"],
            handoff_code=data.validated_data["handoffCode"], override_reason=data.validated_data.get("overrideReason", ""),
            actor=Actor.for_user(request.user),
        )
        return Response(s.DeliverySerializer(delivery, context=_delivery_context(request)).data)


class DeliveryProofUploadView(APIView):
    """`POST /v2/drivers/{id}/deliveries/{deliveryId}/proof` (multipart) by the assigned driver."""

    permission_classes = [IsDriver]
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="drivers_delivery_proof",
        request={"multipart/form-data": s.ProofUploadSerializer},
        responses={201: s.ProofSerializer, **errors(400, 404, 409, 413, 503)},
        tags=["deliveries"],
        description="A photo or signature of the delivery, by its assigned driver (another driver: 404), while it "
        "is assigned, picked up or in transit, and for PROOF_FAILURE_EVIDENCE_SECONDS (900) after the driver failed "
        "it; otherwise (delivered, cancelled, failed longer ago) 409. `file` must be a JPEG, PNG or WebP image by "
        "its content (anything else, or a broken image: 400, details.file), at most PROOF_MAX_BYTES (413) and "
        "PROOF_MAX_PIXELS pixels (400). It is stored re-encoded, without EXIF/GPS or any other metadata. The "
        "photo or signature a delivery's proofRequired asks for must be uploaded while it is in transit.",
    )
    def post(self, request, driver_id, delivery_id):
        driver = driver_selectors.driver_get_own(user=request.user, driver_id=driver_id)
        data = s.ProofUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        proof = deliveries.delivery_proof_add(
            delivery_id=delivery_id, driver_id=driver.pk, kind=v["kind"], upload=v["file"], note=v["note"],
            actor=Actor.for_user(request.user),
        )
        return Response(s.ProofSerializer(proof, context={"request": request}).data, status=status.HTTP_201_CREATED)


class DeliveryHandoffCodeResetView(APIView):
    """`POST /v2/deliveries/{id}/handoff-code/reset` (ops): codes are taken again."""

    permission_classes = [IsOps]

    @extend_schema(
        operation_id="deliveries_handoff_code_reset",
        request=s.ReasonSerializer,
        responses={200: s.DeliverySerializer, **errors(400, 404, 409)},
        tags=["deliveries"],
        description="Clear the wrong handoff codes of a delivery (after 5 its codes are refused with 409): the "
        "driver may give the customer's code again. Audited (`handoff_code_reset`). Nothing to clear: 409.",
    )
    def post(self, request, delivery_id):
        data = s.ReasonSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        delivery = deliveries.delivery_handoff_code_reset(
            delivery_id=delivery_id, reason=data.validated_data["reason"], actor=Actor.for_user(request.user)
        )
        return Response(s.DeliverySerializer(delivery, context=_delivery_context(request)).data)


AuditResponse = paginated_schema(
    "DeliveryAuditResponse",
    "events",
    s.AuditEventSerializer,
    deliveryId=serializers.UUIDField(),
    summary=inline_serializer(
        name="DeliveryAuditSummary",
        fields={
            "totalEvents": serializers.IntegerField(),
            "byEventType": serializers.DictField(child=serializers.IntegerField()),
            "byActorType": serializers.DictField(child=serializers.IntegerField()),
        },
    ),
)


class DeliveryAuditView(APIView):
    permission_classes = [IsOps]

    @extend_schema(
        operation_id="admin_delivery_audit",
        parameters=[s.AuditQuerySerializer, *PAGE_PARAMETERS],
        responses={200: AuditResponse, **errors(400, 404)},
        tags=["audit"],
    )
    def get(self, request, delivery_id):
        q = _query(s.AuditQuerySerializer, request)
        if not Delivery.objects.filter(pk=delivery_id).exists():
            raise NotFound("Delivery not found.")
        qs = audit_events_for_delivery(delivery_id=delivery_id, event_type=q.get("eventType"))
        return paginate(
            request, qs, s.AuditEventSerializer, key="events", ordering=("timestamp", "seq"),
            extra={"deliveryId": str(delivery_id), "summary": audit_summary(qs)},
        )
