"""Proof files (docs/dispatch.md, "Proof of delivery"): what an upload must be, how it is
cleaned before it is stored, and the signed, expiring URLs it is served by.

An upload is judged by its content, never its name or declared type: Pillow must recognise it
as JPEG (a JPEG with MPF data, "MPO" to Pillow: the HDR photos of recent phones, is a JPEG and
its first frame is kept), PNG or WebP, its header must say at most PROOF_MAX_PIXELS pixels
(checked before a single pixel is decoded, so a decompression bomb costs nothing), a JPEG at
most MAX_JPEG_SCANS scans (a scan bomb), and it must decode. What is stored is a re-encoding of the pixels alone (EXIF orientation applied first): no
EXIF, no GPS, no XMP, no ICC profile, no text chunks survive. A proof is evidence, not an
original: an image whose long side is over PROOF_MAX_DIMENSION pixels is scaled down to it.

Decoding and re-encoding cost CPU, so at most PROOF_DECODE_CONCURRENCY of them run at once in a
process; an upload that waits more than DECODE_WAIT_SECONDS for its turn is a 503. The callers
check who may upload before calling `proof_image_clean` (workflows.deliveries.delivery_proof_add).

A URL to a file is `/proofs/<token>`, the token being the proof id signed with a timestamp
(`django.core.signing.TimestampSigner`, salted for this use); `dispatch.views.proof_file`
serves the file for PROOF_URL_TTL_SECONDS after signing and refuses anything else.
"""
from __future__ import annotations

import io
import uuid
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.core import signing
from django.core.files.base import ContentFile
from django.urls import reverse
from PIL import Image, ImageOps

from common.exceptions import DomainError, InvalidInput, PayloadTooLarge, ServiceUnavailable
from common.lanes import FairGate
from dispatch.models import DeliveryProof, proof_storage

# Pillow format → (content type, file extension). Nothing else is accepted. MPO is a JPEG with
# MPF data (Ultra HDR, HDR gain maps): Pillow's JPEG opener reports it so; stored as a JPEG.
FORMATS = {
    "JPEG": ("image/jpeg", "jpg"), "MPO": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp"),
}
_OPENERS = ["JPEG", "PNG", "WEBP"]  # the Pillow openers tried (the JPEG one opens MPO files too)
_JPEG_KINDS = ("JPEG", "MPO")
PNG_COMPRESS_LEVEL = 6  # zlib's default: optimize=True (every filter, level 9) cost seconds on a large image
DECODE_WAIT_SECONDS = 30  # how long an upload waits for a decode slot before it is a 503
# fair among drivers (common.lanes): a first-come gate let a burst's queued decodes go before
# another driver's photo that the upload lane had let in after one of them
_decode_slots = FairGate(max(1, settings.PROOF_DECODE_CONCURRENCY))
_URL_SALT = "dispatch.proof-file"
_NOT_AN_IMAGE = "Not a JPEG, PNG or WebP image (judged by the file's content, not its name)."
# A progressive JPEG decodes scan by scan, each a pass over every block of the image: a crafted
# one with thousands of (empty) scans in a few hundred KB cost seconds to minutes of CPU per
# upload (an audit: 20,000 scans, 351 KB, 22 s), holding the decode slots every driver's proof
# waits for. Real ones have about ten (libjpeg's progressive script: 10; jpegtran, mozjpeg
# similar). Counted as SOS markers in the raw bytes: entropy-coded data stuffs every 0xFF
# (FF 00), so a marker there is a real one; an EXIF thumbnail's own scans count too.
MAX_JPEG_SCANS = 64
_SOS_MARKER = b"\xff\xda"


@dataclass(frozen=True)
class CleanImage:
    """An upload as it will be stored: re-encoded pixels, without metadata."""

    content: bytes
    content_type: str
    extension: str
    width: int
    height: int


