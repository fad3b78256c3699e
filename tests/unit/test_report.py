"""Figures people read: the demo summary and the HTML report format every number alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuneship.demo import _print_summary
from tuneship.report import fmt, write_demo_report

RAW = re.compile(r"\d\.\d{4,}")  # a float printed with its binary noise (e.g. 8.298449999999999)

SUMMARY = {
    "wall_s": 581.2999999999,
    "live": {"triage": {"model": "triage", "version": "2", "colour": "green"}},
    "traffic": {"triage": {"sent": 1234, "ok": 1234, "failed": 0}},
    "cycles": [
        {"task": "triage", "trigger": "llm_data_validation", "ok": True, "wall_s": 387.70000000001,
         "seconds": {"llm_finetune": {"train_local": 138.4, "evaluate": 37.9}},
         "finetune": {"state": "success",
                      "model": {"version": "1", "train_loss": 0.41234567891, "eval_loss": 0.5123456789,
                                "tokens_per_s": 6412.345678},
                      "gates": {"metrics": {"category_accuracy": 0.9583333333333334},
                                "reference": {"category_accuracy": 0.0},
                                "reference_name": "base model"}},
         "release": {"state": "success", "smoke": {"metrics": {"format_rate": 1.0, "category_accuracy": 0.8}},
                     "verdict": {"verdict": "promote", "requests": 57, "error_rate": 0.0,
                                 "p95_ms": 8.298449999999999, "slot": "live",
                                 "format_rate": 0.9824561403508771, "agreement_with_live": None}}},
        {"task": "triage", "trigger": "llm_drift_monitor", "ok": True,
         "drift": {"score": 0.31578947368421, "threshold": 0.2, "requests": 60, "reason": "fired"}},
    ],
}


@pytest.mark.parametrize(("value", "unit", "text"), [
    (8.298449999999999, "ms", "8.3 ms"), (1843.25, "ms", "1,843.2 ms"), (0.9583333333, "", "0.958"),
    (0.0, "", "0.000"), (57, "", "57"), (12800, "", "12,800"), (6412.345678, "", "6,412"),
    (31.25, "", "31.2"), (None, "ms", "-"), (float("nan"), "", "-"), ("promote", "", "promote"),
])
def test_fmt(value, unit, text):
    assert fmt(value, unit) == text


def test_demo_summary_prints_no_raw_floats(capsys, tmp_path: Path):
    _print_summary(SUMMARY, tmp_path / "r.html", failed=False)
    out = capsys.readouterr().out
    assert not RAW.search(out), RAW.findall(out)
    assert "p95 8.3 ms" in out and "drift score 0.316 (threshold 0.200)" in out
    assert "gate category_accuracy: 0.958 vs base model 0.000" in out and "in 581.3 s" in out
    assert "trigger: llm_data_validation, 387.7 s)" in out and "llm_finetune seconds: train_local 138, evaluate 38" in out
    assert "live model (triage): triage v2 on colour green" in out and "traffic (triage): 1,234 sent" in out


def test_report_prints_no_raw_floats():
    html = write_demo_report(SUMMARY).read_text()
    text = re.sub(r"data:image/png;base64,[^\"]+", "", html)
    assert not RAW.search(text), RAW.findall(text)
    assert "8.3 ms" in text and "6,412" in text and "category_accuracy 0.800" in text
    assert "Where the time went (cycle: 387.7 s)" in text and "<td>train_local</td><td>138.4 s</td>" in text


def test_gates_show_intervals_differences_and_verdicts(capsys, tmp_path: Path):
    """The report's gate table and the demo summary carry what the gates decided on: each
    value with its interval, the paired difference with its, the verdict; plus the forest plot."""
    from tests.gate_results import result
    from tuneship.evaluate import (
        apply_gates,
        gate_rows,
        load_suite,
        plot_forest,
        plot_reliability,
        reliability_bins,
    )

    def res(cat: list[bool]):
        same = [True] * 40
        return result({"category_accuracy": cat, "priority_accuracy": same, "format_rate": same})

    report = apply_gates(load_suite("triage"), res([True] * 37 + [False] * 3), res([True] * 30 + [False] * 10),
                         "champion v1")
    rows = gate_rows("triage@v9", report)
    forest = plot_forest(rows, tmp_path / "forest.png", "champion v1")
    assert forest and forest.stat().st_size > 1000
    diagram = plot_reliability({"candidate": reliability_bins([[0.95, True]] * 30 + [[0.6, False]] * 10, 5),
                                "champion v1": reliability_bins([[0.7, True]] * 40, 5)}, tmp_path / "rel.png", "triage")
    assert diagram and diagram.stat().st_size > 1000
    gates = {"reference_name": "champion v1", "gates": rows, "forest_plot": str(forest),
             "reliability_diagrams": [str(diagram)],
             "metrics": {"category_accuracy": 0.925}, "reference": {"category_accuracy": 0.75}}
    summary = {**SUMMARY, "cycles": [{**SUMMARY["cycles"][0], "finetune": {**SUMMARY["cycles"][0]["finetune"],
                                                                           "gates": gates}}]}
    html = write_demo_report(summary).read_text()
    assert "<td>0.925 [0.801, 0.974]</td><td>40</td><td>0.750</td><td>+0.175 [" in html
    assert "<td>difference &gt;= -0.200</td>" in html and "<td>pass</td>" in html
    assert 'alt="paired differences against the reference" src="data:image/png;base64,' in html
    assert 'alt="reliability diagram" src="data:image/png;base64,' in html
    _print_summary(summary, tmp_path / "r.html", failed=False)
    out = capsys.readouterr().out
    assert "gate PASS category_accuracy (>= 0.700): 0.925 [0.801, 0.974]" in out
    assert "gate PASS category_accuracy (difference >= -0.200): 0.925 [0.801, 0.974], champion v1 0.750, " \
           "difference +0.175 [" in out
    assert not RAW.search(re.sub(r"data:image/png;base64,[^\"]+", "", html))


def test_lost_cases_show_both_answers_side_by_side():
    """The cases the champion got right and the candidate did not, with both answers, in the
    report's own table."""
    from tuneship.evaluate import Case, SuiteResult, load_suite, lost_cases
    from tuneship.report import lost_table

    suite = load_suite("triage")
    cases = [Case(prompt=f"Ticket: t{i}\nTriage:", expected={"category": "billing", "priority": "low"})
             for i in range(4)]
    ok = " category=billing priority=low"
    cand = SuiteResult("triage", 8, {}, 4, [], {"category_accuracy": [True, False, True, False],
                                                "priority_accuracy": [True] * 4},
                       [ok, " category=shipping priority=low", ok, " category=account priority=low"])
    ref = SuiteResult("triage", 8, {}, 4, [], {"category_accuracy": [True, True, True, False],
                                               "priority_accuracy": [True] * 4}, [ok] * 4)
    rows = lost_cases("triage@v8", suite, cases, cand, ref)
    assert [(r["metric"], r["prompt"], r["candidate"], r["reference"], r["lost"]) for r in rows] == [
        ("category_accuracy", "Ticket: t1\nTriage:", " category=shipping priority=low", ok, 1)]
    html = lost_table(rows)
    assert "<td>category_accuracy (1 lost)</td>" in html and "category=shipping" in html
