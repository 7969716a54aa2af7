"""Customer tracking over HTTP: the status endpoint, the rating, and the tracking page.

The customer's credential is the tracking token in `?token=` (docs/tracking.md); these views
are reachable without an API token and are throttled at the anonymous rate.
"""
from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.shortcuts import render
from django.utils import timezone, translation
from django.utils.translation import gettext_lazy as _
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_safe
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotAuthenticated
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from common.errors import iso
from common.exceptions import Forbidden, NotFound
from common.fields import point_json
from common.schema import errors
from common.throttling import (
    CustomerAddressThrottle,
    CustomerLinkThrottle,
    CustomerMissThrottle,
    CustomerNoLinkThrottle,
    UserRateThrottle,
    customer_miss_record,
)
from notifications.customers import delivery_customer_opt_out
from tracking import selectors as tracking
from workflows import deliveries

TAGS = ["tracking"]
PRIVATE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
CUSTOMER_STATUSES = ["pending", "assigned", "picked_up", "in_transit", "delivered", "failed", "cancelled"]

TOKEN = OpenApiParameter(
    "token", str, required=False,
    description="The customer's tracking token (from `trackingUrl`). Without it, an integration "
                "or ops API token is needed: no credentials at all is a 401, a caller who is neither "
                "a 403. A wrong token is a 404.",
)
RATING_TOKEN = OpenApiParameter(
    "token", str, required=False,
    description="The customer's tracking token (from `trackingUrl`), the only credential here: "
                "without it a 401 (a 403 for a logged-in caller), a wrong one a 404.",
)


class TrackingDriverSerializer(serializers.Serializer):
    name = serializers.CharField(help_text='First name and last initial, e.g. "John D."')
    rating = serializers.FloatField()
    vehicle = serializers.CharField()
    phone = serializers.CharField(help_text='Masked to the last four digits: "***-***-1234".')


class TrackingLocationSerializer(serializers.Serializer):
    lat = serializers.FloatField()
    lon = serializers.FloatField()
    accuracyMeters = serializers.FloatField(help_text="As the driver's app reported it; 100 when it sent none.")
    lastUpdated = serializers.DateTimeField()


class TrackingProofSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["photo", "signature"])
    addedAt = serializers.DateTimeField()
    url = serializers.URLField(
        required=False, help_text="Signed, expires after PROOF_URL_TTL_SECONDS; only with PROOF_URLS_FOR_CUSTOMERS."
    )


class DeliveryStatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=CUSTOMER_STATUSES, help_text="`ready` is shown as `pending`.")
    driver = TrackingDriverSerializer(required=False, help_text="Only while assigned, picked up or in transit.")
    location = TrackingLocationSerializer(required=False, help_text="The driver's last fix, while under way.")
    estimatedPickupTime = serializers.DateTimeField(required=False)
    estimatedDeliveryTime = serializers.DateTimeField(required=False)
    estimatedPrepTimeMinutes = serializers.IntegerField(required=False, help_text="Remaining, before pickup.")
    handoffCode = serializers.RegexField(
        r"^[0-9]{4}$", required=False,
        help_text="While the delivery is open and its proofRequired is code or code_or_photo: the 4-digit code "
        "the customer gives the driver at the door.",
    )
    proofs = TrackingProofSerializer(
        many=True, required=False,
        help_text="Photos and signatures the driver gave, when there are any: kind and time only; `url` only "
        "when PROOF_URLS_FOR_CUSTOMERS is on.",
    )
    trackingUrl = serializers.URLField()
    deliveryId = serializers.UUIDField()


