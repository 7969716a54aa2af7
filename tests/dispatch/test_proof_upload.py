"""Photo and signature proof (docs/dispatch.md, "Proof of delivery"): the upload by the assigned
driver, checked by content and stored without metadata; the policies that need it at
completion and failure; the signed, expiring URLs it is served by; who sees what."""
from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
import time_machine
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.test.client import encode_multipart
from django.utils import timezone
from PIL import ExifTags, Image

from audit.models import DeliveryAuditLog
from common.actors import Actor
from dispatch import proofs
from dispatch.models import Delivery, DeliveryProof, proof_storage
from notifications.models import OutboxEvent
from tests.api import assert_error, client_for
from tests.dispatch.test_proof_of_delivery import complete, in_transit, wrong
from tests.factories import DeliveryFactory, DriverFactory, IntegrationUserFactory, driver_at_dropoff
from workflows.deliveries import assignment_create, delivery_advance, delivery_cancel

pytestmark = pytest.mark.django_db

GPS = ExifTags.IFD.GPSInfo


@pytest.fixture(autouse=True)
def proof_dir(settings, tmp_path):
    """Proof files of this test in a directory of its own (the "proofs" storage)."""
    location = tmp_path / "proofs"
    settings.STORAGES = {
        **settings.STORAGES,
        "proofs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(location)}},
    }
    return location


def stored_files(location) -> list:
    return [p for p in location.rglob("*") if p.is_file()] if location.exists() else []


def jpeg_with_gps(size=(64, 48)) -> bytes:
    """A real JPEG whose EXIF holds a camera make and a GPS position (Bengaluru)."""
    image = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCam"
    exif[ExifTags.Base.Orientation] = 1
    exif[GPS] = {
        ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (12.0, 58.0, 18.0),
        ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (77.0, 35.0, 40.0),
    }
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    raw = out.getvalue()
    assert Image.open(io.BytesIO(raw)).getexif().get_ifd(GPS)  # the fixture really carries a location
    return raw


def image_bytes(kind: str, size=(40, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "1") else (10, 120, 200)).save(out, kind)
    return out.getvalue()


def upload(client, driver, delivery, *, kind="photo", content=None, name="proof.jpg", content_type="image/jpeg", **extra):
    body = {"kind": kind, **extra}
    if content is not False:
        body["file"] = SimpleUploadedFile(name, jpeg_with_gps() if content is None else content, content_type=content_type)
    return client.post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/proof", body, format="multipart")


def with_policy(integration_user, driver, policy):
    return in_transit(DeliveryFactory(created_by=integration_user, proof_required=policy), driver)


@pytest.fixture
def moving(integration_user, driver):
    """A delivery (no proof policy) in transit with `driver`."""
    return with_policy(integration_user, driver, "none")


# ----------------------------------------------------------------------------- upload


def test_the_assigned_driver_uploads_a_photo_stored_without_exif_or_gps(moving, driver, driver_client, proof_dir):
    original = jpeg_with_gps()
    r = upload(driver_client, driver, moving, content=original, note="Left with the concierge")

    assert r.status_code == 201, r.content
    body = r.json()
    assert body["kind"] == "photo" and body["contentType"] == "image/jpeg" and body["note"] == "Left with the concierge"
    assert body["deliveryStatus"] == "in_transit" and body["driverId"] == str(driver.pk)
    assert (body["width"], body["height"]) == (64, 48)
    assert body["url"] is None  # a driver is given no file URL

    proof = DeliveryProof.objects.get(pk=body["id"])
    assert proof.file.name == f"{moving.pk}/{proof.pk}.jpg"  # nothing of the phone's file name
    (path,) = stored_files(proof_dir)
    stored = path.read_bytes()
    assert b"PhoneCam" in original and b"PhoneCam" not in stored
    assert b"Exif" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG" and image.size == (64, 48)
        assert len(image.getexif()) == 0 and not image.getexif().get_ifd(GPS)
        assert "exif" not in image.info and "icc_profile" not in image.info
    assert proof.size_bytes == len(stored)


def test_a_delivery_takes_at_most_proof_max_per_delivery_proofs(moving, driver, driver_client, proof_dir, settings, monkeypatch):
    """No cap: one delivery of an audit ended up with over 100 proofs (tables and storage grow
    without bound). The next one is refused before its image is decoded."""
    from dispatch import proofs as proof_files

    settings.PROOF_MAX_PER_DELIVERY = 2
    assert upload(driver_client, driver, moving).status_code == 201
    assert upload(driver_client, driver, moving, kind="signature").status_code == 201
    decoded = []
    monkeypatch.setattr(proof_files, "_clean", lambda upload: decoded.append(upload))
    r = upload(driver_client, driver, moving)
    assert "2 proofs already" in assert_error(r, 409)["message"] and decoded == []
    assert moving.proofs.count() == 2


def _picked_up(integration_user, driver, policy):
    delivery = DeliveryFactory(created_by=integration_user, proof_required=policy)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed"):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.system())
    return delivery


def test_the_proof_a_delivery_policy_asks_for_is_taken_over_the_cap_once(integration_user, driver, driver_client, settings):
    """Photos at the store filled the cap, and a photo-policy delivery could be neither proven
    nor completed, by this driver or the next (an audit: 20 photos, then two 409s)."""
    settings.PROOF_MAX_PER_DELIVERY = 2
    delivery = _picked_up(integration_user, driver, "photo")
    assert upload(driver_client, driver, delivery).status_code == 201  # (at the store)
    assert upload(driver_client, driver, delivery).status_code == 201
    assert_error(upload(driver_client, driver, delivery), 409)  # a third at the store: the cap
    delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-started", actor=Actor.system())
    driver_at_dropoff(driver, delivery)

    assert upload(driver_client, driver, delivery).status_code == 201  # the proof of delivery

    assert "2 proofs already" in assert_error(upload(driver_client, driver, delivery), 409)["message"]  # once
    assert_error(upload(driver_client, driver, delivery, kind="signature"), 409)  # not one the policy asks
    assert complete(driver_client, driver, delivery).status_code == 200


