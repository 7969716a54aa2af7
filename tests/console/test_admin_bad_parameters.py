"""Parameters a browser would never send (a stale bookmark, a tampered form) on the ops
console's lists, exports and actions: Django's own answer to a wacky lookup (the list again,
`?e=1`), or a message; never a 500."""
import re

import pytest
from django.contrib import admin
from django.contrib.gis.geos import Point

from tests.concurrency import behind_lock
from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory
from zones.models import DriverZonePreference
from zones.services import zone_preferences_set

pytestmark = pytest.mark.django_db

LISTS = sorted(
    f"/admin/{m._meta.app_label}/{m._meta.model_name}/" for m in admin.site._registry
    if any(f.get_internal_type() == "DateTimeField" and f.name == "created_at" for f in m._meta.fields)
)


@pytest.mark.parametrize("url", LISTS)
def test_a_year_out_of_range_on_a_list_is_djangos_wacky_lookup_answer(admin_client, url):
    r = admin_client.get(url + "?created_at__year=99999")

    assert r.status_code == 302 and r["Location"] == url + "?e=1"
    # With the flag already there: the list again, or (a filter Django refuses while building
    # the list) Django's own page for it; it was a 500 where the filter failed to run.
    r = admin_client.get(url + "?e=1&created_at__year=99999")
    assert r.status_code == 200 or (r.status_code == 302 and r["Location"] == url + "?e=1")
    assert admin_client.get(url + "?e=1").status_code == 200


@pytest.mark.parametrize("url, query", [
    ("/admin/dispatch/delivery/", "?zone__name__startswith=A"),
    ("/admin/availability/driver/", "?user__username__startswith=driver"),
])
def test_a_filter_by_a_field_the_list_offers_no_filter_for_is_the_list_again(admin_client, url, query):
    """Django refuses it (DisallowedModelAdminLookup): it was a bare "Bad Request (400)" page."""
    r = admin_client.get(url + query)

    assert r.status_code == 302 and r["Location"] == url + "?e=1"


@pytest.mark.parametrize("url", ["/admin/availability/driver/", "/admin/zones/deliveryzone/", "/admin/common/apitoken/"])
def test_a_filter_that_fails_to_run_with_the_error_flag_already_there_is_the_list_again(admin_client, url):
    """`?e=1&created_at__year=99999` on a list with rows: the guard left it alone because of the
    flag, and the query failed to run (a 500)."""
    from common.tokens import api_token_create

    DriverFactory(), ZoneFactory(name="Downtown")
    api_token_create(DriverFactory().user, name="t")

    r = admin_client.get(url + "?e=1&created_at__year=99999")

    assert r.status_code == 302 and r["Location"] == url + "?e=1"


@pytest.mark.parametrize("query", ["?status__exact=zzz", "?created_at__year=99999", "?created_at__gte=notadate",
                                   "?e=1&created_at__year=99999"])
@pytest.mark.parametrize("url", [
    "/admin/dispatch/delivery/export/", "/admin/availability/driver/export/", "/admin/analytics/deliverycost/export/",
])
def test_a_bad_filter_on_an_export_sends_back_to_the_list(admin_client, url, query):
    """A filter the export cannot build or run sends back to the list; one that merely matches
    nothing (a status no row has) shows the export form, as the list shows an empty list."""
    for method in (admin_client.get, admin_client.post):
        r = method(url + query, {"format": "0", "resource": "0"} if method == admin_client.post else None)

        assert r.status_code in (200, 302), (method, r.status_code)
        if r.status_code == 302:
            assert r["Location"] == url.removesuffix("export/") + "?e=1"


@pytest.mark.parametrize("selected", ["notauuid", "\x00", "1"])
@pytest.mark.parametrize(("url", "action"), [
    ("/admin/dispatch/delivery/", "delete_selected"),
    ("/admin/availability/driver/", "set_availability"),
    ("/admin/zones/deliveryzone/", "refresh_health"),
    ("/admin/offers/driveroffer/", "delete_selected"),
])
def test_an_action_on_ids_that_are_no_ids_of_the_list_changes_nothing_and_says_so(admin_client, url, action, selected):
    delivery = DeliveryFactory()

    r = admin_client.post(url, {"action": action, "_selected_action": [selected], "index": "0"}, follow=True)

    assert r.status_code == 200
    assert "is not an id of this list" in r.content.decode()
    delivery.refresh_from_db()


