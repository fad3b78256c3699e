"""Production monitoring read from the inference log: users' feedback per version and drift
detection. (The shadow window and the post-switch guard are `tuneship.shadow`.)

Drift: the recent prompts' text profile against the reference profile stored in the
training dataset's manifest (`tuneship.profile`), plus a retrain governor (cooldown and
debounce) so a noisy hour does not launch a GPU job. A window is read in one streaming pass
(`scan_window`: the profile fed as it goes, seeded samples for the two-sample tests), so a
check's memory does not grow with the requests it reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
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

# Users' feedback on an answer counts where a decision reads it (a canary's task success, the
# drift monitor's calibration test) when it comes within this long of the answer, from the key
# that made the request, first verdict only: the readers' state stays bounded however long
# they run.
FEEDBACK_TTL_S = 3600.0


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


@dataclass
class WindowScan:
    """One window of a served model's inference log as the drift check reads it, gathered in
    one streaming pass (`scan_window`): its size does not depend on the number of requests."""

    requests: int  # requests the live colour answered (status 200): the prompts profiled
    profile: dict[str, Any] | None  # `tuneship.profile.text_profile` of their prompts
    prompts: list[str]  # a seeded sample of those prompts (`tuneship.drift.Reservoir`)
    answers: list[str]  # a seeded sample of `version`'s answers among them
    answers_seen: int  # how many answers `version` gave in the window
    # (confidence, task success) of `version`'s answers that carry the model's confidence and
    # got their requester's feedback (`Calibration`): a seeded sample of `sample_size` of them,
    # and how many joined
    calibration: list[tuple[float, bool]] = field(default_factory=list)
    calibration_seen: int = 0


class Calibration:
    """Users' task-success verdicts joined to the answers they judge, for the drift monitor's
    calibration test, under a canary's feedback rules: from the key that made the request,
    its first verdict, within `FEEDBACK_TTL_S` of the answer.

    Two passes over the window, so memory follows the feedback, not the traffic: `verdict`
    indexes the feedback lines (the first pass), `answer` joins each answer that carries a
    confidence (the second). At most `16 * sample_size` requests' verdicts are held: past
    that the request ids kept are thinned by their sampling key (threshold halved, those
    above it dropped, later ones above it never kept), so the joined pairs stay a uniform
    sample. (A window that ends before the log does also indexes the verdicts of the hour
    after it, some of them on later requests: they share the cap.) The pairs returned are a
    seeded sample of `sample_size` (`tuneship.drift.Reservoir`)."""

    def __init__(self, sample_size: int, seed: int) -> None:
        from tuneship.drift import Reservoir

        self.pairs = Reservoir(sample_size, seed)
        self.cap = 16 * sample_size
        self.threshold = 1 << 64  # request ids whose key is at or above it are not kept
        # rid -> (its sampling key, its verdicts in read order: (ts, key_id, success))
        self.verdicts: dict[str, tuple[int, list[tuple[float, Any, bool]]]] = {}
        self.joined = 0

    def verdict(self, rid: str, ts: float, key_id: Any, success: Any) -> None:
        if not isinstance(success, bool):
            return
        got = self.verdicts.get(rid)
        if got is not None:
            if len(got[1]) < 4:  # the first verdicts of a few keys; the requester's first is what counts
                got[1].append((ts, key_id, success))
            return
        key = self.pairs.key(rid)
        if key >= self.threshold:
            return
        self.verdicts[rid] = (key, [(ts, key_id, success)])
        while len(self.verdicts) > self.cap:
            self.threshold >>= 1
            self.verdicts = {r: v for r, v in self.verdicts.items() if v[0] < self.threshold}

    def answer(self, rid: str, ts: float, key_id: Any, confidence: Any) -> None:
        got = self.verdicts.get(rid)
        if got is None or isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
                or not 0 <= confidence <= 1:
            return
        mine = [v for v in got[1] if v[1] == key_id and 0 <= v[0] - ts <= FEEDBACK_TTL_S]
        if mine:
            self.joined += 1
            self.pairs.offer(rid, (float(confidence), min(mine, key=lambda v: v[0])[2]), ts, key=got[0])

    def result(self) -> list[tuple[float, bool]]:
        """(confidence, task success) of the sampled pairs, by the answers' time."""
        return self.pairs.items()


SAMPLE_SEED = 1  # the recent window's samples (the reference's, from the training data, uses 0)


