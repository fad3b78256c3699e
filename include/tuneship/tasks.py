"""Task files: what a team ships, declared in YAML (`include/tasks/<name>.yaml`), not coded.

A task names everything the loop needs to know about one model a team ships: the registered
and served names, the base model and recipe, the prompt format, where its data lands, how its
answers are parsed and checked, its eval suites, release thresholds and drift settings. The
library never names a task; the stages take a `Task` and ask it.

Functions a task refers to (`module:function`) are looked up in a module beside the task file
first (`include/tasks/<name>_task.py` for `<name>_task:parse_answer`), then as an importable
module, so a user's task in its own directory needs no change to the library.

A bad task file fails when it is loaded (DAG parse, `tuneship tasks check`, pre-commit) with
the file and the key named, never half-way through a release.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from functools import cached_property
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

SCHEMA_VERSION = 1
COLOURS = ("blue", "green")  # each task's two Triton colours
TASKS_DIR = config.REPO_ROOT / "include" / "tasks"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
SERVED_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
REF_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    landing: str = Field(min_length=1, description="under TUNESHIP_HOME/incoming/, or an absolute path / URI")
    min_conforming: float = Field(default=0.95, ge=0.0, le=1.0,
                                  description="share of a batch's answers that must pass the answer check")


class AnswerSpec(_Strict):
    parser: str = Field(pattern=REF_PATTERN, description="module:function, answer text -> dict of fields")
    fields: list[str] = Field(min_length=1)
    check: str = Field(pattern=REF_PATTERN, description="module:function, answer text -> bool: does an "
                       "answer have the task's shape? (the data gate and the shadow's format rate)")


class EvalSpec(_Strict):
    suites: list[str] = Field(min_length=1, description="gating suites: eval_suites/<name>.yaml, or a YAML "
                                                        "path relative to the task file")
    smoke: str = Field(min_length=1, description="inline suite sent through the gateway before traffic moves")


class CompileSpec(_Strict):
    """How the candidate is compiled for serving (`tuneship.compile`). fp32 must reproduce eager
    PyTorch token for token; int8 and int4 (weight-only quantization) must pass the task's own
    gates against the unquantized candidate, on the same cases (`stages.quantization_gate`)."""

    precision: Literal["fp32", "int8", "int4"] = Field(
        default="fp32", description="fp32 (parity with eager), or int8 / int4 (quantized, gated on quality)")
    block_size: Literal[16, 32, 64, 128, 256] | None = Field(
        default=None, description="int8/int4: weights quantized in blocks of this many (builder default 32)")
    accuracy_level: Literal[1, 2, 3, 4] | None = Field(
        default=None, description="int8/int4: activations' precision in the quantized MatMuls: 1 fp32, 2 fp16, "
                                  "3 bf16, 4 int8 (builder default on CPU: 4)")
    algorithm: Literal["default", "rtn", "k_quant"] | None = Field(
        default=None, description="int8/int4: how weights are rounded: the builder's default (round to nearest), "
                                  "rtn, or k_quant (llama.cpp's k-quants)")
    int8_layers: list[Literal["last_matmul", "mixed_layers"]] = Field(
        default_factory=list, description="int4: MatMul groups kept at int8: last_matmul (the output head), "
                                          "mixed_layers (llama.cpp's most quantization-sensitive layers)")
    parity_prompts: list[str] = Field(default_factory=list,
                                      description="prompts the compiled model must reproduce (empty: the smoke suite's)")

    @model_validator(mode="after")
    def _quantization_options_need_quantization(self) -> CompileSpec:
        if self.precision == "fp32" and (self.block_size is not None or self.accuracy_level is not None
                                         or self.algorithm is not None):
            raise ValueError("compile.block_size, compile.accuracy_level and compile.algorithm are for precision "
                             "int8 or int4, not fp32")
        if self.precision == "int8" and self.accuracy_level == 1:
            raise ValueError("compile.accuracy_level 1 with precision int8 runs 8-bit weights with fp32 activations, "
                             "which ONNX Runtime has no fast CPU kernel for (measured 0.18x eager PyTorch, README "
                             "Figures): leave accuracy_level out (4, int8 activations) or use fp32")
        if self.int8_layers and self.precision != "int4":
            raise ValueError("compile.int8_layers keeps parts of an int4 build at int8: it needs precision int4")
        return self

    def builder_options(self) -> dict[str, str]:
        """The model builder's extra options besides block size and accuracy level."""
        options = {"algo_config": self.algorithm} if self.algorithm else {}
        if self.int8_layers:
            options["matmul_mixed_precision"] = ",".join(f"{group}:int8" for group in self.int8_layers)
        return options


