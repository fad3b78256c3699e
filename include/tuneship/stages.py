"""The loop's stages as plain functions: what each Airflow task does, minus Airflow.

Every function takes and returns references (paths, version ids, run ids) and is
idempotent for the same inputs, so a retried task never registers a second model version
or trains twice. The DAG files only wire these together. Each stage works for one task
(`tuneship.tasks.Task`): its data, registered model, suites and colours, never another's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship import atomic, config
from tuneship.notify import notify, release_links, release_thread

if TYPE_CHECKING:
    from tuneship.tasks import Task

class StageFailed(RuntimeError):
    """A stage could not do its job; the message is written for the person who reads the alert.
    Retried like any other fault (a lost connection, a half-written output)."""


class Refusal(StageFailed):
    """A gate's decision (dataset rejected, gates failed, smoke failed, shadow rollback,
    post-switch breach): the same bytes would be refused again, so it is never retried and
    alerted exactly once, by the stage that decided. The Airflow layer fails the task
    without a retry (`tuneship_airflow.refusals`)."""


def base_model_for(task: Task, override: str | None = None) -> str:
    """The base model a fine-tune of `task` starts from: the run's override, else
    TUNESHIP_BASE_MODEL (a whole deployment on one local model), else the task's."""
    return override or os.environ.get("TUNESHIP_BASE_MODEL") or task.base_model


# ------------------------------------------------------------------ data


def datasets_root(task: Task) -> Path:
    return config.artifacts() / "tasks" / task.name / "datasets"


def latest_dataset(task: Task) -> dict[str, str] | None:
    root = datasets_root(task)
    pointer = root / "LATEST"
    if not pointer.exists():
        return None
    vid = pointer.read_text().strip()
    return {"task": task.name, "version_id": vid, "path": str(root / vid),
            "manifest_uri": str(root / vid / "manifest.json")}


def incoming_batch(task: Task) -> str | None:
    """The newest batch directory that landed in the task's landing location, if any."""
    root = task.landing()
    batches = [p for p in root.iterdir() if p.is_dir() and any(p.glob("train.*"))] if root.exists() else []
    return str(max(batches, key=lambda p: p.stat().st_mtime)) if batches else None


def batches_to_validate(tasks: list[Task], dataset_uri: str | None, triggering_asset_events: Any, *,
                        run_id: str = "", recent_events: Any = None) -> list[tuple[Task, str]]:
    """What a validation run takes in, as (task, batch) pairs: the `dataset_uri` Param if set
    (for the one task given); else every batch the incoming-data watcher announced for this
    run (`extra.payload`: `task` and `dataset_uri`, in landing order: several landings can
    start one run), with the strays among `recent_events` that no run took
    (`tuneship.event_claims`); nothing when another run took them all; else the newest
    batch in each task's landing location (the nightly run)."""
    from tuneship import event_claims

    by_name = {t.name: t for t in tasks}
    if dataset_uri:
        if len(tasks) != 1:
            raise StageFailed(f"dataset_uri {dataset_uri} needs the task it belongs to: choose one of {sorted(by_name)}")
        return [(tasks[0], dataset_uri)]
    took = event_claims.take("llm_data_validation", triggering_asset_events, recent_events, run_id)
    if took["nothing_left"]:
        return []
    landed: dict[tuple[str, str], None] = {}
    for event in took["events"]:
        payload = event["extra"].get("payload", {})
        if payload.get("dataset_uri") and payload.get("task") in by_name:
            landed[(payload["task"], payload["dataset_uri"])] = None
    if landed:
        return [(by_name[name], uri) for name, uri in landed]
    return [(t, newest) for t in tasks if (newest := incoming_batch(t))]


def validate_batches(task: Task, uris: list[str], *, run_id: str) -> dict[str, Any] | None:
    """Validate and version each batch; the newest newly versioned one (None: nothing new).
    Every batch is validated even when an earlier one is rejected, and the run then fails
    with all the rejections, so none goes unreported."""
    created, rejected = [], []
    for uri in uris:
        try:
            result = validate_and_version(task, uri, run_id=run_id)
        except Refusal as exc:
            rejected.append(str(exc))
            continue
        if result["created"]:
            created.append(result)
    if rejected:
        raise Refusal("\n\n".join(rejected))
    return created[-1] if created else None


def validate_and_version(task: Task, dataset_uri: str, *, run_id: str) -> dict[str, Any]:
    """Validate with Great Expectations and the task's answer check, version what is
    accepted, explain what is not."""
    from tuneship.data import validate_dataset, version_dataset

    workdir = config.home() / "validation" / task.name / slug(run_id)
    previous = latest_dataset(task)
    prev_manifest = json.loads(Path(previous["manifest_uri"]).read_text()) if previous else None
    report = validate_dataset(dataset_uri, previous_manifest=prev_manifest, workdir=workdir,
                              answer_check=task_answer_check(task))
    if not report.accepted:
        message = report.summary()
        notify(f"Dataset rejected for task {task.name}: {dataset_uri}\n{message}", level="error",
               title=f"{task.name}: dataset rejected", figures={"Task": task.name, "Dataset": dataset_uri},
               dataset_uri=dataset_uri, task=task.name)
        decided("dataset_rejected", task.name, message.splitlines()[0] if message else "rejected",
                figures={"dataset_uri": dataset_uri, "quarantined": report.quarantine_count})
        raise Refusal(message)
    version = version_dataset(dataset_uri, report, artifacts_root=datasets_root(task).parent)
    atomic.write_text(datasets_root(task) / "LATEST", version.version_id)
    result = {"task": task.name, "version_id": version.version_id, "manifest_uri": str(version.manifest_uri),
              "path": str(version.path), "created": bool(version.created),
              "data_docs": str(report.data_docs_path) if report.data_docs_path else None,
              "quarantined": report.quarantine_count}
    if version.created:
        notify(f"Dataset {version.version_id} accepted for task {task.name} from {dataset_uri}",
               level="success", title=f"{task.name}: dataset {version.version_id} accepted",
               figures={"Task": task.name, "Version": version.version_id, "Quarantined rows": result["quarantined"],
                        "From": dataset_uri}, **result)
        decided("dataset_accepted", task.name, f"batch {dataset_uri} passed validation",
                figures={"dataset_version": version.version_id, "quarantined": result["quarantined"]})
    return result


def task_answer_check(task: Task) -> Any:
    """The data gate's view of the task: does an answer have the task's shape?"""
    from tuneship.data.checks import AnswerCheck

    ref = task.answers.check
    return AnswerCheck(task=task.name, module_file=str(task.module_file(ref)), function=ref.partition(":")[2],
                       min_share=task.data.min_conforming, describe=ref)


def dataset_for_retrain(task: Task, run_id: str) -> dict[str, str] | None:
    """A drift-triggered retrain first takes in labelled data that landed since the last
    accepted version (the same GE checks and versioning as llm_data_validation; already
    versioned content is a no-op), then trains on the newest accepted version."""
    batch = incoming_batch(task)
    if batch is not None:
        result = validate_and_version(task, batch, run_id=run_id)
        return {k: result[k] for k in ("task", "version_id", "manifest_uri", "path")}
    return latest_dataset(task)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


# ------------------------------------------------------------------ fine-tune


def finetune_trigger(task_param: str | None, triggering_asset_events: Any, *, run_id: str,
                     dataset_version: str | None = None, trigger: str | None = None,
                     recent_events: Any = None) -> dict[str, Any]:
    """Which task this fine-tune run trains, on what, and which other runs it must start.

    Asset events that arrive close together collapse into one run (`max_active_runs=1`), and
    no task's event may be lost: this run trains one task (the `task` Param, else the newest
    triggering event's task, else the default task) and every OTHER task with an event in the run gets
    its own `llm_finetune` run (`fan_out`: conf `task`, `trigger` and, for a
    `validated_dataset` event, `dataset_version`), with a run id derived from this run's id
    and the task, so a retried fan-out never starts a second one.

    `recent_events` (an asset-triggered run's: the events of its assets since its `run_after`,
    less a margin) adds the events Airflow 3.3 left to no run (`tuneship.event_claims`). The
    run claims every event it answers for; one that another run claimed first (it took it as
    a stray) is left out and listed in `already_handled`. When that leaves nothing and no
    task was named, `task` is None: the run has nothing to train.

    `trigger` (`validated_dataset`, `retrain_request`; a fanned-out run's conf) and
    `dataset_version` (the Param) describe a run started without events; `dataset_version`
    is the event's version id for a `validated_dataset` event, else the Param's (None: the
    newest accepted version, after a retrain's intake of landed data)."""
    from tuneship import event_claims
    from tuneship.tasks import default_task

    took = event_claims.take("llm_finetune", triggering_asset_events, recent_events, run_id)
    taken = event_claims.report(took)
    name = event_claims.chosen_task(took, task_param, default_task)
    if name is None:
        return {"task": None, "trigger": None, "dataset_version": None, "fan_out": [], **taken}
    newest = {t: (e["asset"], e["extra"]) for t, e in event_claims.newest_by_task(took["events"], default_task).items()}
    asset, extra = newest.get(name, (trigger or "manual", {}))

    def version_of(asset: str, extra: dict[str, Any]) -> str | None:
        return extra.get("version_id") if asset == "validated_dataset" else None

    fan_out = []
    for other, (o_asset, o_extra) in sorted(newest.items()):
        if other == name:
            continue
        conf = {"task": other, "trigger": o_asset}
        if version_of(o_asset, o_extra):
            conf["dataset_version"] = version_of(o_asset, o_extra)
        fan_out.append({"trigger_run_id": f"fan_out__{other}__{run_id}", "conf": conf})
    return {"task": name, "trigger": asset, "dataset_version": version_of(asset, extra) or dataset_version,
            "fan_out": fan_out, **taken}