def test_a_proof_is_stamped_under_the_lock_after_its_decode(integration_user, driver, monkeypatch):
    """A photo begun while picked up, decoded while the driver set off: it was stored "in
    transit" at a time before delivery_started, and audited before it (an audit)."""
    from workflows import deliveries as flows

    delivery = _picked_up(integration_user, driver, "photo")
    real_clean = flows.proof_image_clean

    def decoded_while_the_driver_sets_off(upload, caller=None):
        image = real_clean(upload, caller=caller)
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-started", actor=Actor.system())
        return image

    monkeypatch.setattr(flows, "proof_image_clean", decoded_while_the_driver_sets_off)
    photo = SimpleUploadedFile("p.jpg", jpeg_with_gps(), content_type="image/jpeg")
    proof = flows.delivery_proof_add(delivery_id=delivery.pk, driver_id=driver.pk, kind="photo", upload=photo, note="",
                                     actor=Actor("driver", driver.pk))

    delivery.refresh_from_db()
    assert proof.delivery_status == "in_transit" and proof.created_at > delivery.in_transit_at
    trail = list(DeliveryAuditLog.objects.filter(delivery=delivery).order_by("seq").values_list("event_type", "timestamp"))
    assert [event for event, _ in trail][-2:] == ["delivery_started", "proof_added"]
    assert [at for _, at in trail] == sorted(at for _, at in trail)


def test_a_proof_is_audited_and_told_to_merchants(moving, driver, driver_client):
    proof_id = upload(driver_client, driver, moving, note="door").json()["id"]

    audit = DeliveryAuditLog.objects.get(delivery=moving, event_type="proof_added")
    assert audit.details == {
        "driverId": str(driver.pk), "proofId": proof_id, "kind": "photo", "deliveryStatus": "in_transit", "note": "door",
    }
    assert audit.actor_type == "driver"
    (event,) = OutboxEvent.objects.filter(delivery=moving, type="delivery.proof_added")
    change = event.payload["data"]["change"]
    assert change["proofId"] == proof_id and change["kind"] == "photo" and change["driverId"] == str(driver.pk)
    assert "/proofs/" not in str(event.payload)  # no file URL travels in a webhook


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_png_and_webp_are_taken_by_their_content_whatever_the_name(moving, driver, driver_client, fmt, content_type):
    r = upload(driver_client, driver, moving, kind="signature", content=image_bytes(fmt), name="sig.jpg")

    assert r.status_code == 201, r.content
    assert r.json()["contentType"] == content_type and r.json()["kind"] == "signature"
    with proof_storage().open(DeliveryProof.objects.get().file.name) as f, Image.open(f) as image:
        assert image.format == fmt


def test_a_webp_loses_its_exif_too(moving, driver, driver_client, proof_dir):
    with Image.open(io.BytesIO(jpeg_with_gps())) as photo:
        exif = photo.getexif()
        out = io.BytesIO()
        photo.save(out, "WEBP", exif=exif)
    assert b"PhoneCam" in out.getvalue()

    assert upload(driver_client, driver, moving, content=out.getvalue(), name="p.webp").status_code == 201

    (path,) = stored_files(proof_dir)
    assert b"PhoneCam" not in path.read_bytes() and b"EXIF" not in path.read_bytes()
    with Image.open(path) as stored:
        assert stored.format == "WEBP" and len(stored.getexif()) == 0


def test_a_png_signature_keeps_its_transparency_and_loses_its_text_chunks(moving, driver, driver_client):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "signed at 12.97,77.59")
    image = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    image.putpixel((3, 3), (0, 0, 0, 255))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)

    assert upload(driver_client, driver, moving, kind="signature", content=out.getvalue(), name="s.png").status_code == 201
    with proof_storage().open(DeliveryProof.objects.get().file.name) as f, Image.open(f) as stored:
        assert stored.mode == "RGBA" and stored.getpixel((0, 0))[3] == 0 and stored.getpixel((3, 3))[3] == 255
        assert "Comment" not in stored.info


def test_the_camera_orientation_is_applied_before_the_exif_goes(moving, driver, driver_client):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotated 90° clockwise
    out = io.BytesIO()
    Image.new("RGB", (60, 20), "white").save(out, "JPEG", exif=exif)

    assert upload(driver_client, driver, moving, content=out.getvalue()).status_code == 201
    assert (DeliveryProof.objects.get().width, DeliveryProof.objects.get().height) == (20, 60)


@pytest.mark.parametrize(
    ("content", "name"),
    [
        (b"just some text, renamed\n" * 20, "photo.jpg"),
        (b"%PDF-1.4 not an image", "photo.png"),
        (image_bytes("GIF"), "photo.gif"),  # a real image, but not one of the three
        (image_bytes("BMP"), "photo.jpg"),
        (image_bytes("JPEG")[:200], "cut.jpg"),  # a JPEG cut short
    ],
    ids=["text", "pdf", "gif", "bmp", "truncated-jpeg"],
)
def test_anything_but_a_whole_jpeg_png_or_webp_is_a_400_and_nothing_is_kept(moving, driver, driver_client, proof_dir, content, name):
    body = assert_error(upload(driver_client, driver, moving, content=content, name=name), 400)

    assert "file" in body["details"]
    assert not DeliveryProof.objects.exists()
    assert stored_files(proof_dir) == []
    assert not DeliveryAuditLog.objects.filter(event_type="proof_added").exists()


def test_a_file_over_the_size_limit_is_a_413(moving, driver, driver_client, settings, proof_dir):
    settings.PROOF_MAX_BYTES = 500
    content = jpeg_with_gps((200, 200))
    assert len(content) > 500

    body = assert_error(upload(driver_client, driver, moving, content=content), 413)

    assert "PROOF_MAX_BYTES" in body["message"]
    assert not DeliveryProof.objects.exists() and stored_files(proof_dir) == []


