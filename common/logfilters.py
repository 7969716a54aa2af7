"""Logging filters, importable while settings load (no Django imports)."""
import logging
import re


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
        return True

    def _redact(self, value):
        if isinstance(value, str) and "token=" in value.lower():
            return self._TOKEN.sub(r"\1[redacted]", value)
        return value