@pytest.mark.parametrize(("url", "action"), [
    ("/admin/dispatch/delivery/", "cancel_deliveries"),
    ("/admin/availability/driver/", "set_availability"),
    ("/admin/escalation/unassignedorder/", "escalate"),
    ("/admin/zones/deliveryzone/", "refresh_health"),
])
def test_an_action_on_ids_of_no_row_of_the_list_changes_nothing_and_says_so(admin_client, url, action):
    """Ids, but of no row here (a hand-made form, a row gone since): Django ran the action on
    none of them and said nothing (a confirmation page listing nothing, then a bare redirect)."""
    delivery = DeliveryFactory()
    missing = "00000000-0000-0000-0000-000000000000"

    r = admin_client.post(url, {"action": action, "_selected_action": [missing], "index": "0",
                                "apply": "1", "reason": "stale page"}, follow=True)

    assert r.status_code == 200
    assert "Nothing was done: 1 of the selected rows is not in this list." in r.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == "ready"
    # a real row with a missing one: nothing done either
    r = admin_client.post("/admin/dispatch/delivery/", {"action": "cancel_deliveries", "index": "0", "apply": "1",
                                                        "_selected_action": [str(delivery.pk), missing], "reason": "x"},
                          follow=True)
    assert "1 of the selected rows is not in this list" in r.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == "ready"


@pytest.mark.parametrize("with_confirmation", [False, True])
def test_an_action_on_a_row_that_left_the_filtered_list_changes_nothing_and_says_so(admin_client, with_confirmation):
    """The list of assigned deliveries, drawn while D was assigned; D is ready again (reassigned)
    when ops cancel it from that page: Django ran the action on the filtered list, which D is no
    longer in, and said nothing (the confirmation page listed nothing; its Yes did nothing)."""
    delivery = DeliveryFactory()  # ready: not on the list of assigned ones
    form = {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)], "index": "0", "reason": "stale"}
    if with_confirmation:
        form["apply"] = "1"

    r = admin_client.post("/admin/dispatch/delivery/?status__exact=assigned", form, follow=True)

    assert r.status_code == 200
    assert "Nothing was done: 1 of the selected rows is not in this list." in r.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == "ready"
    # on the unfiltered list the same action runs
    r = admin_client.post("/admin/dispatch/delivery/", {**form, "apply": "1"}, follow=True)
    delivery.refresh_from_db()
    assert delivery.status == "cancelled"


def test_an_action_on_a_row_a_list_leaves_out_by_default_changes_nothing_and_says_so(admin_client):
    """The unassigned orders' list shows the open records with no parameter in its URL: a record
    closed since the page was drawn (its delivery cancelled) got the escalate page listing
    nothing, then nothing done and no word."""
    from common.actors import Actor
    from escalation.models import UnassignedOrder
    from workflows.deliveries import delivery_cancel
    from workflows.dispatching import delivery_dispatch

    delivery = DeliveryFactory()
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())  # nobody near: an open record
    record = UnassignedOrder.objects.get(delivery=delivery)
    delivery_cancel(delivery_id=delivery.pk, reason="customer left", actor=Actor.system())  # closes it

    r = admin_client.post("/admin/escalation/unassignedorder/", {
        "action": "escalate", "_selected_action": [str(record.pk)], "index": "0", "apply": "1", "level": "2",
        "reason": "stale page"}, follow=True)

    assert "Nothing was done: 1 of the selected rows is not in this list." in r.content.decode()


def _driver_page(admin_client, driver):
    from tests.zones.test_zones_admin import form_data

    url = f"/admin/availability/driver/{driver.pk}/change/"
    return url, form_data(admin_client.get(url))


