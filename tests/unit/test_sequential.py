"""tuneship.sequential: the confidence sequences held to confseq's own outputs (fixture), their
coverage uniformly over time, and the shadow decision on simulated candidates (bench.shadow's
simulator, at a small scale; `python -m bench shadow` runs it large)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.shadow import EXPECTED, SCENARIOS, simulate, summarize
from tuneship.sequential import (
    MeanCS,
    PairedDiffCS,
    Policy,
    QuantileCS,
    QuantileRatioCS,
    Rule,
    SequentialRelease,
    beta_binomial_bound,
    beta_binomial_log_mixture,
    latency_edges,
    quantile_order_indices,
)

REF = json.loads((Path(__file__).parents[1] / "fixtures" / "sequential" / "confseq_reference.json").read_text())


# ------------------------------------------------------------------ against confseq 0.0.11


@pytest.mark.parametrize("case", REF["eb"], ids=lambda c: f"{c['stream']}-{c['alpha']}")
def test_eb_cs_matches_confseq_in_any_chunking(case):
    x = np.asarray(case["x"])
    cs = MeanCS(case["alpha"])
    parts = [cs.update(chunk) for chunk in np.split(x, [1, 37, 38, 250])]
    lo, up = (np.concatenate(p) for p in zip(*parts, strict=True))
    np.testing.assert_allclose(lo, case["lower"], atol=1e-12)
    np.testing.assert_allclose(up, case["upper"], atol=1e-12)
    # persisted and restored between polls: the same state
    again = MeanCS.from_state(json.loads(json.dumps(MeanCS(case["alpha"]).to_state())))
    again.update(x[:200])
    again = MeanCS.from_state(json.loads(json.dumps(again.to_state())))
    again.update(x[200:])
    assert again.interval() == pytest.approx((case["lower"][-1], case["upper"][-1]), abs=1e-12)


def test_beta_binomial_boundary_matches_confseq():
    for b in REF["beta_binomial_bound"]:
        u = beta_binomial_bound(b["v"], b["alpha"], v_opt=b["t_opt"] * b["p"] * (1 - b["p"]), g=b["g"], h=b["h"],
                                one_sided=b["one_sided"])
        np.testing.assert_allclose(u, b["bound"], rtol=1e-7, err_msg=str({k: b[k] for k in ("p", "side", "alpha")}))
    for m in REF["beta_binomial_log_mixture"]:
        got = beta_binomial_log_mixture(m["s"], m["v"], v_opt=m["v_opt"], g=m["g"], h=m["h"], alpha_opt=m["alpha_opt"])
        assert float(got) == pytest.approx(m["value"], abs=1e-9)
    assert "confseq 0.0.11" in REF["produced_by"]


# ------------------------------------------------------------------ properties


def test_mean_cs_covers_the_true_mean_at_all_times():
    rng = np.random.default_rng(7)
    alpha, streams, n = 0.1, 1000, 1500
    for mean, draw in ((0.05, lambda: (rng.random((streams, n)) < 0.05).astype(float)),
                       (2 / 7, lambda: rng.beta(2, 5, (streams, n)))):
        cs = MeanCS(alpha, shape=(streams,))
        lo, up = cs.update(draw())
        missed = ((lo > mean) | (up < mean)).any(axis=1).mean()
        assert missed <= alpha  # in fact far below: the EB CS is conservative
        assert (np.diff(lo, axis=1) >= 0).all() and (np.diff(up, axis=1) <= 0).all()  # running intersection
    assert cs.high.mean() - cs.low.mean() < 0.06  # and it does shrink


def test_mean_cs_skips_missing_observations():
    x = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    a, b = MeanCS(0.05), MeanCS(0.05)
    a.update(x)
    b.update(np.insert(x, [1, 3, 3], np.nan))
    assert (a.interval(), a.n) == (b.interval(), b.n)
    with pytest.raises(ValueError):
        MeanCS(0.05).update([1.5])


def test_paired_diff_cs_maps_back_to_minus_one_one():
    d = PairedDiffCS(0.05)
    live = np.random.default_rng(1).permutation(np.r_[np.ones(3200), np.zeros(800)])
    d.update_pairs(np.ones(4000), live)  # candidate +0.2
    lo, hi = d.interval()
    assert 0.1 < lo < 0.2 < hi < 0.3 and d.mean == pytest.approx(0.2)


def test_quantile_indices_follow_theorem_1():
    t, p, alpha, t_opt = 1000, 0.95, 0.025, 1000
    k_lo, k_up = quantile_order_indices(t, p, alpha, t_opt)
    u_lo = beta_binomial_bound([t * p * (1 - p)], alpha, v_opt=t_opt * p * (1 - p), g=1 - p, h=p)[0]
    u_up = beta_binomial_bound([t * p * (1 - p)], alpha, v_opt=t_opt * p * (1 - p), g=p, h=1 - p)[0]
    assert (k_lo, k_up) == (math.ceil(t * p - u_lo), math.floor(t * p + u_up) + 1)
    assert k_lo < 950 < k_up <= t
    arr = quantile_order_indices(np.array([0, 1000, 1000]), p, alpha, t_opt)
    assert arr[0].tolist() == [0, k_lo, k_lo] and arr[1].tolist() == [1, k_up, k_up]


def test_quantile_cs_brackets_exact_order_statistics_and_covers():
    rng = np.random.default_rng(3)
    x = rng.lognormal(np.log(400), 0.5, 3000)
    cs = QuantileCS(0.95, 0.05, t_opt=1000)
    cs.update(x)
    k_lo, k_up = quantile_order_indices(3000, 0.95, 0.025, 1000)
    xs = np.sort(x)
    lo, hi = cs.interval()
    assert lo <= xs[k_lo - 1] < lo * 1.005 + 1e-9 and hi / 1.005 - 1e-9 <= xs[k_up - 1] <= hi  # one bin outwards
    # coverage over polls, 400 streams: the true p95 of the lognormal
    true = 400 * math.exp(0.5 * 1.6448536269514722)
    streams, alpha = 400, 0.1
    q = QuantileCS(0.95, alpha, t_opt=500, shape=(streams,))
    missed = np.zeros(streams, dtype=bool)
    for _ in range(30):
        q.update(rng.lognormal(np.log(400), 0.5, (streams, 100)))
        missed |= (q.low > true) | (q.high < true)
    assert missed.mean() <= alpha
    assert np.median(q.high / q.low) < 1.15
    state = QuantileCS.from_state(json.loads(json.dumps(cs.to_state())))
    assert state.interval() == cs.interval() and state.n == cs.n


def test_quantile_ratio_is_the_union_bound():
    rng = np.random.default_rng(5)
    r = QuantileRatioCS(0.95, 0.05, t_opt=1000)
    r.update(1.5 * rng.lognormal(6, 0.5, 4000), rng.lognormal(6, 0.5, 4000))
    lo, hi = r.interval()
    assert lo == pytest.approx(r.candidate.low / r.live.high) and hi == pytest.approx(r.candidate.high / r.live.low)
    assert 1.25 < lo < 1.5 < hi
    assert r.candidate.alpha == r.live.alpha == 0.025


# ------------------------------------------------------------------ the decision


RULES = [Rule("error_rate", "rate", "at_most", 0.01), Rule("p95_ms", "quantile", "at_most", 2000.0),
         Rule("format_diff", "diff", "at_least", -0.05)]


def _release(policy: Policy) -> SequentialRelease:
    return SequentialRelease(RULES, policy)


def test_decide_rolls_back_any_time_and_says_which_bound_crossed():
    rel = _release(Policy(min_requests=1000, min_seconds=3600))
    errs = np.random.default_rng(0).permutation(np.r_[np.ones(20), np.zeros(180)])  # 10 % errors
    rel.update({"error_rate": errs, "p95_ms": np.full(200, 300.0), "format_diff": np.zeros(200)}, requests=200)
    out = rel.decide(elapsed_s=60)
    assert out["verdict"] == "rollback" and out["alpha_per_metric"] == pytest.approx(0.05 / 3)
    m = {x["name"]: x for x in out["metrics"]}
    assert m["error_rate"]["status"] == "bad" and m["error_rate"]["decided_at_requests"] == 200
    assert m["error_rate"]["crossed"].startswith("lower bound") and "> 0.01" in m["error_rate"]["crossed"]
    assert out["reasons"][0].startswith("error_rate: lower bound") and "after 200 requests" in out["reasons"][0]


def test_decide_promotes_early_only_after_the_minimums():
    rng = np.random.default_rng(11)
    rel = _release(Policy(min_requests=3000, min_seconds=7200))
    for poll in range(1, 41):
        rel.update({"error_rate": np.zeros(100), "p95_ms": rng.lognormal(6, 0.3, 100),
                    "format_diff": np.zeros(100)}, requests=100)
        out = rel.decide(elapsed_s=poll * 300.0)
        if out["verdict"] != "continue":
            break
    assert out["verdict"] == "promote" and out["requests"] >= 3000 and out["elapsed_s"] >= 7200
    assert all(m["status"] == "good" for m in out["metrics"])
    assert any(r.startswith("early promote") for r in out["reasons"])
    restored = SequentialRelease.from_state(json.loads(json.dumps(rel.to_state())))
    assert restored.decide(elapsed_s=out["elapsed_s"])["verdict"] == "promote"


@pytest.mark.parametrize("on_open", ["hold", "rollback"])
def test_window_end_decides_what_is_open_by_the_declared_rule(on_open):
    rel = _release(Policy(on_open=on_open, window_seconds=3600))
    rel.update({"error_rate": np.r_[np.zeros(95), np.ones(1)], "p95_ms": np.full(96, 100.0),
                "format_diff": np.zeros(96)}, requests=96)
    assert rel.decide(elapsed_s=1800)["verdict"] == "continue"
    out = rel.decide(elapsed_s=3600)
    assert out["verdict"] == on_open and out["window_over"]
    assert any("still open at the window's end" in r for r in out["reasons"])


def test_latency_edges_hold_the_thresholds():
    e = latency_edges(extra=[2000.0, 1234.5])
    assert {0.0, 2000.0, 1234.5} <= set(e.tolist()) and e[-1] == np.inf and (np.diff(e) > 0).all()


# ------------------------------------------------------------------ simulated candidates

POLICY = Policy(min_requests=500, min_seconds=3600)
WINDOW = 5000  # requests (14 h at 0.1 request/s): the scenarios decide well inside it


def test_equal_candidates_are_not_rolled_back_beyond_alpha():
    res = simulate(SCENARIOS["equal"], streams=240, window_requests=WINDOW, poll=100, policy=POLICY, seed=101)
    s = summarize("equal", res, POLICY.alpha)
    assert s["wrong_rate"] <= POLICY.alpha  # false alarms: rollbacks of an equal candidate
    assert s["verdicts"]["promote"] >= 0.9 * s["streams"]
    assert s["requests_to_expected"]["p90"] <= WINDOW


@pytest.mark.parametrize("name", ["better", "worse_slice", "slower", "intermittent"])
def test_scenarios_get_their_verdicts(name):
    policy = POLICY if name != "intermittent" else Policy(min_requests=500, min_seconds=12 * 3600)
    res = simulate(SCENARIOS[name], streams=60, window_requests=WINDOW, poll=100, policy=policy, seed=202)
    s = summarize(name, res, policy.alpha)
    counts = s["verdicts"]
    # intermittent failures (3 % in 5-minute bursts) need time to show: with a 12 h minimum the
    # rest of this short window is held for a person, not promoted
    assert counts[EXPECTED[name]] >= (0.75 if name == "intermittent" else 0.9) * s["streams"], s
    if EXPECTED[name] == "rollback":  # a worse candidate is not promoted early beyond alpha
        assert s["wrong_rate"] <= policy.alpha, s
    assert s["requests_to_expected"]["median"] is not None
