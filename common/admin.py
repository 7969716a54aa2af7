import datetime
import json
import re
from io import BytesIO

from celery import schedules as celery_schedules
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.gis.db import models as gis_models
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django_celery_beat.admin import CrontabScheduleAdmin, PeriodicTaskAdmin, PeriodicTaskForm
from django_celery_beat.models import CrontabSchedule, PeriodicTask
from import_export import resources, widgets
from import_export.admin import ExportMixin
from import_export.formats.base_formats import CSV, XLSX
from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font
from leaflet.admin import LeafletGeoAdminMixin

from common.bidi import bidi_controls_escaped, bidi_isolated
from common.exceptions import DomainError
from common.forms import MapPointField, MapPolygonField, SafeAutocompleteMixin, SafeMapWidget
from common.models import ApiToken, DeferredTask, User
from common.tokens import api_token_new_key


@admin.action(permissions=["delete"], description=django_delete_selected.short_description)
def delete_selected(modeladmin, request, queryset):
    """Django's "delete selected", refusing a "select all N" past ACROSS_MAX rows as the
    console's own actions do (`too_many`): its confirmation page lists every row with what
    goes with it, and posts one field per row back."""
    from common.admin_confirm import too_many

    if too_many(request, queryset):
        return None
    return django_delete_selected(modeladmin, request, queryset)


admin.site.add_action(delete_selected, "delete_selected")


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    """A login changed here (deactivated, staff flag, groups, password) is checked again on
    its open sockets and in the fast lane's cache: `common.hooks.user_saved`."""

    list_filter = ("is_staff", "is_active", "groups")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            self._warn_of_carried_deliveries(request, obj)

    def _warn_of_carried_deliveries(self, request, user) -> None:
        """A driver deactivated mid-delivery keeps what it carries (it goes offline once freed:
        workflows.drivers.deactivated_drivers_mark_offline), but its app no longer works: the
        dispatcher who deactivated it is told which deliveries to reassign or cancel, with links."""
        from availability.models import Driver
        from dispatch.selectors import carried_deliveries

        driver_id = Driver.objects.filter(user=user).values_list("pk", flat=True).first()
        carried = carried_deliveries([driver_id]).get(str(driver_id), []) if driver_id else []
        if not carried:
            return
        links = format_html_join(", ", '<a href="{}">{}</a>', (
            (reverse("admin:dispatch_delivery_change", args=[d.pk]), d.seller_order_id) for d in carried))
        messages.warning(request, format_html(
            "{} was carrying {} {}: {}. Its app no longer works: reassign or cancel {} (the driver goes "
            "offline once freed).", user.get_username(), len(carried),
            "delivery" if len(carried) == 1 else "deliveries", links, "it" if len(carried) == 1 else "them"))


@admin.register(ApiToken)
class ApiTokenAdmin(SafeAutocompleteMixin, admin.ModelAdmin):
    """Tokens are listed by prefix (only a hash of the key is stored). Adding one shows its
    key once, in the confirmation message; deleting one revokes it at once, the location
    fast lane's cache included."""

    list_display = ("prefix", "user", "name", "created_at", "expires_at")
    list_filter = ("name",)
    search_fields = ("user__username", "prefix", "name")
    autocomplete_fields = ("user",)
    fields = ("user", "name", "expires_at")

    def get_readonly_fields(self, request, obj=None):
        return ("user", "name", "prefix", "created_at") if obj else ()

    def get_fields(self, request, obj=None):
        return ("user", "name", "prefix", "created_at", "expires_at") if obj else self.fields

    def save_model(self, request, obj, form, change):
        # (a shortened expiry, or a deletion, takes effect at once: hooks.api_token_changed)
        if change:
            super().save_model(request, obj, form, change)
            return
        key = api_token_new_key(obj)
        super().save_model(request, obj, form, change)
        messages.warning(request, f"API token for {obj.user}: {key}. Copy it now: it is not shown again.")


def json_block(value):
    """A JSON value for a console page: indented, in a <pre>, its bidirectional-text controls
    written as \\u escapes (`common.bidi.bidi_controls_escaped`)."""
    text = json.dumps(value, ensure_ascii=False, indent=2, sort_keys=False, cls=DjangoJSONEncoder)
    return format_html("<pre class=\"json\">{}</pre>", bidi_controls_escaped(text))


