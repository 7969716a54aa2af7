"""Cursor pagination (SPEC "Wire conventions"): limit, next links, no gaps or repeats, and a 400
for a bad limit or cursor."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import time_machine

from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory
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


# Lists whose first sort field ties often carry the whole sort key in the cursor
# (common.pagination.KeysetPagination): analytics drivers, support tickets, zones.

def _ids_through(client, url: str, key: str, id_key: str, between_pages=None) -> list[str]:
    ids, pages = [], 0
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.content
        body = r.json()
        ids += [item[id_key] for item in body[key]]
        url, pages = body["next"], pages + 1
        if between_pages:
            between_pages(pages)
        assert pages <= 50, "pagination does not terminate"
    return ids


def test_drivers_sorted_by_earnings_are_all_reached_past_the_ties_at_zero(ops):
    """Drivers with a performance row of 0.00 and drivers with none (0) tie; DRF's position
    compared them as text ('0' ≠ '0.00') and the second page was empty."""
    from analytics.models import DriverPerformance

    drivers = DriverFactory.create_batch(7)
    for driver, earned in zip(drivers[:4], ("12.50", "0.00", "0.00", "3.00")):
        DriverPerformance.objects.create(driver=driver, total_earnings=Decimal(earned))

    for order in ("desc", "asc"):
        ids = _ids_through(ops, f"/v2/admin/analytics/drivers?sort=totalEarnings&order={order}&limit=2", "drivers", "driverId")
        assert sorted(ids) == sorted(str(d.pk) for d in drivers) and len(ids) == 7
        earned = {str(d.pk): i for i, d in enumerate(drivers)}
        assert ids[0 if order == "desc" else -1] == str(drivers[0].pk)
        assert earned[ids[1 if order == "desc" else -2]] == 3


def test_drivers_added_while_ops_page_through_ties_are_neither_repeated_nor_skip_others(ops):
    """All at 0 completed deliveries; drivers joining between pages sort first (the highest
    ids): DRF's offset past the ties shifted and repeated rows."""
    from uuid import UUID

    first = [DriverFactory(id=UUID(int=i + 1)) for i in range(6)]
    joined = []

    def join(page):
        joined.append(DriverFactory(id=UUID(int=2**127 + page)))

    ids = _ids_through(ops, "/v2/admin/analytics/drivers?limit=2", "drivers", "driverId", between_pages=join)

    assert len(ids) == len(set(ids))
    assert {str(d.pk) for d in first} <= set(ids)


def test_the_ticket_queue_pages_through_tickets_of_one_priority_in_queue_order(ops):
    from tests.support_fixtures import ticket_for

    tickets = [ticket_for(minutes_waiting=6 + i) for i in range(5)]
    assert len({t.priority_rank for t in tickets}) == 1

    ids = _ids_through(ops, "/v2/support/tickets?limit=2", "tickets", "id")

    assert ids == [str(t.pk) for t in reversed(tickets)]  # the longest waiting first


def _b64(raw: bytes) -> str:
    from base64 import urlsafe_b64encode

    return urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize("url", ["/v2/admin/analytics/drivers", "/v2/admin/analytics/drivers?sort=totalEarnings",
                                 "/v2/support/tickets", "/v2/zones"])
@pytest.mark.parametrize("raw", [
    b"p=abc", b"o=99999999999999999999", b'["x"]', b'["x", "y", "z", "w", "v"]', b'[NaN, "x"]',
    b'["a\\u0000b", "00000000-0000-0000-0000-000000000001"]',
    b'[{"a": 1}, "00000000-0000-0000-0000-000000000001"]', b'["9999-12-31T23:59:59-14:00", "x"]', b"\xff",
    b"[" * 3000 + b"]" * 3000,
])
def test_a_hand_made_or_foreign_cursor_on_a_keyset_list_is_a_400(ops, url, raw):
    from tests.support_fixtures import ticket_for

    ZoneFactory.create_batch(2)
    ticket_for()
    cursor = _b64(raw)
    sep = "&" if "?" in url else "?"

    r = ops.get(f"{url}{sep}cursor={cursor}")

    assert_error_body(r, 400, path=f"{url}{sep}cursor={cursor}")
    assert r.json()["details"] == {"cursor": ["Invalid cursor."]}


def test_a_position_out_of_its_fields_range_is_a_400_or_an_empty_page_never_a_500(ops):
    ZoneFactory.create_batch(2)
    for url in ("/v2/admin/analytics/drivers?sort=totalEarnings", "/v2/admin/analytics/drivers", "/v2/zones"):
        for value in ("1e400", "-1e400", 1e300, "9" * 500, "1e200000", "1e-20000"):
            cursor = _b64(json.dumps([value, "00000000-0000-0000-0000-000000000001"]).encode())
            r = ops.get(f"{url}{'&' if '?' in url else '?'}cursor={cursor}")
            assert r.status_code in (200, 400), (url, value, r.content)


def test_another_lists_cursor_on_a_keyset_list_is_a_400(ops):
    DeliveryFactory.create_batch(2)
    foreign = ops.get("/v2/deliveries?limit=1").json()["next"].split("cursor=")[1].split("&")[0]

    for url in ("/v2/admin/analytics/drivers", "/v2/support/tickets", "/v2/zones"):
        assert_error_body(ops.get(f"{url}?cursor={foreign}"), 400, path=f"{url}?cursor={foreign}")


@pytest.mark.parametrize("value", ["٣", "３", "1_0", "+3", " 3", "3 ", "9" * 5000])
def test_a_limit_or_level_in_other_digits_or_python_forms_is_a_400(ops, value):
    from urllib.parse import quote

    for url in (f"/v2/deliveries?limit={quote(value)}", f"/v2/zones?limit={quote(value)}",
                f"/v2/support/tickets?escalationLevel={quote(value)}",
                f"/v2/admin/unassigned-orders?escalationLevel={quote(value)}"):
        r = ops.get(url)
        assert r.status_code == 400, (url, r.content)
