"""The support agents' views at `/support/` (server-rendered; login required; group `support`
or staff). Thin: each action validates a form, calls one service and redirects back."""
from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST, require_safe

from common.actors import Actor
from common.exceptions import DomainError, NotFound
from common.roles import VIEWER_GROUP, in_group, is_support
from escalation import forms, selectors, tickets
from escalation.models import TicketStatus
from workflows import escalations

QUEUE_PAGE_SIZE = 50


def _read_only(user) -> bool:
    """The console's Viewer role: reads the support views, may not post to them."""
    return user.is_staff and in_group(user, VIEWER_GROUP)


def support_required(view):
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), login_url=reverse("support:login"))
        if not (request.user.is_active and is_support(request.user)):
            # (Django's bare "403 Forbidden" left no way out but the admin's logout)
            refused = render(request, "support/not_an_agent.html", {"not_an_agent": True}, status=403)
            add_never_cache_headers(refused)
            return refused
        if request.method == "POST" and _read_only(request.user):
            raise PermissionDenied("Viewers may only read.")  # the console's read-only role
        response = view(request, *args, **kwargs)
        # customers' names and phones: not for a shared cache or the back button (as the admin's pages)
        add_never_cache_headers(response)
        return response

    return wrapped


class SupportAuthenticationForm(AuthenticationForm):
    """Only a support agent (or staff) signs in here: anyone else was signed in and then shown
    a bare 403 on every page, with no way out but the admin's logout."""

    def confirm_login_allowed(self, user):
        super().confirm_login_allowed(user)
        if not is_support(user):
            raise ValidationError("This account is not a support agent's: sign in with a support account.",
                                  code="not_support")


class LoginView(auth_views.LoginView):
    template_name = "support/login.html"
    authentication_form = SupportAuthenticationForm

    def dispatch(self, request, *args, **kwargs):
        # a signed-in agent goes to the queue; anyone else signed in sees the form, told why
        self.redirect_authenticated_user = is_support(request.user)
        return super().dispatch(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs),
                "not_an_agent": self.request.user.is_authenticated and not is_support(self.request.user)}

    def get_default_redirect_url(self):
        return reverse("support:queue")


