"""What Twilio tells us about customers' texts, signed with the account's auth token
(`X-Twilio-Signature`), form-encoded:

- `POST /hooks/twilio/inbound`: the number's incoming-message webhook. A customer who texts
  STOP (or its kin) is opted out of SMS, START opts back in (notifications.customers
  .sms_reply_received); Twilio's Advanced Opt-Out sends the confirmation, so the answer is an
  empty TwiML `<Response/>`. Any other text is the customer's reply: kept with the delivery
  it answers, told to ops and to its driver (notifications.customers.customer_reply_record).
- `POST /hooks/twilio/status`: the status callback each SMS asks for (TWILIO_WEBHOOK_BASE_URL
  set). A message that did not reach the phone is marked so; 21610 records the opt-out.

An unsigned or wrongly signed request is a 403 and changes nothing; without TWILIO_AUTH_TOKEN
nothing can be checked and both are 404s. Not API endpoints: no token, no schema."""
from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from common.errors import error_response
from notifications.customers import sms_reply_received, sms_status_reported
from notifications.sms import twilio_request_signed

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _refused(request) -> HttpResponse | None:
    """The error answer for a request that is not Twilio's (or None: it is)."""
    if not settings.TWILIO_AUTH_TOKEN:
        return error_response(request, 404, "Twilio is not configured on this server.")
    if request.method != "POST":
        response = error_response(request, 405, f'Method "{request.method}" not allowed.')
        response["Allow"] = "POST"
        return response
    if request.content_type != "application/x-www-form-urlencoded":
        return error_response(request, 415, "Twilio posts application/x-www-form-urlencoded.")
    base = settings.TWILIO_WEBHOOK_BASE_URL.rstrip("/")
    url = base + request.get_full_path() if base else request.build_absolute_uri()
    if not twilio_request_signed(settings.TWILIO_AUTH_TOKEN, url, request.POST.lists(), request.headers.get("X-Twilio-Signature", "")):
        return error_response(request, 403, "The request is not signed by Twilio (X-Twilio-Signature).")
    return None


def _field(request, name: str) -> str:
    # (an SMS body is at most 1,600 characters; PostgreSQL's text holds no NUL)
    return request.POST.get(name, "")[:1600].replace("\x00", "")


@csrf_exempt  # (signed by Twilio: no cookie to ride on)
def twilio_inbound(request):
    refused = _refused(request)
    if refused is not None:
        return refused
    if _field(request, "From"):
        sms_reply_received(sender=_field(request, "From"), body=_field(request, "Body"), opt_out_type=_field(request, "OptOutType"),
                           provider_id=_field(request, "MessageSid"))
    return HttpResponse(EMPTY_TWIML, content_type="text/xml")


@csrf_exempt  # (signed by Twilio: no cookie to ride on)
def twilio_status(request):
    refused = _refused(request)
    if refused is not None:
        return refused
    sms_status_reported(message_id=request.GET.get("message", ""), provider_id=_field(request, "MessageSid"),
                        status=_field(request, "MessageStatus"), error_code=_field(request, "ErrorCode"))
    return HttpResponse(status=204)
