"""Check configuration and per-row inspection for training data.

The YAML suite (`suites/training_data.yaml`) is loaded into a validated `SuiteConfig`, so a
typo in a threshold fails loudly with the key's name instead of silently using a default.

`RowInspector` turns each raw row into a few numeric/boolean features (token counts,
flags, hit counts) plus human reasons. Great Expectations then asserts on those feature
columns (see `gx.py`); logic GE cannot express (near-duplicates, leakage, PII confirmed by
libphonenumber and checksums, injection patterns) lives here and in `pii.py` as plain Python
and is reflected in the columns.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tuneship.data import pii
from tuneship.data.reader import CHAT_ROLES, DatasetError, Shape, canonical_json, detect_shape
from tuneship.profile import fold_counts

DEFAULT_CONFIG = Path(__file__).with_name("suites") / "training_data.yaml"

Severity = Literal["error", "warn"]
Tokenizer = Callable[[str], "int | Sized"]

# Row-level checks, in the order reasons are reported.
ROW_CHECKS: tuple[str, ...] = (
    "schema",
    "required_fields",
    "role_order",
    "text_encoding",
    "length",
    "duplicates",
    "leakage",
    "pii",
    "prompt_injection",
    "answer_format",  # only with a task's AnswerCheck (see below)
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


class PiiCheck(RowCheck):
    kinds: list[str] = list(pii.KINDS)
    # where a phone written without +country code is looked up (libphonenumber regions)
    phone_regions: list[str] = list(pii.DEFAULT_PHONE_REGIONS)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        if unknown := sorted(set(v) - set(pii.KINDS)):
            raise ValueError(f"unknown PII kind(s) {unknown}; choose from {list(pii.KINDS)}")
        return v

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, v: list[str]) -> list[str]:
        return list(pii.check_phone_regions(v))

    def detector(self) -> pii.PiiDetector:
        return pii.detector(tuple(self.kinds), tuple(self.phone_regions))


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


class AnswerFormatCheck(RowCheck):
    """The task's data gate. Its threshold is the task's (`AnswerCheck.min_share`), so the
    suite may not declare one: a second number here could only disagree with the task."""

    severity: Severity = "error"

    @model_validator(mode="before")
    @classmethod
    def _no_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_fraction" in data:
            raise ValueError(
                "max_fraction is not set here: the task declares its answers' minimum "
                "conforming share (AnswerCheck.min_share); remove the key"
            )
        return data


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
    role_order: RowCheck = RowCheck(severity="error", max_fraction=0.05)
    text_encoding: RowCheck
    length: LengthCheck
    duplicates: RowCheck
    leakage: RowCheck
    pii: PiiCheck
    prompt_injection: InjectionCheck
    answer_format: AnswerFormatCheck = AnswerFormatCheck()  # absent from suites before v4
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


# --------------------------------------------------------------------------- the task's data gate


@dataclass(frozen=True)
class AnswerCheck:
    """How a task says what its answers look like, for the `answer_format` row check.

    Plain strings and a float, so it pickles into spawned worker processes, which import
    `module_file` themselves (`answer_function`). `min_share` is the share of each split's
    rows whose answer must conform; it is the check's threshold (max_fraction = 1 -
    min_share), and the suite YAML may not declare another.
    """

    task: str  # task name, for messages
    module_file: str  # absolute path of the .py file holding the function
    function: str  # name of a function: answer text -> bool (True = conforms)
    min_share: float  # share of a split's rows that must conform (e.g. 0.95)
    describe: str  # how the check is declared, for messages

    def __post_init__(self) -> None:
        who = f"task {self.task!r}: answer check"
        if isinstance(self.min_share, bool) or not isinstance(self.min_share, int | float) or not (
            0.0 <= self.min_share <= 1.0
        ):
            raise ValueError(f"{who} min_share is {self.min_share!r}; expected a share from 0 to 1")
        if not Path(self.module_file).is_absolute():
            raise ValueError(
                f"{who} module_file {self.module_file!r} is not an absolute path; "
                "worker processes import it by path, so give it in full"
            )
        if not self.function.isidentifier():
            raise ValueError(f"{who} function {self.function!r} is not a Python function name")

    @property
    def max_fraction(self) -> float:
        """Share of a split's rows allowed not to conform (rounded: 1 - 0.95 is not 0.05)."""
        return round(1.0 - float(self.min_share), 12)