def test_a_zone_preference_naming_no_zone_is_a_form_error(admin_client):
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url, data = _driver_page(admin_client, driver)
    data.update({"zone_preferences-TOTAL_FORMS": "1", "zone_preferences-0-zone": "notauuid",
                 "zone_preferences-0-preference": "PREFERRED", "zone_preferences-0-driver": str(driver.pk)})

    r = admin_client.post(url, data)

    assert r.status_code == 200 and "errorlist" in r.content.decode()
    assert not DriverZonePreference.objects.exists()


def test_a_second_preference_for_the_same_zone_is_a_form_error(admin_client):
    """A stale page or a second tab adds the zone the driver already has."""
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url, data = _driver_page(admin_client, driver)
    zone_preferences_set(driver_id=driver.pk, preferences=[(zone.pk, "AVAILABLE")])
    data.update({"zone_preferences-TOTAL_FORMS": "1", "zone_preferences-0-zone": str(zone.pk),
                 "zone_preferences-0-preference": "PREFERRED", "zone_preferences-0-driver": str(driver.pk)})

    r = admin_client.post(url, data)

    assert r.status_code == 200 and "errorlist" in r.content.decode()
    assert DriverZonePreference.objects.get(driver=driver).preference == "AVAILABLE"


def test_a_bad_selection_from_someone_not_logged_in_gets_the_admins_own_answer(client):
    """The selection is checked after the login, CSRF and permission checks: no message is
    queued, and nothing tells an outsider which lists exist."""
    r = client.post("/admin/dispatch/delivery/", {"action": "delete_selected", "_selected_action": ["notauuid"]})

    assert r.status_code == 302 and r["Location"].startswith("/admin/login/")


def test_an_error_in_an_action_on_a_filtered_list_is_not_hidden_as_a_bad_filter(admin_client, monkeypatch):
    """Only reading a list (and exports) turns a failing filter into `?e=1`; an action's own
    error stays the 500 it is, with its traceback in the log."""
    from zones import admin as zones_admin

    def broken(self, request, queryset):
        raise ValueError("a bug in the action")

    monkeypatch.setattr(zones_admin.DeliveryZoneAdmin, "refresh_health", broken)
    zone = ZoneFactory(name="Downtown", priority_level=1)  # on the filtered list
    admin_client.raise_request_exception = False

    r = admin_client.post("/admin/zones/deliveryzone/?priority_level=1",
                          {"action": "refresh_health", "_selected_action": [str(zone.pk)]})

    assert r.status_code == 500


@pytest.mark.django_db(transaction=True)
def test_two_tabs_adding_the_same_zone_at_the_same_instant_give_a_form_error(admin_client):
    """The other tab's save holds the driver's lock with its row not yet committed; this page's
    save waits for it and then sees the row (it was the database's constraint, a 500)."""
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url, data = _driver_page(admin_client, driver)
    data.update({"zone_preferences-TOTAL_FORMS": "1", "zone_preferences-0-zone": str(zone.pk),
                 "zone_preferences-0-preference": "PREFERRED", "zone_preferences-0-driver": str(driver.pk)})
    answer = behind_lock(
        lambda: zone_preferences_set(driver_id=driver.pk, preferences=[(zone.pk, "AVAILABLE")]),
        lambda: admin_client.post(url, data),
    )

    assert answer.status_code == 200 and "errorlist" in answer.content.decode()
    assert DriverZonePreference.objects.get(driver=driver).preference == "AVAILABLE"



AUTOCOMPLETE_ADD_PAGES = sorted(
    (f"/admin/{m._meta.app_label}/{m._meta.model_name}/add/", field)
    for m, model_admin in admin.site._registry.items() for field in model_admin.autocomplete_fields
)
assert AUTOCOMPLETE_ADD_PAGES  # (an empty list would skip the test below, not fail it)


@pytest.mark.parametrize(("url", "field"), AUTOCOMPLETE_ADD_PAGES)
@pytest.mark.parametrize("value", ["notauuid", "-1", "<script>"])
def test_a_value_that_is_no_key_in_an_autocomplete_field_is_a_form_error(admin_client, url, field, value):
    """The API token's add page (`?user=notauuid`, a stale link, or posted) was a 500: Django's
    autocomplete widget looked the value up to redraw it."""
    assert admin_client.get(url, {field: value}).status_code == 200

    r = admin_client.post(url, {field: value})

    assert r.status_code == 200 and "errorlist" in r.content.decode()


