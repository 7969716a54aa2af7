"""A driver whose login is deactivated goes offline: its app's token stopped working at once,
but dispatch kept offering it deliveries (each expiring unanswered) until its last fix went
stale, up to DRIVER_STALE_AFTER_SECONDS, and the live map showed it available."""
import pytest
from django.contrib.auth import get_user_model

from availability import tasks
from availability.models import Driver, DriverAvailabilityHistory
from common.actors import Actor
from dispatch.models import AssignmentStatus
from dispatch.tasks import driver_freed
from offers.models import DriverOffer
from tests.api import assert_error
from tests.factories import DeliveryFactory, online_driver
from workflows import deliveries, drivers as driver_workflows
from workflows.dispatching import delivery_dispatch
from workflows.offers import offer_accept

pytestmark = pytest.mark.django_db


def deactivate(driver):
    user = get_user_model().objects.get(pk=driver.user_id)
    user.is_active = False
    user.save()  # (the admin's user form, a shell: the same post_save)


def state(driver) -> str:
    return Driver.objects.values_list("availability", flat=True).get(pk=driver.pk)


def test_deactivating_an_available_drivers_login_takes_the_driver_offline_and_moves_its_offer_on(
    listen, django_capture_on_commit_callbacks,
):
    near, next_one = online_driver(km=0.5), online_driver(km=1.0)
    delivery = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    assert offer.driver_id == near.pk
    ops_events = listen("ops")

    with django_capture_on_commit_callbacks(execute=True):
        deactivate(near)

    assert state(near) == "offline"
    row = DriverAvailabilityHistory.objects.filter(driver=near).latest("timestamp")
    assert (row.from_state, row.to_state, row.reason, row.actor_type) == ("available", "offline", "account_deactivated", "system")
    offer.refresh_from_db()
    assert (offer.status, offer.cancellation_reason) == ("CANCELLED", "driver_offline")
    assert DriverOffer.objects.get(delivery=delivery, status="PENDING").driver_id == next_one.pk
    changed = [e for e in ops_events.drain() if e["type"] == "availability_changed"]
    assert [(e["driverId"], e["toState"], e["reason"]) for e in changed] == [(str(near.pk), "offline", "account_deactivated")]


def test_a_driver_on_a_break_goes_offline_too_and_other_logins_are_left_alone(django_capture_on_commit_callbacks):
    on_break, other = online_driver(km=0.5), online_driver(km=0.6)
    driver_workflows.availability_take_break(driver_id=on_break.pk, duration_minutes=30, reason="", actor=Actor("driver", on_break.pk))

    with django_capture_on_commit_callbacks(execute=True):
        deactivate(on_break)
        user = get_user_model().objects.get(pk=other.user_id)
        user.first_name = "Renamed"
        user.save()

    assert (state(on_break), state(other)) == ("offline", "available")
    on_break.refresh_from_db()
    assert on_break.availability_until is None  # (no break left to expire into "available")


def test_nothing_changes_before_the_deactivation_commits(django_capture_on_commit_callbacks):
    driver = online_driver()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        deactivate(driver)
    assert state(driver) == "available" and callbacks  # (the change waits for the commit)


def test_a_busy_driver_keeps_its_delivery_and_the_job_takes_it_offline_once_freed(ops_user, django_capture_on_commit_callbacks):
    busy = online_driver(km=0.5)
    delivery = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    offer_accept(offer_id=offer.pk, driver_id=busy.pk, actor=Actor("driver", busy.pk))

    with django_capture_on_commit_callbacks(execute=True):
        deactivate(busy)
    assert state(busy) == "busy"
    assert busy.assignments.get().status == AssignmentStatus.ACTIVE

    deliveries.delivery_cancel(delivery_id=delivery.pk, reason="driver account closed", actor=Actor.for_user(ops_user))
    assert state(busy) == "available"  # (freed: the state machine's only way out of busy)
    assert tasks.mark_stale_drivers_offline() == 1
    assert state(busy) == "offline"
    assert tasks.mark_stale_drivers_offline() == 0


