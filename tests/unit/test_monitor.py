"""Users' feedback per version and the retrain governor: pure functions over inference-log
records. (The shadow window and post-switch guard: tests/unit/test_shadow_watch.py.)"""

from __future__ import annotations

from tuneship.monitor import GovernorState, feedback_by_version, feedback_summary, governor_decide


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
    fire, s, why = governor_decide(s, True, debounce=2, cooldown_s=3600, now=1100)
    assert fire and s.last_request_ts == 1100
    fire, s, why = governor_decide(s, True, debounce=1, cooldown_s=3600, now=1200)
    assert not fire and "cooldown" in why
    fire, s, why = governor_decide(s, False, debounce=1, cooldown_s=3600, now=1300)
    assert not fire and s.consecutive_drifted == 0
    fire, s, _ = governor_decide(s, True, debounce=1, cooldown_s=3600, now=1100 + 3601)
    assert fire


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