def answer_function(check: AnswerCheck) -> Callable[[str], Any]:
    """The task's answer function, its module imported by path once per process (kept in
    `sys.modules` under a name derived from the path, so every RowScreen of a process and
    every block a worker screens share one import)."""
    path = Path(check.module_file)
    name = "tuneship_answer_check_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module = sys.modules.get(name)
    who = f"task {check.task!r}: answer check {check.describe}"
    if module is None:
        if not path.is_file():
            raise ValueError(
                f"{who}: module file {path} does not exist; fix module_file in the task's "
                "declaration or restore the file"
            )
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{who}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ValueError(
                f"{who}: importing {path} failed ({type(exc).__name__}: {exc}); fix the module"
            ) from exc
    fn = getattr(module, check.function, None)
    if not callable(fn):
        found = "is not a function" if hasattr(module, check.function) else "is not defined"
        raise ValueError(
            f"{who}: {check.function} {found} in {path}; define "
            f"`def {check.function}(answer: str) -> bool` there or fix function in the "
            "task's declaration"
        )
    return fn


def with_answer_check(cfg: SuiteConfig, check: AnswerCheck | None) -> SuiteConfig:
    """The suite as run for one batch: `answer_format` takes the task's threshold, and is
    off (not run, not reported) without a task check."""
    af = cfg.checks.answer_format
    update: dict[str, Any] = (
        {"enabled": False} if check is None else {"max_fraction": check.max_fraction}
    )
    checks = cfg.checks.model_copy(update={"answer_format": af.model_copy(update=update)})
    return cfg.model_copy(update={"checks": checks})


# --------------------------------------------------------------------------- detectors

# C0/C1 controls except \t \n \r, U+FFFD (mis-decoded bytes), lone surrogates (only reachable
# through \ud8xx JSON escapes; they cannot be written back as UTF-8), bidi overrides.
_BAD_CHARS = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\u202a-\u202e\u2066-\u2069]"
)
# PII detectors (emails, phones, cards, IBANs, SSNs, secrets) live in tuneship.data.pii,
# shared with the gateway's log redaction.


def whitespace_tokens(text: str) -> int:
    """Default tokenizer: whitespace-separated tokens (no model dependency)."""
    return len(text.split())


def _count_tokens(tokenizer: Tokenizer, text: str) -> int:
    n = tokenizer(text)
    return n if isinstance(n, int) else len(n)


# --------------------------------------------------------------------------- RE2 prefilters
# Rows are screened in bulk with RE2 (pyarrow.compute, C++), and only the rows a prefilter
# flags go through the Python detectors (above, and tuneship.data.pii's), which stay the
# definition of each check.
# Every prefilter is a superset of its detector: RE2's \s, \d, \w and \b are ASCII-only,
# so the Unicode classes Python's `re` uses are spelled out, and zero-width assertions are
# dropped (dropping one can only widen a match).

_WS = pii.RE2_SPACE  # Python's Unicode \s (str.isspace) as an RE2 class body
_RE2_CLASS = {"s": _WS, "d": r"\p{Nd}", "w": r"\p{L}\p{N}_"}
_BAD_CHARS_RE2 = (
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x{9f}\x{fffd}\x{202a}-\x{202e}\x{2066}-\x{2069}]"
)


