"""Clustered cases: several cases that share a context (questions on one document, turns of
one conversation) move together, so their intervals must be wider than independent cases'
(Miller 2024, "Adding Error Bars to Evals": clustered standard errors; here through Kish's
design effect). Checked against the formula, by coverage on simulated clustered outcomes,
and through a suite's gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tuneship import stats
from tuneship.evaluate import apply_gates, load_cases, load_suite, score


def test_design_effect_follows_the_clustered_variance():
    # four identical outcomes in each of ten contexts: the clustered variance is four times the iid one
    x = np.repeat(np.random.default_rng(0).integers(0, 2, 10), 4)
    assert stats.design_effect(x, np.repeat(np.arange(10), 4)) == pytest.approx(4.0)
    assert stats.design_effect(x, [None] * len(x)) == 1.0  # no shared context: independent
    # outcomes that disagree within their context never make the interval narrower than iid
    assert stats.design_effect([1, 0] * 10, np.repeat(np.arange(10), 2)) == 1.0
    assert not stats.is_clustered([None, None, "a"]) and stats.is_clustered(["a", None, "a"])


def test_clustered_intervals_keep_their_coverage_where_independent_ones_do_not():
    """30 contexts of 5 questions; each context's own success rate varies (Beta(4, 1): mean 0.8,
    intra-cluster correlation 1/6); the true rate is 0.8. Measured: independent Wilson
    intervals cover it 86.8 % of the time, clustered ones 93.3 % (the design effect is itself
    estimated from 30 contexts)."""
    g = np.random.default_rng(1)
    ids = np.repeat(np.arange(30), 5)
    hits_iid = hits_clustered = 0
    for _ in range(1000):
        p = g.beta(4, 1, 30)[ids]
        x = g.random(150) < p
        lo, hi = stats.wilson(int(x.sum()), 150)
        hits_iid += lo <= 0.8 <= hi
        lo, hi = stats.clustered_wilson(x, ids)
        hits_clustered += lo <= 0.8 <= hi
    assert hits_clustered / 1000 >= 0.92, hits_clustered
    assert hits_iid / 1000 < hits_clustered / 1000 - 0.04, (hits_iid, hits_clustered)


def test_paired_difference_and_mean_widen_with_clusters_and_test_on_the_clusters():
    g = np.random.default_rng(2)
    ids = np.repeat(np.arange(12), 5)
    shift = g.normal(0, 1, 12)[ids]  # each context moves both models' answers together
    cand = (g.random(60) < 0.75 + 0.2 * np.tanh(shift)).tolist()
    ref = (g.random(60) < 0.75 + 0.2 * np.tanh(shift)).tolist()
    iid, clus = stats.paired_diff(cand, ref), stats.paired_diff(cand, ref, clusters=ids)
    assert clus.diff == pytest.approx(iid.diff) and clus.high - clus.low > iid.high - iid.low
    values = (g.normal(0, 1, 12)[ids] + g.normal(0, 0.3, 60)).tolist()
    lo, hi = stats.mean_interval(values)
    clo, chi = stats.mean_interval(values, clusters=ids)
    assert chi - clo > 1.5 * (hi - lo)  # strongly shared contexts: far wider
    d = stats.paired_mean_diff(values, [v - 0.1 for v in values], clusters=ids)
    assert d.diff == pytest.approx(0.1) and d.better == 60 and d.p_value == pytest.approx(stats._sign_test(12, 0))


def _suite(tmp_path: Path) -> Path:
    doc = {"name": "docs", "version": 1,
           "cases": {"source": "dataset_eval_split"},
           "metrics": [{"name": "exact", "kind": "exact_match"}],
           "gates": [{"metric": "exact", "min": 0.7}]}
    path = tmp_path / "docs.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_suite_on_clustered_rows_gates_on_the_wider_interval(tmp_path: Path):
    """Ten documents with six questions each: the model gets whole documents right or wrong
    (54 of 60 right: 9 of 10 documents). As 60 independent cases the floor 0.7 passes; as ten
    contexts it cannot be shown, and the gate says why."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Doc {d} question {q}?", "completion": f"answer {d}-{q}", "cluster": f"doc-{d}"}
            for d in range(10) for q in range(6)]
    (data / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    suite = load_suite(_suite(tmp_path))
    cases = load_cases(suite, data)
    assert [c.cluster for c in cases[:7]] == ["doc-0"] * 6 + ["doc-1"]
    answers = [c.reference if i // 6 < 9 else "no idea" for i, c in enumerate(cases)]
    result = score(suite, cases, answers)
    assert result.metrics["exact"] == 0.9 and result.clusters[0] == "doc-0"
    (gate,) = apply_gates(suite, result, None).gates
    assert gate.verdict == "inconclusive" and gate.low < 0.7 < gate.high
    assert "clustered: 60 cases in 10 contexts" in gate.reason
    unclustered = score(suite, [c.model_copy(update={"cluster": None}) for c in cases], answers)
    (independent,) = apply_gates(suite, unclustered, None).gates
    assert independent.verdict == "pass" and independent.low > 0.7
