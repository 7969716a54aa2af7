from django.urls import path

from availability.consumers import DriverConsumer
from dispatch.consumers import OpsConsumer

websocket_urlpatterns = [
    path("ws/ops/", OpsConsumer.as_asgi()),
    path("ws/drivers/<str:driver_id>/", DriverConsumer.as_asgi()),
]