class StrictIntegerField(serializers.IntegerField):
    default_error_messages = {"not_an_integer": "Must be a whole number, not a string, a fraction or a boolean."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("not_an_integer")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    default_error_messages = {"not_a_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


class RatingSerializer(serializers.Serializer):
    stars = StrictIntegerField(min_value=1, max_value=5)
    comment = StrictCharField(max_length=1000, required=False, allow_blank=True, default="")


class RatingResponseSerializer(serializers.Serializer):
    success = serializers.BooleanField()
    deliveryId = serializers.UUIDField()
    stars = serializers.IntegerField()
    comment = serializers.CharField()
    createdAt = serializers.DateTimeField()


class _CustomerView(APIView):
    """Every answer, errors included, is private: the 404s were cacheable, and sent the page's
    referrer on (the customer's link is a credential). Customers are counted per link and per
    address (common.throttling), not in the login's anonymous count."""

    throttle_classes = [CustomerNoLinkThrottle, CustomerMissThrottle, CustomerLinkThrottle, CustomerAddressThrottle,
                        UserRateThrottle]

    def get_authenticators(self):
        """With `?token=` the caller is the customer, logged in or not: a stale or bad
        `Authorization` header beside a good link is not a 401 (and no session, so no CSRF)."""
        request = getattr(self, "request", None)  # (none while the schema is generated)
        if request is not None and "token" in request.GET:
            return []
        return super().get_authenticators()

    def delivery_of_link(self, request, seller_order_id: str):
        try:
            return tracking.delivery_for_customer(seller_order_id=seller_order_id, token=request.query_params.get("token"))
        except NotFound:
            customer_miss_record(request)
            raise

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in PRIVATE_HEADERS.items():
            response[name] = value
        return response


class DeliveryStatusView(_CustomerView):
    """`GET /v2/orders/{sellerOrderId}/delivery-status`: the customer (`?token=`), the owning
    integration, or ops (the most recently created delivery with that sellerOrderId)."""

    permission_classes = [AllowAny]

    @extend_schema(operation_id="orders_delivery_status", parameters=[TOKEN],
                   responses={200: DeliveryStatusSerializer, **errors(401, 403, 404)}, tags=TAGS)
    def get(self, request, seller_order_id):
        token = request.query_params.get("token")
        if token is not None:
            delivery = self.delivery_of_link(request, seller_order_id)
        elif not request.user.is_authenticated:
            raise NotAuthenticated()  # no link, no credentials: a 401 like any API call without them
        else:
            delivery = tracking.delivery_for_caller(user=request.user, seller_order_id=seller_order_id)
        return Response(tracking.tracking_status(delivery))


class RatingView(_CustomerView):
    """`POST /v2/orders/{sellerOrderId}/rating?token=` `{stars, comment?}`: once, after delivery."""

    permission_classes = [AllowAny]

    @extend_schema(operation_id="orders_rating", parameters=[RATING_TOKEN], request=RatingSerializer,
                   responses={201: RatingResponseSerializer, **errors(400, 401, 403, 404, 409)}, tags=TAGS)
    def post(self, request, seller_order_id):
        if request.query_params.get("token") is None:  # the link is the only credential here
            if not request.user.is_authenticated:
                raise NotAuthenticated()  # (SPEC: 401 without credentials; it was a 404)
            raise Forbidden("Only the customer, with the tracking link, may rate a delivery.")
        delivery = self.delivery_of_link(request, seller_order_id)
        data = RatingSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        rating = deliveries.delivery_rate(
            delivery_id=delivery.pk, stars=data.validated_data["stars"], comment=data.validated_data["comment"]
        )
        body = {"success": True, "deliveryId": str(delivery.pk), "stars": rating.stars, "comment": rating.comment,
                "createdAt": iso(rating.created_at)}
        return Response(body, status=status.HTTP_201_CREATED)


STATUS_LABELS = {
    "pending": _("Your order is being prepared"),
    "assigned": _("A driver is on the way to the store"),
    "picked_up": _("Your order has been picked up"),
    "in_transit": _("Your order is on its way"),
    "delivered": _("Delivered"),
    "failed": _("The delivery could not be completed"),
    "cancelled": _("This delivery was cancelled"),
}
# The status in a word or two, beside the sentence (the API's code is the element's data-status).
STATUS_NAMES = {
    "pending": _("Preparing"),
    "assigned": _("Driver assigned"),
    "picked_up": _("Picked up"),
    "in_transit": _("On the way"),
    "delivered": _("Delivered"),
    "failed": _("Not delivered"),
    "cancelled": _("Cancelled"),
}
# What the page's script writes, in the page's language.
PAGE_TEXT = {
    "at": _("at"), "min": _("min"), "done": _("done"), "store": _("Store"), "you": _("You"), "live": _("live"),
    "final": _("final"), "linkNotValid": _("link not valid"), "reconnecting": _("reconnecting…"),
    "tooManyPages": _("too many open pages, retrying in a minute"), "ratingNotSent": _("Could not send the rating."),
}


def page_language(request, delivery=None) -> str:
    """The language of a page under /track/: the delivery's `customerLanguage` (its messages'
    language: "es-MX" reads es) when the pages have it, else the browser's Accept-Language,
    else English."""
    tag = (delivery.customer_language if delivery is not None else "").strip().lower()
    if tag:
        try:
            return translation.get_supported_language_variant(tag)
        except LookupError:
            pass
    return translation.get_language_from_request(request)


def _clock(value: str | None) -> str:
    """'2026-02-01T10:05:00Z' → '10:05 UTC' (the page's script shows local time instead)."""
    if not value:
        return ""
    return datetime.fromisoformat(value).strftime("%H:%M UTC")


@require_safe
def tracking_page(request, delivery_id):
    """`/track/<deliveryId>?token=`: the customer's page. Server-rendered status and ETA; the
    map and live updates need JavaScript (the socket) and the map a CDN, neither is required."""
    delivery = tracking.delivery_for_tracking_link(delivery_id=delivery_id, token=request.GET.get("token"))
    language = page_language(request, delivery)
    with translation.override(language):
        response = _tracking_page(request, delivery)
    response["Content-Language"] = language
    for name, value in PRIVATE_HEADERS.items():
        response[name] = value
    return response


def _tracking_page(request, delivery):
    if delivery is None:
        response = render(request, "track/not_found.html", status=404)
    else:
        now = timezone.now()
        body = tracking.tracking_status(delivery, now=now)
        rating = tracking.delivery_rating(delivery) if body["status"] == "delivered" else None
        context = {
            "body": body,
            "rating": {"stars_text": "★" * rating.stars} if rating else None,
            "label": STATUS_LABELS.get(body["status"], body["status"]),
            "status_name": STATUS_NAMES.get(body["status"], body["status"]),
            "final": delivery.status in tracking.FINAL_STATUSES,
            "pickup_clock": _clock(body.get("estimatedPickupTime")),
            "delivery_clock": _clock(body.get("estimatedDeliveryTime")),
            "location_clock": _clock(body["location"]["lastUpdated"]) if "location" in body else "",
            "page": {
                "deliveryId": str(delivery.pk),
                "sellerOrderId": delivery.seller_order_id,
                "labels": {status: str(label) for status, label in STATUS_LABELS.items()},
                "names": {status: str(name) for status, name in STATUS_NAMES.items()},
                "text": {name: str(text) for name, text in PAGE_TEXT.items()},
                "pickup": point_json(delivery.pickup_location),
                "dropoff": point_json(delivery.dropoff_location),
                "tileUrl": settings.TRACKING_TILE_URL,
                "snapshot": {k: v for k, v in body.items() if k != "trackingUrl"},  # keep the token out of the page
                "rated": rating is not None,  # (the page offers no second rating: it would be a 409)
            },
            "leaflet_url": settings.TRACKING_LEAFLET_URL.rstrip("/"),
        }
        response = render(request, "track/page.html", context)
    return response


@csrf_exempt  # (the link's token is the credential, no cookie: nothing for another site to ride on)
@require_http_methods(["GET", "HEAD", "POST"])
def opt_out_page(request, delivery_id):
    """`/track/<deliveryId>/opt-out?token=`: the customer asks for no more messages (text and
    e-mail, to the number and address of this delivery, about any delivery). GET asks to
    confirm; POST does it (the page's button, or a mail client's one-click unsubscribe, RFC
    8058, from the e-mails' List-Unsubscribe header). Done again, it says so again."""
    delivery = tracking.delivery_for_tracking_link(delivery_id=delivery_id, token=request.GET.get("token"))
    language = page_language(request, delivery)
    with translation.override(language):
        if delivery is None:
            response = render(request, "track/not_found.html", status=404)
        else:
            done = request.method == "POST"
            channels = delivery_customer_opt_out(delivery=delivery) if done else []
            response = render(request, "track/opt_out.html", {
                "done": done, "channels": channels, "store_name": delivery.store_name,
                "has_contact": bool(delivery.customer_phone or delivery.customer_email),
            })
    response["Content-Language"] = language
    for name, value in PRIVATE_HEADERS.items():
        response[name] = value
    return response
