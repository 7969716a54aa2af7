"""The SPEC's error body (SPEC "Wire conventions"): every 4xx an endpoint can answer comes in
the one shape, with the status, the path (and query string), a message and the details."""
from __future__ import annotations

import json
import uuid

import pytest
from rest_framework.test import APIClient

from tests.api import client_for
from tests.factories import DeliveryFactory, IntegrationUserFactory, online_driver
from tests.wire import assert_error_body, deliveries_of, delivery_body


def test_an_invalid_json_body_is_a_400_in_the_error_body(integration, integration_user):
    # given a body that is not JSON
    # when it is posted
    r = integration.post("/v2/deliveries", data=b'{"sellerOrderId": ', content_type="application/json")
    # then
    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["message"].startswith("JSON parse error")
    assert deliveries_of(integration_user).count() == 0


def test_a_json_array_instead_of_an_object_is_a_400_with_details(integration, integration_user):
    r = integration.post("/v2/deliveries", data=json.dumps([delivery_body()]), content_type="application/json")

    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["details"] == {"nonFieldErrors": ["Invalid data. Expected a dictionary, but got list."]}
    assert deliveries_of(integration_user).count() == 0


def test_missing_fields_are_a_400_listing_each_field_in_details(integration):
    r = integration.post("/v2/deliveries", {"storeName": "Corner Shop"}, format="json")

    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["details"] == {
        "sellerOrderId": ["This field is required."],
        "pickupLocation": ["This field is required."],
        "dropoffLocation": ["This field is required."],
    }
    assert "sellerOrderId: This field is required." in body["message"]


def test_the_error_path_keeps_the_query_string(ops):
    r = ops.get("/v2/deliveries?limit=0&status=ready")

    body = assert_error_body(r, 400, path="/v2/deliveries?limit=0&status=ready")
    assert body["details"] == {"limit": ["Must be an integer between 1 and 200."]}


def test_a_request_without_a_token_is_a_401_with_a_challenge(anon, db):
    r = anon.get("/v2/deliveries")

    body = assert_error_body(r, 401, path="/v2/deliveries")
    assert body["message"] == "Authentication credentials were not provided."
    assert r["WWW-Authenticate"] == "Token"