def dataset_by_version(task: Task, version_id: str) -> dict[str, str]:
    """An accepted dataset version of `task`, by id; a Refusal (no retry: the same id will be
    missing again) when the task has no such version."""
    root = datasets_root(task)
    path = root / version_id
    if not (path / "manifest.json").is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
        message = (f"task {task.name} has no accepted dataset version {version_id!r} (no {path / 'manifest.json'}); "
                   f"known versions: {', '.join(known[-5:]) or 'none'}. Leave dataset_version empty for the newest, "
                   "or run llm_data_validation first")
        notify(message, level="error", title=f"{task.name}: no dataset version {version_id}",
               figures={"Task": task.name, "Dataset version": version_id}, task=task.name,
               dataset_version=version_id)
        raise Refusal(message)
    return {"task": task.name, "version_id": version_id, "path": str(path), "manifest_uri": str(path / "manifest.json")}


def finetune_dataset(task: Task, chosen: dict[str, Any], *, run_id: str) -> dict[str, str]:
    """The dataset a fine-tune trains on: the version `finetune_trigger` chose (the event's or
    the Param's), else, for a retrain, the newest after taking in landed data, else the newest."""
    if chosen.get("dataset_version"):
        return dataset_by_version(task, chosen["dataset_version"])
    dataset = dataset_for_retrain(task, run_id) if chosen["trigger"] == "retrain_request" else latest_dataset(task)
    if not dataset:
        raise StageFailed(f"no validated dataset for task {task.name} yet: run llm_data_validation first")
    return dataset


def finetune_plan(task: Task, *, dataset: dict[str, str], params: dict[str, Any], run_key: str,
                  trigger: str) -> dict[str, Any]:
    """Everything the trainer needs, as references; identical for every runner."""
    from tuneship.runners import trainer_command

    base = base_model_for(task, params.get("base_model") or None)
    fields = {"lora.r": "lora_r", "lora.alpha": "lora_alpha", "epochs": "epochs", "max_steps": "max_steps",
              "learning_rate": "learning_rate", "seed": "seed"}
    overrides = {key: params[name] for key, name in fields.items() if params.get(name) is not None}
    if "epochs" in overrides and "max_steps" not in overrides:
        overrides["max_steps"] = None  # epochs asked for in the form: the recipe's max_steps must not win
    out = config.artifacts() / "runs" / slug(run_key) / "train"
    from tuneship.train.recipe import default_recipe_path

    recipe = params.get("recipe")
    recipe = (recipe if recipe.endswith((".yaml", ".yml")) else str(default_recipe_path(recipe))) if recipe \
        else str(task.recipe_path())
    init_from = None
    if trigger == "retrain_request" and task.drift.retrain.warm_start:
        init_from = _warm_start(task, base, recipe, overrides)
    return {
        "task": task.name,
        "registered_model": task.registered_model,
        "description": f"{task.description} (task {task.name}, LoRA adapters, Tuneship)".strip(),
        "run_key": run_key,
        "trigger": trigger,
        "dataset": dataset,
        "base_model": base,
        "recipe": recipe,
        "overrides": overrides,
        "output_dir": str(out),
        "command": trainer_command(recipe, dataset["path"], base, str(out), overrides),
        "runner": params["runner"],
        "init_from": init_from,
    }


def _warm_start(task: Task, base: str, recipe: str, overrides: dict[str, Any]) -> str | None:
    """A drift retrain of a task with `drift.retrain.warm_start` continues from its champion's
    adapter with the retrain's steps and rate (the form's values win), when the champion was
    trained on the same base model with the same LoRA shape; else it starts fresh, and says why.
    Sets `overrides` in place; returns what it starts from (`champion vN`) or None."""
    from tuneship import registry
    from tuneship.train.recipe import RecipeError, load_recipe
    from tuneship.train.trainer import check_init_adapter

    champion = registry.by_alias("champion", task.registered_model)
    if champion is None:
        print(f"warm start: {task.name} has no champion; the retrain starts from a fresh LoRA", flush=True)
        return None
    if champion.tags.get("base_model") != base:
        print(f"warm start: champion v{champion.version} was trained on {champion.tags.get('base_model')}, "
              f"this retrain on {base}; it starts from a fresh LoRA", flush=True)
        return None
    adapter = _adapter_dir(task, champion.version)
    try:
        check_init_adapter(load_recipe(recipe, {**overrides, "init_adapter": str(adapter)}))
    except RecipeError as e:
        print(f"warm start: not from champion v{champion.version}: {e}; the retrain starts from a fresh LoRA",
              flush=True)
        return None
    overrides["init_adapter"] = str(adapter)
    for key, value in task.drift.retrain.overrides().items():
        overrides.setdefault(key, value)  # the form's values win
    print(f"warm start: from champion v{champion.version}'s adapter ({adapter})", flush=True)
    return f"champion v{champion.version}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register_training(plan: dict[str, Any]) -> dict[str, Any]:
    """One MLflow run, one model version (@challenger) per DAG run, however often retried."""
    from tuneship import registry
    from tuneship.train.recipe import load_recipe, recipe_hash

    out = Path(plan["output_dir"])
    if not (out / "manifest.json").exists():
        raise StageFailed(f"training output {out} is incomplete (no manifest.json): the trainer did not finish")
    recipe = load_recipe(plan["recipe"], plan["overrides"])
    rhash = recipe_hash(recipe)
    run_id = registry.start_run(plan["run_key"], run_name=f"finetune {plan['task']} {plan['dataset']['version_id']}",
                                tags={"runner": plan["runner"], "trigger": plan["trigger"], "task": plan["task"]})
    params = {"task": plan["task"], "base_model": plan["base_model"], "recipe": Path(plan["recipe"]).name,
              "recipe_hash": rhash,
              "runner": plan["runner"], **{k: v for k, v in plan["overrides"].items()}}
    registry.log_training(run_id, params=params, train_out=out, dataset=plan["dataset"],
                          dataset_name=f"{plan['task']}-{plan['dataset']['version_id']}")
    from tuneship.basemodel import sha256_file

    adapter_sha = sha256_file(out / "adapter" / "adapter_model.safetensors")
    mv = registry.register(run_id, plan["run_key"], name=plan["registered_model"],
                           description=plan.get("description"), tags={
        "task": plan["task"],
        "base_model": plan["base_model"],
        "dataset_version": plan["dataset"]["version_id"],
        "dataset_manifest": plan["dataset"]["manifest_uri"],
        "recipe_hash": rhash,
        "git_commit": git_commit(),
        "runner": plan["runner"],
        "dag_run_id": plan["run_key"],
        "adapter_sha256": adapter_sha,
        **({"init_from": plan["init_from"]} if plan.get("init_from") else {}),
    })
    metrics = json.loads((out / "metrics.json").read_text())
    decided("version_registered", plan["task"], f"fine-tuned on dataset {plan['dataset']['version_id']}",
            version=mv.version, figures={"train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
                                         "recipe_hash": rhash, "init_from": plan.get("init_from"),
                                         "runner": plan["runner"]})
    publish_card(plan["task"], mv.version)
    return {"task": plan["task"], "name": mv.name, "version": mv.version, "run_id": run_id,
            "adapter_sha256": adapter_sha, "init_from": plan.get("init_from"),
            "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
            "tokens_per_s": metrics.get("tokens_per_s"), "loss_curve": str(out / "loss_curve.png")}


def _adapter_dir(task: Task, version: str) -> Path:
    """A local copy of a registered version's adapter (downloaded once)."""
    from tuneship import registry

    dest = config.artifacts() / "tasks" / task.name / "registry-cache" / f"v{version}"
    adapter = dest / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        registry.download_adapter(registry.get_version(version, task.registered_model), dest)
    return adapter


def _generator(base_ref: str, adapter_dir: Path | None, label: str):
    """Greedy answers from base (+ adapter, merged), in batches, with a progress line per
    batch; `.loglik(prompts, references)` scores references teacher-forced on the same model,
    `.options(prompts, texts, references=None)` each prompt's options (calibration) and, in the
    same pass, its reference; `.scored(prompts, max_new, texts, references=None)` all of it from
    one run of each prompt."""
    import time

    from tuneship.basemodel import load_base
    from tuneship.generate import generate, generate_and_score, loglikelihood, option_logliks

    model, tokenizer = load_base(base_ref)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()

    def answers(prompts: list, max_new: int) -> list[str]:
        t0 = time.monotonic()
        return generate(model, tokenizer, prompts, max_new_tokens=max_new, progress=lambda done, total: print(
            f"scoring {label}: {done}/{total} answers ({time.monotonic() - t0:.0f}s)", flush=True))

    answers.loglik = lambda prompts, references: loglikelihood(model, tokenizer, prompts, references)  # type: ignore[attr-defined]
    answers.options = lambda prompts, texts, references=None: option_logliks(  # type: ignore[attr-defined]
        model, tokenizer, prompts, texts, references=references)

    def scored(prompts: list, max_new: int, texts: list[str], references: list[str] | None = None) -> Any:
        t0 = time.monotonic()
        return generate_and_score(model, tokenizer, prompts, max_new, texts, references=references,
                                  progress=lambda done, total: print(
                                      f"scoring {label}: {done}/{total} answers and likelihoods "
                                      f"({time.monotonic() - t0:.0f}s)", flush=True))

    answers.scored = scored  # type: ignore[attr-defined]
    return answers


def _as_client_sends(task: Task, generate: Any) -> Any:
    """Prompts rendered as the task's clients send them (chat: messages, system prompt first)."""
    def sends(prompts: list, max_new: int) -> list[str]:
        return generate([task.render_prompt(p) for p in prompts], max_new)

    def rendered(scorer: Any) -> Any:  # (prompts, ...) -> scores, on the same rendering
        return lambda prompts, *args, **kw: scorer([task.render_prompt(p) for p in prompts], *args, **kw)

    for name in ("loglik", "options", "scored"):
        if hasattr(generate, name):
            setattr(sends, name, rendered(getattr(generate, name)))
    return sends