def test_a_body_over_the_upload_limit_is_refused_before_it_is_read(moving, driver, driver_client, settings):
    settings.API_MAX_BODY_BYTES, settings.PROOF_MAX_BYTES = 2048, 1000  # the limit: 1000 + 64 KiB of framing
    url = f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof"
    r = driver_client.generic("POST", url, b"x" * 10, content_type="multipart/form-data; boundary=x", CONTENT_LENGTH="200000")

    assert "at most" in assert_error(r, 413)["message"]


def test_the_upload_takes_files_larger_than_the_json_body_limit(moving, driver, driver_client, settings):
    settings.API_MAX_BODY_BYTES = 2048
    noisy = Image.effect_noise((120, 120), 80).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, "JPEG", quality=95)
    assert len(out.getvalue()) > 2048

    assert upload(driver_client, driver, moving, content=out.getvalue()).status_code == 201


def test_an_image_with_too_many_pixels_is_refused_before_it_is_decoded(moving, driver, driver_client, settings):
    settings.PROOF_MAX_PIXELS = 1_000_000
    bomb = image_bytes("PNG", size=(4000, 4000), mode="L")  # 16 megapixels of one grey, a few KB
    assert len(bomb) < 100_000

    body = assert_error(upload(driver_client, driver, moving, content=bomb, name="b.png"), 400)

    assert "PROOF_MAX_PIXELS" in body["details"]["file"][0]
    assert not DeliveryProof.objects.exists()


def progressive_jpeg(extra_scans: int, size=(400, 300)) -> bytes:
    """A progressive JPEG, with `extra_scans` empty copies of its first scan before its end: a
    scan bomb (each is a pass over every block; 20,000 in 351 KB cost 22 s: an audit)."""
    out = io.BytesIO()
    Image.new("RGB", size, (100, 100, 100)).save(out, "JPEG", progressive=True, quality=50)
    data = out.getvalue()
    start = data.find(b"\xff\xda")
    scan = data[start:start + 2 + int.from_bytes(data[start + 2:start + 4], "big")]
    end = data.rfind(b"\xff\xd9")
    return data[:end] + scan * extra_scans + b"\xff\xd9"


def test_a_progressive_jpeg_is_taken_and_a_scan_bomb_refused_before_it_is_decoded(moving, driver, driver_client, monkeypatch):
    assert upload(driver_client, driver, moving, content=progressive_jpeg(0)).status_code == 201
    bomb = progressive_jpeg(proofs.MAX_JPEG_SCANS)
    decoded = []
    real_clean = proofs._clean
    monkeypatch.setattr(proofs, "_clean", lambda upload: decoded.append(1) or real_clean(upload))
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append("pixels"))

    body = assert_error(upload(driver_client, driver, moving, content=bomb), 400)

    assert f"more than {proofs.MAX_JPEG_SCANS} scans" in body["details"]["file"][0]
    assert decoded == [1]  # (checked, never decoded)
    assert DeliveryProof.objects.count() == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kind": "selfie"}, "kind"),
        ({"kind": ""}, "kind"),
        ({}, "kind"),
        ({"kind": "photo", "note": "x" * 1001}, "note"),
    ],
    ids=["unknown-kind", "empty-kind", "no-kind", "long-note"],
)
def test_bad_fields_are_a_400_naming_them(moving, driver, driver_client, fields, named):
    form = {"file": SimpleUploadedFile("p.jpg", jpeg_with_gps(), content_type="image/jpeg"), **fields}

    r = driver_client.post(f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof", form, format="multipart")

    assert set(assert_error(r, 400)["details"]) == {named}
    assert not DeliveryProof.objects.exists()


def test_a_missing_or_empty_file_is_a_400(moving, driver, driver_client):
    assert "file" in assert_error(upload(driver_client, driver, moving, content=False), 400)["details"]
    assert "file" in assert_error(upload(driver_client, driver, moving, content=b""), 400)["details"]


def test_a_json_body_is_refused(moving, driver, driver_client):
    r = driver_client.post(f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof", {"kind": "photo"}, format="json")

    assert_error(r, 415)


def test_the_same_idempotency_key_stores_one_proof(moving, driver, driver_client, proof_dir):
    url = f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof"
    content = jpeg_with_gps()

    def send():
        form = {"kind": "photo", "file": SimpleUploadedFile("p.jpg", content, content_type="image/jpeg")}
        return driver_client.post(url, form, format="multipart", HTTP_IDEMPOTENCY_KEY="proof-1")

    first, again = send(), send()

    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert DeliveryProof.objects.count() == 1 and len(stored_files(proof_dir)) == 1


def test_a_retry_with_a_new_multipart_boundary_is_the_same_request(moving, driver, driver_client, proof_dir):
    url = f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof"
    content = jpeg_with_gps()

    def send(boundary, kind="photo"):
        form = {"kind": kind, "file": SimpleUploadedFile("p.jpg", content, content_type="image/jpeg")}
        return driver_client.post(
            url, encode_multipart(boundary, form), content_type=f"multipart/form-data; boundary={boundary}",
            HTTP_IDEMPOTENCY_KEY="proof-2",
        )

    first, again = send("first-boundary-1a2b"), send("retry-boundary-9z8y7x")

    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert DeliveryProof.objects.count() == 1
    assert_error(send("third-boundary", kind="signature"), 409)  # other fields: another request


def test_two_files_in_one_upload_are_a_400_and_nothing_is_kept(moving, driver, driver_client, proof_dir):
    url = f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/proof"
    files = [SimpleUploadedFile(f"p{i}.jpg", jpeg_with_gps(), content_type="image/jpeg") for i in range(2)]

    body = assert_error(driver_client.post(url, {"kind": "photo", "file": files}, format="multipart"), 400)

    assert "file" in body["details"]
    assert not DeliveryProof.objects.exists() and stored_files(proof_dir) == []


# ------------------------------------------------------------------------ who and when


def test_another_driver_gets_a_404_and_ops_and_integrations_a_403(moving, driver, ops, integration, proof_dir):
    other = DriverFactory()
    assert_error(upload(client_for(other.user), other, moving), 404)  # its own id: not its delivery
    assert_error(upload(client_for(other.user), driver, moving), 404)  # the assigned driver's id
    assert_error(upload(ops, driver, moving), 403)
    assert_error(upload(integration, driver, moving), 403)
    assert not DeliveryProof.objects.exists()
    assert stored_files(proof_dir) == []


def test_a_driver_ops_took_the_delivery_from_gets_a_404_as_another_driver(integration_user, driver, driver_client, proof_dir):
    """It was a 409 naming the delivery's state ("Delivery is ready"), told to a driver who no
    longer has it (webhook audit); a cancelled delivery's driver still hears why (409)."""
    from tests.factories import OpsUserFactory
    from workflows.deliveries import delivery_reassign

    delivery = DeliveryFactory(created_by=integration_user)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_reassign(delivery_id=delivery.pk, reason="customer moved", actor=Actor.for_user(OpsUserFactory()))

    assert_error(upload(driver_client, driver, delivery), 404)
    cancelled = DeliveryFactory(created_by=integration_user)
    assignment_create(delivery_id=cancelled.pk, driver_id=driver.pk, actor=Actor.system())
    delivery_cancel(delivery_id=cancelled.pk, reason="store closed", actor=Actor.system())
    assert_error(upload(driver_client, driver, cancelled), 409)
    assert stored_files(proof_dir) == []


def test_no_proof_before_the_driver_has_the_delivery(integration_user, driver, driver_client):
    delivery = DeliveryFactory(created_by=integration_user)

    assert_error(upload(driver_client, driver, delivery), 404)


@pytest.mark.parametrize("status", ["assigned", "picked_up"])
def test_a_proof_may_come_before_the_delivery_is_in_transit(integration_user, driver, driver_client, status):
    delivery = DeliveryFactory(created_by=integration_user)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    if status == "picked_up":
        for step in ("pickup-started", "pickup-completed"):
            delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.system())

    assert upload(driver_client, driver, delivery).json()["deliveryStatus"] == status


def test_no_proof_after_delivery_or_cancellation(integration_user, driver, driver_client, proof_dir):
    delivered = with_policy(integration_user, driver, "none")
    assert complete(driver_client, driver, delivered).status_code == 200
    assert "delivered" in assert_error(upload(driver_client, driver, delivered), 409)["message"]

    cancelled = with_policy(integration_user, driver, "none")
    delivery_cancel(delivery_id=cancelled.pk, reason="customer changed mind", actor=Actor.system())
    assert_error(upload(driver_client, driver, cancelled), 409)

    assert not DeliveryProof.objects.exists()
    assert stored_files(proof_dir) == []  # the file stored before the lock went with the refusal


def test_evidence_may_follow_a_failure_within_the_window_only(moving, driver, driver_client, settings):
    settings.PROOF_FAILURE_EVIDENCE_SECONDS = 600
    r = driver_client.post(f"/v2/drivers/{driver.pk}/deliveries/{moving.pk}/delivery-failed", {"reason": "unsafe"}, format="json")
    assert r.status_code == 200

    assert upload(driver_client, driver, moving).json()["deliveryStatus"] == "failed"
    with time_machine.travel(timezone.now() + timedelta(seconds=601)):
        assert "600" in assert_error(upload(driver_client, driver, moving), 409)["message"]
    assert DeliveryProof.objects.count() == 1


# -------------------------------------------------------------------- policies at the door


def test_photo_policy_completion_needs_a_photo_taken_in_transit(integration_user, driver, driver_client):
    delivery = DeliveryFactory(created_by=integration_user, proof_required="photo")
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    upload(driver_client, driver, delivery)  # at the store: not a proof of delivery
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.system())
    driver_at_dropoff(driver, delivery)

    body = assert_error(complete(driver_client, driver, delivery), 409)
    assert "photo" in body["message"]
    assert Delivery.objects.get(pk=delivery.pk).status == "in_transit"

    upload(driver_client, driver, delivery, kind="signature", content=image_bytes("PNG"), name="s.png")
    assert_error(complete(driver_client, driver, delivery), 409)  # a signature is not a photo

    assert upload(driver_client, driver, delivery).status_code == 201
    assert complete(driver_client, driver, delivery).json()["status"] == "delivered"