def test_a_request_with_an_unknown_token_is_a_401_with_a_challenge(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0000000000000000000000000000000000000000")

    r = client.get("/v2/deliveries")

    body = assert_error_body(r, 401, path="/v2/deliveries")
    assert body["message"] == "Invalid token."
    assert r["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("caller", ["driver_client", "integration"])
def test_a_driver_or_integration_calling_an_ops_endpoint_is_a_403(request, caller):
    client = request.getfixturevalue(caller)

    r = client.get("/v2/drivers")

    body = assert_error_body(r, 403, path="/v2/drivers")
    assert body["message"] == "Only ops staff may do this."


def test_an_unknown_delivery_id_is_a_404(ops):
    missing = uuid.uuid4()

    r = ops.get(f"/v2/deliveries/{missing}")

    body = assert_error_body(r, 404, path=f"/v2/deliveries/{missing}")
    assert body["message"] == "Delivery not found."


def test_another_integrations_delivery_is_a_404_not_a_403(integration, db):
    # given a delivery owned by some other integration
    theirs = DeliveryFactory(created_by=IntegrationUserFactory())
    # when our integration asks for it
    r = integration.get(f"/v2/deliveries/{theirs.pk}")
    # then its existence is not revealed
    assert_error_body(r, 404, path=f"/v2/deliveries/{theirs.pk}")


@pytest.mark.parametrize("path", ["/v2/deliveries/not-a-uuid", "/v2/no-such-endpoint", "/v2/deliveries/", "/v2"])
def test_unknown_paths_under_v2_are_a_404_in_the_error_body(ops, path):
    r = ops.get(path)

    body = assert_error_body(r, 404, path=path)
    assert body["message"] == "Not found."


@pytest.mark.parametrize("path", ["/nope", "/v3/deliveries", "/favicon.ico", "/v2deliveries"])
def test_a_url_that_matches_nothing_outside_the_pages_is_a_404_in_the_error_body(client, path):
    """It was Django's HTML "Not Found" (a client with a wrong base path got no JSON)."""
    body = assert_error_body(client.get(path), 404, path=path)
    assert body["message"] == "Not found."


@pytest.mark.parametrize("path", ["/support/nope", "/admin/nope/", "/track/nope"])
def test_an_unknown_page_is_still_an_html_404(admin_client, path):
    r = admin_client.get(path)
    assert r.status_code == 404 and r["Content-Type"].startswith("text/html")


def test_an_unsupported_method_is_a_405_naming_the_allowed_ones(ops):
    r = ops.delete("/v2/deliveries")

    body = assert_error_body(r, 405, path="/v2/deliveries")
    assert body["message"] == 'Method "DELETE" not allowed.'
    assert {"GET", "POST"} <= {m.strip() for m in r["Allow"].split(",")}


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_a_405_from_outside_drf_keeps_its_allow_header(ops, method):
    """The schema view is Django's (drf-spectacular serves it with GET only): the error body
    replaces its HTML answer and keeps the header that says what to use instead."""
    r = getattr(ops, method)("/v2/schema/")

    assert_error_body(r, 405, path="/v2/schema/")
    assert {"GET"} <= {m.strip() for m in r["Allow"].split(",")}


def test_a_text_plain_body_is_a_415(integration, integration_user):
    r = integration.post("/v2/deliveries", data="sellerOrderId=1", content_type="text/plain")

    body = assert_error_body(r, 415, path="/v2/deliveries")
    assert body["message"] == 'Unsupported media type "text/plain" in request.'
    assert deliveries_of(integration_user).count() == 0


@pytest.mark.parametrize("content_type", ["application/xml", "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_json_is_a_415_also_where_the_endpoint_reads_none(content_type, db):
    """end-shift reads no body: it ran with an XML one (conventions audit). Without a body it runs."""
    driver = online_driver()
    me = client_for(driver.user)
    url = f"/v2/drivers/{driver.pk}/availability/end-shift"

    body = assert_error_body(me.post(url, data="<xml/>", content_type=content_type), 415, path=url)

    assert body["message"] == f'Unsupported media type "{content_type}" in request.'
    driver.refresh_from_db()
    assert driver.availability == "available"
    assert me.post(url, content_type=content_type).status_code == 200  # (no body: nothing to refuse)


def test_a_multipart_body_is_a_415_except_where_files_are_taken(db):
    """Multipart passed the check for every route (schemathesis run): end-shift ran with one,
    and a JSON endpoint refused it only after the credentials (401 before 415)."""
    driver = online_driver()
    url = f"/v2/drivers/{driver.pk}/availability/end-shift"
    form = {"a": "1"}  # (the test client's default: multipart)

    assert_error_body(client_for(driver.user).post(url, form), 415, path=url)
    assert_error_body(APIClient().post("/v2/deliveries", form), 415, path="/v2/deliveries")
    driver.refresh_from_db()
    assert driver.availability == "available"


def test_errors_of_no_one_field_are_under_a_camel_case_key_everywhere(settings):
    from common.exceptions import NON_FIELD_ERRORS

    assert NON_FIELD_ERRORS == settings.REST_FRAMEWORK["NON_FIELD_ERRORS_KEY"] == "nonFieldErrors"


def test_a_format_that_no_renderer_has_is_ignored_as_other_unknown_parameters_are(integration, ops):
    """DRF answered `?format=xml` with 404 "Not found." for a URL that exists, where any other
    parameter a view does not read is ignored (a fuzzing audit). A format the view renders
    still selects it."""
    for query in ("format=xml", "format=api", "format="):
        r = integration.get(f"/v2/deliveries?{query}")
        assert r.status_code == 200 and r["Content-Type"] == "application/json", (query, r.content[:200])
    assert ops.get("/v2/schema/?format=json")["Content-Type"].startswith("application/vnd.oai.openapi+json")
    assert ops.get("/v2/schema/")["Content-Type"].startswith("application/vnd.oai.openapi;")


def test_an_echoed_input_is_cut_not_sent_back_whole(ops, db):
    """An invalid choice is echoed in the message and the details: a 1 MB `state` came back
    twice in full, a 2 MB answer (an audit: 10 MB for a 5 MB proof `kind`)."""
    driver = online_driver()
    state = "k" * 1_000_000

    r = ops.post(f"/v2/drivers/{driver.pk}/availability", {"state": state, "reason": "x"}, format="json")

    body = assert_error_body(r, 400, path=f"/v2/drivers/{driver.pk}/availability")
    assert len(r.content) < 5_000
    shown = body["details"]["state"][0]
    assert shown.startswith('"kkkk') and "…" in shown and shown.endswith('" is not a valid choice.')
