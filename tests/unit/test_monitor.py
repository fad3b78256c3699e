"""Shadow verdict and retrain governor: pure functions over inference-log records."""

from __future__ import annotations

from tests.tasks import triage
from tuneship.monitor import GovernorState, ShadowThresholds, governor_decide
from tuneship.monitor import shadow_verdict as _verdict

_TASK = triage()


def shadow_verdict(records, version, th):
    """The verdict with the triage task's own answer check and parser."""
    return _verdict(records, version, th, conforms=_TASK.answer_conforms, parse=_TASK.parse_answer)


def rec(live_v, live_text, shadow_v=None, shadow_text=None, shadow_status=200, latency=20.0):
    r = {"prompt": "Ticket: x\nTriage:",
         "live": {"version": live_v, "completion": live_text, "status": 200, "latency_ms": 10.0}}
    r["shadow"] = ({"version": shadow_v, "completion": shadow_text, "status": shadow_status,
                    "latency_ms": latency} if shadow_v else None)
    return r


GOOD = " category=billing priority=high"


def test_promote_when_shadow_healthy():
    records = [rec("1", GOOD, "2", GOOD) for _ in range(30)]
    v = shadow_verdict(records, "2", ShadowThresholds(min_requests=20))
    assert v["verdict"] == "promote" and v["requests"] == 30 and v["slot"] == "shadow"
    assert v["agreement_with_live"] == 1.0 and v["format_rate"] == 1.0


def test_rollback_on_errors_latency_format_and_too_few():
    errs = [rec("1", GOOD, "2", None, shadow_status=502) for _ in range(3)] + [rec("1", GOOD, "2", GOOD)] * 27
    v = shadow_verdict(errs, "2", ShadowThresholds(min_requests=20, max_error_rate=0.05))
    assert v["verdict"] == "rollback" and any("error rate" in r for r in v["reasons"])
    slow = [rec("1", GOOD, "2", GOOD, latency=5000.0)] * 30
    assert any("p95" in r for r in shadow_verdict(slow, "2", ShadowThresholds())["reasons"])
    # a sub-millisecond budget is shown as set, not rounded to "> 0 ms"
    assert "p95 latency 5000 ms > 0.001 ms" in shadow_verdict(slow, "2", ShadowThresholds(max_p95_ms=0.001))["reasons"]
    junk = [rec("1", GOOD, "2", "blah")] * 30
    assert any("format" in r for r in shadow_verdict(junk, "2", ShadowThresholds())["reasons"])
    few = [rec("1", GOOD, "2", GOOD)] * 5
    assert any("only 5" in r for r in shadow_verdict(few, "2", ShadowThresholds())["reasons"])


def test_pending_and_dropped_copies_are_not_answers():
    records = [rec("1", GOOD, "2", None, shadow_status="pending"), rec("1", GOOD, "2", None, shadow_status="dropped")]
    records += [rec("1", GOOD, "2", GOOD)] * 20
    v = shadow_verdict(records, "2", ShadowThresholds())
    assert v["requests"] == 20 and v["errors"] == 0 and v["verdict"] == "promote"


def test_agreement_compares_every_parsed_field():
    other_priority = " category=billing priority=low"
    records = [rec("1", GOOD, "2", other_priority)] * 10 + [rec("1", GOOD, "2", GOOD)] * 10
    assert shadow_verdict(records, "2", ShadowThresholds())["agreement_with_live"] == 0.5


def test_bootstrap_candidate_in_live_slot():
    records = [rec("2", GOOD) for _ in range(25)]
    v = shadow_verdict(records, "2", ShadowThresholds())
    assert v["verdict"] == "promote" and v["slot"] == "live" and v["agreement_with_live"] is None


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

SWITCH = 1_800_000_000.0  # epoch seconds of the switch


def live(version, *, at=SWITCH + 1, status=200, latency=20.0, role="live"):
    from tuneship.inference_log import format_ts, parse_ts

    return {"ts": format_ts(parse_ts(at)), "role": role, "prompt": "Ticket: x\nTriage:", "shadow": None,
            "live": {"version": version, "completion": GOOD if status == 200 else None, "status": status,
                     "latency_ms": latency}}