def evaluate_candidate(task: Task, candidate: dict[str, Any], dataset: dict[str, str]) -> dict[str, Any]:
    """Score candidate and reference (champion, else base model) on the same cases with each of
    the task's gating suites; apply every suite's gates."""
    from tuneship import registry
    from tuneship.evaluate import (
        apply_gates,
        gate_rows,
        load_cases,
        lost_cases,
        plot_forest,
        plot_reliability,
        reliability_bins,
        run_suite,
    )

    name = task.registered_model
    mv = registry.get_version(candidate["version"], name)
    base = mv.tags["base_model"]
    champion = registry.by_alias("champion", name)
    if champion and champion.version != candidate["version"]:
        ref_name = f"champion v{champion.version}"
        ref_gen = _generator(champion.tags["base_model"], _adapter_dir(task, champion.version), ref_name)
    else:
        ref_name, ref_gen = "base model", _generator(base, None, "base model")
    cand_gen = _generator(base, _adapter_dir(task, candidate["version"]), f"candidate v{candidate['version']}")
    cand_gen, ref_gen = _as_client_sends(task, cand_gen), _as_client_sends(task, ref_gen)
    suites, passed, summaries, metrics, ref_metrics, rows, diagrams, lost = [], True, [], {}, {}, [], [], []
    out = config.artifacts() / "tasks" / task.name / "evals" / f"v{candidate['version']}.json"
    for suite_name in task.eval.suites:
        suite = task.suite(suite_name)
        cases = load_cases(suite, Path(dataset["path"]), task.parser)
        cand = run_suite(suite, cand_gen, cases, task.parser)
        # the reference is scored only where a gate compares with it (floors and ceilings do not)
        compares = any(g.max_regression is not None for g in suite.gates)
        ref = run_suite(suite, ref_gen, cases, task.parser) if compares else None
        gates = apply_gates(suite, cand, ref, ref_name if compares else None)
        passed &= gates.passed
        summaries.append(f"{suite.name}@v{suite.version}:\n{gates.summary()}")
        prefix = metric_prefix(task, suite.name)
        metrics.update({prefix + k: v for k, v in cand.metrics.items()})
        ref_metrics.update({prefix + k: v for k, v in ref.metrics.items()} if ref else {})
        suites.append({"suite": f"{suite.name}@v{suite.version}", "candidate": cand.to_dict(),
                       "reference": ref.to_dict() if ref else None, "gates": gates.to_dict(), "passed": gates.passed})
        rows += gate_rows(f"{suite.name}@v{suite.version}", gates, suite)
        if ref is not None:
            lost += lost_cases(f"{suite.name}@v{suite.version}", suite, cases, cand, ref)
        for m in (m for m in suite.metrics if m.kind == "ece"):  # a reliability diagram per ECE
            curves = {f"candidate v{candidate['version']}": reliability_bins(cand.outcomes[m.name], m.bins or 10)}
            if ref is not None:
                curves[ref_name] = reliability_bins(ref.outcomes[m.name], m.bins or 10)
            versus = f" vs {ref.metrics[m.name]:.3f}" if ref is not None else ""
            png = plot_reliability(curves, out.with_name(f"v{candidate['version']}-{suite.name}-{m.name}.png"),
                                   f"{suite.name}: {m.calibrates} (ECE {cand.metrics[m.name]:.3f}{versus}, "
                                   "equal-mass bins)")
            if png:
                diagrams.append(str(png))
    # every metric with its interval; every paired difference with its interval
    bounds = {f"eval_{metric_prefix(task, r['suite'].split('@')[0])}{r['metric']}_{k}": r[src] for r in rows
              for k, src in (("low", "low"), ("high", "high")) if r[src] is not None}
    bounds.update({f"eval_{metric_prefix(task, r['suite'].split('@')[0])}{r['metric']}_diff_{k}": r[src] for r in rows
                   if r["rule"] == "vs reference" for k, src in (("low", "diff_low"), ("high", "diff_high"))})
    registry.log_metrics(mv.run_id, {**{f"eval_{k}": v for k, v in metrics.items()}, **bounds})
    # gates whose suite holds an inconclusive interval for a person: the release asks first
    held = [f"{r['suite']} {r['metric']}" for r in rows if r.get("verdict") == "inconclusive"] if passed else []
    registry.set_version_tags(candidate["version"], {"gates": ("held" if held else "passed") if passed else "failed",
                                                     **({"gates_held": "; ".join(held)[:5000]} if held else {}),
                                                     **{f"eval_{k}": f"{v:.4f}" for k, v in metrics.items()}},
                              name)
    forest = plot_forest(rows, out.with_name(f"v{candidate['version']}-forest.png"), ref_name)
    result = {"task": task.name, "dataset": dataset, "suites": suites, "reference_name": ref_name, "passed": passed,
              "gates": rows, "forest_plot": str(forest) if forest else None, "reliability_diagrams": diagrams,
              "lost_cases": lost}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    registry.log_artifact(mv.run_id, out, "evaluation")
    for png in [*([forest] if forest else []), *diagrams]:
        registry.log_artifact(mv.run_id, Path(png), "evaluation")
    publish_card(task, candidate["version"])
    summary = "\n".join(summaries)
    decided("gates_passed" if passed else "gates_failed", task.name,
            f"{'passed' if passed else 'failed'} against {ref_name}" + (f"; held for a person: {'; '.join(held)}"
                                                                         if held else ""),
            version=candidate["version"],
            figures={"gate": "eval", "held": held,
                     "failed": [] if passed else [f"{r['suite']} {r['metric']}" for r in rows
                                                  if r.get("verdict") != "pass"][:50]})
    if not passed:
        failed = [r for r in rows if r["verdict"] != "pass"]
        notify(f"{task.name} v{candidate['version']} failed its gates against {ref_name}:\n{summary}",
               level="error", title=f"{task.name} v{candidate['version']}: evaluation gates failed",
               figures={"Task": task.name, "Version": candidate["version"], "Reference": ref_name,
                        "Failed gates": f"{len(failed)} of {len(rows)}",
                        "Failing": ", ".join(dict.fromkeys(r["metric"] for r in failed))},
               links=release_links(task.registered_model, candidate["version"]),
               thread=release_thread(task.name, candidate["version"]),
               version=candidate["version"], task=task.name, report=str(out))
        raise Refusal(f"gates failed against {ref_name}:\n{summary}")
    return {"passed": True, "held": held, "metrics": metrics, "reference": ref_metrics, "reference_name": ref_name,
            "report": str(out), "gates": rows, "forest_plot": result["forest_plot"],
            "reliability_diagrams": diagrams, "lost_cases": lost}


def metric_prefix(task: Task, suite_name: str) -> str:
    """A metric's name prefix (MLflow, XCom): its suite's name when the task has several suites."""
    return "" if len(task.eval.suites) == 1 else f"{suite_name}/"


def parity_prompts(task: Task) -> list[str]:
    """What the compiled model must reproduce: the task's own prompts (declared, else its
    smoke suite's), rendered as the task's clients send them."""
    from tuneship.evaluate import load_cases

    prompts = list(task.compile.parity_prompts) or [c.prompt_input() for c in load_cases(task.suite(task.eval.smoke))]
    return [task.render_prompt(p) for p in prompts]


def compiled_dir(task: Task, version: int | str) -> Path:
    """Where `compile_candidate` leaves version `version`'s Triton package (`llm/1/...`) and
    its COMPILED.json."""
    return config.artifacts() / "tasks" / task.name / "compiled" / f"v{version}"


def compile_candidate(task: Task, candidate: dict[str, Any], evaluation: dict[str, Any] | None = None,
                      dataset: dict[str, str] | None = None) -> dict[str, Any]:
    """ONNX Runtime GenAI build at the task's precision: a Triton-ready package. fp32 must
    reproduce eager PyTorch (logits and greedy answers); a quantized build (int8, int4) must
    pass the task's gates against the unquantized candidate on the same cases
    (`quantization_gate`, from the evaluate stage's report: `evaluation`'s, else the one it left),
    else it is refused (nothing written, one Slack alert). (The GPU path, TensorRT-LLM, is
    not built here: `tuneship.trtllm` renders and validates it by contract.)"""
    from tuneship import registry
    from tuneship.compile import compile_for_triton

    version = candidate["version"]
    package = compiled_dir(task, version)
    marker = package / "COMPILED.json"
    if marker.exists():
        return json.loads(marker.read_text())
    mv = registry.get_version(version, task.registered_model)
    spec = task.compile
    deployment = {"task": task.name, "model": mv.name, "version": version,
                  "adapter_sha256": mv.tags.get("adapter_sha256"),
                  "base_model": mv.tags.get("base_model"), "dataset_version": mv.tags.get("dataset_version")}
    gate = None
    if spec.precision != "fp32":
        # the evaluate stage's report (this run's, else the one it left for the version)
        report = Path(evaluation["report"]) if evaluation else \
            config.artifacts() / "tasks" / task.name / "evals" / f"v{version}.json"
        gate = quantization_gate(task, version, report, dataset)
    info = compile_for_triton(mv.tags["base_model"], _adapter_dir(task, version), package, "llm",
                              deployment=deployment, parity_prompts=parity_prompts(task), precision=spec.precision,
                              block_size=spec.block_size, accuracy_level=spec.accuracy_level,
                              builder_options=spec.builder_options(), quality_gate=gate)
    # Round-trip through JSON so the XCom holds plain values (paths become strings).
    result = json.loads(json.dumps({"task": task.name, "version": version, "package": str(package / "llm"), **info},
                                   default=str))
    marker.write_text(json.dumps(result, indent=2))
    registry.set_version_tags(version, {"compiled": f"onnxruntime-genai {spec.precision}",
                                        "onnx_sha256": str(info.get("onnx_sha256", "")),
                                        **({"quantization": "passed"} if gate else {})},
                              task.registered_model)
    publish_card(task, version)
    return result


