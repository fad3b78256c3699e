"""Production monitoring: the shadow verdict and drift detection, both read from the inference log.

Shadow verdict: how did the candidate answer real (or replayed) traffic in the window —
error rate, p95 latency, the task's format rate (its answer check), and agreement with live
(the task's parsed fields) when live exists.
Post-switch verdict: once the candidate is live, its own live answers since the switch, on
error rate and p95 latency only, so a regression the shadow window missed is caught within
minutes and traffic goes back.
Drift: the recent prompts' text profile against the reference profile stored in the
training dataset's manifest (`tuneship.profile`), plus a retrain governor (cooldown and
debounce) so a noisy hour does not launch a GPU job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneship import atomic, config


def log_root() -> Path:
    return config.home() / "inference_log"


def task_records(served_model: str, *, since: float | None = None) -> list[dict]:
    """One served model's inference-log records since `since` (epoch seconds)."""
    from tuneship.inference_log import read_inference_log

    return read_inference_log(log_root(), since=since, model=served_model)


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), 95))


@dataclass
class ShadowThresholds:
    min_requests: int = 20
    max_error_rate: float = 0.01
    max_p95_ms: float = 2000.0
    min_format_rate: float = 0.9
    min_agreement: float = 0.0  # agreement with live is reported; gate it only if asked


def is_ok(resp: dict) -> bool:
    """The gateway logs the HTTP status it answered (or would have, for a shadow)."""
    return resp.get("status") == 200


def candidate_responses(records: list[dict], version: str) -> list[dict]:
    """The candidate's answers, whether it sat in the shadow slot or (bootstrap) in live.

    Mirror copies still `pending` or `dropped` (queue full) are not the candidate's answers."""
    out = []
    for rec in records:
        for slot in ("shadow", "live"):
            resp = rec.get(slot)
            if resp and str(resp.get("version")) == str(version) and resp.get("status") not in ("pending", "dropped"):
                out.append({**resp, "slot": slot, "request": rec})
                break
    return out


