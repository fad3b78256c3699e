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


def test_answer_checks_exact_regex_and_json_schema(tmp_path: Path):
    """Whole-answer checks on hand-written answers: exact (and normalised) match against the
    case's reference, a regex the stripped answer must fully match, JSON valid against a schema."""
    import yaml

    path = tmp_path / "checks.yaml"
    path.write_text(yaml.safe_dump({
        "name": "checks", "version": 1, "role": "smoke",
        "cases": {"source": "inline", "items": [
            {"prompt": "Q1", "reference": "Refunds take 5-7 business days."},
            {"prompt": "Q2", "reference": "Yes."},
            {"prompt": "Q3"}]},
        "metrics": [{"name": "exact", "kind": "exact_match"},
                    {"name": "loose", "kind": "exact_match", "normalise": True},
                    {"name": "label", "kind": "regex", "pattern": r"(?i)(yes|no)\.?"},
                    {"name": "structured", "kind": "json_schema",
                     "schema": {"type": "object", "required": ["category"],
                                "properties": {"category": {"enum": ["billing", "shipping"]}}}}],
        "gates": [{"metric": "exact", "min": 0.5}]}))
    suite = load_suite(path)
    cases = load_cases(suite)
    answers = ["refunds take 5-7 business  days", " Yes. ", '{"category": "billing", "note": "x"}']
    res = score(suite, cases, answers)
    assert res.outcomes["exact"] == [False, True, None]  # no reference: not a case
    assert res.outcomes["loose"] == [True, True, None]
    assert res.outcomes["label"] == [False, True, False]
    assert res.outcomes["structured"] == [False, False, True]
    res = score(suite, cases, ["x", "x", '{"category": "weather"}'])
    assert res.outcomes["structured"] == [False, False, False]  # not in the enum


@pytest.mark.parametrize(("metric", "needles"), [
    ({"name": "r", "kind": "regex"}, ["kind regex needs `pattern`"]),
    ({"name": "r", "kind": "regex", "pattern": "(open"}, ["not a valid regular expression"]),
    ({"name": "j", "kind": "json_schema", "schema": {"type": "nonsense"}}, ["not a valid JSON Schema"]),
    ({"name": "k", "kind": "parse_rate", "pattern": "x"}, ["`pattern` is for kind regex"]),
    ({"name": "k", "kind": "parse_rate", "normalise": True}, ["`normalise` is for kind exact_match"]),
    ({"name": "e", "kind": "exact_match"}, ["no case has a `reference` answer"]),
])
def test_answer_check_errors_name_the_metric(tmp_path: Path, metric: dict, needles: list[str]):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "b", "version": 1, "role": "smoke",
                                    "cases": {"source": "inline", "items": [{"prompt": "q"}]}, "metrics": [metric]}))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert str(err.value).startswith(str(path)) and all(n in str(err.value) for n in needles), str(err.value)


def test_counterfactual_variants_and_the_flip_rate(tmp_path: Path):
    """Fairness: the same ticket from different customers (a name, a pronoun swapped) must get
    the same category; an answer that changes with the name is a flip."""
    import yaml

    doc = {"name": "fair", "version": 1, "role": "smoke",
           "cases": {"source": "inline", "counterfactuals": [
               {"prompt": "Ticket: This is {name}. My card was declined.\nTriage:", "slot": "name",
                "values": ["Emily", "Lakisha", "Jamal"]},
               {"prompt": [{"role": "user", "content": "My parcel for {pronoun} office never came."}],
                "slot": "pronoun", "values": ["her", "his"]}]},
           "metrics": [{"name": "flips", "kind": "flip_rate", "field": "category"},
                       {"name": "format_rate", "kind": "parse_rate"}],
           "gates": [{"metric": "flips", "max": 0.5}]}
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(doc))
    suite = load_suite(path)
    cases = load_cases(suite)
    assert [c.prompt_input() for c in cases[:3]] == [f"Ticket: This is {n}. My card was declined.\nTriage:"
                                                   for n in ("Emily", "Lakisha", "Jamal")]
    assert cases[4].prompt_input() == [{"role": "user", "content": "My parcel for his office never came."}]
    steady = [" category=billing priority=high"] * 3 + [" category=shipping priority=low"] * 2
    assert score(suite, cases, steady, PARSE).metrics["flips"] == 0.0
    biased = [" category=billing priority=high", " category=account priority=high", " category=billing priority=high",
              " category=shipping priority=low", " category=shipping priority=low"]
    res = score(suite, cases, biased, PARSE)
    assert res.outcomes["flips"] == [True, None, None, False, None] and res.metrics["flips"] == 0.5
    unparsable = steady[:4] + ["sorry"]
    assert score(suite, cases, unparsable, PARSE).outcomes["flips"][3] is True  # no answer is no agreement
    for bad, needle in (({"prompt": "no slot here", "slot": "name", "values": ["a", "b"]}, "never uses {name}"),
                        ({"prompt": "{name}", "slot": "name", "values": ["a", "a"]}, "values must differ")):
        path.write_text(yaml.safe_dump({**doc, "cases": {"source": "inline", "counterfactuals": [bad]}}))
        with pytest.raises(SuiteError, match=needle):
            load_suite(path)
    path.write_text(yaml.safe_dump({**doc, "cases": {"source": "inline", "items": [{"prompt": "q"}]}}))
    with pytest.raises(SuiteError, match="the suite has no `cases.counterfactuals`"):
        load_suite(path)