@pytest.mark.parametrize(("field", "value"), [("minute", "-1"), ("day_of_week", "-5"), ("hour", "99"), ("month_of_year", "0")])
def test_a_cron_value_celery_cannot_read_is_a_form_error(admin_client, field, value):
    """django-celery-beat's crontab page: `minute=-1` was a 500 (Celery's ParseException)."""
    from django_celery_beat.models import CrontabSchedule

    form = {"minute": "0", "hour": "*", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*", "timezone": "UTC",
            "periodictask_set-TOTAL_FORMS": "0", "periodictask_set-INITIAL_FORMS": "0"}
    r = admin_client.post("/admin/django_celery_beat/crontabschedule/add/", {**form, field: value})

    assert r.status_code == 200 and re.search(rf'field-{field}">\s*<ul class="errorlist', r.content.decode())
    assert not CrontabSchedule.objects.filter(**{field: value}).exists()
    r = admin_client.post("/admin/django_celery_beat/crontabschedule/add/", {**form, "minute": "*/15", "day_of_week": "mon-fri"})
    assert r.status_code == 302, re.findall(r"errorlist.{0,200}", r.content.decode())
    assert CrontabSchedule.objects.filter(minute="*/15", day_of_week="mon-fri").exists()


@pytest.mark.parametrize("task", ["a\x00b", "t" * 201])
def test_a_task_name_the_field_refuses_is_a_form_error(admin_client, task):
    """django-celery-beat's periodic task page: a NUL or 201 characters was a 500 (KeyError)."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=10, period="seconds")
    form = {"name": "audit-task", "task": task, "interval": str(every.pk), "args": "[]", "kwargs": "{}",
            "enabled": "on", "priority": "", "queue": "", "exchange": "", "routing_key": "", "headers": "{}",
            "description": "", "expire_seconds": ""}
    r = admin_client.post("/admin/django_celery_beat/periodictask/add/", form)

    assert r.status_code == 200 and re.search(r'field-task">\s*<ul class="errorlist', r.content.decode())
    assert not PeriodicTask.objects.filter(name="audit-task").exists()


@pytest.mark.parametrize(("field", "value"), [("kwargs", "5"), ("kwargs", "[]"), ("args", '"abc"'), ("args", "{}"),
                                              ("headers", "[1]"), ("args", "")])
def test_task_arguments_of_the_wrong_json_shape_are_a_form_error(admin_client, field, value):
    """They parsed, so the library saved them; "Run selected tasks" then raised a TypeError (500)."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=10, period="seconds")
    form = {"name": "audit-task", "task": "offers.expire_overdue_offers", "interval": str(every.pk), "args": "[]",
            "kwargs": "{}", "enabled": "on", "priority": "", "queue": "", "exchange": "", "routing_key": "",
            "headers": "{}", "description": "", "expire_seconds": ""}
    r = admin_client.post("/admin/django_celery_beat/periodictask/add/", {**form, field: value})

    assert r.status_code == 200 and re.search(rf'field-{field}">\s*<ul class="errorlist', r.content.decode())
    assert not PeriodicTask.objects.filter(name="audit-task").exists()
    r = admin_client.post("/admin/django_celery_beat/periodictask/add/", {**form, "headers": ""})
    assert r.status_code == 302, re.findall(r"errorlist.{0,200}", r.content.decode())
    assert PeriodicTask.objects.get(name="audit-task").headers == "{}"  # (blank: none; NULL broke the NOT NULL column)


def test_running_a_task_saved_with_unusable_arguments_is_a_message_not_a_500(admin_client):
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=10, period="seconds")
    task = PeriodicTask.objects.create(name="saved-elsewhere", task="offers.expire_overdue_offers", interval=every,
                                       kwargs="5", enabled=False)
    r = admin_client.post("/admin/django_celery_beat/periodictask/",
                          {"action": "run_tasks", "_selected_action": [str(task.pk)]}, follow=True)

    assert r.status_code == 200
    assert "Nothing was run. Fix these first: saved-elsewhere: kwargs must be a JSON object" in r.content.decode()


