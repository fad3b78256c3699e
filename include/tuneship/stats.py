"""The statistics behind a release gate: intervals, paired comparisons and what a suite of n
cases can show at all. scipy supplies McNemar's exact test and the bootstrap, the standard
library's NormalDist the normal quantiles; the two interval formulas are written here (numpy,
so that power can be computed over every possible outcome table) and checked in the tests
against scipy and a published example.

* A pass/fail metric's rate gets a Wilson score interval: unlike the normal approximation it
  stays inside [0, 1] and keeps its coverage near 0 and 1, where release gates live.
* The candidate and the reference answer the SAME cases, so they are compared pair by pair:
  the difference of the two rates gets Newcombe's square-and-add interval for paired
  proportions (Newcombe 1998, Stat Med 17:2635, method 10; Fagerland, Lydersen & Laake,
  "Statistical Analysis of Contingency Tables", ch. 8), and McNemar's exact test (a binomial
  test on the discordant pairs) says whether they differ at all. A percentile bootstrap of
  the paired difference is no use here: with no discordant pair its interval is [0, 0],
  which would pass any margin.
* What a suite can show: a floor is reachable only if a perfect score's lower bound clears
  it. A non-inferiority margin must be shown with the declared power by a candidate exactly
  as good as the reference (expected rate `rate`, disagreeing on a share `discordance` of
  cases, half each way). That power is computed with the same Newcombe interval the gate
  uses: exactly over every outcome table up to 60 cases, from 20,000 seeded simulated
  tables above.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# scipy is imported where a test or a bootstrap runs, not here: tasks validate their suites'
# gates (normal quantiles only) when they load, and every DAG file loads the tasks at parse time
_NORMAL = NormalDist()


def _z(confidence: float) -> float:
    return _NORMAL.inv_cdf(1 - (1 - confidence) / 2)


def _wilson(k: Any, n: Any, z: float) -> tuple[Any, Any]:
    """Wilson score bounds, elementwise (k, n: numbers or numpy arrays)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
    p = k / n  # at k = 0 or n a bound equals p exactly; rounding must not leave p outside
    return np.clip(np.minimum(centre - half, p), 0.0, 1.0), np.clip(np.maximum(centre + half, p), 0.0, 1.0)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n <= 0:
        raise ValueError("an interval needs at least one case")
    low, high = _wilson(k, n, _z(confidence))
    return float(low), float(high)


def _newcombe(both: Any, better: Any, worse: Any, neither: Any, z: float) -> tuple[Any, Any, Any]:
    """Newcombe's square-and-add interval of p(candidate) - p(reference), elementwise over
    2x2 tables (rows: candidate passes / fails; columns: reference passes / fails)."""
    both, better, worse, neither = (np.asarray(x, dtype=float) for x in (both, better, worse, neither))
    n = both + better + worse + neither
    p1, p2 = (both + better) / n, (both + worse) / n
    l1, u1 = _wilson(both + better, n, z)
    l2, u2 = _wilson(both + worse, n, z)
    margins = (both + better) * (worse + neither) * (both + worse) * (better + neither)
    a = both * neither - better * worse
    root = np.sqrt(np.where(margins > 0, margins, 1.0))
    # Newcombe's continuity-corrected correlation: shrunk to 0 unless clearly positive
    phi = np.where(margins > 0, np.where(a > n / 2, (a - n / 2) / root, np.where(a < 0, a / root, 0.0)), 0.0)
    d = p1 - p2
    low = d - np.sqrt(np.maximum((p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2), 0.0))
    high = d + np.sqrt(np.maximum((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1), 0.0))
    return d, np.maximum(low, -1.0), np.minimum(high, 1.0)


def _sign_test(better: int, worse: int) -> float:
    """The exact binomial test on the discordant cases (McNemar's exact test; the sign test)."""
    if better + worse == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(better, better + worse, 0.5).pvalue)


