"""Cursor pagination (SPEC "Wire conventions"): limit, next links, no gaps or repeats, and a 400
for a bad limit or cursor."""
from __future__ import annotations

import pytest
import time_machine

from tests.factories import DeliveryFactory
from tests.wire import MID_MINUTE, assert_error_body


def _page_through(client, url: str, key: str) -> list[list[str]]:
    pages = []
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.content
        body = r.json()
        assert set(body) == {key, "next"}
        pages.append([item["id"] for item in body[key]])
        url = body["next"]
        assert len(pages) <= 10, "pagination does not terminate"
    return pages


def test_a_limited_page_has_that_many_items_and_a_next_link(ops, db):
    DeliveryFactory.create_batch(5)

    r = ops.get("/v2/deliveries?limit=2")

    assert r.status_code == 200
    body = r.json()
    assert len(body["deliveries"]) == 2
    assert body["next"].startswith("http://testserver/v2/deliveries?")
    assert "limit=2" in body["next"] and "cursor=" in body["next"]


def test_following_next_pages_through_every_delivery_once_newest_first(ops, db):
    created = DeliveryFactory.create_batch(5)

    pages = _page_through(ops, "/v2/deliveries?limit=2", "deliveries")

    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == [str(d.pk) for d in reversed(created)]


def test_deliveries_created_in_the_same_instant_are_paged_without_gaps_or_repeats(ops, db):
    with time_machine.travel(MID_MINUTE, tick=False):
        created = DeliveryFactory.create_batch(5)
    assert len({d.created_at for d in created}) == 1

    pages = _page_through(ops, "/v2/deliveries?limit=2", "deliveries")

    ids = sum(pages, [])
    assert len(ids) == 5
    assert set(ids) == {str(d.pk) for d in created}


@pytest.mark.parametrize("limit", ["0", "abc", "1000", "-1", "2.5"])
def test_a_limit_outside_1_to_200_is_a_400(ops, limit):
    r = ops.get(f"/v2/deliveries?limit={limit}")

    body = assert_error_body(r, 400, path=f"/v2/deliveries?limit={limit}")
    assert body["details"] == {"limit": ["Must be an integer between 1 and 200."]}


@pytest.mark.parametrize("cursor", ["garbage", "bm90LWEtY3Vyc29y", "cD1nYXJiYWdl", "bz0tMQ=="])
def test_a_garbage_cursor_is_a_400(ops, cursor):
    # plain garbage, base64 of "not-a-cursor", of "p=garbage" and of "o=-1"
    DeliveryFactory.create_batch(3)

    r = ops.get(f"/v2/deliveries?cursor={cursor}")

    assert_error_body(r, 400, path=f"/v2/deliveries?cursor={cursor}")
