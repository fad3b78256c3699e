"""The release windows' watch (`tuneship.shadow`): it reads only what is new, joins shadow
answers to their requests whichever comes first, survives a restart, and decides with the
anytime-valid sequences: a clear loser early, an equal candidate at the window's end by the
task's rule, and never a false alarm from a single bad answer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tuneship import shadow
from tuneship.inference_log import format_ts, parse_ts, partition_file
from tuneship.sequential import Policy

MODEL = "tuneship"
CHECKS = shadow.Checks(conforms=lambda t: t.strip().startswith("category="),
                       parse=lambda t: dict(p.split("=", 1) for p in t.split() if "=" in p),
                       declined=lambda t: "sorry" in t.lower())
RELEASE = {"max_error_rate": 0.01, "max_p95_ms": 2000.0, "min_format_rate": 0.9, "max_format_drop": 0.05,
           "max_refusal_increase": 0.05, "min_requests": 20, "alpha": 0.05, "min_seconds": 0.0, "on_open": "hold"}


def answer(version: str, text: str = "category=billing priority=low", status: int = 200, latency: float = 300.0,
           colour: str = "green") -> dict[str, Any]:
    return {"colour": colour, "version": version, "completion": text if status == 200 else None,
            "latency_ms": latency, "status": status}


def append(root: Path, line: dict[str, Any], *, raw: str | None = None) -> Path:
    path = partition_file(root, parse_ts(line["ts"]), "gw0", MODEL)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(raw if raw is not None else json.dumps(line) + "\n")
    return path


def request(rid: str, at: float, live: dict, shadow_: dict | None) -> dict[str, Any]:
    return {"kind": "request", "ts": format_ts(parse_ts(at)), "request_id": rid, "served_model": MODEL,
            "prompt": "Ticket: x", "live": live, "shadow": shadow_}


def shadow_line(rid: str, at: float, ans: dict) -> dict[str, Any]:
    return {"kind": "shadow", "ts": format_ts(parse_ts(at)), "request_id": rid, "served_model": MODEL, "shadow": ans}


def watch(root: Path, since: float, *, mode: str = "shadow", release: dict | None = None,
          window_s: float = 3600.0) -> shadow.WindowWatch:
    release = {**RELEASE, **(release or {})}
    rules = shadow.shadow_rules(release, with_live=True, checks=CHECKS) if mode == "shadow" else \
        shadow.guard_rules(release)
    return shadow.WindowWatch.start(mode=mode, version="2", since=since, rules=rules,
                                    policy=shadow.policy_of(release, window_s), root=root, served_model=MODEL,
                                    checks=CHECKS if mode == "shadow" else None)


def mirrored(root: Path, start: float, n: int, *, cand: dict | None = None, offset: int = 0) -> None:
    """n requests answered by live v1 and mirrored to v2 (request line, then shadow line)."""
    for i in range(offset, offset + n):
        rid = f"r{i}"
        append(root, request(rid, start + i * 0.01, answer("1", colour="blue"),
                             {"colour": "green", "version": "2", "status": "pending"}))
        append(root, shadow_line(rid, start + i * 0.01, cand or answer("2")))


def test_a_poll_reads_only_what_arrived_since_the_last_one(tmp_path: Path):
    start = time.time() - 60
    w = watch(tmp_path, start)
    mirrored(tmp_path, start, 2000)
    first = w.poll(time.time())
    assert first["requests"] == 2000 and first["bytes_read"] > 500_000
    mirrored(tmp_path, start + 30, 1, offset=5000)
    second = w.poll(time.time())
    assert second["requests"] == 2001
    assert second["bytes_read"] < 1000  # one request and its shadow answer, not the window
    assert w.poll(time.time())["bytes_read"] == 0


def test_a_torn_last_line_waits_for_the_next_poll(tmp_path: Path):
    start = time.time() - 60
    w = watch(tmp_path, start)
    line = request("r0", start, answer("1", colour="blue"), answer("2"))
    text = json.dumps(line) + "\n"
    append(tmp_path, line, raw=text[:40])  # the writer is mid-line
    assert w.poll(time.time())["requests"] == 0
    append(tmp_path, line, raw=text[40:])
    assert w.poll(time.time())["requests"] == 1


def test_shadow_answers_join_their_request_in_either_order_and_across_a_restart(tmp_path: Path):
    start = time.time() - 60
    w = watch(tmp_path, start)
    append(tmp_path, request("a", start, answer("1", colour="blue"), {"version": "2", "status": "pending"}))
    append(tmp_path, shadow_line("b", start + 1, answer("2", text="sorry, I cannot")))  # before its request
    report = w.poll(time.time())
    assert (report["requests"], report["pending"]) == (0, 1)
    # the triggerer restarts: the saved watch resumes with what it was waiting for
    state = json.loads(json.dumps(w.to_state()))
    w = shadow.WindowWatch.from_state(state, root=tmp_path, served_model=MODEL, checks=CHECKS)
    append(tmp_path, shadow_line("a", start, answer("2")))
    append(tmp_path, request("b", start + 1, answer("1", colour="blue"), {"version": "2", "status": "pending"}))
    report = w.poll(time.time())
    assert (report["requests"], report["pending"], report["paired"]) == (2, 0, 2)
    assert report["agreement_with_live"] == 0.5  # "sorry" parses to nothing
    refusal = next(m for m in report["metrics"] if m["name"] == "refusal_vs_live")
    assert refusal["observations"] == 2 and refusal["estimate"] == 0.5


def test_what_is_not_the_candidates_answer_is_not_counted(tmp_path: Path):
    start = time.time() - 60
    append(tmp_path, request("old", start - 10, answer("1"), answer("2", status=502)))  # before the window
    append(tmp_path, request("drop", start, answer("1"), {"version": "2", "status": "dropped"}))  # never sent
    append(tmp_path, request("other", start, answer("1"), answer("3", status=502)))  # another version
    append(tmp_path, request("ok", start, answer("1"), answer("2")))
    report = watch(tmp_path, start).poll(time.time())
    assert (report["requests"], report["errors"]) == (1, 0)


def test_a_clear_loser_is_rolled_back_early_and_the_reason_names_the_bound(tmp_path: Path):
    start = time.time() - 60
    w = watch(tmp_path, start, window_s=72 * 3600)
    mirrored(tmp_path, start, 40, cand=answer("2", status=502))
    report = w.poll(time.time())
    assert report["verdict"] == "rollback" and not report["window_over"]
    (reason,) = report["reasons"]
    assert reason.startswith("error_rate: lower bound") and "> 0.01 after" in reason
    assert shadow.readable(report)[0].startswith("error rate: lower bound")


def test_one_bad_answer_in_twenty_is_no_alarm(tmp_path: Path):
    """A point estimate of 1/20 = 0.05 is five times the 0.01 budget; the bound is not."""
    start = time.time() - 60
    w = watch(tmp_path, start, window_s=72 * 3600)
    mirrored(tmp_path, start, 19)
    mirrored(tmp_path, start + 1, 1, cand=answer("2", status=502), offset=100)
    report = w.poll(time.time())
    assert report["error_rate"] == 0.05 and report["verdict"] == "continue"


@pytest.mark.parametrize("on_open, verdict", [("hold", "hold"), ("rollback", "rollback"), ("estimates", "promote")])
def test_a_short_window_ends_by_the_tasks_rule(tmp_path: Path, on_open: str, verdict: str):
    """Thirty equal answers cannot bring an error bound under 1 %: the end decides."""
    start = time.time() - 60
    w = watch(tmp_path, start, release={"on_open": on_open}, window_s=30)
    mirrored(tmp_path, start, 30)
    report = w.poll(time.time(), window_over=True)
    assert report["verdict"] == verdict
    if on_open == "estimates":
        assert report["decided_by"] == "estimates at the window's end"
        assert report["reasons"][0].startswith("no bound decided in 30 requests") and "not a bound" in report["reasons"][0]
    else:
        assert any("still open at the window's end" in r for r in report["reasons"])


def test_estimates_never_promote_on_too_few_requests_or_a_missed_estimate(tmp_path: Path):
    start = time.time() - 60
    few = watch(tmp_path, start, release={"on_open": "estimates"}, window_s=30)
    mirrored(tmp_path, start, 5)
    report = few.poll(time.time(), window_over=True)
    assert report["verdict"] == "rollback" and "only 5 requests" in report["reasons"][-1]
    sloppy = tmp_path / "sloppy"
    w = watch(sloppy, start, release={"on_open": "estimates"}, window_s=30)
    mirrored(sloppy, start, 20)
    mirrored(sloppy, start + 1, 5, cand=answer("2", text="oops"), offset=100)  # format 0.8, too few to bound
    report = w.poll(time.time(), window_over=True)
    assert report["verdict"] == "rollback"
    assert any(r.startswith("format rate: open") and "misses >= 0.9" in r for r in report["reasons"]), report["reasons"]


def test_equal_candidates_are_promoted_early_once_the_bounds_and_minimums_allow(tmp_path: Path):
    start = time.time() - 7200
    w = watch(tmp_path, start, release={"min_seconds": 3600.0, "min_requests": 500}, window_s=72 * 3600)
    mirrored(tmp_path, start, 3000)
    report = w.poll(time.time())
    assert report["verdict"] == "promote" and not report["window_over"]
    assert any(r.startswith("early promote") for r in report["reasons"])
    assert all(m["status"] == "good" for m in report["metrics"])


def test_the_guard_breaches_on_a_bound_and_says_it_in_words(tmp_path: Path):
    start = time.time() - 60
    w = watch(tmp_path, start, mode="live", release={"max_p95_ms": 500.0})
    for i in range(25):
        append(tmp_path, request(f"l{i}", start + i, answer("2", latency=1000.0), None))
    report = w.poll(time.time())
    verdict = shadow.guard_verdict(report, min_requests=5, window_over=False, thresholds={"max_p95_ms": 500.0})
    assert verdict["verdict"] == "breach" and verdict["reasons"][0].startswith("p95 latency (ms): lower bound")
    assert verdict["requests"] == 25 and verdict["p95_ms"] == pytest.approx(1000.0, rel=0.01)
    quiet = shadow.guard_verdict(watch(tmp_path / "none", start, mode="live").poll(time.time()), min_requests=5,
                                 window_over=True, thresholds={})
    assert quiet["verdict"] == "insufficient"


def test_the_trigger_saves_its_watch_and_a_new_trigger_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tuneship_airflow.triggers import ShadowWindowTrigger

    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    root = tmp_path / "inference_log"
    start = time.time() - 60
    mirrored(root, start, 10)
    kwargs = {"task_name": "triage", "slot": "shadow", "served_model": MODEL, "version": "2", "since": start,
              "ends_at": start + 3600, "release": {**RELEASE, "min_seconds": 3600.0},
              "state_path": str(shadow.state_path(MODEL, "shadow", "2", start)), "poll_interval": 0.05}
    first = ShadowWindowTrigger(**kwargs)
    path, ser = first.serialize()
    assert path == "tuneship_airflow.triggers.ShadowWindowTrigger" and ShadowWindowTrigger(**ser).serialize() == (path, ser)
    assert first.poll(time.time())["requests"] == 10
    mirrored(root, start + 1, 30, cand=answer("2", status=503), offset=100)
    resumed = ShadowWindowTrigger(**ser)  # a restarted triggerer

    async def first_event() -> dict:
        async for event in resumed.run():
            return event.payload
        raise AssertionError("no event")

    event = asyncio.run(asyncio.wait_for(first_event(), 20))
    assert event["status"] == "decided" and event["verdict"]["verdict"] == "rollback"
    assert event["verdict"]["requests"] == 40  # 10 before the restart, 30 after: none read twice


def test_policy_of_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="on_open"):
        shadow.policy_of({"on_open": "promote"}, 60)
    assert shadow.policy_of({**RELEASE, "on_open": "estimates"}, 60) == Policy(
        alpha=0.05, min_requests=20, min_seconds=0.0, window_seconds=60, on_open="estimates")


def test_the_guard_counts_only_the_new_versions_live_answers_since_the_switch(tmp_path: Path):
    switch = time.time() - 60
    for i in range(30):
        append(tmp_path, request(f"pre{i}", switch - 5, answer("2", status=502), None))  # before the switch
        append(tmp_path, request(f"old{i}", switch + 1, answer("1", status=502), None))  # the old version
    unreadable = {**request("bad-ts", switch + 1, answer("2", status=502), None), "ts": "garbage"}
    append(tmp_path, request("x", switch + 1, {}, None), raw=json.dumps(unreadable) + "\n")
    for i in range(20):  # at the switch and after, one of them a canary share's answer in the live slot
        append(tmp_path, request(f"new{i}", switch + (0 if i == 0 else 1), answer("2", latency=20.0), None))
    append(tmp_path, request("slow-failure", switch + 2, answer("2", status=504, latency=30000.0), None))
    report = watch(tmp_path, switch, mode="live").poll(time.time())
    assert (report["requests"], report["errors"]) == (21, 1)
    assert report["p95_ms"] == pytest.approx(20.0, rel=0.01)  # a 30 s timeout is an error, not latency


def test_the_guard_needs_its_minimum_before_it_breaches(tmp_path: Path):
    switch = time.time() - 60
    w = watch(tmp_path, switch, mode="live")
    for i in range(15):
        append(tmp_path, request(f"e{i}", switch + 1, answer("2", status=502), None))
    report = w.poll(time.time())
    assert any(m["status"] == "bad" for m in report["metrics"])  # the bound has crossed already
    assert shadow.guard_verdict(report, min_requests=20, window_over=False, thresholds={})["verdict"] == "watching"
    ended = shadow.guard_verdict(report, min_requests=20, window_over=True, thresholds={})
    assert ended["verdict"] == "insufficient" and "need 20" in ended["reasons"][0]
    assert shadow.guard_verdict(report, min_requests=15, window_over=False, thresholds={})["verdict"] == "breach"


def test_a_first_release_is_watched_in_the_live_slot(tmp_path: Path):
    start = time.time() - 60
    w = shadow.WindowWatch.start(mode="shadow", version="2", since=start,
                                 rules=shadow.shadow_rules(RELEASE, with_live=False, checks=CHECKS),
                                 policy=shadow.policy_of(RELEASE, 60), root=tmp_path, served_model=MODEL, checks=CHECKS)
    assert [m for m in w.release.metrics] == ["error_rate", "p95_ms", "format_rate"]  # nothing to compare with
    for i in range(25):
        append(tmp_path, request(f"b{i}", start + 1, answer("2", text="oops" if i < 5 else "category=x"), None))
    report = w.poll(time.time())
    assert (report["requests"], report["format_rate"], report["paired"]) == (25, 0.8, 0)


def test_a_canary_counts_its_own_answers_and_its_users_task_success(tmp_path: Path):
    start = time.time() - 60
    release = {**RELEASE, "min_task_success": 0.8}
    w = shadow.WindowWatch.start(mode="canary", version="2", since=start, rules=shadow.canary_rules(release),
                                 policy=shadow.policy_of(release, 3600), root=tmp_path, served_model=MODEL,
                                 checks=CHECKS)
    for i in range(40):
        canary = i % 2 == 0  # half the traffic: the candidate answers it itself
        line = request(f"c{i}", start + i, answer("2" if canary else "1"), None)
        append(tmp_path, {**line, "role": "canary" if canary else "live", "key_id": "alice"})
    for i in range(0, 40, 2):  # every canary user says it failed; bob's verdicts are not his to give
        append(tmp_path, {"kind": "feedback", "ts": format_ts(parse_ts(start + 50)), "request_id": f"c{i}",
                          "key_id": "bob", "task_success": True})
        append(tmp_path, {"kind": "feedback", "ts": format_ts(parse_ts(start + 51)), "request_id": f"c{i}",
                          "key_id": "alice", "task_success": False})
    report = w.poll(time.time())
    assert (report["requests"], report["rated"]) == (20, 20)
    success = next(m for m in report["metrics"] if m["name"] == "task_success")
    assert success["estimate"] == 0.0 and success["status"] == "bad"
    assert report["verdict"] == "rollback" and any(r.startswith("task_success") for r in report["reasons"])


FACT = "Refunds reach your original payment method within 5-7 business days."
REWORDED = "Your refund is paid back to the card you used in 5 to 7 business days."
UNRELATED = "Orders can be cancelled within 1 hour of being placed."


@pytest.mark.parametrize(("candidate", "verdict"), [(REWORDED, "promote"), (UNRELATED, "rollback")])
def test_answer_similarity_to_live_gates_only_where_declared(tmp_path: Path, candidate: str, verdict: str):
    """The candidate's answers embedded beside live's (all-MiniLM-L6-v2, the packaged wheel):
    the same fact reworded stays above a declared floor of 0.6, another fact falls under it
    and is rolled back by that bound; without the floor the similarity is only reported."""
    checks = shadow.Checks(conforms=lambda t: True, parse=lambda t: {"answer": t}, declined=None,
                           similarity=shadow.pair_similarity)
    start = time.time() - 60
    for i in range(60):
        append(tmp_path, request(f"r{i}", start + i * 0.01, answer("1", text=FACT, colour="blue"),
                                 answer("2", text=candidate)))
    release = {**RELEASE, "min_answer_similarity": 0.6, "max_error_rate": 0.2, "max_format_drop": None,
               "on_open": "estimates"}

    def run(rel: dict) -> dict:
        w = shadow.WindowWatch.start(mode="shadow", version="2", since=start,
                                     rules=shadow.shadow_rules(rel, with_live=True, checks=checks),
                                     policy=shadow.policy_of(rel, 30.0), root=tmp_path, served_model=MODEL,
                                     checks=checks)
        return w.poll(time.time(), window_over=True)

    report = run(release)
    sim = next(m for m in report["metrics"] if m["name"] == "answer_similarity")
    assert report["verdict"] == verdict, report["reasons"]
    assert report["answer_similarity"] == pytest.approx(sim["estimate"])
    if verdict == "rollback":
        assert sim["status"] == "bad" and report["answer_similarity"] < 0.4
        assert any(r.startswith("answer_similarity") for r in report["reasons"])
        assert "answer similarity to live" in " ".join(shadow.readable(report))
    else:
        assert sim["status"] != "bad" and report["answer_similarity"] > 0.7
    # not declared: measured and reported, never a rule
    plain = run({**release, "min_answer_similarity": None})
    assert "answer_similarity" not in {m["name"] for m in plain["metrics"]}
    assert plain["answer_similarity"] == pytest.approx(report["answer_similarity"])
