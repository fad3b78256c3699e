"""PII detectors: the one home for the training-data `pii` check and the gateway's log redaction.

Phones are found by Google's libphonenumber (`phonenumbers.PhoneNumberMatcher`, leniency
VALID: the number must be valid for its country, in any region when written with +country
code, in `phone_regions` when written nationally); IBANs, US social security numbers and
card numbers are confirmed by python-stdnum's checksums and registries (`stdnum.iban`,
`stdnum.us.ssn`, `stdnum.luhn`). Regexes only propose candidates.

Rules on top of the libraries, each against a false positive seen in support text:
- a phone written nationally needs a separator or bracket: a bare run of digits is an order
  or ticket id far more often than a phone (`+4420...` with a plus still counts);
- a phone glued to an id (`TKT-2024-000123`, `#555-123-4567`, `x/415...`) does not count;
- an SSN needs its dashes or spaces (`536-22-8741`); a bare 9-digit run is an id;
- an IBAN is upper-case country code and check digits, compact or in groups of four.

Each detector has a bulk screen (`Screen`, RE2 syntax for pyarrow.compute) that matches at
least every text the detector can flag, so the validator runs the libraries only on rows a
screen fires on; tests/unit/test_pii.py proves the bounds the screens rest on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import phonenumbers
from phonenumbers import Leniency, PhoneMetadata, PhoneNumberMatcher
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

# Reported in this order; on overlapping spans the earlier kind in OVERLAP_PRIORITY wins.
KINDS: tuple[str, ...] = ("email", "phone", "credit_card", "iban", "ssn", "secret")
OVERLAP_PRIORITY: tuple[str, ...] = ("secret", "email", "iban", "credit_card", "ssn", "phone")
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US",)

# Python's Unicode \s (str.isspace) as an RE2 class body (RE2's own \s is ASCII-only).
RE2_SPACE = r"\s\p{Z}\x0b\x1c-\x1f\x{85}"

# --------------------------------------------------------------------------- patterns

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
CARD = re.compile(r"(?<![\d+-])(?:\d[ -]?){12,18}\d(?!\d)")
SSN = re.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-])")
# Country code and check digits, then the BBAN compact or in groups (a space or dash between).
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
# Vendor key formats are case-sensitive literals (fast); the generic `password: ...` form is
# case-insensitive and only tried when one of its keywords occurs at all.
SECRET_TOKEN = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"
    r"|\bsk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_-]{20,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
SECRET_ASSIGN = re.compile(
    r"\b(?:api[_-]?key|secret|access[_-]?token|auth[_-]?token|password|passwd)\b\s*[:=]\s*"
    r"['\"]?[A-Za-z0-9_\-/+=.]{12,}",
    re.IGNORECASE,
)
_SECRET_WORDS = ("key", "secret", "token", "passw")

# libphonenumber's separators between digit groups (its matcher allows up to 4 in a row,
# case-insensitively, so 'X' as well as 'x'), and what may open a number (brackets, plus).
PHONE_PUNCTUATION = phonenumbers.phonenumberutil._VALID_PUNCTUATION + "X"
_PLUS = "+\uff0b"
_LEAD = "(\uff08\\[\uff3b" + _PLUS
# Fewest digits a valid number written with a leading + can have: country code plus the
# shortest national significant number in the metadata (+43 / +49 with 4 digits).
# test_pii recomputes it over every region, so a metadata update that lowers it fails there.
INTL_MIN_DIGITS = 6
SSN_DIGITS = 9
CARD_MIN_DIGITS = 13
_ID_GLUE_BEFORE = "#-_/\\@"
_ID_GLUE_AFTER = "-_/\\@"
# context kept around a digit run for the phone matcher: lead brackets/plus, an extension
_WINDOW_MARGIN = 16


@cache
def national_min_digits(region: str) -> int:
    """Fewest digits libphonenumber's VALID matcher can accept for a number written without a
    plus in `region`: the shortest national number (less the digits a national-prefix
    transform rule inserts, as for 7-digit local numbers in the NANP islands), or the
    region's shortest international dialling prefix plus INTL_MIN_DIGITS."""
    import re._parser as sre_parse  # getwidth(): the shortest string a pattern matches

    meta = PhoneMetadata.metadata_for_region(region)
    national = min(n for n in meta.general_desc.possible_length if n > 0)
    if rule := meta.national_prefix_transform_rule:
        national -= sum(c.isdigit() for c in re.sub(r"\\\d|\$\d", "", rule))
    bound = national
    if meta.international_prefix:
        idd = sre_parse.parse(meta.international_prefix).getwidth()[0]
        bound = min(bound, idd + INTL_MIN_DIGITS)
    return max(bound, 1)