@require_safe
@support_required
def queue(request):
    form = forms.QueueFilterForm(request.GET or None)
    # The filters that are valid apply (a bad one, `?status=bogus`, shows its error and dropped
    # the others too).
    f = {}
    if form.is_bound:
        form.full_clean()
        f = form.cleaned_data
    tickets = selectors.tickets_queue(
        status=f.get("status") or selectors.ACTIVE, priority=f.get("priority") or None,
        zone_id=f["zone"].pk if f.get("zone") else None, level=f.get("level"),
        assignee=request.user if f.get("mine") else None,
    )
    page = Paginator(tickets, QUEUE_PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page": page, "now": timezone.now(), "query": query.urlencode()}
    partial = request.headers.get("X-Requested-With") == "support-live"
    return render(request, "support/_queue_table.html" if partial else "support/queue.html", context)


@require_safe
@support_required
def ticket_detail(request, ticket_id):
    try:
        ticket = selectors.ticket_get(ticket_id=ticket_id)
    except NotFound:
        raise Http404("Ticket not found.")
    now = timezone.now()
    context = {
        "ticket": ticket,
        "delivery": ticket.delivery,
        "record": ticket.unassigned_order,
        "comments": selectors.ticket_comments(ticket_id=ticket.pk),
        "timeline": selectors.delivery_timeline(delivery_id=ticket.delivery_id),
        "map": selectors.pickup_map(delivery=ticket.delivery, now=now),
        "now": now,
        "comment_form": forms.CommentForm(),
        "cancel_form": forms.CancelDeliveryForm(),
        "resolve_form": forms.ResolveForm(),
        "active": ticket.status in (TicketStatus.OPEN, TicketStatus.IN_PROGRESS),
        "read_only": _read_only(request.user),
        # (a finished ticket of a finished delivery has nothing more to show: no polling)
        "live_poll_ms": max(settings.SUPPORT_TICKET_REFRESH_SECONDS, 0) * 1000
        if ticket.status in (TicketStatus.OPEN, TicketStatus.IN_PROGRESS) or ticket.delivery.is_open else 0,
    }
    return render(request, "support/ticket.html", context)


def _message(exc: DomainError) -> str:
    """The refusal as the agent reads it: the field messages of invalid input, else the message."""
    details = exc.details
    if isinstance(details, dict):
        return " ".join(str(m) for msgs in details.values() for m in (msgs if isinstance(msgs, list) else [msgs]))
    if isinstance(details, list):
        return " ".join(str(m) for m in details)
    return exc.message


def _act(request, ticket_id, action, done: str):
    """Run the action's service; its refusal (409, 400, 404) becomes a message on the page."""
    try:
        result = action(Actor.for_user(request.user))
    except NotFound as exc:  # (no ticket page to go back to: the message went with its 404)
        messages.error(request, _message(exc))
        return redirect("support:queue"), None
    except DomainError as exc:
        messages.error(request, _message(exc))
        result = None
    else:
        messages.success(request, done)
    return redirect("support:ticket", ticket_id=ticket_id), result


def _form_error(request, ticket_id, form):
    messages.error(request, " ".join(str(e) for errs in form.errors.values() for e in errs))
    return redirect("support:ticket", ticket_id=ticket_id)


@require_POST
@support_required
def ticket_take(request, ticket_id):
    # Who held the ticket on the page (its hidden field; "" nobody): another agent's take since
    # then is not silently taken over.
    seen = {"seen_assignee_id": request.POST["assignee"]} if "assignee" in request.POST else {}
    response, _ = _act(
        request, ticket_id,
        lambda actor: tickets.ticket_take(ticket_id=ticket_id, user=request.user, actor=actor, **seen),
        "You have taken this ticket.",
    )
    return response


@require_POST
@support_required
def ticket_comment(request, ticket_id):
    form = forms.CommentForm(request.POST)
    if not form.is_valid():
        return _form_error(request, ticket_id, form)
    response, _ = _act(
        request, ticket_id,
        lambda actor: tickets.ticket_comment(
            ticket_id=ticket_id, user=request.user, actor=actor, body=form.cleaned_data["body"]
        ),
        "Comment added.",
    )
    return response


@require_POST
@support_required
def ticket_redispatch(request, ticket_id):
    response, dispatched = _act(
        request, ticket_id,
        lambda actor: escalations.ticket_redispatch(ticket_id=ticket_id, user=request.user, actor=actor),
        "Dispatched again with the wide radius.",
    )
    if dispatched is not None and dispatched.offer is None:
        messages.warning(request, f"No driver found ({dispatched.failure_reason}).")
    return response


@require_POST
@support_required
def ticket_cancel_delivery(request, ticket_id):
    form = forms.CancelDeliveryForm(request.POST)
    if not form.is_valid():
        return _form_error(request, ticket_id, form)
    response, _ = _act(
        request, ticket_id,
        lambda actor: escalations.ticket_cancel_delivery(
            ticket_id=ticket_id, user=request.user, actor=actor, reason=form.cleaned_data["reason"]
        ),
        "The delivery is cancelled and the ticket closed.",
    )
    return response


@require_POST
@support_required
def ticket_resolve(request, ticket_id):
    form = forms.ResolveForm(request.POST)
    if not form.is_valid():
        return _form_error(request, ticket_id, form)
    response, _ = _act(
        request, ticket_id,
        lambda actor: tickets.ticket_resolve(
            ticket_id=ticket_id, user=request.user, actor=actor, resolution=form.cleaned_data["resolution"]
        ),
        "Ticket resolved.",
    )
    return response
