import secrets
import uuid

from django.conf import settings
from django.contrib.gis.db import models
from django.core.files.storage import storages
from django.db.models import Q
from django.utils import timezone

from common.validators import validate_url_safe_text


class DeliveryStatus(models.TextChoices):
    READY = "ready"
    ASSIGNED = "assigned"
    PICKED_UP = "picked_up"
    IN_TRANSIT = "in_transit"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_DELIVERY_STATUSES = (
    DeliveryStatus.READY,
    DeliveryStatus.ASSIGNED,
    DeliveryStatus.PICKED_UP,
    DeliveryStatus.IN_TRANSIT,
)


def new_tracking_token() -> str:
    return secrets.token_urlsafe(24)  # 192 bits


class ProofPolicy(models.TextChoices):
    """What the driver must show to complete a delivery (docs/dispatch.md, "Proof of delivery"):
    nothing, the customer's handoff code, a photo, a signature (both uploaded as a
    `DeliveryProof`), or either the code or a photo."""

    NONE = "none"
    CODE = "code"
    PHOTO = "photo"
    SIGNATURE = "signature"
    CODE_OR_PHOTO = "code_or_photo"


class ProofKind(models.TextChoices):
    """What an uploaded proof shows."""

    PHOTO = "photo"
    SIGNATURE = "signature"


class DispatchPolicy(models.TextChoices):
    """How a ready delivery is offered (docs/dispatch.md, "Dispatch policies"): per zone, else
    the DISPATCH_POLICY setting."""

    SEQUENTIAL = "sequential"  # the best-ranked driver, then the next on reject/expiry
    BATCH = "batch"  # the top N at once; the first accept wins, the others are withdrawn
    BROADCAST = "broadcast"  # every eligible driver in the radius (capped); first accept wins
    BATCHED_MATCHING = "batched_matching"  # collected for a window, matched by minimum total cost


# The policies that ask for (or take) the customer's handoff code at delivery-completed: the
# customer is shown the code for these.
CODE_POLICIES = (ProofPolicy.CODE, ProofPolicy.CODE_OR_PHOTO)
# The uploaded proof each policy needs at delivery-completed (code_or_photo: a photo, or the code).
POLICY_PROOF_KIND = {
    ProofPolicy.PHOTO: ProofKind.PHOTO,
    ProofPolicy.SIGNATURE: ProofKind.SIGNATURE,
    ProofPolicy.CODE_OR_PHOTO: ProofKind.PHOTO,
}
HANDOFF_CODE_MAX_FAILURES = 5


class FailureReason(models.TextChoices):
    """Why a delivery failed, as the driver says at delivery-failed (docs/dispatch.md)."""

    CUSTOMER_UNAVAILABLE = "customer_unavailable"
    ADDRESS_NOT_FOUND = "address_not_found"
    REFUSED = "refused"
    DAMAGED = "damaged"
    UNSAFE = "unsafe"
    OTHER = "other"


def new_handoff_code() -> str:
    """The 4-digit code the customer tells the driver at the door."""
    return f"{secrets.randbelow(10_000):04d}"


