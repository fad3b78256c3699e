"""The loop's stages as plain functions: what each Airflow task does, minus Airflow.

Every function takes and returns references (paths, version ids, run ids) and is
idempotent for the same inputs, so a retried task never registers a second model version
or trains twice. The DAG files only wire these together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tuneship import atomic, config
from tuneship.notify import notify

COLOURS = ("blue", "green")


class StageFailed(RuntimeError):
    """A stage could not do its job; the message is written for the person who reads the alert.
    Retried like any other fault (a lost connection, a half-written output)."""


class Refusal(StageFailed):
    """A gate's decision (dataset rejected, gates failed, smoke failed, shadow rollback,
    post-switch breach): the same bytes would be refused again, so it is never retried and
    alerted exactly once, by the stage that decided. The Airflow layer fails the task
    without a retry (`tuneship_airflow.refusals`)."""


def default_base_model() -> str:
    from tuneship.basemodel import default_dir

    return os.environ.get("TUNESHIP_BASE_MODEL", str(default_dir()))


def ensure_base_model(ref: str | None = None) -> str:
    """A local tiny base model is built on first use; a real HF id/path is used as given."""
    ref = ref or default_base_model()
    if ref == default_base_model() and not (Path(ref) / "base_model.json").exists():
        from tuneship.basemodel import build_base_model

        build_base_model(Path(ref))
    return ref


# ------------------------------------------------------------------ data


def datasets_root() -> Path:
    return config.artifacts() / "datasets"


def latest_dataset() -> dict[str, str] | None:
    pointer = datasets_root() / "LATEST"
    if not pointer.exists():
        return None
    vid = pointer.read_text().strip()
    return {"version_id": vid, "path": str(datasets_root() / vid),
            "manifest_uri": str(datasets_root() / vid / "manifest.json")}


def incoming_batch() -> str | None:
    """The newest batch directory that landed in the incoming location, if any."""
    root = config.incoming()
    batches = [p for p in root.iterdir() if p.is_dir() and any(p.glob("train.*"))] if root.exists() else []
    return str(max(batches, key=lambda p: p.stat().st_mtime)) if batches else None


def batches_to_validate(dataset_uri: str | None, triggering_asset_events: Any) -> list[str]:
    """What a validation run takes in: the `dataset_uri` Param if set; else every batch the
    incoming-data watcher announced for this run (`extra.payload.dataset_uri`, in landing
    order: several landings can start one run); else the newest batch in the incoming
    location (the nightly run)."""
    if dataset_uri:
        return [dataset_uri]
    uris = [
        (event.extra or {}).get("payload", {}).get("dataset_uri")
        for events in (triggering_asset_events or {}).values()
        for event in events
    ]
    landed = list(dict.fromkeys(u for u in uris if u))
    if landed:
        return landed
    newest = incoming_batch()
    return [newest] if newest else []


def validate_batches(uris: list[str], *, run_id: str) -> dict[str, Any] | None:
    """Validate and version each batch; the newest newly versioned one (None: nothing new).
    Every batch is validated even when an earlier one is rejected, and the run then fails
    with all the rejections, so none goes unreported."""
    created, rejected = [], []
    for uri in uris:
        try:
            result = validate_and_version(uri, run_id=run_id)
        except Refusal as exc:
            rejected.append(str(exc))
            continue
        if result["created"]:
            created.append(result)
    if rejected:
        raise Refusal("\n\n".join(rejected))
    return created[-1] if created else None


def validate_and_version(dataset_uri: str, *, run_id: str) -> dict[str, Any]:
    """Validate with Great Expectations, version what is accepted, explain what is not."""
    from tuneship.data import validate_dataset, version_dataset

    workdir = config.home() / "validation" / slug(run_id)
    previous = latest_dataset()
    prev_manifest = json.loads(Path(previous["manifest_uri"]).read_text()) if previous else None
    report = validate_dataset(dataset_uri, previous_manifest=prev_manifest, workdir=workdir)
    if not report.accepted:
        message = report.summary()
        notify(f"Dataset rejected: {dataset_uri}\n{message}", level="error", dataset_uri=dataset_uri)
        raise Refusal(message)
    version = version_dataset(dataset_uri, report, artifacts_root=config.artifacts())
    atomic.write_text(datasets_root() / "LATEST", version.version_id)
    result = {"version_id": version.version_id, "manifest_uri": str(version.manifest_uri),
              "path": str(version.path), "created": bool(version.created),
              "data_docs": str(report.data_docs_path) if report.data_docs_path else None,
              "quarantined": report.quarantine_count}
    if version.created:
        notify(f"Dataset {version.version_id} accepted from {dataset_uri}", level="success", **result)
    return result


def dataset_for_retrain(run_id: str) -> dict[str, str] | None:
    """A drift-triggered retrain first takes in labelled data that landed since the last
    accepted version (the same GE checks and versioning as llm_data_validation; already
    versioned content is a no-op), then trains on the newest accepted version."""
    batch = incoming_batch()
    if batch is not None:
        result = validate_and_version(batch, run_id=run_id)
        return {k: result[k] for k in ("version_id", "manifest_uri", "path")}
    return latest_dataset()


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


# ------------------------------------------------------------------ fine-tune


def finetune_plan(*, dataset: dict[str, str], params: dict[str, Any], run_key: str,
                  trigger: str) -> dict[str, Any]:
    """Everything the trainer needs, as references; identical for every runner."""
    from tuneship.runners import trainer_command

    base = ensure_base_model(params.get("base_model") or None)
    fields = {"lora.r": "lora_r", "lora.alpha": "lora_alpha", "epochs": "epochs",
              "learning_rate": "learning_rate", "seed": "seed"}
    overrides = {key: params[name] for key, name in fields.items() if params.get(name) is not None}
    out = config.artifacts() / "runs" / slug(run_key) / "train"
    from tuneship.train.recipe import default_recipe_path

    recipe = params.get("recipe") or "tiny-lora"
    recipe = recipe if recipe.endswith((".yaml", ".yml")) else str(default_recipe_path(recipe))
    return {
        "run_key": run_key,
        "trigger": trigger,
        "dataset": dataset,
        "base_model": base,
        "recipe": recipe,
        "overrides": overrides,
        "output_dir": str(out),
        "command": trainer_command(recipe, dataset["path"], base, str(out), overrides),
        "runner": params["runner"],
    }


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
    run_id = registry.start_run(plan["run_key"], run_name=f"finetune {plan['dataset']['version_id']}",
                                tags={"runner": plan["runner"], "trigger": plan["trigger"]})
    params = {"base_model": plan["base_model"], "recipe": Path(plan["recipe"]).name, "recipe_hash": rhash,
              "runner": plan["runner"], **{k: v for k, v in plan["overrides"].items()}}
    registry.log_training(run_id, params=params, train_out=out, dataset=plan["dataset"])
    from tuneship.basemodel import sha256_file

    adapter_sha = sha256_file(out / "adapter" / "adapter_model.safetensors")
    mv = registry.register(run_id, plan["run_key"], tags={
        "base_model": plan["base_model"],
        "dataset_version": plan["dataset"]["version_id"],
        "dataset_manifest": plan["dataset"]["manifest_uri"],
        "recipe_hash": rhash,
        "git_commit": git_commit(),
        "runner": plan["runner"],
        "dag_run_id": plan["run_key"],
        "adapter_sha256": adapter_sha,
    })
    metrics = json.loads((out / "metrics.json").read_text())
    return {"name": mv.name, "version": mv.version, "run_id": run_id, "adapter_sha256": adapter_sha,
            "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
            "tokens_per_s": metrics.get("tokens_per_s"), "loss_curve": str(out / "loss_curve.png")}


def _adapter_dir(version: str) -> Path:
    """A local copy of a registered version's adapter (downloaded once)."""
    from tuneship import registry

    dest = config.artifacts() / "registry-cache" / f"v{version}"
    adapter = dest / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        registry.download_adapter(registry.get_version(version), dest)
    return adapter