class ReleaseSpec(_Strict):
    """The shadow window and post-switch guard (`tuneship.shadow`): thresholds each metric's
    anytime-valid confidence sequence is held to, and the decision rule."""

    shadow_hours: float = Field(default=72.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p95_ms: float = Field(default=2000.0, gt=0)
    min_requests: int = Field(default=20, ge=1, description="candidate answers before an early promote, and at "
                              "the window's end before any promote")
    min_format_rate: float = Field(default=0.9, ge=0, le=1)
    alpha: float = Field(default=0.05, gt=0, le=0.2, description="chance of any wrong decision over the whole "
                         "window however often it is polled (split over the metrics)")
    min_seconds: float = Field(default=3600.0, ge=0, description="seconds of shadow before an early promote "
                               "(a rollback may come any time)")
    on_open: Literal["rollback", "hold", "estimates"] = Field(
        default="hold", description="what the window's end does with a metric still undecided: roll back, hold "
        "the release for a person (not promoted, live untouched), or judge it by its point estimate (one "
        "fixed-horizon look, said so in the verdict)")
    max_format_drop: float | None = Field(default=0.05, ge=0, le=1, description="candidate format rate minus "
                                          "live's on the same requests, at least -this (empty: not gated)")
    max_refusal_increase: float | None = Field(default=0.05, ge=0, le=1, description="candidate refusal rate "
                                               "minus live's on the same requests (the suites' declared "
                                               "detector), at most this (empty: not gated)")
    max_p95_ratio: float | None = Field(default=None, gt=1, description="candidate p95 / live p95 on the same "
                                        "requests, at most this (empty: not gated; the serving gate measures it "
                                        "before the shadow)")
    min_answer_similarity: float | None = Field(default=None, ge=0, le=1, description="mean cosine similarity "
                                                "(all-MiniLM-L6-v2) of the candidate's answers to live's on the "
                                                "same requests, at least this (empty: reported only). For a "
                                                "candidate that should answer as live does: a rebuild, a retrain "
                                                "on the same data")
    strategy: Literal["shadow", "canary", "shadow_then_canary"] = Field(
        default="shadow", description="shadow: the candidate answers copies of live traffic, then takes it all; "
        "canary: it answers a growing share of live traffic itself (canary_steps); shadow_then_canary: both")
    canary_steps: list[int] = Field(default_factory=lambda: [1, 5, 25, 50, 100], min_length=1,
                                    description="percent of live traffic the candidate answers, step by step")
    canary_bake_minutes: float = Field(default=60.0, gt=0, description="how long each step runs before the next")
    min_task_success: float | None = Field(default=None, ge=0, le=1, description="users' task success on the "
                                           "canary's answers (POST /v1/feedback), at least this (empty: reported "
                                           "only)")

    @model_validator(mode="after")
    def _steps_rise_to_all(self) -> ReleaseSpec:
        steps = self.canary_steps
        if any(not 1 <= w <= 100 for w in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)) \
                or steps[-1] != 100:
            raise ValueError(f"canary_steps must rise strictly within 1-100 and end at 100, got {steps}")
        return self


class ServingSpec(_Strict):
    """The serving gate (`tuneship.serving_gate`, in llm_release after smoke): the candidate's
    compiled artifact in Triton against the live colour, on the same requests, in the same run."""

    requests: int = Field(default=30, ge=20, le=2000,
                          description="eval-split prompts sent to each model, one at a time (20 at least: the p95 "
                                      "of fewer is their maximum)")
    max_rounds: int = Field(default=3, ge=1, le=10,
                            description="rounds of `requests` while a gate is undecided (each look at "
                                        "1 - 0.05 / max_rounds, Bonferroni)")
    max_new_tokens: int | None = Field(default=None, gt=0, le=512,
                                       description="tokens a request may generate (empty: the first gate suite's)")
    price_per_hour: float | None = Field(default=None, gt=0,
                                         description="USD an hour of the instance serving the task: gives cost per "
                                                     "1k generated tokens")
    max_p95_ratio: float | None = Field(default=1.5, gt=1, description="candidate p95 / live p95, upper bound")
    min_tokens_per_s_ratio: float | None = Field(default=0.67, gt=0, lt=1,
                                                 description="candidate tokens/s / live tokens/s, lower bound")
    max_memory_ratio: float | None = Field(default=None, gt=1,
                                           description="candidate peak memory / live peak memory (needs Triton's "
                                                       "processes on this host)")
    max_memory_mb: float | None = Field(default=None, gt=0, description="peak resident memory of the candidate's "
                                                                        "Triton processes (this host's Triton)")
    max_cost_per_1k_tokens: float | None = Field(default=None, gt=0,
                                                 description="USD per 1k generated tokens, upper bound (needs "
                                                             "price_per_hour)")

    @model_validator(mode="after")
    def _cost_needs_price(self) -> ServingSpec:
        if self.max_cost_per_1k_tokens is not None and self.price_per_hour is None:
            raise ValueError("max_cost_per_1k_tokens needs price_per_hour (the instance's USD an hour)")
        return self