ALL_LISTS = sorted(f"/admin/{m._meta.app_label}/{m._meta.model_name}/" for m in admin.site._registry)


@pytest.mark.parametrize("url", ALL_LISTS)
def test_a_pattern_filter_on_any_list_is_the_list_again_not_a_500(admin_client, url):
    """`?pk__regex=[` failed in the database when the list ran: a 500 on every list."""
    r = admin_client.get(url + "?pk__regex=%5B")

    assert r.status_code == 302 and r["Location"] == url + "?e=1"


@pytest.mark.parametrize("query", [
    "?store_name__regex=%5B", "?store_name__iregex=a", "?pickup_location__bbcontains=SRID%3D999999%3BPOINT(1%202)",
    "?dropoff_location__exact=POINT(1%202)", "?tracking_token__startswith=a", "?handoff_code=1234",
])
def test_filters_by_pattern_geometry_or_secret_are_refused_on_lists_exports_and_actions(admin_client, query):
    delivery = DeliveryFactory()
    url = "/admin/dispatch/delivery/"

    assert admin_client.get(url + query)["Location"] == url + "?e=1"
    exported = admin_client.post(url + "export/" + query, {"format": "0", "resource": "0"})
    assert exported.status_code == 302 and exported["Location"] == url + "?e=1"
    for across in ("0", "1"):
        r = admin_client.post(url + query, {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)],
                                            "index": "0", "apply": "1", "reason": "x", "select_across": across})
        assert r.status_code == 302 and r["Location"] == url + "?e=1"
    delivery.refresh_from_db()
    assert delivery.status == "ready"
    assert admin_client.get(url + "?pickup_location__isnull=False").status_code == 200  # (a geometry's presence: fine)


def test_a_webhook_secret_or_a_token_digest_cannot_be_read_through_a_filter(admin_client):
    """A yes/no row count (`?secret__startswith=whsec_c`) recovered a signing secret one
    character at a time; the token list's `digest` the same."""
    from common.tokens import api_token_create
    from notifications import services
    from tests.factories import IntegrationUserFactory

    endpoint = services.endpoint_create(owner=IntegrationUserFactory(), all_deliveries=False,
                                        url="https://hooks.example.com/x", events=["*"])
    api_token_create(DriverFactory().user, name="t")
    for url, query in [
        ("/admin/notifications/webhookendpoint/", f"?id__exact={endpoint.pk}&secret__startswith={endpoint.secret[:8]}"),
        ("/admin/notifications/webhookendpoint/", "?previous_secret__isnull=True"),
        ("/admin/common/apitoken/", "?digest__startswith=0"),
        ("/admin/common/apitoken/", "?digest__gt="),
    ]:
        r = admin_client.get(url + query)
        assert r.status_code == 302 and r["Location"] == url + "?e=1", (url, query)
    assert admin_client.get(f"/admin/notifications/webhookendpoint/?id__exact={endpoint.pk}").status_code == 200


@pytest.mark.parametrize("across", ["0", "1"])
def test_an_action_on_a_list_whose_filters_fail_in_the_database_runs_on_nothing(admin_client, monkeypatch, across):
    """A filter the database refuses only when it runs (here: a division by zero added to the
    list's query): the action's "select all" ran it half way through as a 500; now nothing runs."""
    from dispatch.admin import DeliveryAdmin

    delivery = DeliveryFactory()
    get_queryset = DeliveryAdmin.get_queryset

    def failing(self, request):
        qs = get_queryset(self, request)
        return qs.extra(where=["1 / 0 = 1"]) if "store_name__exact" in request.GET else qs

    monkeypatch.setattr(DeliveryAdmin, "get_queryset", failing)
    url = "/admin/dispatch/delivery/?store_name__exact=Mall"
    r = admin_client.post(url, {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)], "index": "0",
                                "apply": "1", "reason": "x", "select_across": across}, follow=True)

    assert r.status_code == 200 and "Nothing was done: the list&#x27;s filters cannot be run." in r.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == "ready"
