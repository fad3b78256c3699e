"""Check configuration and per-row inspection for training data.

The YAML suite (`suites/training_data.yaml`) is loaded into a validated `SuiteConfig`, so a
typo in a threshold fails loudly with the key's name instead of silently using a default.

`RowInspector` turns each raw row into a few numeric/boolean features (token counts,
flags, hit counts) plus human reasons. Great Expectations then asserts on those feature
columns (see `gx.py`); logic GE cannot express (near-duplicates, leakage, PII with a Luhn
check, injection patterns) lives here as plain Python and is reflected in the columns.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneship.data.reader import CHAT_ROLES, Shape, canonical_json, detect_shape

DEFAULT_CONFIG = Path(__file__).with_name("suites") / "training_data.yaml"

Severity = Literal["error", "warn"]
Tokenizer = Callable[[str], "int | Sized"]

# Row-level checks, in the order reasons are reported.
ROW_CHECKS: tuple[str, ...] = (
    "schema",
    "required_fields",
    "text_encoding",
    "length",
    "duplicates",
    "leakage",
    "pii",
    "prompt_injection",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RowCheck(_Strict):
    severity: Severity
    max_fraction: float = Field(0.0, ge=0.0, le=1.0)
    enabled: bool = True


class Bounds(_Strict):
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=0)


class LengthCheck(RowCheck):
    prompt_tokens: Bounds = Bounds(min=1, max=1024)
    completion_tokens: Bounds = Bounds(min=1, max=512)


PiiKind = Literal["email", "phone", "credit_card", "secret"]


class PiiCheck(RowCheck):
    kinds: list[PiiKind] = ["email", "phone", "credit_card", "secret"]


class InjectionCheck(RowCheck):
    patterns: list[str] = []

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regex: {exc}") from exc
        return v


class MinRowsCheck(_Strict):
    severity: Severity = "error"
    enabled: bool = True
    train: int = Field(1, ge=0)
    eval: int = Field(1, ge=0)


class DriftCheck(_Strict):
    severity: Severity = "warn"
    enabled: bool = True
    max_score: float = Field(0.25, ge=0.0)


class Checks(_Strict):
    schema_: RowCheck = Field(alias="schema")
    required_fields: RowCheck
    text_encoding: RowCheck
    length: LengthCheck
    duplicates: RowCheck
    leakage: RowCheck
    pii: PiiCheck
    prompt_injection: InjectionCheck
    min_rows: MinRowsCheck
    drift_vs_previous: DriftCheck = DriftCheck()

    def get(self, name: str) -> Any:
        return self.schema_ if name == "schema" else getattr(self, name)


class Quarantine(_Strict):
    max_fraction: float = Field(0.05, ge=0.0, le=1.0)


class SuiteConfig(_Strict):
    name: str
    version: int
    quarantine: Quarantine = Quarantine()
    checks: Checks
    path: str = ""
    sha256: str = ""

    def severity(self, check: str) -> str:
        if check == "quarantine":
            return "error"
        return self.checks.get(check).severity

    def enabled(self, check: str) -> bool:
        return check == "quarantine" or self.checks.get(check).enabled


def load_config(path: str | Path | None = None) -> SuiteConfig:
    """Load and validate a check suite YAML (default: the packaged training_data.yaml)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw_bytes = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read check config {p}: {exc}") from exc
    try:
        raw = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as exc:
        raise ValueError(f"check config {p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"check config {p} must be a mapping with name, version and checks")
    try:
        cfg = SuiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"check config {p} is invalid: {problems}") from exc
    return cfg.model_copy(
        update={"path": str(p.resolve()), "sha256": hashlib.sha256(raw_bytes).hexdigest()}
    )


# --------------------------------------------------------------------------- detectors

# C0/C1 controls except \t \n \r, U+FFFD (mis-decoded bytes), lone surrogates (only reachable
# through \ud8xx JSON escapes; they cannot be written back as UTF-8), bidi overrides.
_BAD_CHARS = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\u202a-\u202e\u2066-\u2069]"
)
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# Needs separators or a leading +, and must not sit inside a longer run of digit groups, so
# bare order numbers and card-like runs do not count as phone numbers.
_PHONE = re.compile(
    r"(?<![\w+.])(?<!\d[\s-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])"
    r"\d{3,4}[\s.-]\d{3,4}(?![\w.])(?![\s-]\d)"
    r"|(?<![\w+])\+\d{8,15}\b"
)
_CARD = re.compile(r"(?<![\d+-])(?:\d[ -]?){12,18}\d(?!\d)")
# Vendor key formats are case-sensitive literals (fast); the generic `password: ...` form is
# case-insensitive and only tried when one of its keywords occurs at all.
_SECRET_TOKEN = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"
    r"|\bsk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_-]{20,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
