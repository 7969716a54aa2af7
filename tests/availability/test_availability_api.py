"""Driver availability over the API: every transition allowed and refused, who may do what,
history and events (SPEC "Driver availability")."""

import pytest
import time_machine

from availability.events import AvailabilityChangedEvent
from availability.models import DriverAvailabilityHistory
from common.actors import Actor
from workflows.deliveries import assignment_create
from tests.api import assert_error, client_for
from tests.factories import DriverFactory
from tests.typecheck import assert_event_shape

pytestmark = pytest.mark.django_db



def url(driver, action=""):
    return f"/v2/drivers/{driver.pk}/availability" + (f"/{action}" if action else "")


def set_state(driver, state):
    driver.availability = state
    driver.save(update_fields=["availability"])


def test_taking_a_break_returns_the_seed_shape_and_records_history(driver, driver_client, listen, django_capture_on_commit_callbacks):
    events = listen("ops", f"driver.{driver.pk}")
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False):
        with django_capture_on_commit_callbacks(execute=True):
            r = driver_client.post(url(driver, "take-break"), {"durationMinutes": 30, "reason": "lunch_break"}, format="json")

    assert r.status_code == 200, r.content
    assert r.json() == {"success": True, "status": "on_break", "breakUntil": "2026-02-01T10:30:00Z", "driverId": str(driver.pk)}
    driver.refresh_from_db()
    assert driver.availability == "on_break"
    assert driver.availability_reason == "lunch_break"
    assert driver.availability_change_actor_type == "driver" and driver.availability_change_actor == driver.pk
    row = DriverAvailabilityHistory.objects.get(driver=driver)
    assert (row.from_state, row.to_state, row.reason, row.actor_type) == ("available", "on_break", "lunch_break", "driver")
    received = events.drain()
    assert len(received) == 2  # once to the driver's group, once to ops
    for event in received:
        assert_event_shape(event, AvailabilityChangedEvent)
        assert event == {
            "type": "availability_changed", "driverId": str(driver.pk), "fromState": "available",
            "toState": "on_break", "reason": "lunch_break", "until": "2026-02-01T10:30:00Z",
            "changedAt": "2026-02-01T10:00:00Z",
        }


@pytest.mark.parametrize("minutes", [0, 241, -5, "ten", None, 1.5])
def test_break_duration_must_be_1_to_240_minutes(driver, driver_client, minutes):
    body = assert_error(driver_client.post(url(driver, "take-break"), {"durationMinutes": minutes}, format="json"), 400)
    assert "durationMinutes" in body["details"]
    driver.refresh_from_db()
    assert driver.availability == "available"


@pytest.mark.parametrize("minutes", [1, 240])
def test_break_duration_limits_are_inclusive(driver, driver_client, minutes):
    assert driver_client.post(url(driver, "take-break"), {"durationMinutes": minutes}, format="json").status_code == 200


def test_end_shift_and_resume(driver, driver_client):
    r = driver_client.post(url(driver, "end-shift"))
    assert r.status_code == 200
    assert r.json() == {"success": True, "status": "shift_ended", "driverId": str(driver.pk)}

    r = driver_client.post(url(driver, "resume"))
    assert r.json() == {"success": True, "status": "available", "driverId": str(driver.pk)}
    assert list(driver.availability_history.order_by("timestamp").values_list("to_state", flat=True)) == ["shift_ended", "available"]


@pytest.mark.parametrize(
    "start,action,allowed,end",
    [
        ("available", "take-break", True, "on_break"),
        ("available", "end-shift", True, "shift_ended"),
        ("available", "resume", False, None),
        ("on_break", "resume", True, "available"),
        ("on_break", "end-shift", True, "shift_ended"),
        ("on_break", "take-break", False, None),
        ("shift_ended", "resume", True, "available"),
        ("shift_ended", "take-break", False, None),
        ("shift_ended", "end-shift", False, None),
        ("offline", "resume", True, "available"),
        ("offline", "take-break", False, None),
        ("offline", "end-shift", False, None),
        ("paused", "resume", 403, None),
        ("paused", "take-break", False, None),
        ("paused", "end-shift", False, None),
        ("busy", "take-break", False, None),
        ("busy", "end-shift", False, None),
        ("busy", "resume", False, None),
    ],
)
def test_driver_transitions_follow_the_state_machine(driver, driver_client, start, action, allowed, end):
    set_state(driver, start)
    body = {"durationMinutes": 10} if action == "take-break" else {}

    r = driver_client.post(url(driver, action), body, format="json")

    driver.refresh_from_db()
    if allowed is True:
        assert r.status_code == 200, r.content
        assert driver.availability == end
    else:
        err = assert_error(r, 409 if allowed is False else allowed)
        assert start in err["message"]  # the message names the current state
        assert driver.availability == start
        assert not driver.availability_history.exists()


def test_a_busy_driver_cannot_take_a_break_or_end_the_shift(driver, driver_client, delivery):
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    assert_error(driver_client.post(url(driver, "take-break"), {"durationMinutes": 10}, format="json"), 409)
    assert_error(driver_client.post(url(driver, "end-shift")), 409)