def _generator(base_ref: str, adapter_dir: Path | None):
    from tuneship.basemodel import load_base
    from tuneship.generate import generate

    model, tokenizer = load_base(base_ref)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return lambda prompts, max_new: generate(model, tokenizer, prompts, max_new_tokens=max_new)


def evaluate_candidate(candidate: dict[str, Any], dataset: dict[str, str], suite_name: str = "triage") -> dict[str, Any]:
    """Score candidate and reference (champion, else base model) on the same cases; apply gates."""
    from tuneship import registry
    from tuneship.evaluate import apply_gates, load_cases, load_suite, run_suite

    suite = load_suite(suite_name)
    cases = load_cases(suite, Path(dataset["path"]))
    mv = registry.get_version(candidate["version"])
    base = mv.tags["base_model"]
    cand = run_suite(suite, _generator(base, _adapter_dir(candidate["version"])), cases)
    champion = registry.by_alias("champion")
    if champion and champion.version != candidate["version"]:
        ref_name = f"champion v{champion.version}"
        ref = run_suite(suite, _generator(champion.tags["base_model"], _adapter_dir(champion.version)), cases)
    else:
        ref_name = "base model"
        ref = run_suite(suite, _generator(base, None), cases)
    gates = apply_gates(suite, cand, ref, ref_name)
    registry.log_metrics(mv.run_id, {f"eval_{k}": v for k, v in cand.metrics.items()})
    registry.set_version_tags(candidate["version"], {"gates": "passed" if gates.passed else "failed",
                                                     **{f"eval_{k}": f"{v:.4f}" for k, v in cand.metrics.items()}})
    result = {"suite": f"{suite.name}@v{suite.version}", "candidate": cand.to_dict(), "reference": ref.to_dict(),
              "reference_name": ref_name, "gates": gates.to_dict(), "passed": gates.passed}
    out = config.artifacts() / "evals" / f"v{candidate['version']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    registry.log_artifact(mv.run_id, out, "evaluation")
    if not gates.passed:
        notify(f"Model v{candidate['version']} failed its gates against {ref_name}:\n{gates.summary()}",
               level="error", version=candidate["version"])
        raise Refusal(f"gates failed against {ref_name}:\n{gates.summary()}")
    return {"passed": True, "metrics": cand.metrics, "reference": ref.metrics, "reference_name": ref_name,
            "report": str(out)}


