"""Calibration gates (issue 12): the model's own probability for its answer (softmax over the
options' teacher-forced log-likelihoods), expected calibration error with equal-mass bins (held
to netcal's), the Brier score, and gates that refuse an over-confident candidate while an
equally calibrated one passes as often as declared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from ml_fixtures import base_model, dataset, finetuned, read_jsonl

from tests.gate_results import result
from tuneship import stats
from tuneship.evaluate import (
    Case,
    SuiteError,
    apply_gates,
    load_cases,
    load_suite,
    reliability_bins,
    run_suite,
    score,
)

CATEGORIES = ["billing", "shipping", "returns", "account", "technical"]


def test_ece_bins_as_netcal_and_survives_ties():
    """netcal's ECE(equal_intervals=False) on tie-free draws, to the last digit, for the value
    and for every bootstrap draw; where netcal's binning raises (tied confidences, which every
    resample and any probability of exactly 1.0 make), ours still bins."""
    from netcal.metrics import ECE

    rng = np.random.default_rng(1)
    for _ in range(200):
        n, bins = int(rng.integers(5, 60)), int(rng.integers(1, 12))
        conf = rng.uniform(0, 1, n)
        ok = rng.random(n) < conf
        want = ECE(bins=min(bins, n), equal_intervals=False).measure(conf, ok.astype(int))
        assert stats.ece(conf, ok, bins) == pytest.approx(want, abs=1e-12)
        idx = np.stack([rng.permutation(n) for _ in range(3)])  # resamples without ties: netcal runs
        draws = stats._resampled_ece(conf, ok.astype(int), bins, idx)
        assert np.allclose(draws, [ECE(bins=min(bins, n), equal_intervals=False).measure(conf[i], ok[i].astype(int))
                                   for i in idx], atol=1e-12)
    tied = np.array([1.0] * 20 + [0.6] * 20)
    ok = np.array([True] * 15 + [False] * 5 + [True] * 12 + [False] * 8)
    with pytest.raises(ValueError, match="edge difference"):
        ECE(bins=5, equal_intervals=False).measure(tied, ok.astype(int))
    # by hand: the 1.0s are right 15 of 20 times (gap 0.25), the 0.6s 12 of 20 (gap 0)
    assert stats.ece(tied, ok, 5) == pytest.approx(0.5 * 0.25)
    low, high = stats.ece_interval(tied, ok, 5)
    assert low <= 0.125 <= high and stats.ece_interval(tied, ok, 5) == (low, high)  # seeded


def test_option_logliks_are_each_options_teacher_forced_probability(tmp_path_factory):
    """Prompt run once and its cache shared by the options, prompts batched with left padding:
    each option's sum equals the option scored after its prompt in one plain forward pass, for
    every batch size; the references scored in the same pass equal `loglikelihood`'s; and the
    greedy answers decoded from that same cache first are `generate`'s."""
    import torch

    from tuneship.basemodel import load_base
    from tuneship.generate import (
        generate,
        generate_and_score,
        generate_ids,
        loglikelihood,
        option_logliks,
        prompt_ids,
    )

    model, tok = load_base(str(base_model(tmp_path_factory)))
    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:6]
    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    options = [f" category={c}" for c in CATEGORIES]
    scores, pairs = option_logliks(model, tok, prompts, options, references=refs, batch_size=4)
    for prompt, row in zip(prompts, scores, strict=True):
        for option, got in zip(options, row, strict=True):
            ids = prompt_ids(tok, prompt)
            opt = tok(option, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids + opt])).logits[0].float(), -1)
            assert got == pytest.approx(sum(float(logp[len(ids) + j - 1, t]) for j, t in enumerate(opt)), abs=1e-4)
    single, _ = option_logliks(model, tok, prompts, options, batch_size=1)
    assert np.allclose(single, scores, atol=1e-4)
    assert pairs is not None and [n for _, n in pairs] == [n for _, n in loglikelihood(model, tok, prompts, refs)]
    assert np.allclose([s for s, _ in pairs], [s for s, _ in loglikelihood(model, tok, prompts, refs)], atol=1e-4)
    # generation from the same run of each prompt: generate's answers (and generate_ids', one at
    # a time), with the same scores
    answers, fused, fused_pairs, token_logps = generate_and_score(model, tok, prompts, 12, options, references=refs,
                                                                  batch_size=4)
    assert answers == generate(model, tok, prompts, 12) == [generate_ids(model, tok, p, 12)[0] for p in prompts]
    assert np.allclose(fused, scores, atol=1e-4) and np.allclose(fused_pairs, pairs, atol=1e-4)
    assert generate_and_score(model, tok, prompts, 12, [])[0] == answers  # answers alone
    # each answer's token log-probabilities: what one unbatched, uncached greedy run of the
    # prompt gives each token it chose (its ending eos included)
    for prompt, got in zip(prompts, token_logps, strict=True):
        ids, want, out = prompt_ids(tok, prompt), [], []
        with torch.inference_mode():
            for _ in range(12):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                t = int(logp.argmax())
                want.append(float(logp[t]))
                if t == tok.eos_token_id:
                    break
                ids, out = ids + [t], out + [t]
                if "\n" in tok.decode(out, skip_special_tokens=True):
                    break
        assert len(got) == len(want) and np.allclose(got, want, atol=1e-4)


