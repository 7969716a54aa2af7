from functools import wraps

from django.core.exceptions import DisallowedHost
from django.http import HttpResponseBadRequest, JsonResponse
from django.template import TemplateDoesNotExist, loader
from django.shortcuts import redirect
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from common.errors import INVALID_HOST_MESSAGE, error_body, error_response
from common.middleware import error_body_path


# The API docs pages (Swagger UI, Redoc: bundles served here, spectacular's inline start-up
# script, styled-components' inline styles, Redoc's search worker from a blob) may load nothing
# from another host: Redoc's bundle draws its footer logo from cdn.redoc.ly whatever its options
# (STYLE: nothing from a CDN); the browser now refuses it and the footer shows the text alone.
DOCS_CSP = "; ".join([
    "default-src 'self'", "script-src 'self' 'unsafe-inline' blob:", "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:", "font-src 'self' data:", "connect-src 'self'", "worker-src 'self' blob:",
    "object-src 'none'", "base-uri 'self'", "form-action 'self'", "frame-ancestors 'none'",
])


def docs_page(view):
    """An API docs page's view, sent with DOCS_CSP."""
    @wraps(view)  # (its csrf_exempt: a POST stays DRF's 405, not a CSRF 403)
    def wrapped(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response["Content-Security-Policy"] = DOCS_CSP
        return response

    return wrapped


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


def bad_request(request, exception):
    """Django's 400 for what it refuses before any view (an invalid Host, found by
    CommonMiddleware; other suspicious operations): in the API's error body on API paths.
    Under ASGI an invalid Host never gets this far (common.middleware.AllowedHostGuard)."""
    if error_body_path(request.path):
        if isinstance(exception, DisallowedHost):
            return error_response(request, 400, INVALID_HOST_MESSAGE)
        return error_response(request, 400, "Bad request.")
    # Django's page (defaults.bad_request) without its `requires_csrf_token`: that runs the CSRF
    # check, which reads the form, and a form Django refused to read (url-encoded in a charset
    # other than UTF-8) raised again in every middleware layer until the ASGI application
    # failed (a 500).
    try:
        template = loader.get_template(defaults.ERROR_400_TEMPLATE_NAME)
    except TemplateDoesNotExist:
        return HttpResponseBadRequest(defaults.ERROR_PAGE_TEMPLATE % {"title": "Bad Request (400)", "details": ""})
    return HttpResponseBadRequest(template.render())
