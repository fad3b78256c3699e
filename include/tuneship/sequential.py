"""Anytime-valid release decisions: confidence sequences that may be looked at after every
poll of the shadow window without inflating the error rate (issue 14).

A confidence sequence (CS) is a sequence of intervals C_1, C_2, ... with
P(for all t: the true value is in C_t) >= 1 - alpha, so a window that checks on every poll
and stops at the first bound that crosses a threshold keeps its declared error rate; a fixed
interval (`tuneship.stats`) recomputed on every poll does not. Intervals here are
intersected over time (the running intersection is still a CS), so a metric once decided
stays decided.

* A mean of observations in [0, 1] (error indicators, format validity, agreement; a paired
  difference in [-1, 1] mapped to [0, 1]): the predictable plug-in empirical-Bernstein CS
  (PrPl-EB) of Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
  betting", JRSS-B 86 (2024; arXiv:2010.09686), Theorem 2 / eq. (13)-(15), with lambda
  truncated at 1/2 and the running intersection. Written to reproduce confseq 0.0.11's
  `predmix_empbern_twosided_cs(x, alpha, truncation=0.5, running_intersection=True)`
  exactly (tests/fixtures/sequential/); like that code, the variance term uses the
  unregularized running mean, 0 before the first observation. Streaming: O(new observations)
  per update, O(1) memory.
* A quantile (p95 latency): Howard & Ramdas, "Sequential estimation of quantiles with
  applications to A/B-testing and best-arm identification", Bernoulli 28 (2022;
  arXiv:1906.09712), Theorem 1: order statistics bracketed by a one-sided uniform boundary
  u_t for sums of centred Bernoulli(p) indicators. The boundary is their recommended
  one-sided beta-binomial conjugate mixture (Howard, Ramdas, McAuliffe & Sekhon,
  "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Stat. 49 (2021),
  Prop. 7), tuned to be tightest at `t_opt` observations, as confseq's
  `beta_binomial_mixture_bound` computes it (held to it in the tests). Latencies are kept as
  counts in fixed log-spaced bins (0.5 % wide; thresholds added as edges), so memory does not
  grow with the window and an order statistic is read off as the edge of its bin, rounded
  outwards: never narrower than the exact CS, at most one bin wider.
* Candidate p95 against live p95: the ratio of the two one-sample CSs, each at alpha / 2
  (a union bound): [L_cand / U_live, U_cand / L_live]. Valid whatever the dependence between
  the two arms (they answer the same requests), but more conservative than Howard & Ramdas'
  two-sample test (their Section 5), which is not implemented here.

Decisions (`decide`): the declared alpha is split equally over the K metrics (Bonferroni:
each metric's two-sided CS at alpha / K), so the chance that any bound is ever wrong, and
hence of rolling back a candidate that meets every threshold or of promoting one that misses
one, is at most alpha over the whole window however often it is polled. A rollback fires as
soon as one metric's CS lies on the bad side of its threshold; an early promote needs every
metric's CS on the good side and the declared minimum of requests and time; at the window's
end whatever is still open is decided by the declared rule (rollback or hold for a person).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Direction = Literal["at_most", "at_least"]
Status = Literal["good", "bad", "open"]
Verdict = Literal["continue", "promote", "rollback", "hold"]

EB_CITATION = "Waudby-Smith & Ramdas 2024 (JRSS-B), predictable plug-in empirical-Bernstein CS"
QUANTILE_CITATION = "Howard & Ramdas 2022 (Bernoulli), Thm 1, one-sided beta-binomial mixture boundary"


def _nan_to(x: np.ndarray, value: float) -> np.ndarray:
    return np.where(np.isnan(x), value, x)


# ------------------------------------------------------------------ bounded mean (PrPl-EB)


class MeanCS:
    """Two-sided PrPl-EB confidence sequence for the mean of observations in [0, 1].

    `shape` is a batch of independent streams (the simulations run hundreds at once); a
    single stream has shape (). `update(x)` takes new observations along the last axis;
    NaN marks "no observation here" (ragged batches). State is a handful of running sums.
    """

    def __init__(self, alpha: float, *, truncation: float = 0.5, shape: tuple[int, ...] = ()):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.truncation, self.shape = float(alpha), float(truncation), tuple(shape)
        z = np.zeros(self.shape)
        self.n = np.zeros(self.shape, dtype=np.int64)
        self.s = z.copy()  # sum of x
        self.q = z.copy()  # sum of (x_i - regularized mean_i)^2: the plug-in variance
        self.lam = z.copy()  # sum of lambda_i
        self.lam_x = z.copy()  # sum of lambda_i x_i
        self.vpsi_lo = z.copy()  # sum of v_i psi(lambda_i), lower side (x)
        self.vpsi_hi = z.copy()  # ... upper side (1 - x)
        self.low = z.copy()  # running intersection
        self.high = z + 1.0
        self.cur_low = z.copy()  # the CS at the latest observation, not intersected
        self.cur_high = z + 1.0

    @property
    def log_term(self) -> float:
        return math.log(2 / self.alpha)  # each side at alpha / 2

    def update(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """Add observations; returns the running-intersection bounds after each of them."""
        x = np.asarray(x, dtype=float)
        if x.shape[:-1] != self.shape:
            x = x.reshape(self.shape + (-1,))
        if x.shape[-1] == 0:
            return self.low[..., None], self.high[..., None]
        seen = ~np.isnan(x)
        if np.any((x[seen] < 0) | (x[seen] > 1)):
            raise ValueError("MeanCS observations must lie in [0, 1]")
        xs = _nan_to(x, 0.0)
        w = seen.astype(float)
        n0, s0 = self.n[..., None].astype(float), self.s[..., None]
        t = n0 + np.cumsum(w, axis=-1)  # t at each observation
        s_t = s0 + np.cumsum(xs, axis=-1)
        s_prev = s_t - xs
        mu_reg = np.minimum((0.5 + s_t) / (t + 1), 1.0)
        dq = w * (xs - mu_reg) ** 2
        q_t = self.q[..., None] + np.cumsum(dq, axis=-1)
        sigma2_prev = (0.25 + (q_t - dq)) / np.maximum(t, 1)  # (1/4 + q_{t-1}) / t
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.sqrt(2 * self.log_term / (t * np.log1p(t) * sigma2_prev))
        lam = np.where(seen, np.minimum(np.nan_to_num(lam, nan=0.0), self.truncation), 0.0)
        psi = -np.log1p(-lam) - lam
        t_prev = t - w
        mean_prev = np.where(t_prev > 0, s_prev / np.maximum(t_prev, 1), 0.0)
        mean_prev_up = np.where(t_prev > 0, 1 - mean_prev, 0.0)  # running mean of 1 - x
        v_lo = w * (xs - mean_prev) ** 2
        v_hi = w * ((1 - xs) - mean_prev_up) ** 2
        lam_c = self.lam[..., None] + np.cumsum(lam, axis=-1)
        lam_x = self.lam_x[..., None] + np.cumsum(lam * xs, axis=-1)
        vpsi_lo = self.vpsi_lo[..., None] + np.cumsum(v_lo * psi, axis=-1)
        vpsi_hi = self.vpsi_hi[..., None] + np.cumsum(v_hi * psi, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = (lam_x - self.log_term - vpsi_lo) / lam_c
            up = 1 - ((lam_c - lam_x) - self.log_term - vpsi_hi) / lam_c
        lo = np.where(lam_c > 0, np.maximum(lo, 0.0), 0.0)
        up = np.where(lam_c > 0, np.minimum(up, 1.0), 1.0)
        self.cur_low, self.cur_high = lo[..., -1], up[..., -1]
        lo = np.maximum(np.maximum.accumulate(lo, axis=-1), self.low[..., None])
        up = np.minimum(np.minimum.accumulate(up, axis=-1), self.high[..., None])
        self.n = self.n + seen.sum(axis=-1)
        self.s, self.q = s_t[..., -1], q_t[..., -1]
        self.lam, self.lam_x = lam_c[..., -1], lam_x[..., -1]
        self.vpsi_lo, self.vpsi_hi = vpsi_lo[..., -1], vpsi_hi[..., -1]
        self.low, self.high = lo[..., -1], up[..., -1]
        return lo, up

    @property
    def mean(self) -> Any:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.s / np.maximum(self.n, 1), np.nan)

    def interval(self) -> tuple[Any, Any]:
        return self.low, self.high

    def current_interval(self) -> tuple[Any, Any]:
        return self.cur_low, self.cur_high

    _FIELDS = ("n", "s", "q", "lam", "lam_x", "vpsi_lo", "vpsi_hi", "low", "high", "cur_low", "cur_high")

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state of a single stream (what a trigger persists between polls)."""
        if self.shape:
            raise ValueError("only a single stream's state is persisted")
        return {"kind": "mean", "alpha": self.alpha, "truncation": self.truncation,
                **{f: (int(getattr(self, f)) if f == "n" else float(getattr(self, f))) for f in self._FIELDS}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MeanCS:
        cs = cls(state["alpha"], truncation=state["truncation"])
        for f in cls._FIELDS:
            setattr(cs, f, np.asarray(state[f], dtype=np.int64 if f == "n" else float))
        return cs


class PairedDiffCS:
    """CS for the mean of paired differences candidate - live in [-1, 1] (each in {0, 1}):
    the PrPl-EB CS of (d + 1) / 2, mapped back."""

    def __init__(self, alpha: float, *, truncation: float = 0.5, shape: tuple[int, ...] = ()):
        self.cs = MeanCS(alpha, truncation=truncation, shape=shape)

    @property
    def n(self) -> Any:
        return self.cs.n

    def update(self, diff: Any) -> None:
        self.cs.update((np.asarray(diff, dtype=float) + 1) / 2)

    def update_pairs(self, candidate: Any, live: Any) -> None:
        self.update(np.asarray(candidate, dtype=float) - np.asarray(live, dtype=float))

    @property
    def mean(self) -> Any:
        return 2 * self.cs.mean - 1

    def interval(self) -> tuple[Any, Any]:
        return 2 * self.cs.low - 1, 2 * self.cs.high - 1

    def current_interval(self) -> tuple[Any, Any]:
        return 2 * self.cs.cur_low - 1, 2 * self.cs.cur_high - 1

    def to_state(self) -> dict[str, Any]:
        return {**self.cs.to_state(), "kind": "diff"}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PairedDiffCS:
        out = cls.__new__(cls)
        out.cs = MeanCS.from_state(state)
        return out


# ------------------------------------------------------------------ quantiles (Howard & Ramdas)


def _best_rho(v: float, alpha: float) -> float:
    """The normal mixture's precision tuned to be tightest at intrinsic time v (Howard et al.
    2021, eq. (3.9)); one-sided boundaries use it at 2 alpha, as confseq does."""
    la = math.log(1 / alpha)
    return v / (2 * la + math.log(1 + 2 * la))


def beta_binomial_log_mixture(s: Any, v: Any, *, v_opt: float, g: float, h: float, alpha_opt: float,
                              one_sided: bool = True) -> np.ndarray:
    """log of the beta-binomial mixture supermartingale at sum s and intrinsic time v, for
    increments in [-g, h] (Howard et al. 2021, Prop. 7; confseq's `beta_binomial_log_mixture`)."""
    from scipy.special import betainc, betaln

    rho = _best_rho(v_opt, 2 * alpha_opt if one_sided else alpha_opt)
    r = max(rho - g * h, 1e-3 * g * h)
    xb = h / (g + h) if one_sided else 1.0

    def log_ib(a: Any, b: Any) -> Any:
        return betaln(a, b) + (np.log(betainc(a, b, xb)) if xb < 1 else 0.0)

    s, v = np.asarray(s, dtype=float), np.asarray(v, dtype=float)
    a = (r + v - g * s) / (g * (g + h))
    b = (r + v + h * s) / (h * (g + h))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (v / (g * h) * math.log(g + h) - (v + h * s) / (h * (g + h)) * math.log(g)
                - (v - g * s) / (g * (g + h)) * math.log(h) + log_ib(a, b)
                - log_ib(r / (g * (g + h)), r / (h * (g + h))))


def beta_binomial_bound(v: Any, alpha: float, *, v_opt: float, g: float, h: float, alpha_opt: float | None = None,
                        one_sided: bool = True) -> np.ndarray:
    """The uniform boundary u(v): the largest sum s below the level log(1/alpha) of the
    beta-binomial mixture, found by bisection on [0, v / g] (confseq's
    `beta_binomial_mixture_bound`; vectorized over v)."""
    alpha_opt = alpha if alpha_opt is None else alpha_opt
    v = np.atleast_1d(np.asarray(v, dtype=float))
    level = math.log(1 / alpha)
    hi = v / g
    def f(s: np.ndarray) -> np.ndarray:
        return beta_binomial_log_mixture(s, v, v_opt=v_opt, g=g, h=h, alpha_opt=alpha_opt,
                                         one_sided=one_sided) - level
    at_top = f(hi) < 0
    lo_s, hi_s = np.zeros_like(v), hi.copy()
    for _ in range(64):
        mid = (lo_s + hi_s) / 2
        above = f(mid) >= 0
        hi_s = np.where(above, mid, hi_s)
        lo_s = np.where(above, lo_s, mid)
    return np.where(at_top, hi, (lo_s + hi_s) / 2)


def quantile_boundaries(t: Any, p: float, alpha: float, t_opt: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-sided boundaries (u_lo, u_up) after t observations, each at alpha, vectorized
    over t. Lower bound on Q(p): sums of p - 1{X <= Q(p)}, increments in [-(1 - p), p], so
    g = 1 - p, h = p; upper bound: sums of 1{X < Q(p)} - p, increments in [-p, 1 - p]."""
    t = np.atleast_1d(np.asarray(t, dtype=float))
    v, v_opt = t * p * (1 - p), t_opt * p * (1 - p)
    u_lo = beta_binomial_bound(v, alpha, v_opt=v_opt, g=1 - p, h=p)
    u_up = beta_binomial_bound(v, alpha, v_opt=v_opt, g=p, h=1 - p)
    return u_lo, u_up


@functools.lru_cache(maxsize=4096)
def _order_indices(t: int, p: float, alpha: float, t_opt: int) -> tuple[int, int]:
    k_lo, k_up = _indices_from(np.array([t], dtype=float), *quantile_boundaries(t, p, alpha, t_opt), p)
    return int(k_lo[0]), int(k_up[0])


def _indices_from(t: np.ndarray, u_lo: np.ndarray, u_up: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    eps = 1e-9  # keep an integer-valued t p - u from rounding the wrong way
    return (np.ceil(t * p - u_lo - eps).astype(np.int64), np.floor(t * p + u_up + eps).astype(np.int64) + 1)


def quantile_order_indices(t: Any, p: float, alpha: float, t_opt: int) -> tuple[Any, Any]:
    """The 1-based order statistics bracketing Q(p) after t observations, each side at alpha
    (Howard & Ramdas 2022, Thm 1): lower X_(ceil(t p - u_lo)), upper X_(floor(t p + u_up) + 1).
    An index below 1 means "no lower bound yet", above t "no upper bound yet". Scalar t is
    cached (a trigger's polls); an array of t is computed at once (the simulations)."""
    if np.ndim(t) == 0:
        return _order_indices(int(t), float(p), float(alpha), int(t_opt)) if t > 0 else (0, 1)
    t = np.asarray(t, dtype=np.int64)
    uniq, inv = np.unique(np.maximum(t, 1), return_inverse=True)
    cache = _INDICES.setdefault((float(p), float(alpha), int(t_opt)), {})
    missing = np.array([u for u in uniq.tolist() if u not in cache], dtype=np.int64)
    if len(missing):
        k_lo, k_up = _indices_from(missing.astype(float), *quantile_boundaries(missing, p, alpha, t_opt), p)
        cache.update(zip(missing.tolist(), zip(k_lo.tolist(), k_up.tolist(), strict=True), strict=True))
    got = np.array([cache[u] for u in uniq.tolist()], dtype=np.int64).reshape(-1, 2)
    k_lo, k_up = got[inv, 0].reshape(t.shape), got[inv, 1].reshape(t.shape)
    return np.where(t > 0, k_lo, 0), np.where(t > 0, k_up, 1)


# (p, alpha, t_opt) -> {t: (k_lo, k_up)}: the simulations read hundreds of streams' t per poll
_INDICES: dict[tuple[float, float, int], dict[int, tuple[int, int]]] = {}


def latency_edges(lo_ms: float = 0.1, hi_ms: float = 1e6, ratio: float = 1.005,
                  extra: Sequence[float] = ()) -> np.ndarray:
    """Bin edges for latencies: 0, then geometric from lo_ms to hi_ms, plus `extra` (the
    thresholds, so a decision against them is exact up to ties), then +inf."""
    k = math.ceil(math.log(hi_ms / lo_ms) / math.log(ratio))
    geo = lo_ms * ratio ** np.arange(k + 1)
    return np.unique(np.concatenate([[0.0], geo, np.asarray(extra, dtype=float), [np.inf]]))


class QuantileCS:
    """Two-sided CS for the p-quantile of a stream of values (latencies in ms), each side at
    alpha / 2, kept as bin counts; intersected over the polls at which it is read."""

    def __init__(self, p: float, alpha: float, *, t_opt: int = 1000, edges: np.ndarray | None = None,
                 shape: tuple[int, ...] = ()):
        if not 0 < p < 1:
            raise ValueError(f"quantile must be in (0, 1), got {p}")
        self.p, self.alpha, self.t_opt, self.shape = float(p), float(alpha), int(t_opt), tuple(shape)
        self.edges = latency_edges() if edges is None else np.asarray(edges, dtype=float)
        self.counts = np.zeros(self.shape + (len(self.edges) - 1,), dtype=np.int64)
        self.n = np.zeros(self.shape, dtype=np.int64)
        self.low = np.full(self.shape, -np.inf)
        self.high = np.full(self.shape, np.inf)
        self.cur_low, self.cur_high = self.low.copy(), self.high.copy()

    def update(self, values: Any) -> None:
        """Add values (NaN: none) and intersect the CS at the new count into the running one."""
        x = np.asarray(values, dtype=float)
        if x.shape[:-1] != self.shape:
            x = x.reshape(self.shape + (-1,))
        seen = ~np.isnan(x)
        nb = self.counts.shape[-1]
        idx = np.clip(np.searchsorted(self.edges, _nan_to(x, 0.0), side="right") - 1, 0, nb - 1)
        rows = np.arange(int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape + (1,))
        flat = (rows * nb + idx)[seen]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        self.n = self.n + seen.sum(axis=-1)
        self.cur_low, self.cur_high = self._current()
        self.low, self.high = np.maximum(self.low, self.cur_low), np.minimum(self.high, self.cur_high)

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        """The CS at the current counts (before intersecting): X_(k) lies in the first bin
        whose cumulative count reaches k; its lower edge bounds it below, its upper edge above."""
        ns = np.atleast_1d(self.n)
        cum = np.cumsum(self.counts.reshape(-1, self.counts.shape[-1]), axis=-1)
        if ns.size == 1:
            k_lo, k_up = (np.atleast_1d(k) for k in quantile_order_indices(int(ns[0]), self.p, self.alpha / 2,
                                                                          self.t_opt))
        else:
            k_lo, k_up = quantile_order_indices(ns, self.p, self.alpha / 2, self.t_opt)
        b_lo = (cum < k_lo[:, None]).sum(axis=-1)
        b_up = np.minimum((cum < k_up[:, None]).sum(axis=-1) + 1, len(self.edges) - 1)
        lo = np.where(k_lo >= 1, self.edges[b_lo], -np.inf)
        up = np.where(k_up <= ns, self.edges[b_up], np.inf)
        return lo.reshape(self.shape), up.reshape(self.shape)

    def interval(self) -> tuple[Any, Any]:
        return self.low, self.high

    def current_interval(self) -> tuple[Any, Any]:
        return self.cur_low, self.cur_high

    @property
    def estimate(self) -> Any:
        """The sample p-quantile read off the bins (the upper edge of its bin)."""
        cum = np.cumsum(self.counts, axis=-1)
        k = np.maximum(np.floor(self.n * self.p).astype(np.int64) + 1, 1)
        b = (cum < k[..., None]).sum(axis=-1)
        return np.where(self.n > 0, self.edges[np.minimum(b + 1, len(self.edges) - 1)], np.nan)

    def to_state(self) -> dict[str, Any]:
        if self.shape:
            raise ValueError("only a single stream's state is persisted")
        nz = np.flatnonzero(self.counts)
        return {"kind": "quantile", "p": self.p, "alpha": self.alpha, "t_opt": self.t_opt,
                "edges": self.edges.tolist(), "bins": nz.tolist(), "counts": self.counts[nz].tolist(),
                "n": int(self.n), "low": float(self.low), "high": float(self.high),
                "cur_low": float(self.cur_low), "cur_high": float(self.cur_high)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QuantileCS:
        cs = cls(state["p"], state["alpha"], t_opt=state["t_opt"], edges=np.asarray(state["edges"], dtype=float))
        cs.counts[np.asarray(state["bins"], dtype=np.int64)] = np.asarray(state["counts"], dtype=np.int64)
        cs.n = np.asarray(state["n"], dtype=np.int64)
        cs.low, cs.high = np.asarray(state["low"], dtype=float), np.asarray(state["high"], dtype=float)
        cs.cur_low, cs.cur_high = np.asarray(state["cur_low"], dtype=float), np.asarray(state["cur_high"], dtype=float)
        return cs


class QuantileRatioCS:
    """CS for Q_cand(p) / Q_live(p): both one-sample CSs at alpha / 2 (a union bound)."""

    def __init__(self, p: float, alpha: float, *, t_opt: int = 1000, edges: np.ndarray | None = None,
                 shape: tuple[int, ...] = ()):
        self.candidate = QuantileCS(p, alpha / 2, t_opt=t_opt, edges=edges, shape=shape)
        self.live = QuantileCS(p, alpha / 2, t_opt=t_opt, edges=edges, shape=shape)

    @property
    def n(self) -> Any:
        return np.minimum(self.candidate.n, self.live.n)

    def update(self, candidate: Any, live: Any) -> None:
        self.candidate.update(candidate)
        self.live.update(live)

    @staticmethod
    def _ratio(c_lo: Any, c_hi: Any, l_lo: Any, l_hi: Any) -> tuple[Any, Any]:
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.where(l_hi > 0, np.maximum(c_lo, 0) / l_hi, 0.0)
            up = np.where(l_lo > 0, c_hi / np.where(l_lo > 0, l_lo, 1), np.inf)
        return lo, up

    def interval(self) -> tuple[Any, Any]:
        return self._ratio(*self.candidate.interval(), *self.live.interval())

    def current_interval(self) -> tuple[Any, Any]:
        return self._ratio(*self.candidate.current_interval(), *self.live.current_interval())

    @property
    def estimate(self) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.candidate.estimate / self.live.estimate

    def to_state(self) -> dict[str, Any]:
        return {"kind": "quantile_ratio", "candidate": self.candidate.to_state(), "live": self.live.to_state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QuantileRatioCS:
        out = cls.__new__(cls)
        out.candidate = QuantileCS.from_state(state["candidate"])
        out.live = QuantileCS.from_state(state["live"])
        return out


# ------------------------------------------------------------------ rules and decisions


@dataclass(frozen=True)
class Rule:
    """One metric's threshold. `kind`: rate (a mean in [0, 1]), diff (candidate - live,
    paired, in [-1, 1]), quantile (a latency quantile, ms) or quantile_ratio (candidate's
    quantile over live's). `direction`: at_most (bad above the threshold) or at_least."""

    name: str
    kind: Literal["rate", "diff", "quantile", "quantile_ratio"]
    direction: Direction
    threshold: float
    quantile: float = 0.95  # for quantile and quantile_ratio

    def describe(self) -> str:
        op = "<=" if self.direction == "at_most" else ">="
        return f"{self.name} {op} {self.threshold:g}"


@dataclass(frozen=True)
class Policy:
    """The declared decision rule of a shadow window."""

    alpha: float = 0.05  # the chance of any wrong decision over the whole window
    min_requests: int = 500  # before an early promote (a rollback may fire any time)
    min_seconds: float = 3600.0  # likewise
    window_seconds: float = 72 * 3600.0
    # what the window's end does with open metrics: roll back, hold for a person, or judge
    # them by their point estimates (`tuneship.shadow.by_estimates`: one fixed-horizon look)
    on_open: Literal["rollback", "hold", "estimates"] = "hold"
    t_opt: int = 2000  # the quantile boundaries are tightest near this many observations

    def alpha_per_metric(self, k: int) -> float:
        """Bonferroni: each metric's two-sided CS at alpha / K."""
        return self.alpha / max(k, 1)


def status_of(low: Any, high: Any, direction: Direction, threshold: float, current: tuple[Any, Any] | None = None
              ) -> np.ndarray:
    """-1 bad: the running intersection lies wholly on the bad side (once bad, always bad);
    +1 good: the current CS (`current`, else the intersection) lies wholly on the good side;
    0 open. Good is read from the current CS, not the intersection, so that a metric that
    looked good early and turns bad (intermittent failures, a drifting mean) is not frozen
    good: both are CSs, and a wrong call by either is inside the same alpha (the event "some
    C_t misses the mean"). A CS touching the threshold from the good side counts as good."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    g_low, g_high = (low, high) if current is None else (np.asarray(current[0], dtype=float),
                                                         np.asarray(current[1], dtype=float))
    if direction == "at_most":
        return np.where(low > threshold, -1, np.where(g_high <= threshold, 1, 0))
    return np.where(high < threshold, -1, np.where(g_low >= threshold, 1, 0))


def combine(statuses: np.ndarray, *, requests: Any, elapsed_s: Any, window_over: Any, policy: Policy) -> np.ndarray:
    """Verdict codes from per-metric statuses (metrics on axis 0): 0 continue, 1 promote,
    -1 rollback, 2 hold. Vectorized over streams for the simulations; `decide` uses it too."""
    statuses = np.asarray(statuses)
    bad = (statuses == -1).any(axis=0)
    good = (statuses == 1).all(axis=0)
    enough = np.asarray(requests) >= policy.min_requests
    minimums = enough & (np.asarray(elapsed_s) >= policy.min_seconds)
    over = np.asarray(window_over, dtype=bool)
    end_code = -1 if policy.on_open == "rollback" else 2
    # early: every bound good and both minimums met; at the end, good with enough requests
    return np.where(bad, -1, np.where(good & (minimums | over & enough), 1, np.where(over, end_code, 0)))


VERDICTS: dict[int, Verdict] = {0: "continue", 1: "promote", -1: "rollback", 2: "hold"}


def make_cs(rule: Rule, alpha: float, *, t_opt: int = 2000, shape: tuple[int, ...] = (),
            edges: np.ndarray | None = None) -> Any:
    if rule.kind == "rate":
        return MeanCS(alpha, shape=shape)
    if rule.kind == "diff":
        return PairedDiffCS(alpha, shape=shape)
    if edges is None:
        edges = latency_edges(extra=[rule.threshold] if rule.kind == "quantile" else ())
    if rule.kind == "quantile":
        return QuantileCS(rule.quantile, alpha, t_opt=t_opt, edges=edges, shape=shape)
    if rule.kind == "quantile_ratio":
        return QuantileRatioCS(rule.quantile, alpha, t_opt=t_opt, edges=edges, shape=shape)
    raise ValueError(f"unknown metric kind {rule.kind!r}")


def _crossing(rule: Rule, low: float, high: float, status: int) -> str | None:
    if status == -1:
        side, val = ("lower", low) if rule.direction == "at_most" else ("upper", high)
        return f"{side} bound {val:.4g} {'>' if rule.direction == 'at_most' else '<'} {rule.threshold:g}"
    if status == 1:
        side, val = ("upper", high) if rule.direction == "at_most" else ("lower", low)
        return f"{side} bound {val:.4g} {'<=' if rule.direction == 'at_most' else '>='} {rule.threshold:g}"
    return None


@dataclass
class MetricState:
    """A metric's CS plus when (after how many requests) it was first decided."""

    rule: Rule
    cs: Any
    decided: int = 0  # the status it was last decided with (+1 / -1), 0 while open
    decided_at_requests: int | None = None
    decided_at_observations: int | None = None

    def status(self) -> int:
        lo, hi = self.cs.interval()
        return int(status_of(lo, hi, self.rule.direction, self.rule.threshold, self.cs.current_interval()))

    def note(self, requests: int) -> int:
        """Record the first poll at which this metric is decided; returns its status."""
        s = self.status()
        if s != 0 and s != self.decided:  # first decided, or good turned bad
            self.decided, self.decided_at_requests, self.decided_at_observations = s, requests, int(self.cs.n)
        return s


@dataclass
class SequentialRelease:
    """The anytime-valid state of one shadow window: a CS per rule, updated poll by poll.

    `update(observations)` takes each rule's new observations by name: a rate's values in
    [0, 1], a diff's candidate - live values in {-1, 0, 1}, a quantile's values, a
    quantile_ratio's (candidate values, live values). `decide(requests, elapsed_s)` returns
    the verdict with each metric's bound, interval and crossing. `to_state()` is what a
    deferrable trigger persists between polls (JSON; it does not grow with the window)."""

    rules: Sequence[Rule]
    policy: Policy = field(default_factory=Policy)
    metrics: dict[str, MetricState] = field(default_factory=dict)
    requests: int = 0

    def __post_init__(self) -> None:
        if not self.metrics:
            a = self.policy.alpha_per_metric(len(self.rules))
            self.metrics = {r.name: MetricState(r, make_cs(r, a, t_opt=self.policy.t_opt)) for r in self.rules}

    def update(self, observations: Mapping[str, Any], *, requests: int | None = None) -> None:
        for name, obs in observations.items():
            m = self.metrics[name]
            if m.rule.kind == "quantile_ratio":
                cand, live = obs
                m.cs.update(np.asarray(cand, dtype=float), np.asarray(live, dtype=float))
            else:
                m.cs.update(np.asarray(obs, dtype=float))
        if requests is not None:
            self.requests += int(requests)

    def decide(self, elapsed_s: float, *, window_over: bool | None = None) -> dict[str, Any]:
        over = elapsed_s >= self.policy.window_seconds if window_over is None else window_over
        statuses = np.array([m.note(self.requests) for m in self.metrics.values()])
        code = int(combine(statuses, requests=self.requests, elapsed_s=elapsed_s, window_over=over,
                           policy=self.policy))
        return self._report(VERDICTS[code], elapsed_s, over)

    def _report(self, verdict: Verdict, elapsed_s: float, over: bool) -> dict[str, Any]:
        a = self.policy.alpha_per_metric(len(self.metrics))
        out_metrics, reasons = [], []
        for m in self.metrics.values():
            lo, hi = (float(v) for v in m.cs.interval())
            s = m.status()
            est = m.cs.mean if m.rule.kind in ("rate", "diff") else m.cs.estimate
            cur_lo, cur_hi = (float(v) for v in m.cs.current_interval())
            crossed = _crossing(m.rule, *((cur_lo, cur_hi) if s == 1 else (lo, hi)), s)
            out_metrics.append({
                "name": m.rule.name, "rule": m.rule.describe(), "kind": m.rule.kind,
                "direction": m.rule.direction, "threshold": m.rule.threshold,
                "bound": EB_CITATION if m.rule.kind in ("rate", "diff") else QUANTILE_CITATION,
                "alpha": a, "estimate": float(est), "interval": [lo, hi], "current_interval": [cur_lo, cur_hi],
                "observations": int(m.cs.n),
                "status": {1: "good", -1: "bad", 0: "open"}[s], "crossed": crossed,
                "decided_at_requests": m.decided_at_requests})
            if crossed and (verdict == "rollback" and s == -1 or verdict == "promote"):
                reasons.append(f"{m.rule.name}: {crossed} after {m.decided_at_requests} requests")
            elif s == 0 and verdict in ("hold", "rollback") and over:
                reasons.append(f"{m.rule.name}: still open at the window's end "
                               f"(interval [{lo:.4g}, {hi:.4g}] straddles {m.rule.threshold:g})")
        if verdict == "promote" and not over:
            reasons.append(f"early promote: every bound on the good side, minimums met "
                           f"({self.requests} >= {self.policy.min_requests} requests, "
                           f"{elapsed_s:.0f} >= {self.policy.min_seconds:g} s)")
        return {"verdict": verdict, "requests": self.requests, "elapsed_s": elapsed_s, "window_over": over,
                "alpha": self.policy.alpha, "alpha_per_metric": a, "alpha_split": "bonferroni",
                "policy": asdict(self.policy), "metrics": out_metrics, "reasons": reasons}

    def to_state(self) -> dict[str, Any]:
        return {"policy": asdict(self.policy), "requests": self.requests,
                "metrics": [{"rule": asdict(m.rule), "cs": m.cs.to_state(), "decided": m.decided,
                             "decided_at_requests": m.decided_at_requests,
                             "decided_at_observations": m.decided_at_observations}
                            for m in self.metrics.values()]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SequentialRelease:
        loaders = {"mean": MeanCS.from_state, "diff": PairedDiffCS.from_state,
                   "quantile": QuantileCS.from_state, "quantile_ratio": QuantileRatioCS.from_state}
        metrics = {}
        for m in state["metrics"]:
            rule = Rule(**m["rule"])
            metrics[rule.name] = MetricState(rule, loaders[m["cs"]["kind"]](m["cs"]), m["decided"],
                                             m["decided_at_requests"], m["decided_at_observations"])
        return cls([ms.rule for ms in metrics.values()], Policy(**state["policy"]), metrics, state["requests"])
