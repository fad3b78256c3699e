"""Likelihood of the reference answers (issue 12): teacher-forced, encoded as training encodes a
row, batched without changing a number; gated on bootstrap intervals of the mean and of the
paired difference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from ml_fixtures import base_model, dataset, finetuned, read_jsonl

from tuneship import stats
from tuneship.evaluate import (
    SuiteError,
    SuiteResult,
    apply_gates,
    load_cases,
    load_suite,
    run_suite,
)


def test_loglik_is_the_answer_tokens_log_probabilities(tmp_path_factory):
    import torch

    from tuneship.basemodel import load_base
    from tuneship.generate import loglikelihood
    from tuneship.train.trainer import encode_rows

    model, tok = load_base(str(base_model(tmp_path_factory)))
    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:5]
    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    batched = loglikelihood(model, tok, prompts, refs, batch_size=4)
    # by hand, one row at a time, on training's own encoding
    (ex,), _ = encode_rows([rows[2]], tok, 4096)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    answer = [(i, t) for i, (t, lab) in enumerate(zip(ex.input_ids, ex.labels, strict=True)) if lab != -100]
    by_hand = sum(float(logp[i - 1, t]) for i, t in answer)
    assert batched[2][1] == len(answer) and batched[2][0] == pytest.approx(by_hand, abs=1e-4)
    # padding changes nothing: the same rows one at a time
    single = loglikelihood(model, tok, prompts, refs, batch_size=1)
    assert [n for _, n in single] == [n for _, n in batched]
    assert np.allclose([s for s, _ in single], [s for s, _ in batched], atol=1e-4)
    assert all(s < 0 for s, _ in batched)


def test_the_fine_tune_makes_held_out_answers_likelier_and_the_gate_sees_it(tmp_path_factory, tmp_path: Path):
    """The demo fine-tune against its base model on 40 held-out rows: its mean token
    log-likelihood of the reference answers is far higher; a suite that gates on it passes the
    fine-tune against the base model and refuses the base model against the fine-tune."""
    from peft import PeftModel

    from tests.tasks import triage
    from tuneship.basemodel import load_base
    from tuneship.generate import generate, loglikelihood

    path = tmp_path / "lik.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lik", "version": 1, "cases": {"source": "dataset_eval_split", "limit": 40},
        "generation": {"max_new_tokens": 2},
        "metrics": [{"name": "answer_loglik", "kind": "loglik"}],
        "gates": [{"metric": "answer_loglik", "max_regression": 0.5}]}))
    suite = load_suite(path)
    cases = load_cases(suite, dataset(tmp_path_factory), triage().parse_answer)

    def scorer(adapter: Path | None):
        model, tok = load_base(str(base_model(tmp_path_factory)))
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()

        def answers(prompts, max_new):
            return generate(model, tok, prompts, max_new)

        answers.loglik = lambda prompts, refs: loglikelihood(model, tok, prompts, refs)
        return answers

    base = run_suite(suite, scorer(None), cases)
    tuned = run_suite(suite, scorer(finetuned(tmp_path_factory) / "adapter"), cases)
    print(f"mean token log-likelihood: base {base.metrics['answer_loglik']:.3f}, "
          f"fine-tuned {tuned.metrics['answer_loglik']:.3f}")
    assert tuned.metrics["answer_loglik"] > base.metrics["answer_loglik"] + 0.5
    assert all(-20 < v < 0 for v in tuned.outcomes["answer_loglik"])
    ok = apply_gates(suite, tuned, base, "base model")
    assert ok.passed and ok.gates[0].diff["test"] == "sign test", ok.summary()
    refused = apply_gates(suite, base, tuned, "fine-tune")
    assert not refused.passed and refused.gates[0].verdict == "fail"
    assert "answer_loglik vs fine-tune: difference -" in refused.summary()
    # only a model that can score references runs such a suite (a gateway returns answers only)
    with pytest.raises(SuiteError, match="read the model's own probabilities"):
        run_suite(suite, lambda prompts, max_new: ["x"] * len(prompts), cases)


def test_bootstrap_intervals_of_a_mean_and_a_paired_difference():
    rng = np.random.default_rng(3)
    ref = rng.normal(-1.0, 0.3, 40)
    same = ref + rng.normal(0, 0.05, 40)
    low, high = stats.mean_interval(ref)
    assert low < ref.mean() < high and high - low < 0.3
    assert stats.mean_interval(ref) == (low, high)  # seeded: the same data, the same interval
    d = stats.paired_mean_diff(same.tolist(), ref.tolist())
    assert d.low < 0 < d.high and d.high - d.low < 0.05  # pairing removes the cases' spread
    worse = stats.paired_mean_diff((ref - 0.4).tolist(), ref.tolist())
    assert worse.high < -0.39 and worse.worse == 40 and worse.p_value < 1e-6
    assert stats.mean_interval([2.0] * 5) == (2.0, 2.0)


def test_likelihood_gates_in_a_suite_and_what_a_smoke_suite_refuses(tmp_path: Path):
    doc = {"name": "l", "version": 1, "cases": {"source": "inline", "items": [
        {"prompt": f"q{i}", "reference": "a"} for i in range(30)]},
        "metrics": [{"name": "ll", "kind": "loglik"}], "gates": [{"metric": "ll", "min": -2.0}]}
    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump(doc))
    suite = load_suite(path)
    good = SuiteResult("l", 1, {"ll": -1.0}, 30, [], {"ll": [-1.0 + 0.1 * math.sin(i) for i in range(30)]})
    bad = SuiteResult("l", 1, {"ll": -3.0}, 30, [], {"ll": [-3.0 + 0.1 * math.sin(i) for i in range(30)]})
    assert apply_gates(suite, good, None).gates[0].verdict == "pass"
    assert apply_gates(suite, bad, None).gates[0].verdict == "fail"
    path.write_text(yaml.safe_dump({**doc, "role": "smoke"}))
    with pytest.raises(SuiteError, match="which a smoke suite .* cannot read"):
        load_suite(path)
