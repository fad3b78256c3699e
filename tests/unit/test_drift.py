"""Drift tests per feature (tuneship.drift): the packaged embedding model reproduces
sentence-transformers, the MMD permutation test holds its level and finds shifts (synthetic
Gaussians, then the triage task's real drifted tickets), the answer features find what they
should and nothing else, and Holm / Benjamini-Hochberg match worked examples and scipy."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import false_discovery_control, kstest

from tests.tasks import task_module, triage
from tuneship import drift
from tuneship.tasks import load_task

# sentence-transformers 6.2.0, SentenceTransformer(<the wheel's model dir>).encode(...) on CPU,
# computed once; columns 0, 1, 2, 100, 383 of each 384-wide embedding
_ST_TEXTS = [
    "This is an example sentence",
    "Each sentence is converted",
    "Ticket: My package with the blue sneakers has not arrived yet and tracking has not moved.\nTriage:",
    " ".join(("the parcel with my headphones is stuck in transit and the courier will not answer " * 40).split()[:400]),
]
_ST_COLUMNS = [0, 1, 2, 100, 383]
_ST_VALUES = [
    [0.06765688955783844, 0.06349588930606842, 0.04871305823326111, -0.010392418131232262, -0.04222872480750084],
    [0.08643858879804611, 0.10276265442371368, 0.00539457006379962, 0.0008092369535006583, -0.08417750149965286],
    [-0.06295282393693924, -0.01676033064723015, 0.011123455129563808, 0.008365471847355366, 0.04071138799190521],
    # 429 tokens: truncated at the model's max_seq_length (256) as sentence-transformers does
    [0.006786228157579899, -0.0723680853843689, 0.029724953696131706, 0.0744144544005394, -0.03212514519691467],
]


@pytest.fixture(scope="module")
def embedder() -> drift.Embedder:
    import torch

    torch.set_num_threads(1)  # a test, not a benchmark: leave the other core to the rest of CI
    return drift.Embedder(batch_size=16)


# ---------------------------------------------------------------- the embedding model


def test_the_wheel_declares_mean_pooling_and_normalisation_and_we_read_it():
    p = drift.read_pooling(drift.packaged_model_dir())
    assert p == drift.Pooling(mode="mean", normalize=True, max_seq_length=256, dimension=384)


def test_a_pooling_we_do_not_reproduce_is_refused(tmp_path: Path):
    src = drift.packaged_model_dir()
    for name in ("modules.json", "sentence_bert_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "1_Pooling").mkdir()
    cfg = json.loads((src / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False,
                                                                     "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling"):
        drift.read_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False,
                                                                     "pooling_mode_cls_token": True}))
    assert drift.read_pooling(tmp_path).mode == "cls"


def test_embeddings_equal_sentence_transformers_on_the_same_files(embedder: drift.Embedder):
    emb = embedder.embed(_ST_TEXTS)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[:, _ST_COLUMNS], np.array(_ST_VALUES), atol=2e-5)
    # one at a time (no padding) gives the same rows as a padded batch, in input order
    alone = np.stack([embedder.embed([t])[0] for t in _ST_TEXTS])
    np.testing.assert_allclose(alone, emb, atol=2e-5)


def test_sample_is_seeded_bounded_and_keeps_order():
    items = list(range(1000))
    a = drift.sample(items, 256, seed=3)
    assert a == drift.sample(items, 256, seed=3) and a != drift.sample(items, 256, seed=4)
    assert len(a) == 256 == len(set(a)) and a == sorted(a)
    assert drift.sample(items[:10], 256, seed=3) == items[:10]


# ---------------------------------------------------------------- MMD permutation test


def _naive_mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    def k(a, b):
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma * sigma)))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_bandwidth_and_vectorised_permutations_match_the_formulas():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    z = np.concatenate([x, y])
    res = drift.mmd_test(x, y, permutations=50, seed=1)
    assert res.bandwidth == pytest.approx(float(np.median(pdist(z))))
    assert res.statistic == pytest.approx(_naive_mmd2(x, y, res.bandwidth), rel=1e-10)
    # every column of a membership matrix: the statistic of that split, as the loop computes it
    k0 = np.exp(-drift._sq_dists(z) / (2 * res.bandwidth ** 2))
    np.fill_diagonal(k0, 0.0)
    splits = [rng.permutation(21) for _ in range(5)]
    a = np.zeros((21, 5))
    for j, perm in enumerate(splits):
        a[perm[:12], j] = 1.0
    fast = drift._mmd2_unbiased(k0, k0.sum(1), float(k0.sum()), a, 12, 9)
    slow = [_naive_mmd2(z[p[:12]], z[p[12:]], res.bandwidth) for p in splits]
    np.testing.assert_allclose(fast, slow, rtol=1e-10)
    assert res.null.shape == (50,) and res.p_value == (1 + np.sum(res.null >= res.statistic - 1e-12)) / 51


def test_mmd_p_values_are_uniform_under_the_null():
    """200 pairs of equal Gaussian samples (64 + 64, 8 dims, 200 permutations each): the
    false-positive rate at 0.05 stays within sampling error of 0.05 and the p-values look
    uniform. A statistic that is not recomputed per permutation, or a p-value without its +1,
    fails here."""
    ps = []
    for s in range(200):
        rng = np.random.default_rng(1000 + s)
        ps.append(drift.mmd_test(rng.normal(size=(64, 8)), rng.normal(size=(64, 8)), permutations=200, seed=s).p_value)
    ps = np.array(ps)
    fpr = float(np.mean(ps <= 0.05))
    assert fpr <= 0.05 + 0.035  # 0.05 + 2.3 binomial standard errors at 200 draws
    assert kstest(ps, "uniform").pvalue > 0.01
    assert ps.min() >= 1 / 201


def test_mmd_detects_a_shifted_gaussian_and_is_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(128, 8)), rng.normal(size=(128, 8))
    y[:, 0] += 0.8
    res = drift.mmd_test(x, y, permutations=300, seed=5)
    assert res.p_value == 1 / 301 and res.statistic > np.quantile(res.null, 0.99)
    again = drift.mmd_test(x, y, permutations=300, seed=5)
    assert np.array_equal(again.null, res.null)


def test_mmd_refuses_what_it_cannot_test():
    with pytest.raises(ValueError, match="same width"):
        drift.mmd_test(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        drift.mmd_test(np.zeros((1, 2)), np.zeros((4, 2)))


def test_triage_drifted_tickets_are_detected_and_same_distribution_halves_are_not(embedder: drift.Embedder):
    """The demo's drift cycle: traffic_prompts(drift=0.8) against undrifted traffic, 64 a side."""
    t = triage()
    ref = drift.embedding_sample(t.traffic_prompts(200, seed=31), n=64, seed=0, model=embedder)
    assert ref["n"] == 64 and ref["of"] == 200 and ref["model"] == drift.EMBEDDING_MODEL
    same = embedder.embed(t.traffic_prompts(64, seed=32))
    drifted = embedder.embed(t.traffic_prompts(64, seed=33, drift=0.8))
    assert drift.mmd_test(ref["embeddings"], same, permutations=300, seed=0).p_value > 0.05
    hit = drift.mmd_test(ref["embeddings"], drifted, permutations=300, seed=0)
    assert hit.p_value == 1 / 301 and hit.statistic > 10 * np.quantile(hit.null, 0.95)


