"""Admin actions that change state ask first: a confirmation page listing the rows, with a
required typed reason, and only then the service (through `common.admin.run_for_each`).

Used by the delivery actions (cancel, reassign) and the unassigned-order escalation."""
from __future__ import annotations

import hashlib
from collections.abc import Callable

from django import forms
from django.contrib import messages
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
    if applying and form.is_valid() and selection_holds(request, queryset):
        run(form)
        return None
    if not applying and too_many(request, queryset):
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
    every = list(queryset.order_by("pk").values_list("pk", flat=True))
    shown = [(obj.pk, describe(obj)) for obj in queryset.order_by("pk")[:SHOWN]]
    return {"across": across, "count": len(every), "shown": shown, "more": len(every) - len(shown),
            "pks": every[:1] if across else every, "digest": _digest(every) if across else ""}


ACROSS_MAX = 1000  # rows one "select all" action works through (one request, a service call each)


def too_many(request, queryset) -> bool:
    """A "select all N" of more than ACROSS_MAX rows is refused, with a message (the list is
    shown again): one request working through thousands of rows outlasts a proxy's timeout and
    stops half done, with no summary."""
    if request.POST.get("select_across") != "1" or (count := queryset.count()) <= ACROSS_MAX:
        return False
    messages.error(request, f"{count} rows selected: at most {ACROSS_MAX} at once. Nothing was done; narrow the list's filters.")
    return True


def selection_holds(request, queryset) -> bool:
    """On the confirming POST of a "select all N": the rows the list's filters match now are
    the ones the page listed (the same ids); else a message, and the page is shown again. The
    filters are read again at the click: a delivery that became ready, or late, between the
    two POSTs would be cancelled without having been shown."""
    if request.POST.get("select_across") != "1":
        return True
    if too_many(request, queryset):
        return False
    every = list(queryset.order_by("pk").values_list("pk", flat=True))
    if request.POST.get("selection_digest") == _digest(every):
        return True
    messages.warning(request, f"The list changed since this page was shown (it now matches {len(every)} rows): "
                              "nothing was done. Check the rows and confirm again.")
    return False


def _digest(pks) -> str:
    return hashlib.sha256(",".join(str(pk) for pk in pks).encode()).hexdigest()