def compile_candidate(candidate: dict[str, Any]) -> dict[str, Any]:
    """ONNX export + ONNX Runtime parity: a Triton-ready package. (TensorRT is not built here:
    `tuneship.compile.tensorrt_build_command` renders its command, checked by contract.)"""
    from tuneship import registry
    from tuneship.compile import compile_for_triton

    version = candidate["version"]
    package = config.artifacts() / "compiled" / f"v{version}"
    marker = package / "COMPILED.json"
    if marker.exists():
        return json.loads(marker.read_text())
    mv = registry.get_version(version)
    deployment = {"model": mv.name, "version": version, "adapter_sha256": mv.tags.get("adapter_sha256"),
                  "base_model": mv.tags.get("base_model"), "dataset_version": mv.tags.get("dataset_version")}
    info = compile_for_triton(mv.tags["base_model"], _adapter_dir(version), package, "llm", deployment=deployment)
    # Round-trip through JSON so the XCom holds plain values (paths become strings).
    result = json.loads(json.dumps({"version": version, "package": str(package / "llm"), **info}, default=str))
    marker.write_text(json.dumps(result, indent=2))
    registry.set_version_tags(version, {"compiled": "onnx", "onnx_sha256": str(info.get("sha256", ""))})
    return result


# ------------------------------------------------------------------ release


