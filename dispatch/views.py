"""`/proofs/<token>`: a proof's file, for a signed URL that has not expired (dispatch/proofs.py).

The token is the credential: whoever was handed the URL (ops on the admin page, the owning
integration from `GET /v2/deliveries/{id}`, a customer when PROOF_URLS_FOR_CUSTOMERS is on) may
fetch the file until PROOF_URL_TTL_SECONDS after it was signed. A token that is not ours, or
tampered with, or expired, is a 403; a valid one for a proof (or file) that is gone is a 404.
Nothing here is cached by a browser or a proxy.

The file is asked for (`exists`) and read whole before the response starts: with S3 an open
file is read lazily, and a missing or unreadable object would otherwise fail in the middle of
streaming (a broken 200, or a 500). A proof is at most PROOF_MAX_BYTES. A storage that fails
(not a missing file) is a 503.
"""
from __future__ import annotations

import logging

from django.core import signing
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from common.errors import error_response
from dispatch import proofs, selectors
from dispatch.models import proof_storage

logger = logging.getLogger(__name__)

NO_STORE = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _refused(request, status: int, message: str):
    response = error_response(request, status, message)
    for header, value in NO_STORE.items():
        response[header] = value
    return response


@csrf_exempt  # no method here writes: anything but GET/HEAD is a 405 in the API's error body
def proof_file(request, token: str):
    if request.method not in ("GET", "HEAD"):
        response = _refused(request, 405, f'Method "{request.method}" not allowed.')
        response["Allow"] = "GET, HEAD"
        return response
    try:
        proof_id = proofs.proof_id_from_token(token)
    except signing.SignatureExpired:
        return _refused(request, 403, "This proof link has expired; ask for a fresh one.")
    except signing.BadSignature:
        return _refused(request, 403, "This is not a valid proof link.")
    proof = selectors.proof_get(proof_id)
    if proof is None:
        return _refused(request, 404, "Proof not found.")
    storage, name = proof_storage(), proof.file.name
    try:
        if not storage.exists(name):
            return _refused(request, 404, "Proof file not found.")
        with storage.open(name, "rb") as handle:
            content = handle.read()
    except FileNotFoundError:  # gone between the two
        return _refused(request, 404, "Proof file not found.")
    except Exception:  # the storage failing (an OSError, botocore's ClientError...): not the client's fault, never a 500
        logger.exception("proof file %s could not be read", name)
        return _refused(request, 503, "The proof file cannot be read right now; try again shortly.")
    response = HttpResponse(content, content_type=proof.content_type)
    response["Content-Disposition"] = f'inline; filename="{proof.kind}-{proof.pk}.{proof.file.name.rsplit(".", 1)[-1]}"'
    for header, value in NO_STORE.items():
        response[header] = value
    return response