def test_only_ops_resume_a_paused_driver(driver, driver_client, ops):
    r = ops.post(url(driver), {"state": "paused", "reason": "document check"}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["status"] == "paused"

    err = assert_error(driver_client.post(url(driver, "resume")), 403)
    assert "paused" in err["message"]
    r = ops.post(url(driver, "resume"))
    assert r.status_code == 200 and r.json()["status"] == "available"
    last = driver.availability_history.order_by("-timestamp").first()
    assert last.actor_type == "admin"


@pytest.mark.parametrize("start", ["available", "on_break", "shift_ended", "offline", "paused"])
def test_ops_may_override_any_state_but_busy(driver, ops, start):
    set_state(driver, start)
    target = "offline" if start != "offline" else "paused"
    r = ops.post(url(driver), {"state": target, "reason": "ops"}, format="json")
    assert r.status_code == 200, r.content
    driver.refresh_from_db()
    assert driver.availability == target


def test_ops_override_rules(driver, ops, delivery):
    assert_error(ops.post(url(driver), {"state": "busy", "reason": "x"}, format="json"), 400)
    assert_error(ops.post(url(driver), {"state": "sleeping", "reason": "x"}, format="json"), 400)
    assert_error(ops.post(url(driver), {"state": "paused"}, format="json"), 400)
    assert_error(ops.post(url(driver), {"state": "on_break", "reason": "x"}, format="json"), 400)
    assert_error(ops.post(url(driver), {"state": "available", "reason": "x"}, format="json"), 409)  # already
    r = ops.post(url(driver), {"state": "on_break", "reason": "x", "durationMinutes": 20}, format="json")
    assert r.status_code == 200 and r.json()["until"]
    ops.post(url(driver, "resume"))
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    assert_error(ops.post(url(driver), {"state": "paused", "reason": "x"}, format="json"), 409)
    assert_error(ops.post("/v2/drivers/00000000-0000-0000-0000-000000000000/availability", {"state": "paused", "reason": "x"}, format="json"), 404)


@pytest.mark.parametrize("state", ["paused", "offline"])
def test_a_duration_given_with_a_state_other_than_a_break_is_ignored(driver, ops, state):
    """Nothing ends a pause or an offline by itself: an `until` would be a promise nobody keeps
    (the schema: durationMinutes is "ignored otherwise")."""
    r = ops.post(url(driver), {"state": state, "reason": "x", "durationMinutes": 30}, format="json")

    assert r.status_code == 200 and r.json()["until"] is None
    driver.refresh_from_db()
    assert driver.availability == state and driver.availability_until is None
    r = ops.post(url(driver), {"state": "available", "reason": "x", "durationMinutes": 5}, format="json")
    assert r.status_code == 200 and r.json()["until"] is None


def test_who_may_change_availability(driver, integration, ops):
    other = DriverFactory()
    other_client = client_for(other.user)
    for action, body in (("take-break", {"durationMinutes": 5}), ("end-shift", {}), ("resume", {})):
        assert_error(other_client.post(url(driver, action), body, format="json"), 404)
        assert_error(integration.post(url(driver, action), body, format="json"), 403)
    assert_error(client_for(driver.user).post(url(driver), {"state": "paused", "reason": "x"}, format="json"), 403)
    assert_error(other_client.get(url(driver, "history")), 404)
    assert_error(integration.get(url(driver, "history")), 403)
    driver.refresh_from_db()
    assert driver.availability == "available"


def test_ops_take_a_break_for_a_driver(driver, ops):
    r = ops.post(url(driver, "take-break"), {"durationMinutes": 15}, format="json")
    assert r.status_code == 200
    assert driver.availability_history.get().actor_type == "admin"


def test_history_is_newest_first_and_paginated(driver, driver_client, ops):
    driver_client.post(url(driver, "take-break"), {"durationMinutes": 5}, format="json")
    driver_client.post(url(driver, "resume"))
    driver_client.post(url(driver, "end-shift"))

    page = driver_client.get(url(driver, "history") + "?limit=2").json()

    assert [h["toState"] for h in page["history"]] == ["shift_ended", "available"]
    assert set(page["history"][0]) == {"id", "fromState", "toState", "reason", "actorId", "actorType", "timestamp"}
    rest = driver_client.get(page["next"]).json()
    assert [h["toState"] for h in rest["history"]] == ["on_break"]
    assert rest["next"] is None
    assert len(ops.get(url(driver, "history")).json()["history"]) == 3


def test_a_change_that_waited_behind_a_later_stamped_one_comes_after_it_in_the_history(driver, driver_client, ops):
    """Two changes at once: each reads the clock, then waits for the driver's lock. The one that
    read it first but got the lock second was stamped earlier, so the history listed
    "paused → on_break" before the "available → paused" it followed."""
    from datetime import timedelta

    from django.utils import timezone

    from workflows.drivers import availability_override

    stamped = timezone.now()
    availability_override(driver_id=driver.pk, to_state="paused", reason="check", actor=Actor("admin", None), now=stamped)
    # the other change read the clock a moment before this one (it waited for the lock)
    availability_override(driver_id=driver.pk, to_state="on_break", reason="lunch", actor=Actor("admin", None),
                          duration_minutes=30, now=stamped - timedelta(microseconds=200))

    history = ops.get(url(driver, "history")).json()["history"]
    assert [(h["fromState"], h["toState"]) for h in history[:2]] == [("paused", "on_break"), ("available", "paused")]
    rows = list(DriverAvailabilityHistory.objects.filter(driver=driver).order_by("timestamp"))
    assert [r.to_state for r in rows][-2:] == ["paused", "on_break"] and rows[-1].timestamp > rows[-2].timestamp
