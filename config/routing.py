from django.urls import path

from availability.consumers import DriverConsumer
from dispatch.consumers import OpsConsumer
from escalation.consumers import SupportConsumer
from tracking.consumers import TrackingConsumer

websocket_urlpatterns = [
    path("ws/ops/", OpsConsumer.as_asgi()),
    path("ws/support/", SupportConsumer.as_asgi()),
    path("ws/drivers/<str:driver_id>/", DriverConsumer.as_asgi()),
    path("ws/track/<str:delivery_id>/", TrackingConsumer.as_asgi()),
]