def proof_image_clean(upload, *, caller=None) -> CleanImage:
    """The upload (a Django UploadedFile or any binary file object with `size`) checked and
    re-encoded; InvalidInput (`details.file`) when it is not an acceptable image,
    PayloadTooLarge over PROOF_MAX_BYTES. `caller` (the uploading driver) takes its turn for a
    decode slot fairly with the others'."""
    size = getattr(upload, "size", None)
    if size is None:
        upload.seek(0, io.SEEK_END)
        size = upload.tell()
    if size > settings.PROOF_MAX_BYTES:
        raise PayloadTooLarge(f"file: {size} bytes is over the limit of {settings.PROOF_MAX_BYTES} bytes (PROOF_MAX_BYTES).")
    if size == 0:
        raise InvalidInput({"file": ["The file is empty."]})
    if not _decode_slots.acquire(caller, timeout=DECODE_WAIT_SECONDS):
        raise ServiceUnavailable("Too many proof images are being processed; try again shortly.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _clean(upload)
    except DomainError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput({"file": [f"The image has more than {settings.PROOF_MAX_PIXELS} pixels (PROOF_MAX_PIXELS)."]})
    except Exception:  # whatever a malformed file makes a decoder raise: bad input, never a 500
        raise InvalidInput({"file": [_NOT_AN_IMAGE]})
    finally:
        _decode_slots.release(caller)


def _clean(upload) -> CleanImage:
    upload.seek(0)
    with Image.open(upload, formats=_OPENERS) as probe:  # reads the header only
        kind = probe.format
        width, height = probe.size
        if kind not in FORMATS:
            raise InvalidInput({"file": [_NOT_AN_IMAGE]})
        if width * height > settings.PROOF_MAX_PIXELS:
            raise InvalidInput({"file": [f"The image has {width}×{height} pixels, more than PROOF_MAX_PIXELS ({settings.PROOF_MAX_PIXELS})."]})
        probe.verify()  # structure and checksums, still without decoding
    upload.seek(0)
    if kind in _JPEG_KINDS and upload.read().count(_SOS_MARKER) > MAX_JPEG_SCANS:
        raise InvalidInput({"file": [f"The JPEG has more than {MAX_JPEG_SCANS} scans; save it again as a plain JPEG."]})
    upload.seek(0)
    longest = settings.PROOF_MAX_DIMENSION
    with Image.open(upload, formats=["JPEG" if kind in _JPEG_KINDS else kind]) as image:
        if kind in _JPEG_KINDS and max(image.size) > longest:
            image.draft(image.mode, (longest, longest))  # decoded at 1/2, 1/4 or 1/8 scale: still ≥ the target
        image.load()  # an MPO: its first frame, the photo
        try:  # the way the camera held it, before the EXIF goes; a broken EXIF is no reason to refuse
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:
            pass
        if max(image.size) > longest:
            image.thumbnail((longest, longest), Image.Resampling.LANCZOS)
        jpeg = kind in _JPEG_KINDS
        mode = "RGBA" if ("A" in image.getbands() or "transparency" in image.info) and not jpeg else "RGB"
        if image.mode == "L" and mode == "RGB" and kind != "WEBP":
            mode = "L"
        converted = image if image.mode == mode else image.convert(mode)
        # A new image holding the pixels alone: no info dict, no cached EXIF, nothing carried over.
        bare = Image.new(mode, converted.size)
        bare.paste(converted)
        del converted
    out = io.BytesIO()
    if kind in _JPEG_KINDS:
        bare.save(out, "JPEG", quality=85, optimize=True)
    elif kind == "PNG":
        bare.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        bare.save(out, "WEBP", quality=85)
    content_type, extension = FORMATS[kind]
    return CleanImage(out.getvalue(), content_type, extension, bare.width, bare.height)


def proof_file_store(name: str, image: CleanImage) -> str:
    """Store the cleaned image under `name`; returns the name the storage used."""
    return proof_storage().save(name, ContentFile(image.content))


def proof_file_discard(name: str) -> None:
    """Delete a stored file whose row never committed (a failed upload)."""
    proof_storage().delete(name)


# ------------------------------------------------------------------------- signed URLs


def _signer() -> signing.TimestampSigner:
    return signing.TimestampSigner(salt=_URL_SALT)


def proof_url_token(proof_id) -> str:
    return _signer().sign(str(proof_id))


def proof_id_from_token(token: str) -> uuid.UUID:
    """The proof id a URL token was signed for. `signing.SignatureExpired` once it is older
    than PROOF_URL_TTL_SECONDS; `signing.BadSignature` for anything not signed by us."""
    value = _signer().unsign(token, max_age=settings.PROOF_URL_TTL_SECONDS)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise signing.BadSignature("not a proof id")


def _public_origin() -> str:
    """scheme://host of the public site, from TRACKING_BASE_URL (for URLs made without a request)."""
    parts = urlsplit(settings.TRACKING_BASE_URL)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def proof_signed_path(proof_id) -> str:
    """`/proofs/<token>`: the signed URL's path, for pages served on the same host (the admin)."""
    return reverse("proof-file", args=[proof_url_token(proof_id)])


def proof_signed_url(proof: DeliveryProof | uuid.UUID, *, request=None) -> str:
    """An absolute URL that serves the proof's file for PROOF_URL_TTL_SECONDS: on the host of
    `request` when given, else on TRACKING_BASE_URL's."""
    path = proof_signed_path(proof.pk if isinstance(proof, DeliveryProof) else proof)
    return request.build_absolute_uri(path) if request is not None else _public_origin() + path