def test_signature_policy_completion_needs_a_signature(integration_user, driver, driver_client):
    delivery = with_policy(integration_user, driver, "signature")
    upload(driver_client, driver, delivery)  # a photo

    assert "signature" in assert_error(complete(driver_client, driver, delivery), 409)["message"]

    upload(driver_client, driver, delivery, kind="signature", content=image_bytes("PNG"), name="s.png")
    assert complete(driver_client, driver, delivery).json()["status"] == "delivered"


def test_code_or_photo_without_either_is_a_409_naming_both(integration_user, driver, driver_client):
    delivery = with_policy(integration_user, driver, "code_or_photo")

    message = assert_error(complete(driver_client, driver, delivery), 409)["message"]

    assert "code" in message and "photo" in message
    assert Delivery.objects.get(pk=delivery.pk).status == "in_transit"


def test_code_or_photo_completes_with_the_code(integration_user, driver, driver_client, anon):
    delivery = with_policy(integration_user, driver, "code_or_photo")
    shown = anon.get(f"/v2/orders/{delivery.seller_order_id}/delivery-status?token={delivery.tracking_token}").json()
    assert shown["handoffCode"] == delivery.handoff_code  # the customer has the code

    bad = assert_error(complete(driver_client, driver, delivery, handoffCode=wrong(delivery.handoff_code)), 400)
    assert "handoffCode" in bad["details"]
    assert Delivery.objects.get(pk=delivery.pk).handoff_code_failures == 1

    assert complete(driver_client, driver, delivery, handoffCode=delivery.handoff_code).json()["status"] == "delivered"


def test_code_or_photo_completes_with_a_photo_and_no_code_even_after_the_code_lockout(integration_user, driver, driver_client):
    delivery = with_policy(integration_user, driver, "code_or_photo")
    Delivery.objects.filter(pk=delivery.pk).update(handoff_code_failures=5, handoff_code_locked_at=timezone.now())
    assert "photo" in assert_error(complete(driver_client, driver, delivery), 409)["message"]

    upload(driver_client, driver, delivery)

    assert complete(driver_client, driver, delivery).json()["status"] == "delivered"