def _suite(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cal", "version": 1, "cases": {"source": "dataset_eval_split", "limit": 40},
        "generation": {"max_new_tokens": 12},
        "options": {"category": {c: f" category={c}" for c in CATEGORIES}},
        "metrics": [{"name": "category_accuracy", "kind": "field_exact_match", "field": "category"},
                    {"name": "category_ece", "kind": "ece", "field": "category", "bins": 5},
                    {"name": "category_brier", "kind": "brier", "field": "category"},
                    {"name": "answer_loglik", "kind": "loglik"}],
        "gates": [{"metric": "category_ece", "max_regression": 0.10},
                  {"metric": "category_brier", "max_regression": 0.10}], **extra}))
    return path


def test_confidence_is_the_softmax_share_of_the_label_the_model_gave(tmp_path: Path):
    suite = load_suite(_suite(tmp_path))
    cases = [Case(prompt="a", expected={"category": "billing"}, reference=" category=billing priority=low"),
             Case(prompt="b", expected={"category": "returns"}, reference=" category=returns priority=low"),
             Case(prompt="c", expected={"category": "other"}, reference=" category=other priority=low")]
    logp = [[np.log(0.7), np.log(0.1), np.log(0.1), np.log(0.05), np.log(0.05)],
            [np.log(0.5), np.log(0.1), np.log(0.3), np.log(0.05), np.log(0.05)], None]
    answers = ["category=billing priority=low", "gibberish", "category=billing priority=low"]
    parse = lambda text: {"category": text.split()[0].split("=")[1] if "=" in text else None}  # noqa: E731
    r = score(suite, cases, answers, parse, [-1.0, -1.0, -1.0], {"category": (CATEGORIES, logp)})
    # case 1 said billing (p 0.7, right); case 2 said nothing parseable, so its likeliest option
    # (billing, p 0.5) is its answer, and wrong; case 3's label is none of the options: not counted
    assert r.outcomes["category_ece"][:2] == [[pytest.approx(0.7), 1], [pytest.approx(0.5), 0]]
    assert r.outcomes["category_ece"][2] is None and r.outcomes["category_brier"][2] is None
    assert r.outcomes["category_brier"][0] == pytest.approx(0.3 ** 2 + 2 * 0.1 ** 2 + 2 * 0.05 ** 2)
    assert r.outcomes["category_brier"][1] == pytest.approx(0.5 ** 2 + 0.1 ** 2 + 0.7 ** 2 + 2 * 0.05 ** 2)
    assert reliability_bins(r.outcomes["category_ece"], 5) == [
        {"confidence": 0.5, "accuracy": 0.0, "n": 1}, {"confidence": pytest.approx(0.7), "accuracy": 1.0, "n": 1}]
    # a suite that declares no options for the field, or asks a gateway for probabilities
    doc = yaml.safe_load(_suite(tmp_path).read_text())
    doc["options"] = {}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(SuiteError, match=r"needs `options.category`"):
        load_suite(tmp_path / "bad.yaml")
    with pytest.raises(SuiteError, match="only reachable by its answers"):
        run_suite(suite, lambda prompts, max_new: ["x"] * len(prompts), cases)