class RetrainSpec(_Strict):
    """How a drift retrain trains (the recipe otherwise; the fine-tune form's values win)."""

    warm_start: bool = Field(default=False, description="start from the champion's adapter instead of a fresh "
                             "LoRA (same base model and LoRA shape; else a fresh start)")
    max_steps: int | None = Field(default=None, gt=0, description="steps of a warm-started retrain")
    learning_rate: float | None = Field(default=None, gt=0, description="learning rate of a warm-started retrain")

    def overrides(self) -> dict[str, Any]:
        """The recipe keys a warm-started retrain sets (those given here)."""
        return {k: v for k, v in (("max_steps", self.max_steps), ("learning_rate", self.learning_rate))
                if v is not None}


class DriftTestsSpec(_Strict):
    """Two-sample tests beside the profile score (`tuneship.drift`): one family, one correction."""

    embedding: bool = Field(default=True, description="MMD permutation test on all-MiniLM-L6-v2 embeddings of a "
                            "sample of recent prompts against a sample of the champion's training prompts")
    outputs: bool = Field(default=True, description="the champion's recent answers against its own answers in its "
                          "first window after promotion: length, format failures, refusals, parsed labels")
    calibration: bool = Field(default=True, description="the champion's confidence against users' task-success "
                              "feedback, recent window vs its first window after promotion (Welch t on "
                              "confidence - success); tested where each side has min_calibration_pairs")
    min_calibration_pairs: int = Field(default=20, ge=5, description="answers with a confidence and feedback a "
                                       "side before calibration is tested")
    sample_size: int = Field(default=256, ge=20, le=4096, description="prompts embedded a side")
    permutations: int = Field(default=500, ge=99, le=10000)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    method: Literal["holm", "bh"] = Field(default="holm", description="holm: family-wise error; bh: false "
                                          "discovery rate")
    min_effect: dict[str, float] = Field(default_factory=dict, description="per feature, the smallest effect "
                                         "that counts as drift (a large sample makes a harmless shift significant)")


class DriftSpec(_Strict):
    """llm_drift_monitor's check and the retrain governor (`tuneship.monitor.governor_decide`)."""

    window_hours: float = Field(default=1.0, gt=0)
    threshold: float = Field(default=0.2, gt=0)
    min_requests: int = Field(default=50, ge=1)
    debounce: int = Field(default=2, ge=1)
    cooldown_hours: float = Field(default=24.0, ge=0)
    clear_checks: int = Field(default=1, ge=1, description="hysteresis: clear checks in a row before a drift may "
                              "fire another retrain")
    open_retrain_timeout_hours: float = Field(default=24.0, gt=0, description="one open retrain per task: open "
                                              "until a newer version is registered, or this long")
    gpu_hours_per_week: float | None = Field(default=None, gt=0, description="budget of drift retrains over the "
                                             "last 7 days (empty: none)")
    gpus_per_retrain: int = Field(default=1, ge=1, description="GPUs a retrain holds: its cost is the champion's "
                                  "measured training time times this")
    tests: DriftTestsSpec = DriftTestsSpec()
    retrain: RetrainSpec = RetrainSpec()

    def governor_rules(self, *, debounce: int, cooldown_hours: float, retrain_gpu_hours: float | None) -> Any:
        from tuneship.monitor import GovernorRules

        return GovernorRules(debounce=debounce, cooldown_s=cooldown_hours * 3600, clear_checks=self.clear_checks,
                             open_timeout_s=self.open_retrain_timeout_hours * 3600,
                             budget_gpu_hours=self.gpu_hours_per_week, retrain_gpu_hours=retrain_gpu_hours)