def test_the_code_policy_is_not_met_by_a_photo(integration_user, driver, driver_client):
    delivery = with_policy(integration_user, driver, "code")
    upload(driver_client, driver, delivery)

    assert "handoffCode" in assert_error(complete(driver_client, driver, delivery), 400)["details"]


def test_no_policy_needs_nothing(moving, driver, driver_client):
    assert complete(driver_client, driver, moving).json()["status"] == "delivered"


@pytest.mark.parametrize("policy", ["photo", "signature", "code_or_photo"])
def test_each_policy_is_taken_at_intake(integration, policy):
    from tests.dispatch.test_deliveries_api import new_delivery

    r = integration.post("/v2/deliveries", new_delivery(proofRequired=policy), format="json")

    assert r.status_code == 201, r.content
    assert r.json()["proofRequired"] == policy


# ----------------------------------------------------------------------- failure photo


def fail(client, driver, delivery):
    return client.post(f"/v2/drivers/{driver.pk}/deliveries/{delivery.pk}/delivery-failed", {"reason": "refused"}, format="json")


def test_a_policy_set_to_need_a_failure_photo_refuses_a_failure_without_one(integration_user, driver, driver_client, settings):
    settings.PROOF_FAILURE_PHOTO_POLICIES = ["photo", "code_or_photo"]
    delivery = with_policy(integration_user, driver, "photo")

    assert "photo" in assert_error(fail(driver_client, driver, delivery), 409)["message"]
    assert Delivery.objects.get(pk=delivery.pk).status == "in_transit"

    upload(driver_client, driver, delivery, note="customer refused at the door")
    assert fail(driver_client, driver, delivery).json()["status"] == "failed"


def test_other_policies_fail_without_a_photo(integration_user, driver, driver_client, settings):
    settings.PROOF_FAILURE_PHOTO_POLICIES = ["photo"]
    delivery = with_policy(integration_user, driver, "code")

    assert fail(driver_client, driver, delivery).json()["status"] == "failed"


def test_by_default_no_photo_is_needed_to_fail(integration_user, driver, driver_client):
    assert fail(driver_client, driver, with_policy(integration_user, driver, "photo")).json()["status"] == "failed"


def test_an_unknown_failure_photo_policy_fails_the_system_check(settings):
    from dispatch.apps import check_proof_settings

    assert check_proof_settings() == []
    settings.PROOF_FAILURE_PHOTO_POLICIES = ["photo", "selfie"]
    assert [e.id for e in check_proof_settings()] == ["dispatch.E002"]
    settings.PROOF_FAILURE_PHOTO_POLICIES = []
    settings.PROOF_STORAGE = "ftp"
    assert [e.id for e in check_proof_settings()] == ["dispatch.E003"]
    settings.PROOF_STORAGE = "s3"
    assert check_proof_settings() == []


# ------------------------------------------------------------------------- signed URLs


@pytest.fixture
def photo(moving, driver, driver_client):
    upload(driver_client, driver, moving)
    return DeliveryProof.objects.get()


def test_ops_and_the_owner_get_signed_urls_and_the_driver_none(photo, moving, ops, integration, driver_client):
    for client in (ops, integration):
        (listed,) = client.get(f"/v2/deliveries/{moving.pk}/proofs").json()["proofs"]
        assert listed["id"] == str(photo.pk) and listed["kind"] == "photo"
        assert listed["url"].startswith("http://testserver/proofs/")
    (driver_view,) = driver_client.get(f"/v2/deliveries/{moving.pk}/proofs").json()["proofs"]
    assert driver_view["url"] is None
    assert_error(client_for(IntegrationUserFactory()).get(f"/v2/deliveries/{moving.pk}/proofs"), 404)
    assert_error(client_for(DriverFactory().user).get(f"/v2/deliveries/{moving.pk}/proofs"), 404)
    assert "proofs" not in ops.get(f"/v2/deliveries/{moving.pk}").json()  # the representation is the same everywhere


def test_a_signed_url_serves_the_file_privately(photo, moving, ops, anon):
    url = ops.get(f"/v2/deliveries/{moving.pk}/proofs").json()["proofs"][0]["url"]

    r = anon.get(url)

    assert r.status_code == 200
    assert r["Content-Type"] == "image/jpeg"
    assert "no-store" in r["Cache-Control"] and "private" in r["Cache-Control"]
    assert r["X-Content-Type-Options"] == "nosniff"
    with proof_storage().open(photo.file.name) as f:
        assert r.content == f.read()


def test_a_signed_url_expires(photo, anon, settings):
    settings.PROOF_URL_TTL_SECONDS = 300
    url = proofs.proof_signed_path(photo.pk)
    assert anon.get(url).status_code == 200

    with time_machine.travel(timezone.now() + timedelta(seconds=301)):
        body = assert_error(anon.get(url), 403)
    assert "expired" in body["message"]
    assert "no-store" in anon.get(url.replace("/proofs/", "/proofs/x")).headers["Cache-Control"]


def test_a_tampered_or_made_up_url_is_refused(photo, anon):
    token = proofs.proof_url_token(photo.pk)
    other_id = str(uuid.uuid4())
    forged = token.replace(str(photo.pk), other_id)  # another id under the same signature
    last = token[-1]
    flipped = token[:-1] + ("A" if last != "A" else "B")

    assert_error(anon.get(f"/proofs/{forged}"), 403)
    assert_error(anon.get(f"/proofs/{flipped}"), 403)
    assert_error(anon.get(f"/proofs/{photo.pk}"), 403)  # the bare id
    assert_error(anon.get(f"/proofs/{proofs.proof_url_token(other_id)}"), 404)  # signed, but no such proof


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete", "options"])
def test_a_proof_url_only_answers_get_and_head(photo, method):
    url = proofs.proof_signed_path(photo.pk)
    browser = Client(enforce_csrf_checks=True)  # as a real client: no CSRF exemption by the test client

    body = assert_error(getattr(browser, method)(url), 405)

    assert body["path"].startswith("/proofs/")
    assert browser.head(url).status_code == 200
    assert_error(browser.get("/proofs/x/extra"), 404)


