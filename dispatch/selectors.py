from __future__ import annotations

from django.db import connection
from django.db.models import Prefetch, QuerySet

from common.exceptions import NotFound
from common.roles import driver_of, is_integration, is_ops
from dispatch.models import Assignment, Delivery, DeliveryProof


def _with_latest_assignment(qs: QuerySet) -> QuerySet:
    """Each delivery's latest assignment as `latest_assignments` (a list of at most one): the
    active one while there is one (a new assignment starts only after the last one ended), else
    the one a finished delivery ended with. One query for the whole page."""
    return qs.prefetch_related(
        Prefetch(
            "assignments",
            queryset=Assignment.objects.order_by("-created_at", "-id")[:1],
            to_attr="latest_assignments",
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
    return _with_latest_assignment(qs)


def delivery_get_for_user(*, user, delivery_id) -> Delivery:
    delivery = deliveries_visible_to(user).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("Delivery not found.")
    return delivery


def delivery_check_visible(*, user, delivery_id) -> None:
    """NotFound unless `user` may see the delivery (the rule of `delivery_get_for_user`), for
    an endpoint that needs only that: one `SELECT 1 … LIMIT 1`, no row built, no latest
    assignment fetched."""
    if not deliveries_visible_to(user).filter(pk=delivery_id).exists():
        raise NotFound("Delivery not found.")


def deliveries_list(*, user, status: str | None = None, seller_order_id: str | None = None) -> QuerySet[Delivery]:
    qs = deliveries_visible_to(user)
    if status:
        qs = qs.filter(status=status)
    if seller_order_id:
        qs = qs.filter(seller_order_id=seller_order_id)
    return qs


def assignments_for_user(*, user, delivery_id) -> QuerySet[Assignment]:
    """The delivery's assignment record, oldest first: every assignment for ops and the owning
    integration, a driver's own only (a driver who never had it, or anyone else: NotFound)."""
    qs = Assignment.objects.filter(delivery_id=delivery_id).order_by("created_at", "id")
    if is_ops(user):
        found = Delivery.objects.filter(pk=delivery_id).exists()
    elif is_integration(user):
        found = Delivery.objects.filter(pk=delivery_id, created_by=user).exists()
    elif (driver := driver_of(user)) is not None:
        qs = qs.filter(driver=driver)
        found = qs.exists()
    else:
        found = False
    if not found:
        raise NotFound("Delivery not found.")
    return qs


def assignment_of_driver(*, delivery_id, driver_id) -> Assignment | None:
    """The driver's latest assignment of the delivery, with the delivery, unlocked (the same row
    `workflows.locks.lock_assignment_of_driver` locks); None when the driver never had it."""
    return (
        Assignment.objects.select_related("delivery")
        .filter(delivery_id=delivery_id, driver_id=driver_id).order_by("-created_at").first()
    )


def proof_get(proof_id) -> DeliveryProof | None:
    """A proof by id (its file is served only for a signed URL: `dispatch.views.proof_file`)."""
    return DeliveryProof.objects.filter(pk=proof_id).first()


def proofs_for_user(*, user, delivery_id) -> QuerySet[DeliveryProof]:
    """The proofs of a delivery `user` may read (NotFound otherwise), oldest first: all of them
    for ops and the owning integration, a driver's own only (a driver the delivery was taken
    from read the next driver's notes, which carry what the customer said, and id)."""
    delivery = delivery_get_for_user(user=user, delivery_id=delivery_id)
    qs = DeliveryProof.objects.filter(delivery=delivery).order_by("created_at", "id")
    if not is_ops(user) and not is_integration(user) and (driver := driver_of(user)) is not None:
        qs = qs.filter(driver=driver)
    return qs


# Busy drivers with room under their capacity who carry a delivery not yet on its way (assigned,
# or picked up and still at the store) whose pickup is within `radius_m` of a new pickup: the
# candidates for order stacking (docs/dispatch.md). Nearest first.
_STACKABLE_SQL = """
SELECT d.id, d.vehicle_type, ST_Y(d.location::geometry), ST_X(d.location::geometry),
       ST_Distance(d.location, %(pickup)s, false) / 1000.0 AS km
FROM dispatch_driver d
WHERE d.availability = 'busy' AND d.active_assignments < d.capacity
  AND d.location IS NOT NULL AND d.location_recorded_at >= %(cutoff)s
  AND EXISTS (
    SELECT 1 FROM dispatch_assignment a JOIN dispatch_delivery x ON x.id = a.delivery_id
    WHERE a.driver_id = d.id AND a.status = 'active' AND x.status IN ('assigned', 'picked_up')
      AND ST_DWithin(x.pickup_location, %(pickup)s, %(radius_m)s, false)
  )
ORDER BY km, d.id
LIMIT %(limit)s
"""


def stackable_drivers_near(*, lat: float, lon: float, radius_m: float, cutoff, limit: int = 50) -> list[tuple]:
    """(driver id, vehicle type, lat, lon, km to the pickup) of each busy driver that may stack a delivery
    picked up at (lat, lon), by pickup distance and room only (the detour is the caller's)."""
    pickup = f"SRID=4326;POINT({float(lon)!r} {float(lat)!r})"
    with connection.cursor() as cur:
        cur.execute(
            _STACKABLE_SQL.replace("%(pickup)s", "ST_GeogFromText(%(pickup)s)"),
            {"pickup": pickup, "radius_m": float(radius_m), "cutoff": cutoff, "limit": limit},
        )
        return [(str(pk), vt, float(y), float(x), float(km)) for pk, vt, y, x, km in cur.fetchall()]


def carried_deliveries(driver_ids) -> dict[str, list[Delivery]]:
    """Driver id → the deliveries it carries (active assignments), in the order assigned."""
    out: dict[str, list[Delivery]] = {}
    rows = (
        Assignment.objects.select_related("delivery")
        .filter(driver_id__in=list(driver_ids), status="active").order_by("created_at", "id")
    )
    for a in rows:
        out.setdefault(str(a.driver_id), []).append(a.delivery)
    return out
