"""Admin actions that change state ask first: a confirmation page listing the rows, with a
required typed reason, and only then the service (through `common.admin.run_for_each`).

Used by the delivery actions (cancel, reassign) and the unassigned-order escalation."""
from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.template.response import TemplateResponse


class ReasonForm(forms.Form):
    """A typed reason: required, and not just spaces (it goes into the audit trail)."""

    reason = forms.CharField(
        max_length=500, strip=True,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "required": True, "autofocus": True}),
        help_text="Required. Recorded in the audit trail with your name.",
    )


def confirm_then(
    modeladmin, request, queryset, *, action: str, title: str, explanation: str, button: str,
    run: Callable[[forms.Form], None], form_class: type[forms.Form] = ReasonForm, describe: Callable = str,
):
    """The first POST (from the change list) shows the confirmation page; the second, with
    `apply` and a valid form, calls `run(form)` and returns to the list. An invalid form
    (no reason) shows the page again with the error."""
    applying = "apply" in request.POST
    form = form_class(request.POST if applying else None)
    if applying and form.is_valid():
        run(form)
        return None
    opts = modeladmin.model._meta
    return TemplateResponse(request, "admin/console/confirm_action.html", {
        **modeladmin.admin_site.each_context(request),
        "title": title, "explanation": explanation, "button": button, "action": action,
        "form": form, "selection": selection(request, queryset, describe), "opts": opts,
        "media": modeladmin.media + form.media,
    })


SHOWN = 100  # rows a confirmation page lists


def selection(request, queryset, describe: Callable = str) -> dict:
    """What an action's confirmation page lists (at most SHOWN rows, and how many more) and
    carries to its second POST (`admin/console/selection_inputs.html`). Django's "select all N"
    (`select_across`) is carried as itself, the list's filters in the URL the form posts back
    to: as one id per row, past ~1,000 rows the POST broke DATA_UPLOAD_MAX_NUMBER_FIELDS (a
    bare 400, nothing done, the page listing every row)."""
    across = request.POST.get("select_across") == "1"
    count = queryset.count()
    shown = [(obj.pk, describe(obj)) for obj in queryset.order_by("pk")[:SHOWN]]
    pks = [pk for pk, _ in shown][:1] if across else list(queryset.order_by("pk").values_list("pk", flat=True))
    return {"across": across, "count": count, "shown": shown, "more": count - len(shown), "pks": pks}