def test_options_can_be_each_labels_reference_answer(tmp_path: Path):
    suite = load_suite(_suite(tmp_path, options={"category": "references"}))
    cases = [Case(prompt=str(i), expected={"category": c}, reference=f" category={c} priority=low")
             for i, c in enumerate(["billing", "returns", "billing"])]
    assert suite.option_texts("category", cases) == {"billing": " category=billing priority=low",
                                                     "returns": " category=returns priority=low"}
    with pytest.raises(SuiteError, match="show 1 label"):
        suite.option_texts("category", cases[:1])


def test_the_real_model_is_scored_and_a_miscalibrated_copy_is_refused(tmp_path_factory, tmp_path: Path):
    """The demo fine-tune on 40 held-out rows, through run_suite: its options' probabilities
    give an ECE and a Brier score, and the reference answers' likelihood comes from the same
    pass. A copy that gives the very same answers with its option scores flattened tenfold (the
    same accuracy, its probabilities wrong) is refused on calibration, not on accuracy. (The
    tiny fine-tune is right on nearly every case, so over-confidence cannot hurt it; the
    over-confident candidate is the simulated one below.)"""
    from peft import PeftModel

    from tests.tasks import triage
    from tuneship.basemodel import load_base
    from tuneship.generate import generate, option_logliks

    suite = load_suite(_suite(tmp_path))
    cases = load_cases(suite, dataset(tmp_path_factory), triage().parse_answer)
    model, tok = load_base(str(base_model(tmp_path_factory)))
    model = PeftModel.from_pretrained(model, str(finetuned(tmp_path_factory) / "adapter")).merge_and_unload()

    def honest(prompts, max_new):
        return generate(model, tok, prompts, max_new)

    honest.options = lambda prompts, texts, references=None: option_logliks(  # type: ignore[attr-defined]
        model, tok, prompts, texts, references=references)

    def unsure(prompts, max_new):
        return honest(prompts, max_new)

    def flattened(prompts, texts, references=None):
        scores, refs = honest.options(prompts, texts, references=references)
        return [[s / 10 for s in row] for row in scores], refs

    unsure.options = flattened  # type: ignore[attr-defined]
    champion = run_suite(suite, honest, cases, triage().parse_answer)
    copy = run_suite(suite, unsure, cases, triage().parse_answer)
    acc = champion.metrics["category_accuracy"]
    print(f"fine-tune: accuracy {acc:.3f}, ECE {champion.metrics['category_ece']:.3f}, "
          f"Brier {champion.metrics['category_brier']:.3f}; flattened copy: ECE "
          f"{copy.metrics['category_ece']:.3f}, Brier {copy.metrics['category_brier']:.3f}")
    assert all(len(o) == 2 and 0 < o[0] <= 1 for o in champion.outcomes["category_ece"] if o is not None)
    assert champion.metrics["answer_loglik"] < 0 and copy.metrics["category_accuracy"] == acc
    assert apply_gates(suite, champion, champion, "itself").passed
    assert copy.metrics["category_ece"] > champion.metrics["category_ece"] + 0.1
    refused = apply_gates(suite, copy, champion, "champion")
    assert not refused.passed, refused.summary()
    assert {g.metric for g in refused.gates if not g.passed} <= {"category_ece", "category_brier"}


