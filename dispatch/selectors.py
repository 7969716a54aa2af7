from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from common.exceptions import NotFound
from common.roles import driver_of, is_integration, is_ops
from dispatch.models import Assignment, AssignmentStatus, Delivery, Driver


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


def driver_get_for_user(*, user, driver_id) -> Driver:
    """Ops read any driver; a driver only itself (another driver's id is a 404)."""
    if is_ops(user):
        driver = Driver.objects.select_related("user").filter(pk=driver_id).first()
    else:
        own = driver_of(user)
        driver = own if own is not None and str(own.pk) == str(driver_id) else None
    if driver is None:
        raise NotFound("Driver not found.")
    return driver


def drivers_list(*, availability: str | None = None, zone_id=None) -> QuerySet[Driver]:
    """`zone_id`: only drivers whose last known location lies in that zone (unknown zone → 404)."""
    qs = Driver.objects.select_related("user")
    if availability:
        qs = qs.filter(availability=availability)
    if zone_id:
        from zones.selectors import drivers_inside_zone

        qs = drivers_inside_zone(qs, zone_id=zone_id)
    return qs