def test_a_url_for_a_file_that_is_gone_is_a_404(photo, anon):
    proof_storage().delete(photo.file.name)

    assert_error(anon.get(proofs.proof_signed_path(photo.pk)), 404)


# ------------------------------------------------------------------------- the customer


def test_the_customer_sees_that_proof_exists_but_never_its_url(photo, moving, anon):
    r = anon.get(f"/v2/orders/{moving.seller_order_id}/delivery-status?token={moving.tracking_token}")

    assert r.status_code == 200
    assert r.json()["proofs"] == [{"kind": "photo", "addedAt": photo.created_at.isoformat().replace("+00:00", "Z")}]
    assert "/proofs/" not in r.content.decode() and "url" not in r.json()["proofs"][0]


def test_a_setting_gives_the_customer_working_urls(photo, moving, anon, settings):
    settings.PROOF_URLS_FOR_CUSTOMERS = True
    settings.TRACKING_BASE_URL = "http://testserver/track"

    (shown,) = anon.get(f"/v2/orders/{moving.seller_order_id}/delivery-status?token={moving.tracking_token}").json()["proofs"]

    assert shown["url"].startswith("http://testserver/proofs/")
    assert anon.get(shown["url"]).status_code == 200


def test_no_proofs_key_without_proofs(moving, anon):
    body = anon.get(f"/v2/orders/{moving.seller_order_id}/delivery-status?token={moving.tracking_token}").json()

    assert "proofs" not in body


# -------------------------------------------------------------------------------- admin


@pytest.mark.parametrize("role", ["superuser", "Dispatcher", "Viewer"])
def test_the_admin_page_shows_thumbnails_through_signed_urls(photo, moving, admin_client, role):
    """The console's roles too: they had no view permission on proofs, and Django hid the inline."""
    from django.test import Client

    from common.groups import groups_sync
    from tests.factories import OpsUserFactory

    if role != "superuser":
        user = OpsUserFactory()
        user.groups.add(groups_sync()[role])
        admin_client = Client()
        admin_client.force_login(user)
    page = admin_client.get(f"/admin/dispatch/delivery/{moving.pk}/change/").content.decode()

    assert 'class="proof-thumbnail"' in page
    start = page.index('<img src="/proofs/') + len('<img src="')
    src = page[start:page.index('"', start)]
    assert proofs.proof_id_from_token(src.removeprefix("/proofs/")) == photo.pk
    assert admin_client.get(src)["Content-Type"] == "image/jpeg"
    assert "added a photo" in page  # the timeline names it


# ----------------------------------------------------------------- after commit, for real


@pytest.mark.django_db(transaction=True)
def test_ops_are_told_after_commit_and_merchants_get_a_signed_webhook_row(listen, proof_dir):
    from dispatch.events import DeliveryProofAddedEvent
    from tests.typecheck import assert_event_shape

    driver = DriverFactory()
    delivery = in_transit(DeliveryFactory(), driver)
    ops = listen("ops")
    ops.drain()

    proof_id = upload(client_for(driver.user), driver, delivery, note="porch").json()["id"]

    (event,) = [e for e in ops.drain() if e["type"] == "delivery_proof_added"]
    assert_event_shape(event, DeliveryProofAddedEvent)
    assert event["proofId"] == proof_id and event["note"] == "porch" and event["deliveryStatus"] == "in_transit"
    (row,) = OutboxEvent.objects.filter(delivery=delivery, type="delivery.proof_added")
    assert row.payload["type"] == "delivery.proof_added" and row.payload["data"]["id"] == str(delivery.pk)
    assert row.payload["data"]["change"] == {k: v for k, v in event.items() if k not in ("type", "deliveryId", "sellerOrderId")}


@pytest.mark.django_db(transaction=True)
def test_an_upload_racing_the_completion_either_lands_in_transit_or_leaves_no_file(proof_dir):
    from common.exceptions import Conflict
    from tests.concurrency import race
    from workflows.deliveries import delivery_proof_add

    for _ in range(4):
        driver = DriverFactory()
        delivery = in_transit(DeliveryFactory(proof_required="photo"), driver)
        upload(client_for(driver.user), driver, delivery)  # the photo that lets it complete

        results, errors = race([
            lambda: delivery_proof_add(
                delivery_id=delivery.pk, driver_id=driver.pk, kind="photo", note="",
                upload=SimpleUploadedFile("late.jpg", jpeg_with_gps()), actor=Actor.system(),
            ),
            lambda: delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step="delivery-completed", actor=Actor.system()),
        ])

        assert Delivery.objects.get(pk=delivery.pk).status == "delivered"
        assert not DeliveryProof.objects.filter(delivery=delivery).exclude(delivery_status="in_transit").exists()
        assert all(isinstance(e, Conflict) for e in errors) and len(results) + len(errors) == 2
    rows = DeliveryProof.objects.count()
    assert len(stored_files(proof_dir)) == rows  # a refused upload's file went with it


# ------------------------------------------------------- who may make the server decode


@pytest.fixture
def clean_spy(monkeypatch):
    """`proof_image_clean` as the upload calls it, recording each call (then doing the real work)."""
    import workflows.deliveries as workflow

    calls = []
    real = workflow.proof_image_clean

    def spy(upload_file):
        calls.append(upload_file)
        return real(upload_file)

    monkeypatch.setattr(workflow, "proof_image_clean", spy)
    return calls


def test_a_driver_who_may_not_upload_gets_no_image_decoded(integration_user, moving, driver, clean_spy, proof_dir):
    other = DriverFactory()
    assert_error(upload(client_for(other.user), other, moving), 404)  # not its delivery
    assert_error(upload(client_for(other.user), other, DeliveryFactory(created_by=integration_user)), 404)
    assert_error(upload(client_for(other.user), other, type(moving)(pk=uuid.uuid4())), 404)  # no such delivery
    delivered = with_policy(integration_user, other, "none")
    assert complete(client_for(other.user), other, delivered).status_code == 200
    assert "delivered" in assert_error(upload(client_for(other.user), other, delivered), 409)["message"]

    assert clean_spy == []  # refused before a single pixel was decoded
    assert not DeliveryProof.objects.exists() and stored_files(proof_dir) == []