@dataclass(frozen=True)
class PairedDiff:
    """Candidate minus reference on the same cases (pass = 1, fail = 0)."""

    n: int
    diff: float
    low: float
    high: float
    better: int  # cases only the candidate passes
    worse: int  # cases only the reference passes
    p_value: float  # McNemar's exact test: do they differ at all?

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def newcombe_paired(both: int, better: int, worse: int, neither: int, confidence: float = 0.95) -> PairedDiff:
    """The paired interval and McNemar's exact p-value from the 2x2 table."""
    n = both + better + worse + neither
    if n <= 0:
        raise ValueError("a paired comparison needs at least one case")
    d, low, high = _newcombe(both, better, worse, neither, _z(confidence))
    return PairedDiff(n, float(d), float(low), float(high), better, worse, _sign_test(better, worse))


def paired_diff(candidate: Sequence[bool], reference: Sequence[bool], confidence: float = 0.95,
                clusters: Sequence[Any] | None = None) -> PairedDiff:
    """`newcombe_paired` from the two models' per-case outcomes. With `clusters` (cases that
    share a context share a value), Newcombe's interval on the effective number of cases
    (every cell of the table over the largest design effect of the two rates and their
    difference) and the sign test on the contexts instead of McNemar's on the cases."""
    if len(candidate) != len(reference):
        raise ValueError(f"paired outcomes differ in length: {len(candidate)} vs {len(reference)}")
    pairs = list(zip(candidate, reference, strict=True))
    both = sum(1 for c, r in pairs if c and r)
    better = sum(1 for c, r in pairs if c and not r)
    worse = sum(1 for c, r in pairs if r and not c)
    neither = len(pairs) - both - better - worse
    if not is_clustered(clusters):
        return newcombe_paired(both, better, worse, neither, confidence)
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    deff = max(design_effect(c, clusters), design_effect(r, clusters), design_effect(c - r, clusters))
    d, low, high = _newcombe(both / deff, better / deff, worse / deff, neither / deff, _z(confidence))
    _, _, p = _cluster_sign_test(c - r, cluster_index(clusters))
    return PairedDiff(len(pairs), float(d), float(low), float(high), better, worse, p)


EXACT_UP_TO = 60  # cases; above, power comes from SIMULATED_TABLES seeded draws
SIMULATED_TABLES = 20_000