def re2_superset(pattern: str) -> str | None:
    """An RE2 pattern matching at least wherever Python's `re` matches `pattern`, or None
    when there is no safe translation (lookarounds, backreferences, a negated class holding
    \\s/\\d/\\w, ...): such patterns are then run with Python on every row."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = negated = False
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt in _RE2_CLASS:
                if in_class and negated:
                    return None
                body = _RE2_CLASS[nxt]
                out.append(body if in_class else f"[{body}]")
            elif nxt == "b" and in_class:
                out.append(r"\x08")
            elif nxt in "bB":
                pass  # word boundary: dropped
            elif nxt == "Z":
                return None
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if not in_class and ch == "[":
            j = i + 1
            negated = j < n and pattern[j] == "^"
            j += negated
            out.append(pattern[i:j])
            i, in_class = j, True
            if i < n and pattern[i] == "]":  # a leading ']' is a literal
                out.append(r"\]")
                i += 1
            continue
        if in_class and ch == "]":
            in_class = False
        elif not in_class and ch in "^$":
            i += 1  # anchors: dropped
            continue
        out.append(ch)
        i += 1
    import pyarrow as pa
    import pyarrow.compute as pc

    translated = "".join(out)
    try:
        pc.match_substring_regex(pa.array([""]), translated)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return translated


def _to_arrow(texts: list[str]) -> tuple[Any, dict[int, int]]:
    """Arrow strings for RE2, and {row: bad-char count} for rows holding lone surrogates
    (not encodable as UTF-8: counted in Python, replaced by '?' for the Arrow copy)."""
    import pyarrow as pa

    try:
        return pa.array(texts, pa.string()), {}
    except UnicodeEncodeError:
        fixed: dict[int, int] = {}
        safe = list(texts)
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                fixed[i] = len(_BAD_CHARS.findall(t))
                safe[i] = t.encode("utf-8", "replace").decode("utf-8")
        return pa.array(safe, pa.string()), fixed


# --------------------------------------------------------------------------- inspection


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




def unknown_schema(where: str, line: int, record: dict[str, Any]) -> DatasetError:
    return DatasetError(
        f"{where} line {line}: unknown row schema (keys: "
        f"{', '.join(sorted(map(str, record))) or 'none'}). Rows must be "
        '{"prompt": ..., "completion": ...} or '
        '{"messages": [{"role": ..., "content": ...}, ...]}.',
        file=where.rsplit("/", 1)[-1],
        line=line,
    )


def role_problem(messages: list[dict[str, Any]]) -> str | None:
    """Turn order of a chat row with valid roles: optional system messages first, then user
    and assistant strictly alternating from a user turn (tool results only right after an
    assistant turn and before the next assistant turn), ending on the assistant's answer."""
    roles = [m["role"] for m in messages]
    prev = None
    for i, role in enumerate(roles):
        if role == "system":
            if prev not in (None, "system"):
                return f"messages[{i}] is system after {prev}: system messages must come first"
        elif role == "user":
            if prev == "user":
                return f"messages[{i}] is user after user: turns must alternate user/assistant"
            if prev == "tool":
                return f"messages[{i}] is user after tool: a tool result must go back to the assistant"
        elif role == "assistant":
            if prev in (None, "system"):
                return f"messages[{i}] is assistant before any user turn"
            if prev == "assistant":
                return f"messages[{i}] is assistant after assistant: turns must alternate user/assistant"
        elif role == "tool" and prev not in ("assistant", "tool"):
            return f"messages[{i}] is tool after {prev or 'nothing'}: tool results follow an assistant turn"
        prev = role
    if prev != "assistant":
        return f"the last message is {prev}, not assistant: nothing after the last answer is learned"
    return None


@dataclass
class Screened:
    """What one chunk's rows show on their own (everything but duplicates and leakage,
    which need every earlier row): picklable, so worker processes can compute it."""

    split: str
    lines: list[int]
    features: dict[str, Any]  # GE feature columns known row-locally
    reasons: dict[int, dict[str, str]]  # index in the chunk -> {check: reason}
    local_error: Any  # bool array: failing an error-severity row-local check
    row_texts: list[str]  # folded "prompt\0completion" (canonical JSON if invalid): dedup key
    prompt_folds: list[str | None]  # lower-cased, whitespace-folded prompt (None if invalid)
    profile_counts: Any  # profile.fold_counts of the prompts of locally kept train rows
    profile_lengths: Any  # int array: their prompt lengths in whitespace tokens


