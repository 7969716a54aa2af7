from django.http import JsonResponse
from django.shortcuts import redirect
from django.views.decorators.csrf import csrf_exempt

from common.errors import error_body


def home(request):
    """`/`: staff to the ops console, everyone else to the API docs."""
    user = request.user
    return redirect("admin:index" if user.is_authenticated and user.is_active and user.is_staff else "docs")


@csrf_exempt
def socket_over_http(request, rest):
    """`/ws/…` asked over plain HTTP (a browser tab, curl without the upgrade headers): a 426
    naming the protocol (`Upgrade: websocket`) in the API's error body, not an HTML 404. The
    path is echoed without its query, which may hold a token."""
    message = "This is a WebSocket endpoint: connect with a WebSocket client (Connection: Upgrade, Upgrade: websocket)."
    response = JsonResponse(error_body(426, request.path, message), status=426)
    response["Upgrade"] = "websocket"
    return response