def quantization_gate(task: Task, version: int, report: Path, dataset: dict[str, str] | None = None) -> Any:
    """The check a quantized build must pass (`compile_for_triton(quality_gate=...)`):
    `score_quantized` against the unquantized candidate's answers, from the evaluate stage's
    `report` (read once; its `dataset` unless one is given). Logs `quant_*` metrics and the
    result to the version's MLflow run; a refusal tags the version, alerts once and raises
    Refusal."""
    from tuneship import registry

    if not report.is_file():
        raise StageFailed(f"{task.name} v{version} compiles to {task.compile.precision}, which is gated against "
                          f"the unquantized candidate's evaluation, and there is none at {report}: run "
                          "llm_finetune's evaluate for it first")
    doc = json.loads(report.read_text())
    dataset = dataset or doc.get("dataset")
    if not dataset:
        raise StageFailed(f"{report} does not name the dataset it was scored on: evaluate v{version} again")
    evaluated = {s["suite"]: s["candidate"] for s in doc["suites"]}
    precision = task.compile.precision

    def check(answers: Any) -> dict[str, Any]:
        result, metrics, summary = score_quantized(task, evaluated, Path(dataset["path"]), answers,
                                                   f"unquantized v{version}")
        out = config.artifacts() / "tasks" / task.name / "evals" / f"v{version}-{precision}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        mv = registry.get_version(version, task.registered_model)
        registry.log_metrics(mv.run_id, metrics)
        registry.log_artifact(mv.run_id, out, "evaluation")
        print(f"quantization gate ({precision}, {result['seconds']}s):\n{summary}", flush=True)
        if not result["passed"]:
            registry.set_version_tags(version, {"quantization": "failed"}, task.registered_model)
            notify(f"{task.name} v{version}: its {precision} build failed the task's gates against the unquantized "
                   f"candidate:\n{summary}", level="error", title=f"{task.name} v{version}: {precision} build refused",
                   figures={"Task": task.name, "Version": version, "Precision": precision,
                            "Against": f"unquantized v{version}"},
                   links=release_links(task.registered_model, version), thread=release_thread(task.name, version),
                   version=version, task=task.name, report=str(out))
            decided("gates_failed", task.name, f"its {precision} build failed the task's gates against the "
                    "unquantized candidate", version=version, figures={"gate": "quantization", "precision": precision})
            raise Refusal(f"the {precision} build failed the task's gates against the unquantized candidate:\n"
                          f"{summary}")
        return {**result, "report": str(out)}

    return check


def score_quantized(task: Task, evaluated: dict[str, dict[str, Any]], dataset: Path, answers: Any,
                    reference_name: str) -> tuple[dict[str, Any], dict[str, float], str]:
    """A quantized build's answers (`answers(prompts, max_new)`, e.g.
    `tuneship.compile.served_answers`) on every gate suite's cases, scored by the suite's
    answer metrics (`Suite.answers_only`: likelihood and calibration need probabilities) and
    held to the suite's own gates with the unquantized candidate as the reference, paired on
    the same cases: each `max_regression` margin and `min_kept` floor against the unquantized
    answers, and every floor and ceiling the unquantized candidate cleared (one it did not is
    the evaluate stage's verdict, not what quantization changed: a version released by hand
    after failing its gates is judged by the release's smoke, not refused here twice).
    `evaluated`: suite@version -> the candidate's `SuiteResult.to_dict()`, as the evaluation
    report holds it. Returns (report, metrics for MLflow, summary)."""
    from tuneship.evaluate import SuiteResult, apply_gates, gate_rows, load_cases, run_suite

    t0 = time.monotonic()
    sends = _as_client_sends(task, answers)
    suites, rows, summaries, metrics, passed = [], [], [], {}, True
    for suite_name in task.eval.suites:
        full = task.suite(suite_name)
        suite = full.answers_only()
        key = f"{full.name}@v{full.version}"
        if not suite.metrics:
            continue
        if key not in evaluated:
            raise ValueError(f"the candidate's evaluation has no {key}: evaluate it again with the task's current "
                             "suites")
        cases = load_cases(suite, dataset, task.parser)
        eager = SuiteResult.from_dict(evaluated[key], [m.name for m in suite.metrics])
        if eager.n_cases != len(cases):
            raise ValueError(f"{key}: the evaluation scored {eager.n_cases} cases, {dataset} gives {len(cases)}: "
                             "evaluate the candidate again")
        bounds = [g for g in suite.gates if g.min is not None or g.max is not None]
        cleared = {id(g) for g, r in zip(bounds, apply_gates(suite.model_copy(update={"gates": bounds}), eager,
                                                             None).gates, strict=True) if r.passed}
        held = suite.model_copy(update={"gates": [g for g in suite.gates if id(g) in cleared
                                                  or (g.min is None and g.max is None)]})
        skipped = [f"{g.metric} {'>=' if g.min is not None else '<='} {g.min if g.min is not None else g.max}"
                   for g in bounds if id(g) not in cleared]
        quant = run_suite(held, sends, cases, task.parser)
        gates = apply_gates(held, quant, eager, reference_name)
        same = sum(a == b for a, b in zip(quant.completions, eager.completions, strict=True)) / len(cases)
        passed &= gates.passed
        prefix = metric_prefix(task, full.name)
        metrics.update({f"quant_{prefix}{k}": v for k, v in quant.metrics.items()})
        metrics[f"quant_{prefix}same_answer"] = same
        rows += gate_rows(key, gates, held)
        note = f"; not held to {', '.join(skipped)} (the unquantized candidate missed them)" if skipped else ""
        summaries.append(f"{key} ({same:.0%} of answers unchanged{note}):\n{gates.summary()}")
        suites.append({"suite": key, "cases": len(cases), "same_answer": same, "quantized": quant.metrics,
                       "unquantized": eager.metrics, "gates": gates.to_dict(), "passed": gates.passed,
                       "not_held_to": skipped})
    result = {"precision": task.compile.precision, "passed": passed, "suites": suites, "gates": rows,
              "seconds": round(time.monotonic() - t0, 1)}
    return result, metrics, "\n".join(summaries)


# ------------------------------------------------------------------ release


def idle_colour(routes: dict[str, Any]) -> str:
    live = (routes.get("live") or {}).get("colour")
    return "green" if live == "blue" else "blue"


def stage_into_repository(package: str, name: str) -> str:
    """Copy the compiled package into Triton's repository as `name` (the task's colour model,
    `<task>_<colour>`), atomically."""
    repo = config.triton_repository()
    repo.mkdir(parents=True, exist_ok=True)
    tmp = repo / f".{name}.staging"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(package, tmp)
    cfg = tmp / "config.pbtxt"
    text = cfg.read_text()
    lines = [f'name: "{name}"' if line.startswith("name:") else line for line in text.splitlines()]
    cfg.write_text("\n".join(lines) + "\n")
    final = repo / name
    old = repo / f".{name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return name


def warm_up_candidate(task: Task, model: str, triton: Any) -> dict[str, Any]:
    """After the load and readiness, before smoke and traffic: the smoke suite's prompts go
    straight to the candidate through Triton (`triton`: TritonHook or TritonControl). A
    failed warm-up is a failed load: live traffic is untouched and the message says why."""
    from tuneship.evaluate import load_cases

    # straight to Triton, which takes text: a chat case sends its last user turn as is
    prompts = [p if isinstance(p := case.prompt_input(), str) else p[-1]["content"]
               for case in load_cases(task.suite(task.eval.smoke))]
    try:
        return triton.warm_up(model, prompts)
    except RuntimeError as exc:
        notify(f"candidate {model} failed its warm-up: {exc}; live traffic untouched", level="error",
               title=f"{task.name}: {model} failed its warm-up", figures={"Task": task.name, "Model": model},
               task=task.name, model=model)
        raise StageFailed(str(exc)) from exc


def served_texts(task: Task, prompts: list[Any], base_model: str | None = None) -> list[str]:
    """Case prompts as the text the compiled model is fed: a plain task's prompt as is, a chat
    task's messages (with its system prompt) rendered with the base model's chat template
    (exactly what the compile step's parity check fed it)."""
    rendered = [task.render_prompt(p) for p in prompts]
    if all(isinstance(p, str) for p in rendered):
        return rendered
    from transformers import AutoTokenizer

    from tuneship.basemodel import resolve_base_ref
    from tuneship.compile import served_text

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_ref(base_model or task.base_model)[0])
    return [p if isinstance(p, str) else served_text(tokenizer, p) for p in rendered]


def smoke_through_gateway(task: Task, colour_model: str, *, base_url: str, token: str,
                          base_model: str | None = None) -> dict[str, Any]:
    """The task's smoke cases through the gateway to its served model, addressed to the
    candidate colour only. A chat case is rendered here with the base model's chat template
    (exactly the text the compile step's parity check fed the model) and sent as a
    completion: a colour not routed yet carries no chat template in the gateway's routes."""
    import httpx

    from tuneship.evaluate import apply_gates, load_cases, score

    suite = task.suite(task.eval.smoke)
    cases = load_cases(suite)
    outs = []
    colour = colour_model.removeprefix(f"{task.name}_")
    prompts = served_texts(task, [case.prompt_input() for case in cases], base_model)
    with httpx.Client(base_url=base_url, timeout=60.0,
                      headers={"Authorization": f"Bearer {token}", "X-Tuneship-Target": colour,
                               "X-Tuneship-Target-Model": colour_model}) as c:
        for prompt in prompts:
            body: dict[str, Any] = {"model": task.served_model, "max_tokens": suite.generation.max_new_tokens,
                                    "temperature": 0}
            r = c.post("/v1/completions", json={**body, "prompt": prompt})
            if r.status_code != 200:
                raise StageFailed(f"smoke request to {colour_model} failed: HTTP {r.status_code} {r.text[:300]}")
            outs.append(r.json()["choices"][0]["text"])
    result = score(suite, cases, outs, task.parser)
    gates = apply_gates(suite, result, None)  # the same gate logic as evaluation; no reference here
    return {"metrics": result.metrics, "passed": gates.passed, "samples": result.samples[:3],
            "failed": [g.metric for g in gates.gates if not g.passed], "gates": gates.summary()}