def check_phone_regions(regions: Iterable[str]) -> tuple[str, ...]:
    """Upper-cased region codes, or ValueError naming the unknown ones."""
    out = tuple(r.upper() for r in regions)
    unknown = sorted(set(out) - phonenumbers.SUPPORTED_REGIONS)
    if unknown:
        raise ValueError(
            f"unknown phone region(s) {unknown}: use ISO 3166 codes libphonenumber knows, "
            "e.g. US, GB, DE"
        )
    return out


def _ascii_digits(text: str) -> str:
    """The decimal digits of `text` as ASCII (Arabic-Indic, fullwidth ... included)."""
    return "".join(str(unicodedata.decimal(c)) for c in text if c.isdecimal())


def _has_secret(text: str) -> bool:
    if SECRET_TOKEN.search(text):
        return True
    low = text.lower()
    return any(w in low for w in _SECRET_WORDS) and SECRET_ASSIGN.search(text) is not None


def _re2_digit_run(min_digits: int) -> str:
    sep = "(?i:[" + PHONE_PUNCTUATION + "])"
    return r"\p{Nd}(?:" + sep + r"{0,4}\p{Nd}){" + str(max(min_digits - 1, 0)) + ",}"


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class Screen:
    """A bulk screen: `pattern` (RE2 regex, or a literal when `regex` is False) matches every
    text in which the detectors for `kinds` can find something."""

    kinds: tuple[str, ...]
    pattern: str
    regex: bool = True


