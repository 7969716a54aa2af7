from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.template.response import TemplateResponse
from django.urls import reverse


@staff_member_required
def analytics_page(request):
    """Ops analytics: charts drawn in the browser from the summary API (session auth)."""
    return TemplateResponse(request, "admin/analytics/index.html", {
        **admin.site.each_context(request),
        "title": "Analytics",
        "days": 7,
        "summary_url": reverse("analytics-summary"),
    })