@functools.lru_cache(maxsize=64)
def _equal_candidate_lows(n: int, rate: float, discordance: float, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The Newcombe lower bounds a candidate exactly as good as the reference can get on n
    paired cases, with their probabilities, sorted: every 2x2 table up to EXACT_UP_TO cases
    (about 40,000 of them at 60), else SIMULATED_TABLES seeded multinomial draws."""
    probs = np.array([rate - discordance / 2, discordance / 2, discordance / 2, 1 - rate - discordance / 2])
    if (probs < 0).any():
        raise ValueError(f"discordance {discordance} does not fit an expected rate {rate}: each way it is at most "
                         f"{2 * min(rate, 1 - rate):.3f}")
    if n <= EXACT_UP_TO:
        b, c, d = np.meshgrid(np.arange(n + 1), np.arange(n + 1), np.arange(n + 1), indexing="ij")
        a = n - b - c - d
        ok = a >= 0
        a, b, c, d = a[ok], b[ok], c[ok], d[ok]
        lg = np.vectorize(math.lgamma)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = (math.lgamma(n + 1) - lg(a + 1) - lg(b + 1) - lg(c + 1) - lg(d + 1)
                    + a * np.log(probs[0]) + b * np.log(probs[1]) + c * np.log(probs[2]) + d * np.log(probs[3]))
        pmf = np.exp(np.nan_to_num(logp, nan=-np.inf))
    else:
        a, b, c, d = np.random.default_rng(20261130).multinomial(n, probs, size=SIMULATED_TABLES).T
        pmf = np.ones(len(a))
    _, low, _ = _newcombe(a, b, c, d, _z(confidence))
    order = np.argsort(low)
    return low[order], pmf[order] / pmf.sum()


def noninferiority_power(n: int, margin: float, *, rate: float, discordance: float, confidence: float = 0.95) -> float:
    """The chance that a candidate exactly as good as the reference shows non-inferiority at
    `margin` on n paired cases (the interval's lower bound at or above -margin)."""
    if n <= 0:
        return 0.0
    low, pmf = _equal_candidate_lows(n, rate, discordance, confidence)
    return float(pmf[low >= -margin - 1e-12].sum())


def detectable_margin(n: int, *, rate: float, discordance: float, confidence: float = 0.95,
                      power: float = 0.8) -> float:
    """The smallest non-inferiority margin n paired cases show with `power` (see above)."""
    if n <= 0:
        return math.inf
    low, pmf = _equal_candidate_lows(n, rate, discordance, confidence)
    # P(low >= -m) >= power  <=>  the (1 - power) quantile of low is >= -m
    cdf = np.cumsum(pmf)
    return float(-low[np.searchsorted(cdf, 1 - power, side="right")])


def cases_for_margin(margin: float, *, discordance: float, confidence: float = 0.95, power: float = 0.8) -> int:
    """About how many paired cases a margin needs (the normal approximation; the exact
    figure, from `detectable_margin`, is a little higher)."""
    z_power = _NORMAL.inv_cdf(power)
    return math.ceil(((_z(confidence) + z_power) / margin) ** 2 * discordance)


def cases_for_floor(floor: float, confidence: float = 0.95) -> int | None:
    """The fewest cases whose perfect score's Wilson lower bound reaches `floor` (None: never,
    the floor is 1)."""
    if floor >= 1.0:
        return None
    n = 1
    while wilson(n, n, confidence)[0] < floor:
        n += 1
    return n


# ------------------------------------------------------------------ clustered cases
# Cases that share a context (several questions on one document, the turns of one
# conversation) are not independent: their outcomes move together, and an interval that
# treats them as independent is too narrow. Such cases carry a `cluster`; the intervals then
# use the clustered standard error of "Adding Error Bars to Evals" (Miller 2024,
# arXiv:2411.00640, sec. 2.2: the variance of the mean sums the cross-products of deviations
# within each cluster), through Kish's design effect: a rate's Wilson interval and a paired
# difference's Newcombe interval are computed on the effective number of cases, n / deff, and
# a mean's normal interval on the clustered standard error. A design effect below 1 (outcomes
# that disagree within clusters) is taken as 1: never narrower than the independent interval.


def cluster_index(clusters: Sequence[Any]) -> np.ndarray:
    """Integer ids of the clusters; a case without one (None) is a cluster of its own."""
    ids: dict[Any, int] = {}
    out = []
    for i, c in enumerate(clusters):
        out.append(ids.setdefault(("case", i) if c is None else ("cluster", c), len(ids)))
    return np.asarray(out, dtype=int)


def is_clustered(clusters: Sequence[Any] | None) -> bool:
    """Whether any two cases share a cluster."""
    return clusters is not None and len(set(cluster_index(clusters))) < len(clusters)


def design_effect(values: Sequence[float], clusters: Sequence[Any]) -> float:
    """Kish's design effect of the mean of `values` over `clusters`: the clustered variance of
    the mean (Miller 2024) over the independent one, at least 1."""
    x = np.asarray(values, dtype=float)
    d = x - x.mean()
    iid = float((d * d).sum())
    if iid == 0:
        return 1.0
    sums = np.bincount(cluster_index(clusters), weights=d)
    return max(1.0, float((sums * sums).sum()) / iid)


def clustered_wilson(outcomes: Sequence[bool], clusters: Sequence[Any], confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson interval of a rate on the effective number of cases (n / design effect)."""
    x = np.asarray(outcomes, dtype=float)
    if len(x) == 0:
        raise ValueError("an interval needs at least one case")
    deff = design_effect(x, clusters)
    low, high = _wilson(x.sum() / deff, len(x) / deff, _z(confidence))
    return float(low), float(high)


def _cluster_sign_test(diffs: np.ndarray, ids: np.ndarray) -> tuple[int, int, float]:
    """Clusters where the candidate is ahead / behind on average, and the sign test on them."""
    sums = np.bincount(ids, weights=diffs)
    better, worse = int((sums > 0).sum()), int((sums < 0).sum())
    return better, worse, _sign_test(better, worse)


BOOTSTRAP_RESAMPLES = 4000


def mean_interval(values: Sequence[float], confidence: float = 0.95, seed: int = 0,
                  clusters: Sequence[Any] | None = None) -> tuple[float, float]:
    """A bootstrap (BCa, seeded: the same data give the same interval) interval of the mean of
    per-case numbers (a log-likelihood, a latency). With `clusters`: the normal interval on the
    clustered standard error (Miller 2024)."""
    x = np.asarray(values, dtype=float)
    if is_clustered(clusters):  # the independent standard error widened by the design effect
        se = float(np.sqrt(((x - x.mean()) ** 2).sum() * design_effect(x, clusters))) / len(x)  # type: ignore[arg-type]
        return float(x.mean() - _z(confidence) * se), float(x.mean() + _z(confidence) * se)
    if len(x) < 2 or np.ptp(x) == 0:
        return float(x.mean()), float(x.mean())
    from scipy import stats

    ci = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                         method="BCa", rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def paired_mean_diff(candidate: Sequence[float], reference: Sequence[float], confidence: float = 0.95,
                     clusters: Sequence[Any] | None = None) -> PairedDiff:
    """Candidate minus reference on the same cases, for per-case numbers: the mean difference
    with a bootstrap interval of the per-case differences; `better`/`worse` count the cases
    where the candidate is above/below the reference, and the p-value is the sign test's (with
    `clusters`: the clustered interval, and the sign test on the contexts)."""
    if len(candidate) != len(reference):
        raise ValueError(f"paired values differ in length: {len(candidate)} vs {len(reference)}")
    d = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    if len(d) == 0:
        raise ValueError("a paired comparison needs at least one case")
    low, high = mean_interval(d, confidence, clusters=clusters)
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    p = _cluster_sign_test(d, cluster_index(clusters))[2] if is_clustered(clusters) else _sign_test(better, worse)
    return PairedDiff(len(d), float(d.mean()), low, high, better, worse, p)


ECE_RESAMPLES = 4000  # bootstrap draws for an ECE interval


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error, top label, with equal-mass bins: sum over bins of
    (cases in bin / n) * |accuracy - mean confidence|, binned as netcal's
    ECE(equal_intervals=False) bins (the tests hold the two equal). netcal itself is not called:
    scipy's binning under it raises on tied confidences ('The smallest edge difference is
    numerically 0'), which a confident model (probabilities of exactly 1.0) and every bootstrap
    resample produce."""
    conf = np.asarray(confidence, dtype=float)
    if len(conf) == 0:
        raise ValueError("an ECE needs at least one case")
    return float(_resampled_ece(conf, np.asarray(correct, dtype=int), bins, np.arange(len(conf))[None, :])[0])


def _resampled_ece(conf: np.ndarray, correct: np.ndarray, bins: int, idx: np.ndarray) -> np.ndarray:
    """The ECE of every resample at once (rows of `idx` index the cases), binned exactly as
    netcal's ECE(equal_intervals=False) bins: edges at the resample's quantiles, the outer
    edges 0 and 1, a value on an edge in the bin above it, 1 in the last bin; tied edges leave
    an empty bin. The tests hold it to netcal's value draw by draw where netcal runs."""
    b = max(1, min(bins, idx.shape[1]))
    x, y = conf[idx], correct[idx].astype(float)  # (draws, n)
    edges = np.quantile(x, np.linspace(0, 1, b + 1), axis=1).T  # (draws, b + 1)
    edges[:, 0], edges[:, -1] = 0.0, 1.0
    rows = np.arange(len(x))[:, None]
    where = (x[:, :, None] >= edges[:, None, 1:-1]).sum(axis=-1)  # interior edges at or below: the bin
    flat = (rows * b + where).ravel()
    sum_conf = np.bincount(flat, weights=x.ravel(), minlength=len(x) * b).reshape(len(x), b)
    sum_ok = np.bincount(flat, weights=y.ravel(), minlength=len(x) * b).reshape(len(x), b)
    return np.abs(sum_ok - sum_conf).sum(axis=1) / idx.shape[1]


def _percentile(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def ece_interval(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the ECE (cases resampled, seeded). ECE is not a mean
    of per-case numbers, and is biased upwards on few cases, which the interval inherits."""
    conf, ok = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=int)
    idx = np.random.default_rng(seed).integers(0, len(conf), size=(ECE_RESAMPLES, len(conf)))
    return _percentile(_resampled_ece(conf, ok, bins, idx), level)


def paired_ece_diff(candidate: Sequence[tuple[float, bool]], reference: Sequence[tuple[float, bool]],
                    bins: int = 10, level: float = 0.95, seed: int = 0) -> PairedDiff:
    """Candidate's ECE minus the reference's on the same cases (lower is better), with a paired
    percentile bootstrap: each draw resamples cases and recomputes both ECEs on them.
    `better`/`worse` (as PairedDiff counts them): cases where the candidate's |confidence - correct|
    is above/below the reference's;
    the p-value is the bootstrap's two-sided share of draws on the far side of zero."""
    if len(candidate) != len(reference):
        raise ValueError(f"paired outcomes differ in length: {len(candidate)} vs {len(reference)}")
    if not candidate:
        raise ValueError("a paired comparison needs at least one case")
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(c), size=(ECE_RESAMPLES, len(c)))
    draws = (_resampled_ece(c[:, 0], c[:, 1].astype(int), bins, idx)
             - _resampled_ece(r[:, 0], r[:, 1].astype(int), bins, idx))
    low, high = _percentile(draws, level)
    gap_c, gap_r = np.abs(c[:, 0] - c[:, 1]), np.abs(r[:, 0] - r[:, 1])
    p = min(1.0, 2 * min(float((draws <= 0).mean()), float((draws >= 0).mean())))
    diff = ece(c[:, 0], c[:, 1].astype(bool), bins) - ece(r[:, 0], r[:, 1].astype(bool), bins)
    # better/worse as PairedDiff counts them: the candidate's per-case value (its gap) above/below the reference's
    return PairedDiff(len(c), float(diff), low, high, int((gap_c > gap_r).sum()), int((gap_c < gap_r).sum()), p)


# ------------------------------------------------------------------ serving figures
# Latency and throughput of the served model, candidate against the live colour on the same
# requests. A tail quantile of a few dozen latencies is where the plain sample percentile and
# its bootstrap are at their worst (the 95th percentile of 30 values is the second largest),
# so quantiles are Harrell-Davis estimates (a Beta-weighted mean of all the order statistics,
# Harrell & Davis 1982), and two dependent groups are compared as Wilcox & Erceg-Hurn do
# ("Comparing two dependent groups via quantiles", J Appl Stat 39, 2012): the same requests
# resampled for both, the percentile bootstrap of the two estimates. Here as a ratio, which is
# what a latency budget states ("at most 1.5x the live model's p95").

SERVING_RESAMPLES = 4000


@functools.lru_cache(maxsize=64)
def hd_weights(n: int, q: float) -> np.ndarray:
    """The Harrell-Davis weights of the n order statistics for quantile q (they sum to 1)."""
    from scipy.special import betainc

    if n < 1 or not 0 < q < 1:
        raise ValueError(f"Harrell-Davis needs n >= 1 and 0 < q < 1, got n={n}, q={q}")
    a, b = (n + 1) * q, (n + 1) * (1 - q)
    w = np.diff(betainc(a, b, np.arange(n + 1) / n))
    w.setflags(write=False)
    return w


def hd_quantile(values: Sequence[float], q: float) -> float:
    """The Harrell-Davis estimate of the q-quantile (scipy.stats.mstats.hdquantiles' value)."""
    x = np.sort(np.asarray(values, dtype=float))
    if len(x) == 0:
        raise ValueError("a quantile needs at least one value")
    return float(x @ hd_weights(len(x), q))


@dataclass(frozen=True)
class Ratio:
    """A figure of the candidate over the live model's on the same requests, with a paired
    percentile-bootstrap interval; `p_value`: the bootstrap's two-sided share of draws on the
    far side of 1 (do they differ at all?)."""

    n: int
    ratio: float
    low: float
    high: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paired_index(n: int, seed: int) -> np.ndarray:
    if n < 2:
        raise ValueError("a serving comparison needs at least two requests")
    return np.random.default_rng(seed).integers(0, n, size=(SERVING_RESAMPLES, n))


def _ratio(point: float, draws: np.ndarray, n: int, level: float) -> Ratio:
    low, high = _percentile(draws, level)
    p = min(1.0, 2 * min(float((draws <= 1).mean()), float((draws >= 1).mean())))
    return Ratio(n, float(point), low, high, p)


def quantile_interval(values: Sequence[float], q: float, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the Harrell-Davis q-quantile (seeded)."""
    x = np.asarray(values, dtype=float)
    draws = np.sort(x[_paired_index(len(x), seed)], axis=1) @ hd_weights(len(x), q)
    return _percentile(draws, level)


def paired_quantile_ratio(candidate: Sequence[float], reference: Sequence[float], q: float, level: float = 0.95,
                          seed: int = 0) -> Ratio:
    """Candidate's q-quantile over the reference's, the i-th value of each measured on the same
    request: Harrell-Davis estimates, the requests resampled together (Wilcox & Erceg-Hurn)."""
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if len(c) != len(r):
        raise ValueError(f"paired values differ in length: {len(c)} vs {len(r)}")
    idx, w = _paired_index(len(c), seed), hd_weights(len(c), q)
    draws = (np.sort(c[idx], axis=1) @ w) / (np.sort(r[idx], axis=1) @ w)
    return _ratio(hd_quantile(c, q) / hd_quantile(r, q), draws, len(c), level)


def rate_interval(amount: Sequence[float], time: Sequence[float], level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """sum(amount) / sum(time) (tokens per second over the requests), bootstrap interval."""
    a, t = np.asarray(amount, dtype=float), np.asarray(time, dtype=float)
    idx = _paired_index(len(a), seed)
    return _percentile(a[idx].sum(axis=1) / t[idx].sum(axis=1), level)


def paired_rate_ratio(cand_amount: Sequence[float], cand_time: Sequence[float], ref_amount: Sequence[float],
                      ref_time: Sequence[float], level: float = 0.95, seed: int = 0) -> Ratio:
    """The candidate's sum(amount)/sum(time) over the reference's on the same requests, the
    requests resampled together."""
    ca, ct, ra, rt = (np.asarray(v, dtype=float) for v in (cand_amount, cand_time, ref_amount, ref_time))
    if not len(ca) == len(ct) == len(ra) == len(rt):
        raise ValueError("paired rates need the same requests on both sides")
    idx = _paired_index(len(ca), seed)
    draws = (ca[idx].sum(1) / ct[idx].sum(1)) / (ra[idx].sum(1) / rt[idx].sum(1))
    return _ratio((ca.sum() / ct.sum()) / (ra.sum() / rt.sum()), draws, len(ca), level)