class RowScreen:
    """The row-local checks of a suite for one dataset shape; holds no per-dataset state.

    Per row, one Python pass splits the texts (lower-cased whitespace tokens give the token
    counts, the duplicate/leakage keys and the profile); RE2 prefilters screen the chunk in
    bulk; the Python detectors confirm the few rows a prefilter flags.
    """

    def __init__(
        self,
        cfg: SuiteConfig,
        shape: Shape,
        tokenizer: Tokenizer | None = None,
        answer_check: AnswerCheck | None = None,
    ):
        self.cfg = cfg
        self.shape = shape
        self.tokenizer = tokenizer
        # answer_format runs only with a task's check (validate_dataset turns it off without)
        self.answer_check = answer_check if cfg.enabled("answer_format") else None
        self._answer = answer_function(self.answer_check) if self.answer_check else None
        patterns = cfg.checks.prompt_injection.patterns
        self._injection = [re.compile(p, re.IGNORECASE) for p in patterns]
        supersets = [re2_superset(p) for p in patterns]
        wide = [f"(?:{t})" for t in supersets if t is not None]
        self._injection_re2 = "(?i)" + "|".join(wide) if wide else None
        self._injection_everywhere = any(t is None for t in supersets)
        self.enabled = [
            k
            for k in ROW_CHECKS
            if cfg.enabled(k) and (k != "answer_format" or self._answer is not None)
        ]
        self.error_checks = [k for k in self.enabled if cfg.severity(k) == "error"]

    def screen(
        self, split: str, lines: list[int], records: list[dict[str, Any]], where: str = ""
    ) -> Screened:
        """Check one chunk; `where` (the file) names it in a `DatasetError` for a row whose
        keys fit neither shape. The cyclic garbage collector is paused meanwhile: the chunk
        builds tens of thousands of small lists and no cycles, and collections triggered by
        those allocations would rescan every live object each time."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._screen(split, lines, records, where)
        finally:
            if enabled:
                gc.enable()

    def _screen(
        self, split: str, lines: list[int], records: list[dict[str, Any]], where: str
    ) -> Screened:
        import numpy as np
        import pyarrow.compute as pc

        c = self.cfg.checks
        n = len(records)
        shape = self.shape
        problems: dict[int, str] = {}
        roles: dict[int, str] = {}
        joined: list[str] = []
        plen = [0] * n  # prompt length in whitespace tokens
        prompts: list[str] = []
        completions: list[str] = []
        folds: list[str | None] = []
        row_texts: list[str] = []
        clen = [0] * n
        empty = np.zeros(n, dtype=np.int64)
        fast = shape == "prompt_completion"
        for i, rec in enumerate(records):
            if fast and "messages" not in rec:
                p, comp = rec.get("prompt"), rec.get("completion")
                if type(p) is str and type(comp) is str:
                    pw, cw = p.lower().split(), comp.lower().split()
                    pf = " ".join(pw)
                    row_texts.append(f"{pf}\x00{' '.join(cw)}")
                    empty[i] = (not pw) + (not cw)
                    clen[i] = len(cw)
                    joined.append(f"{p}\n{comp}")
                    plen[i] = len(pw)
                    folds.append(pf)
                    prompts.append(p)
                    completions.append(comp)
                    continue
            row_shape = detect_shape(rec)
            if row_shape is None:
                raise unknown_schema(where, lines[i], rec)
            prompt, completion, texts, problem, e = split_texts(rec, row_shape)
            if row_shape != shape:
                problem = f"row is {row_shape} but the dataset is {shape}"
            joined.append("\n".join(texts))
            prompts.append(prompt)
            completions.append(completion)
            if problem is None:
                pw, cw = prompt.lower().split(), completion.lower().split()
                pf = " ".join(pw)
                row_texts.append(f"{pf}\x00{' '.join(cw)}")
                empty[i] = e
                clen[i] = len(cw)
                plen[i] = len(pw)
                folds.append(pf)
                if shape == "chat" and (rp := role_problem(rec["messages"])):
                    roles[i] = rp
            else:
                problems[i] = problem
                row_texts.append(canonical_json(rec))
                folds.append(None)
        valid = np.ones(n, dtype=bool)
        valid[list(problems)] = False

        # token counts (whitespace by default: the split above already has them)
        if self.tokenizer is None:
            pt = np.asarray(plen, dtype=np.int64)
            ct = np.asarray(clen, dtype=np.int64)
        else:
            tok = self.tokenizer
            pt = np.array([_count_tokens(tok, x) for x in prompts], dtype=np.int64)
            ct = np.array([_count_tokens(tok, x) for x in completions], dtype=np.int64)
        lb = c.length
        big = np.iinfo(np.int64).max
        p_hi = big if lb.prompt_tokens.max is None else lb.prompt_tokens.max
        c_hi = big if lb.completion_tokens.max is None else lb.completion_tokens.max
        length_bad = valid & (
            (pt < lb.prompt_tokens.min) | (pt > p_hi) | (ct < lb.completion_tokens.min) | (ct > c_hi)
        )

        # bulk screens
        arr, surrogate_rows = _to_arrow(joined)
        bad = pc.count_substring_regex(arr, _BAD_CHARS_RE2).to_numpy(zero_copy_only=False)
        bad = bad.astype(np.int64)
        for i, count in surrogate_rows.items():
            bad[i] = count
        # each detector runs only on the rows its own screen flagged
        detector = c.pii.detector()
        candidates: dict[int, list[str]] = {}
        for screen in detector.screens():
            match = pc.match_substring_regex if screen.regex else pc.match_substring
            hits = match(arr, screen.pattern).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(hits).tolist():
                candidates.setdefault(i, []).extend(screen.kinds)
        pii_found: dict[int, list[str]] = {}
        for i, ks in candidates.items():
            if found := detector.find(joined[i], ks):
                pii_found[i] = found
        if self._injection_everywhere:
            inj_rows = np.ones(n, dtype=bool)
        elif self._injection_re2 is not None:
            inj_rows = pc.match_substring_regex(arr, self._injection_re2).to_numpy(
                zero_copy_only=False
            )
        else:
            inj_rows = np.zeros(n, dtype=bool)
        injection: dict[int, list[re.Match[str]]] = {}
        for i in np.flatnonzero(inj_rows).tolist():
            if matches := [m for pat in self._injection if (m := pat.search(joined[i]))]:
                injection[i] = matches

        misfits = self._misfits(completions, valid) if self._answer is not None else {}

        flags = {
            "schema": ~valid,
            "required_fields": valid & (empty > 0),
            "role_order": _mask(n, roles),
            "text_encoding": bad > 0,
            "length": length_bad,
            "pii": _mask(n, pii_found),
            "prompt_injection": _mask(n, injection),
            "answer_format": _mask(n, misfits),
        }
        local = [k for k in self.enabled if k in flags]
        local_error = np.zeros(n, dtype=bool)
        for k in self.error_checks:
            if k in flags:
                local_error |= flags[k]
        any_flag = np.zeros(n, dtype=bool)
        for k in local:
            any_flag |= flags[k]
        reasons: dict[int, dict[str, str]] = {}
        for i in np.flatnonzero(any_flag).tolist():
            r: dict[str, str] = {}
            for k in local:
                if not flags[k][i]:
                    continue
                if k == "schema":
                    r[k] = problems[i]
                elif k == "required_fields":
                    r[k] = (
                        f"{empty[i]} empty field(s): "
                        f"prompt={'empty' if not prompts[i].strip() else 'ok'}, "
                        f"completion={'empty' if not completions[i].strip() else 'ok'}"
                    )
                elif k == "role_order":
                    r[k] = roles[i]
                elif k == "text_encoding":
                    first_bad = _BAD_CHARS.search(joined[i])
                    code = f"U+{ord(first_bad.group()):04X}" if first_bad else "?"
                    r[k] = f"{bad[i]} control/invalid character(s), first {code}"
                elif k == "length":
                    r[k] = _length_reason(int(pt[i]), int(ct[i]), lb)
                elif k == "pii":
                    r[k] = ", ".join(pii_found[i])
                elif k == "prompt_injection":
                    r[k] = f"matches {injection[i][0].group()!r}"
                elif k == "answer_format":
                    r[k] = misfits[i]
            reasons[i] = r

        schema = np.where(valid, shape, "").astype(object)
        for i in problems:
            schema[i] = f"invalid:{detect_shape(records[i])}"
        features = {
            "line": np.asarray(lines, dtype=np.int64),
            "schema": schema,
            "empty_fields": _nullable(empty, valid),
            "bad_chars": bad,
            "prompt_tokens": _nullable(pt, valid),
            "completion_tokens": _nullable(ct, valid),
            "role_problems": flags["role_order"].astype(np.int64),
            "pii_hits": np.fromiter(
                (len(pii_found.get(i, ())) for i in range(n)), np.int64, count=n
            ),
            "injection_hits": np.fromiter(
                (len(injection.get(i, ())) for i in range(n)), np.int64, count=n
            ),
        }
        if self._answer is not None:
            features["answer_misfit"] = _nullable(flags["answer_format"].astype(np.int64), valid)
        counts = None
        lengths = np.zeros(0, dtype=np.int64)
        if split == "train":
            kept = np.flatnonzero(~local_error).tolist()
            counts = fold_counts([folds[i] or "" for i in kept])
            lengths = np.asarray(plen, dtype=np.int64)[kept]
        return Screened(
            split, lines, features, reasons, local_error, row_texts, folds, counts, lengths,
        )

    def _misfits(self, answers: list[str], valid: Any) -> dict[int, str]:
        """{row: reason} for the valid rows whose answer the task's function rejects. The
        function is a pure text -> bool, so each distinct answer in the chunk is judged
        once (a label-shaped task repeats a handful of answers across every row)."""
        import numpy as np

        verdicts: dict[str, str | None] = {}  # answer -> reason, None when it conforms
        out: dict[int, str] = {}
        for i in np.flatnonzero(valid).tolist():
            answer = answers[i]
            if answer in verdicts:
                reason = verdicts[answer]
            else:
                reason = verdicts[answer] = self._judge(answer)
            if reason is not None:
                out[i] = reason
        return out

    def _judge(self, answer: str) -> str | None:
        """Why `answer` does not fit the task, or None when it does. A function raising on
        an answer rejects it (the reason says what it raised); one returning anything but
        a bool is a broken declaration and raises."""
        import numpy as np

        check, fn = self.answer_check, self._answer
        assert check is not None and fn is not None
        misfit = f"answer does not fit task {check.task!r} ({check.describe})"
        try:
            ok = fn(answer)
        except Exception as exc:  # the task's code on untrusted text: reject the row
            return f"{misfit}: {check.function} raised {type(exc).__name__}: {exc}"[:300]
        if ok is True or ok is np.True_:
            return None
        if ok is False or ok is np.False_:
            return misfit
        raise ValueError(
            f"task {check.task!r}: answer check {check.function} in {check.module_file} "
            f"returned {type(ok).__name__} {ok!r:.80}; it must return True (the answer fits "
            "the task) or False"
        )


@dataclass
class ChunkResult:
    """A chunk's complete GE feature columns and reasons per failing row."""

    lines: list[int]
    features: dict[str, Any]
    reasons: dict[int, dict[str, str]]  # index in the chunk -> {check: reason}