def judge(records, *, window_over=True, **th):
    from tuneship.monitor import PostSwitchThresholds, post_switch_verdict

    return post_switch_verdict(records, "7", PostSwitchThresholds(**th), since=SWITCH, window_over=window_over)


def test_post_switch_counts_only_the_new_versions_live_answers_since_the_switch():
    records = [live("7", at=SWITCH - 5, status=502) for _ in range(30)]  # before the switch (e.g. bootstrap)
    records += [live("6", status=502) for _ in range(30)]  # the old version, still answering in-flight
    records += [{**live("7", status=502), "ts": "garbage"}]  # unreadable timestamp: left out
    records += [live("7", at=SWITCH) for _ in range(20)]  # exactly at the switch: counted
    v = judge(records)
    assert (v["verdict"], v["requests"], v["errors"], v["error_rate"]) == ("healthy", 20, 0, 0.0)
    assert v["p95_ms"] == 20.0 and v["reasons"] == [] and v["thresholds"]["min_requests"] == 20


def test_post_switch_error_rate_boundary():
    ok, bad = live("7"), live("7", status=503)
    at_limit = [bad] + [ok] * 19  # 1/20 = 0.05: equal to the limit is within it
    assert judge(at_limit, max_error_rate=0.05)["verdict"] == "healthy"
    over = [bad] * 2 + [ok] * 18  # 0.10
    v = judge(over, max_error_rate=0.05)
    assert v["verdict"] == "breach" and v["errors"] == 2 and v["error_rate"] == 0.1
    assert v["reasons"] == ["error rate 0.100 (2 of 20) > 0.05"]


def test_post_switch_p95_boundary_and_errors_do_not_count_towards_latency():
    at_limit = [live("7", latency=2000.0)] * 20
    assert judge(at_limit)["verdict"] == "healthy"
    over = [live("7", latency=2000.5)] * 20
    v = judge(over)
    assert v["verdict"] == "breach" and v["reasons"] == ["p95 latency 2000.5 ms > 2000 ms"]
    # slow failures are errors, not latency: a 30 s timeout does not inflate p95
    mixed = [live("7", status=504, latency=30000.0)] + [live("7", latency=10.0)] * 19
    v = judge(mixed, max_error_rate=0.1)
    assert v["verdict"] == "healthy" and v["p95_ms"] == 10.0


def test_post_switch_needs_min_requests_before_it_can_breach():
    all_bad = [live("7", status=502)] * 19
    watching = judge(all_bad, window_over=False)
    assert watching["verdict"] == "watching" and watching["reasons"] == []
    done = judge(all_bad)
    assert done["verdict"] == "insufficient" and done["requests"] == 19
    assert "not enough traffic" in done["reasons"][0] and "need 20" in done["reasons"][0]
    # the 20th answer makes it judgeable: an open window breaches early
    assert judge(all_bad + [live("7", status=502)], window_over=False)["verdict"] == "breach"
    assert judge([], min_requests=1)["verdict"] == "insufficient"


def test_post_switch_open_window_without_breach_keeps_watching():
    assert judge([live("7")] * 50, window_over=False)["verdict"] == "watching"


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
    v = shadow_verdict(records, "2", ShadowThresholds(min_requests=1))
    assert (v["task_success_rate"], v["task_success_n"], v["mean_rating"], v["rating_n"]) == (0.5, 2, 4.5, 2)
    assert v["feedback_by_version"]["1"] == {"task_success_rate": 0.0, "task_success_n": 1,
                                             "mean_rating": 1.0, "rating_n": 1}
    assert v["verdict"] == shadow_verdict([{k: x for k, x in r.items() if k != "feedback"} for r in records],
                                          "2", ShadowThresholds(min_requests=1))["verdict"]
    none = shadow_verdict([rec("1", GOOD, "2", GOOD)], "2", ShadowThresholds(min_requests=1))
    assert (none["task_success_rate"], none["mean_rating"], none["feedback_by_version"]) == (None, None, {})