class Delivery(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    seller_order_id = models.CharField(max_length=255, validators=[validate_url_safe_text])
    seller_id = models.CharField(max_length=255, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="created_deliveries"
    )
    store_name = models.CharField(max_length=255)
    pickup_location = models.PointField(geography=True, srid=4326)
    dropoff_location = models.PointField(geography=True, srid=4326)
    dropoff_address = models.CharField(max_length=500, blank=True, default="")
    customer_name = models.CharField(max_length=200, blank=True, default="")
    customer_phone = models.CharField(max_length=32, blank=True, default="", help_text="E.164 (+4915123456789)")
    customer_email = models.EmailField(max_length=254, blank=True, default="")
    customer_language = models.CharField(
        max_length=16, blank=True, default="", help_text="The customer's language for messages (e.g. en, es, hi); empty: English"
    )
    prep_time_minutes = models.PositiveIntegerField(default=0)
    delivery_fee = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)
    # False: not dispatched at intake; ops start its dispatch, and until they have nothing offers
    # it (the retry job, the escalation check). Once they have, the next candidate after a
    # rejected, expired or withdrawn offer as for any delivery (docs/dispatch.md, "autoDispatch").
    auto_dispatch = models.BooleanField(default=True)

    # Proof of delivery (docs/dispatch.md): the policy, the customer's handoff code (never shown
    # to a driver), wrong codes given for it, and when ops were flagged (codes refused until reset).
    proof_required = models.CharField(max_length=20, choices=ProofPolicy.choices, default=ProofPolicy.NONE)
    handoff_code = models.CharField(max_length=4, default=new_handoff_code, editable=False)
    handoff_code_failures = models.PositiveSmallIntegerField(default=0)
    handoff_code_locked_at = models.DateTimeField(
        null=True, blank=True, help_text="Set after the 5th wrong handoff code: codes are refused until ops reset it."
    )
    # Completed outside the drop-off geofence, or with no recent fix, on the driver's word
    # (docs/dispatch.md, "Geofence"): the overrideReason given, and how far from the drop-off the
    # driver's latest fix was (null: no recent fix). Empty reason: completed within the geofence.
    geofence_override_reason = models.CharField(
        max_length=500, blank=True, default="",
        help_text="Set when the driver completed it away from the drop-off (or without a recent location): their reason.",
    )
    geofence_override_distance_m = models.PositiveIntegerField(
        null=True, blank=True, help_text="Metres from the drop-off at that completion (empty: no recent location)."
    )

    status = models.CharField(
        max_length=20, choices=DeliveryStatus.choices, default=DeliveryStatus.READY, db_index=True
    )
    tracking_token = models.CharField(max_length=64, default=new_tracking_token, editable=False)
    zone = models.ForeignKey("zones.DeliveryZone", null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    current_offer = models.ForeignKey(
        "offers.DriverOffer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    accepted_offer = models.ForeignKey(
        "offers.DriverOffer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    offer_acceptance_count = models.PositiveIntegerField(default=0)
    # batched_matching (docs/dispatch.md): since when the delivery waits for its zone's next
    # matching round (null: not waiting). Written under the delivery's lock by
    # workflows.matching; the round's query reads it through the partial index below.
    matching_since = models.DateTimeField(null=True, blank=True)

    failure_reason = models.CharField(max_length=500, blank=True, default="")
    # The reason as one of FailureReason (free text given as `reason`, as the SPEC allows, is
    # `other` with the text as its note) and the driver's note.
    failure_code = models.CharField(max_length=30, choices=FailureReason.choices, blank=True, default="")
    failure_note = models.CharField(max_length=1000, blank=True, default="")
    cancellation_reason = models.CharField(max_length=500, blank=True, default="")

    # (the creating workflow's time, which its ready_at, audit row and first dispatch share:
    # auto_now_add stamped it a few ms later, after the dispatch's updatedAt)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    ready_at = models.DateTimeField()
    assigned_at = models.DateTimeField(null=True, blank=True)
    pickup_started_at = models.DateTimeField(null=True, blank=True)
    picked_up_at = models.DateTimeField(null=True, blank=True)
    in_transit_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Latest ETA (dispatch/eta_service.py; docs/tracking.md), derived from the driver's fixes.
    eta_pickup_at = models.DateTimeField(null=True, blank=True)
    eta_delivery_at = models.DateTimeField(null=True, blank=True)
    eta_confidence = models.FloatField(null=True, blank=True)
    eta_calculated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["created_by", "seller_order_id"], name="delivery_seller_order_uniq"),
            models.CheckConstraint(condition=Q(prep_time_minutes__lte=24 * 60), name="delivery_prep_time_sane"),
        ]
        indexes = [
            models.Index(fields=["seller_order_id"], name="delivery_seller_order_idx"),
            models.Index(fields=["created_at"], name="delivery_created_idx"),
            models.Index(fields=["ready_at"], name="delivery_open_ready_idx", condition=Q(status="ready")),
            models.Index(
                fields=["zone", "matching_since"], name="delivery_matching_wait_idx",
                condition=Q(status="ready", matching_since__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.seller_order_id} ({self.status})"

    @property
    def tracking_url(self) -> str:
        base = settings.TRACKING_BASE_URL.rstrip("/")
        return f"{base}/{self.id}?token={self.tracking_token}"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_DELIVERY_STATUSES

    @property
    def wait_ended_at(self):
        """When it stopped waiting for a driver: the first assignment, cancel or failure since it
        was last ready; None while it is ready (the support queue's "Waiting" counted on after
        a delivery was assigned or cancelled)."""
        if self.status == DeliveryStatus.READY:
            return None
        ends = [t for t in (self.assigned_at, self.cancelled_at, self.failed_at) if t is not None and t >= self.ready_at]
        return min(ends) if ends else self.updated_at


class AssignmentStatus(models.TextChoices):
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AssignmentEndReason(models.TextChoices):
    """Why an assignment ended, as the assignment record shows it (`GET /v2/deliveries/{id}/assignments`)."""

    COMPLETED = "completed"
    FAILED = "failed"
    REASSIGNED = "reassigned"
    CANCELLED = "cancelled"


class Assignment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey(Delivery, on_delete=models.PROTECT, related_name="assignments")
    driver = models.ForeignKey("availability.Driver", on_delete=models.PROTECT, related_name="assignments")
    # The offer the driver accepted; null when ops assigned the driver directly.
    offer = models.ForeignKey("offers.DriverOffer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=20, choices=AssignmentStatus.choices, default=AssignmentStatus.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["delivery"], condition=Q(status="active"), name="assignment_one_active_per_delivery"
            ),
        ]
        # Per driver: at most its capacity of active assignments, counted by a trigger into
        # dispatch_driver.active_assignments under a CHECK (availability.models.Driver; the
        # migration 0016_assignment_capacity_per_driver creates the trigger). Lookups by driver use this index.
        indexes = [
            models.Index(fields=["driver"], condition=Q(status="active"), name="assignment_active_driver_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.driver} → {self.delivery} ({self.status})"

    @property
    def ended_because(self) -> str | None:
        """completed, failed, reassigned (ops took the delivery away) or cancelled (the delivery
        was); None while active."""
        if self.status == AssignmentStatus.ACTIVE:
            return None
        if self.status == AssignmentStatus.CANCELLED and self.end_reason == "reassigned":
            return AssignmentEndReason.REASSIGNED
        return {
            AssignmentStatus.COMPLETED: AssignmentEndReason.COMPLETED,
            AssignmentStatus.FAILED: AssignmentEndReason.FAILED,
        }.get(self.status, AssignmentEndReason.CANCELLED)


class Quote(models.Model):
    """What a delivery from `pickup` to `dropoff` would cost, and that it can be delivered
    (`POST /v2/quotes`). A serviceable quote locks its fee: passed as `quoteId` to `POST
    /v2/deliveries` before `expires_at`, once, by its owner, for the same pickup and drop-off."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quotes")
    pickup_location = models.PointField(geography=True, srid=4326)
    dropoff_location = models.PointField(geography=True, srid=4326)
    prep_time_minutes = models.PositiveIntegerField(default=0)
    zone = models.ForeignKey("zones.DeliveryZone", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    distance_km = models.FloatField()
    delivery_fee = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    delivery = models.OneToOneField(Delivery, null=True, blank=True, on_delete=models.SET_NULL, related_name="quote")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["expires_at"], name="quote_expires_idx")]

    def __str__(self) -> str:
        return f"quote {self.pk} ({self.delivery_fee})"


def proof_storage():
    """Where proof files live: the "proofs" storage of settings.STORAGES (local files by
    default, an S3-compatible bucket with PROOF_STORAGE=s3). A callable, so no setting lands in
    a migration. Django calls it once, when the model loads: code that stores or reads a proof
    file calls it again (not `proof.file.storage`), so a changed STORAGES (tests) is seen."""
    return storages["proofs"]


def proof_file_name(*, delivery_id, proof_id, extension: str) -> str:
    """`<delivery id>/<proof id>.<ext>` in the proofs storage: nothing of the uploaded name."""
    return f"{delivery_id}/{proof_id}.{extension}"


def proof_upload_to(proof: "DeliveryProof", filename: str) -> str:
    extension = filename.rsplit(".", 1)[-1] if "." in filename else "bin"
    return proof_file_name(delivery_id=proof.delivery_id, proof_id=proof.pk, extension=extension)


class DeliveryProof(models.Model):
    """A photo or signature the assigned driver uploaded (`POST /v2/drivers/{id}/deliveries/
    {deliveryId}/proof`): checked by its content and re-encoded without any metadata (EXIF,
    GPS) before it is stored. Its file is served only through a signed, expiring URL
    (`dispatch.proofs.proof_signed_url`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey(Delivery, on_delete=models.PROTECT, related_name="proofs")
    driver = models.ForeignKey("availability.Driver", on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=20, choices=ProofKind.choices)
    file = models.FileField(upload_to=proof_upload_to, storage=proof_storage, max_length=255)
    content_type = models.CharField(max_length=50)
    size_bytes = models.PositiveIntegerField()
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    note = models.CharField(max_length=1000, blank=True, default="")
    # The delivery's status when the proof came (in_transit, or failed for evidence after a failure).
    delivery_status = models.CharField(max_length=20, choices=DeliveryStatus.choices)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["delivery", "kind"], name="proof_delivery_kind_idx")]

    def __str__(self) -> str:
        return f"{self.kind} for {self.delivery_id}"
