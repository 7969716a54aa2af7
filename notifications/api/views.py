"""`/v2/webhooks`: integrations manage their own endpoints (another's is a 404); ops see and
manage all. `/v2/drivers/{id}/devices`: a driver's phones for push. Thin views: validate, call one service or selector, render."""
from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from common.pagination import paginate, paginated_schema
from availability import selectors as driver_selectors
from common.permissions import IsDriver, IsOpsOrDriver, IsOpsOrIntegration
from common.roles import is_ops
from common.schema import PAGE_PARAMETERS, errors
from notifications import selectors, services
from notifications.api import serializers as s

TAGS = ["webhooks"]


class WebhookListCreateView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="webhooks_list", parameters=PAGE_PARAMETERS,
        responses={200: paginated_schema("WebhookEndpointPage", "webhooks", s.WebhookEndpointSerializer), **errors(400)},
        tags=TAGS,
    )
    def get(self, request):
        qs = selectors.endpoints_for_user(user=request.user)
        return paginate(request, qs, s.WebhookEndpointSerializer, key="webhooks")

    @extend_schema(
        operation_id="webhooks_create", request=s.WebhookEndpointCreateSerializer,
        responses={201: s.WebhookEndpointWithSecretSerializer, **errors(400, 409)}, tags=TAGS,
        description="An endpoint for signed events (Standard Webhooks). An integration's gets the events of its own "
                    "deliveries, an ops endpoint every delivery's. The secret is shown only in this response. "
                    "An account has at most WEBHOOK_MAX_ENDPOINTS_PER_OWNER (100) endpoints: one more is a 409.",
    )
    def post(self, request):
        data = s.WebhookEndpointCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        endpoint = services.endpoint_create(
            owner=request.user, all_deliveries=is_ops(request.user), url=v["url"], events=v["events"],
            description=v["description"], active=v["active"],
        )
        return Response(s.WebhookEndpointWithSecretSerializer(endpoint).data, status=status.HTTP_201_CREATED)


class WebhookDetailView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(operation_id="webhooks_retrieve", responses={200: s.WebhookEndpointSerializer, **errors(404)}, tags=TAGS)
    def get(self, request, webhook_id):
        endpoint = selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)
        return Response(s.WebhookEndpointSerializer(endpoint).data)

    @extend_schema(
        operation_id="webhooks_update", request=s.WebhookEndpointUpdateSerializer,
        responses={200: s.WebhookEndpointSerializer, **errors(400, 404)}, tags=TAGS,
    )
    def patch(self, request, webhook_id):
        data = s.WebhookEndpointUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)  # ownership → 404
        endpoint = services.endpoint_update(endpoint_id=webhook_id, **data.validated_data)
        return Response(s.WebhookEndpointSerializer(endpoint).data)

    @extend_schema(operation_id="webhooks_destroy", request=None, responses={204: None, **errors(404)}, tags=TAGS)
    def delete(self, request, webhook_id):
        selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)
        services.endpoint_delete(endpoint_id=webhook_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookRotateSecretView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="webhooks_rotate_secret", request=None,
        responses={200: s.WebhookEndpointWithSecretSerializer, **errors(404)}, tags=TAGS,
        description="A new secret, shown once; the previous one keeps signing too (both signatures are sent) for 24 h.",
    )
    def post(self, request, webhook_id):
        selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)
        endpoint = services.endpoint_rotate_secret(endpoint_id=webhook_id)
        return Response(s.WebhookEndpointWithSecretSerializer(endpoint).data)


class WebhookTestView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="webhooks_test", request=None, responses={202: s.WebhookTestSerializer, **errors(404, 409)}, tags=TAGS,
        description="Queue a signed `webhook.test` event to this endpoint; its attempts show in the log.",
    )
    def post(self, request, webhook_id):
        selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)
        event = services.endpoint_send_test(endpoint_id=webhook_id)
        return Response({"eventId": event.webhook_id, "type": event.type}, status=status.HTTP_202_ACCEPTED)


class WebhookAttemptsView(APIView):
    permission_classes = [IsOpsOrIntegration]

    @extend_schema(
        operation_id="webhooks_attempts", parameters=PAGE_PARAMETERS,
        responses={200: paginated_schema("WebhookAttemptPage", "attempts", s.WebhookAttemptSerializer), **errors(400, 404)},
        tags=TAGS,
    )
    def get(self, request, webhook_id):
        endpoint = selectors.endpoint_get_for_user(user=request.user, endpoint_id=webhook_id)
        return paginate(request, selectors.attempts_for_endpoint(endpoint=endpoint), s.WebhookAttemptSerializer,
                        key="attempts", ordering=("-attempted_at", "-id"))


class DeviceListCreateView(APIView):
    """`/v2/drivers/{id}/devices`: a driver registers its own phones for push (another
    driver's id is a 404); ops may list them."""

    permission_classes = [IsOpsOrDriver]

    def get_permissions(self):
        if self.request.method == "POST":
            return [IsDriver()]
        return super().get_permissions()

    @extend_schema(
        operation_id="drivers_devices_list", tags=["drivers"], parameters=PAGE_PARAMETERS,
        responses={200: paginated_schema("DevicePage", "devices", s.DeviceSerializer), **errors(400, 404)},
    )
    def get(self, request, driver_id):
        driver = driver_selectors.driver_get_for_user(user=request.user, driver_id=driver_id)
        return paginate(request, driver.push_devices.all(), s.DeviceSerializer, key="devices", ordering=("created_at", "id"),
                        keyset=True)

    @extend_schema(
        operation_id="drivers_devices_register", request=s.DeviceRegisterSerializer,
        responses={201: s.DeviceSerializer, 200: s.DeviceSerializer, **errors(400, 404)}, tags=["drivers"],
        description="Register this device's FCM token for offers, withdrawn offers and the end of a break. "
                    "The same token again is a 200; a token another driver had moves to this one. A driver keeps "
                    "its 10 most recently registered devices (an 11th replaces the one registered longest ago).",
    )
    def post(self, request, driver_id):
        driver = driver_selectors.driver_get_for_user(user=request.user, driver_id=driver_id)
        data = s.DeviceRegisterSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        device, created = services.device_register(driver=driver, **data.validated_data)
        return Response(s.DeviceSerializer(device).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class DeviceDeleteView(APIView):
    permission_classes = [IsOpsOrDriver]

    @extend_schema(operation_id="drivers_devices_destroy", request=None, responses={204: None, **errors(404)}, tags=["drivers"])
    def delete(self, request, driver_id, device_id):
        driver = driver_selectors.driver_get_for_user(user=request.user, driver_id=driver_id)
        services.device_delete(driver_id=driver.pk, device_id=device_id)
        return Response(status=status.HTTP_204_NO_CONTENT)