def test_the_job_takes_offline_logins_deactivated_without_a_signal():
    """A bulk update (`QuerySet.update`, SQL) sends no post_save: the stale-driver job, each
    minute, takes those drivers offline; available ones with an active login stay."""
    gone = [online_driver(km=0.5 + i / 10) for i in range(3)]
    stays = online_driver(km=1.0)
    get_user_model().objects.filter(pk__in=[d.user_id for d in gone]).update(is_active=False)

    assert tasks.mark_stale_drivers_offline() == 3
    assert [state(d) for d in gone] == ["offline"] * 3 and state(stays) == "available"


def test_a_deactivated_driver_freed_from_its_delivery_is_not_offered_the_delivery_waiting_next_to_it(ops_user):
    """Freed, it is `available` until the job's next run: the look a freed driver gets at the
    deliveries waiting near it (dispatch.driver_freed) offers it nothing."""
    busy = online_driver(km=0.5)
    carried = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=carried.pk, actor=Actor.system()).offer
    offer_accept(offer_id=offer.pk, driver_id=busy.pk, actor=Actor("driver", busy.pk))
    waiting = DeliveryFactory()
    assert delivery_dispatch(delivery_id=waiting.pk, actor=Actor.system()).outcome == "unassigned"
    get_user_model().objects.filter(pk=busy.user_id).update(is_active=False)

    deliveries.delivery_cancel(delivery_id=carried.pk, reason="driver account closed", actor=Actor.for_user(ops_user))
    freed_at = Driver.objects.get(pk=busy.pk).last_availability_change
    assert driver_freed(str(busy.pk), freed_at.isoformat()) is False
    assert not DriverOffer.objects.filter(delivery=waiting).exists()


def test_ops_cannot_put_a_deactivated_driver_back_to_work(ops):
    """The job would take it offline again within the minute, and it can answer nothing: a 409
    that says why. Other states are still ops' to set; an unknown driver stays a 404."""
    driver = online_driver(km=0.5)
    get_user_model().objects.filter(pk=driver.user_id).update(is_active=False)
    assert tasks.mark_stale_drivers_offline() == 1

    base = f"/v2/drivers/{driver.pk}/availability"
    for path, body in ((base, {"state": "available", "reason": "back"}),
                       (base, {"state": "on_break", "durationMinutes": 15, "reason": "back"}),
                       (f"{base}/resume", {}), (f"{base}/take-break", {"durationMinutes": 15})):
        r = ops.post(path, body, format="json")
        assert_error(r, 409)
        assert "login is deactivated" in r.json()["message"]
    assert state(driver) == "offline"
    r = ops.post(f"/v2/drivers/{driver.pk}/availability", {"state": "paused", "reason": "account review"}, format="json")
    assert r.status_code == 200 and state(driver) == "paused"
    assert_error(ops.post("/v2/drivers/00000000-0000-0000-0000-000000000000/availability",
                          {"state": "available", "reason": "x"}, format="json"), 404)


def test_a_freed_deactivated_driver_is_no_candidate_until_the_job_takes_it_offline():
    """Freed (`available`) before the job's next run, it was still the nearest candidate of a
    new delivery, the retry job's and a reject's next one: each offer expired unanswered."""
    inactive, other = online_driver(km=0.3), online_driver(km=2.0)
    get_user_model().objects.filter(pk=inactive.user_id).update(is_active=False)
    delivery = DeliveryFactory()
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer.driver_id == other.pk


