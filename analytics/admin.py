from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.cache import never_cache
from import_export import fields as export_fields

from analytics.models import DeliveryCost
from common.admin import ConsoleExportMixin, ExportResource


@never_cache  # (as every admin page: figures and names, not for a shared cache or the back button)
@staff_member_required
def analytics_page(request):
    """Ops analytics: charts drawn in the browser from the summary API (session auth)."""
    return TemplateResponse(request, "admin/analytics/index.html", {
        **admin.site.each_context(request),
        "title": "Analytics",
        "days": 7,
        "ops_time_zone": settings.OPS_TIME_ZONE,
        "currency": settings.OPS_CURRENCY,
        "chart_config": {
            "summaryUrl": reverse("analytics-summary"), "days": 7, "currency": settings.OPS_CURRENCY,
            "timeZone": settings.OPS_TIME_ZONE,
        },
    })


@never_cache
@staff_member_required
def ops_map_page(request):
    """The live ops map: Leaflet from our static files; the state from `GET /v2/admin/live-map`,
    then `/ws/ops/` (session auth), reconnecting with backoff."""
    lat, lon = settings.OPS_MAP_CENTER
    return TemplateResponse(request, "admin/console/map.html", {
        **admin.site.each_context(request),
        "title": "Live map",
        "map_config": {
            "stateUrl": reverse("admin-live-map-state"),
            "socketPath": "/ws/ops/?locations=0",  # (the map draws from the per-second digest)
            "tileUrl": settings.OPS_MAP_TILE_URL,
            "tileAttribution": settings.OPS_MAP_TILE_ATTRIBUTION,
            "center": [lat, lon],
            "zoom": 12,
            "driverUrl": reverse("admin:availability_driver_change", args=["00000000-0000-0000-0000-000000000000"]),
            "deliveryUrl": reverse("admin:dispatch_delivery_change", args=["00000000-0000-0000-0000-000000000000"]),
            "zoneUrl": reverse("admin:zones_deliveryzone_change", args=["00000000-0000-0000-0000-000000000000"]),
        },
    })


class DeliveryCostExport(ExportResource):
    """Cost per delivery as CSV/XLSX (money in the platform currency, as stored)."""

    delivery_id = export_fields.Field(attribute="delivery_id", column_name="delivery_id")
    seller_order_id = export_fields.Field(attribute="delivery__seller_order_id", column_name="seller_order_id")
    zone = export_fields.Field(attribute="delivery__zone__name", column_name="zone")

    class Meta:
        model = DeliveryCost
        fields = (
            "delivery_id", "seller_order_id", "zone", "driver_payment", "platform_fee", "postgres_cost", "redis_cost",
            "api_calls_cost", "total_cost", "created_at",
        )
        export_order = fields


@admin.register(DeliveryCost)
class DeliveryCostAdmin(ConsoleExportMixin, admin.ModelAdmin):
    """Costs are written by the economics service when a delivery finishes: read-only here,
    listed and exported (the list's filters apply to the export)."""

    resource_classes = [DeliveryCostExport]
    list_display = ("delivery", "driver_payment", "platform_fee", "total_cost", "created_at")
    list_filter = ("delivery__zone",)
    search_fields = ("delivery__seller_order_id",)
    list_select_related = ("delivery",)
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in DeliveryCost._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False
