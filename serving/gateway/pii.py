"""PII redaction for the inference log, on the data-validation detectors.

`tuneship.data.pii` does the work with the same detectors and acceptance rules the
training-data validation uses (libphonenumber for phones, python-stdnum for IBANs, SSNs and
card checksums); this module applies it to inference-log records.

Redaction runs in the log writer thread, before a record is serialised, so nothing
unredacted reaches the disk and the request path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tuneship.data import pii

KINDS = pii.KINDS


def redact(
    text: str, kinds: Iterable[str] = KINDS, phone_regions: Iterable[str] = pii.DEFAULT_PHONE_REGIONS
) -> tuple[str, list[str]]:
    """(text with each PII span replaced by ``[KIND]``, the kinds found)."""
    return pii.detector(tuple(kinds), tuple(phone_regions)).redact(text)


class RecordRedactor:
    """Redacts the free-text fields of an inference-log record in place."""

    def __init__(
        self,
        kinds: Iterable[str] | None = None,
        phone_regions: Iterable[str] | None = None,
    ) -> None:
        # unknown kinds or regions fail here, at gateway start-up, with the names
        self.detector = pii.PiiDetector(
            KINDS if kinds is None else kinds,
            pii.DEFAULT_PHONE_REGIONS if phone_regions is None else phone_regions,
        )
        self.kinds = self.detector.kinds

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        found: set[str] = set()

        def clean(holder: dict[str, Any] | None, field: str) -> None:
            if holder and isinstance(holder.get(field), str):
                holder[field], kinds = self.detector.redact(holder[field])
                found.update(kinds)

        if record.get("kind") == "feedback":  # a client's comment on an answer
            if "pii_redacted" not in record:  # the gateway redacts it before answering; not twice
                clean(record, "comment")
                record["pii_redacted"] = sorted(found)
            return record
        if record.get("kind") == "shadow":  # the mirrored answer: its flag travels with it in the join
            clean(record.get("shadow"), "completion")
            if isinstance(record.get("shadow"), dict):
                record["shadow"]["pii_redacted"] = sorted(found)
            return record
        clean(record, "prompt")
        clean(record.get("live"), "completion")
        record["pii_redacted"] = sorted(found)
        return record
