"""The HTML report people read after a run: gates, loss curves, shadow verdicts, drift chart.

Self-contained (images inlined) so it can be mailed, attached to a ticket, or served by
the Airflow plugin's Reports page.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from tuneship import config


def _img(path: str | None, alt: str) -> str:
    if not path or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:720px">'


def table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
         "font-size:14px}th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 4px}")


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page: every report's one style."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def fmt(value: Any, unit: str = "") -> str:
    """Every figure a person reads (this report, the demo summary) goes through here, so a
    p95 reads `8.3 ms`, never `8.298449999999999`: times to 0.1, scores and rates below 10
    to 3 decimals, larger numbers to 0.1 or with thousands separators; None is `-`."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif value != value:  # NaN: a metric the reference never produced
        text = "-"
    elif unit in ("ms", "s") or 10 <= abs(value) < 1000:
        text = f"{value:,.1f}"
    elif abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}" if unit and text != "-" else text


def usd(value: Any) -> str:
    """A cost in US dollars to 4 decimals (a cost per 1k tokens is a fraction of a cent)."""
    return "-" if value is None else f"USD {value:.4f}"


def _interval(value: Any, low: Any, high: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if signed:
        return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"
    return fmt(value) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None else "")


def _p(p: float | None) -> str:
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _rule(r: dict[str, Any]) -> str:
    if r["rule"] == "vs reference":
        return f"difference {'>=' if r['threshold'] <= 0 else '<='} {r['threshold']:+.3f}"
    if r["rule"] == "kept >=":
        return f"kept of the reference's right >= {fmt(r['threshold'])}"
    return f"{r['rule']} {fmt(r['threshold'])}"


def gate_line(r: dict[str, Any], reference_name: str | None) -> str:
    """One gate as a line of text (the demo's summary)."""
    text = f"{r['verdict'].upper()} {r['metric']} ({_rule(r)}): {_interval(r['value'], r['low'], r['high'])}"
    if r["rule"] == "vs reference":
        text += (f", {reference_name or 'reference'} {fmt(r['reference'])}, difference "
                 f"{_interval(r['diff'], r['diff_low'], r['diff_high'], signed=True)}")
    return text


def gates_table(gates: dict[str, Any]) -> str:
    """Every gate: the rule, the candidate's value with its interval, the reference, the paired
    difference with its interval, the verdict (older results without intervals: the figures)."""
    rows = gates.get("gates")
    if not rows:
        ref = gates.get("reference") or {}
        return table([[k, fmt(v), fmt(ref.get(k))] for k, v in (gates.get("metrics") or {}).items()],
                      ["metric", "candidate", "reference"])
    out = []
    for r in rows:
        out.append([r["suite"], r["metric"], _rule(r), _interval(r["value"], r["low"], r["high"]), fmt(r["n"]),
                    fmt(r["reference"]), _interval(r["diff"], r["diff_low"], r["diff_high"], signed=True),
                    _p(r["p_value"]), r["verdict"]])
    return table(out, ["suite", "metric", "gate", "candidate [95%]", "n", "reference", "difference [95%]",
                        "p (McNemar; sign test)", "verdict"])


def lost_table(rows: list[dict[str, Any]]) -> str:
    """The cases the reference got right and the candidate did not, side by side."""
    return table([[r["suite"], f"{r['metric']} ({r['lost']} lost)", r["prompt"], json.dumps(r["expected"]),
                    r["candidate"], r["reference"]] for r in rows],
                  ["suite", "metric", "prompt", "expected", "candidate's answer", "reference's answer"])


def serving_html(serving: dict[str, Any]) -> str:
    """The serving gate: both models' figures side by side, each gate, the latency chart."""
    if not serving.get("candidate"):
        return ""
    models = [("candidate v" + str(serving.get("version")), serving["candidate"])]
    if serving.get("live"):
        models.append((f"live v{serving.get('live_version')}", serving["live"]))
    figures = table([[name, fmt(f["requests"]), fmt(f["p50_ms"], "ms"),
                       _interval(f["p95_ms"], f["p95_ms_low"], f["p95_ms_high"]),
                       _interval(f["tokens_per_s"], f["tokens_per_s_low"], f["tokens_per_s_high"]),
                       fmt(f["peak_memory_mb"], "MB"), usd(f["cost_per_1k_tokens"])] for name, f in models],
                     ["model", "requests", "p50", "p95 (ms) [95%]", "tokens/s [95%]", "peak memory",
                      "cost per 1k tokens"])
    from tuneship.serving_gate import line

    rows = "".join(f"<li>{html.escape(line(r))}</li>" for r in serving.get("rows") or [])
    head = (f"<h3>Serving gate (against {html.escape(str(serving.get('live_model') or 'nothing live'))}, "
            f"{serving.get('rounds', 1)} round(s), {float(serving.get('confidence', 0.95)):.1%} intervals)</h3>")
    note = f"<p>{html.escape(serving['note'])}</p>" if serving.get("note") else ""
    return head + note + figures + f"<ul>{rows}</ul>" + _img(serving.get("latency_plot"), "latency distribution")