class ApprovalSpec(_Strict):
    """When a release waits for a person before the switch (Airflow's human-in-the-loop
    request, answered in its UI or REST API), and what a timeout does (`tuneship.approval`)."""

    when: list[Literal["always", "changed", "inconclusive"]] = Field(
        default_factory=list, description="always; changed: something in `changes` differs from the champion's; "
        "inconclusive: the shadow or canary ended undecided (`release.on_open: hold`). Empty: never, except "
        "for gates a suite holds (`statistics.on_inconclusive: hold`), which always ask")
    changes: list[Literal["dataset_schema", "dataset_source", "hyperparameters", "base_model"]] = Field(
        default_factory=lambda: ["dataset_schema", "dataset_source", "hyperparameters", "base_model"],
        description="what counts as changed against the champion (the checklist's: the dataset's schema or "
        "source, the recipe's hyperparameters, the base model)")
    timeout_hours: float | None = Field(default=24.0, gt=0, description="how long the request waits; empty: "
                                        "for ever")
    on_timeout: Literal["rollback", "wait"] = Field(default="rollback", description="rollback: no answer is a "
                                                    "refusal (live untouched); wait: keep waiting")


class CardSpec(_Strict):
    """What the task's model cards say it is for: declared once here, printed on every card."""

    intended_use: str = Field(min_length=1, description="who uses it for what, in a sentence or two")
    limits: list[str] = Field(default_factory=list, description="known limits and uses it is not for")


class DemoSpec(_Strict):
    """What the embedded demo (and the tests) need to make this task's data and traffic."""

    generator: str = Field(pattern=REF_PATTERN, description="(out_dir, n_train, n_eval, seed) -> paths")
    traffic: str = Field(pattern=REF_PATTERN, description="(n, seed, drift) -> prompts")
    pretrain_corpus: str | None = Field(default=None, pattern=REF_PATTERN,
                                        description="(n, seed) -> documents: pre-trains the tiny test model")
    vocab: list[str] = Field(default_factory=list, description="answer strings the tiny model's tokenizer keeps whole")
    cycles: list[Literal["data", "drift"]] = Field(
        default_factory=list, description="what `make demo` runs for this task: `data` (new data -> release), "
                                          "`drift` (drifted traffic -> retrain -> release); empty: not in the demo")