def smoke_candidate(task: Task, colour_model: str, version: str, *, gateway: Any, triton: Any) -> dict[str, Any]:
    """Smoke is a gate: scores below it are a decision (Slack once, the candidate unloaded,
    Refusal); a smoke request the gateway could not answer is a fault (StageFailed, retried).
    Live traffic is untouched either way: nothing routes to the candidate yet.

    `gateway` and `triton` are the Airflow hooks (anything with the same methods)."""
    from tuneship import registry

    base_url, token = gateway.endpoint()
    try:
        base = registry.get_version(version, task.registered_model).tags.get("base_model")
    except Exception:  # noqa: BLE001 - MLflow down: the smoke requests below say what is wrong
        base = None
    result = smoke_through_gateway(task, colour_model, base_url=base_url, token=token, base_model=base)
    if result["passed"]:
        return result
    figures = ", ".join(f"{m} {result['metrics'][m]:.3f}" for m in result["failed"])
    if triton.is_ready(colour_model):
        triton.unload(colour_model)
    notify(f"{task.name} v{version} failed smoke on {colour_model} ({figures}); candidate unloaded, "
           "live traffic untouched", level="error", title=f"{task.name} v{version}: smoke failed",
           figures={"Task": task.name, "Version": version, "Model": colour_model,
                    **{m: result["metrics"][m] for m in result["failed"]}},
           links=release_links(task.registered_model, version), thread=release_thread(task.name, version),
           version=version, task=task.name, smoke=result)
    decided("gates_failed", task.name, f"smoke failed on {colour_model}: {figures}", version=version,
            figures={"gate": "smoke", **{m: result["metrics"][m] for m in result["failed"]}})
    raise Refusal(f"smoke failed on {colour_model} (v{version}): {figures} below the smoke suite's gates; "
                  f"samples: {result['samples']}")


def serving_prompts(task: Task, dataset_version: str | None, base_model: str | None) -> list[str]:
    """What the serving gate sends: the prompts of the candidate's eval split (its dataset
    version's), else the smoke suite's, as the task's clients send them."""
    from tuneship.evaluate import load_cases, prompt_and_reference

    path = datasets_root(task) / dataset_version / "eval.jsonl" if dataset_version else None
    if path is not None and path.is_file():
        with open(path, encoding="utf-8") as fh:
            prompts = [prompt_and_reference(json.loads(line), path, n)[0] for n, line in enumerate(fh, 1) if line.strip()]
    else:
        prompts = [c.prompt_input() for c in load_cases(task.suite(task.eval.smoke))]
    return served_texts(task, prompts, base_model)