def test_the_check_comes_before_the_decoding_and_again_under_the_lock(moving, driver, driver_client, monkeypatch, proof_dir):
    """The cheap check first; a delivery cancelled while its image is decoded is still refused."""
    import workflows.deliveries as workflow

    order = []
    real_check, real_clean = workflow._proof_upload_precheck, workflow.proof_image_clean

    def check(**kwargs):
        order.append("check")
        return real_check(**kwargs)

    def clean(upload_file, **kwargs):
        order.append("decode")
        image = real_clean(upload_file, **kwargs)
        delivery_cancel(delivery_id=moving.pk, reason="customer changed mind", actor=Actor.system())
        return image

    monkeypatch.setattr(workflow, "_proof_upload_precheck", check)
    monkeypatch.setattr(workflow, "proof_image_clean", clean)

    assert "cancelled" in assert_error(upload(driver_client, driver, moving), 409)["message"]
    assert order == ["check", "decode"]
    assert not DeliveryProof.objects.exists() and stored_files(proof_dir) == []


def test_a_large_image_is_scaled_down_to_the_longest_side(moving, driver, driver_client, settings, proof_dir):
    settings.PROOF_MAX_DIMENSION = 100
    for fmt, size, expected in (("JPEG", (800, 400), (100, 50)), ("PNG", (150, 300), (50, 100)), ("WEBP", (90, 60), (90, 60))):
        body = upload(driver_client, driver, moving, content=image_bytes(fmt, size=size)).json()
        assert (body["width"], body["height"]) == expected, fmt
        with Image.open(proof_storage().open(DeliveryProof.objects.get(pk=body["id"]).file.name)) as stored:
            assert stored.size == expected


def test_a_png_is_stored_with_a_moderate_compression(moving, driver, driver_client, monkeypatch):
    """optimize=True tries every filter at level 9: seconds of CPU for one large image."""
    saved = []
    real_save = Image.Image.save
    content = image_bytes("PNG")

    def save(self, fp, format=None, **params):
        saved.append((format, params))
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", save)
    upload(driver_client, driver, moving, content=content)

    ((fmt, params),) = [s for s in saved if s[0] == "PNG"]
    assert "optimize" not in params and params["compress_level"] == proofs.PNG_COMPRESS_LEVEL == 6


def test_the_default_limits_suit_evidence_photos():
    from django.conf import settings as live

    assert live.PROOF_MAX_PIXELS == 12_000_000 and live.PROOF_MAX_DIMENSION == 2560 and live.PROOF_DECODE_CONCURRENCY == 2


def test_no_more_decodes_at_once_than_the_slots_and_a_long_wait_is_a_503(moving, driver, driver_client, monkeypatch, proof_dir):
    import threading

    from common.lanes import FairGate

    monkeypatch.setattr(proofs, "_decode_slots", FairGate(2))
    monkeypatch.setattr(proofs, "DECODE_WAIT_SECONDS", 0.05)
    real_clean = proofs._clean
    inside = threading.Condition()
    entered = []
    gate = threading.Event()

    def slow_clean(upload_file):
        with inside:
            entered.append(upload_file)
            inside.notify_all()
        gate.wait(5)  # held until the test lets go (5 s: a failing test does not hang)
        return real_clean(upload_file)

    monkeypatch.setattr(proofs, "_clean", slow_clean)
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(proofs.proof_image_clean(SimpleUploadedFile("a.png", image_bytes("PNG")))))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        with inside:
            assert inside.wait_for(lambda: len(entered) == 2, timeout=5)
        r = upload(driver_client, driver, moving)  # a third while both slots decode
        assert_error(r, 503)
        assert len(entered) == 2  # it never reached the decoder
    finally:
        gate.set()
        for worker in workers:
            worker.join(5)
    assert len(results) == 2 and all(image.content_type == "image/png" for image in results)
    assert not DeliveryProof.objects.exists() and stored_files(proof_dir) == []


# ------------------------------------------------------------------ JPEGs with MPF data


def mpo_with_gps() -> bytes:
    """A JPEG with MPF data (as Ultra HDR / gain-map photos are): Pillow calls it MPO."""
    first, second = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (32, 24), (0, 0, 0))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCam"
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], exif=exif)
    raw = out.getvalue()
    with Image.open(io.BytesIO(raw)) as probe:
        assert probe.format == "MPO" and probe.n_frames == 2
    return raw


def test_a_jpeg_with_mpf_data_is_taken_as_a_jpeg_of_its_first_frame(moving, driver, driver_client, proof_dir):
    r = upload(driver_client, driver, moving, content=mpo_with_gps(), name="hdr.jpg")

    assert r.status_code == 201, r.content
    body = r.json()
    assert body["contentType"] == "image/jpeg" and (body["width"], body["height"]) == (64, 48)
    proof = DeliveryProof.objects.get(pk=body["id"])
    assert proof.file.name.endswith(".jpg")
    stored = proof_storage().open(proof.file.name).read()
    assert b"PhoneCam" not in stored and b"MPF" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG" and image.size == (64, 48) and getattr(image, "n_frames", 1) == 1
        assert image.getpixel((10, 10))[0] > 150  # the first frame's red, not the black second one


# --------------------------------------------------------- proofs of the current driver


def reassigned_to(delivery, first, second):
    """`delivery` (assigned to `first`) taken from it by ops and given to `second`, in transit."""
    from workflows.deliveries import delivery_reassign

    delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.system())
    return in_transit(Delivery.objects.get(pk=delivery.pk), second)


def assigned(integration_user, driver, policy):
    delivery = DeliveryFactory(created_by=integration_user, proof_required=policy)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery


def test_a_failure_needs_a_photo_of_the_current_driver(integration_user, driver, driver_client, settings):
    settings.PROOF_FAILURE_PHOTO_POLICIES = ["photo"]
    delivery = assigned(integration_user, driver, "photo")
    assert upload(driver_client, driver, delivery).status_code == 201  # the first driver's photo
    second = DriverFactory()
    reassigned_to(delivery, driver, second)

    assert "photo" in assert_error(fail(client_for(second.user), second, delivery), 409)["message"]
    assert upload(client_for(second.user), second, delivery).status_code == 201
    assert fail(client_for(second.user), second, delivery).json()["status"] == "failed"


def test_a_driver_the_delivery_was_taken_from_lists_only_its_own_proofs(integration_user, driver, driver_client, ops):
    """It read the next driver's proofs, with their driver id and the note (what the customer
    said at the door), while the delivery itself no longer showed it the customer."""
    delivery = assigned(integration_user, driver, "photo")
    assert upload(driver_client, driver, delivery).status_code == 201
    second = DriverFactory()
    reassigned_to(delivery, driver, second)
    second_client = client_for(second.user)
    r = upload(second_client, second, delivery, note="Customer at flat 4B")
    assert r.status_code == 201, r.content

    mine = driver_client.get(f"/v2/deliveries/{delivery.pk}/proofs").json()["proofs"]
    theirs = second_client.get(f"/v2/deliveries/{delivery.pk}/proofs").json()["proofs"]
    everyone = ops.get(f"/v2/deliveries/{delivery.pk}/proofs").json()["proofs"]

    assert [p["driverId"] for p in mine] == [str(driver.pk)]
    assert [(p["driverId"], p["note"]) for p in theirs] == [(str(second.pk), "Customer at flat 4B")]
    assert [p["driverId"] for p in everyone] == [str(driver.pk), str(second.pk)]


def test_a_photo_from_an_earlier_assignment_does_not_count(integration_user, driver, driver_client, settings):
    settings.PROOF_FAILURE_PHOTO_POLICIES = ["photo"]
    delivery = assigned(integration_user, driver, "photo")
    assert upload(driver_client, driver, delivery).status_code == 201
    from workflows.deliveries import delivery_reassign

    delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.system())
    in_transit(Delivery.objects.get(pk=delivery.pk), driver)  # given back to the same driver later

    assert_error(fail(driver_client, driver, delivery), 409)


def test_completion_needs_a_proof_of_the_current_driver(integration_user, driver, driver_client):
    delivery = with_policy(integration_user, driver, "photo")
    DeliveryProof.objects.create(  # in transit, but another driver's (none can be made through the API)
        delivery=delivery, driver=DriverFactory(), kind="photo", file=f"{delivery.pk}/x.jpg", content_type="image/jpeg",
        size_bytes=1, width=1, height=1, delivery_status="in_transit", created_at=timezone.now(),
    )

    assert "photo" in assert_error(complete(driver_client, driver, delivery), 409)["message"]
    upload(driver_client, driver, delivery)
    assert complete(driver_client, driver, delivery).json()["status"] == "delivered"


# ------------------------------------------------------------- serving a file that is gone


class LazyStorage(__import__("django.core.files.storage", fromlist=["FileSystemStorage"]).FileSystemStorage):
    """Opens like S3's storage: nothing is read (or found missing) before the first read."""

    failure: Exception | None = None

    def _open(self, name, mode="rb"):
        from django.core.files.base import File

        storage = self

        class Lazy(io.RawIOBase):
            handle = None

            def readable(self):
                return True

            def readinto(self, buffer):
                if storage.failure is not None:
                    raise storage.failure
                if self.handle is None:
                    self.handle = open(storage.path(name), "rb")
                return self.handle.readinto(buffer)

        return File(io.BufferedReader(Lazy()), name=name)


@pytest.fixture
def lazy_storage(settings, proof_dir):
    settings.STORAGES = {
        **settings.STORAGES, "proofs": {"BACKEND": f"{__name__}.LazyStorage", "OPTIONS": {"location": str(proof_dir)}},
    }
    LazyStorage.failure = None
    yield
    LazyStorage.failure = None


def test_a_lazily_read_file_that_is_gone_is_a_404_before_the_response_starts(lazy_storage, photo, anon):
    r = anon.get(proofs.proof_signed_path(photo.pk))
    assert r.status_code == 200 and not r.streaming and r.content[:2] == b"\xff\xd8"

    proof_storage().delete(photo.file.name)
    assert_error(anon.get(proofs.proof_signed_path(photo.pk)), 404)


def test_a_storage_that_fails_to_read_is_a_503(lazy_storage, photo, anon):
    LazyStorage.failure = OSError("the bucket is unreachable")

    r = anon.get(proofs.proof_signed_path(photo.pk))
    assert_error(r, 503)
    assert r["Cache-Control"] == "private, no-store"


# ------------------------------------------------------------- the customer, after a reassignment


def test_the_customer_keeps_seeing_proofs_when_the_delivery_is_ready_again(integration_user, driver, driver_client, anon):
    from workflows.deliveries import delivery_reassign

    delivery = assigned(integration_user, driver, "none")
    upload(driver_client, driver, delivery)
    delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.system())
    delivery.refresh_from_db()
    assert delivery.status == "ready"

    body = anon.get(f"/v2/orders/{delivery.seller_order_id}/delivery-status?token={delivery.tracking_token}").json()
    assert [p["kind"] for p in body["proofs"]] == ["photo"]


def test_an_upload_waits_for_its_decode_slot_as_its_driver(moving, driver, driver_client, monkeypatch, proof_dir):
    """The decode slots are fair among drivers (common.lanes.FairGate): each upload asks as its
    driver (asking as nobody in particular, they were first come, first served again)."""
    from common.lanes import FairGate

    asked = []
    gate = FairGate(2)
    real_acquire = gate.acquire
    monkeypatch.setattr(gate, "acquire", lambda key, timeout: asked.append(key) or real_acquire(key, timeout))
    monkeypatch.setattr(proofs, "_decode_slots", gate)

    assert upload(driver_client, driver, moving).status_code == 201
    assert asked == [str(driver.pk)] and gate.busy == 0
