"""Declarative evaluation suites (eval_suites/*.yaml) and the release gates they define.

Scores come only from the model's own outputs on the suite's cases: a `generate` callable
(prompts -> completions) is passed in, so the same suite scores an eager PyTorch model, the
champion, the base model, or a colour behind the gateway.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneship import config

SUITES_DIR = config.REPO_ROOT / "eval_suites"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Case(_Strict):
    prompt: str
    expected: dict[str, str]


class Cases(_Strict):
    source: Literal["dataset_eval_split", "inline"]
    limit: int | None = Field(default=None, gt=0)
    items: list[Case] = []

    @model_validator(mode="after")
    def _inline_has_items(self) -> Cases:
        if self.source == "inline" and not self.items:
            raise ValueError("cases.items must list at least one case when cases.source is 'inline'")
        return self


class Metric(_Strict):
    name: str
    kind: Literal["field_exact_match", "parse_rate"]
    field: str | None = None

    @model_validator(mode="after")
    def _field_needed(self) -> Metric:
        if self.kind == "field_exact_match" and not self.field:
            raise ValueError(f"metric {self.name!r}: kind field_exact_match needs `field`")
        return self


class Gate(_Strict):
    metric: str
    min: float | None = None
    max_regression: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_rule(self) -> Gate:
        if (self.min is None) == (self.max_regression is None):
            raise ValueError(f"gate on {self.metric!r}: give exactly one of `min` or `max_regression`")
        return self


class Generation(_Strict):
    max_new_tokens: int = Field(default=16, gt=0, le=512)


class Suite(_Strict):
    name: str
    version: int
    description: str = ""
    parser: str | None = None  # module:function; a task's suites use the task's own parser
    generation: Generation = Generation()
    cases: Cases
    metrics: list[Metric]
    gates: list[Gate] = []

    @model_validator(mode="after")
    def _gates_name_metrics(self) -> Suite:
        names = {m.name for m in self.metrics}
        for gate in self.gates:
            if gate.metric not in names:
                raise ValueError(f"gate names unknown metric {gate.metric!r}; metrics are {sorted(names)}")
        return self

    def parse_fn(self, parse: Callable[[str], dict[str, Any]] | None = None) -> Callable[[str], dict[str, Any]]:
        """The parser to score with: the caller's (the task's), else the suite's own."""
        if parse is not None:
            return parse
        if not self.parser:
            raise SuiteError(f"eval suite {self.name!r} has no `parser`: score it with a task's parser")
        module, _, attr = self.parser.partition(":")
        return getattr(importlib.import_module(module), attr)


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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        )
        raise SuiteError(f"{path}: {problems}") from exc


def load_cases(suite: Suite, dataset_dir: Path | None = None,
               parse: Callable[[str], dict[str, Any]] | None = None) -> list[Case]:
    if suite.cases.source == "inline":
        cases = list(suite.cases.items)
    else:
        if dataset_dir is None:
            raise SuiteError(f"suite {suite.name!r} reads the dataset eval split: pass dataset_dir")
        parse = suite.parse_fn(parse)
        cases = []
        with open(Path(dataset_dir) / "eval.jsonl", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                expected = {k: v for k, v in parse(row["completion"]).items() if v is not None}
                cases.append(Case(prompt=row["prompt"], expected=expected))
    return cases[: suite.cases.limit] if suite.cases.limit else cases


@dataclass
class SuiteResult:
    suite: str
    version: int
    metrics: dict[str, float]
    n_cases: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(suite: Suite, cases: Sequence[Case], completions: Sequence[str],
          parse: Callable[[str], dict[str, Any]] | None = None) -> SuiteResult:
    if len(cases) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(cases)} cases")
    parse = suite.parse_fn(parse)
    parsed = [parse(c) for c in completions]
    metrics: dict[str, float] = {}
    n = max(len(cases), 1)
    for m in suite.metrics:
        if m.kind == "parse_rate":
            metrics[m.name] = sum(all(v is not None for v in p.values()) for p in parsed) / n
        else:
            metrics[m.name] = sum(
                p.get(m.field) == c.expected.get(m.field) for p, c in zip(parsed, cases, strict=True)
            ) / n
    samples = [
        {"prompt": c.prompt, "expected": c.expected, "completion": out, "parsed": p}
        for c, out, p in list(zip(cases, completions, parsed, strict=True))[:8]
    ]
    return SuiteResult(suite.name, suite.version, metrics, len(cases), samples)


def run_suite(suite: Suite, generate: Callable[[list[str], int], list[str]], cases: Sequence[Case],
              parse: Callable[[str], dict[str, Any]] | None = None) -> SuiteResult:
    completions = generate([c.prompt for c in cases], suite.generation.max_new_tokens)
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
            # a regression gate's threshold is the reference's score less the tolerance
            how = "" if g.reference is None else f" (reference {g.reference:.3f} - {g.reference - g.threshold:.3f})"
            lines.append(f"{'PASS' if g.passed else 'FAIL'} {g.metric} >= {g.threshold:.3f}{how}: {g.value:.3f}")
        return "\n".join(lines)


def apply_gates(suite: Suite, candidate: SuiteResult, reference: SuiteResult | None,
                reference_name: str | None = None) -> GateReport:
    """Absolute floors, and `max_regression` gates against the reference scored on the same
    cases. A regression gate with no reference is a suite that cannot be judged (a smoke
    suite has no reference model): it is refused, never silently passed."""
    results = []
    for gate in suite.gates:
        value = candidate.metrics[gate.metric]
        if gate.min is not None:
            results.append(GateResult(gate.metric, ">=", value, gate.min, None, value >= gate.min))
        elif reference is None:
            raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: the gate on {gate.metric!r} is "
                             f"`max_regression`, but no reference model is scored here; use `min` instead")
        else:
            ref = reference.metrics[gate.metric]
            floor = ref - float(gate.max_regression or 0)
            results.append(GateResult(gate.metric, ">= ref -", value, floor, ref, value >= floor - 1e-12))
    return GateReport(all(r.passed for r in results), reference_name, results)