def idle_colour(routes: dict[str, Any]) -> str:
    live = (routes.get("live") or {}).get("colour")
    return "green" if live == "blue" else "blue"


def stage_into_repository(package: str, colour: str) -> str:
    """Copy the compiled package into Triton's repository as `llm_<colour>`, atomically."""
    name = f"llm_{colour}"
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


def warm_up_candidate(model: str, triton: Any, suite_name: str = "smoke") -> dict[str, Any]:
    """After the load and readiness, before smoke and traffic: the smoke suite's prompts go
    straight to the candidate through Triton (`triton`: TritonHook or TritonControl). A
    failed warm-up is a failed load: live traffic is untouched and the message says why."""
    from tuneship.evaluate import load_cases, load_suite

    prompts = [case.prompt for case in load_cases(load_suite(suite_name))]
    try:
        return triton.warm_up(model, prompts)
    except RuntimeError as exc:
        notify(f"candidate {model} failed its warm-up: {exc}; live traffic untouched", level="error")
        raise StageFailed(str(exc)) from exc


def smoke_through_gateway(colour_model: str, *, base_url: str, token: str, suite_name: str = "smoke") -> dict[str, Any]:
    """Smoke cases through the gateway, addressed to the candidate colour only."""
    import httpx

    from tuneship.evaluate import apply_gates, load_cases, load_suite, score

    suite = load_suite(suite_name)
    cases = load_cases(suite)
    outs = []
    colour = colour_model.removeprefix("llm_")
    with httpx.Client(base_url=base_url, timeout=60.0,
                      headers={"Authorization": f"Bearer {token}", "X-Tuneship-Target": colour}) as c:
        served = c.get("/admin/routes").json()["served_model"]
        for case in cases:
            r = c.post("/v1/completions", json={"model": served, "prompt": case.prompt,
                                                 "max_tokens": suite.generation.max_new_tokens, "temperature": 0})
            if r.status_code != 200:
                raise StageFailed(f"smoke request to {colour_model} failed: HTTP {r.status_code} {r.text[:300]}")
            outs.append(r.json()["choices"][0]["text"])
    result = score(suite, cases, outs)
    gates = apply_gates(suite, result, None)  # the same gate logic as evaluation; no reference here
    return {"metrics": result.metrics, "passed": gates.passed, "samples": result.samples[:3],
            "failed": [g.metric for g in gates.gates if not g.passed], "gates": gates.summary()}


def smoke_candidate(colour_model: str, version: str, *, gateway: Any, triton: Any) -> dict[str, Any]:
    """Smoke is a gate: scores below it are a decision (Slack once, the candidate unloaded,
    Refusal); a smoke request the gateway could not answer is a fault (StageFailed, retried).
    Live traffic is untouched either way: nothing routes to the candidate yet.

    `gateway` and `triton` are the Airflow hooks (anything with the same methods)."""
    base_url, token = gateway.endpoint()
    result = smoke_through_gateway(colour_model, base_url=base_url, token=token)
    if result["passed"]:
        return result
    figures = ", ".join(f"{m} {result['metrics'][m]:.3f}" for m in result["failed"])
    if triton.is_ready(colour_model):
        triton.unload(colour_model)
    notify(f"v{version} failed smoke on {colour_model} ({figures}); candidate unloaded, live traffic untouched",
           level="error", version=version, smoke=result)
    raise Refusal(f"smoke failed on {colour_model} (v{version}): {figures} below the smoke suite's gates; "
                  f"samples: {result['samples']}")