def scan_window(served_model: str, *, since: float | None, until: float | None = None, sample_size: int,
                version: str | None = None, with_prompts: bool = True, with_calibration: bool = True,
                root: Path | None = None, batch: int = 10_000) -> WindowScan:
    """One pass over a served model's request lines in [since, until) (epoch seconds): the
    live-answered prompts' text profile (fed `batch` prompts at a time), a seeded sample of
    `sample_size` of them, a seeded sample of `sample_size` of `version`'s answers (`None`:
    no answers) and of their (confidence, task success) pairs where users' feedback joins
    (`Calibration`: a first pass over the feedback lines; `with_calibration=False` skips
    it). `with_prompts=False` skips the profile and the prompt sample (a window read for its
    answers only). Samples are keyed by request id, sorted by time."""
    from tuneship.drift import Reservoir
    from tuneship.inference_log import iter_requests
    from tuneship.profile import TextProfiler

    profiler = TextProfiler() if with_prompts else None
    prompts, answers = Reservoir(sample_size, SAMPLE_SEED), Reservoir(sample_size, SAMPLE_SEED)
    pending: list[str] = []
    requests = 0
    want = None if version is None else str(version)
    calibration = Calibration(sample_size, SAMPLE_SEED) if want is not None and with_calibration else None
    if calibration is not None:  # the first pass: the window's feedback (and an hour after it)
        late = None if until is None else until + FEEDBACK_TTL_S
        for ts, line in iter_requests(root or log_root(), since, late, served_model, kinds=("feedback",),
                                      containing=b"feedback"):
            calibration.verdict(str(line.request_id), ts.timestamp(), line.key_id, line.task_success)
    for ts, line in iter_requests(root or log_root(), since, until, served_model):
        live = line.live
        if live is None or live.status != 200:
            continue
        requests += 1
        rid = str(line.request_id)
        order, key = ts.timestamp(), prompts.key(rid)  # one key: both samples use the same seed
        if profiler is not None:
            prompt = line.prompt if isinstance(line.prompt, str) else ""
            pending.append(prompt)
            prompts.offer(rid, prompt, order, key=key)
            if len(pending) >= batch:
                profiler.add_texts(pending)
                pending = []
        if want is not None and str(live.version) == want:
            answers.offer(rid, live.completion or "", order, key=key)
            if calibration is not None and live.confidence is not None:
                calibration.answer(rid, order, line.key_id, live.confidence)
    if profiler is not None:
        profiler.add_texts(pending)
    return WindowScan(requests=requests, profile=profiler.result() if profiler is not None else None,
                      prompts=prompts.items(), answers=answers.items(), answers_seen=answers.seen,
                      calibration=calibration.result() if calibration else [],
                      calibration_seen=calibration.joined if calibration else 0)


