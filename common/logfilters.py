"""Logging filters, importable while settings load (no Django imports)."""
import contextvars
import logging
import re
import uuid

# The id of the request (or task, or socket) being served, on every log line it writes:
# set by common.middleware.RequestIdMiddleware, the fast lane, the socket auth middleware
# and the Celery task signals (config/celery.py), which carry it from request to task.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")


def new_request_id(given: str | None = None) -> str:
    """`given` when it is a sane id (from a trusted proxy), else a fresh one."""
    if given and _VALID_ID.match(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        # uvicorn's lines carry their text again with terminal colours, which the JSON
        # formatter would write out as one more field
        record.__dict__.pop("color_message", None)
        return True


class CeleryTaskFilter(logging.Filter):
    """A line written while a Celery task runs carries the task's name and id (`task_name`,
    `task_id`: Celery's own line format had them). Celery's own lines about a task ("received",
    "succeeded") carry a `data` extra, which the JSON formatter writes out: its arguments and
    return value are dropped from it (an offer's push carries the offer's addresses, an ops
    alert its text; Celery's plain format never showed the arguments; the return value stays
    in the message, as there), its id, name and runtime kept."""

    UNLOGGED = ("args", "kwargs", "return_value")

    def filter(self, record: logging.LogRecord) -> bool:
        from celery._state import get_current_task

        task = get_current_task()
        if task is not None and task.request.id:
            record.task_name, record.task_id = task.name, task.request.id
        data = record.__dict__.get("data")
        if isinstance(data, dict) and record.name.startswith("celery.") and any(k in data for k in self.UNLOGGED):
            record.data = {k: v for k, v in data.items() if k not in self.UNLOGGED}
        return True


class GisInputWarningFilter(logging.Filter):
    """GeoDjango logs, at ERROR, every value it could not read (a typo in a map field of the
    ops console: two lines a request: GEOS's error, then the widget's "Error creating
    geometry") before raising; the exception is what counts (a form error, or a 500 that
    `django.request` logs at ERROR). A client's mistake writes no ERROR line for an alert to
    fire on: those are WARNINGs (GEOS's errors are all about the geometry it was given; of
    GDAL's, a reference system the input names and PROJ does not know, and a GeoJSON ring left open). The rest stays ERROR
    (GDAL's other errors, a transformation that failed: proj.db missing after an upgrade
    would show every map wrong)."""

    _INPUT = ("GEOS_ERROR", "Error creating geometry from value")
    _INPUT_GDAL = ("crs not found", "Non closed ring")  # (a GeoJSON ring that does not end where it began)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and isinstance(record.msg, str) and (
            record.msg.startswith(self._INPUT)
            or (record.msg.startswith("GDAL_ERROR") and any(text in record.getMessage() for text in self._INPUT_GDAL))
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RedactTokensFilter(logging.Filter):
    """Log filter: `token=<anything>` in a message or its arguments becomes `token=[redacted]`.

    Tracking links and socket URLs carry credentials in the query string (`?token=`); no log
    line may keep them, whichever library wrote it (uvicorn logs socket paths with the query)."""

    _TOKEN = re.compile(r"(?i)(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = self._TOKEN.sub(r"\1[redacted]", record.msg)
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: self._redact(v) for k, v in record.args.items()}
            else:
                record.args = tuple(self._redact(a) for a in record.args)
        # Extras a formatter writes out too (the JSON one writes them all): Django's request
        # log carries the request, whose text is its path with the query string.
        for key in record.__dict__.keys() - _STANDARD_ATTRIBUTES:
            record.__dict__[key] = self._redact(record.__dict__[key])
        return True

    @classmethod
    def redact_text(cls, text: str) -> str:
        return cls._TOKEN.sub(r"\1[redacted]", text)

    def _redact(self, value):
        if hasattr(value, "get_full_path"):  # a Django request, shown as its path and query:
            text = repr(value)  # its text once redacted (only these: str() of any object could run a query)
            return self._TOKEN.sub(r"\1[redacted]", text) if "token=" in text.lower() else value
        if isinstance(value, str) and "token=" in value.lower():
            return self._TOKEN.sub(r"\1[redacted]", value)
        return value


_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "request_id"}

