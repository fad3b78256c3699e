"""Declarative evaluation suites (eval_suites/*.yaml) and the release gates they define.

Scores come only from the model's own outputs on the suite's cases: a `generate` callable
(prompts -> completions) is passed in, so the same suite scores an eager PyTorch model, the
champion, the base model, or a colour behind the gateway.

A case's prompt is a string or a list of chat messages; `run_suite` hands it to `generate`
as is, and `tuneship.generate.generate` renders message lists with the tokenizer's chat
template (`tuneship.generate.render_prompt`, the one place, shared with training).

Metric kinds: fields the task's parser reads from an answer (`field_exact_match`,
`parse_rate`); free-text checks (`keywords`: all, or any, of a case's keywords appear;
`must_not_contain`: none of its forbidden strings appear); and refusals, read by the
suite's declared `decline` detector (`declined`: share of should-decline cases that
declined; `wrongly_declined`: share of answerable cases that declined, lower is better,
so a model that declines everything fails).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tuneship import config

SUITES_DIR = config.REPO_ROOT / "eval_suites"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Parse = Callable[[str], dict[str, Any]]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Case(_Strict):
    prompt: str | list[Message]
    expected: dict[str, str] = {}  # fields the parser must read from the answer
    keywords: list[str] = []  # `keywords` metrics: these must appear (case-insensitive)
    forbidden: list[str] = []  # `must_not_contain` metrics: none of these may appear
    should_decline: bool = False  # out of scope: the model should decline it

    @field_validator("prompt")
    @classmethod
    def _chat_prompt_ends_on_user(cls, v: str | list[Message]) -> str | list[Message]:
        if isinstance(v, list) and (not v or v[-1].role != "user"):
            raise ValueError("a chat prompt is a list of messages ending with a `user` message")
        return v

    def prompt_input(self) -> str | list[dict[str, str]]:
        """What `generate` receives: the text, or the messages as plain dicts."""
        return self.prompt if isinstance(self.prompt, str) else [m.model_dump() for m in self.prompt]


class Cases(_Strict):
    source: Literal["dataset_eval_split", "inline"]
    limit: int | None = Field(default=None, gt=0)
    items: list[Case] = []

    @model_validator(mode="after")
    def _inline_has_items(self) -> Cases:
        if self.source == "inline" and not self.items:
            raise ValueError("cases.items must list at least one case when cases.source is 'inline'")
        return self


PARSED_KINDS = frozenset({"field_exact_match", "parse_rate"})
DECLINE_KINDS = frozenset({"declined", "wrongly_declined"})


class Metric(_Strict):
    name: str
    kind: Literal["field_exact_match", "parse_rate", "keywords", "must_not_contain", "declined", "wrongly_declined"]
    field: str | None = None  # field_exact_match: the parsed field compared
    match: Literal["all", "any"] = "all"  # keywords: every keyword, or at least one
    forbidden: list[str] = []  # must_not_contain: checked in every case, besides the case's own

    @model_validator(mode="after")
    def _options_fit_kind(self) -> Metric:
        if self.kind == "field_exact_match" and not self.field:
            raise ValueError(f"metric {self.name!r}: kind field_exact_match needs `field`")
        if self.field and self.kind != "field_exact_match":
            raise ValueError(f"metric {self.name!r}: `field` is for kind field_exact_match, not {self.kind}")
        if self.match != "all" and self.kind != "keywords":
            raise ValueError(f"metric {self.name!r}: `match` is for kind keywords, not {self.kind}")
        if self.forbidden and self.kind != "must_not_contain":
            raise ValueError(f"metric {self.name!r}: `forbidden` is for kind must_not_contain, not {self.kind}")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "wrongly_declined"

    def applies(self, case: Case) -> bool:
        """Whether `case` counts towards this metric (its denominator)."""
        if self.kind == "keywords":
            return bool(case.keywords)
        if self.kind == "must_not_contain":
            return bool(self.forbidden or case.forbidden)
        if self.kind == "declined":
            return case.should_decline
        if self.kind == "wrongly_declined":
            return not case.should_decline
        return True


class Decline(_Strict):
    """How a refusal is recognised: any of `phrases` (case-insensitive substrings) or `regex`
    (Python, searched case-insensitively)."""

    phrases: list[str] = []
    regex: str | None = None
    _compiled: re.Pattern[str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_detector(self) -> Decline:
        if not self.phrases and not self.regex:
            raise ValueError("decline needs `phrases` (a list of strings) or `regex`")
        if any(not p.strip() for p in self.phrases):
            raise ValueError("decline.phrases must not hold an empty string (it would match every answer)")
        if self.regex:
            try:
                self._compiled = re.compile(self.regex, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"decline.regex {self.regex!r} is not a valid regular expression: {exc}") from None
        return self

    def declined(self, text: str) -> bool:
        low = (text or "").lower()
        return any(p.lower() in low for p in self.phrases) or bool(self._compiled and self._compiled.search(text or ""))


class Gate(_Strict):
    metric: str
    min: float | None = None  # floor, for metrics where higher is better
    max: float | None = None  # ceiling, for metrics where lower is better (wrongly_declined)
    max_regression: float | None = Field(default=None, ge=0)  # against the reference, either direction

    @model_validator(mode="after")
    def _one_rule(self) -> Gate:
        if sum(r is not None for r in (self.min, self.max, self.max_regression)) != 1:
            raise ValueError(f"gate on {self.metric!r}: give exactly one of `min`, `max` or `max_regression`")
        return self


class Generation(_Strict):
    max_new_tokens: int = Field(default=16, gt=0, le=512)


class Suite(_Strict):
    name: str
    version: int
    description: str = ""
    parser: str | None = None  # module:function; a task's suites use the task's own parser
    decline: Decline | None = None  # how a refusal reads; needed by the declined metric kinds
    generation: Generation = Generation()
    cases: Cases
    metrics: list[Metric]
    gates: list[Gate] = []

    @model_validator(mode="after")
    def _gates_name_metrics(self) -> Suite:
        by_name = {m.name: m for m in self.metrics}
        for i, gate in enumerate(self.gates):
            metric = by_name.get(gate.metric)
            if metric is None:
                raise ValueError(f"gates.{i}: gate names unknown metric {gate.metric!r}; metrics are {sorted(by_name)}")
            if metric.higher_is_better and gate.max is not None:
                raise ValueError(f"gates.{i} on {gate.metric!r}: higher is better for kind {metric.kind}; "
                                 "use `min` (a floor), not `max`")
            if not metric.higher_is_better and gate.min is not None:
                raise ValueError(f"gates.{i} on {gate.metric!r}: lower is better for kind {metric.kind}; "
                                 "use `max` (a ceiling), not `min`")
        return self

    @model_validator(mode="after")
    def _metrics_can_be_scored(self) -> Suite:
        for i, m in enumerate(self.metrics):
            if m.kind in DECLINE_KINDS and self.decline is None:
                raise ValueError(f"metrics.{i} ({m.name!r}): kind {m.kind} needs the suite's `decline` detector "
                                 "(`decline: {phrases: [...]}` or `decline: {regex: ...}`)")
        if self.cases.source == "inline":
            for i, case in enumerate(self.cases.items):
                if case.should_decline and self.decline is None:
                    raise ValueError(f"cases.items.{i}.should_decline needs the suite's `decline` detector")
            for i, m in enumerate(self.metrics):
                if not any(m.applies(c) for c in self.cases.items):
                    raise ValueError(f"metrics.{i} ({m.name!r}): {_no_cases(m)}")
        return self

    def needs_parser(self) -> bool:
        return any(m.kind in PARSED_KINDS for m in self.metrics)

    def parse_fn(self, parse: Parse | None = None) -> Parse:
        """The parser to score with: the caller's (the task's), else the suite's own."""
        if parse is not None:
            return parse
        if not self.parser:
            raise SuiteError(f"eval suite {self.name!r} has no `parser`: score it with a task's parser")
        module, _, attr = self.parser.partition(":")
        return getattr(importlib.import_module(module), attr)

    def _parser_if_any(self, parse: Parse | None) -> Parse | None:
        """A parser when one is given or needed (a keyword-only suite scores without one)."""
        return self.parse_fn(parse) if (parse or self.parser or self.needs_parser()) else None


