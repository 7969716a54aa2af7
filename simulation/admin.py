"""Ops start a simulation from the admin: the add page is the start form (a Celery task runs
it, `simulation.run`), the run's page shows its progress (refreshing itself while it runs),
then the figures and the report to download."""
from django import forms
from django.contrib import admin
from django.http import Http404, HttpResponse
from django.urls import path, reverse
from django.utils.html import format_html

from common.broadcast import enqueue_task_on_commit
from common.exceptions import InvalidInput
from dispatch.models import DispatchPolicy
from simulation import services
from simulation.city import CITIES
from simulation.models import SimulationRun, SimulationStatus


class SimulationStartForm(forms.ModelForm):
    drivers = forms.IntegerField(min_value=1, max_value=services.LIMITS["drivers"][1], initial=1000)
    orders_per_hour = forms.IntegerField(min_value=1, max_value=services.LIMITS["orders_per_hour"][1], initial=5000)
    minutes = forms.IntegerField(min_value=1, max_value=services.LIMITS["minutes"][1], initial=60,
                                 help_text="Minutes of order arrivals, simulated.")
    seed = forms.IntegerField(min_value=0, max_value=services.LIMITS["seed"][1], initial=7)
    policies = forms.MultipleChoiceField(choices=DispatchPolicy.choices, widget=forms.CheckboxSelectMultiple,
                                         initial=[DispatchPolicy.SEQUENTIAL, DispatchPolicy.BATCHED_MATCHING],
                                         help_text="Several: compared side by side on the same city and seed.")
    stacking = forms.BooleanField(required=False, help_text="Order stacking on in every zone.")
    city = forms.ChoiceField(choices=[(c, c) for c in CITIES], initial="demo")

    class Meta:
        model = SimulationRun
        fields = []

    def parameters(self) -> dict:
        d = self.cleaned_data
        return {"drivers": d["drivers"], "ordersPerHour": d["orders_per_hour"], "minutes": d["minutes"], "seed": d["seed"],
                "policies": list(d["policies"]), "stacking": d["stacking"], "city": d["city"]}

    def clean(self):
        cleaned = super().clean()
        if not self.errors:
            p = self.parameters()
            try:
                services.validate(drivers=p["drivers"], orders_per_hour=p["ordersPerHour"], minutes=p["minutes"],
                                  seed=p["seed"], policies=p["policies"], city=p["city"])
            except InvalidInput as e:
                raise forms.ValidationError(e.message) from None
            if p["ordersPerHour"] > services.MAX_ORDERS_PER_DRIVER_HOUR * p["drivers"]:
                # most orders would wait unassigned, retried and escalated every simulated minute:
                # 20 drivers at 13,500 orders/h took 17 minutes for one percent of one policy
                raise forms.ValidationError(
                    f"More than {services.MAX_ORDERS_PER_DRIVER_HOUR} orders an hour per driver: a driver delivers 2-4 "
                    "an hour, so most orders would wait unassigned and the run would take hours. Add drivers or lower "
                    "the load (`manage.py simulate` takes any)."
                )
            orders = services.orders_in(orders_per_hour=p["ordersPerHour"], minutes=p["minutes"], policies=p["policies"])
            if orders > (limit := services.task_orders_limit()):
                # it would hold the only simulation worker for hours, then be killed at the limit
                raise forms.ValidationError(
                    f"This run simulates {orders:,} orders (all policies together); the simulation worker's time "
                    f"limit allows about {limit:,}. Fewer orders per hour, minutes or policies, or run "
                    "`manage.py simulate` on a machine of its own."
                )
        return cleaned


@admin.register(SimulationRun)
class SimulationRunAdmin(admin.ModelAdmin):
    list_display = ("id", "policies", "load", "status", "progress_bar", "created_at", "runtime", "report_link")
    list_filter = ("status",)
    readonly_fields = ("parameters", "status", "progress_bar", "stage", "created_by", "created_at", "started_at",
                       "finished_at", "runtime_seconds", "figures", "report_link", "error")
    exclude = ("result", "report_html", "progress")

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = SimulationStartForm
            kwargs["fields"] = ["drivers", "orders_per_hour", "minutes", "seed", "policies", "stacking", "city"]
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else ()

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["drivers", "orders_per_hour", "minutes", "seed", "policies", "stacking", "city"]})]
        return [(None, {"fields": list(self.readonly_fields)})]

    def changelist_view(self, request, extra_context=None):
        services.runs_lost_fail()  # (a run whose worker stopped is shown failed, not running for ever)
        return super().changelist_view(request, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        services.runs_lost_fail()
        return super().change_view(request, object_id, form_url, extra_context)

    def has_change_permission(self, request, obj=None):
        return False  # a run is started and read, never edited

    def save_model(self, request, obj, form, change):
        run = services.run_create(parameters=form.parameters(), user=request.user)
        obj.pk, obj.parameters = run.pk, run.parameters
        enqueue_task_on_commit("simulation.run", run.pk, durable_seconds=3600)  # a failed publish is sent again

    def get_urls(self):
        return [
            path("<int:run_id>/report/", self.admin_site.admin_view(self.report_view), name="simulation_simulationrun_report"),
            *super().get_urls(),
        ]

    def report_view(self, request, run_id: int):
        if not self.has_view_permission(request):
            raise Http404
        run = SimulationRun.objects.filter(pk=run_id, status=SimulationStatus.DONE).first()
        if run is None or not run.report_html:
            raise Http404("No report for this run (yet).")
        response = HttpResponse(run.report_html, content_type="text/html; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="simulation-{run.pk}.html"'
        return response

    @admin.display(description="policies")
    def policies(self, obj):
        stacking = " +stacking" if obj.parameters.get("stacking") else ""
        return ", ".join(obj.parameters.get("policies", [])) + stacking

    @admin.display(description="load")
    def load(self, obj):
        p = obj.parameters
        return f"{p.get('drivers')} drivers, {p.get('ordersPerHour')}/h, {p.get('minutes')} min, seed {p.get('seed')}"

    @admin.display(description="progress")
    def progress_bar(self, obj):
        return format_html('<progress max="100" value="{}"></progress> {}% {}', obj.progress, obj.progress, obj.stage)

    @admin.display(description="runtime")
    def runtime(self, obj):
        return f"{obj.runtime_seconds:.0f} s" if obj.runtime_seconds is not None else "–"

    @admin.display(description="report")
    def report_link(self, obj):
        if obj.status != SimulationStatus.DONE:
            return "–"
        return format_html('<a href="{}">download</a>', reverse("admin:simulation_simulationrun_report", args=[obj.pk]))

    @admin.display(description="figures")
    def figures(self, obj):
        if not obj.result:
            return "–"
        runs = obj.result.get("runs") or {obj.result.get("policy", "run"): obj.result}
        keys = ("assignmentRate", "meanTimeToAssignSeconds", "p95TimeToAssignSeconds", "meanPickupEtaSeconds",
                "meanDeliverySeconds", "offersPerAssignment", "driverUtilization", "escalations", "ordersPerDriverHour")
        head = format_html("<tr><th></th>{}</tr>", format_html("".join("<th>{}</th>" for _ in runs), *runs))
        rows = [
            format_html("<tr><th>{}</th>{}</tr>", k, format_html("".join("<td>{}</td>" for _ in runs),
                                                                 *["–" if r.get(k) is None else r.get(k) for r in runs.values()]))
            for k in keys
        ]
        return format_html("<table>{}{}</table>", head, format_html("".join("{}" for _ in rows), *rows))
