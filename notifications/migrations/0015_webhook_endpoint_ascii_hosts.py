"""Webhook URLs stored before hosts were kept in ASCII form (2026-12-07) keep a non-ASCII host
as given (`https://exämple.com/h`): `GET /v2/webhooks/{id}` answered a `url` the API's own
schema (`format: uri`) refuses. Such a host is rewritten as IDNA 2008 with UTS 46 makes it
(`xn--exmple-cua.com`), as new URLs are stored and as the sender resolves it; the rest of the URL
as stored. A host IDNA 2008 refuses (a symbol, which IDNA 2003 took) is left alone: the sender
still reads it as before (notifications.egress). Self-contained (`idna` only): the app's helpers
may change, this must not."""
from urllib.parse import urlsplit, urlunsplit

import idna
from django.db import migrations

URL_MAX = 2000  # (WebhookEndpoint.url)


def ascii_url(url: str) -> str | None:
    """`url` with its host in ASCII form, or None to leave it as stored."""
    try:
        parts = urlsplit(url)
        if parts.netloc.isascii() or not parts.hostname:
            return None
        host = idna.encode(parts.hostname, uts46=True).decode("ascii")
        port = parts.port
    except (ValueError, UnicodeError, idna.IDNAError):
        return None
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + (host if port is None else f"{host}:{port}")
    new = urlunsplit(parts._replace(netloc=netloc))
    return new if len(new) <= URL_MAX else None


def rewrite(apps, schema_editor):
    Endpoint = apps.get_model("notifications", "WebhookEndpoint")
    for pk, url in Endpoint.objects.filter(url__regex=r"[^\x01-\x7f]").values_list("pk", "url").iterator():
        new = ascii_url(url)
        if new is not None:
            Endpoint.objects.filter(pk=pk, url=url).update(url=new)


class Migration(migrations.Migration):

    dependencies = [
        ("notifications", "0014_customer_reply_sender_idx"),
    ]

    operations = [migrations.RunPython(rewrite, migrations.RunPython.noop)]