def _no_cases(m: Metric) -> str:
    what = {"keywords": "no case lists `keywords`",
            "must_not_contain": "no case lists `forbidden` and the metric lists none",
            "declined": "no case has `should_decline: true`",
            "wrongly_declined": "every case has `should_decline: true`"}.get(m.kind, "there are no cases")
    return f"kind {m.kind} has nothing to score: {what}"


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file and the field."""


def load_suite(name_or_path: str | Path) -> Suite:
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise SuiteError(f"{path}: no such eval suite (suites live in {SUITES_DIR})")
    try:
        raw = yaml.safe_load(path.read_text())
        return Suite.model_validate(raw)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(  # suite-wide checks name their own field (`metrics.2 ...`)
            ".".join(str(p) for p in err["loc"]) + ": " * bool(err["loc"]) + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise SuiteError(f"{path}: {problems}") from exc


def load_cases(suite: Suite, dataset_dir: Path | None = None, parse: Parse | None = None) -> list[Case]:
    """The suite's cases. Dataset-split cases take their expectations from the reference
    answer: `expected` = the fields `parse` reads from it, `should_decline` = whether the
    suite's decline detector fires on it. Rows are prompt/completion or chat `messages`
    (the prompt is every message before the final assistant answer)."""
    if suite.cases.source == "inline":
        cases = list(suite.cases.items)
    else:
        if dataset_dir is None:
            raise SuiteError(f"suite {suite.name!r} reads the dataset eval split: pass dataset_dir")
        parser = suite._parser_if_any(parse)
        path = Path(dataset_dir) / "eval.jsonl"
        cases = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                prompt, reference = _prompt_and_reference(json.loads(line), path, lineno)
                parsed = parser(reference) if parser else {}
                cases.append(Case(prompt=prompt, expected={k: v for k, v in parsed.items() if v is not None},
                                  should_decline=bool(suite.decline and suite.decline.declined(reference))))
    return cases[: suite.cases.limit] if suite.cases.limit else cases


def _prompt_and_reference(row: Any, path: Path, lineno: int) -> tuple[Any, str]:
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise SuiteError(f"{path}:{lineno}: a chat row's `messages` must end with the assistant's "
                             "reference answer after at least one user message")
        return msgs[:-1], str(msgs[-1].get("content", ""))
    if isinstance(row, dict) and {"prompt", "completion"} <= row.keys():
        return row["prompt"], str(row["completion"])
    raise SuiteError(f"{path}:{lineno}: row needs `prompt` + `completion` or chat `messages`")


@dataclass
class SuiteResult:
    suite: str
    version: int
    metrics: dict[str, float]
    n_cases: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(suite: Suite, cases: Sequence[Case], completions: Sequence[str], parse: Parse | None = None) -> SuiteResult:
    if len(cases) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(cases)} cases")
    parser = suite._parser_if_any(parse)
    parsed = [parser(c) for c in completions] if parser else [{} for _ in completions]
    declined = [suite.decline.declined(c) for c in completions] if suite.decline else [False] * len(completions)
    metrics = {m.name: _metric(suite, m, cases, completions, parsed, declined) for m in suite.metrics}
    samples = []
    for c, out, p, d in list(zip(cases, completions, parsed, declined, strict=True))[:8]:
        sample = {"prompt": c.prompt_input(), "expected": c.expected, "completion": out, "parsed": p}
        if suite.decline:
            sample.update(should_decline=c.should_decline, declined=d)
        samples.append(sample)
    return SuiteResult(suite.name, suite.version, metrics, len(cases), samples)


def _contains(text: str, needle: str) -> bool:
    return needle.lower() in text.lower()


def _metric(suite: Suite, m: Metric, cases: Sequence[Case], completions: Sequence[str],
            parsed: Sequence[dict[str, Any]], declined: Sequence[bool]) -> float:
    """One metric: the share of the cases it applies to that pass it."""
    if m.kind in PARSED_KINDS:  # every case counts (as before: 0.0 with no cases)
        if m.kind == "parse_rate":
            hits = [all(v is not None for v in p.values()) for p in parsed]
        else:
            hits = [p.get(m.field) == c.expected.get(m.field) for p, c in zip(parsed, cases, strict=True)]
        return sum(hits) / max(len(cases), 1)
    hits = []
    for case, out, dec in zip(cases, completions, declined, strict=True):
        if not m.applies(case):
            continue
        if m.kind == "keywords":
            found = [_contains(out, k) for k in case.keywords]
            hits.append(all(found) if m.match == "all" else any(found))
        elif m.kind == "must_not_contain":
            hits.append(not any(_contains(out, f) for f in [*m.forbidden, *case.forbidden]))
        else:  # declined: should-decline cases that declined; wrongly_declined: answerable ones that did
            hits.append(dec)
    if not hits:
        raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: metric {m.name!r}: {_no_cases(m)} "
                         f"among the {len(cases)} cases scored")
    return sum(hits) / len(hits)


def run_suite(suite: Suite, generate: Callable[[list[Any], int], list[str]], cases: Sequence[Case],
              parse: Parse | None = None) -> SuiteResult:
    """Generate for every case (a prompt string, or chat messages as dicts) and score."""
    completions = generate([c.prompt_input() for c in cases], suite.generation.max_new_tokens)
    return score(suite, cases, completions, parse)


@dataclass
class GateResult:
    metric: str
    rule: str
    value: float
    threshold: float
    reference: float | None
    passed: bool


@dataclass
class GateReport:
    passed: bool
    reference_name: str | None
    gates: list[GateResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = []
        for g in self.gates:
            # a regression gate's threshold is the reference's score less (or, where lower is
            # better, plus) the tolerance
            op = g.rule.split()[0]
            how = "" if g.reference is None else (
                f" (reference {g.reference:.3f} - {g.reference - g.threshold:.3f})" if op == ">=" else
                f" (reference {g.reference:.3f} + {g.threshold - g.reference:.3f})")
            lines.append(f"{'PASS' if g.passed else 'FAIL'} {g.metric} {op} {g.threshold:.3f}{how}: {g.value:.3f}")
        return "\n".join(lines)


def apply_gates(suite: Suite, candidate: SuiteResult, reference: SuiteResult | None,
                reference_name: str | None = None) -> GateReport:
    """Absolute floors, and `max_regression` gates against the reference scored on the same
    cases. A regression gate with no reference is a suite that cannot be judged (a smoke
    suite has no reference model): it is refused, never silently passed."""
    results = []
    higher = {m.name: m.higher_is_better for m in suite.metrics}
    for gate in suite.gates:
        value = candidate.metrics[gate.metric]
        if gate.min is not None:
            results.append(GateResult(gate.metric, ">=", value, gate.min, None, value >= gate.min))
        elif gate.max is not None:
            results.append(GateResult(gate.metric, "<=", value, gate.max, None, value <= gate.max))
        elif reference is None:
            raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: the gate on {gate.metric!r} is "
                             f"`max_regression`, but no reference model is scored here; use `min` instead")
        else:
            ref = reference.metrics[gate.metric]
            if higher[gate.metric]:
                floor = ref - float(gate.max_regression or 0)
                results.append(GateResult(gate.metric, ">= ref -", value, floor, ref, value >= floor - 1e-12))
            else:
                ceiling = ref + float(gate.max_regression or 0)
                results.append(GateResult(gate.metric, "<= ref +", value, ceiling, ref, value <= ceiling + 1e-12))
    return GateReport(all(r.passed for r in results), reference_name, results)
