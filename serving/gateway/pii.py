"""PII redaction for the inference log, on the data-validation detectors.

`tuneship.data.checks.redact` does the work with the same detectors and acceptance rules
the training-data validation uses; this module applies it to inference-log records.

Redaction runs in the log writer thread, before a record is serialised, so nothing
unredacted reaches the disk and the request path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tuneship.data import checks

KINDS = ("email", "phone", "credit_card", "secret")


def redact(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, list[str]]:
    """(text with each PII span replaced by ``[KIND]``, the kinds found)."""
    return checks.redact(text, list(kinds))


class RecordRedactor:
    """Redacts the free-text fields of an inference-log record in place."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; choose from {KINDS}")

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        found: set[str] = set()

        def clean(holder: dict[str, Any] | None, field: str) -> None:
            if holder and isinstance(holder.get(field), str):
                holder[field], kinds = redact(holder[field], self.kinds)
                found.update(kinds)

        if record.get("kind") == "shadow":  # the mirrored answer: its flag travels with it in the join
            clean(record.get("shadow"), "completion")
            if isinstance(record.get("shadow"), dict):
                record["shadow"]["pii_redacted"] = sorted(found)
            return record
        clean(record, "prompt")
        clean(record.get("live"), "completion")
        record["pii_redacted"] = sorted(found)
        return record