def shadow_verdict(records: list[dict], version: str, th: ShadowThresholds, *,
                   conforms: Callable[[str], bool], parse: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """`conforms` and `parse` are the task's answer check and parser (`tuneship.tasks.Task`):
    the format rate counts conforming answers, agreement compares every parsed field."""
    answers = candidate_responses(records, version)
    n = len(answers)
    errors = [a for a in answers if not is_ok(a)]
    ok = [a for a in answers if is_ok(a)]
    format_rate = sum(bool(conforms(a.get("completion") or "")) for a in ok) / max(len(ok), 1)
    agree_pairs = [
        (parse(a.get("completion") or ""), parse(a["request"]["live"].get("completion") or ""))
        for a in ok
        if a["slot"] == "shadow" and is_ok(a["request"].get("live") or {})
    ]
    agreement = (sum(s == lv for s, lv in agree_pairs) / len(agree_pairs)) if agree_pairs else None
    by_version = feedback_by_version(records)
    p95 = _p95([float(a["latency_ms"]) for a in ok if a.get("latency_ms") is not None])
    error_rate = len(errors) / n if n else 0.0
    reasons = []
    if n < th.min_requests:
        reasons.append(f"only {n} candidate responses in the window (need {th.min_requests})")
    if error_rate > th.max_error_rate:
        reasons.append(f"error rate {error_rate:.3f} > {th.max_error_rate}")
    if p95 is not None and p95 > th.max_p95_ms:
        reasons.append(f"p95 latency {p95:.0f} ms > {th.max_p95_ms:g} ms")
    if ok and format_rate < th.min_format_rate:
        reasons.append(f"format rate {format_rate:.3f} < {th.min_format_rate}")
    if agreement is not None and agreement < th.min_agreement:
        reasons.append(f"agreement with live {agreement:.3f} < {th.min_agreement}")
    return {
        "verdict": "promote" if not reasons else "rollback",
        "reasons": reasons,
        "requests": n,
        "errors": len(errors),
        "error_rate": error_rate,
        "p95_ms": p95,
        "format_rate": format_rate,
        "agreement_with_live": agreement,
        "slot": answers[0]["slot"] if answers else None,
        # Reported, not gated (yet): users' feedback on the answers the candidate gave them.
        **(by_version.get(str(version)) or _feedback_figures(0, 0, 0, 0)),
        "feedback_by_version": by_version,
    }


# ---------------------------------------------------------------- feedback (reported only)


def feedback_summary(records: list[dict], version: str) -> dict[str, Any]:
    """Task success and user rating over the feedback joined to requests that `version`
    answered for the user (`live` holds the colour that answered: live traffic, a canary's
    share, or a bootstrap candidate in the live slot). A shadow copy is never seen by the
    user, so feedback never rates it. Rates are None when no feedback has that field."""
    return feedback_by_version(records).get(str(version)) or _feedback_figures(0, 0, 0, 0)


def feedback_by_version(records: list[dict]) -> dict[str, dict[str, Any]]:
    """`feedback_summary` for every version that answered a request with feedback (the
    candidate and, for comparison, the live version), keyed by version: one pass."""
    tally: dict[str, list[int]] = {}  # version -> [success n, successes, rating n, rating sum]
    for rec in records:
        fb = rec.get("feedback")
        if not fb:
            continue
        t = tally.setdefault(str((rec.get("live") or {}).get("version")), [0, 0, 0, 0])
        if isinstance(fb.get("task_success"), bool):
            t[0] += 1
            t[1] += fb["task_success"]
        r = fb.get("rating")
        if isinstance(r, int) and not isinstance(r, bool):
            t[2] += 1
            t[3] += r
    return {v: _feedback_figures(*tally[v]) for v in sorted(tally)}


def _feedback_figures(n_success: int, successes: int, n_rating: int, ratings: int) -> dict[str, Any]:
    return {
        "task_success_rate": successes / n_success if n_success else None,
        "task_success_n": n_success,
        "mean_rating": ratings / n_rating if n_rating else None,
        "rating_n": n_rating,
    }


# ---------------------------------------------------------------- post-switch guard


@dataclass
class PostSwitchThresholds:
    """What the new live version must hold right after the switch (the shadow's own
    `max_error_rate` / `max_p95_ms` are reused; `min_requests` is the guard's own)."""

    min_requests: int = 20
    max_error_rate: float = 0.01
    max_p95_ms: float = 2000.0


def live_responses_since(records: list[dict], version: str, since: Any = None) -> list[dict]:
    """Live answers given by `version` in requests at or after `since` (datetime, ISO string
    or epoch seconds; None: all). A record without a readable `ts` is left out when `since`
    is given. Canary answers count: the `live` object is whichever colour answered."""
    from tuneship.inference_log import parse_ts

    lo = parse_ts(since) if since is not None else None
    out = []
    for rec in records:
        resp = rec.get("live")
        if not resp or str(resp.get("version")) != str(version):
            continue
        if lo is not None:
            try:
                if parse_ts(rec["ts"]) < lo:
                    continue
            except (KeyError, ValueError, TypeError):
                continue
        out.append(resp)
    return out


def post_switch_verdict(records: list[dict], version: str, th: PostSwitchThresholds, *, since: Any = None,
                        window_over: bool = True) -> dict[str, Any]:
    """Judge the new live version's answers since the switch.

    `breach` as soon as at least `min_requests` answers are in and the error rate is above
    `max_error_rate` or the p95 latency of the successful answers is above `max_p95_ms`
    (equal to a threshold is within it); fewer answers never breach, however bad. Without a
    breach: `watching` while the window is open, then `healthy`, or `insufficient` when fewer
    than `min_requests` answers came in (the guard could not judge; nothing was shown wrong).
    """
    answers = live_responses_since(records, version, since)
    n = len(answers)
    errors = sum(not is_ok(a) for a in answers)
    error_rate = errors / n if n else 0.0
    p95 = _p95([float(a["latency_ms"]) for a in answers if is_ok(a) and a.get("latency_ms") is not None])
    reasons = []
    if n >= th.min_requests:
        if error_rate > th.max_error_rate:
            reasons.append(f"error rate {error_rate:.3f} ({errors} of {n}) > {th.max_error_rate}")
        if p95 is not None and p95 > th.max_p95_ms:
            reasons.append(f"p95 latency {p95:.1f} ms > {th.max_p95_ms:g} ms")
    if reasons:
        verdict = "breach"
    elif not window_over:
        verdict = "watching"
    elif n < th.min_requests:
        verdict = "insufficient"
        reasons.append(f"not enough traffic: only {n} live responses from v{version} since the switch "
                       f"(need {th.min_requests} to judge)")
    else:
        verdict = "healthy"
    return {"verdict": verdict, "reasons": reasons, "version": str(version), "requests": n, "errors": errors,
            "error_rate": error_rate, "p95_ms": p95, "thresholds": asdict(th)}


# ---------------------------------------------------------------- drift


def drift_report(reference: dict, prompts: list[str], *, threshold: float, min_requests: int = 30) -> dict[str, Any]:
    from tuneship.profile import compare_profiles, text_profile

    if len(prompts) < min_requests:
        return {"status": "insufficient", "requests": len(prompts), "score": None, "drifted": False,
                "threshold": threshold}
    current = text_profile(prompts)
    cmp = compare_profiles(reference, current)
    score = float(cmp["score"])
    return {"status": "ok", "requests": len(prompts), "score": score, "drifted": score >= threshold,
            "threshold": threshold, "details": cmp, "current": current}


def drift_chart(reference: dict, current: dict, out: Path, title: str) -> Path:
    """Reference vs current prompt-length distribution, the picture people ask for first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shares(profile: dict) -> list[float]:
        counts = profile["length"]["counts"]
        total = sum(counts) or 1
        return [c / total for c in counts]

    ref_h, cur_h = shares(reference), shares(current)
    edges = reference["length"]["bin_edges"]
    labels = [f"{edges[i]}-{edges[i + 1] - 1}" if i + 1 < len(edges) else f"{edges[i]}+" for i in range(len(ref_h))]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = range(len(ref_h))
    ax.bar([i - 0.2 for i in x], ref_h, width=0.4, label="training reference")
    ax.bar([i + 0.2 for i in x], cur_h, width=0.4, label="recent traffic")
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of prompts")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class GovernorState:
    consecutive_drifted: int = 0
    last_request_ts: float | None = None


def governor_path(task: str) -> Path:
    """Each task's retrain governor keeps its own streak and cooldown."""
    return config.home() / "monitor" / task / "governor.json"


def load_governor(task: str) -> GovernorState:
    path = governor_path(task)
    return GovernorState(**json.loads(path.read_text())) if path.exists() else GovernorState()


def save_governor(task: str, state: GovernorState) -> None:
    atomic.write_text(governor_path(task), json.dumps(asdict(state)))


def governor_decide(state: GovernorState, drifted: bool, *, debounce: int, cooldown_s: float,
                    now: float | None = None) -> tuple[bool, GovernorState, str]:
    """Fire a retrain only after `debounce` drifted checks in a row and outside the cooldown."""
    now = time.time() if now is None else now
    if not drifted:
        return False, GovernorState(0, state.last_request_ts), "no drift"
    streak = state.consecutive_drifted + 1
    if streak < debounce:
        return False, GovernorState(streak, state.last_request_ts), f"drifted {streak}/{debounce} checks in a row"
    if state.last_request_ts is not None and now - state.last_request_ts < cooldown_s:
        left = cooldown_s - (now - state.last_request_ts)
        return False, GovernorState(streak, state.last_request_ts), f"cooldown: {left / 3600:.1f} h left"
    return True, GovernorState(0, now), "drift confirmed: retrain requested"