class Task(_Strict):
    """One task file, validated. `path` is where it was read from."""

    schema_version: int = Field(ge=1, le=SCHEMA_VERSION)
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    registered_model: str = Field(min_length=1, max_length=200)
    served_model: str = Field(pattern=SERVED_PATTERN)
    base_model: str = Field(min_length=1)
    recipe: str = Field(min_length=1)
    prompt_format: Literal["plain", "chat"]
    system_prompt: str | None = None
    data: DataSpec
    answers: AnswerSpec
    eval: EvalSpec
    compile: CompileSpec = CompileSpec()
    release: ReleaseSpec = ReleaseSpec()
    serving: ServingSpec = ServingSpec()
    drift: DriftSpec = DriftSpec()
    approval: ApprovalSpec = ApprovalSpec()
    card: CardSpec | None = None
    demo: DemoSpec | None = None

    _path: Path = PrivateAttr()

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt(cls, v: str | None) -> str | None:
        return v if v is None or v.strip() else None

    # -- where things are ---------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    def colour_model(self, colour: str) -> str:
        """The Triton model that holds this task's `colour` (`<task>_blue`)."""
        return f"{self.name}_{colour}"

    def colour_models(self) -> set[str]:
        return {self.colour_model(c) for c in COLOURS}

    def landing(self) -> Path:
        """Where this task's new training-data batches land."""
        p = Path(self.data.landing)
        return p if p.is_absolute() else config.incoming() / p

    def suite(self, ref: str) -> Any:
        """One of the task's suites: a name under eval_suites/, or a file beside the task."""
        from tuneship.evaluate import load_suite

        if ref.endswith((".yaml", ".yml")):
            p = Path(ref)
            return load_suite(p if p.is_absolute() else self.path.parent / p)
        return load_suite(ref)

    def recipe_path(self) -> Path:
        from tuneship.train.recipe import default_recipe_path

        if self.recipe.endswith((".yaml", ".yml")):
            p = Path(self.recipe)
            return p if p.is_absolute() else self.path.parent / p
        return default_recipe_path(self.recipe)

    # -- the task's functions -----------------------------------------------------------
    def module(self, module_name: str) -> Any:
        """A module beside the task file (loaded once per process), else an importable one."""
        local = self.path.parent / (module_name.replace(".", "/") + ".py")
        if local.is_file():
            key = f"tuneship_task_{self.name}.{module_name}"
            module = sys.modules.get(key)
            if module is None or getattr(module, "__file__", None) != str(local):
                spec = importlib.util.spec_from_file_location(key, local)
                if spec is None or spec.loader is None:
                    raise TaskError(f"{self.path}: cannot import {local}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[key] = module
                spec.loader.exec_module(module)
            return module
        try:
            return importlib.import_module(module_name)
        except ImportError as exc:
            raise TaskError(f"{self.path}: no module {module_name}.py beside the task file "
                            f"and none importable ({exc})") from None

    def resolve(self, ref: str) -> Callable[..., Any]:
        """`module:function`: a module beside the task file first, else an importable one."""
        module_name, _, attr = ref.partition(":")
        fn = getattr(self.module(module_name), attr, None)
        if not callable(fn):
            raise TaskError(f"{self.path}: {ref!r}: {module_name} has no function {attr!r}")
        return fn

    @cached_property
    def parser(self) -> Callable[[str], dict[str, Any]]:
        return self.resolve(self.answers.parser)

    @cached_property
    def _check(self) -> Callable[[str], Any]:
        return self.resolve(self.answers.check)

    def conforms(self, answer: str) -> bool:
        """Does one answer have the task's shape (its declared check)? Called per answer
        (shadow verdicts): the function is looked up once."""
        return bool(self._check(answer))

    def module_file(self, ref: str) -> Path:
        """The file that defines `module:function` (for a process that must load it anew)."""
        module_name = ref.partition(":")[0]
        local = self.path.parent / (module_name.replace(".", "/") + ".py")
        if local.is_file():
            return local
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin:
            raise TaskError(f"{self.path}: {ref!r}: cannot find the file of module {module_name}")
        return Path(spec.origin)

    def render_prompt(self, prompt: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
        """What a client of this task sends for a case's prompt: the text itself (plain), or
        chat messages, a plain string taken as the user's turn and the task's system prompt
        put first when the messages have none."""
        if self.prompt_format == "plain":
            if not isinstance(prompt, str):
                raise TaskError(f"{self.path}: task {self.name} is prompt_format plain, but a case gives chat messages")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages


# ---------------------------------------------------------------------- loading


def task_dirs() -> list[Path]:
    """`include/tasks/`, then any directories in TUNESHIP_TASK_PATH (os.pathsep-separated)."""
    extra = [Path(p) for p in os.environ.get("TUNESHIP_TASK_PATH", "").split(os.pathsep) if p.strip()]
    return [TASKS_DIR, *extra]


def _format(err: ValidationError, source: Path) -> str:
    from tuneship.train.recipe import describe_errors

    return f"{source}: " + describe_errors(err, top="<top>", schema="include/tasks/README.md")


def _check_refs(task: Task) -> None:
    """Every referenced suite, recipe and function must exist, so a typo fails at load time."""
    from tuneship.evaluate import SuiteError

    for suite, key in [*((s, "eval.suites") for s in task.eval.suites), (task.eval.smoke, "eval.smoke")]:
        try:
            loaded = task.suite(suite)
        except SuiteError as exc:
            raise TaskError(f"{task.path}: key '{key}': {exc}") from None
        role = "smoke" if key == "eval.smoke" else "gate"
        if loaded.role != role:
            raise TaskError(f"{task.path}: key '{key}': suite {suite!r} has role {loaded.role!r}; {key} takes "
                            f"{'a smoke suite (`role: smoke`)' if role == 'smoke' else 'gate suites (decided on intervals)'}")
    if not task.recipe_path().is_file():
        raise TaskError(f"{task.path}: key 'recipe': no recipe {task.recipe_path()} (a shipped recipe name "
                        "or a YAML path relative to the task file)")
    refs: dict[str, str] = {"answers.parser": task.answers.parser, "answers.check": task.answers.check}
    if task.demo:
        refs.update({"demo.generator": task.demo.generator, "demo.traffic": task.demo.traffic,
                     "demo.pretrain_corpus": task.demo.pretrain_corpus or ""})
    for key, ref in refs.items():
        if ref:
            try:
                task.resolve(ref)
            except TaskError as exc:
                raise TaskError(f"key '{key}': {exc}") from None


def load_task_file(path: str | os.PathLike[str], *, check_refs: bool = True) -> Task:
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"{p}: no such task file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{p}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise TaskError(f"{p}: top level must be a mapping of keys")
    try:
        task = Task.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(_format(exc, p)) from None
    if task.name != p.stem:
        raise TaskError(f"{p}: key 'name': {task.name!r} must equal the file name ({p.stem!r})")
    task._path = p.resolve()
    if check_refs:
        _check_refs(task)
    return task


def task_files() -> dict[str, Path]:
    """name -> file, over every task directory; a name defined twice is an error."""
    found: dict[str, Path] = {}
    for d in task_dirs():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            if p.stem in found:
                raise TaskError(f"{p}: task {p.stem!r} is already defined in {found[p.stem]}")
            found[p.stem] = p
    return found


def task_names() -> list[str]:
    """Names only (no validation): cheap enough for DAG parse (the trigger form's dropdown)."""
    return sorted(task_files())


def load_tasks() -> dict[str, Task]:
    """Every task, validated, with names that must not clash across tasks."""
    tasks = {name: load_task_file(p) for name, p in task_files().items()}
    for key in ("served_model", "registered_model"):
        seen: dict[str, str] = {}
        for task in tasks.values():
            other = seen.setdefault(getattr(task, key), task.name)
            if other != task.name:
                raise TaskError(f"{task.path}: key '{key}': {getattr(task, key)!r} is already used by "
                                f"task {other!r} ({tasks[other].path}); each task needs its own")
    return tasks


def load_task(name_or_path: str | os.PathLike[str] | None) -> Task:
    """A task by name (any task directory) or by file path. Names are checked against the
    other tasks too, so a clash is found whichever task is loaded."""
    if name_or_path is None or str(name_or_path).strip() == "":
        raise TaskError(f"no task given; choose one of {task_names()}")
    ref = str(name_or_path)
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        return load_task_file(ref)
    files = task_files()
    if ref not in files:
        raise TaskError(f"no task {ref!r}; tasks are {sorted(files)} (files in {', '.join(map(str, task_dirs()))})")
    return load_tasks()[ref]


def default_task() -> str:
    """The task a run takes when neither its Params nor its trigger name one:
    TUNESHIP_DEFAULT_TASK, else the only task; with several, the caller must choose."""
    names = task_names()
    chosen = os.environ.get("TUNESHIP_DEFAULT_TASK") or (names[0] if len(names) == 1 else None)
    if not chosen:
        raise TaskError(f"no task given and there are several ({', '.join(names)}): choose one with the "
                        "`task` Param (or set TUNESHIP_DEFAULT_TASK)")
    return chosen


# ---------------------------------------------------------------------- checks


def tokenizer_problems(task: Task, tokenizer: Any) -> list[str]:
    """What would make the task's prompts differ between training, eval and serving: the
    chat template must render (a generation prompt that is a prefix of the full
    conversation, so the completion is exactly the answer), its special tokens must be single
    tokens, and text must survive encode/decode. Empty: the tokenizer fits the task."""
    problems: list[str] = []
    sample = "Where is my order #12345? It was due on Monday."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True) != sample:
        problems.append(f"text does not survive encode/decode: {sample!r} -> "
                        f"{tokenizer.decode(ids, skip_special_tokens=True)!r}")
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos token: generation could not stop")
    for name in ("bos_token", "eos_token", "pad_token"):
        tok = getattr(tokenizer, name, None)
        if tok and len(tokenizer(tok, add_special_tokens=False)["input_ids"]) != 1:
            problems.append(f"{name} {tok!r} is not a single token")
    if task.prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            return [*problems, "prompt_format is chat but the tokenizer has no chat_template"]
        messages = task.render_prompt("How long does shipping take?")
        assert isinstance(messages, list)
        answer = [{"role": "assistant", "content": "Standard shipping takes 3-5 business days."}]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages + answer, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is the finding
            return [*problems, f"the chat template does not render: {exc}"]
        if not full.startswith(prompt):
            problems.append("the chat template's generation prompt is not a prefix of the rendered conversation: "
                            "training and serving would see different prompts")
        for special in sorted(set(tokenizer.all_special_tokens) & set(_special_like(full))):
            if len(tokenizer(special, add_special_tokens=False)["input_ids"]) != 1:
                problems.append(f"special token {special!r} in the chat template is not a single token")
        rendered_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(rendered_ids, skip_special_tokens=False) != full:
            problems.append("the rendered conversation does not survive encode/decode")
    return problems


def _special_like(text: str) -> list[str]:
    import re

    return re.findall(r"<\|[^|>]{1,40}\|>|</?s>", text)
