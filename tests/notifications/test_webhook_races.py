"""A DELETE of an endpoint racing a change, a rotation or a test of it (real transactions): the
one that waited answers 404, nothing is left half done, never a 500."""
from __future__ import annotations

import pytest

from notifications import services
from notifications.models import OutboxEvent, WebhookEndpoint
from tests.api import client_for
from tests.concurrency import behind_lock
from tests.factories import IntegrationUserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("post", "/test", None),
    ("patch", "", {"description": "changed"}),
    ("post", "/rotate-secret", None),
    ("delete", "", None),
])
def test_a_request_waiting_behind_a_delete_of_its_endpoint_is_a_404(method, suffix, body):
    merchant = IntegrationUserFactory()
    endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://hooks.example.com/h", events=["*"])
    client = client_for(merchant)
    client.raise_request_exception = False

    answer = behind_lock(
        lambda: services.endpoint_delete(endpoint_id=endpoint.pk),
        lambda: getattr(client, method)(f"/v2/webhooks/{endpoint.pk}{suffix}", body, format="json"),
    )

    assert answer.status_code == 404, answer.content
    assert answer.json()["message"] == "Webhook endpoint not found."
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()
    assert not OutboxEvent.objects.filter(endpoint_id=endpoint.pk).exists()


def test_a_delete_waiting_behind_a_test_of_its_endpoint_deletes_the_test_event_too():
    merchant = IntegrationUserFactory()
    endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://hooks.example.com/h", events=["*"])

    answer = behind_lock(
        lambda: services.endpoint_send_test(endpoint_id=endpoint.pk),
        lambda: client_for(merchant).delete(f"/v2/webhooks/{endpoint.pk}"),
    )

    assert answer.status_code == 204
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()
    assert not OutboxEvent.objects.filter(endpoint_id=endpoint.pk).exists()


def test_a_delete_behind_a_fan_out_of_its_test_event_waits_for_it_and_deletes_both(no_worker):
    """The fan-out locks its events, then (its message's key) the endpoint; the delete locks the
    endpoint, then deletes the endpoint's test events: a deadlock, the delete a 503. The fan-out
    now takes the endpoint's key-share lock before the delete can take the endpoint."""
    from django.utils import timezone

    from notifications.models import WebhookMessage

    merchant = IntegrationUserFactory()
    endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://hooks.example.com/h", events=["*"])
    services.endpoint_send_test(endpoint_id=endpoint.pk)  # (no worker: it waits for the sweep)

    answer = behind_lock(
        lambda: services.webhooks_fan_out(now=timezone.now()),
        lambda: client_for(merchant).delete(f"/v2/webhooks/{endpoint.pk}"),
    )

    assert answer.status_code == 204, answer.content
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()
    assert not OutboxEvent.objects.filter(endpoint_id=endpoint.pk).exists()
    assert not WebhookMessage.objects.filter(endpoint_id=endpoint.pk).exists()


def test_a_sweep_beside_another_claims_the_next_messages_not_none(no_worker):
    """The claim's LIMIT came before SKIP LOCKED: a second sweep ranked the same first 20, skipped
    them all (the first held them) and stopped, with work left."""
    from django.utils import timezone

    merchant = IntegrationUserFactory()
    for n in range(6):
        endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url=f"https://h{n}.example.com/h",
                                            events=["*"])
        for _ in range(services.CLAIM_PER_ENDPOINT):
            services.endpoint_send_test(endpoint_id=endpoint.pk)
    while services.webhooks_fan_out(now=timezone.now()):
        pass
    first = []

    def hold():
        first.extend(services.webhooks_claim_due(now=timezone.now(), limit=20))

    second = behind_lock(hold, lambda: services.webhooks_claim_due(now=timezone.now(), limit=20))

    assert len(first) == 20 and len(second) == 10 and not set(first) & set(second)
