"""Approval before the switch (issue 15): when a release waits for a person, what the person
is shown, and what their answer does. No Airflow import: `ReleaseApprovalOperator` (plugins)
asks through Airflow's human-in-the-loop request and hands the answer back here.

A release asks when the task file's `approval.when` says so:

* `always`;
* `changed`: something the checklist names differs from the champion's lineage (the
  dataset's schema or its source, the recipe's hyperparameters, the base model; a first
  release, with nothing to compare, counts as changed);
* `inconclusive`: the shadow or canary window ended undecided (`release.on_open: hold`);

and, whatever `when` says, when a gate suite held an inconclusive interval for a person
(`statistics.on_inconclusive: hold`). The request names every reason with its figures and
links the model card, the MLflow version and the Airflow run. Approve promotes (a held
window included); Reject, or no answer within `approval.timeout_hours` when
`on_timeout: rollback`, rolls the candidate back with live untouched. The answer, who gave
it, when, and their comment go into the verdict (and from there to Slack, the model card and
the audit trail).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

APPROVE, REJECT = "Approve", "Reject"
OPTIONS = [APPROVE, REJECT]


def _manifest(mv: Any) -> dict[str, Any]:
    path = mv.tags.get("dataset_manifest")
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}


def lineage_changes(task: Any, version: str) -> list[dict[str, Any]]:
    """What differs between the candidate's lineage and the champion's, among what the task
    counts as a change (`approval.changes`); a first release is one change ("no champion")."""
    from tuneship import registry

    cand = registry.get_version(str(version), task.registered_model)
    champ = registry.by_alias("champion", task.registered_model)
    if champ is None:
        return [{"what": "first release", "champion": None, "candidate": f"v{version}"}]
    if str(champ.version) == str(version):
        return []
    out = []
    watched = set(task.approval.changes)
    if "base_model" in watched and cand.tags.get("base_model") != champ.tags.get("base_model"):
        out.append({"what": "base_model", "champion": champ.tags.get("base_model"),
                    "candidate": cand.tags.get("base_model")})
    if "hyperparameters" in watched and cand.tags.get("recipe_hash") != champ.tags.get("recipe_hash"):
        c = registry.client()
        before, after = c.get_run(champ.run_id).data.params, c.get_run(cand.run_id).data.params
        keys = sorted(k for k in set(before) | set(after)
                      if before.get(k) != after.get(k) and k not in ("recipe_hash", "runner", "task"))
        out.append({"what": "hyperparameters", "champion": {k: before.get(k) for k in keys},
                    "candidate": {k: after.get(k) for k in keys}})
    if {"dataset_schema", "dataset_source"} & watched:
        m_cand, m_champ = _manifest(cand), _manifest(champ)
        if "dataset_schema" in watched and m_cand.get("schema") != m_champ.get("schema"):
            out.append({"what": "dataset_schema", "champion": m_champ.get("schema"), "candidate": m_cand.get("schema")})
        src = [str(Path(m["source_uri"]).parent) if m.get("source_uri") else None for m in (m_champ, m_cand)]
        if "dataset_source" in watched and src[0] != src[1]:
            out.append({"what": "dataset_source", "champion": src[0], "candidate": src[1]})
    return out


def reasons(task: Any, version: str, verdict: dict[str, Any]) -> list[str]:
    """Why this release must wait for a person (empty: it need not)."""
    from tuneship import registry
    from tuneship.shadow import readable

    when = set(task.approval.when)
    why = []
    if "always" in when:
        why.append("the task asks a person to approve every release")
    if "changed" in when:
        for ch in lineage_changes(task, version):
            why.append(f"{ch['what'].replace('_', ' ')} changed against the champion: "
                       f"{json.dumps(ch['champion'])} -> {json.dumps(ch['candidate'])}")
    window = "canary" if verdict.get("canary") else "shadow window"
    if "inconclusive" in when and verdict.get("verdict") == "hold":
        why.append(f"the {window} ended undecided after {verdict.get('requests', 0)} requests: "
                   + "; ".join(readable(verdict) or ["no bound crossed"]))
    held = registry.get_version(str(version), task.registered_model).tags.get("gates_held")
    if held:
        why.append(f"gates held for a person (inconclusive intervals): {held}")
    return why


def request(task: Any, plan: dict[str, Any], verdict: dict[str, Any], why: list[str], *,
            links: dict[str, str]) -> tuple[str, str]:
    """The request's subject and Markdown body: why it asks, the figures, the links."""
    from tuneship import registry

    version = str(plan["version"])
    tags = registry.get_version(version, task.registered_model).tags
    subject = f"Release {task.name} v{version}?"[:200]
    figures = [f"- gates: {tags.get('gates', '-')} against the reference",
               f"- serving: {tags.get('serving', '-')} (p95 {tags.get('serving_p95_ms', '-')} ms, "
               f"{tags.get('serving_tokens_per_s', '-')} tokens/s, {tags.get('serving_cost_per_1k_tokens', '-')} "
               "USD per 1k tokens)",
               f"- {'canary' if verdict.get('canary') else 'shadow window'}: {verdict.get('verdict')} after "
               f"{verdict.get('requests', 0)} requests (error rate {verdict.get('error_rate') or 0:.3f}, p95 "
               f"{verdict.get('p95_ms') or 0:.0f} ms, agreement with live {_pct(verdict.get('agreement_with_live'))})"]
    live = f"v{plan['previous_version']} on {plan.get('previous_colour')}" if plan.get("previous_version") else "nothing"
    body = "\n".join([
        "**Why this release asks:**", *[f"- {w}" for w in why], "",
        f"**The candidate:** {task.registered_model} v{version} on {plan.get('colour')}; live now: {live}.",
        *figures, "",
        "**Approve** switches traffic to it. **Reject** rolls it back; live traffic stays where it is.",
        "", *[f"- [{name}]({url})" for name, url in links.items()]])
    return subject, body


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.0%}"


