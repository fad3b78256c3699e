"""A model card per registered version, generated from lineage, never typed by hand (issue 15).

Everything on the card is read back from where the loop recorded it: the MLflow model
version (its tags: base model, dataset version and manifest, recipe hash, git commit, gates,
compile, serving and promotion verdicts), its run (the recipe's hyperparameters as params,
training and gate metrics), the run's artifacts (`evaluation/v<n>.json`: every gate with its
interval, safety and fairness suites included; `serving/v<n>.json`: p95, tokens/s, memory
and cost against live), the dataset version's manifest (row counts, content hash, the
validation checks) and the task file (its declared intended use and limits).

`publish(task, version)` writes the card as JSON, Markdown and HTML, logs them to the
version's run (`model_card/`), links it from the version's description, and puts the HTML
in `TUNESHIP_HOME/reports/` where the Airflow UI's Reports page lists it. The stages call it
after each step that adds to the lineage (registration, gates, compile, serving gate,
release decision), so the card always says what is known and names what is not yet.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

from tuneship import config

NOT_YET = "not yet measured"
# run params that are bookkeeping, not hyperparameters
_NOT_HYPER = {"task", "base_model", "recipe", "recipe_hash", "runner", "dataset_version", "dataset_uri"}


def _artifact_json(run_id: str, path: str) -> dict[str, Any] | None:
    """A JSON artifact of the run (None when the step that writes it has not run)."""
    import mlflow

    from tuneship import registry

    registry.client()  # sets the tracking URI
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises by store; absent means not yet written
            return None
        return json.loads(Path(local).read_text())


def build(task: Any, version: str | int) -> dict[str, Any]:
    """The card's content for `task`'s registered `version` (a JSON-ready dict)."""
    from tuneship import registry

    c = registry.client()
    mv = c.get_model_version(task.registered_model, str(version))
    tags = dict(mv.tags)
    run = c.get_run(mv.run_id)
    params, metrics = dict(run.data.params), dict(run.data.metrics)
    aliases = sorted(getattr(mv, "aliases", None) or [])
    manifest: dict[str, Any] | None = None
    if tags.get("dataset_manifest") and Path(tags["dataset_manifest"]).exists():
        manifest = json.loads(Path(tags["dataset_manifest"]).read_text())
    evaluation = _artifact_json(mv.run_id, f"evaluation/v{version}.json")
    serving = _artifact_json(mv.run_id, f"serving/v{version}.json")
    card = getattr(task, "card", None)
    return {
        "task": task.name, "registered_model": task.registered_model, "version": str(version),
        "created": mv.creation_timestamp, "aliases": aliases, "run_id": mv.run_id,
        "intended_use": (card.intended_use if card else None) or task.description or None,
        "limits": list(card.limits) if card else [],
        "lineage": {
            "base_model": tags.get("base_model") or params.get("base_model"),
            "warm_started_from": tags.get("init_from"),
            "dataset_version": tags.get("dataset_version"),
            "dataset_manifest": tags.get("dataset_manifest"),
            "recipe": params.get("recipe"), "recipe_hash": tags.get("recipe_hash") or params.get("recipe_hash"),
            "git_commit": tags.get("git_commit"), "runner": tags.get("runner"),
            "dag_run_id": tags.get("dag_run_id"), "adapter_sha256": tags.get("adapter_sha256"),
        },
        "dataset": _dataset(manifest),
        "hyperparameters": {k: v for k, v in sorted(params.items()) if k not in _NOT_HYPER},
        "training": {k: metrics.get(k) for k in ("train_loss", "eval_loss", "tokens_per_s", "final_wall_s")
                     if metrics.get(k) is not None},
        "gates": _gates(evaluation, tags),
        "compile": {"build": tags.get("compiled"), "quantization": tags.get("quantization")}
        if tags.get("compiled") or tags.get("quantization") else None,
        "serving": _serving(serving, tags, task.serving.price_per_hour),
        "release": {k: tags[k] for k in ("promoted_at", "colour", "release_verdict", "release_reason",
                                         "post_switch_breach_at", "post_switch_breach", "retired_at")
                    if k in tags} or None,
    }


def _dataset(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    checks = manifest.get("checks") or []
    return {"version_id": manifest.get("version_id"), "created_at": manifest.get("created_at"),
            "source": manifest.get("source_uri"), "rows": manifest.get("rows"),
            "content_sha256": (manifest.get("sha256") or {}).get("content"),
            "quarantined": (manifest.get("quarantine") or {}).get("count"),
            "checks": [{"check": ch.get("name"), "passed": bool(ch.get("passed")), "severity": ch.get("severity")}
                       for ch in checks if isinstance(ch, dict)],
            "data_docs": (manifest.get("validation") or {}).get("data_docs")}


def _gates(evaluation: dict[str, Any] | None, tags: dict[str, str]) -> dict[str, Any] | None:
    if evaluation is None:
        return None
    rows = [{k: r.get(k) for k in ("suite", "metric", "rule", "threshold", "value", "low", "high", "reference", "diff",
                                   "diff_low", "diff_high", "verdict", "reason")} for r in evaluation.get("gates") or []]
    return {"verdict": tags.get("gates") or ("passed" if evaluation.get("passed") else "failed"),
            "reference": evaluation.get("reference_name"), "suites": evaluation.get("suites"), "rows": rows}


def _serving(serving: dict[str, Any] | None, tags: dict[str, str], price_per_hour: float | None) -> dict[str, Any] | None:
    if serving is None:
        return None
    cand = serving.get("candidate") or {}
    return {"verdict": tags.get("serving") or ("passed" if serving.get("passed") else "failed"),
            "against": f"v{serving['live_version']}" if serving.get("live_version") else "ceilings only",
            **{k: cand.get(k) for k in ("p95_ms", "tokens_per_s", "peak_memory_mb", "cost_per_1k_tokens")},
            "price_per_hour": price_per_hour,
            "rows": [{k: r.get(k) for k in ("metric", "rule", "threshold", "value", "diff", "diff_low", "diff_high",
                                            "verdict")}
                     for r in serving.get("rows") or []]}


# ------------------------------------------------------------------ rendering


def _fmt(v: Any) -> str:
    from tuneship.report import fmt

    return fmt(v)


def _cost(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _interval(lo: Any, hi: Any) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]" if lo is not None or hi is not None else ""


def _sections(card: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]] | None]]:
    """(heading, lines, table rows) for each section: one source for Markdown and HTML."""
    lin = card["lineage"]
    out: list[tuple[str, list[str], list[list[Any]] | None]] = []
    out.append(("Intended use", [card["intended_use"] or "not declared (task file: `card.intended_use`)",
                                 "Limits:" if card["limits"] else "Limits: not declared (task file: `card.limits`)",
                                 *[f"- {x}" for x in card["limits"]]], None))
    out.append(("Lineage", [], [[k.replace("_", " "), v if v is not None else "-"] for k, v in lin.items()]))
    ds = card["dataset"]
    if ds is None:
        out.append(("Dataset", [f"manifest {lin['dataset_manifest'] or '-'} not readable here"], None))
    else:
        passed = sum(1 for ch in ds["checks"] if ch["passed"])
        out.append(("Dataset", [f"version {ds['version_id']} from {ds['source']} ({ds['created_at']}); rows "
                                f"{json.dumps(ds['rows'])}; content sha256 {ds['content_sha256']}; quarantined "
                                f"{ds['quarantined'] or 0}; validation: {passed} of {len(ds['checks'])} checks passed"
                                + (f"; data docs {ds['data_docs']}" if ds.get("data_docs") else "")], None))
    out.append(("Recipe and hyperparameters", [],
                [[k, v] for k, v in card["hyperparameters"].items()] or [["-", "-"]]))
    out.append(("Training", [] if card["training"] else [NOT_YET],
                [[k.replace("_", " "), _fmt(v)] for k, v in card["training"].items()] or None))
    g = card["gates"]
    if g is None:
        out.append(("Gates (95% intervals)", [NOT_YET], None))
    else:
        out.append((f"Gates (95% intervals): {g['verdict']} against {g['reference']}", [],
                    [[r["suite"], r["metric"], f"{r['rule']} {_fmt(r['threshold'])}", _fmt(r["value"]), _interval(r["low"], r["high"]),
                      _fmt(r["reference"]), _fmt(r["diff"]), _interval(r["diff_low"], r["diff_high"]), r["verdict"]]
                     for r in g["rows"]]))
    cp = card["compile"]
    out.append(("Compile", [NOT_YET] if cp is None else
                [f"build: {cp['build'] or '-'}; quantization gate: {cp['quantization'] or 'passed or not applicable'}"],
                None))
    s = card["serving"]
    if s is None:
        out.append(("Serving and cost", [NOT_YET], None))
    else:
        out.append((f"Serving and cost: {s['verdict']} against {s['against']}",
                    [f"p95 {_fmt(s['p95_ms'])} ms, {_fmt(s['tokens_per_s'])} tokens/s, peak memory "
                     f"{_fmt(s['peak_memory_mb'])} MB, {_cost(s['cost_per_1k_tokens'])} USD per 1k tokens "
                     f"(at {_fmt(s['price_per_hour'])} USD an hour)"],
                    [[r["metric"], f"{r['rule']} {_fmt(r['threshold'])}", _fmt(r["value"]), _fmt(r["diff"]),
                      _interval(r["diff_low"], r["diff_high"]), r["verdict"]]
                     for r in s["rows"]] or None))
    rel = card["release"]
    out.append(("Release", ["not released yet"] if rel is None else [f"{k.replace('_', ' ')}: {v}" for k, v in rel.items()],
                None))
    return out


_HEADS = {"Lineage": ["field", "value"], "Recipe and hyperparameters": ["parameter", "value"],
          "Training": ["metric", "value"],
          "Gates": ["suite", "metric", "rule", "value", "95% interval", "reference", "difference", "interval", "verdict"],
          "Serving": ["metric", "rule", "value", "ratio to live", "interval", "verdict"]}


def _head(title: str) -> list[str]:
    return next(h for k, h in _HEADS.items() if title.startswith(k))


def title(card: dict[str, Any]) -> str:
    return f"Model card: {card['registered_model']} v{card['version']} (task {card['task']})"


def markdown(card: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title(card)}", "", f"Aliases: {', '.join(card['aliases']) or 'none'}; MLflow run {card['run_id']}.",
             "Generated from lineage by Tuneship; do not edit by hand.", ""]
    for heading, text, rows in _sections(card):
        lines += [f"## {heading}", ""]
        for t in text:  # paragraphs, a list kept together
            lines += [t] if t.startswith("- ") else ["", t] if lines[-1] else [t]
        if lines[-1]:
            lines.append("")
        if rows:
            head = _head(heading)
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def to_html(card: dict[str, Any]) -> str:
    from tuneship.report import page, table

    parts = [f"<h1>{html.escape(title(card))}</h1>",
             f"<p>Aliases: {html.escape(', '.join(card['aliases']) or 'none')}; MLflow run "
             f"<code>{html.escape(card['run_id'])}</code>. Generated from lineage; do not edit by hand.</p>"]
    for heading, text, rows in _sections(card):
        items = "".join(f"<li>{html.escape(t[2:])}</li>" for t in text if t.startswith("- "))
        parts.append(f"<h2>{html.escape(heading)}</h2>" + "".join(f"<p>{html.escape(t)}</p>" for t in text
                                                                   if not t.startswith("- "))
                     + (f"<ul>{items}</ul>" if items else ""))
        if rows:
            parts.append(table(rows, _head(heading)))
    return page(title(card), "\n".join(parts))


def report_path(task: str, version: str | int) -> Path:
    return config.home() / "reports" / f"model-card-{task}-v{version}.html"


def publish(task: Any, version: str | int) -> dict[str, Any]:
    """Build the card, log it to the version's run (`model_card/card.{json,md,html}`), link it
    from the version's description and write the HTML where the UI's Reports page lists it."""
    from tuneship import atomic, registry

    card = build(task, version)
    md, page = markdown(card), to_html(card)
    c = registry.client()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("card.json", json.dumps(card, indent=2, default=str)), ("card.md", md),
                           ("card.html", page)):
            (Path(tmp) / name).write_text(text)
            c.log_artifact(card["run_id"], str(Path(tmp) / name), artifact_path="model_card")
    path = report_path(task.name, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, page)
    run = c.get_run(card["run_id"])
    link = f"{run.info.artifact_uri}/model_card/card.md"
    summary = (f"Model card (generated from lineage): {link}. UI: /tuneship/reports/{path.name}. "
               f"Gates: {(card['gates'] or {}).get('verdict', NOT_YET)}; serving: "
               f"{(card['serving'] or {}).get('verdict', NOT_YET)}.")
    c.update_model_version(task.registered_model, str(version), description=summary)
    return {"card": card, "html": str(path), "artifact": link}