def test_nor_a_matching_rounds():
    from datetime import timedelta

    import time_machine

    from tests.workflows.test_batched_matching import T0, driver_at, matching_zone, new_delivery
    from workflows.matching import matching_rounds_run

    zone = matching_zone(matching_window_seconds=5)
    inactive, other = driver_at(0.2), driver_at(1.5)
    get_user_model().objects.filter(pk=inactive.user_id).update(is_active=False)
    with time_machine.travel(T0, tick=False) as clock:
        delivery, _ = new_delivery(zone, km=0.0)
        clock.shift(timedelta(seconds=5))
        assert matching_rounds_run() == 1
    assert DriverOffer.objects.get(delivery=delivery, status="PENDING").driver_id == other.pk


def test_nor_can_ops_offer_it_a_delivery_by_hand(ops):
    """`POST /v2/deliveries/{id}/offers` to a driver freed with its login deactivated (still
    `available` until the job's next run): a 409 that says why, nothing offered. The login is
    read in the driver's lock statement (the ops offer's statement pin holds)."""
    inactive = online_driver(km=0.3)
    get_user_model().objects.filter(pk=inactive.user_id).update(is_active=False)
    delivery = DeliveryFactory()
    r = ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(inactive.pk)}, format="json")
    assert_error(r, 409)
    assert "login is deactivated" in r.json()["message"]
    assert not DriverOffer.objects.filter(delivery=delivery).exists()


def _user_change_form(client, user, **changes) -> dict:
    """The admin's user change form as the page renders it, with `changes` applied."""
    page = client.get(f"/admin/common/user/{user.pk}/change/")
    form = page.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form.initial.get(name, field.initial)
        if name in ("groups", "user_permissions"):
            data[name] = [getattr(v, "pk", v) for v in (value or [])]
        elif isinstance(value, bool):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else value
    for key in [k for k in data if k in ("date_joined", "last_login")]:
        stamp = data.pop(key)
        data[f"{key}_0"], data[f"{key}_1"] = stamp.split(" ") if isinstance(stamp, str) else ("", "")
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def test_deactivating_a_busy_drivers_login_in_the_admin_names_the_deliveries_to_reassign(
    django_capture_on_commit_callbacks,
):
    """It keeps what it carries (its app no longer works): the dispatcher who deactivated it is
    told which deliveries, with links to them. A login with nothing carried, or a save that
    does not deactivate, says nothing of the kind."""
    from django.test import Client

    from tests.factories import OpsUserFactory

    admin = Client()
    admin.force_login(OpsUserFactory(is_superuser=True))
    busy, idle = online_driver(km=0.5), online_driver(km=3.0)
    delivery = DeliveryFactory(seller_order_id="ORD-KEPT-1")
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    assert offer.driver_id == busy.pk
    offer_accept(offer_id=offer.pk, driver_id=busy.pk, actor=Actor("driver", busy.pk))
    busy_user = get_user_model().objects.get(pk=busy.user_id)
    idle_user = get_user_model().objects.get(pk=idle.user_id)

    def save(user, **changes):
        with django_capture_on_commit_callbacks(execute=True):
            r = admin.post(f"/admin/common/user/{user.pk}/change/", _user_change_form(admin, user, **changes), follow=True)
        assert r.status_code == 200 and r.redirect_chain, r.context["adminform"].form.errors
        return [str(m) for m in r.context["messages"]], r.content.decode()

    said, page = save(busy_user, is_active=False)
    assert f'<a href="/admin/dispatch/delivery/{delivery.pk}/change/">ORD-KEPT-1</a>' in page  # (a link, not escaped text)

    warning = next(m for m in said if "was carrying" in m)
    assert "1 delivery" in warning and f'/admin/dispatch/delivery/{delivery.pk}/change/">ORD-KEPT-1</a>' in warning
    assert state(busy) == "busy" and not get_user_model().objects.get(pk=busy.user_id).is_active
    assert not any("was carrying" in m for m in save(get_user_model().objects.get(pk=busy.user_id), first_name="Again")[0])
    assert not any("was carrying" in m for m in save(idle_user, is_active=False)[0])
    assert state(idle) == "offline"
