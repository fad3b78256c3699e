"""Eval suites: declarative files validated on load; scores from outputs; gates that bite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks import triage
from tuneship.evaluate import SuiteError, apply_gates, load_cases, load_suite, score

PARSE = triage().parse_answer


def test_shipped_suites_load():
    for name in ("triage", "triage-smoke"):
        suite = load_suite(name)
        assert suite.version >= 1 and suite.metrics and suite.gates


def test_suite_errors_name_file_and_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\n"
                   "cases: {source: inline}\nmetrics: [{name: m, kind: parse_rate}]\n"
                   "gates: [{metric: nope, min: 0.5}]\nsurprise: 1\n")
    with pytest.raises(SuiteError) as err:
        load_suite(bad)
    msg = str(err.value)
    assert str(bad) in msg and "surprise" in msg and "cases" in msg
    bad.write_text("name: x\nversion: 1\n"
                   "cases: {source: dataset_eval_split}\nmetrics: [{name: m, kind: parse_rate}]\n"
                   "gates: [{metric: nope, min: 0.5}]\n")
    with pytest.raises(SuiteError, match="unknown metric 'nope'"):
        load_suite(bad)
    with pytest.raises(SuiteError, match="no such eval suite"):
        load_suite("does-not-exist")


def test_scores_come_from_completions():
    suite = load_suite("triage-smoke")
    cases = load_cases(suite)
    perfect = [f" category={c.expected['category']} priority=normal" for c in cases]
    res = score(suite, cases, perfect, PARSE)
    assert res.metrics == {"format_rate": 1.0, "category_accuracy": 1.0}
    garbage = ["hello"] * len(cases)
    res = score(suite, cases, garbage, PARSE)
    assert res.metrics["format_rate"] == 0.0 and res.metrics["category_accuracy"] == 0.0


def test_gates_absolute_and_regression():
    suite = load_suite("triage")
    from tuneship.evaluate import SuiteResult

    good = SuiteResult("triage", 1, {"category_accuracy": 0.9, "priority_accuracy": 0.8, "format_rate": 1.0}, 10)
    ref = SuiteResult("triage", 1, {"category_accuracy": 0.95, "priority_accuracy": 0.8, "format_rate": 1.0}, 10)
    report = apply_gates(suite, good, ref, "champion v1")
    failed = [g for g in report.gates if not g.passed]
    assert not report.passed
    assert [g.metric for g in failed] == ["category_accuracy"] and failed[0].reference == 0.95
    assert "FAIL category_accuracy >= 0.930 (reference 0.950 - 0.020): 0.900" in report.summary()
    low = SuiteResult("triage", 1, {"category_accuracy": 0.5, "priority_accuracy": 0.8, "format_rate": 1.0}, 10)
    assert not apply_gates(suite, low, ref).passed
    assert "FAIL category_accuracy >= 0.700: 0.500" in apply_gates(suite, low, ref).summary()


def test_regression_gate_without_reference_is_refused_not_passed(tmp_path: Path):
    """A smoke suite has no reference model: a `max_regression` gate there used to be read as
    `min 0` and always pass. Now the suite is refused with the gate named."""
    from tuneship.evaluate import SuiteResult

    triage = load_suite("triage")
    with pytest.raises(SuiteError, match="'category_accuracy' is `max_regression`, but no reference"):
        apply_gates(triage, SuiteResult("triage", 3, {"category_accuracy": 0.0, "priority_accuracy": 0.0,
                                                      "format_rate": 1.0}, 10), None)
    smoke = load_suite("triage-smoke")
    cases = load_cases(smoke)
    half = [f" category={c.expected['category'] if i % 2 else 'nope'} priority=low" for i, c in enumerate(cases)]
    report = apply_gates(smoke, score(smoke, cases, half, PARSE), None)
    assert not report.passed  # 2 of 5 right is below the smoke floor of 0.6
    assert "FAIL category_accuracy >= 0.600: 0.400" in report.summary()


def test_dataset_cases_read_eval_split(tmp_path: Path):
    from tests.tasks import triage

    _triage = triage()
    write_dataset = _triage.write_dataset

    write_dataset(tmp_path, n_train=20, n_eval=15, seed=3)
    suite = load_suite("triage")
    cases = load_cases(suite, tmp_path, PARSE)
    assert len(cases) == 15
    assert all(c.prompt.startswith("Ticket:") and c.expected["category"] for c in cases)