class PiiDetector:
    """Finds and redacts the PII `kinds` in free text; immutable, safe to share."""

    def __init__(
        self, kinds: Iterable[str] = KINDS, phone_regions: Iterable[str] = DEFAULT_PHONE_REGIONS
    ) -> None:
        asked = set(kinds)
        self.kinds = tuple(k for k in KINDS if k in asked)
        unknown = sorted(asked - set(KINDS))
        if unknown:
            raise ValueError(f"unknown PII kind(s) {unknown}; choose from {list(KINDS)}")
        self.phone_regions = check_phone_regions(phone_regions)
        numbers = [k for k in ("phone", "credit_card", "ssn") if k in self.kinds]
        # fewest digits any number kind here can show, and their cheap Python prefilter
        mins = {"credit_card": CARD_MIN_DIGITS, "ssn": SSN_DIGITS}
        if "phone" in self.kinds:
            mins["phone"] = min(national_min_digits(r) for r in self.phone_regions)
        self.min_digits = min((mins[k] for k in numbers), default=0)
        self._numbers = tuple(numbers)
        sep = "[" + PHONE_PUNCTUATION + "]"
        run = r"\d(?:" + sep + r"{0,4}\d){" + str(max(self.min_digits - 1, 0)) + ",}"
        intl = (
            "[" + _PLUS + "][" + PHONE_PUNCTUATION + _LEAD + r"]{0,10}\d(?:" + sep
            + r"{0,4}\d){" + str(INTL_MIN_DIGITS - 1) + ",}"
        )
        self._digit_screen = re.compile(
            run + ("|" + intl if "phone" in self.kinds else ""), re.IGNORECASE
        )

    # ----------------------------------------------------------------------- bulk screens

    def screens(self) -> list[Screen]:
        """RE2 screens covering every enabled kind (see `Screen`)."""
        out: list[Screen] = []
        if "email" in self.kinds:
            out.append(Screen(("email",), "@", regex=False))
        numbers = list(self._numbers)
        parts = []
        if numbers:
            parts.append(_re2_digit_run(self.min_digits))
            if "phone" in numbers:
                parts.append(
                    "[" + _PLUS + "](?i:[" + PHONE_PUNCTUATION + _LEAD + "]){0,10}"
                    + _re2_digit_run(INTL_MIN_DIGITS)
                )
        if "iban" in self.kinds:
            numbers.append("iban")
            parts.append("[A-Z]{2}[0-9]{2}")
        if parts:
            out.append(Screen(tuple(numbers), "|".join(f"(?:{p})" for p in parts)))
        if "secret" in self.kinds:
            out.append(Screen(("secret",), (
                r"AKIA|sk-|gh[pousr]_|xox[abprs]-|AIza|-----BEGIN "
                r"|(?i:(?:api[_-]?key|secret|access[_-]?token|auth[_-]?token|password|passwd)["
                + RE2_SPACE + r"]*[:=])"
            )))
        return out

    # ----------------------------------------------------------------------- detection

    def spans(self, text: str, kinds: Iterable[str] | None = None) -> list[Span]:
        """Non-overlapping PII spans in `text`, in text order (`kinds`: a subset to look for)."""
        want = self.kinds if kinds is None else tuple(k for k in self.kinds if k in set(kinds))
        found: list[Span] = []
        if "email" in want and "@" in text:
            found += [Span(m.start(), m.end(), "email") for m in EMAIL.finditer(text)]
        if "secret" in want and _has_secret(text):
            for pat in (SECRET_TOKEN, SECRET_ASSIGN):
                found += [Span(m.start(), m.end(), "secret") for m in pat.finditer(text)]
        if "iban" in want:
            found += self._ibans(text)
        if any(k in want for k in self._numbers) and self._digit_screen.search(text):
            if "credit_card" in want:
                for m in CARD.finditer(text):
                    d = _ascii_digits(m.group())
                    if CARD_MIN_DIGITS <= len(d) <= 19 and luhn.is_valid(d):
                        found.append(Span(m.start(), m.end(), "credit_card"))
            if "ssn" in want:
                for m in SSN.finditer(text):
                    if stdnum_ssn.is_valid(_ascii_digits(m.group())):
                        found.append(Span(m.start(), m.end(), "ssn"))
            if "phone" in want:
                found += self._phones(text, found)
        if not found:
            return []
        rank = {k: i for i, k in enumerate(OVERLAP_PRIORITY)}
        kept: list[Span] = []
        for s in sorted(found, key=lambda s: (rank[s.kind], s.start, -s.end)):
            if all(s.end <= k.start or s.start >= k.end for k in kept):
                kept.append(s)
        return sorted(kept, key=lambda s: s.start)

    def find(self, text: str, kinds: Iterable[str] | None = None) -> list[str]:
        """The PII kinds present in `text`, each once, in KINDS order."""
        present = {s.kind for s in self.spans(text, kinds)}
        return [k for k in KINDS if k in present]

    def redact(self, text: str) -> tuple[str, list[str]]:
        """(text with each PII span replaced by ``[KIND]``, the kinds found)."""
        spans = self.spans(text)
        if not spans:
            return text, []
        out: list[str] = []
        pos = 0
        for s in spans:
            out += [text[pos:s.start], f"[{s.kind.upper()}]"]
            pos = s.end
        out.append(text[pos:])
        present = {s.kind for s in spans}
        return "".join(out), [k for k in KINDS if k in present]

    def _ibans(self, text: str) -> list[Span]:
        """IBAN candidates, each cut back to the longest prefix ending on a group boundary
        that stdnum accepts (so a number written right after the IBAN does not hide it)."""
        out: list[Span] = []
        for m in IBAN.finditer(text):
            raw = m.group()
            ends = [i for i in range(len(raw), 0, -1) if i == len(raw) or raw[i] in " -"]
            for end in ends:
                compact = raw[:end].replace(" ", "").replace("-", "")
                if len(compact) >= 15 and stdnum_iban.is_valid(compact):
                    out.append(Span(m.start(), m.start() + end, "iban"))
                    break
        return out

    def _phones(self, text: str, claimed: list[Span]) -> list[Span]:
        """libphonenumber's matches, run only on windows around digit runs that no other
        kind has claimed (the matcher costs milliseconds on a long, digit-heavy text)."""
        windows: list[list[int]] = []
        for m in self._digit_screen.finditer(text):
            if any(c.start <= m.start() and m.end() <= c.end for c in claimed):
                continue  # the digits of a card, IBAN or SSN
            a, b = max(0, m.start() - _WINDOW_MARGIN), min(len(text), m.end() + _WINDOW_MARGIN)
            if windows and a <= windows[-1][1]:
                windows[-1][1] = b
            else:
                windows.append([a, b])
        out: list[Span] = []
        for a, b in windows:
            for region in self.phone_regions:
                for m in PhoneNumberMatcher(text[a:b], region, leniency=Leniency.VALID):
                    start, end, raw = a + m.start, a + m.end, m.raw_string
                    if raw[0] not in _PLUS and raw.isdecimal():
                        continue  # a bare digit run: an id, not a phone
                    before = text[start - 1] if start > 0 else " "
                    after = text[end] if end < len(text) else " "
                    if before.isalnum() or before in _ID_GLUE_BEFORE:
                        continue  # part of an id such as TKT-2024-000123
                    if after.isalnum() or after in _ID_GLUE_AFTER:
                        continue
                    out.append(Span(start, end, "phone"))
        return out


@cache
def detector(
    kinds: tuple[str, ...] = KINDS, phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS
) -> PiiDetector:
    """A shared detector per configuration (the phone-region bounds are computed once)."""
    return PiiDetector(kinds, phone_regions)
