from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from analytics.admin import analytics_page, ops_map_page
from analytics.api import views as analytics_views
from availability.api import views as availability_views
from common.views import AuthTokenView, health, jobs, live, prometheus_metrics, ready
from config.views import bad_request, docs_page, home, socket_over_http
from dispatch.api import views as dispatch_views
from dispatch.views import proof_file
from escalation.api import views as escalation_views
from notifications.api import twilio as twilio_views
from notifications.api import views as webhook_views
from offers.api import views as offer_views
from tracking.api import views as tracking_views
from zones.api import views as zone_views

api = [
    path("auth/token", AuthTokenView.as_view(), name="auth-token"),
    path("drivers", dispatch_views.DriverListCreateView.as_view(), name="drivers"),
    path("drivers/<uuid:driver_id>", dispatch_views.DriverDetailView.as_view(), name="driver-detail"),
    path("drivers/<uuid:driver_id>/location", availability_views.LocationView.as_view(), name="driver-location"),
    path("drivers/<uuid:driver_id>/availability", availability_views.OverrideView.as_view(), name="driver-availability"),
    path("drivers/<uuid:driver_id>/availability/take-break", availability_views.TakeBreakView.as_view(), name="driver-take-break"),
    path("drivers/<uuid:driver_id>/availability/end-shift", availability_views.EndShiftView.as_view(), name="driver-end-shift"),
    path("drivers/<uuid:driver_id>/availability/resume", availability_views.ResumeView.as_view(), name="driver-resume"),
    path("drivers/<uuid:driver_id>/availability/history", availability_views.HistoryView.as_view(), name="driver-availability-history"),
    path(
        "drivers/<uuid:driver_id>/deliveries/<uuid:delivery_id>/proof",
        dispatch_views.DeliveryProofUploadView.as_view(),
        name="driver-delivery-proof",
    ),
    path(
        "drivers/<uuid:driver_id>/deliveries/<uuid:delivery_id>/<str:step>",
        dispatch_views.DeliveryStepView.as_view(),
        name="driver-delivery-step",
    ),
    path("deliveries", dispatch_views.DeliveryListCreateView.as_view(), name="deliveries"),
    path("quotes", dispatch_views.QuoteView.as_view(), name="quotes"),
    path("deliveries/<uuid:delivery_id>", dispatch_views.DeliveryDetailView.as_view(), name="delivery-detail"),
    path("deliveries/<uuid:delivery_id>/proofs", dispatch_views.DeliveryProofsView.as_view(), name="delivery-proofs"),
    path("deliveries/<uuid:delivery_id>/assignments", dispatch_views.DeliveryAssignmentsView.as_view(), name="delivery-assignments"),
    path("deliveries/<uuid:delivery_id>/offers", offer_views.DeliveryOffersView.as_view(), name="delivery-offers"),
    path("deliveries/<uuid:delivery_id>/dispatch", offer_views.DispatchView.as_view(), name="delivery-dispatch"),
    path("deliveries/<uuid:delivery_id>/reassign", offer_views.ReassignView.as_view(), name="delivery-reassign"),
    path("drivers/<uuid:driver_id>/offers", offer_views.DriverOffersView.as_view(), name="driver-offers"),
    path("drivers/<uuid:driver_id>/offers/<uuid:offer_id>/accept", offer_views.AcceptOfferView.as_view(), name="offer-accept"),
    path("drivers/<uuid:driver_id>/offers/<uuid:offer_id>/reject", offer_views.RejectOfferView.as_view(), name="offer-reject"),
    path("deliveries/<uuid:delivery_id>/cancel", dispatch_views.DeliveryCancelView.as_view(), name="delivery-cancel"),
    path(
        "deliveries/<uuid:delivery_id>/handoff-code/reset", dispatch_views.DeliveryHandoffCodeResetView.as_view(),
        name="delivery-handoff-code-reset",
    ),
    path("admin/analytics/drivers", analytics_views.DriverAnalyticsListView.as_view(), name="analytics-drivers"),
    path("admin/analytics/drivers/<uuid:driver_id>", analytics_views.DriverAnalyticsDetailView.as_view(), name="analytics-driver"),
    path("admin/analytics/summary", analytics_views.AnalyticsSummaryView.as_view(), name="analytics-summary"),
    path("admin/live-map", analytics_views.LiveMapView.as_view(), name="admin-live-map-state"),
    # <path:>: an order id may hold a slash (sent as %2F or as it is)
    path("orders/<path:seller_order_id>/delivery-status", tracking_views.DeliveryStatusView.as_view(), name="order-delivery-status"),
    path("orders/<path:seller_order_id>/rating", tracking_views.RatingView.as_view(), name="order-rating"),
    path("admin/deliveries/<uuid:delivery_id>/audit", dispatch_views.DeliveryAuditView.as_view(), name="delivery-audit"),
    path("admin/unassigned-orders", escalation_views.UnassignedOrderListView.as_view(), name="unassigned-orders"),
    path(
        "admin/unassigned-orders/<uuid:order_id>/escalate",
        escalation_views.EscalateView.as_view(),
        name="unassigned-order-escalate",
    ),
    path("admin/escalation/check", escalation_views.EscalationCheckView.as_view(), name="escalation-check"),
    path("support/tickets", escalation_views.TicketListView.as_view(), name="support-tickets"),
    path("support/tickets/<uuid:ticket_id>", escalation_views.TicketDetailView.as_view(), name="support-ticket"),
    path(
        "support/tickets/<uuid:ticket_id>/comments",
        escalation_views.TicketCommentsView.as_view(),
        name="support-ticket-comments",
    ),
    path("zones", zone_views.ZoneListCreateView.as_view(), name="zones"),
    path("zones/<uuid:zone_id>", zone_views.ZoneDetailView.as_view(), name="zone-detail"),
    path("zones/<uuid:zone_id>/health", zone_views.ZoneHealthView.as_view(), name="zone-health"),
    path(
        "drivers/<uuid:driver_id>/zone-preferences",
        zone_views.DriverZonePreferencesView.as_view(),
        name="driver-zone-preferences",
    ),
    path("drivers/<uuid:driver_id>/devices", webhook_views.DeviceListCreateView.as_view(), name="driver-devices"),
    path("drivers/<uuid:driver_id>/devices/<uuid:device_id>", webhook_views.DeviceDeleteView.as_view(), name="driver-device"),
    path("webhooks", webhook_views.WebhookListCreateView.as_view(), name="webhooks"),
    path("webhooks/<uuid:webhook_id>", webhook_views.WebhookDetailView.as_view(), name="webhook-detail"),
    path("webhooks/<uuid:webhook_id>/rotate-secret", webhook_views.WebhookRotateSecretView.as_view(), name="webhook-rotate-secret"),
    path("webhooks/<uuid:webhook_id>/test", webhook_views.WebhookTestView.as_view(), name="webhook-test"),
    path("webhooks/<uuid:webhook_id>/attempts", webhook_views.WebhookAttemptsView.as_view(), name="webhook-attempts"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", docs_page(SpectacularSwaggerView.as_view(url_name="schema")), name="docs"),
    path("redoc/", docs_page(SpectacularRedocView.as_view(url_name="schema")), name="redoc"),
]

urlpatterns = [
    path("", home, name="home"),
    path("admin/analytics/", analytics_page, name="admin-analytics"),
    path("admin/map/", ops_map_page, name="admin-map"),
    path("admin/", admin.site.urls),
    path("health/", health, name="health"),
    path("health", health),
    path("health/live", live, name="health-live"),
    path("health/ready", ready, name="health-ready"),
    path("health/jobs", jobs, name="health-jobs"),
    path("metrics", prometheus_metrics, name="metrics"),
    path("v2/", include(api)),
    path("support/", include("escalation.urls")),
    path("track/<uuid:delivery_id>", tracking_views.tracking_page, name="track"),
    path("track/<uuid:delivery_id>/", tracking_views.tracking_page),  # (a link retyped with a slash: the same page)
    path("track/<uuid:delivery_id>/opt-out", tracking_views.opt_out_page, name="track-opt-out"),
    path("proofs/<str:token>", proof_file, name="proof-file"),
    path("hooks/twilio/inbound", twilio_views.twilio_inbound, name="twilio-sms-inbound"),
    path("hooks/twilio/status", twilio_views.twilio_status, name="twilio-sms-status"),
    path("ws/<path:rest>", socket_over_http, name="socket-over-http"),
]

handler400 = bad_request
