"""The Deployments page of the Airflow UI (issue 15): per task, what serves and what decided it.

Read from the files the loop writes, never from a service (the page renders while Triton,
the gateway or MLflow are down, and shows that state as it was last written):

* routes: the gateway's routes file of the task's served model (live, shadow, previous:
  colour, version, since when; the canary weight);
* the running or last window: the newest window state under `monitor/windows/<served>/`
  and its history (each poll's bounds, `tuneship.shadow.append_history`), drawn over the
  requests, each metric's anytime-valid interval against its threshold;
* the last gates: the newest evaluation under `artifacts/tasks/<task>/evals/`;
* drift: the governor's decision log (`monitor/<task>/governor.jsonl`);
* the audit trail of the task, each record with whether its hash chain holds;
* the model cards in the Reports directory.

`page(tasks)` is the whole HTML page; the plugin (`plugins/tuneship_plugin.py`) serves it
behind Airflow's login. No Airflow import here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from tuneship import config

MAX_POINTS = 400  # history points drawn per window (evenly thinned)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def routes(task: Any) -> dict[str, Any] | None:
    return _read_json(config.home() / "gateway" / "routes" / f"{task.served_model}.json")


def window(task: Any) -> dict[str, Any] | None:
    """The newest window of the task's served model: its kind, version, since, and history."""
    d = config.home() / "monitor" / "windows" / task.served_model
    states = sorted((p for p in d.glob("*.json")), key=lambda p: p.stat().st_mtime) if d.exists() else []
    if not states:
        return None
    newest = states[-1]
    kind, _, rest = newest.stem.partition("-v")
    version = rest.rsplit("-", 1)[0]
    history = []
    hist = newest.with_suffix(".history.jsonl")
    if hist.exists():
        for line in hist.read_text().splitlines():
            try:
                history.append(json.loads(line))
            except ValueError:
                continue  # a torn last line
    return {"kind": kind, "version": version, "state": newest.name, "history": history}


def last_gates(task: Any) -> dict[str, Any] | None:
    d = config.artifacts() / "tasks" / task.name / "evals"
    found = [(int(m.group(1)), p) for p in d.glob("v*.json") if (m := re.fullmatch(r"v(\d+)\.json", p.name))] \
        if d.exists() else []
    if not found:
        return None
    version, path = max(found)
    data = _read_json(path) or {}
    return {"version": str(version), **data}


def model_cards(task: Any) -> list[str]:
    d = config.home() / "reports"
    cards = d.glob(f"model-card-{task.name}-v*.html") if d.exists() else []
    return sorted((p.name for p in cards), key=lambda n: int(re.search(r"-v(\d+)\.html$", n).group(1)), reverse=True)


def snapshot(task: Any) -> dict[str, Any]:
    from tuneship import audit, monitor

    return {"task": task.name, "served_model": task.served_model, "routes": routes(task), "window": window(task),
            "gates": last_gates(task), "drift": monitor.read_decisions(task.name)[-10:],
            "audit": audit.verified_records(task=task.name)[-20:], "cards": model_cards(task)}


# ------------------------------------------------------------------ HTML