def _token_suite(tmp_path: Path, **metric) -> Path:
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tok", "version": 1, "cases": {"source": "dataset_eval_split", "limit": 40},
        "generation": {"max_new_tokens": 12},
        "metrics": [{"name": "category_accuracy", "kind": "field_exact_match", "field": "category"},
                    {"name": "answer_loglik", "kind": "loglik"},
                    {"name": "answer_ece", "kind": "ece", "bins": 5, **metric},
                    {"name": "answer_brier", "kind": "brier", **metric}],
        "gates": [{"metric": "answer_ece", "max_regression": 0.12},
                  {"metric": "answer_brier", "max_regression": 0.075}]}))
    return path


def test_a_token_rule_reads_the_answers_own_token_probabilities(tmp_path: Path):
    """Free-text calibration: each declared rule's confidence from the answer's token
    log-probabilities, paired with whether the `correct` metric passed that case; a case that
    metric does not count is not a case; a model reachable only by its answers cannot be scored;
    and the declarations are checked."""
    from tuneship.evaluate import token_confidence

    logps = [np.log(0.9), np.log(0.5), np.log(0.8)]
    assert token_confidence("sequence", logps) == pytest.approx(0.36)
    assert token_confidence("mean_token", logps) == pytest.approx(0.36 ** (1 / 3))
    assert token_confidence("min_token", logps) == pytest.approx(0.5)
    assert token_confidence("first_token", logps) == pytest.approx(0.9)
    suite = load_suite(_token_suite(tmp_path, token_rule="min_token", correct="category_accuracy"))
    cases = [Case(prompt="a", expected={"category": "billing"}, reference=" category=billing priority=low"),
             Case(prompt="b", expected={"category": "returns"}, reference=" category=returns priority=low"),
             Case(prompt="c", expected={}, reference=" category=other priority=low")]
    answers = ["category=billing priority=low", "category=billing priority=low", "category=billing"]
    parse = lambda text: {"category": text.split()[0].split("=")[1]}  # noqa: E731
    r = score(suite, cases, answers, parse, [-1.0] * 3, None, [logps, [np.log(0.95)], [np.log(0.7)]])
    assert r.outcomes["answer_ece"] == [[pytest.approx(0.5), 1], [pytest.approx(0.95), 0], None]
    assert r.outcomes["answer_brier"] == [pytest.approx(0.25), pytest.approx(0.95 ** 2), None]
    assert list(r.outcomes) == ["category_accuracy", "answer_loglik", "answer_ece", "answer_brier"]
    with pytest.raises(SuiteError, match="only reachable by its answers"):
        run_suite(suite, lambda prompts, max_new: ["x"] * len(prompts), cases, parse)
    for metric, message in (({"token_rule": "mean_token"}, "needs both `token_rule`"),
                            ({"token_rule": "mean_token", "correct": "answer_loglik"}, "must name a pass/fail"),
                            ({"token_rule": "mean_token", "correct": "nope"}, "must name a pass/fail"),
                            ({"token_rule": "mean_token", "correct": "category_accuracy", "field": "category"},
                             "not both"),
                            ({"token_rule": "median", "correct": "category_accuracy"}, "token_rule"),
                            ({}, "or `token_rule` and `correct`")):
        with pytest.raises(SuiteError, match=message):
            load_suite(_token_suite(tmp_path, **metric))


