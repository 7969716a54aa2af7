from django.contrib.auth import views as auth_views
from django.urls import path

from escalation import views

app_name = "support"

urlpatterns = [
    path("", views.queue, name="queue"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="support:login"), name="logout"),
    path("tickets/<uuid:ticket_id>/", views.ticket_detail, name="ticket"),
    path("tickets/<uuid:ticket_id>/take", views.ticket_take, name="take"),
    path("tickets/<uuid:ticket_id>/comment", views.ticket_comment, name="comment"),
    path("tickets/<uuid:ticket_id>/redispatch", views.ticket_redispatch, name="redispatch"),
    path("tickets/<uuid:ticket_id>/cancel-delivery", views.ticket_cancel_delivery, name="cancel-delivery"),
    path("tickets/<uuid:ticket_id>/resolve", views.ticket_resolve, name="resolve"),
]