_SECRET_ASSIGN = re.compile(
    r"\b(?:api[_-]?key|secret|access[_-]?token|auth[_-]?token|password|passwd)\b\s*[:=]\s*"
    r"['\"]?[A-Za-z0-9_\-/+=.]{12,}",
    re.IGNORECASE,
)
_SECRET_WORDS = ("key", "secret", "token", "passw")


def _has_secret(text: str) -> bool:
    if _SECRET_TOKEN.search(text):
        return True
    low = text.lower()
    return any(w in low for w in _SECRET_WORDS) and _SECRET_ASSIGN.search(text) is not None


def luhn_valid(digits: str) -> bool:
    """Luhn checksum: filters random digit runs (order ids) from real card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Cheap prefilter: phone and card numbers both need a run of >= 9 digits with separators.
_DIGIT_RUN = re.compile(r"\d(?:[\s().+-]{0,3}\d){8,}")


def find_pii(text: str, kinds: list[str]) -> list[str]:
    """PII kinds present in `text` (each kind once)."""
    found: list[str] = []
    if "email" in kinds and "@" in text and _EMAIL.search(text):
        found.append("email")
    numbers = ("phone" in kinds or "credit_card" in kinds) and _DIGIT_RUN.search(text)
    if numbers and "phone" in kinds:
        for m in _PHONE.finditer(text):
            n = sum(c.isdigit() for c in m.group())
            if 9 <= n <= 15:
                found.append("phone")
                break
    if numbers and "credit_card" in kinds:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                found.append("credit_card")
                break
    if "secret" in kinds and _has_secret(text):
        found.append("secret")
    return found


def whitespace_tokens(text: str) -> int:
    """Default tokenizer: whitespace-separated tokens (no model dependency)."""
    return len(text.split())


def _count_tokens(tokenizer: Tokenizer, text: str) -> int:
    n = tokenizer(text)
    return n if isinstance(n, int) else len(n)


def _fold(text: str) -> str:
    """Case- and whitespace-insensitive form used for duplicate and leakage keys."""
    return " ".join(text.casefold().split())


def _key(*parts: str) -> str:
    return hashlib.blake2b(
        "\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=12
    ).hexdigest()


# --------------------------------------------------------------------------- inspection


@dataclass
class RowResult:
    """Features for the GE frame, reasons per failing check, and the prompt text."""

    features: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)
    prompt: str = ""


def split_texts(
    record: dict[str, Any], shape: Shape
) -> tuple[str, str, list[str], str | None, int]:
    """(prompt, completion, all text fields, schema problem, empty fields) for a row.

    Chat rows: the completion is the last assistant message, the prompt is every message
    before it joined by newlines.
    """
    if shape == "prompt_completion":
        problems = []
        texts = []
        for key in ("prompt", "completion"):
            v = record.get(key)
            if key not in record:
                problems.append(f"{key} is missing")
            elif not isinstance(v, str):
                problems.append(
                    f"{key} is {type(v).__name__ if v is not None else 'null'}, expected a string"
                )
            else:
                texts.append(v)
        if problems:
            return "", "", texts, "; ".join(problems), 0
        prompt, completion = record["prompt"], record["completion"]
        empty = int(not prompt.strip()) + int(not completion.strip())
        return prompt, completion, [prompt, completion], None, empty

    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        kind = "empty" if isinstance(messages, list) else type(messages).__name__
        return "", "", [], f"messages is {kind}, expected a non-empty list of {{role, content}}", 0
    contents: list[str] = []
    roles: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return "", "", contents, f"messages[{i}] is {type(m).__name__}, expected an object", 0
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            return (
                "",
                "",
                contents,
                f"messages[{i}].role is {role!r}, expected one of {sorted(CHAT_ROLES)}",
                0,
            )
        if not isinstance(content, str):
            return (
                "",
                "",
                contents,
                f"messages[{i}].content is {type(content).__name__ if content is not None else 'null'}, expected a string",
                0,
            )
        roles.append(role)
        contents.append(content)
    empty = sum(1 for c in contents if not c.strip())
    if "assistant" not in roles:
        return "\n".join(contents), "", contents, None, empty + 1
    last = len(roles) - 1 - roles[::-1].index("assistant")
    prompt = "\n".join(contents[:last])
    if not prompt.strip():
        empty += 1  # nothing before the answer to learn from
    return prompt, contents[last], contents, None, empty


class RowInspector:
    """Stateful per-row checks; call with all train rows before any eval row.

    State is one small hash per row (duplicates) and per train prompt (leakage), so
    memory grows with row count, not text size.
    """

    def __init__(self, cfg: SuiteConfig, shape: Shape, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.shape = shape
        self.tokenizer = tokenizer or whitespace_tokens
        self._seen: dict[str, dict[str, int]] = {}
        self._train_prompts: dict[str, int] = {}
        # separate patterns, not one alternation: Python's re scans them faster one by one
        self._injection = [
            re.compile(p, re.IGNORECASE) for p in cfg.checks.prompt_injection.patterns
        ]

    def inspect(self, split: str, line: int, record: dict[str, Any]) -> RowResult:
        c = self.cfg.checks
        reasons: dict[str, str] = {}
        row_shape = detect_shape(record)
        prompt, completion, texts, problem, empty = split_texts(record, row_shape or self.shape)
        if row_shape != self.shape:
            problem = f"row is {row_shape or 'unknown'} but the dataset is {self.shape}"
        valid = problem is None
        if problem:
            reasons["schema"] = problem

        f: dict[str, Any] = {
            "line": line,
            "schema": self.shape if valid else f"invalid:{row_shape or 'unknown'}",
            "empty_fields": empty if valid else None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "duplicate": False,
            "leaked": False,
        }
        if valid and empty:
            reasons["required_fields"] = (
                f"{empty} empty field(s): prompt={'empty' if not prompt.strip() else 'ok'}, "
                f"completion={'empty' if not completion.strip() else 'ok'}"
            )

        bad = sum(len(_BAD_CHARS.findall(t)) for t in texts)
        f["bad_chars"] = bad
        if bad:
            first = next(m.group() for t in texts for m in [_BAD_CHARS.search(t)] if m)
            reasons["text_encoding"] = (
                f"{bad} control/invalid character(s), first U+{ord(first):04X}"
            )

        if valid:
            pt = _count_tokens(self.tokenizer, prompt)
            ct = _count_tokens(self.tokenizer, completion)
            f["prompt_tokens"], f["completion_tokens"] = pt, ct
            out = []
            for name, n, b in (
                ("prompt", pt, c.length.prompt_tokens),
                ("completion", ct, c.length.completion_tokens),
            ):
                if n < b.min:
                    out.append(f"{name} has {n} tokens < min {b.min}")
                elif b.max is not None and n > b.max:
                    out.append(f"{name} has {n} tokens > max {b.max}")
            if out:
                reasons["length"] = "; ".join(out)
            row_key = _key(_fold(prompt), _fold(completion))
        else:
            row_key = _key(canonical_json(record))
        f["row_key"] = row_key

        seen = self._seen.setdefault(split, {})
        if row_key in seen:
            f["duplicate"] = True
            reasons["duplicates"] = f"duplicate of line {seen[row_key]}"
        else:
            seen[row_key] = line

        if valid:
            pkey = _key(_fold(prompt))
            if split == "train":
                self._train_prompts.setdefault(pkey, line)
            elif pkey in self._train_prompts:
                f["leaked"] = True
                reasons["leakage"] = f"prompt also in train line {self._train_prompts[pkey]}"

        joined = "\n".join(texts)
        pii = find_pii(joined, list(c.pii.kinds))
        f["pii_hits"] = len(pii)
        if pii:
            reasons["pii"] = ", ".join(pii)
        matches = [m for p in self._injection if (m := p.search(joined))]
        f["injection_hits"] = len(matches)
        if matches:
            reasons["prompt_injection"] = f"matches {matches[0].group()!r}"

        reasons = {k: v for k, v in reasons.items() if self.cfg.enabled(k)}
        quarantined = any(self.cfg.severity(k) == "error" for k in reasons)
        f["quarantined"] = quarantined
        f["accepted"] = 0 if quarantined else 1
        return RowResult(features=f, reasons=reasons, prompt=prompt)