def drift_report(reference: dict, current: dict, *, threshold: float, min_requests: int = 30) -> dict[str, Any]:
    """The recent prompts' profile (`current`, e.g. `WindowScan.profile`) scored against the
    training reference; `insufficient` below `min_requests` prompts."""
    from tuneship.profile import compare_profiles

    n = int(current["row_count"])
    if n < min_requests:
        return {"status": "insufficient", "requests": n, "score": None, "drifted": False,
                "threshold": threshold}
    cmp = compare_profiles(reference, current)
    score = float(cmp["score"])
    return {"status": "ok", "requests": n, "score": score, "drifted": score >= threshold,
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
    """A task's retrain governor between checks (`monitor/<task>/governor.json`)."""

    consecutive_drifted: int = 0
    last_request_ts: float | None = None
    armed: bool = True  # hysteresis: False from a retrain request until the drift has cleared
    consecutive_clear: int = 0
    open_retrain: dict[str, Any] | None = None  # {"at", "champion", "latest_version"} until a new version lands
    spent: list[list[float]] = field(default_factory=list)  # [requested at, GPU hours] in the budget period


@dataclass(frozen=True)
class GovernorRules:
    """What the governor holds a drift to before a GPU job starts (the task file's `drift:`).

    `debounce` drifted checks in a row; `cooldown_s` since the last request; `clear_checks`
    clear checks in a row before it may fire again (hysteresis); one open retrain per task
    (open until a newer registered version exists, or `open_timeout_s` has passed: a retrain
    that died before registering must not block the task for ever); at most
    `budget_gpu_hours` per `period_s`, each retrain costing `retrain_gpu_hours` (the
    champion's measured training time times its GPUs)."""

    debounce: int = 2
    cooldown_s: float = 24 * 3600.0
    clear_checks: int = 1
    open_timeout_s: float = 24 * 3600.0
    budget_gpu_hours: float | None = None
    period_s: float = 7 * 24 * 3600.0
    retrain_gpu_hours: float | None = None


def governor_path(task: str) -> Path:
    """Each task's retrain governor keeps its own streak and cooldown."""
    return config.home() / "monitor" / task / "governor.json"


def load_governor(task: str) -> GovernorState:
    path = governor_path(task)
    return GovernorState(**json.loads(path.read_text())) if path.exists() else GovernorState()


def save_governor(task: str, state: GovernorState) -> None:
    atomic.write_text(governor_path(task), json.dumps(asdict(state)))


def record_decision(task: str, decision: dict[str, Any]) -> Path:
    """Append one governor decision (what it saw, what it did, why) to the task's decision log,
    `monitor/<task>/governor.jsonl`: one JSON line each, flushed and fsynced."""
    import os

    path = config.home() / "monitor" / task / "governor.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(decision, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_decisions(task: str) -> list[dict[str, Any]]:
    path = config.home() / "monitor" / task / "governor.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


def governor_decide(state: GovernorState, drifted: bool, *, debounce: int | None = None,
                    cooldown_s: float | None = None, rules: GovernorRules | None = None, now: float | None = None,
                    latest_version: int | None = None) -> tuple[bool, GovernorState, str]:
    """Fire a retrain only when every rule allows it; returns (fire, new state, reason).
    `latest_version`: the newest registered version now (closes an open retrain it exceeds)."""
    from dataclasses import replace

    rules = rules or GovernorRules()
    if debounce is not None or cooldown_s is not None:
        rules = replace(rules, **{k: v for k, v in (("debounce", debounce), ("cooldown_s", cooldown_s))
                                  if v is not None})
    now = time.time() if now is None else now
    st = replace(state, spent=[s for s in state.spent if now - s[0] < rules.period_s])
    notes = []
    if st.open_retrain is not None:
        landed = latest_version is not None and latest_version > int(st.open_retrain.get("latest_version") or 0)
        if landed or now - float(st.open_retrain["at"]) >= rules.open_timeout_s:
            notes.append("the open retrain " + (f"registered v{latest_version}" if landed else
                                                 f"gave no version in {rules.open_timeout_s / 3600:g} h: closed"))
            st = replace(st, open_retrain=None)

    def out(fire: bool, new: GovernorState, reason: str) -> tuple[bool, GovernorState, str]:
        return fire, new, "; ".join([*notes, reason])

    if not drifted:
        clear = st.consecutive_clear + 1
        armed = st.armed or clear >= rules.clear_checks
        why = "no drift" + ("; drift cleared: re-armed" if armed and not st.armed else
                            "" if armed else f"; clear {clear}/{rules.clear_checks} checks before it may fire again")
        return out(False, replace(st, consecutive_drifted=0, consecutive_clear=clear, armed=armed), why)
    streak = st.consecutive_drifted + 1
    st = replace(st, consecutive_drifted=streak, consecutive_clear=0)
    if streak < rules.debounce:
        return out(False, st, f"drifted {streak}/{rules.debounce} checks in a row")
    if not st.armed:
        return out(False, st, f"hysteresis: the drift has not cleared since the last retrain request "
                              f"({rules.clear_checks} clear check(s) needed)")
    if st.open_retrain is not None:
        return out(False, st, f"dedupe: a retrain requested at {_utc(st.open_retrain['at'])} is still open "
                              "(no newer version registered yet)")
    if st.last_request_ts is not None and now - st.last_request_ts < rules.cooldown_s:
        left = rules.cooldown_s - (now - st.last_request_ts)
        return out(False, st, f"cooldown: {left / 3600:.1f} h left")
    cost = rules.retrain_gpu_hours
    if rules.budget_gpu_hours is not None and cost is not None:
        used = sum(s[1] for s in st.spent)
        if used + cost > rules.budget_gpu_hours:
            return out(False, st, f"GPU budget: {used:.2f} of {rules.budget_gpu_hours:g} GPU hours used in the last "
                                  f"{rules.period_s / 86400:g} days; a retrain costs {cost:.2f}")
    fired = replace(st, consecutive_drifted=0, last_request_ts=now, armed=False,
                    open_retrain={"at": now, "latest_version": latest_version},
                    spent=[*st.spent, [now, float(cost or 0.0)]])
    return out(True, fired, "drift confirmed: retrain requested")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
