from __future__ import annotations

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


def proof_get(proof_id) -> DeliveryProof | None:
    """A proof by id (its file is served only for a signed URL: `dispatch.views.proof_file`)."""
    return DeliveryProof.objects.filter(pk=proof_id).first()


def proofs_for_user(*, user, delivery_id) -> QuerySet[DeliveryProof]:
    """The proofs of a delivery `user` may read (NotFound otherwise), oldest first."""
    delivery = delivery_get_for_user(user=user, delivery_id=delivery_id)
    return DeliveryProof.objects.filter(delivery=delivery).order_by("created_at", "id")