# ---------------------------------------------------------------- answers


def _triage_answers(n: int, seed: int, *, categories=None, broken: float = 0.0) -> list[str]:
    t = triage()
    rng = random.Random(seed)
    cats = categories or list(t.CATEGORIES)
    out = []
    for _ in range(n):
        if rng.random() < broken:
            out.append(rng.choice([" I think this is about billing", " not sure", " category=refunds priority=high"]))
        else:
            out.append(t.make_completion(rng.choice(cats), rng.choice(t.PRIORITIES)))
    return out


def _features(verdict: dict) -> dict[str, dict]:
    return {r["feature"]: r for r in verdict["features"]}


def test_same_answers_drift_nowhere():
    t = triage()
    v, mmd = drift.drift_check(reference_answers=_triage_answers(300, 1), current_answers=_triage_answers(300, 2),
                               conforms=t.answer_conforms, parse=t.parse_answer, fields=["category", "priority"])
    assert mmd is None and v["family_size"] == 4 and not v["drifted"], v
    assert set(_features(v)) == {"answer_length", "format_failure_rate", "label:category", "label:priority"}


def test_format_failures_are_found_and_do_not_leak_into_the_labels():
    t = triage()
    v, _ = drift.drift_check(reference_answers=_triage_answers(300, 1),
                             current_answers=_triage_answers(300, 2, broken=0.2),
                             conforms=t.answer_conforms, parse=t.parse_answer, fields=["category", "priority"])
    f = _features(v)
    assert f["format_failure_rate"]["drifted"] and f["format_failure_rate"]["effect"] > 0.1
    assert f["answer_length"]["drifted"]  # the broken answers are longer or shorter
    assert not f["label:category"]["drifted"] and not f["label:priority"]["drifted"]