class ChunkInspector:
    """Duplicates, leakage and the quarantine decision, in row order across chunks; feed all
    train chunks before any eval chunk. State is one 64-bit key per row (duplicates) and per
    train prompt (leakage), so memory grows with the row count, not the text size; keys are
    this process's (randomly seeded) 64-bit SipHash of the case- and whitespace-folded text,
    so a collision needs ~2^32 rows to become likely and cannot be crafted in advance. Adds
    the kept train prompts to `profiler`.
    """

    def __init__(self, screen: RowScreen, profiler: Any):
        self.screen = screen
        self.profiler = profiler
        self._seen: dict[str, dict[int, int]] = {}
        self._train_prompts: dict[int, int] = {}

    def done(self, split: str) -> None:
        """No more rows of `split`: its duplicate keys are not needed any more."""
        self._seen.pop(split, None)

    def finish(self, s: Screened) -> ChunkResult:
        import numpy as np

        n = len(s.lines)
        lines = s.lines
        seen = self._seen.setdefault(s.split, {})
        row_keys = list(map(hash, s.row_texts))
        prompt_keys = [None if f is None else hash(f) for f in s.prompt_folds]
        first = [seen.setdefault(k, ln) for k, ln in zip(row_keys, lines, strict=True)]
        duplicate = np.fromiter((f != ln for f, ln in zip(first, lines, strict=True)), bool, count=n)
        leaked_from: dict[int, int] = {}
        tp = self._train_prompts
        if s.split == "train":
            for k, ln in zip(prompt_keys, lines, strict=True):
                if k is not None:
                    tp.setdefault(k, ln)
        else:
            for i, k in enumerate(prompt_keys):
                if k is not None and k in tp:
                    leaked_from[i] = tp[k]
        leaked = _mask(n, leaked_from)
        cfg = self.screen.cfg
        quarantined = s.local_error.copy()
        reasons = s.reasons
        for name, mask in (("duplicates", duplicate), ("leakage", leaked)):
            if not cfg.enabled(name):
                continue
            if cfg.severity(name) == "error":
                quarantined |= mask
            for i in np.flatnonzero(mask).tolist():
                reasons.setdefault(i, {})[name] = (
                    f"duplicate of line {first[i]}"
                    if name == "duplicates"
                    else f"prompt also in train line {leaked_from[i]}"
                )
        if s.split == "train":
            self.profiler.add_counts(s.profile_counts, s.profile_lengths)
            # rows quarantined only now (duplicates) were counted by the screen: take them out
            late = np.flatnonzero(quarantined & ~s.local_error).tolist()
            if late:
                gone = [s.prompt_folds[i] or "" for i in late]
                self.profiler.add_counts(
                    fold_counts(gone),
                    np.array([f.count(" ") + 1 if f else 0 for f in gone], dtype=np.int64),
                    sign=-1,
                )
        # reasons in the suite's order
        order = {k: j for j, k in enumerate(ROW_CHECKS)}
        reasons = {i: dict(sorted(r.items(), key=lambda kv: order[kv[0]])) for i, r in reasons.items()}
        features = dict(s.features)
        features.update(
            row_key=np.asarray(row_keys, dtype=np.int64),
            duplicate=duplicate,
            leaked=leaked,
            quarantined=quarantined,
            accepted=(~quarantined).astype(np.int64),
        )
        return ChunkResult(lines, features, reasons)


def _mask(n: int, rows: dict[int, Any]) -> Any:
    import numpy as np

    m = np.zeros(n, dtype=bool)
    if rows:
        m[list(rows)] = True
    return m


def _nullable(values: Any, valid: Any) -> Any:
    """A float column that is NaN (missing to GE) where the row's schema is invalid; float,
    not pandas' nullable Int64, because GE maps Int64 columns in Python row by row."""
    import numpy as np

    return np.where(valid, values, np.nan)


def _length_reason(pt: int, ct: int, lb: LengthCheck) -> str:
    out = []
    for name, count, b in (("prompt", pt, lb.prompt_tokens), ("completion", ct, lb.completion_tokens)):
        if count < b.min:
            out.append(f"{name} has {count} tokens < min {b.min}")
        elif b.max is not None and count > b.max:
            out.append(f"{name} has {count} tokens > max {b.max}")
    return "; ".join(out)