def release_plan(candidate: dict[str, Any] | None, version: str | None, routes: dict[str, Any]) -> dict[str, Any] | None:
    """Which version to release and from which compiled package."""
    from tuneship import registry

    if version:
        compiled = compile_candidate({"version": version})
        candidate = {"version": version, "package": compiled["package"]}
    if not candidate:
        return None
    mv = registry.get_version(candidate["version"])
    live = routes.get("live") or {}
    dataset = mv.tags.get("dataset_version")
    manifest = datasets_root() / str(dataset) / "manifest.json"
    schema = json.loads(manifest.read_text()).get("schema") if dataset and manifest.exists() else None
    return {"version": str(candidate["version"]), "package": candidate["package"],
            "adapter_sha256": mv.tags.get("adapter_sha256"), "dataset_version": dataset,
            "dataset_schema": schema,
            "previous_version": live.get("version"), "previous_colour": live.get("colour")}


def route_for(plan: dict[str, Any], model: str) -> dict[str, Any]:
    """The gateway route for a loaded colour (what /version reports)."""
    from tuneship import registry

    return {"colour": plan["colour"], "model": model, "version": str(plan["version"]),
            "registered_model": registry.MODEL_NAME, "adapter_sha256": plan.get("adapter_sha256"),
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # prompt/completion-trained models take a chat's user turn as the plain prompt
            "metadata": {"dataset_version": plan.get("dataset_version"),
                         "prompt_format": "chat" if plan.get("dataset_schema") == "chat" else "plain"}}


def finish_release(plan: dict[str, Any], slot: str, verdict: dict[str, Any], *, gateway: Any, triton: Any) -> dict[str, Any]:
    """Promote (switch + @champion) or roll back (live untouched), and say so on Slack.

    `gateway` and `triton` are the Airflow hooks (anything with the same methods)."""
    from tuneship import registry

    version, model = plan["version"], f"llm_{plan['colour']}"
    if verdict["verdict"] == "promote":
        if slot == "shadow":
            gateway.switch()
        registry.set_alias("champion", version)
        registry.set_version_tags(version, {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                            "colour": plan["colour"]})
        notify(f"v{version} is live on {plan['colour']} (shadow: {verdict['requests']} requests, "
               f"error rate {verdict['error_rate']:.3f}, p95 {verdict['p95_ms'] or 0:.0f} ms)",
               level="success", version=version, verdict=verdict)
        return {"decision": "promoted", "version": version, "colour": plan["colour"], "verdict": verdict}
    routes = gateway.routes()
    if slot == "shadow":
        gateway.put_routes({**routes, "shadow": None})
    else:
        gateway.put_routes({**routes, "live": None, "shadow": None})
    if triton.is_ready(model):
        triton.unload(model)
    why = "; ".join(verdict.get("reasons") or ["verdict was rollback"])
    notify(f"v{version} rolled back after the shadow window: {why}. Live traffic stays on "
           f"{plan.get('previous_colour') or 'nothing'} v{plan.get('previous_version')}.",
           level="error", version=version, verdict=verdict)
    raise Refusal(f"release of v{version} rolled back: {why}")


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
    """Act on the post-switch verdict (`tuneship.monitor.post_switch_verdict`).

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

    version, model = str(plan["version"]), f"llm_{plan['colour']}"
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
                   level="warning", version=version, verdict=verdict)
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
               f"FAILED: {exc}. Act now: POST /admin/rollback", level="error", version=version, verdict=verdict)
        raise
    live_now = routes.get("live")
    champion = registry.by_alias("champion")
    if champion is not None and champion.version == version:
        if live_now and not _same_route(live_now, model, version) and live_now.get("version"):
            registry.set_alias("champion", str(live_now["version"]))
        elif not live_now:
            registry.delete_alias("champion")
    registry.set_version_tags(version, {"post_switch_breach_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "post_switch_breach": why[:500]})
    if not _same_route(live_now, model, version):
        if _same_route(routes.get("previous"), model, version):
            routes = gateway.put_routes({**routes, "previous": None})
        if model not in {(routes.get(s) or {}).get("model") for s in ("live", "shadow", "previous")} \
                and triton.is_ready(model):
            triton.unload(model)
    champ = registry.by_alias("champion")
    notify(f"v{version} breached the post-switch guard: {why} ({figs}). {action}. "
           f"@champion: {'v' + champ.version if champ else 'none'}.",
           level="error", version=version, verdict=verdict)
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
    old_model = f"llm_{old_colour}"
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
    return {"retired": old_model, "version": str(old_version), "cleared_previous": cleared, "unloaded": unloaded}


# ------------------------------------------------------------------ drift


def check_drift(*, window_hours: float, threshold: float, min_requests: int, debounce: int,
                cooldown_hours: float, run_id: str) -> dict[str, Any]:
    """Recent live prompts vs the champion's training reference; the governor decides."""
    from tuneship import monitor, registry
    from tuneship.inference_log import read_inference_log

    champion = registry.by_alias("champion")
    if champion is None:
        return {"status": "no_champion", "fire": False, "reason": "no model in production yet"}
    manifest = json.loads(Path(champion.tags["dataset_manifest"]).read_text())
    since = time.time() - window_hours * 3600
    records = read_inference_log(monitor.log_root(), since=since)
    prompts = [r["prompt"] for r in records if monitor.is_ok(r.get("live") or {})]
    report = monitor.drift_report(manifest["reference"], prompts, threshold=threshold, min_requests=min_requests)
    state = monitor.load_governor()
    fire, new_state, reason = monitor.governor_decide(state, report["drifted"], debounce=debounce,
                                                      cooldown_s=cooldown_hours * 3600)
    monitor.save_governor(new_state)
    out = {k: v for k, v in report.items() if k not in ("current", "details")}
    out.update({"fire": fire, "reason": reason, "champion": champion.version,
                "dataset_version": champion.tags.get("dataset_version")})
    if report["status"] == "ok":
        chart = config.home() / "reports" / f"drift-{slug(run_id)}.png"
        monitor.drift_chart(manifest["reference"], report["current"], chart,
                            f"drift score {report['score']:.3f} (threshold {threshold})")
        out["chart"] = str(chart)
        out["details"] = {k: v for k, v in report["details"].items() if isinstance(v, (int, float, str))}
        path = config.home() / "monitor" / f"drift-{slug(run_id)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str))
    if fire:
        notify(f"Drift on champion v{champion.version}: score {report['score']:.3f} >= {threshold}; "
               "retrain requested", level="warning", **{k: out[k] for k in ("score", "requests")})
    return out