def apply(verdict: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The window's verdict after a person's answer (`answer`: the approval task's result).
    Not asked: unchanged. Approved: promote. Rejected or timed out: rollback, saying who."""
    if not answer or not answer.get("asked"):
        return verdict
    who = answer.get("by") or "nobody (timed out)"
    said = f": {answer['comment']!r}" if answer.get("comment") else ""
    if answer.get("approved"):
        return {**verdict, "verdict": "promote", "approval": answer,
                "reasons": [*(verdict.get("reasons") or []), f"approved by {who}{said}"]}
    why = f"refused by {who}{said}" if answer.get("by") else \
        f"no answer within the approval timeout ({answer.get('timeout_hours')} h)"
    return {**verdict, "verdict": "rollback", "approval": answer, "reasons": [why]}


def links(task: Any, version: str, dag_run: Any = None) -> dict[str, str]:
    """Where a person reads more: the model card (the Reports page), the MLflow version, the
    Airflow run (the same addresses Slack's buttons open: `tuneship.notify`)."""
    from tuneship import model_card, notify

    out = {"Model card": notify.report_url(model_card.report_path(task.name, version)) or "",
           "MLflow version": notify.mlflow_version_url(task.registered_model, version)}
    if dag_run is not None:
        out["Airflow run"] = notify.airflow_run_url(dag_run.dag_id, dag_run.run_id)
    return {k: v for k, v in out.items() if v}


def asked(task: Any, plan: dict[str, Any], why: list[str], request_url: str | None) -> None:
    """Say that a release waits for a person: Slack, in the release's thread, with a button
    to the request; and the audit trail."""
    from tuneship import notify
    from tuneship.stages import decided

    version = str(plan["version"])
    hours = task.approval.timeout_hours if task.approval.on_timeout == "rollback" else None
    wait = f"no answer within {hours:g} h rolls it back" if hours else "it waits until someone answers"
    notify.notify(f"{task.name} v{version} waits for a person's approval before the switch: " + "; ".join(why)
                  + f". Live traffic is untouched; {wait}.", level="warning",
                  title=f"{task.name} v{version}: approval needed", task=task.name, version=version,
                  figures={"Task": task.name, "Version": version, "Why": "; ".join(why)},
                  links={"Approve or reject": request_url, **notify.release_links(task.registered_model, version)},
                  thread=notify.release_thread(task.name, version))
    decided("approval_requested", task.name, "; ".join(why), version=version, figures={"timeout_hours": hours})


def answered(task: Any, version: str, answer: dict[str, Any]) -> None:
    """Record a person's answer (or the timeout's) in the audit trail, with who and why."""
    from tuneship.stages import decided

    by = answer.get("by") or "airflow:timeout"
    said = answer.get("comment") or ("no answer within the approval timeout" if answer.get("timed_out") else "")
    decided("approved" if answer.get("approved") else "refused", task.name, said or "no comment",
            version=str(version), actor=by, figures={"timed_out": bool(answer.get("timed_out"))})
