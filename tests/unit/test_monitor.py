"""Shadow verdict and retrain governor: pure functions over inference-log records."""

from __future__ import annotations

from tuneship.monitor import GovernorState, ShadowThresholds, governor_decide, shadow_verdict


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
    junk = [rec("1", GOOD, "2", "blah")] * 30
    assert any("format" in r for r in shadow_verdict(junk, "2", ShadowThresholds())["reasons"])
    few = [rec("1", GOOD, "2", GOOD)] * 5
    assert any("only 5" in r for r in shadow_verdict(few, "2", ShadowThresholds())["reasons"])


def test_pending_and_dropped_copies_are_not_answers():
    records = [rec("1", GOOD, "2", None, shadow_status="pending"), rec("1", GOOD, "2", None, shadow_status="dropped")]
    records += [rec("1", GOOD, "2", GOOD)] * 20
    v = shadow_verdict(records, "2", ShadowThresholds())
    assert v["requests"] == 20 and v["errors"] == 0 and v["verdict"] == "promote"


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