def _cycle_html(i: int, cycle: dict[str, Any]) -> str:
    parts = [f"<h2>Cycle {i} ({html.escape(str(cycle.get('task')))}): triggered by "
             f"<code>{html.escape(cycle['trigger'])}</code></h2>"]
    drift = cycle.get("drift")
    if drift:
        parts.append("<h3>Drift</h3>" + table(
            [[fmt(drift.get("score")), fmt(drift.get("threshold")), fmt(drift.get("requests")), drift.get("reason")]],
            ["score", "threshold", "requests", "governor"]))
        parts.append(_img(drift.get("chart"), "drift chart"))
    ft = cycle.get("finetune") or {}
    model = ft.get("model") or {}
    if model:
        parts.append("<h3>Fine-tune</h3>" + table(
            [[f"v{model.get('version')}", fmt(model.get("train_loss")), fmt(model.get("eval_loss")),
              fmt(model.get("tokens_per_s")), model.get("init_from") or "fresh LoRA",
              (model.get("adapter_sha256") or "")[:16]]],
            ["version", "train loss", "eval loss", "tokens/s", "started from", "adapter sha256"]))
        parts.append(_img(model.get("loss_curve"), "loss curve"))
    gates = ft.get("gates") or {}
    if gates:
        parts.append(f"<h3>Evaluation gates (reference: {html.escape(str(gates.get('reference_name')))}; "
                     "95% intervals)</h3>" + gates_table(gates))
        parts.append(_img(gates.get("forest_plot"), "paired differences against the reference"))
        parts += [_img(png, "reliability diagram") for png in gates.get("reliability_diagrams") or []]
        if gates.get("lost_cases"):
            parts.append(f"<h4>Cases the candidate lost against {html.escape(str(gates.get('reference_name')))}"
                         "</h4>" + lost_table(gates["lost_cases"]))
    rel = cycle.get("release") or {}
    if rel:
        v = rel.get("verdict") or {}
        parts.append("<h3>Release</h3>" + table(
            [[rel.get("state"), v.get("verdict"), v.get("slot"), fmt(v.get("requests")), fmt(v.get("error_rate")),
              fmt(v.get("p95_ms"), "ms"), fmt(v.get("format_rate")), fmt(v.get("agreement_with_live")),
              fmt(v.get("answer_similarity"))]],
            ["run", "verdict", "slot", "requests", "error rate", "p95", "format rate", "agreement",
             "similarity"]))
        parts.append(window_html(v))
        smoke = rel.get("smoke") or {}
        if smoke:
            figures = ", ".join(f"{k} {fmt(v)}" for k, v in (smoke.get("metrics") or {}).items())
            parts.append(f"<p>Smoke through the gateway: {html.escape(figures)}</p>")
        parts.append(serving_html(rel.get("serving") or {}))
    seconds = cycle.get("seconds") or {}
    if seconds:
        rows = [[dag_id, task_id, fmt(secs, "s")] for dag_id, stages in seconds.items() for task_id, secs in stages.items()]
        parts.append(f"<h3>Where the time went (cycle: {fmt(cycle.get('wall_s'), 's')})</h3>"
                     + table(rows, ["DAG", "task", "seconds"]))
    return "\n".join(parts)


def window_html(verdict: dict[str, Any]) -> str:
    """A decided window (`tuneship.shadow`): each metric's anytime-valid interval against its
    threshold, its status, and after how many requests it was decided; then the reasons."""
    metrics = verdict.get("metrics") or []
    if not metrics:
        return ""
    rows = [[m["name"], m["rule"], fmt(m.get("estimate")),
             f"[{fmt(m['interval'][0])}, {fmt(m['interval'][1])}]", m.get("status"),
             fmt(m.get("decided_at_requests")), fmt(m.get("observations")), m.get("crossed") or ""]
            for m in metrics]
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in verdict.get("reasons") or [])
    return (f"<h4>Shadow window: {html.escape(str(verdict.get('verdict')))} after {fmt(verdict.get('requests'))} "
            f"requests (alpha {fmt(verdict.get('alpha'))} over the whole window, "
            f"{html.escape(str(verdict.get('alpha_split', '')))}; {html.escape(str(verdict.get('decided_by') or 'bounds'))})"
            "</h4>" + table(rows, ["metric", "rule", "estimate", "confidence sequence", "status", "decided after",
                                   "observations", "crossed"])
            + (f"<ul>{reasons}</ul>" if reasons else ""))


def write_demo_report(summary: dict[str, Any]) -> Path:
    out = config.home() / "reports" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, live in (summary.get("live") or {}).items():
        live, t = live or {}, (summary.get("traffic") or {}).get(name) or {}
        rows.append([name, f"{live.get('model', '-')} v{live.get('version', '-')}", live.get("colour", "-"),
                     fmt(t.get("sent")), fmt(t.get("ok")), fmt(t.get("failed"))])
    body = [
        "<h1>Tuneship demo report</h1>",
        f"<p>Wall time {fmt(summary.get('wall_s'), 's')}.</p>",
        table(rows, ["task", "live", "colour", "requests", "ok", "failed"]),
    ]
    if summary.get("error"):
        body.append(f"<p style='color:#b00'>Error: {html.escape(summary['error'])}</p>")
    body += [_cycle_html(i, c) for i, c in enumerate(summary.get("cycles", []), 1)]
    out.write_text(page("Tuneship demo", "".join(body)))
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out