# ------------------------------------------------------------------ serving state


def reconcile_serving(routes: dict[str, Any] | None = None, triton: Any = None) -> dict[str, list[str]]:
    """Make Triton's colour models match the routing state (explicit model control starts
    empty after a restart, and a release that died mid-way can leave a colour loaded that
    nothing routes to): load what the routes' live/shadow/previous point at, unload the
    other `llm_<colour>` models. `routes` default: the gateway's routes file; `triton`: any
    object with is_ready/load/unload/index (the Airflow TritonHook, or TritonControl)."""
    from tuneship.triton_control import TritonControl

    if routes is None:
        routes_path = config.home() / "gateway" / "routes.json"
        routes = json.loads(routes_path.read_text()) if routes_path.exists() else {}
    triton = triton or TritonControl(config.triton_url())
    wanted = {r["model"] for slot in ("live", "shadow", "previous") if (r := routes.get(slot))}
    loaded = []
    for model in sorted(wanted):
        if (config.triton_repository() / model).exists() and not triton.is_ready(model):
            triton.load(model)
            loaded.append(model)
    colours = {f"llm_{c}" for c in COLOURS}
    stale = sorted(
        m["name"]
        for m in triton.index()
        if m.get("name") in colours and m.get("state") == "READY" and m["name"] not in wanted
    )
    for model in stale:
        triton.unload(model)
    return {"loaded": loaded, "unloaded": stale}