def test_a_label_shift_is_found_in_its_field_only():
    t = triage()
    skewed = ["billing"] * 4 + list(t.CATEGORIES)  # billing about half the answers
    v, _ = drift.drift_check(reference_answers=_triage_answers(300, 1),
                             current_answers=_triage_answers(300, 2, categories=skewed),
                             conforms=t.answer_conforms, parse=t.parse_answer, fields=["category", "priority"])
    f = _features(v)
    assert v["drifted_features"] == ["label:category"], v
    assert f["label:category"]["current_value"]["billing"] > 0.4 > f["label:category"]["reference_value"]["billing"]
    assert f["label:category"]["effect"] > 0.2


def test_refusals_use_the_tasks_declared_detector():
    faq = task_module("faq")
    declined = drift.refusal_detector(load_task("faq"))
    assert declined is not None and declined(faq.DECLINE) and not declined(faq.answer_for(faq.TOPICS[0]))
    assert drift.refusal_detector(load_task("triage")) is None  # no triage suite declares one
    rng = random.Random(0)

    def answers(n, share):
        return [faq.DECLINE if rng.random() < share else faq.answer_for(rng.choice(faq.TOPICS)) for _ in range(n)]

    v, _ = drift.drift_check(reference_answers=answers(200, 0.1), current_answers=answers(200, 0.4),
                             conforms=faq.answer_conforms, parse=faq.parse_answer, fields=["topic"], declined=declined)
    f = _features(v)
    assert f["refusal_rate"]["drifted"] and f["refusal_rate"]["effect"] > 0.2
    assert f["refusal_rate"]["reference_value"] < 0.2 < f["refusal_rate"]["current_value"]


# ---------------------------------------------------------------- multiple testing


