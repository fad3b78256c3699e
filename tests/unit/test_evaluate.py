"""Eval suites: declarative files validated on load; scores from outputs; gates that bite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks import triage
from tuneship.evaluate import SuiteError, load_cases, load_suite, score

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


def test_dataset_cases_read_eval_split(tmp_path: Path):
    from tests.tasks import triage

    _triage = triage()
    write_dataset = _triage.write_dataset

    write_dataset(tmp_path, n_train=20, n_eval=15, seed=3)
    suite = load_suite("triage")
    cases = load_cases(suite, tmp_path, PARSE)
    assert len(cases) == 15
    assert all(c.prompt.startswith("Ticket:") and c.expected["category"] for c in cases)