def test_the_real_model_gives_token_confidences_and_a_tempered_copy_is_refused(tmp_path_factory, tmp_path: Path):
    """The demo fine-tune on 40 held-out rows through run_suite and the one-pass scorer that
    ships (`generate_and_score`): its answers' token probabilities give an ECE and a Brier score
    under the mean_token rule. A copy with the very same answers and its token log-probabilities
    tempered tenfold (right as often, far less sure) is refused on calibration, not on accuracy."""
    from tests.tasks import triage
    from tuneship.stages import _generator

    suite = load_suite(_token_suite(tmp_path, token_rule="mean_token", correct="category_accuracy"))
    cases = load_cases(suite, dataset(tmp_path_factory), triage().parse_answer)
    honest = _generator(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter", "fine-tune")

    def unsure(prompts, max_new):
        return honest(prompts, max_new)

    def tempered(*args, **kwargs):
        got = honest.scored(*args, **kwargs)
        return got._replace(answer_logprobs=[[v * 10 for v in row] for row in got.answer_logprobs])

    unsure.scored = tempered  # type: ignore[attr-defined]
    champion = run_suite(suite, honest, cases, triage().parse_answer)
    copy = run_suite(suite, unsure, cases, triage().parse_answer)
    acc = champion.metrics["category_accuracy"]
    print(f"fine-tune: accuracy {acc:.3f}, mean-token ECE {champion.metrics['answer_ece']:.3f}, Brier "
          f"{champion.metrics['answer_brier']:.3f}; tempered copy: ECE {copy.metrics['answer_ece']:.3f}, "
          f"Brier {copy.metrics['answer_brier']:.3f}")
    assert all(0 < o[0] <= 1 for o in champion.outcomes["answer_ece"] if o is not None)
    assert copy.metrics["category_accuracy"] == acc and copy.completions == champion.completions
    assert apply_gates(suite, champion, champion, "itself").passed
    refused = apply_gates(suite, copy, champion, "champion")
    assert not refused.passed, refused.summary()
    assert {g.metric for g in refused.gates if not g.passed} == {"answer_ece", "answer_brier"}


def _calibrated_pair(rng: np.random.Generator, suite, ece: str, brier: str, n: int = 40, sure: bool = False):
    """A champion and a candidate on the same n cases, both calibrated (right with the
    probability they state), disagreeing on about a tenth; `sure`: the candidate gives the same
    answers, each with probability 0.99. Every other gated metric: the same answers' outcome
    (likelihood -1.0 nats). Brier is two-label for a field's options, (p - right)^2 for a token rule."""
    q = rng.beta(5, 1.5, n)  # confidence of the champion's answers, mean ~0.77
    ok_ref = rng.random(n) < q
    redo = rng.random(n) < 0.1
    ok_cand = np.where(redo, rng.random(n) < q, ok_ref)
    conf = np.full(n, 0.99) if sure else np.clip(q + rng.normal(0, 0.03, n), 0.01, 1.0)
    metrics = {m.name: m for m in suite.metrics}
    labels = 1 if metrics[brier].token_rule else 2

    def res(c, ok):
        out = {m.name: ([-1.0] * n if m.kind == "loglik" else ok.tolist()) for m in suite.metrics}
        out[ece] = [[float(a), bool(b)] for a, b in zip(c, ok, strict=True)]
        out[brier] = (labels * np.where(ok, (1 - c) ** 2, c ** 2)).tolist()
        return result(out, suite.name)

    return res(conf, ok_cand if not sure else ok_ref), res(q, ok_ref)


@pytest.mark.parametrize("name, ece, brier", [("triage", "category_ece", "category_brier"),
                                              ("faq", "answer_ece", "answer_brier")])
def test_calibration_gates_refuse_over_confidence_and_pass_equals_as_declared(name, ece, brier):
    """300 seeds each, through a shipped suite's calibration gates (triage: a closed label set's
    options; faq: the token rule over free text): an equally calibrated candidate is refused at
    most 1 - power of the time (per gate, with Monte Carlo slack); one with the same answers at
    0.99 confidence is refused most of the time."""
    suite = load_suite(name)
    rng = np.random.default_rng(5)
    gates = (ece, brier)
    equal = {g: 0 for g in gates}
    sure = {g: 0 for g in gates}
    for _ in range(300):
        for tally, flag in ((equal, False), (sure, True)):
            cand, ref = _calibrated_pair(rng, suite, ece, brier, sure=flag)
            report = apply_gates(suite, cand, ref, "champion")
            for g in report.gates:
                if g.metric in gates and not g.passed:
                    tally[g.metric] += 1
    print(f"{name}: equal candidates refused: " + ", ".join(f"{g} {equal[g] / 300:.3f}" for g in gates)
          + "; over-confident refused: " + ", ".join(f"{g} {sure[g] / 300:.3f}" for g in gates))
    assert all(equal[g] / 300 <= 1 - suite.statistics.power + 0.05 for g in gates), equal
    assert all(sure[g] / 300 >= 0.8 for g in gates), sure
