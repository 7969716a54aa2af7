from django.urls import re_path

from availability.consumers import DriverConsumer
from common.consumers import UnknownPathConsumer
from dispatch.consumers import OpsConsumer
from escalation.consumers import SupportConsumer
from tracking.consumers import TrackingConsumer

# The trailing slash may be left out (a client's easy slip); any other path is closed with
# 4404 (Channels' router raised for it: the upgrade was a 500 and a logged traceback).
websocket_urlpatterns = [
    re_path(r"^ws/ops/?$", OpsConsumer.as_asgi()),
    re_path(r"^ws/support/?$", SupportConsumer.as_asgi()),
    re_path(r"^ws/drivers/(?P<driver_id>[^/]+)/?$", DriverConsumer.as_asgi()),
    re_path(r"^ws/track/(?P<delivery_id>[^/]+)/?$", TrackingConsumer.as_asgi()),
    re_path(r"", UnknownPathConsumer.as_asgi()),
]