def run_for_each(modeladmin, request, queryset, action, *, label=str, done=None) -> list:
    """Admin actions call a service per selected row (in primary-key order, the lock order):
    a row the service refuses (409/404/400...) is reported and skipped, the rest go on.
    Returns the services' results; `done(results)` gives the summary message, if any. A
    "select all N" of more than ACROSS_MAX rows does nothing and says so (`too_many`), as the
    actions that ask first do: one request working through thousands of rows outlasts a
    proxy's timeout and stops half done."""
    from common.admin_confirm import too_many

    if too_many(request, queryset):
        return []
    results = []
    for obj in queryset.order_by("pk"):
        try:
            results.append(action(obj))
        except DomainError as exc:
            modeladmin.message_user(request, f"{bidi_isolated(label(obj))}: {exc.message}", messages.WARNING)
    if done is not None and results:
        modeladmin.message_user(request, done(results), messages.SUCCESS)
    return results


@admin.register(DeferredTask)
class DeferredTaskAdmin(admin.ModelAdmin):
    """Task publishes that failed after commit (the broker down, or the Redis breaker open), waiting
    for the sweep to publish them again (common.deferred); read-only, and deleting one drops it."""

    list_display = ("task", "created_at", "expires_at", "attempts")
    list_filter = ("task",)
    ordering = ("created_at",)
    readonly_fields = ("task", "args_shown", "created_at", "expires_at", "attempts")
    exclude = ("args",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="args")
    def args_shown(self, task):
        return json_block(task.args)  # (an offer push carries the seller's store name)


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


RECENT_WINDOWS = {"1h": ("In the last hour", datetime.timedelta(hours=1)),
                  "24h": ("In the last 24 hours", datetime.timedelta(hours=24))}


def recent_filter(field: str, title: str) -> type[admin.SimpleListFilter]:
    """A list filter "`title`: in the last hour / 24 hours" on the date-time `field`
    (`?<field without _at>_within=1h`), counted back from when the list is opened. The
    dashboard's last-hour tiles link to it: a link carrying the time it was rendered changed
    every second, so each live refresh replaced the tiles under the pointer."""
    parameter = f"{field.removesuffix('_at')}_within"

    def lookups(self, request, model_admin):
        return [(value, label) for value, (label, _) in RECENT_WINDOWS.items()]

    def queryset(self, request, queryset):
        window = RECENT_WINDOWS.get(self.value())
        if window is None:  # (no filter, or one a browser would not send: the whole list)
            return queryset
        return queryset.filter(**{f"{field}__gte": timezone.now() - window[1]})

    return type(f"Recent{parameter.title().replace('_', '')}Filter", (admin.SimpleListFilter,), {
        "__doc__": recent_filter.__doc__, "title": title, "parameter_name": parameter,
        "lookups": lookups, "queryset": queryset,
    })

class _OpenedValuesForm:
    """Each field carries the value its page was opened with (a hidden `initial-<name>`, Django's
    `show_hidden_initial`), so `changed_data` is what this page changed, not what differs from
    the row as it is when the page is saved."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.show_hidden_initial = True


class OpenedValuesMixin:
    """A change page saves the fields it changed from the values it was opened with: a field
    another dispatcher saved meanwhile (another tab, another desk) is not put back to the value
    this page showed. (Django compared the post with the row as it was at the save, so every
    field the other page had changed counted as changed here and its old value was written
    back: an audit, a zone's minimum drivers and a driver's name undone without a word.) Two
    pages changing the same field: the later save wins, as before."""

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is None:
            return form
        return type(form.__name__, (_OpenedValuesForm, form), {})


class OpenedValuesInlineMixin:
    """OpenedValuesMixin for an inline's rows: a row this page did not change is not saved back
    over another page's change of it."""

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        formset.form = type(formset.form.__name__, (_OpenedValuesForm, formset.form), {})
        return formset


class ChangedFieldsOnlyAdmin(OpenedValuesMixin, admin.ModelAdmin):
    """A change form writes the fields its form changed, and nothing else.

    Django's `save_model` saves the whole row as the request read it: an edit of a driver's
    vehicle put back the availability a `resume` had changed while the page was being saved,
    and a crafted POST to a page of read-only fields (a delivery, a ticket) wrote the delivery
    back over a concurrent cancel. The services own every other column; a form that changed
    nothing writes nothing. (A new row is saved as Django saves it.)"""

    def save_model(self, request, obj, form, change):
        if not change:
            return super().save_model(request, obj, form, change)
        concrete = {f.name: f for f in obj._meta.concrete_fields if not f.primary_key}
        fields = [name for name in form.changed_data if name in concrete]
        if not fields:
            return None
        fields += [name for name, f in concrete.items() if getattr(f, "auto_now", False) and name not in fields]
        obj.save(update_fields=fields)
        return None


