from django.contrib import admin, messages

from common.actors import Actor
from common.admin import ChangedFieldsOnlyAdmin, json_block, recent_filter
from common.admin_confirm import too_many
from offers.models import DriverOffer
from workflows.offers import offer_expire


def _offers(n: int) -> str:
    return f"{n} offer" if n == 1 else f"{n} offers"


class OfferInline(admin.TabularInline):
    model = DriverOffer
    fk_name = "delivery"
    extra = 0
    can_delete = False
    fields = ("driver", "status", "created_at", "expires_at", "accepted_at", "rejected_at", "rejection_reason", "driver_response_time_ms")
    readonly_fields = fields
    ordering = ("created_at",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(DriverOffer)
class DriverOfferAdmin(ChangedFieldsOnlyAdmin):
    list_display = ("id", "delivery", "driver", "status", "created_at", "expires_at", "driver_response_time_ms")
    list_filter = ("status", recent_filter("created_at", "created"), "notification_method")
    search_fields = ("delivery__seller_order_id", "driver__name", "id")
    list_select_related = ("delivery", "driver")
    date_hierarchy = "created_at"
    actions = ["expire_now"]

    exclude = ("offer_payload",)

    def get_readonly_fields(self, request, obj=None):
        return [f"{f.name}_shown" if f.name == "offer_payload" else f.name for f in DriverOffer._meta.fields]

    @admin.display(description="offer payload")
    def offer_payload_shown(self, offer):
        return json_block(offer.offer_payload)

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        # the list's action needs it; an offer's own page has nothing to save (every field
        # read-only: a Save button that said "changed successfully" for nothing)
        return obj is None and super().has_change_permission(request)

    @admin.action(description="Expire selected pending offers now (next candidate is offered)", permissions=["change"])
    def expire_now(self, request, queryset):
        if too_many(request, queryset):
            return
        done, selected = 0, queryset.count()
        for offer in queryset.filter(status="PENDING").order_by("pk"):
            done += offer_expire(offer_id=offer.pk, force=True, actor=Actor.for_user(request.user))
        self.message_user(request, f"Expired {_offers(done)}.", messages.SUCCESS if done else messages.WARNING)
        if selected > done:  # answered, expired or withdrawn meanwhile, or being answered right now: left as they are
            self.message_user(request, f"{_offers(selected - done)} of the selection not expired: no longer pending, "
                                       "or being answered at that moment.", messages.WARNING)
