"""The serving gate's statistics and decisions on simulated readings: Harrell-Davis quantiles
(scipy's as the oracle), the paired ratio intervals, and how often the gate wrongly refuses an
equal candidate (at or under the declared 5%) or lets a slower one through.

Simulated requests: each prompt has its own cost (lognormal across prompts, as prompt and answer
lengths vary) and each measurement its own noise (lognormal, 10%: what the real interleaved
measurement shows, tests/integration/test_serving_gate.py and README Figures). "busy" adds a
spike (1.5x to 2x) to 2% of measurements, drawn independently for the two models, harsher than
a busy machine measured. Each round of the gate draws new requests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats.mstats import hdquantiles

from tuneship import serving_gate, stats
from tuneship.serving_gate import Reading
from tuneship.tasks import ServingSpec

NOISE = {"measured": (0.1, 0.0), "busy": (0.1, 0.02)}  # per-measurement sigma, share of 1.5-2x spikes


def _requests(seed: int, n: int = 30, slower: float = 1.0, noise: str = "measured") -> tuple[Reading, Reading]:
    g = np.random.default_rng(seed)
    cost = g.lognormal(np.log(300), 0.3, n)
    tokens = g.integers(4, 13, n)
    sigma, spikes = NOISE[noise]

    def side(factor: float, name: str) -> Reading:
        jolt = np.where(g.random(n) < spikes, g.uniform(1.5, 2, n), 1)
        return Reading(name, list(cost * factor * g.lognormal(0, sigma, n) * jolt), [int(t) for t in tokens],
                       700.0 * factor ** 0.5, 2)

    return side(slower, "candidate"), side(1.0, "live")


def _gate(seed: int, slower: float, noise: str, spec: ServingSpec | None = None) -> dict:
    """The serving gate's rounds on simulated requests (each round new ones)."""
    def measure_round(k: int) -> dict[str, Reading]:
        cand, live = _requests(seed * 10 + k, slower=slower, noise=noise)
        return {"candidate": cand, "live": live}

    return serving_gate.gate(spec or ServingSpec(), measure_round, "candidate", "live", seed=seed, log=lambda _: None)[1]


def test_harrell_davis_matches_scipy_and_its_weights_sum_to_one():
    x = np.random.default_rng(0).lognormal(size=37)
    for q in (0.5, 0.9, 0.95):
        assert stats.hd_quantile(x, q) == pytest.approx(hdquantiles(x, [q])[0], rel=1e-12)
        assert stats.hd_weights(37, q).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0 < q < 1"):
        stats.hd_weights(10, 1.0)


def test_paired_ratios_scale_exactly_and_reject_unpaired_input():
    x = np.random.default_rng(1).lognormal(size=30)
    r = stats.paired_quantile_ratio(1.7 * x, x, 0.95)
    assert r.ratio == pytest.approx(1.7) and r.low == pytest.approx(1.7) and r.p_value == 0.0
    t = stats.paired_rate_ratio([5] * 30, 2 * x, [5] * 30, x)
    assert t.ratio == pytest.approx(0.5) and t.high == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_quantile_ratio(x[:10], x, 0.95)


@pytest.mark.parametrize("noise", ["measured", "busy"])
def test_equal_candidates_are_wrongly_refused_at_most_at_the_declared_rate(noise):
    """5% slower, as two identical deployments in one server measured (README, Figures)."""
    results = [_gate(s, 1.05, noise) for s in range(200)]
    failed = sum(any(r["verdict"] == "fail" for r in res["rows"]) for res in results)
    refused = sum(not res["passed"] for res in results)
    assert failed / 200 <= 0.05, failed  # a wrong decision: the declared error rate
    # still undecided after three rounds counts as refused: rare, and only on a busy machine
    assert refused / 200 <= (0.05 if noise == "measured" else 0.10), refused
    assert max(res["rounds"] for res in results) >= (1 if noise == "measured" else 2)


@pytest.mark.parametrize("noise", ["measured", "busy"])
def test_a_candidate_past_the_margin_rarely_passes_and_a_twice_as_slow_one_never(noise):
    past = sum(_gate(s, 1.6, noise)["passed"] for s in range(100))
    assert past / 100 <= 0.05, past  # measured: none in 200 either way
    twice = [_gate(s, 2.0, noise) for s in range(40)]
    assert not any(res["passed"] for res in twice)
    tps = [next(r for r in res["rows"] if r["metric"] == "tokens_per_s") for res in twice]
    assert all(r["verdict"] == "fail" and r["diff_high"] < 0.67 for r in tps)  # decided, not inconclusive


def test_rows_read_as_gates_and_a_first_release_gets_only_absolute_ones():
    cand, live = _requests(5, noise="measured")
    spec = ServingSpec(price_per_hour=0.0864, max_cost_per_1k_tokens=0.1, max_memory_ratio=1.1, max_memory_mb=800)
    both = serving_gate.decide(spec, cand, live)
    assert [(r["metric"], r["rule"]) for r in both["rows"]] == [
        ("p95_ms", "ratio <="), ("tokens_per_s", "ratio >="), ("peak_memory_mb", "ratio <="),
        ("cost_per_1k_tokens", "<="), ("peak_memory_mb", "<=")]
    first = serving_gate.decide(spec, cand, None)
    assert [r["metric"] for r in first["rows"]] == ["cost_per_1k_tokens", "peak_memory_mb"] and first["live"] is None
    line = serving_gate.line(both["rows"][0])
    assert line.startswith("PASS p95_ms ratio <= 1.5 of live:") and " ms vs live " in line and "[x" in line


def test_a_cost_ceiling_needs_a_price_and_too_few_requests_are_refused_by_the_task_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs price_per_hour"):
        ServingSpec(max_cost_per_1k_tokens=0.01)
    with pytest.raises(ValidationError, match="greater than or equal to 20"):
        ServingSpec(requests=10)