class MapAdminMixin(LeafletGeoAdminMixin):
    """django-leaflet's map for the geometry fields (our static files, no CDN), with the
    checks of `common.forms`: nothing is transformed, stored or redrawn that may not be."""

    widget = SafeMapWidget
    MAP_FIELDS = ((gis_models.PolygonField, MapPolygonField), (gis_models.PointField, MapPointField))

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        for model_field, form_field in self.MAP_FIELDS:
            if isinstance(db_field, model_field):
                kwargs.setdefault("form_class", form_field)
        return super().formfield_for_dbfield(db_field, request, **kwargs)


# A text cell starting with one of these is a formula to a spreadsheet (OWASP "CSV
# injection"): `=HYPERLINK(...)` in a store name would run on the ops laptop that opens the export.
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r", "\n")


class UtcDateTimeWidget(widgets.DateTimeWidget):
    """A time in UTC: ISO 8601 with `Z` in CSV, a UTC date-time cell in XLSX. The library's
    widget wrote the server's local time with no offset (`2026-12-06 08:19:24`), which a
    spreadsheet or a script cannot place."""

    def render(self, value, obj=None, **kwargs):
        if not isinstance(value, datetime.datetime):
            return ""
        value = value.astimezone(datetime.timezone.utc) if timezone.is_aware(value) else value
        if kwargs.get("force_native_type"):
            return value.replace(tzinfo=None)  # (XLSX cells hold no zone: the column says UTC)
        return value.isoformat().replace("+00:00", "Z")


class ExportResource(resources.ModelResource):
    """The console's exports (CSV, XLSX): in CSV, text that a spreadsheet would read as a
    formula is written with a leading `'`, which spreadsheets show as text; numbers and dates
    stay as they are, times in UTC (`UtcDateTimeWidget`). XLSX needs no such mark: its text is
    in text cells (`TextCellsXLSX`). (django-import-export's own
    `IMPORT_EXPORT_ESCAPE_FORMULAE_ON_EXPORT` only drops a first `=`, and turns every cell into
    text.)"""

    WIDGETS_MAP = {**resources.ModelResource.WIDGETS_MAP, "DateTimeField": UtcDateTimeWidget}

    def export_field(self, field, instance, **kwargs):
        value = super().export_field(field, instance, **kwargs)
        if kwargs.get("force_native_type"):  # a typed format (XLSX): the value as it is
            return value
        if isinstance(value, str) and value.startswith(FORMULA_LEADS) and not _is_number(value):
            return "'" + value
        return value


class TextCellsXLSX(XLSX):
    """XLSX whose text is always a text cell. tablib writes values through openpyxl, which makes
    any text starting with `=` a formula: a store name `=HYPERLINK(…)` would run on the laptop
    that opens the export, and escaped with a `'` it showed the apostrophe (as did a phone
    number `+91…`). Characters XML cannot hold (control characters) become U+FFFD: openpyxl
    refused them and the export failed."""

    def export_data(self, dataset, **kwargs):
        workbook = Workbook(write_only=True)
        sheet = workbook.create_sheet(title="Export")
        sheet.freeze_panes = "A2"
        bold = Font(bold=True)

        def cell(value, font=None):
            if isinstance(value, str):
                value = ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", value)
            try:
                written = WriteOnlyCell(sheet, value=value)
            except ValueError:  # a type no cell holds (a UUID): its text, as tablib writes it
                value = ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", str(value))
                written = WriteOnlyCell(sheet, value=value)
            if isinstance(value, str):
                written.data_type = "s"  # text, even when it starts with `=`
            if font is not None:
                written.font = font
            return written

        if dataset.headers:
            sheet.append([cell(header, bold) for header in dataset.headers])
        for row in dataset:
            sheet.append([cell(value) for value in row])
        out = BytesIO()
        workbook.save(out)
        return out.getvalue()


class ConsoleExportMixin(ExportMixin):
    """The console's exports: CSV with a byte-order mark (Excel read a CSV without one as the
    machine's ANSI code page: every name outside ASCII garbled) and `TextCellsXLSX`."""

    formats = [CSV, TextCellsXLSX]
    to_encoding = "utf-8-sig"

    def get_export_data(self, file_format, request, queryset, **kwargs):
        # the library's, but typed values for any binary format (it knew its own classes only)
        if not self.has_export_permission(request):
            raise PermissionDenied
        data = self.get_data_for_export(request, queryset, force_native_type=file_format.is_binary(), **kwargs)
        export_data = file_format.export_data(data)
        if not file_format.is_binary() and kwargs.get("encoding"):
            export_data = export_data.encode(kwargs["encoding"])
        return export_data


