from django import forms

from escalation.models import MAX_ESCALATION_LEVEL, TicketPriority, TicketStatus
from escalation.selectors import ACTIVE, ALL
from zones.models import DeliveryZone


class QueueFilterForm(forms.Form):
    status = forms.ChoiceField(
        required=False,
        choices=[(ACTIVE, "Open + in progress"), *TicketStatus.choices, (ALL, "All")],
    )
    priority = forms.ChoiceField(required=False, choices=[("", "Any priority"), *TicketPriority.choices])
    zone = forms.ModelChoiceField(required=False, queryset=DeliveryZone.objects.order_by("name"), empty_label="Any zone")
    level = forms.TypedChoiceField(
        required=False, coerce=int, empty_value=None,
        choices=[("", "Any level"), *[(str(n), f"Level {n}") for n in range(MAX_ESCALATION_LEVEL + 1)]],
    )
    mine = forms.BooleanField(required=False, label="Assigned to me")


class CommentForm(forms.Form):
    body = forms.CharField(max_length=5000, widget=forms.Textarea(attrs={"rows": 3}), label="Comment")


class CancelDeliveryForm(forms.Form):
    reason = forms.CharField(max_length=500, label="Reason")


class ResolveForm(forms.Form):
    resolution = forms.CharField(max_length=5000, widget=forms.Textarea(attrs={"rows": 2}), label="Resolution note")