def serving_candidate(task: Task, colour_model: str, plan: dict[str, Any], *, triton: Any) -> dict[str, Any]:
    """The serving gate (`tuneship.serving_gate`): the candidate, loaded in its colour, against
    the live colour on the same requests. Figures and intervals go to the version's MLflow run
    (metrics `serving_*`, the JSON and the latency chart); failed gates are a decision (the
    candidate unloaded, Slack once, Refusal); a request Triton could not answer is a fault
    (StageFailed, retried). Live traffic is untouched either way.

    `triton`: the Airflow hook or a TritonControl (anything with `url`, `is_ready`, `unload`)."""
    from tuneship import registry, serving_gate

    spec, version = task.serving, str(plan["version"])
    mv = registry.get_version(version, task.registered_model)
    live = task.colour_model(plan["previous_colour"]) if plan.get("previous_colour") else None
    note = "nothing live: a first release (absolute gates only)" if live is None else None
    if live is not None and not triton.is_ready(live):
        note, live = f"the live colour {live} is not loaded in Triton: absolute gates only", None
    models = [colour_model, *([live] if live else [])]
    max_new = spec.max_new_tokens or task.suite(task.eval.suites[0]).generation.max_new_tokens
    seed = int(version) if version.isdigit() else 0
    prompts = serving_prompts(task, plan.get("dataset_version"), mv.tags.get("base_model"))
    def measure_round(k: int) -> dict[str, Any]:
        return serving_gate.measure(triton.url, models, prompts, max_new, requests=spec.requests,
                                    seed=seed * 100 + k, first=(k - 1) * spec.requests)

    try:
        readings, result = serving_gate.gate(spec, measure_round, colour_model, live, seed=seed)
    except RuntimeError as exc:
        raise StageFailed(str(exc)) from exc
    out = config.artifacts() / "tasks" / task.name / "serving" / f"v{version}.json"
    labels = {colour_model: f"candidate v{version}", **({live: f"live v{plan.get('previous_version')}"} if live else {})}
    png = serving_gate.plot_latency({labels[m]: r for m, r in readings.items()}, out.with_suffix(".png"),
                                    f"{task.name}: {result['requests']} requests each, up to {max_new} tokens")
    result.update(task=task.name, version=version, model=colour_model, live_model=live,
                  live_version=plan.get("previous_version") if live else None, note=note, max_new_tokens=max_new,
                  latency_plot=str(png) if png else None, readings={m: r.to_dict() for m, r in readings.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    cand = result["candidate"]
    logged = {f"serving_{k}": v for k, v in cand.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    logged.update({f"serving_{r['metric']}_ratio{k}": r[src] for r in result["rows"] if r["rule"].startswith("ratio")
                   for k, src in (("", "diff"), ("_low", "diff_low"), ("_high", "diff_high")) if r[src] is not None})
    registry.log_metrics(mv.run_id, logged)
    for path in (out, png):
        if path:
            registry.log_artifact(mv.run_id, Path(path), "serving")
    registry.set_version_tags(version, {"serving": "passed" if result["passed"] else "failed",
                                        **{f"serving_{k}": f"{cand[k]:.4g}" for k in
                                           ("p95_ms", "tokens_per_s", "peak_memory_mb", "cost_per_1k_tokens")
                                           if cand.get(k) is not None}}, task.registered_model)
    publish_card(task, version)
    print(f"serving gate, {colour_model} against {live or 'nothing live'}:\n{result['summary']}")
    reported = {k: v for k, v in result.items() if k != "readings"}  # the XCom and Slack: no raw readings
    serving_figures = {"gate": "serving", "against": live, **{k: cand.get(k) for k in
                       ("p95_ms", "tokens_per_s", "peak_memory_mb", "cost_per_1k_tokens")}}
    if result["passed"]:
        decided("gates_passed", task.name, f"serving gates passed against {live or 'its ceilings'}", version=version,
                figures=serving_figures)
        return reported
    failed = [r for r in result["rows"] if r["verdict"] != "pass"]
    if triton.is_ready(colour_model):
        triton.unload(colour_model)
    lines = "\n".join(serving_gate.line(r) for r in failed)
    notify(f"{task.name} v{version} failed its serving gates against {live or 'its ceilings'}; candidate unloaded, "
           f"live traffic untouched:\n{lines}", level="error", title=f"{task.name} v{version}: serving gates failed",
           figures={"Task": task.name, "Version": version, "Against": live or "its ceilings",
                    "Failed gates": f"{len(failed)} of {len(result['rows'])}",
                    **{label: cand[k] for k, label in (("p95_ms", "p95 ms"), ("tokens_per_s", "tokens/s"),
                                                        ("peak_memory_mb", "peak memory MB"),
                                                        ("cost_per_1k_tokens", "USD per 1k tokens"))
                       if cand.get(k) is not None}},
           links=release_links(task.registered_model, version), thread=release_thread(task.name, version),
           version=version, task=task.name, serving=reported)
    decided("gates_failed", task.name, f"serving gates failed against {live or 'its ceilings'}: "
            + "; ".join(f"{r['metric']} {r['verdict']}" for r in failed), version=version, figures=serving_figures)
    raise Refusal(f"serving gates failed for v{version} on {colour_model}:\n{lines}")


def release_trigger(task_param: str | None, version: str | None, triggering_asset_events: Any, *,
                    run_id: str, recent_events: Any = None) -> dict[str, Any]:
    """Which task a release run releases, its triggering candidate (None for a manual
    `version`), and the release runs to start for other tasks' candidates.

    The `task` Param, else the newest `release_candidate` event's task; that task's newest
    candidate. Every OTHER task with a candidate among the run's events (and the strays in
    `recent_events` that no run took: `tuneship.event_claims`) gets its own `llm_release`
    run (`fan_out`: conf `task` and `version`, run id `fan_out__<task>__<this run id>`), so a
    candidate is never dropped because another task's arrived beside it. `task` is None when
    every event of the run was already handled by another run and no task was named."""
    from tuneship import event_claims
    from tuneship.tasks import default_task

    took = event_claims.take("llm_release", triggering_asset_events, recent_events, run_id)
    taken = event_claims.report(took)
    name = event_claims.chosen_task(took, task_param, default_task)
    if name is None:
        return {"task": None, "candidate": None, "fan_out": [], **taken}
    newest = event_claims.newest_by_task(took["events"], default_task)
    candidate = None if version or name not in newest else dict(newest[name]["extra"])
    fan_out = [{"trigger_run_id": f"fan_out__{other}__{run_id}", "conf": {"task": other, "version": str(e["extra"]["version"])}}
               for other, e in sorted(newest.items()) if other != name and e["extra"].get("version") is not None]
    return {"task": name, "candidate": candidate, "fan_out": fan_out, **taken}


def release_plan(task: Task, candidate: dict[str, Any] | None, version: str | None,
                 routes: dict[str, Any]) -> dict[str, Any] | None:
    """Which version of `task` to release, from which compiled package, into which colour
    (the idle one of this task's two; another task's colours are never considered)."""
    from tuneship import registry

    if version:
        compiled = compile_candidate(task, {"version": version})
        candidate = {"version": version, "package": compiled["package"]}
    if not candidate:
        return None
    mv = registry.get_version(candidate["version"], task.registered_model)
    if mv.tags.get("task", task.name) != task.name:
        raise StageFailed(f"{task.registered_model} v{mv.version} was trained for task {mv.tags['task']!r}, "
                          f"not {task.name!r}")
    live = routes.get("live") or {}
    colour = idle_colour(routes)
    generation = Path(candidate["package"]) / "1" / "generation.json"
    gen = json.loads(generation.read_text()) if generation.is_file() else {}
    return {"task": task.name, "registered_model": task.registered_model, "served_model": task.served_model,
            "version": str(candidate["version"]), "package": candidate["package"],
            "adapter_sha256": mv.tags.get("adapter_sha256"), "dataset_version": mv.tags.get("dataset_version"),
            "prompt_format": task.prompt_format, "colour": colour, "model": task.colour_model(colour),
            "chat_template": gen.get("chat_template"), "bos_token": gen.get("bos_token"),
            "previous_version": live.get("version"), "previous_colour": live.get("colour"),
            "price_per_hour": task.serving.price_per_hour,
            "max_cost_per_1k_tokens": task.serving.max_cost_per_1k_tokens}


def route_for(plan: dict[str, Any], model: str) -> dict[str, Any]:
    """The gateway route for a loaded colour (what /version reports)."""
    return {"colour": plan["colour"], "model": model, "version": str(plan["version"]),
            "registered_model": plan["registered_model"], "adapter_sha256": plan.get("adapter_sha256"),
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata": {"task": plan["task"], "dataset_version": plan.get("dataset_version"),
                         "prompt_format": plan["prompt_format"],
                         # the gateway renders chat requests with the model's own template; its
                         # cost metrics use the task's declared price (any deployment, no task files)
                         **{k: plan[k] for k in ("chat_template", "bos_token", "price_per_hour",
                                                 "max_cost_per_1k_tokens") if plan.get(k) is not None}}}


def release_verdict(canary: dict[str, Any] | None, shadow: dict[str, Any] | None) -> dict[str, Any]:
    """The window that decides a release: the canary's, unless it was skipped (no canary in
    the task's strategy), else the shadow window's."""
    if canary and not canary.get("skipped"):
        return canary
    if not shadow:
        raise StageFailed("no window verdict: neither the canary nor the shadow window returned one")
    return shadow


def release_alert(plan: dict[str, Any], verdict: dict[str, Any], title: str) -> dict[str, Any]:
    """Slack's header, key figures, buttons and thread for a decision on a release `plan`."""
    version = plan["version"]
    before = f"{plan['previous_colour']} v{plan['previous_version']}" if plan.get("previous_version") else "nothing"
    return {"title": f"{plan['task']} v{version}: {title}",
            "figures": {"Task": plan["task"], "Version": version, "Colour": plan.get("colour"), "Live before": before,
                        "Requests": verdict.get("requests"), "Error rate": verdict.get("error_rate"),
                        "p95 ms": verdict.get("p95_ms")},
            "links": release_links(plan.get("registered_model"), version),
            "thread": release_thread(plan["task"], version)}


def _window_figures(plan: dict[str, Any], verdict: dict[str, Any], slot: str) -> dict[str, Any]:
    """What the audit trail keeps of a window's verdict (and of a person's answer)."""
    answer = verdict.get("approval") or {}
    return {"slot": slot, "canary": bool(verdict.get("canary")), "requests": verdict.get("requests"),
            "error_rate": verdict.get("error_rate"), "p95_ms": verdict.get("p95_ms"),
            "previous": f"v{plan['previous_version']}" if plan.get("previous_version") else None,
            **({"approved_by": answer.get("by")} if answer.get("asked") else {})}


def finish_release(plan: dict[str, Any], slot: str, verdict: dict[str, Any], *, gateway: Any, triton: Any) -> dict[str, Any]:
    """Promote (switch + @champion) or roll back (live untouched), and say so on Slack.

    `gateway` and `triton` are the Airflow hooks (anything with the same methods)."""
    from tuneship import registry

    version, model, name = plan["version"], plan["model"], plan["registered_model"]
    if verdict["verdict"] == "promote":
        if slot == "shadow":
            gateway.switch()
        registry.set_alias("champion", version, name)
        registry.set_version_tags(version, {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                            "colour": plan["colour"]}, name)
        publish_card(plan["task"], version)
        decided("switch", plan["task"], "; ".join(verdict.get("reasons") or ["promoted"]), version=version,
                figures=_window_figures(plan, verdict, slot))
        notify(f"{plan['task']} v{version} is live on {plan['colour']} ({'canary' if verdict.get('canary') else 'shadow'}: "
               f"{verdict['requests']} requests, "
               f"error rate {verdict['error_rate']:.3f}, p95 {verdict['p95_ms'] or 0:.0f} ms; "
               + "; ".join(verdict.get("reasons") or ["promoted"]) + ")",
               level="success", version=version, task=plan["task"], verdict=verdict,
               **release_alert(plan, verdict, f"live on {plan['colour']}"))
        return {"decision": "promoted", "version": version, "colour": plan["colour"], "verdict": verdict}
    routes = gateway.routes()
    if slot == "shadow":
        gateway.put_routes({**routes, "shadow": None})
    else:
        gateway.put_routes({**routes, "live": None, "shadow": None})
    if triton.is_ready(model):
        triton.unload(model)
    why = "; ".join(verdict.get("reasons") or [f"verdict was {verdict['verdict']}"])
    window = "the canary" if verdict.get("canary") else "the shadow window"
    publish_card(plan["task"], version, tags={"release_verdict": f"{verdict['verdict']} after {window}",
                                              "release_reason": why[:5000]})
    after = f"{verdict.get('requests', 0)} candidate answers"
    if verdict["verdict"] == "hold":
        notify(f"{plan['task']} v{version} held for a person after {window} ({after}): {why}. Nothing "
               f"was switched; live traffic stays on {plan.get('previous_colour') or 'nothing'} "
               f"v{plan.get('previous_version')}. To ship it anyway, release v{version} by hand (llm_release, "
               "`version` Param).", level="warning", version=version, task=plan["task"], verdict=verdict,
               **release_alert(plan, verdict, f"held for a person after {window}"))
        decided("release_held", plan["task"], f"after {window}: {why}", version=version,
                figures=_window_figures(plan, verdict, slot))
        raise Refusal(f"release of v{version} held for a person: {why}")
    notify(f"{plan['task']} v{version} rolled back after {window} ({after}): {why}. Live traffic stays "
           f"on {plan.get('previous_colour') or 'nothing'} v{plan.get('previous_version')}.",
           level="error", version=version, task=plan["task"], verdict=verdict,
           **release_alert(plan, verdict, f"rolled back after {window}"))
    decided("rollback", plan["task"], f"after {window}: {why}", version=version,
            figures=_window_figures(plan, verdict, slot))
    raise Refusal(f"release of v{version} rolled back: {why}")


# ------------------------------------------------------------------ progressive canary


def canary_plan(release: dict[str, Any], *, slot: str, shadow_verdict: dict[str, Any] | None,
                shadow_hours: float) -> dict[str, Any]:
    """Whether this release runs a canary, and its steps: `{"run": False, "reason"}` when the
    task's strategy is `shadow`, for a first release (nothing live to share traffic with), or
    when the shadow window did not promote; else `{"run": True, "steps", "bake_s"}`. A step
    bakes `canary_bake_minutes`, at most the release's shadow window (the demo's override
    shortens both)."""
    strategy = release.get("strategy", "shadow")
    if strategy == "shadow":
        return {"run": False, "reason": "the task's release strategy is shadow"}
    if slot != "shadow":
        return {"run": False, "reason": "first release: nothing live to share traffic with"}
    if shadow_verdict is not None and shadow_verdict.get("verdict") != "promote":
        return {"run": False, "reason": f"the shadow window decided {shadow_verdict.get('verdict')}"}
    steps = [int(w) for w in release.get("canary_steps") or [1, 5, 25, 50, 100]]
    bake = min(float(release.get("canary_bake_minutes", 60.0)) * 60, float(shadow_hours) * 3600)
    return {"run": True, "steps": steps, "bake_s": bake}


def canary_step(gateway: Any, plan: dict[str, Any], step: int, event: dict[str, Any],
                history: list[dict[str, Any]]) -> dict[str, Any]:
    """Act on the end of canary step `step` (its trigger's event): on a breach, all traffic goes
    back to live at once (weight 0) and the verdict is `rollback`; a passed step moves to the
    next weight (`{"next": i}`), and the last one's verdict is `promote`."""
    from tuneship.shadow import readable

    report = event["verdict"]
    weight = plan["steps"][step]
    history = [*history, {"step": step + 1, "weight": weight, "requests": report["requests"],
                          "errors": report["errors"], "at": event["at"], "status": event["status"]}]
    figures = {k: report.get(k) for k in ("requests", "errors", "error_rate", "p95_ms", "format_rate", "metrics",
                                          "alpha", "alpha_per_metric", "policy", "since")}
    if event["status"] == "breach":
        gateway.canary(0)
        reasons = [f"canary step {step + 1} of {len(plan['steps'])} ({weight} % of traffic): {r}"
                   for r in readable(report)]
        return {**figures, "verdict": "rollback", "reasons": reasons, "slot": "shadow",
                "canary": {"steps": history, "breached_at_weight": weight}}
    if step + 1 < len(plan["steps"]):
        gateway.canary(plan["steps"][step + 1])
        return {"next": step + 1, "history": history}
    return {**figures, "verdict": "promote", "slot": "shadow",
            "reasons": [f"canary: every step passed ({', '.join(f'{w} %' for w in plan['steps'])}), "
                        f"{report['requests']} canary answers"], "canary": {"steps": history}}


def with_params(declared: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    """A task file's settings, each replaced by the run's Param of the same name when one is
    given (None or blank: not given)."""
    given = {k: v for k, v in (params or {}).items() if v is not None and str(v).strip() != ""}
    return {k: given.get(k, v) for k, v in declared.items()}


def release_thresholds(task: Task, params: dict[str, Any]) -> dict[str, Any]:
    """The release's figures: the task's `release:` section (shadow_hours, max_error_rate,
    max_p95_ms, min_requests), each replaced by the run's Param when one is given."""
    return with_params(task.release.model_dump(exclude={"min_format_rate"}), params)


def release_windows(params: dict[str, Any], *, shadow_hours_override: Any = None,
                    post_switch_minutes_override: Any = None, retention_minutes_override: Any = None) -> dict[str, float]:
    """The release's three waits from the DAG's Params and the override Variables.

    An override Variable, when set, replaces its Param. `tuneship_shadow_hours_override`
    (staging, the demo) also caps the post-switch and retention windows at its own length
    unless their own overrides are set, so that one Variable shortens every wait."""

    def num(value: Any) -> float | None:
        if value is None or str(value).strip() == "":
            return None
        try:
            return float(value)
        except ValueError:
            raise StageFailed(f"override {value!r} is not a number") from None

    shadow = num(shadow_hours_override)
    cap = shadow * 60 if shadow is not None else None

    def minutes(param: str, override: Any) -> float:
        own = num(override)
        if own is not None:
            return own
        value = float(params[param])
        return min(value, cap) if cap is not None else value

    out = {"shadow_hours": shadow if shadow is not None else float(params["shadow_hours"]),
           "post_switch_minutes": minutes("post_switch_minutes", post_switch_minutes_override),
           "retention_minutes": minutes("retention_minutes", retention_minutes_override)}
    if out["shadow_hours"] <= 0 or out["post_switch_minutes"] <= 0 or out["retention_minutes"] < 0:
        raise StageFailed(f"release windows must be positive (retention may be 0): {out}")
    return out


def _same_route(route: dict[str, Any] | None, model: str, version: str | None) -> bool:
    return bool(route) and route.get("model") == model and str(route.get("version")) == str(version)


def guard_release(plan: dict[str, Any], verdict: dict[str, Any], *, retention_minutes: float,
                  gateway: Any, triton: Any, now: float | None = None) -> dict[str, Any]:
    """Act on the post-switch verdict (`tuneship.shadow.guard_verdict`).

    `healthy` or `insufficient` (a Slack warning: the guard could not judge): the release
    stands; returns `retain_until`, when the previous colour may be unloaded (`now` +
    `retention_minutes`; `now` when there is no previous colour).

    `breach`: traffic goes back, `@champion` follows it, Slack gets an error with the
    figures, and Refusal is raised (the task fails without a retry):
      * with a previous live version (routes' `previous`, still loaded in its retention
        window): instant `gateway.rollback()` (the previous colour is loaded first if
        Triton lost it), `@champion` back to that version;
      * first release (nothing was live before it): the live route is taken down, as a
        failed first-release shadow window does, and `@champion` is removed: traffic
        returns to where it was before the release (no model; the gateway answers 503
        "no live route"), rather than staying on a model shown to fail;
      * a previous release whose `previous` route is gone (cleared by hand): nothing is
        moved, the version stays live and the alert says so;
      * traffic already off this version (a retry after the rollback, or someone acted
        first): the routes are left as they are.
    Then the failed version's colour is cleared from `previous` (a second rollback must not
    bring it back) and unloaded from Triton when no route names it.

    `gateway` and `triton` are the Airflow hooks (anything with the same methods)."""
    from tuneship import registry

    version, model, name = str(plan["version"]), plan["model"], plan["registered_model"]
    now = time.time() if now is None else now
    status = verdict.get("verdict")
    if status in ("healthy", "insufficient"):
        has_previous = bool(plan.get("previous_version"))
        retain_until = now + (retention_minutes * 60 if has_previous else 0)
        if status == "insufficient":
            notify(f"v{version} post-switch guard could not judge: {'; '.join(verdict.get('reasons') or [])}. "
                   "The release stands" + (f"; v{plan['previous_version']} on {plan.get('previous_colour')} stays "
                                          f"loaded for {retention_minutes:g} min for an instant rollback "
                                          "(POST /admin/rollback)" if has_previous else ""),
                   level="warning", version=version, task=plan["task"], verdict=verdict,
                   **release_alert(plan, verdict, "post-switch guard could not judge"))
        return {"decision": "kept", "version": version, "colour": plan["colour"], "verdict": verdict,
                "retain_until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(retain_until))}
    if status != "breach":
        raise ValueError(f"unknown post-switch verdict {status!r}")

    why = "; ".join(verdict.get("reasons") or ["post-switch thresholds breached"])
    figs = (f"{verdict.get('requests')} requests, error rate {verdict.get('error_rate') or 0:.3f}, "
            f"p95 {verdict.get('p95_ms') or 0:.0f} ms")
    routes = gateway.routes()
    prev = routes.get("previous")
    try:
        if not _same_route(routes.get("live"), model, version):
            now_live = routes.get("live") or {}
            action = (f"traffic was already off v{version} (live: {now_live.get('colour') or 'nothing'} "
                      f"v{now_live.get('version')}); routes left as they are")
        elif plan.get("previous_version") and prev and prev.get("model") != model:
            if not triton.is_ready(prev["model"]):
                triton.load(prev["model"])
            routes = gateway.rollback()
            action = f"rolled back: live traffic is on {prev['colour']} v{prev.get('version')} again"
        elif plan.get("previous_version"):
            action = (f"NOT rolled back: the routes hold no previous colour to return to, so v{version} "
                      "is still live; roll back or take it down by hand")
        else:
            routes = gateway.put_routes({**routes, "live": None, "shadow": None})
            action = "first release, nothing to roll back to: the live route is taken down"
    except Exception as exc:
        notify(f"v{version} breached the post-switch guard ({why}; {figs}) and the automatic rollback "
               f"FAILED: {exc}. Act now: POST /admin/rollback", level="error", version=version, task=plan["task"],
               verdict=verdict, **release_alert(plan, verdict, "automatic rollback FAILED, act now"))
        raise
    live_now = routes.get("live")
    champion = registry.by_alias("champion", name)
    if champion is not None and champion.version == version:
        if live_now and not _same_route(live_now, model, version) and live_now.get("version"):
            registry.set_alias("champion", str(live_now["version"]), name)
        elif not live_now:
            registry.delete_alias("champion", name)
    registry.set_version_tags(version, {"post_switch_breach_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "post_switch_breach": why[:500]}, name)
    publish_card(plan["task"], version)
    if not _same_route(live_now, model, version):
        if _same_route(routes.get("previous"), model, version):
            routes = gateway.put_routes({**routes, "previous": None})
        if model not in {(routes.get(s) or {}).get("model") for s in ("live", "shadow", "previous")} \
                and triton.is_ready(model):
            triton.unload(model)
    champ = registry.by_alias("champion", name)
    notify(f"{plan['task']} v{version} breached the post-switch guard: {why} ({figs}). {action}. "
           f"@champion: {'v' + champ.version if champ else 'none'}.",
           level="error", version=version, task=plan["task"], verdict=verdict,
           **release_alert(plan, verdict, "post-switch guard breached"))
    decided("rollback", plan["task"], f"post-switch guard breached: {why}; {action}", version=version,
            figures={"requests": verdict.get("requests"), "error_rate": verdict.get("error_rate"),
                     "p95_ms": verdict.get("p95_ms"), "champion": champ.version if champ else None})
    raise Refusal(f"post-switch guard: v{version} breached ({why}); {action}")


def retire_previous(plan: dict[str, Any], *, gateway: Any, triton: Any) -> dict[str, Any]:
    """After the retention window: unload the colour this release replaced.

    `previous` is cleared only when it still names exactly that colour and version and
    neither live nor shadow uses its model; the model is unloaded only when no route names
    it any more (a rollback, another candidate or a hand edit since then means someone needs
    it; a retry after the clear still unloads). Clear first, then unload: from then on
    /admin/rollback answers 409 "no previous" instead of switching to an unloaded model, and
    `reconcile_serving` (which loads what live/shadow/previous name) leaves it unloaded."""
    old_version, old_colour = plan.get("previous_version"), plan.get("previous_colour")
    if not old_version or not old_colour:
        return {"retired": None, "reason": "first release: no previous colour"}
    old_model = f"{plan['task']}_{old_colour}"
    routes = gateway.routes()
    cleared = False
    if _same_route(routes.get("previous"), old_model, old_version) and \
            old_model not in {(routes.get(s) or {}).get("model") for s in ("live", "shadow")}:
        routes = gateway.put_routes({**routes, "previous": None})
        cleared = True
    named = {(routes.get(s) or {}).get("model"): s for s in ("previous", "shadow", "live") if routes.get(s)}
    if old_model in named:  # a rollback, a new candidate or a hand edit since: someone needs it
        return {"retired": None, "reason": f"{old_model} is routed as {named[old_model]}"}
    unloaded = triton.is_ready(old_model)
    if unloaded:
        triton.unload(old_model)
    publish_card(plan["task"], old_version, tags={"retired_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    decided("retire", plan["task"], f"{old_model} unloaded after v{plan['version']}'s retention window",
            version=old_version, figures={"cleared_previous": cleared, "unloaded": unloaded})
    return {"retired": old_model, "version": str(old_version), "cleared_previous": cleared, "unloaded": unloaded}


def decided(action: str, task: str, reason: str, *, version: str | int | None = None,
            figures: dict[str, Any] | None = None, actor: str | None = None, once_per: Any = None) -> None:
    """One decision into the audit trail (`tuneship.audit`), once per task instance and
    `once_per` (an Airflow retry of the same decision writes nothing new). A trail that cannot be written
    does not undo the decision: the stage's outcome stands, and Slack says the record is
    missing so a person can look (`tuneship audit verify`)."""
    from tuneship import audit
    from tuneship.shadow import finite

    try:
        audit.record(action, task=task, reason=reason or action, version=version, actor=actor,
                     figures=finite(figures or {}), key=audit.run_key(action, task, version, once_per))
    except Exception as exc:  # noqa: BLE001 - disk, lock or a damaged trail
        notify(f"The audit trail could not record {action} for {task} v{version}: {type(exc).__name__}: {exc}. "
               "Run `tuneship audit verify`.", level="error", title=f"{task}: audit record missing", task=task)


def publish_card(task: Task | str, version: str | int, tags: dict[str, str] | None = None) -> str | None:
    """(Re)write the version's model card from its lineage (`tuneship.model_card`) after a step
    that added to it, first tagging the version with `tags` (what the step decided). A card
    that cannot be written is a warning, never the step's failure (a rollback stays a
    rollback when MLflow is down): the next step writes it again from the same lineage."""
    from tuneship import model_card, registry
    from tuneship.tasks import load_task

    try:
        t = load_task(task) if isinstance(task, str) else task
        if tags:
            registry.set_version_tags(str(version), tags, t.registered_model)
        return model_card.publish(t, version)["html"]
    except Exception as exc:  # noqa: BLE001 - MLflow or disk: the release it describes goes on
        print(f"WARNING: model card of {getattr(task, 'name', task)} v{version} not written: "
              f"{type(exc).__name__}: {exc}")
        return None


# ------------------------------------------------------------------ drift


def drift_settings(task: Task, params: dict[str, Any] | None = None) -> dict[str, float]:
    """The task's drift settings, each replaced by a run's Param when one is given."""
    return with_params(task.drift.model_dump(include={"window_hours", "threshold", "min_requests", "debounce",
                                                      "cooldown_hours"}), params)


def check_drift(task: Task, *, window_hours: float, threshold: float, min_requests: int, debounce: int,
                cooldown_hours: float, run_id: str) -> dict[str, Any]:
    """The task's recent live prompts vs its champion's training reference; its governor decides
    and every decision is appended to `monitor/<task>/governor.jsonl`."""
    from dataclasses import asdict

    from tuneship import monitor, registry

    base = {"task": task.name}
    champion = registry.by_alias("champion", task.registered_model)
    if champion is None:
        return {**base, "status": "no_champion", "fire": False, "reason": "no model in production yet"}
    manifest = json.loads(Path(champion.tags["dataset_manifest"]).read_text())
    since = time.time() - window_hours * 3600
    # one streaming pass over the window: profile, seeded samples; memory flat in the requests
    window = monitor.scan_window(task.served_model, since=since, sample_size=task.drift.tests.sample_size,
                                 version=champion.version, with_calibration=task.drift.tests.calibration)
    report = monitor.drift_report(manifest["reference"], window.profile, threshold=threshold,
                                  min_requests=min_requests)
    tests = None
    if report["status"] == "ok" and (task.drift.tests.embedding or task.drift.tests.outputs):
        tests = drift_tests(task, champion, Path(champion.tags["dataset_manifest"]).parent / "train.jsonl",
                            window, window_hours=window_hours, run_id=run_id)
        if tests["drifted"] and not report["drifted"]:
            report = {**report, "drifted": True}
    wall_s = registry.run_metric(champion.run_id, "final_wall_s")
    cost = wall_s / 3600 * task.drift.gpus_per_retrain if wall_s is not None else None
    rules = task.drift.governor_rules(debounce=debounce, cooldown_hours=cooldown_hours, retrain_gpu_hours=cost)
    state = monitor.load_governor(task.name)
    now = time.time()
    fire, new_state, reason = monitor.governor_decide(state, report["drifted"], rules=rules, now=now,
                                                      latest_version=registry.latest_version(task.registered_model))
    monitor.save_governor(task.name, new_state)
    out = {**base, **{k: v for k, v in report.items() if k not in ("current", "details")}}
    out.update({"fire": fire, "reason": reason, "champion": champion.version,
                "dataset_version": champion.tags.get("dataset_version"), "retrain_gpu_hours": cost,
                "tests": tests, "why": drift_reasons(report, threshold, tests)})
    monitor.record_decision(task.name, {"at": now, "run_id": run_id, "champion": champion.version,
                                        "status": report["status"], "score": report["score"],
                                        "drifted": report["drifted"], "requests": report["requests"],
                                        "why": out["why"], "fire": fire, "reason": reason, "retrain_gpu_hours": cost,
                                        "state": asdict(new_state)})
    if report["status"] == "ok":
        chart = config.home() / "reports" / f"drift-{task.name}-{slug(run_id)}.png"
        monitor.drift_chart(manifest["reference"], report["current"], chart,
                            f"drift score {report['score']:.3f} (threshold {threshold})")
        out["chart"] = str(chart)
        out["details"] = {k: v for k, v in report["details"].items() if isinstance(v, (int, float, str))}
        path = config.home() / "monitor" / task.name / f"drift-{slug(run_id)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str))
    drift_figures = {"score": out["score"], "threshold": threshold, "requests": out["requests"],
                     "retrain_gpu_hours": cost, "why": out["why"][:20]}
    if fire:
        notify(f"Drift on {task.name} champion v{champion.version}: {'; '.join(out['why'])}; retrain requested",
               level="warning", title=f"{task.name}: drift on champion v{champion.version}, retrain requested",
               figures={"Task": task.name, "Champion": f"v{champion.version}", "Drift score": out["score"],
                        "Threshold": threshold, "Requests": out["requests"], "Window": f"{window_hours:g} h"},
               links=release_links(task.registered_model, champion.version),
               **{k: out[k] for k in ("task", "score", "requests")})
        decided("retrain_requested", task.name, reason, version=champion.version, figures=drift_figures,
                actor="governor")
    elif report["drifted"]:  # drift seen, and the governor said not now: why is on record
        decided("retrain_refused", task.name, reason, version=champion.version, figures=drift_figures,
                actor="governor")
    return out


def drift_reasons(report: dict[str, Any], threshold: float, tests: dict[str, Any] | None) -> list[str]:
    """What drifted, in words: the profile score and each feature the tests found."""
    why = []
    if report.get("score") is not None and report["score"] >= threshold:
        why.append(f"profile score {report['score']:.3f} >= {threshold:g}")
    for f in (tests or {}).get("features") or []:
        if f["drifted"]:
            why.append(f"{f['feature']}: {f['test']} p={f['p_value']:.3g} (adjusted {f['p_adjusted']:.3g} <= "
                       f"{tests['alpha']:g}), {f['effect_name']} {f['effect'] if f['effect'] is None else round(f['effect'], 4)}")
    return why


def drift_tests(task: Task, champion: Any, train_path: Path, window: Any, *, window_hours: float,
                run_id: str) -> dict[str, Any]:
    """The task's two-sample drift tests (`tuneship.drift.drift_check`, one family): embeddings
    of a seeded sample of recent prompts against the champion's training prompts, and a seeded
    sample of the champion's recent answers against one of its own answers in its first window
    after promotion, and the champion's calibration against users' feedback in the same two
    windows. `window`: the recent window's `monitor.WindowScan`."""
    from tuneship import drift, monitor

    spec = task.drift.tests
    kwargs: dict[str, Any] = {}
    if spec.embedding:
        kwargs["reference_embeddings"] = drift.reference_embeddings(train_path, n=spec.sample_size)
        kwargs["current_embeddings"] = drift.embedder().embed(window.prompts)
    promoted = champion.tags.get("promoted_at")
    if (spec.outputs or spec.calibration) and promoted:
        import calendar

        start = calendar.timegm(time.strptime(promoted, "%Y-%m-%dT%H:%M:%SZ"))
        first = monitor.scan_window(task.served_model, since=start, until=start + window_hours * 3600,
                                    sample_size=spec.sample_size, version=champion.version, with_prompts=False,
                                    with_calibration=spec.calibration)  # its first window only, however old
        ref, cur = first.answers, window.answers
        if spec.outputs and len(ref) >= 20 and len(cur) >= 20:
            from tuneship.drift import refusal_detector

            kwargs.update(reference_answers=ref, current_answers=cur, conforms=task.conforms, parse=task.parser,
                          fields=task.answers.fields, declined=refusal_detector(task))
        if spec.calibration:  # untested (and said so) until both windows hold enough feedback
            kwargs.update(reference_calibration=first.calibration, current_calibration=window.calibration,
                          min_calibration_pairs=spec.min_calibration_pairs)
    if not kwargs:
        return {"drifted": False, "features": [], "note": "nothing to test"}
    verdict, mmd = drift.drift_check(permutations=spec.permutations, method=spec.method, alpha=spec.alpha,
                                     min_effect=spec.min_effect, **kwargs)
    chart = config.home() / "reports" / f"drift-tests-{task.name}-{slug(run_id)}.png"
    drift.drift_tests_chart(verdict, chart, f"{task.name}: drift tests ({spec.method}, alpha {spec.alpha:g})", mmd)
    return {**verdict, "chart": str(chart)}


# ------------------------------------------------------------------ serving state


def reconcile_serving(task: Task, routes: dict[str, Any], triton: Any) -> dict[str, list[str]]:
    """Make Triton's colour models of `task` match its routing state (explicit model control
    starts empty after a restart, and a release that died mid-way can leave a colour loaded
    that nothing routes to): load what the task's live/shadow/previous point at, unload its
    other colour models. Another task's models are never touched. `routes`: the task's
    routes (GET /admin/routes?model=<served>); `triton`: any object with
    is_ready/load/unload/index (the Airflow TritonHook, or TritonControl)."""
    wanted = {r["model"] for slot in ("live", "shadow", "previous") if (r := routes.get(slot))}
    loaded = []
    for model in sorted(wanted):
        if (config.triton_repository() / model).exists() and not triton.is_ready(model):
            triton.load(model)
            loaded.append(model)
    colours = task.colour_models()
    stale = sorted(
        m["name"]
        for m in triton.index()
        if m.get("name") in colours and m.get("state") == "READY" and m["name"] not in wanted
    )
    for model in stale:
        triton.unload(model)
    return {"loaded": loaded, "unloaded": stale}