def window_chart(win: dict[str, Any]) -> str | None:
    """Each metric's interval over the requests, with its threshold: a PNG as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = win["history"]
    if not hist:
        return None
    step = max(1, len(hist) // MAX_POINTS)
    hist = hist[::step] + ([hist[-1]] if (len(hist) - 1) % step else [])
    names = list(dict.fromkeys(m["name"] for h in hist for m in h["metrics"]))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.8 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        pts = [(h["requests"], m) for h in hist for m in h["metrics"] if m["name"] == name]
        x = [p[0] for p in pts]
        lo = [p[1]["interval"][0] if p[1]["interval"][0] is not None else float("nan") for p in pts]
        hi = [p[1]["interval"][1] if p[1]["interval"][1] is not None else float("nan") for p in pts]
        est = [p[1].get("estimate") if p[1].get("estimate") is not None else float("nan") for p in pts]
        ax.fill_between(x, lo, hi, alpha=0.3, step="post", label="anytime-valid interval")
        ax.plot(x, est, lw=1)
        ax.axhline(pts[-1][1]["threshold"], color="#cf222e", ls="--", lw=1, label="threshold")
        ax.set_ylabel(name, fontsize=8)
    axes[-1, 0].set_xlabel("requests")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _route(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return f"{r.get('colour')} v{r.get('version')} (since {r.get('deployed_at') or '-'})"


def task_html(s: dict[str, Any]) -> str:
    from tuneship.report import fmt, gates_table, table

    e = html.escape
    parts = [f"<section id='task-{e(s['task'])}'><h2>{e(s['task'])} (served as <code>{e(s['served_model'])}</code>)</h2>"]
    r = s["routes"]
    parts.append("<h3>Serving</h3>" + (table([[_route(r.get("live")), _route(r.get("shadow")), _route(r.get("previous")),
                                               f"{r.get('canary_weight', 0)} %", r.get("updated_at") or "-"]],
                                             ["live", "shadow", "kept for rollback", "canary weight", "routes updated"])
                                       if r else "<p>nothing served yet</p>"))
    w = s["window"]
    if w:
        last = w["history"][-1] if w["history"] else None
        parts.append(f"<h3>Window: {e(w['kind'])} of v{e(w['version'])}</h3>")
        if last:
            parts.append(f"<p>{fmt(last['requests'])} requests; verdict so far: <b>{e(str(last.get('verdict')))}</b></p>")
            parts.append(table([[m["name"], m.get("rule", ""), fmt(m.get("estimate")),
                                 f"[{fmt(m['interval'][0])}, {fmt(m['interval'][1])}]", m.get("status")]
                                for m in last["metrics"]], ["metric", "rule", "estimate", "interval", "status"]))
            chart = window_chart(w)
            if chart:
                parts.append(f'<img alt="window bounds over requests" src="{chart}" style="max-width:720px">')
        else:
            parts.append("<p>no poll recorded yet</p>")
    else:
        parts.append("<h3>Window</h3><p>no release window yet</p>")
    g = s["gates"]
    parts.append(f"<h3>Last gates: v{e(g['version'])} against {e(str(g.get('reference_name')))}</h3>"
                 + gates_table(g) if g else "<h3>Last gates</h3><p>none yet</p>")
    parts.append("<h3>Drift</h3>" + (table([[d.get("at_iso") or _utc(d.get("at")), fmt(d.get("score")),
                                               "yes" if d.get("drifted") else "no",
                                               "retrain" if d.get("fire") else "-", d.get("reason") or ""]
                                              for d in reversed(s["drift"])],
                                             ["checked", "score", "drifted", "fired", "governor"])
                                       if s["drift"] else "<p>no drift check yet</p>"))
    parts.append("<h3>Audit trail</h3>" + (table([[a.get("at", ""), a.get("actor", ""), a.get("action", ""),
                                                    f"v{a['version']}" if a.get("version") else "",
                                                    a.get("reason", ""), "ok" if a["verified"] else
                                                    f"BROKEN: {a.get('problem')}"]
                                                   for a in reversed(s["audit"])],
                                                  ["at", "actor", "action", "version", "reason", "chain"])
                                             if s["audit"] else "<p>no decisions recorded yet</p>"))
    cards = "".join(f'<li><a href="/tuneship/reports/{e(c)}">{e(c)}</a></li>' for c in s["cards"])
    parts.append(f"<h3>Model cards</h3><ul>{cards or '<li>none yet</li>'}</ul>")
    parts.append('<p><a href="/dags/llm_release">llm_release runs</a> · <a href="/dags/llm_drift_monitor">'
                 'drift monitor runs</a> · <a href="/tuneship/reports/">reports</a></p></section>')
    return "\n".join(parts)


def _utc(ts: Any) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(ts))) if ts is not None else "-"


def page(tasks: list[Any]) -> str:
    from tuneship.report import page as whole

    body = "<h1>Tuneship deployments</h1>" + "\n".join(task_html(snapshot(t)) for t in tasks)
    return whole("Tuneship deployments", body)
