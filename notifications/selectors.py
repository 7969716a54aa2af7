"""Reads of webhook endpoints and their attempt log, scoped to the caller: an integration sees
only its own endpoints (another's is a 404), ops see all."""
from __future__ import annotations

from common.exceptions import NotFound
from common.roles import is_ops
from notifications.models import WebhookAttempt, WebhookEndpoint


def endpoints_for_user(*, user):
    qs = WebhookEndpoint.objects.all()
    return qs if is_ops(user) else qs.filter(owner=user)


def endpoint_get_for_user(*, user, endpoint_id) -> WebhookEndpoint:
    endpoint = endpoints_for_user(user=user).filter(pk=endpoint_id).first()
    if endpoint is None:
        raise NotFound("Webhook endpoint not found.")
    return endpoint


def attempts_for_endpoint(*, endpoint):
    return WebhookAttempt.objects.filter(endpoint=endpoint).select_related("message__event")