def test_holm_and_bh_on_a_worked_example():
    p = [0.01, 0.04, 0.03, 0.005]  # R: p.adjust(p, "holm") = 0.03 0.06 0.06 0.02; "BH" = 0.02 0.04 0.04 0.02
    np.testing.assert_allclose(drift.holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(drift.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(drift.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1


def test_bh_equals_scipy_and_holm_equals_the_step_down_procedure():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = np.concatenate([rng.uniform(size=6), rng.uniform(0, 0.02, size=3)])
        np.testing.assert_allclose(drift.benjamini_hochberg(p), false_discovery_control(p, method="bh"))
        # Holm 1979: reject the i-th smallest while p_(i) <= alpha / (k - i + 1), stop at the first that is not
        order, rejected = np.argsort(p), set()
        for i, j in enumerate(order):
            if p[j] > 0.05 / (len(p) - i):
                break
            rejected.add(int(j))
        assert {int(j) for j in np.flatnonzero(drift.holm(p) <= 0.05)} == rejected


def test_holm_holds_the_family_wise_error_where_uncorrected_tests_do_not():
    """Six null features per check (uniform p-values), 2,000 checks: without a correction a
    third of the checks would call drift; with Holm at most about 5 %."""
    rng = np.random.default_rng(11)
    checks = rng.uniform(size=(2000, 6))
    raw = np.mean((checks <= 0.05).any(axis=1))
    fwer = np.mean([(drift.holm(row) <= 0.05).any() for row in checks])
    assert raw > 0.2 and fwer <= 0.05 + 0.012


def test_decide_corrects_declares_and_respects_a_minimum_effect():
    tests = [drift.FeatureTest(f"f{i}", "t", 0.01, 0.3, "e", 10, 10) for i in range(20)]
    holm_v = drift.decide(tests, method="holm")
    bh_v = drift.decide(tests, method="bh")
    assert not holm_v["drifted"] and all(r["p_adjusted"] == pytest.approx(0.2) for r in holm_v["features"])
    assert len(bh_v["drifted_features"]) == 20 and bh_v["method"] == "bh" and bh_v["family_size"] == 20
    small = [drift.FeatureTest("big", "t", 1e-6, 0.5, "e", 10, 10), drift.FeatureTest("tiny", "t", 1e-6, 0.01, "e", 10, 10),
             drift.FeatureTest("none", "t", None, None, "e", 0, 10, note="an empty side")]
    v = drift.decide(small, min_effect={"tiny": 0.05})
    f = _features(v)
    assert v["drifted_features"] == ["big"] and f["tiny"]["significant"] and not f["tiny"]["drifted"]
    assert v["untested"] == ["none"] and v["family_size"] == 2
    with pytest.raises(ValueError, match="method"):
        drift.decide(small, method="bonferroni")


# ---------------------------------------------------------------- the whole check and its chart


def test_one_check_with_embeddings_and_answers_gives_a_json_verdict_and_a_chart(tmp_path: Path):
    import matplotlib.image

    t = triage()
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    y[:, :2] += 1.0
    v, mmd = drift.drift_check(reference_embeddings=x, current_embeddings=y,
                               reference_answers=_triage_answers(200, 1), current_answers=_triage_answers(200, 2),
                               conforms=t.answer_conforms, parse=t.parse_answer, fields=["category", "priority"],
                               permutations=200, seed=0)
    assert v["drifted_features"] == ["prompt_embedding"] and v["family_size"] == 5
    assert v["embedding"]["n_reference"] == 64 and v["embedding"]["permutations"] == 200
    assert "Gretton" in v["embedding"]["reference"]
    with pytest.raises(ValueError, match="cannot show drift"):  # 1/20 * 4 features > 0.05
        drift.drift_check(reference_embeddings=x, current_embeddings=y, reference_answers=["a"], current_answers=["b"],
                          conforms=t.answer_conforms, parse=t.parse_answer, fields=["category"], permutations=19)
    json.dumps(v)  # stored as the run's drift JSON
    out = drift.drift_tests_chart(v, tmp_path / "drift-tests.png", "triage: drift tests", mmd)
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 1000  # two panels


def _pairs(rng: random.Random, n: int, confidence: float, success: float) -> list[tuple[float, bool]]:
    """n answers at about `confidence`, right with probability `success`."""
    return [(min(1.0, max(0.0, rng.gauss(confidence, 0.05))), rng.random() < success) for _ in range(n)]


def test_calibration_drift_is_an_over_confident_model_not_a_harder_mix():
    """The gap (confidence - success) is what is compared: the same confidence with success
    falling from 0.85 to 0.55 is drift (effect about +0.3); success falling with the confidence
    following it is not; and the same mix, under repeated draws, fires at about its level."""
    rng = random.Random(7)
    reference = _pairs(rng, 120, 0.85, 0.85)
    over = drift.calibration_test(reference, _pairs(rng, 120, 0.85, 0.55))
    assert over.p_value < 1e-4 and over.effect == pytest.approx(0.30, abs=0.1)
    assert over.reference_value["task_success"] > over.current_value["task_success"]
    assert over.current_value["mean_confidence"] == pytest.approx(0.85, abs=0.02)
    followed = drift.calibration_test(reference, _pairs(rng, 120, 0.55, 0.55))
    assert followed.p_value > 0.01 and abs(followed.effect) < 0.1
    fired = sum(drift.calibration_test(_pairs(rng, 60, 0.8, 0.8), _pairs(rng, 60, 0.8, 0.8)).p_value <= 0.05
                for _ in range(400))
    assert fired / 400 <= 0.08, fired  # Welch's t at its 5% level (binomial sd 1.1%)


def test_calibration_says_what_it_needs_before_it_tests():
    few = drift.calibration_test([(0.9, True)] * 30, [(0.9, True)] * 7, min_pairs=20)
    assert few.p_value is None and "reference 30, current 7" in few.note
    # no spread on either side: equal gaps are not drift, different ones are
    assert drift.calibration_test([(0.9, True)] * 25, [(0.9, True)] * 25).p_value == 1.0
    assert drift.calibration_test([(0.9, True)] * 25, [(0.9, False)] * 25).p_value == 0.0


def test_calibration_joins_the_family_only_with_enough_feedback():
    rng = random.Random(3)
    answers = _triage_answers(40, 1)
    t = triage()
    kw = {"reference_answers": answers, "current_answers": answers, "conforms": t.answer_conforms,
          "parse": t.parse_answer, "fields": ["category"]}
    verdict, _ = drift.drift_check(reference_calibration=_pairs(rng, 80, 0.9, 0.9),
                                   current_calibration=_pairs(rng, 80, 0.9, 0.4), **kw)
    assert verdict["drifted_features"] == ["calibration_gap"] and verdict["family_size"] == 4
    verdict, _ = drift.drift_check(reference_calibration=[], current_calibration=_pairs(rng, 80, 0.9, 0.4), **kw)
    assert not verdict["drifted"] and verdict["untested"] == ["calibration_gap"] and verdict["family_size"] == 3
