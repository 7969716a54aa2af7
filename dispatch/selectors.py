from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from common.exceptions import NotFound
from common.roles import driver_of, is_integration, is_ops
from dispatch.models import Assignment, AssignmentStatus, Delivery


def _with_active_assignment(qs: QuerySet) -> QuerySet:
    return qs.prefetch_related(
        Prefetch(
            "assignments",
            queryset=Assignment.objects.filter(status=AssignmentStatus.ACTIVE),
            to_attr="active_assignments",
        )
    )


def deliveries_visible_to(user) -> QuerySet[Delivery]:
    """Ops see all deliveries, an integration its own, a driver those it was assigned."""
    qs = Delivery.objects.all()
    if is_ops(user):
        pass
    elif is_integration(user):
        qs = qs.filter(created_by=user)
    elif (driver := driver_of(user)) is not None:
        qs = qs.filter(assignments__driver=driver).distinct()
    else:
        qs = qs.none()
    return _with_active_assignment(qs)


def delivery_get_for_user(*, user, delivery_id) -> Delivery:
    delivery = deliveries_visible_to(user).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("Delivery not found.")
    return delivery


def deliveries_list(*, user, status: str | None = None, seller_order_id: str | None = None) -> QuerySet[Delivery]:
    qs = deliveries_visible_to(user)
    if status:
        qs = qs.filter(status=status)
    if seller_order_id:
        qs = qs.filter(seller_order_id=seller_order_id)
    return qs
