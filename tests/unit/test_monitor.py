"""Users' feedback per version and the retrain governor: pure functions over inference-log
records. (The shadow window and post-switch guard: tests/unit/test_shadow_watch.py.)"""

from __future__ import annotations

from tuneship.monitor import (
    GovernorRules,
    GovernorState,
    feedback_by_version,
    feedback_summary,
    governor_decide,
)


def rec(live_v, live_text, shadow_v=None, shadow_text=None, shadow_status=200, latency=20.0):
    r = {"prompt": "Ticket: x\nTriage:",
         "live": {"version": live_v, "completion": live_text, "status": 200, "latency_ms": 10.0}}
    r["shadow"] = ({"version": shadow_v, "completion": shadow_text, "status": shadow_status,
                    "latency_ms": latency} if shadow_v else None)
    return r


GOOD = " category=billing priority=high"


def test_governor_debounce_and_cooldown():
    s = GovernorState()
    fire, s, why = governor_decide(s, True, debounce=2, cooldown_s=3600, now=1000)
    assert not fire and "1/2" in why
    fire, s, why = governor_decide(s, True, debounce=2, cooldown_s=3600, now=1100, latest_version=3)
    assert fire and s.last_request_ts == 1100 and s.open_retrain == {"at": 1100, "latest_version": 3}
    fire, s, why = governor_decide(s, False, debounce=1, cooldown_s=3600, now=1300)
    assert not fire and s.consecutive_drifted == 0 and "re-armed" in why
    fire, s, why = governor_decide(s, True, debounce=1, cooldown_s=3600, now=1400, latest_version=4)
    assert not fire and "cooldown" in why and "registered v4" in why  # the retrain landed: no longer open
    fire, s, _ = governor_decide(s, True, debounce=1, cooldown_s=3600, now=1100 + 3601, latest_version=4)
    assert fire


def test_governor_hysteresis_dedupe_and_budget_each_say_why():
    rules = GovernorRules(debounce=1, cooldown_s=0, clear_checks=2, open_timeout_s=7200, budget_gpu_hours=1.0,
                          retrain_gpu_hours=0.4)
    fire, s, _ = governor_decide(GovernorState(), True, rules=rules, now=0, latest_version=1)
    assert fire and s.spent == [[0, 0.4]]
    # still drifted: the drift must clear (twice) before it can fire again
    fire, s, why = governor_decide(s, True, rules=rules, now=60, latest_version=2)
    assert not fire and why.endswith("(2 clear check(s) needed)") and "registered v2" in why
    fire, s, why = governor_decide(s, False, rules=rules, now=120)
    assert not fire and "clear 1/2" in why and not s.armed
    fire, s, why = governor_decide(s, False, rules=rules, now=180)
    assert s.armed and "re-armed" in why
    fire, s, _ = governor_decide(s, True, rules=rules, now=240, latest_version=2)
    assert fire
    # one open retrain per task: a drift while it runs is recorded, not fired
    s = GovernorState(**{**s.__dict__, "armed": True})
    fire, s, why = governor_decide(s, True, rules=rules, now=300, latest_version=2)
    assert not fire and why.startswith("dedupe")
    # the open one never registered: after its timeout the budget decides (0.8 of 1.0 used)
    fire, s, why = governor_decide(s, True, rules=rules, now=240 + 7200, latest_version=2)
    assert not fire and "gave no version" in why and "GPU budget: 0.80 of 1 GPU hours" in why
    # a week later the old spend has left the period
    fire, s, _ = governor_decide(s, True, rules=rules, now=8 * 86400, latest_version=2)
    assert fire and s.spent == [[8 * 86400, 0.4]]


# ---------------------------------------------------------------- post-switch guard

def test_feedback_rates_count_only_answers_the_version_gave_users():
    def fb(r, **verdict):
        return {**r, "feedback": {"rating": None, "task_success": None, **verdict}}

    records = [
        fb(rec("2", GOOD), rating=5, task_success=True),   # a canary answer by the candidate
        fb(rec("2", GOOD), task_success=False),
        fb(rec("2", GOOD), rating=4),
        rec("2", GOOD),                                      # no feedback: not counted
        fb(rec("1", GOOD, "2", GOOD), rating=1, task_success=False),  # v2 only as a shadow copy
    ]
    v = feedback_summary(records, "2")
    assert (v["task_success_rate"], v["task_success_n"], v["mean_rating"], v["rating_n"]) == (0.5, 2, 4.5, 2)
    assert feedback_by_version(records)["1"] == {"task_success_rate": 0.0, "task_success_n": 1,
                                                 "mean_rating": 1.0, "rating_n": 1}
    none = feedback_summary([rec("1", GOOD, "2", GOOD)], "2")
    assert (none["task_success_rate"], none["mean_rating"]) == (None, None)
    assert feedback_by_version([rec("1", GOOD, "2", GOOD)]) == {}