# A number as a spreadsheet reads one (ASCII digits, one point, an exponent): Python's float()
# also takes "-inf", "-1_000" and Arabic-Indic digits, which a spreadsheet does not.
_SPREADSHEET_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", re.ASCII)


def _is_number(text: str) -> bool:
    """A number as CSV writes it (`-3.50`): a value, not a formula; left as it is."""
    return _SPREADSHEET_NUMBER.fullmatch(text) is not None


# ------------------------------------------------------------------------------ the periodic schedule
# django-celery-beat's own admin (SPEC: the schedule is editable in the admin), with two of its
# forms' holes closed: a value its parsers refuse was a 500, not a form error.


class CrontabScheduleForm(forms.ModelForm):
    """`minute=-1` passed the field's validators and broke Celery's parser (ParseException,
    not a ValueError) while the page drew its "human readable" line: a 500."""

    class Meta:
        model = CrontabSchedule
        fields = "__all__"

    def clean(self):
        data = super().clean()
        for name in ("minute", "hour", "day_of_week", "day_of_month", "month_of_year"):
            if name in data and not self.has_error(name):
                try:
                    celery_schedules.crontab(**{name: data[name]})
                except (celery_schedules.ParseException, ValueError, TypeError, IndexError) as exc:
                    self.add_error(name, f"Not a cron value Celery can read: {exc}")
        return data


JSON_SHAPES = {"args": (list, "a JSON array, e.g. []"), "kwargs": (dict, "a JSON object, e.g. {}"),
               "headers": (dict, "a JSON object, e.g. {}")}


def periodic_task_json_error(field: str, value) -> str | None:
    """Why a periodic task's `args`, `kwargs` or `headers` text cannot be used (None: it can).
    The library checks only that it parses: `kwargs` 5 was saved, and "Run selected tasks" (or
    beat) then failed on it (`argument after ** must be a mapping`), a 500."""
    kind, shape = JSON_SHAPES[field]
    if value in (None, "") and field == "headers":
        return None  # (the form stores "{}")
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        return f"Unable to parse JSON: {exc}"
    return None if isinstance(parsed, kind) else f"Must be {shape}."


class PeriodicTaskFormChecked(PeriodicTaskForm):
    """A task name the field refused (a NUL, over 200 characters) left no `task` for the
    library's check, which read it anyway: a KeyError, a 500. The field's own error is shown.
    `args`, `kwargs` and `headers` must be JSON of the shape the task call takes."""

    def _clean_json(self, field):
        value = self.cleaned_data[field]
        error = periodic_task_json_error(field, value)
        if error:
            raise forms.ValidationError(error)
        return value

    def clean_headers(self):
        # blank is no headers; stored as "{}" (the model's save turns "" into NULL, and the
        # column is NOT NULL: an IntegrityError, a 500)
        return self._clean_json("headers") or "{}"

    def clean(self):
        if "task" not in self.cleaned_data and not self.cleaned_data.get("regtask"):
            return forms.ModelForm.clean(self)  # (the unique name still checked, only the library's step skipped)
        return super().clean()


admin.site.unregister(CrontabSchedule)
admin.site.unregister(PeriodicTask)


@admin.register(CrontabSchedule)
class CheckedCrontabScheduleAdmin(CrontabScheduleAdmin):
    form = CrontabScheduleForm


@admin.register(PeriodicTask)
class CheckedPeriodicTaskAdmin(PeriodicTaskAdmin):
    form = PeriodicTaskFormChecked

    def run_tasks(self, request, queryset):
        """The library's action, after refusing tasks whose stored arguments the call cannot
        take (saved before the form checked them, or written elsewhere): a message, not a 500."""
        bad = [f"{task.name}: {field} {error[0].lower()}{error[1:]}" for task in queryset
               for field in ("args", "kwargs")  # (what the library's run reads)
               if (error := periodic_task_json_error(field, getattr(task, field)))]
        if bad:
            self.message_user(request, "Nothing was run. Fix these first: " + "; ".join(bad), level=messages.ERROR)
            return None
        return super().run_tasks(request, queryset)

    run_tasks.short_description = PeriodicTaskAdmin.run_tasks.short_description


class LiveListMixin:
    """A change list that follows /ws/ops/: a bar counts the events of `live_events` since the
    page was loaded, with a Reload link (analytics/static/console/live_refresh.js; the list is
    not reloaded under the pointer: the rows ticked for an action would be lost)."""

    live_events: tuple[str, ...] = ()

    def changelist_view(self, request, extra_context=None):
        live = {"mode": "banner", "events": " ".join(self.live_events), "regions": ""}
        return super().changelist_view(request, extra_context={**(extra_context or {}), "live_refresh": live})
