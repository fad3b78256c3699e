"""Production monitoring read from the inference log: users' feedback per version and drift
detection. (The shadow window and the post-switch guard are `tuneship.shadow`.)

Drift: the recent prompts' text profile against the reference profile stored in the
training dataset's manifest (`tuneship.profile`), plus a retrain governor (cooldown and
debounce) so a noisy hour does not launch a GPU job.
"""

from __future__ import annotations

import json
import time
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
